"""`tessera broker config` (issue 14 point 3): a wrong --trust-domain is refused (it is
the broker credential's by default); --plugin-opt takes every option the plugin reads
(metrics_port included) and refuses other names with the list; --key takes a PKCS#11
spec with or without the ``pkcs11:`` prefix; --state-dir builds the plugin there and the
conf points there. Every refusal: one line, exit 1, no output file."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from simulator.fleet import Fleet
from tests.support import broker_conf_files

TESSERA = str(Path(sys.executable).parent / "tessera")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return broker_conf_files(tmp_path_factory.mktemp("bc"))


def config(files: dict[str, str], out: Path, *extra: str,
           drop: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    args = [x for k in ("--bundle", "--credential", "--key", "--policy") if k not in drop
            for x in (k, files[k])]
    user = os.environ.get("USER", "root") if os.geteuid() else "root"
    return subprocess.run([TESSERA, "broker", "config", *args, "--user", user, *extra,
                           "-o", str(out)], capture_output=True, text=True, timeout=120)


def refused(done: subprocess.CompletedProcess[str], out: Path, expect: str) -> str:
    errors = [ln for ln in done.stderr.splitlines() if not ln.startswith("insecure-software")]
    assert done.returncode == 1 and len(errors) == 1, done.stderr
    assert errors[0].startswith("tessera: error:") and expect in errors[0], errors
    assert not out.exists()
    return errors[0]


def test_trust_domain_defaults_to_the_credential_and_a_wrong_one_is_refused(
        files: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "t.conf"
    line = refused(config(files, out, "--trust-domain", "elsewhere.test"), out,
                   "--trust-domain elsewhere.test is not the trust domain of --credential")
    assert f"--trust-domain {files['trust_domain']}" in line  # the fix
    done = config(files, out)
    assert done.returncode == 0, done.stderr
    assert f"plugin_opt_trust_domain {files['trust_domain']}" in out.read_text().splitlines()
    out.unlink()
    done = config(files, out, "--trust-domain", files["trust_domain"])
    assert done.returncode == 0, done.stderr


def test_a_device_credential_is_not_a_broker_credential(files: dict[str, str],
                                                        tmp_path: Path) -> None:
    fleet = Fleet()
    member = fleet.member("device", "pi-1")
    cred = tmp_path / "device.pem"
    cred.write_bytes(member.credential.chain[0].public_bytes(Encoding.PEM))
    out = tmp_path / "d.conf"
    refused(config({**files, "--credential": str(cred)}, out), out, "not a broker")


def test_plugin_options(files: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "p.conf"
    done = config(files, out, "--plugin-opt", "metrics_port=9101", "--plugin-opt",
                  "quarantine_failures=4", "--plugin-opt", "plugin_opt_session_epoch_ms=5000")
    assert done.returncode == 0, done.stderr
    lines = out.read_text().splitlines()
    for line in ("plugin_opt_metrics_port 9101", "plugin_opt_quarantine_failures 4",
                 "plugin_opt_session_epoch_ms 5000"):
        assert line in lines, line
    out.unlink()
    line = refused(config(files, out, "--plugin-opt", "metric_port=9101"), out,
                   "--plugin-opt 'metric_port=9101': expected NAME=VALUE with NAME one of")
    assert "metrics_port" in line and "quarantine_failures" in line
    refused(config(files, out, "--plugin-opt", "key=pkcs11:x"), out, "use that")
    refused(config(files, out, "--plugin-opt", "metrics_port=http"), out,
            "metrics_port=http: a TCP port")


def test_known_options_match_the_plugin_documentation() -> None:
    """The plugin documents every option it reads (broker_plugin/host.py): the CLI knows
    each of them, through a flag or --plugin-opt."""
    import broker_plugin.host as host
    from provisioning.broker_conf import _FLAG_OPTIONS, _known_plugin_options

    documented = set(re.findall(r"^    ([a-z][a-z0-9_]+)\s", host.__doc__ or "", re.M))
    assert documented - set(_FLAG_OPTIONS) - set(_known_plugin_options()) == set()


def test_key_spec_with_or_without_the_pkcs11_prefix() -> None:
    from provisioning.broker_conf import CliError, _broker_key

    spec = "/usr/lib/softhsm/libsofthsm2.so#brokers/mqtt-1"
    assert _broker_key(spec) == f"pkcs11:{spec}"
    assert _broker_key(f"pkcs11:{spec}") == f"pkcs11:{spec}"
    assert _broker_key("tpm:device:/dev/tpmrm0#tessera-broker").startswith("tpm:")
    with pytest.raises(CliError, match="expected \\[pkcs11:\\]<module>#<token>/<label>"):
        _broker_key("/usr/lib/softhsm/libsofthsm2.so")


def test_key_without_prefix_reaches_the_token(files: dict[str, str], tmp_path: Path) -> None:
    """Without the prefix the spec is a PKCS#11 key: opening it is tried (here it stops
    at the PIN), it is not refused as a malformed spec."""
    out = tmp_path / "k.conf"
    refused(config({**files, "--key": "/nonexistent/module.so#tok/mqtt-1"}, out), out,
            "PKCS#11")
    refused(config({**files, "--key": "nonsense"}, out), out, "--key 'nonsense': expected")


def test_state_dir_builds_the_plugin_there(files: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "s.conf"
    state = tmp_path / "broker-state"
    done = config(files, out, "--state-dir", str(state))
    assert done.returncode == 0, done.stderr
    plugin = [ln.split(" ", 1)[1] for ln in out.read_text().splitlines()
              if ln.startswith("plugin ")]
    assert plugin == [str(state.absolute() / "plugin" / "tessera_mosquitto.so")] or \
        plugin[0].startswith(str(state.absolute() / "plugin")), plugin
    assert Path(plugin[0]).is_file()
    blocked = tmp_path / "file"
    blocked.write_text("")
    out2 = tmp_path / "s2.conf"
    refused(config(files, out2, "--state-dir", str(blocked)), out2, "--state-dir")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the files are made unreadable "
                    "to another account (nobody) by chown and chmod")
def test_user_check_covers_the_key_the_identity_files_and_what_the_plugin_writes(
        tmp_path: Path) -> None:
    """--user names the account Mosquitto drops to before it loads the plugin, which
    then opens the key, bundle, credential and policy and writes the audit log and its
    state files as that account. A key only root can read and an audit directory
    nobody can write are named in the one refusal line (every problem at once); once
    fixed, neither is named. (This machine's Python may itself be out of the
    account's reach, e.g. under /root: that is named too and is not what this test is
    about.)"""
    import shutil
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="tessera-user-check-", dir="/tmp"))
    try:
        top.chmod(0o755)  # /tmp/pytest-of-root is 0700: the files live beside it
        files = broker_conf_files(top)
        key = Path(files["--key"].removeprefix("insecure-software:"))
        key.chmod(0o600)
        audit_dir = top / "audit"
        audit_dir.mkdir(mode=0o755)
        out = tmp_path / "u.conf"
        args = [x for k in ("--bundle", "--credential", "--key", "--policy")
                for x in (k, files[k])]
        argv = [TESSERA, "broker", "config", *args, "--audit-log", str(audit_dir / "a.jsonl"),
                "--plugin-opt", f"nonce_file={top / 'nonces'}",
                "--plugin-opt", f"revocation_file={top / 'missing' / 'revoked.json'}",
                "--user", "nobody",
                "-o", str(out)]
        line = refused(subprocess.run(argv, capture_output=True, text=True, timeout=120),
                       out, "mosquitto drops to user nobody")
        assert f"cannot read {key} (stopped at {key})" in line or f", {key} (stopped" in line
        assert f"cannot write {audit_dir / 'a.jsonl'} (stopped at {audit_dir})" in line
        assert f"{top / 'nonces'} (stopped at {top})" in line  # the nonce file's directory
        assert (f"{top / 'missing' / 'revoked.json'} (its directory {top / 'missing'} "
                "does not exist; create it)") in line  # the plugin creates no directories
        assert "chown or chmod" in line
        before = sorted(p.name for p in top.iterdir())
        key.chmod(0o644)
        audit_dir.chmod(0o777)
        (top / "missing").mkdir()
        (top / "missing").chmod(0o777)
        top.chmod(0o777)
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        errors = [ln for ln in done.stderr.splitlines() if ln.startswith("tessera: error")]
        assert not [e for e in errors if str(key) in e or str(top) in e], errors
        # nothing written there
        assert sorted(p.name for p in top.iterdir()) == sorted([*before, "missing"])
    finally:
        shutil.rmtree(top, ignore_errors=True)
