"""The factory never half-does anything (issue 13 point 1): `tessera init`, `enroll`,
`renew` and `enroll --batch` interrupted at every step (SIGKILL: no cleanup, like a
power cut; SIGINT and SIGTERM: the operator) leave a state that the same command,
run again, completes; afterwards the registry, the token and the files agree.

The interruption is real: the CLI sends itself the signal at a named point
(TESSERA_TEST_CRASH_AT, a test-only hook in provisioning/cli.py); the service is
`tessera serve`, keys are on SoftHSM2 tokens and in swtpm, disks are tmpfs mounts."""

from __future__ import annotations

import base64
import csv
import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from hw.pkcs11 import Pkcs11Backend, rescan_tokens
from simulator.provisioner import ProvisioningServer
from simulator.softhsm import SoftHsm
from simulator.swtpm import Swtpm
from structauth.errors import KeyBackendError, Reason

pytestmark = pytest.mark.hardware

TESSERA = str(Path(sys.executable).parent / "tessera")
ENROLL_POINTS = ["enroll:key-created", "enroll:accepted", "enroll:issued", "enroll:staged",
                 "enroll:saved"]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, softhsm: SoftHsm,
            swtpm_session: Swtpm) -> Iterator[ProvisioningServer]:
    server = ProvisioningServer(tmp_path_factory.mktemp("atomic") / "authority", softhsm,
                                maker_roots=swtpm_session.manufacturer_ca_paths)
    with server:
        yield server


@pytest.fixture(scope="module")
def device_token(softhsm: SoftHsm) -> Iterator[tuple[str, str]]:
    """(token label, user PIN) of a SoftHSM2 token that holds device keys."""
    label, pin = f"dev-{secrets.token_hex(4)}", secrets.token_hex(8)
    softhsm.init_token(label, so_pin=secrets.token_hex(8), user_pin=pin)
    yield label, pin
    softhsm.delete_token(label)


def run(service: ProvisioningServer, *args: str, crash: str | None = None,
        pin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(service.env)
    if pin is not None:
        env["TESSERA_PKCS11_PIN"] = pin
    if crash is not None:
        env["TESSERA_TEST_CRASH_AT"] = crash
    return subprocess.run([TESSERA, *args], env=env, capture_output=True, text=True, timeout=120)


def registered(service: ProvisioningServer, serial: str) -> dict | None:  # type: ignore[type-arg]
    from device.provisioner import ProvisionerClient, ServiceError

    client = ProvisionerClient(service.url, operator_token=service.operator_token)
    try:
        return client.call("GET", f"/v1/devices/{serial}")  # type: ignore[no-any-return]
    except ServiceError as exc:
        assert exc.reason is Reason.NOT_ENROLLED, exc
        return None


def token_keys(softhsm: SoftHsm, token: tuple[str, str], label: str) -> list[str]:
    """SPKIs (base64) of the private keys labelled ``label`` on the token."""
    os.environ["TESSERA_PKCS11_PIN"] = token[1]
    rescan_tokens(softhsm.module)
    with Pkcs11Backend(softhsm.module, token[0]) as backend:
        try:
            signer = backend.load_signing_key(label)
        except KeyBackendError as exc:
            assert exc.reason is Reason.KEY_NOT_FOUND
            return []
        return [spki(signer.public_key())]


def spki(key: object) -> str:
    return base64.b64encode(key.public_bytes(  # type: ignore[attr-defined]
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo)).decode()


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*")
                  if p.name.startswith(".") or p.name.endswith(".tmp"))


def assert_agree(service: ProvisioningServer, serial: str, out: Path,
                 key: str | None = None) -> dict:  # type: ignore[type-arg]
    """Registry, files (and token key) tell one story: the device is active with one
    key, and --out holds complete credentials for that key and that identity."""
    record = registered(service, serial)
    assert record is not None and record["status"] == "active", record
    assert sorted(p.name for p in out.iterdir()) == [
        "agent.json", "agent.toml", "bundle.pem", "enrollment.pem", "identity",
        "operational.pem"]  # agent files: the agent runs from --out (tests/test_enroll_state)
    assert (out / "identity").read_text().strip() == record["identity"]
    for name in ("operational.pem", "enrollment.pem"):
        cert = x509.load_pem_x509_certificate((out / name).read_bytes())
        assert spki(cert.public_key()) == record["public_key"], name
    op = x509.load_pem_x509_certificate((out / "operational.pem").read_bytes())
    assert format(op.serial_number, "x") == record["operational_cert_serial"]
    if key is not None:
        assert key == record["public_key"]
    assert leftovers(out.parent) == [], leftovers(out.parent)
    return record


@pytest.mark.parametrize(("point", "action"), [
    *((p, "kill") for p in ENROLL_POINTS),
    *((p, "int") for p in ENROLL_POINTS),
    ("enroll:accepted", "term"), ("enroll:issued", "term"),
])
def test_witnessed_enroll_interrupted_at_every_step(
    service: ProvisioningServer, softhsm: SoftHsm, device_token: tuple[str, str],
    tmp_path: Path, point: str, action: str,
) -> None:
    serial = f"w-{point.split(':')[1]}-{action}"
    label = f"k-{serial}"
    out = tmp_path / "creds"
    args = ["--json", "enroll", "--serial", serial, "--kind", "broker", "--pkcs11",
            f"{softhsm.module}#{device_token[0]}/{label}", "--out", str(out)]
    first = run(service, *args, crash=f"{point}:{action}", pin=device_token[1])
    if action == "kill":
        assert first.returncode == -signal.SIGKILL, first.stderr
    else:
        assert first.returncode == 130, first.stderr
        assert len(first.stderr.strip().splitlines()) == 1, first.stderr
        assert "run the same command again" in first.stderr
    held = point in ("enroll:issued", "enroll:staged", "enroll:saved")
    if action != "kill" and not held:
        # an interrupt before the recording step undoes everything, token key included
        assert registered(service, serial) is None
        assert token_keys(softhsm, device_token, label) == []
        assert not out.exists() and leftovers(tmp_path) == []
    if action != "kill" and held:
        # held until the credentials were saved: the device is fully enrolled already
        assert_agree(service, serial, out)

    again = run(service, *args, pin=device_token[1])
    assert again.returncode == 0, again.stderr
    [key] = token_keys(softhsm, device_token, label)
    record = assert_agree(service, serial, out, key)
    from device.provisioner import ProvisionerClient

    feed = ProvisionerClient(service.url).call("GET", "/v1/revocations?since=0")["events"]
    revoked = [e for e in feed if e["serial"] == serial]
    if action == "kill" and point in ("enroll:issued", "enroll:staged"):
        # the credentials issued to the killed run never reached --out: they are revoked
        # (one event), and the ones on disk are not
        [event] = revoked
        assert record["operational_cert_serial"] not in event["cert_serials"]
    else:
        assert revoked == []
    # and once more: done, nothing changes
    before = registered(service, serial)
    third = run(service, *args, pin=device_token[1])
    assert third.returncode == 0, third.stderr
    assert registered(service, serial) == before


@pytest.mark.parametrize("point", ["enroll:accepted", "enroll:issued", "enroll:staged"])
def test_tpm_enroll_killed_then_finished(softhsm: SoftHsm, swtpm: Swtpm, tmp_path: Path,
                                        point: str) -> None:
    """The same with a TPM (a fresh swtpm, so its EK enrolls once: a service that
    trusts its maker): the interrupted run's TPM key is the one enrolled."""
    with ProvisioningServer(tmp_path / "authority", softhsm,
                            maker_roots=swtpm.manufacturer_ca_paths) as service:
        serial = f"t-{point.split(':')[1]}"
        out = tmp_path / "out" / "creds"
        out.parent.mkdir()
        args = ["enroll", "--serial", serial, "--tpm", swtpm.tcti, "--key-dir",
                str(tmp_path / "keys"), "--out", str(out)]
        first = run(service, *args, crash=point)
        assert first.returncode == -signal.SIGKILL, first.stderr
        # swtpm has no resource manager: the killed process's transient objects stay
        # loaded until the TPM restarts (/dev/tpmrm0 flushes them when the process dies)
        swtpm.restart()
        again = run(service, *args)
        assert again.returncode == 0, again.stderr
        record = assert_agree(service, serial, out)
        assert record["attestation"] == "tpm-attested"


def test_refused_enroll_creates_no_key_and_no_files(
    service: ProvisioningServer, softhsm: SoftHsm, device_token: tuple[str, str],
    tmp_path: Path,
) -> None:
    """An enrolled serial is refused before a key is made; a refusal after the key was
    made (the service refuses the key backend's claim here: a second device with the
    same serial) removes the key it made."""
    out = tmp_path / "a"
    ok = run(service, "enroll", "--serial", "dup-1", "--kind", "broker", "--pkcs11",
             f"{softhsm.module}#{device_token[0]}/dup-key-1", "--out", str(out),
             pin=device_token[1])
    assert ok.returncode == 0, ok.stderr
    before = registered(service, "dup-1")
    again = run(service, "enroll", "--serial", "dup-1", "--kind", "broker", "--pkcs11",
                f"{softhsm.module}#{device_token[0]}/dup-key-2", "--out", str(tmp_path / "b"),
                pin=device_token[1])
    assert again.returncode == 1 and "already enrolled" in again.stderr, again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    assert token_keys(softhsm, device_token, "dup-key-2") == []
    assert not (tmp_path / "b").exists() and leftovers(tmp_path) == []
    assert registered(service, "dup-1") == before


def test_refused_after_key_creation_removes_key(
    service: ProvisioningServer, softhsm: SoftHsm, device_token: tuple[str, str],
    tmp_path: Path,
) -> None:
    """The service refuses at its first step (a trust domain's kind it does not know is
    refused by the CLI's parser, so use what only the service checks: device_class)."""
    done = run(service, "enroll", "--serial", "cls-1", "--kind", "broker", "--device-class",
               "bad class!", "--pkcs11", f"{softhsm.module}#{device_token[0]}/cls-key",
               "--out", str(tmp_path / "c"), pin=device_token[1])
    assert done.returncode == 1, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert token_keys(softhsm, device_token, "cls-key") == []
    assert registered(service, "cls-1") is None
    assert not (tmp_path / "c").exists() and leftovers(tmp_path) == []


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A full and a read-only 64 KiB tmpfs (root only)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount tmpfs")
    full, ro = tmp_path / "full", tmp_path / "ro"
    mounted = []
    try:
        for path, opts in ((full, "size=64k"), (ro, "size=64k,ro")):
            path.mkdir()
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                pytest.skip(f"cannot mount tmpfs: {done.stderr.strip()}")
            mounted.append(path)
        fill(full)
        yield full, ro
    finally:
        for path in mounted:
            subprocess.run(["umount", str(path)], capture_output=True)


def fill(directory: Path) -> None:
    fd = os.open(directory / f"filler-{secrets.token_hex(3)}", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)


@pytest.mark.parametrize("where", ["full", "ro", "file"])
def test_out_refused_before_enrolling(
    service: ProvisioningServer, softhsm: SoftHsm, device_token: tuple[str, str],
    tmp_path: Path, mounts: tuple[Path, Path], where: str,
) -> None:
    serial = f"pre-{where}"
    out = {"full": mounts[0] / "creds", "ro": mounts[1] / "creds",
           "file": tmp_path / "existing-file"}[where]
    if where == "file":
        out.write_text("precious")
    listing = sorted(p.name for p in out.parent.iterdir())
    done = run(service, "enroll", "--serial", serial, "--kind", "broker", "--pkcs11",
               f"{softhsm.module}#{device_token[0]}/{serial}", "--out", str(out),
               pin=device_token[1])
    assert done.returncode == 1, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "--out" in done.stderr and "Traceback" not in done.stderr
    assert registered(service, serial) is None  # refused before the service was asked
    assert token_keys(softhsm, device_token, serial) == []
    assert sorted(p.name for p in out.parent.iterdir()) == listing
    if where == "file":
        assert out.read_text() == "precious"


def test_disk_full_after_issuing_then_finished(
    service: ProvisioningServer, softhsm: SoftHsm, device_token: tuple[str, str],
    tmp_path: Path, mounts: tuple[Path, Path],
) -> None:
    """The disk fills up while the service issues (the CLI is stopped at the point and
    the test fills the tmpfs): the save fails, the CLI says so in one line, leaves no
    partial file, and once there is space the same command finishes the job."""
    full = mounts[0]
    for p in full.iterdir():
        p.unlink()  # room for the pre-flight check this time
    serial, out = "late-full", full / "creds"
    args = ["enroll", "--serial", serial, "--kind", "broker", "--pkcs11",
            f"{softhsm.module}#{device_token[0]}/{serial}", "--out", str(out)]
    env = {**service.env, "TESSERA_PKCS11_PIN": device_token[1],
           "TESSERA_TEST_CRASH_AT": "enroll:issued:stop"}
    proc = subprocess.Popen([TESSERA,
                             *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    from tests.support import wait_for

    def stopped() -> bool:
        with open(f"/proc/{proc.pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "T"

    wait_for(stopped, timeout=60, what="the CLI stopped at enroll:issued")
    fill(full)
    os.kill(proc.pid, signal.SIGCONT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert "run the same command again" in stderr and "Traceback" not in stderr
    assert not out.exists()
    assert [p.name for p in full.glob(".*") if p.name != ".creds.tessera-pending"] == []
    assert [p.name for p in (full / ".creds.tessera-pending").iterdir()] == [
        ".tessera-enroll.json"]  # only the journal: what lets the re-run finish
    for p in full.glob("filler-*"):
        p.unlink()
    again = run(service, *args, pin=device_token[1])
    assert again.returncode == 0, again.stderr
    [key] = token_keys(softhsm, device_token, serial)
    assert_agree(service, serial, out, key)


def test_renew_out_checked_and_interrupted(
    service: ProvisioningServer, softhsm: SoftHsm, device_token: tuple[str, str],
    tmp_path: Path,
) -> None:
    serial, out = "renew-1", tmp_path / "creds"
    spec = f"{softhsm.module}#{device_token[0]}/{serial}"
    done = run(service, "enroll", "--serial", serial, "--kind", "broker", "--pkcs11", spec,
               "--out", str(out), pin=device_token[1])
    assert done.returncode == 0, done.stderr
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    # --out an existing file: refused before renewing, nothing changed
    bad = tmp_path / "afile"
    bad.write_text("x")
    refused = run(service, "renew", "--serial", serial, "--pkcs11", spec, "--out", str(bad),
                  pin=device_token[1])
    assert refused.returncode == 1 and "--out" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert registered(service, serial)["operational_cert_serial"] == format(  # type: ignore[index]
        x509.load_pem_x509_certificate(files["operational.pem"]).serial_number, "x")
    # killed between the renewal and the save: the old credentials are intact
    killed = run(service, "renew", "--serial", serial, "--pkcs11", spec, "--out", str(out),
                 crash="renew:issued", pin=device_token[1])
    assert killed.returncode == -signal.SIGKILL
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
    again = run(service, "renew", "--serial", serial, "--pkcs11", spec, "--out", str(out),
                pin=device_token[1])
    assert again.returncode == 0, again.stderr
    assert (out / "operational.pem").read_bytes() != files["operational.pem"]
    assert_agree(service, serial, out)


def test_batch_reports_every_row_and_resumes(
    service: ProvisioningServer, softhsm: SoftHsm, device_token: tuple[str, str],
    tmp_path: Path,
) -> None:
    spec = f"{softhsm.module}#{device_token[0]}"
    rows = [
        {"serial": "b-1", "pkcs11": f"{spec}/b-1"},
        {"serial": "b 2", "pkcs11": f"{spec}/b-2"},  # bad serial: failed, run goes on
        {"serial": "b-3", "pkcs11": ""},  # neither tpm nor pkcs11: failed
        {"serial": "b-4", "pkcs11": f"{spec}/b-4"},
        {"serial": "b-5", "pkcs11": f"{spec}/b-5"},
    ]
    path = tmp_path / "rows.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, ["serial", "pkcs11"])
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "out"
    args = ["--json", "enroll", "--kind", "broker", "--batch", str(path), "--out", str(out)]
    (out / "b-5").mkdir(parents=True)
    (out / "b-5" / "stray").write_text("x")  # --out/b-5 not empty: refused before enrolling
    first = run(service, *args, pin=device_token[1])
    assert first.returncode == 1, first.stderr
    report = json.loads(first.stdout)
    status = {r["serial"]: r["status"] for r in report["results"]}
    assert status == {"b-1": "done", "b 2": "failed", "b-3": "failed", "b-4": "done",
                      "b-5": "failed"}, report
    assert report["done"] == 2 and report["failed"] == 3
    assert all(r.get("error") for r in report["results"] if not r["ok"])
    assert registered(service, "b-5") is None
    assert token_keys(softhsm, device_token, "b-5") == []

    (out / "b-5" / "stray").unlink()
    # resumed, killed in the middle of b-5's enrollment window, then resumed again
    killed = run(service, *args, crash="enroll:issued", pin=device_token[1])
    assert killed.returncode == -signal.SIGKILL
    again = run(service, *args, pin=device_token[1])
    report = json.loads(again.stdout)
    status = {r["serial"]: r["status"] for r in report["results"]}
    assert status == {"b-1": "skipped", "b 2": "failed", "b-3": "failed", "b-4": "skipped",
                      "b-5": "done"}, report
    for serial in ("b-1", "b-4", "b-5"):
        [key] = token_keys(softhsm, device_token, serial)
        assert_agree(service, serial, out / serial, key)


def test_batch_text_report(service: ProvisioningServer, softhsm: SoftHsm,
                           device_token: tuple[str, str], tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    path.write_text(f"serial,pkcs11\nt-1,{softhsm.module}#{device_token[0]}/t-1\nt 2,\n")
    done = run(service, "enroll", "--kind", "broker", "--batch", str(path), "--out",
               str(tmp_path / "out"), pin=device_token[1])
    assert done.returncode == 1
    lines = done.stdout.strip().splitlines()
    assert lines[0] == "t-1: done"
    assert lines[1].startswith("t 2: failed: ")
    assert lines[2].startswith("enrolled 1 of 2 devices (1 now, 0 before; 0 refused, 1 failed)")


# -- init ------------------------------------------------------------------------------


def init_args(directory: Path, softhsm: SoftHsm, token: str, *extra: str) -> list[str]:
    return ["--json", "init", "--dir", str(directory), "--trust-domain", "atomic.test",
            "--pkcs11-module", softhsm.module, "--token", token, *extra]


@pytest.fixture
def authority_token(softhsm: SoftHsm) -> Iterator[tuple[str, str]]:
    label, pin = f"auth-{secrets.token_hex(4)}", secrets.token_hex(8)
    softhsm.init_token(label, so_pin=secrets.token_hex(8), user_pin=pin)
    yield label, pin
    softhsm.delete_token(label)


def test_failed_init_removes_token_key(service: ProvisioningServer, softhsm: SoftHsm,
                                       authority_token: tuple[str, str],
                                       tmp_path: Path, mounts: tuple[Path, Path]) -> None:
    """Failures after the token key was generated (operators file or service.toml on a
    disk that fills up, simulated by the hook stopping the process while the test fills
    the tmpfs) remove the key again; a SIGKILL leaves it, and the next init uses it."""
    full = mounts[0]
    for p in full.iterdir():
        p.unlink()
    d = full / "authority"
    args = init_args(d, softhsm, authority_token[0], "--registry",
                     f"sqlite:///{tmp_path / 'registry.db'}")
    env = {**service.env, "TESSERA_PKCS11_PIN": authority_token[1],
           "TESSERA_TEST_CRASH_AT": "init:authority-created:stop"}
    proc = subprocess.Popen([TESSERA,
                             *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    from tests.support import wait_for

    def stopped() -> bool:
        with open(f"/proc/{proc.pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "T"

    wait_for(stopped, timeout=60, what="init stopped after creating the authority")
    assert token_keys(softhsm, authority_token, "tessera-authority") != []
    fill(full)
    os.kill(proc.pid, signal.SIGCONT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1, stderr
    assert len(stderr.strip().splitlines()) == 1 and "nothing was created" in stderr, stderr
    assert token_keys(softhsm, authority_token, "tessera-authority") == []
    assert sorted(p.name for p in full.iterdir() if not p.name.startswith("filler")) == []
    assert not (tmp_path / "registry.db").exists()


@pytest.mark.parametrize("point", ["init:authority-created", "init:staged"])
@pytest.mark.parametrize("action", ["kill", "int"])
def test_init_interrupted_then_run_again(service: ProvisioningServer, softhsm: SoftHsm,
                                         authority_token: tuple[str, str], tmp_path: Path,
                                         point: str, action: str) -> None:
    d = tmp_path / "authority"
    args = init_args(d, softhsm, authority_token[0])
    first = run(service, *args, crash=f"{point}:{action}", pin=authority_token[1])
    assert first.returncode == (-signal.SIGKILL if action == "kill" else 130), first.stderr
    assert not d.exists()
    serve = run(service, "serve", "--dir", str(d))
    assert serve.returncode == 1 and "run 'tessera init" in serve.stderr
    if action == "int":  # undone, the key included
        assert token_keys(softhsm, authority_token, "tessera-authority") == []
        assert leftovers(tmp_path) == []
    again = run(service, *args, pin=authority_token[1])
    assert again.returncode == 0, again.stderr
    assert leftovers(tmp_path) == []  # a killed init's staging directory was cleared
    [key] = token_keys(softhsm, authority_token, "tessera-authority")
    root = x509.load_pem_x509_certificate((d / "root.pem").read_bytes())
    assert spki(root.public_key()) == key
    assert sorted(p.name for p in d.iterdir()) == [
        "authority.toml", "operators.json", "registry.db", "root.pem", "service.toml"]
