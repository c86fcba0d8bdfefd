"""Two faults a fleet meets (issue 17, point 3), against the real processes:
PostgreSQL restarted under concurrent enrollments and renewals (the provisioning
service on a PostgreSQL registry, `tessera enroll` / `tessera renew` run as the CLI
with keys on SoftHSM2 tokens), and the wall clock stepped an hour forward and back on
a broker and on a device (libfaketime in a real Mosquitto with the plugin and in a
real tessera-agent process)."""

from __future__ import annotations

import datetime as dt
import json
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from provisioning.registry import DeviceRecord, Registry, open_registry
from simulator.postgres import PostgresServer
from simulator.provisioner import ProvisioningServer
from simulator.softhsm import SoftHsm
from structauth.errors import ConfigurationError, Reason, RegistryError

TESSERA = str(Path(sys.executable).parent / "tessera")


# -- A. PostgreSQL restarted during enrollments and renewals ----------------------------


@pytest.fixture
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL of this test's own: restarting the session's would cut the others."""
    try:
        server = PostgresServer().start()
    except ConfigurationError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Op:
    verb: str  # "enroll" or "renew"
    serial: str
    spec: str  # the device key, <module>#<token>/<label>
    out: Path
    runs: list[subprocess.CompletedProcess[str]]
    started: list[float]
    ended: list[float]

    def args(self) -> list[str]:
        return ["--json", self.verb, "--serial", self.serial, "--pkcs11", self.spec,
                "--out", str(self.out)]


def _run(service: ProvisioningServer, op: Op, pin: str) -> subprocess.CompletedProcess[str]:
    op.started.append(time.monotonic())
    done = subprocess.run([TESSERA, *op.args()], env={**service.env, "TESSERA_PKCS11_PIN": pin},
                          capture_output=True, text=True, timeout=120)
    op.ended.append(time.monotonic())
    op.runs.append(done)
    return done


def _one_line_failure(done: subprocess.CompletedProcess[str]) -> str:
    """The error of a failed CLI call, asserted to be one line (JSON in --json mode)."""
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    error = json.loads(lines[0])
    assert set(error) == {"error", "reason", "exit"}, error
    return f"{error['reason']}: {error['error']}"


def _cut_once_at(point: str, registry: Registry, postgres: PostgresServer,
                 monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """At the registry's crash point ``point``, the first time only, the server ends
    the registry's connection (pg_terminate_backend: what a fast stop does to it)."""
    import psycopg

    import provisioning.registry as registry_module

    cut: list[str] = []

    def hook(name: str) -> None:
        if name == point and not cut:
            cut.append(name)
            pid = registry._conn.info.backend_pid
            with psycopg.connect(postgres.url(), autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))

    monkeypatch.setattr(registry_module, "fault_hook", hook)
    return cut


def _record(serial: str) -> DeviceRecord:
    now = dt.datetime.now(dt.UTC)
    return DeviceRecord(
        serial=serial, identity=f"spiffe://factory.test/device/{serial}", kind="device",
        public_key_der=b"key-" + serial.encode(), key_backend="pkcs11",
        attestation="factory-witnessed", ek_fingerprint=None, device_class="default",
        status="active", enrolled_at=now, updated_at=now, enrolled_by="operator",
        enrollment_cert_serial=f"e{serial}", operational_cert_serial=f"o{serial}",
        operational_not_after=now + dt.timedelta(days=1))


def test_a_transaction_cut_before_commit_runs_again_on_a_new_connection(
        postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The connection ends in the middle of an enrollment's transaction: the server
    rolled it back, so the registry runs it again on a new connection; the device is
    recorded once, with both credentials."""
    with open_registry(postgres_server.create_database()) as registry:
        cut = _cut_once_at("enroll:device-inserted", registry, postgres_server, monkeypatch)
        registry.enroll(_record("cut-1"))
        assert cut == ["enroll:device-inserted"]
        [record] = registry.list()
        assert (record.serial, record.status) == ("cut-1", "active")
        with registry._tx(write=False) as q:
            assert q.all("SELECT cert_serial FROM credentials ORDER BY cert_serial") == [
                ("ecut-1",), ("ocut-1",)]


def test_a_connection_lost_at_commit_is_not_run_again(
        postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lost with only COMMIT left to send: whether it committed cannot be known from
    here, so the registry does not run it again (a second run could enroll twice or
    refuse its own first run); the caller gets a registry_failure in one line, and the
    next call works on a new connection."""
    with open_registry(postgres_server.create_database()) as registry:
        cut = _cut_once_at("enroll:before-commit", registry, postgres_server, monkeypatch)
        with pytest.raises(RegistryError) as exc:
            registry.enroll(_record("cut-2"))
        assert cut == ["enroll:before-commit"]
        assert exc.value.reason is Reason.REGISTRY_FAILURE
        assert "\n" not in str(exc.value) and "failed" in str(exc.value)
        assert registry.list() == []  # here it had not committed: nothing recorded
        registry.enroll(_record("cut-2"))  # the caller's retry, on a new connection
        assert [r.serial for r in registry.list()] == ["cut-2"]


@pytest.mark.hardware
def test_postgresql_restarted_during_enrollments_and_renewals(
        postgres: PostgresServer, softhsm: SoftHsm, tmp_path: Path) -> None:
    """Eight enrollments and eight renewals (four devices, twice each) run as the CLI,
    four at a time, against the service on PostgreSQL; after four are done, PostgreSQL
    is stopped (fast: connections cut, open transactions rolled back) and started again
    on the same data directory and port once the service has met the lost connection.
    Every call either succeeds or fails in one line; a failed one run again finishes
    the job. Afterwards no device is half-written: each one in the registry has both
    credentials recorded, the operational one is the one in its --out directory, and
    every call that said it succeeded left that credential on disk."""
    url = postgres.create_database("tessera")
    pin = secrets.token_hex(8)
    service = ProvisioningServer(tmp_path / "authority", softhsm, registry_url=url)
    tokens = []
    (tmp_path / "devices").mkdir()
    with service:
        def op(verb: str, serial: str) -> Op:
            label = f"pgr-{secrets.token_hex(4)}"
            if verb == "enroll":
                softhsm.init_token(label, so_pin=secrets.token_hex(8), user_pin=pin)
                tokens.append(label)
            return Op(verb, serial, f"{softhsm.module}#{label}/device",
                      tmp_path / "devices" / serial, [], [], [])

        renewed = [op("enroll", f"pg-r{i}") for i in range(4)]
        with ThreadPoolExecutor(4) as pool:
            for done in pool.map(lambda o: _run(service, o, pin), renewed):
                assert done.returncode == 0, done.stderr
        ops = [op("enroll", f"pg-e{i}") for i in range(8)]
        for r in renewed:
            for _ in range(2):
                ops.append(Op("renew", r.serial, r.spec, r.out, [], [], []))
        # interleave: enrollments and renewals in flight together
        order = [x for pair in zip(ops[:8], ops[8:], strict=True) for x in pair]
        finished = threading.Semaphore(0)
        restart: dict[str, float] = {}

        def work(o: Op) -> None:
            try:
                _run(service, o, pin)
            finally:
                finished.release()

        def restart_after_four() -> None:
            for _ in range(4):
                finished.acquire()
            mark = service.log.stat().st_size
            restart["stop"] = time.monotonic()

            def while_down() -> None:
                # until a request meets the lost connection (at most 5 s)
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    with service.log.open("rb") as f:
                        f.seek(mark)
                        if b"registry connection lost" in f.read():
                            return
                    time.sleep(0.02)

            postgres.restart(while_down=while_down)
            restart["up"] = time.monotonic()

        restarter = threading.Thread(target=restart_after_four)
        restarter.start()
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(work, order))
        restarter.join(60)
        assert "up" in restart

        first_failures = {}
        for o in ops:
            if o.runs[0].returncode != 0:
                first_failures[f"{o.verb} {o.serial}"] = _one_line_failure(o.runs[0])
        # each failed call, run again, finishes the job
        for o in ops:
            if o.runs[-1].returncode != 0:
                again = _run(service, o, pin)
                assert again.returncode == 0, (o.serial, again.stderr)
        log = service.log.read_text(errors="replace")

    # no half-written device, and what each successful call said it did is on disk
    with open_registry(url) as registry:
        records = {r.serial: r for r in registry.list()}
        with registry._tx(write=False) as q:
            credentials = {(row[0], row[1]) for row in q.all(
                "SELECT device_serial, cert_serial FROM credentials")}
    assert set(records) == {f"pg-r{i}" for i in range(4)} | {f"pg-e{i}" for i in range(8)}
    for serial, record in records.items():
        assert record.status == "active"
        assert (serial, record.enrollment_cert_serial) in credentials
        assert (serial, record.operational_cert_serial) in credentials
        cert = x509.load_pem_x509_certificate(
            (tmp_path / "devices" / serial / "operational.pem").read_bytes())
        assert format(cert.serial_number, "x") == record.operational_cert_serial
        assert cert.public_key().public_bytes(
            Encoding.DER, PublicFormat.SubjectPublicKeyInfo) == record.public_key_der
    for o in ops:
        for done in o.runs:
            if done.returncode == 0 and o.verb == "renew":
                issued = json.loads(done.stdout)
                serial_hex = format(x509.load_pem_x509_certificate(
                    issued["operational_credential"].encode()).serial_number, "x")
                assert (o.serial, serial_hex) in credentials  # recorded, not only signed
    renewals = {r.serial: sum(d.returncode == 0 for o in ops if o.verb == "renew"
                              and o.serial == r.serial for d in o.runs) for r in renewed}
    assert all(n >= 2 for n in renewals.values()), renewals
    lost = log.count("registry connection lost")
    back = [min((e for o in ops for e in o.ended if e > restart["up"]), default=0.0)]
    print(f"\npostgres restart: down {restart['up'] - restart['stop']:.2f} s; "
          f"{len(ops)} calls ({sum(o.verb == 'enroll' for o in ops)} enroll, "
          f"{sum(o.verb == 'renew' for o in ops)} renew), "
          f"{len(ops) - len(first_failures)} succeeded at once, {len(first_failures)} "
          f"failed and finished when run again {sorted(first_failures.items())}; "
          f"service noted {lost} lost connection(s); first call done "
          f"{back[0] - restart['up']:.2f} s after the restart")
    for label in tokens:
        softhsm.delete_token(label)
