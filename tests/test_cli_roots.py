"""`tessera roots add|list|remove` (issue 14 point 2): the TPM maker CA certificates in
service.toml managed by commands, all or nothing, checked as init and serve check them.
swtpm's case: its local CA is a root plus an intermediate ("issuercert.pem"), both
needed; the enrollment of a swtpm device is refused without them and accepted with them.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from simulator.provisioner import ProvisioningServer
from simulator.softhsm import SoftHsm
from simulator.swtpm import Swtpm

pytestmark = pytest.mark.hardware
TESSERA = str(Path(sys.executable).parent / "tessera")


def tessera(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TESSERA, *args], capture_output=True, text=True, timeout=120,
                          env=env)


def one_line_error(done: subprocess.CompletedProcess[str], expect: str) -> None:
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], done.stderr
    assert "Traceback" not in done.stderr


def authority(tmp_path: Path) -> Path:
    directory = tmp_path / "auth"
    done = tessera("--json", "init", "--dir", str(directory), "--trust-domain", "r.test",
                   "--insecure-file-key")
    assert done.returncode == 0, done.stderr
    return directory


def self_signed(path: Path, cn: str) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(Encoding.PEM))
    return path


def test_add_list_remove_swtpm_chain(tmp_path: Path, swtpm_session: Swtpm) -> None:
    directory = authority(tmp_path)
    root, issuer = swtpm_session.manufacturer_ca_paths
    done = tessera("--json", "roots", "add", str(root), str(issuer), "--dir", str(directory))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["restart_needed"] is True
    config = tomllib.loads((directory / "service.toml").read_text())
    assert config["tpm_maker_roots"] == [str(root.resolve()), str(issuer.resolve())]
    assert config["registry"].startswith("sqlite:///")  # the rest of the file kept
    # adding the same again changes nothing
    again = tessera("roots", "add", str(root), "--dir", str(directory))
    assert again.returncode == 0 and "nothing changed" in again.stdout

    listed = json.loads(tessera("--json", "roots", "list", "--dir", str(directory)).stdout)
    rows = {r["role"]: r for r in listed["roots"]}
    assert set(rows) == {"root", "intermediate"}
    inter = rows["intermediate"]
    assert inter["issuer"] == rows["root"]["subject"] and inter["complete"] is True
    assert inter["chain"] == [inter["subject"], rows["root"]["subject"]]
    cert = x509.load_pem_x509_certificate(root.read_bytes())
    assert rows["root"]["fingerprint"] == cert.fingerprint(hashes.SHA256()).hex()
    text = tessera("roots", "list", "--dir", str(directory)).stdout
    assert "chain: " in text and rows["root"]["fingerprint"][:16] in text

    # removing the root alone would leave an intermediate without one: refused
    before = (directory / "service.toml").read_bytes()
    one_line_error(tessera("roots", "remove", rows["root"]["fingerprint"][:12], "--dir",
                           str(directory)), "self-signed root")
    assert (directory / "service.toml").read_bytes() == before
    # by subject, the intermediate, then the root by fingerprint with colons
    done = tessera("roots", "remove", inter["subject"], "--dir", str(directory))
    assert done.returncode == 0, done.stderr
    fp = rows["root"]["fingerprint"]
    colons = ":".join(fp[i:i + 2] for i in range(0, 16, 2))
    done = tessera("roots", "remove", colons, "--dir", str(directory))
    assert done.returncode == 0, done.stderr
    config = tomllib.loads((directory / "service.toml").read_text())
    assert config["tpm_maker_roots"] == []


@pytest.mark.parametrize("case", ["not-pem", "missing", "intermediate-only", "no-authority",
                                  "remove-unknown"])
def test_refusals_change_nothing(tmp_path: Path, swtpm_session: Swtpm, case: str) -> None:
    directory = authority(tmp_path)
    first = self_signed(tmp_path / "first.pem", "First Maker Root")
    assert tessera("roots", "add", str(first), "--dir", str(directory)).returncode == 0
    before = (directory / "service.toml").read_bytes()
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    _, issuer = swtpm_session.manufacturer_ca_paths
    argv, expect = {
        "not-pem": (["add", str(first), str(junk)], f"{junk} holds no PEM certificate"),
        "missing": (["add", str(tmp_path / "nope.pem")], "cannot read it"),
        # an intermediate whose root is not there: serve would accept no chain to it
        "intermediate-only": (["add", str(issuer)], None),
        "no-authority": (["list", "--dir", str(tmp_path / "elsewhere")], "tessera init"),
        "remove-unknown": (["remove", "0123456789abcdef"], "'tessera roots list' shows"),
    }[case]
    if case != "no-authority":
        argv += ["--dir", str(directory)]
    done = tessera("roots", *argv)
    if case == "intermediate-only":
        # accepted as serve accepts it (a root is configured) but listed as chainless
        assert done.returncode == 0, done.stderr
        text = tessera("roots", "list", "--dir", str(directory)).stdout
        assert "(no root!)" in text
        return
    assert expect is not None
    one_line_error(done, expect)
    assert (directory / "service.toml").read_bytes() == before
    assert sorted(p.name for p in directory.iterdir() if p.name.startswith(".service.toml.")
                  and p.name.endswith(".tmp")) == []


def test_swtpm_device_needs_root_and_intermediate(tmp_path: Path, softhsm: SoftHsm,
                                                  swtpm: Swtpm) -> None:
    """The documented swtpm case: without the intermediate the EK chain is unknown;
    after 'roots add' of it and a SIGHUP to the running service, the device enrolls. A
    SIGHUP whose roots would not load keeps the current set (logged)."""
    import shutil
    import signal

    from tests.support import wait_for

    root, issuer = swtpm.manufacturer_ca_paths
    server = ProvisioningServer(tmp_path / "authority", softhsm, maker_roots=[root])
    with server:
        def enroll(serial: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([TESSERA, "enroll", "--serial", serial, "--tpm", swtpm.tcti,
                                   "--key-dir", str(tmp_path / f"keys-{serial}")],
                                  env=server.env, capture_output=True, text=True, timeout=120)

        refused = enroll("pi-r")
        assert refused.returncode == 1 and "unknown_tpm_maker" in refused.stderr, \
            refused.stderr
        copy = shutil.copy(issuer, tmp_path / "issuer.pem")
        done = tessera("roots", "add", str(copy), "--dir", str(server.directory),
                       env=server.env)
        assert done.returncode == 0 and "SIGHUP" in done.stdout, done.stderr
        proc = server._proc
        assert proc is not None
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "maker roots reloaded" in server.log.read_text(), 10, "the reload")
        ok = enroll("pi-r")
        assert ok.returncode == 0, ok.stderr
        assert "tpm-attested" in ok.stdout
        # a set that no longer loads (a file gone): refused, the current set stays
        Path(copy).unlink()
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload refused" in server.log.read_text(), 10, "the refusal")
        assert proc.poll() is None
        swtpm.restart()
        again = enroll("pi-r2")  # the same EK under another serial: refused as a duplicate,
        assert "unknown_tpm_maker" not in again.stderr, again.stderr  # not as unknown
