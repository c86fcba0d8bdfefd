"""`tessera broker config` as a newcomer runs it: the snippet names the account
Mosquitto runs as (`user`, from --user, default mosquitto) and --check refuses a joined
conf that names another; running it again over its own output replaces that output (and
--check does not count it as a second plugin), while a file it did not write is never
clobbered; every path goes into the conf absolute. And `tessera init`'s messages name
the --dir the user gave, not its staging directory. Every refusal: one line, exit 1,
the files that were there unchanged."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import broker_conf_files

TESSERA = str(Path(sys.executable).parent / "tessera")
#: an account the module's files are readable by (root reads everything here)
USER = "root" if os.geteuid() == 0 else os.environ.get("USER", "root")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return broker_conf_files(tmp_path_factory.mktemp("bc"))


def config(files: dict[str, str], *extra: str, cwd: Path | None = None,
           user: str | None = USER) -> subprocess.CompletedProcess[str]:
    args = [x for k in ("--bundle", "--credential", "--key", "--policy") for x in (k, files[k])]
    if user is not None:
        args += ["--user", user]
    return subprocess.run([TESSERA, "broker", "config", *args, *extra], capture_output=True,
                          text=True, timeout=120, cwd=cwd)


def refused(done: subprocess.CompletedProcess[str], expect: str) -> str:
    errors = [ln for ln in done.stderr.splitlines() if not ln.startswith("insecure-software")]
    assert done.returncode == 1 and len(errors) == 1, done.stderr
    assert errors[0].startswith("tessera: error:") and expect in errors[0], errors
    return errors[0]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_the_snippet_names_the_account_mosquitto_runs_as(files: dict[str, str],
                                                           tmp_path: Path) -> None:
    from provisioning.cli import build_parser

    parsed = build_parser().parse_args(["broker", "config", "--bundle", "b", "--credential",
                                        "c", "--key", "k", "--policy", "p"])
    assert parsed.user == "mosquitto"  # Mosquitto's own default when started as root
    out = tmp_path / "t.conf"
    done = config(files, "-o", str(out))
    assert done.returncode == 0, done.stderr
    lines = out.read_text().splitlines()
    assert lines[1] == f"user {USER}"
    assert [ln for ln in lines if ln.split(" ", 1)[0] == "user"] == [f"user {USER}"]


def test_a_user_name_that_is_no_word_is_refused(files: dict[str, str],
                                                tmp_path: Path) -> None:
    out = tmp_path / "t.conf"
    refused(config(files, "-o", str(out), user="a b"), "--user 'a b': not an account name")
    assert not out.exists()


def test_check_refuses_a_conf_naming_another_user(files: dict[str, str],
                                                  tmp_path: Path) -> None:
    conf = tmp_path / "mosquitto.conf"
    conf.write_text("# the distribution's conf\nuser nobody\n")
    out = tmp_path / "t.conf"
    before = snapshot(tmp_path)
    line = refused(config(files, "--check", str(conf), "-o", str(out)),
                   f"mosquitto.conf:2: user nobody, but --user is {USER}")
    assert "pass --user nobody or change this line" in line
    assert snapshot(tmp_path) == before and not out.exists()
    # the same account: accepted, and the snippet leaves the line to the conf (Mosquitto
    # refuses a second 'user' line, "Duplicate user value in configuration")
    conf.write_text(f"user {USER}\n")
    done = config(files, "--check", str(conf), "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert not [ln for ln in out.read_text().splitlines() if ln.startswith("user ")]
    out.unlink()
    # none at all: the snippet's line is the one, and the command says which account
    conf.write_text("# no user line\n")
    done = config(files, "--check", str(conf), "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert f"user {USER}" in out.read_text().splitlines()
    assert f"runs as user {USER}" in done.stdout


def test_running_it_again_replaces_its_own_output(files: dict[str, str],
                                                  tmp_path: Path) -> None:
    """GETTING-STARTED's layout: the snippet lands in the include_dir of the conf that
    --check reads; the second run must not see its first output as a second plugin."""
    confd = tmp_path / "conf.d"
    confd.mkdir()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"user {USER}\ninclude_dir {confd}\n")
    out = confd / "tessera.conf"
    args = ("--check", str(conf), "-o", str(out))
    done = config(files, *args)
    assert done.returncode == 0, done.stderr
    first = out.read_text()
    inode = out.stat().st_ino
    done = config(files, *args, "--plugin-opt", "quarantine_failures=4")
    assert done.returncode == 0, done.stderr
    second = out.read_text()
    assert "plugin_opt_quarantine_failures 4" in second.splitlines()
    assert second.replace("plugin_opt_quarantine_failures 4\n", "") == first
    assert out.stat().st_ino != inode  # a new file renamed over the old one
    assert sorted(p.name for p in confd.iterdir()) == ["tessera.conf"]  # no temporary left
    done = config(files, *args)  # and again, back to the first
    assert done.returncode == 0, done.stderr
    assert out.read_text() == first


def test_a_file_it_did_not_write_is_never_clobbered(files: dict[str, str],
                                                    tmp_path: Path) -> None:
    confd = tmp_path / "conf.d"
    confd.mkdir()
    mine = confd / "local.conf"
    mine.write_text("# my own settings\nlog_type all\n")
    before = snapshot(tmp_path)
    line = refused(config(files, "-o", str(mine)),
                   f"-o {mine} exists and was not written by 'tessera broker config'")
    assert "pass a different -o or remove that file" in line
    assert snapshot(tmp_path) == before
    # a file that only mentions the header further down is not one it wrote either
    mine.write_text("log_type all\n# Tessera: written by 'tessera broker config'\n")
    before = snapshot(tmp_path)
    refused(config(files, "-o", str(mine)), "was not written by 'tessera broker config'")
    assert snapshot(tmp_path) == before
    # another file's Tessera plugin line is still a second plugin
    (confd / "old.conf").write_text("plugin /opt/x/tessera_mosquitto.so\n")
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"include_dir {confd}\n")
    out = confd / "tessera.conf"
    before = snapshot(tmp_path)
    refused(config(files, "--check", str(conf), "-o", str(out)),
            "old.conf:1: the Tessera plugin is already loaded here")
    assert snapshot(tmp_path) == before
    # --check naming the output itself
    (confd / "old.conf").unlink()
    assert config(files, "-o", str(out)).returncode == 0
    before = snapshot(tmp_path)
    refused(config(files, "--check", str(out), "-o", str(out)),
            "is the -o file; pass the mosquitto.conf that includes it")
    assert snapshot(tmp_path) == before


def test_every_path_goes_into_the_conf_absolute(files: dict[str, str],
                                                tmp_path: Path) -> None:
    """Given relative to the shell's directory, written absolute: Mosquitto would
    resolve them against its own (/ under systemd)."""
    work = tmp_path / "work"
    (work / "in" / "aks").mkdir(parents=True)
    rel = {}
    for flag in ("--bundle", "--credential", "--policy"):
        name = Path(files[flag]).name
        (work / "in" / name).write_bytes(Path(files[flag]).read_bytes())
        rel[flag] = f"in/{name}"
    pem = Path(files["--key"].removeprefix("insecure-software:"))
    (work / "in" / "key.pem").write_bytes(pem.read_bytes())
    rel["--key"] = "insecure-software:in/key.pem"
    (work / "in" / "ca.pem").write_bytes(Path(files["--bundle"]).read_bytes())
    for name in ("tls.pem", "tls.key"):
        (work / "in" / name).write_text("")
    (work / "audit").mkdir()  # the plugin creates no directories: broker config checks
    state = tmp_path / "state"  # built once more here (relative: ../state)
    done = config(rel, "--cafile",
                  "in/ca.pem", "--audit-log", "audit/audit.jsonl", "--tls-cert", "in/tls.pem",
                  "--tls-key", "in/tls.key", "--state-dir", "../state",
                  "--plugin-opt", "attestation_keys=in/aks",
                  "--plugin-opt", "nonce_file=in/nonces",
                  "--plugin-opt", "revocation_file=in/revoked.json",
                  "-o", "out.conf", cwd=work)
    assert done.returncode == 0, done.stderr
    conf = dict(ln.split(" ", 1) for ln in (work / "out.conf").read_text().splitlines()
                if ln and not ln.startswith("#"))
    expect = {
        "plugin_opt_bundle": work / "in" / "bundle.pem",
        "plugin_opt_credential": work / "in" / "broker.pem",
        "plugin_opt_policy": work / "in" / "policy.toml",
        "plugin_opt_cafile": work / "in" / "ca.pem",
        "plugin_opt_audit_log": work / "audit" / "audit.jsonl",
        "plugin_opt_attestation_keys": work / "in" / "aks",
        "plugin_opt_nonce_file": work / "in" / "nonces",
        "plugin_opt_revocation_file": work / "in" / "revoked.json",
        "certfile": work / "in" / "tls.pem",
        "keyfile": work / "in" / "tls.key",
    }
    for key, path in expect.items():
        assert conf[key] == str(path), key
    assert conf["plugin_opt_key"] == f"insecure-software:{work / 'in' / 'key.pem'}"
    assert conf["plugin"].startswith(f"{state}/plugin/"), conf["plugin"]
    assert Path(conf["plugin"]).is_file()


def test_the_key_options_are_paths_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--pin-file and --key-dir (refused with the software key above, they need a token
    or a TPM) go through the same list; a relative PKCS#11 module becomes absolute, a
    bare library name is left to the loader's search path, a TCTI is not a path."""
    from provisioning.broker_conf import _PATH_OPTIONS, _absolute_key

    assert {"pin_file", "key_dir", "cafile", "audit_log"} <= set(_PATH_OPTIONS)
    monkeypatch.chdir(tmp_path)
    assert _absolute_key("pkcs11:lib/softhsm2.so#t/k") == f"pkcs11:{tmp_path}/lib/softhsm2.so#t/k"
    assert _absolute_key("pkcs11:libsofthsm2.so#t/k") == "pkcs11:libsofthsm2.so#t/k"
    assert _absolute_key("pkcs11:/usr/lib/x.so#t/k") == "pkcs11:/usr/lib/x.so#t/k"
    assert _absolute_key("tpm:swtpm:port=2321#k") == "tpm:swtpm:port=2321#k"


def test_init_names_the_directory_the_user_gave(tmp_path: Path) -> None:
    done = subprocess.run([TESSERA, "init", "--dir", "fleet/auth", "--trust-domain",
                           "t.test", "--insecure-file-key"], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "fleet authority fleet/auth uses an insecure-file-key" in done.stderr
    assert ".tessera-init-" not in done.stderr + done.stdout
    assert "created in fleet/auth" in done.stdout
