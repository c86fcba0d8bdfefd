"""Two faults a fleet meets (issue 17, point 3), against the real processes:
PostgreSQL restarted under concurrent enrollments and renewals (the provisioning
service on a PostgreSQL registry, `tessera enroll` / `tessera renew` run as the CLI
with keys on SoftHSM2 tokens), and the wall clock stepped an hour forward and back on
a broker and on a device (libfaketime in a real Mosquitto with the plugin and in a
real tessera-agent process)."""

from __future__ import annotations

import collections
import datetime as dt
import json
import os
import secrets
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from provisioning.registry import DeviceRecord, Registry, open_registry
from simulator.fixtures import private_postgres
from simulator.fleet import Fleet, Member
from simulator.mosquitto import Mosquitto
from simulator.postgres import PostgresServer
from simulator.provisioner import ProvisioningServer
from simulator.softhsm import SoftHsm
from structauth.errors import Reason, RegistryError
from tests.support import replay_msg1, wait_for

TESSERA = str(Path(sys.executable).parent / "tessera")


# -- A. PostgreSQL restarted during enrollments and renewals ----------------------------


@pytest.fixture
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL of this test's own: restarting the session's would cut the others."""
    with private_postgres() as server:
        yield server


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
@pytest.mark.parametrize("outage", ["brief", "past_the_retries"])
def test_postgresql_restarted_during_enrollments_and_renewals(
        postgres: PostgresServer, softhsm: SoftHsm, tmp_path: Path, outage: str) -> None:
    """Eight enrollments and eight renewals (four devices, twice each, one after the
    other) run as the CLI, four calls at a time, against the service on PostgreSQL;
    after four are done, PostgreSQL is stopped (fast: connections cut, open
    transactions rolled back) and started again on the same data directory and port:
    ``brief``, as soon as the service has met the lost connection (its retries carry
    the calls through); ``past_the_retries``, once a call has failed (the registry's
    retries, about 6 s, are spent).
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
        # enrollments and renewals in flight together; one device's two renewals one
        # after the other (run at once, the last to record and the last to write
        # its --out directory could differ: a race of the caller's, not a fault's)
        order = [[o] for o in ops[:8]]
        for i in range(4):
            order.insert(2 * i + 1, ops[8 + 2 * i: 10 + 2 * i])
        finished = threading.Semaphore(0)
        restart: dict[str, float] = {}

        def work(item: list[Op]) -> None:
            for o in item:
                try:
                    _run(service, o, pin)
                finally:
                    finished.release()

        def restart_after_four() -> None:
            for _ in range(4):
                finished.acquire()
            mark = service.log.stat().st_size
            restart["stop"] = time.monotonic()

            def lost_logged() -> bool:
                with service.log.open("rb") as f:
                    f.seek(mark)
                    return b"registry connection lost" in f.read()

            def a_call_failed() -> bool:
                return any(d.returncode != 0 for o in ops for d in list(o.runs))

            def while_down() -> None:
                # until a request meets the lost connection or, past the retries,
                # until a call has failed
                if outage == "brief":
                    wait_for(lost_logged, 20, "a request meeting the lost connection")
                else:
                    wait_for(a_call_failed, 20, "a call failing past the retries")

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
        if outage == "past_the_retries":
            assert first_failures, "no call outlasted the registry's retries"
            assert all(why.startswith("registry_failure: ") and "try again" in why
                       for why in first_failures.values()), first_failures

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
        assert format(cert.serial_number, "x") == record.operational_cert_serial, (
            serial, [(o.verb, d.returncode, d.stderr.strip()[-300:])
                     for o in ops if o.serial == serial for d in o.runs])
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
    print(f"\npostgres restart ({outage}): down {restart['up'] - restart['stop']:.2f} s; "
          f"{len(ops)} calls ({sum(o.verb == 'enroll' for o in ops)} enroll, "
          f"{sum(o.verb == 'renew' for o in ops)} renew), "
          f"{len(ops) - len(first_failures)} succeeded at once, {len(first_failures)} "
          f"failed and finished when run again {sorted(first_failures.items())}; "
          f"service noted {lost} lost connection(s); first call done "
          f"{back[0] - restart['up']:.2f} s after the restart")
    for label in tokens:
        softhsm.delete_token(label)


# -- B. The wall clock stepped an hour forward and back on a broker and on a device -----

#: the device process of test B: a real Agent (device/agent.py) publishing numbered
#: QoS 1 messages ("<n> <its wall clock>") every INTERVAL s. First stdin line: stop
#: publishing and print {"last": n}; stdin closed: print the agent's totals and exit.
_DRIVER = """
import dataclasses, datetime as dt, json, sys, threading
from pathlib import Path
from device.agent import Agent, AgentConfig
from hw.software import InsecureSoftwareSigner

config = AgentConfig.load(Path(sys.argv[1]))
agent = Agent(config, signer=InsecureSoftwareSigner.load(sys.argv[2])).start()
topic, interval = sys.argv[3], float(sys.argv[4])
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
n = 0
while not stop.wait(interval):
    n += 1
    agent.publish(topic, f"{n} {dt.datetime.now(dt.UTC).isoformat()}".encode(), qos=1)
print(json.dumps({"last": n}), flush=True)
sys.stdin.read()
totals = dataclasses.asdict(agent.totals())
agent.stop()
print(json.dumps(totals), flush=True)
"""

#: seconds between the device's messages, the broker's session lifetime and the agent's
#: re-handshake margin: a re-handshake every ~3 s, so each clock step meets one
INTERVAL, LIFETIME_S, MARGIN_S = 0.1, 12, 9


def _libfaketime() -> str:
    import glob

    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    if not found:
        pytest.fail("libfaketime is not installed: run ./run setup (Debian package "
                    "faketime)", pytrace=False)
    return found[0]


class FakeClock:
    """The wall clock of the processes started with ``env``: libfaketime preloaded,
    reading its offset from a file at every call (FAKETIME_NO_CACHE) and leaving
    CLOCK_MONOTONIC alone (FAKETIME_DONT_FAKE_MONOTONIC), so only the wall clock
    steps."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.set(0)
        self.env = {"LD_PRELOAD": _libfaketime(), "FAKETIME_TIMESTAMP_FILE": str(path),
                    "FAKETIME_NO_CACHE": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}

    def set(self, offset_s: int) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(f"{offset_s:+d}\n")
        tmp.replace(self.path)  # atomic: a reader sees the old offset or the new one
        self.offset = offset_s


def _wall(iso: str) -> float:
    return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()



def _faked_broker(tmp_path: Path, authority: Fleet, **options: str
                  ) -> tuple[Mosquitto, FakeClock, Member]:
    """A Mosquitto with the plugin (audit log in tmp_path) whose wall clock is a
    FakeClock, and the broker's member of ``authority``."""
    from cryptography.hazmat.primitives.serialization import Encoding

    from hw.software import InsecureSoftwareSigner
    from simulator.mosquitto import Mosquitto, plugin_files

    key = InsecureSoftwareSigner.generate()
    me = authority.member("broker", "mqtt-1", signer=key)
    files = plugin_files(
        tmp_path / "plugin", trust_domain=authority.trust_domain,
        bundle_pem=authority.root.public_bytes(Encoding.PEM),
        credential_pem=me.credential.chain[0].public_bytes(Encoding.PEM),
        key=f"insecure-software:{key.save(tmp_path / 'bk.pem')}",
        audit_log=str(tmp_path / "audit.jsonl"), **options)
    broker = Mosquitto(tmp_path / "mosquitto", plugin_options=files,
                       log_type="error warning notice")
    clock = FakeClock(tmp_path / "broker.faketime")
    wrapper = tmp_path / "mosquitto-faketime"
    wrapper.write_text("#!/bin/sh\n" + "".join(f"export {k}={v}\n" for k, v in clock.env.items())
                       + f'exec {broker.binary} "$@"\n')
    wrapper.chmod(0o755)
    broker.binary = str(wrapper)
    return broker, clock, me


@pytest.mark.broker
def test_wall_clock_stepped_an_hour_on_the_broker_and_on_the_device(tmp_path: Path) -> None:
    """A Mosquitto with the plugin and a device agent, each its own process with
    libfaketime, the device publishing numbered QoS 1 messages to a subscriber. The
    broker's wall clock steps +1 h and back, then the device's does; each step is seen
    to take effect (the broker's audit times, the device's payload times) and is
    followed by a re-handshake under it. Design (docs/PROTOCOL.md §1, §5.5): epochs
    and session timing run on each side's monotonic clock and credentials are checked
    with 5 min of skew against validity of days, so a wall step changes nothing:
    every message arrives once, nothing is refused but the replays, nobody is
    quarantined or resynchronised, and a msg1 captured before a step is refused after
    it (the nonce cache runs on the monotonic clock)."""
    from cryptography.hazmat.primitives.serialization import Encoding

    from bench.mqtt_wire import Conn, _initiator, connect_packet
    from device.agent import Agent, AgentConfig
    from simulator.provisioner import free_port

    authority = Fleet(t0=dt.datetime.now(dt.UTC) - dt.timedelta(days=1))
    metrics_port = free_port()
    broker, broker_clock, me = _faked_broker(
        tmp_path, authority, metrics_port=str(metrics_port),
        nonce_file=str(tmp_path / "nonces"), session_lifetime_s=str(LIFETIME_S))
    device_clock = FakeClock(tmp_path / "device.faketime")

    device = authority.member("device", "pi-clock")
    device_key = device.signer.save(tmp_path / "device.pem")  # type: ignore[attr-defined]

    def agent_state(member: Member, port: int) -> Path:
        """The state directory enrollment would leave, and an agent.toml re-handshaking
        MARGIN_S before each session's end: its path."""
        state = tmp_path / f"state-{member.identity.name}"
        state.mkdir()
        (state / "operational.pem").write_bytes(
            member.credential.chain[0].public_bytes(Encoding.PEM))
        (state / "bundle.pem").write_bytes(authority.root.public_bytes(Encoding.PEM))
        (state / "agent.json").write_text(json.dumps(  # the key is handed to the Agent
            {"backend": "pkcs11", "pkcs11": "unused", "serial": member.identity.name}))
        (state / "agent.toml").write_text(
            f'[device]\nstate_dir = "{state}"\n'
            f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\n'
            f'broker_identity = "{me.identity.uri}"\n'
            f"[session]\nrehandshake_margin_s = {MARGIN_S}\n"
            "[renewal]\nenabled = false\n[reconnect]\ninitial_s = 0.2\nmax_s = 1.0\n")
        return state / "agent.toml"

    def audit() -> list[dict[str, object]]:
        path = tmp_path / "audit.jsonl"
        text = path.read_text() if path.exists() else ""
        return [json.loads(line) for line in text.splitlines() if line]

    def device_handshakes() -> list[float]:
        """Broker wall times (its audit) of the device's handshakes, in order."""
        return [_wall(str(r["time"])) for r in audit()
                if r["event"] == "handshake_ok" and r.get("identity") == device.identity.uri]

    got: list[tuple[int, float]] = []  # (number, device wall time) as received

    def received(topic: str, payload: bytes) -> None:
        number, when = payload.decode().split(" ", 1)
        got.append((int(number), _wall(when)))

    with broker:
        # the backend: an agent too, so that it re-handshakes like the device
        backend = authority.member("broker", "backend")
        subscriber = Agent(AgentConfig.load(agent_state(backend, broker.port)),
                           signer=backend.signer)
        subscriber.subscribe("devices/pi-clock/telemetry/#", received, qos=1, proven=False)
        subscriber.start()
        device_toml = agent_state(device, broker.port)
        driver = tmp_path / "driver.py"
        driver.write_text(_DRIVER)
        agent = subprocess.Popen(
            [sys.executable, str(driver), str(device_toml), str(device_key),
             "devices/pi-clock/telemetry/n", str(INTERVAL)],
            env={**os.environ, **device_clock.env,
                 "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(  # noqa: SIM115
                tmp_path / "agent.log", "wb"), text=True)
        captured: list[bytes] = []

        def probe() -> None:
            """A fresh handshake of another device, its msg1 kept as an attacker would."""
            probe_member = authority.member("device", f"probe-{len(captured)}")
            initiator = _initiator(probe_member, authority.trust, me.identity)
            msg1 = initiator.start()
            conn = Conn(broker.port)
            rc, session = conn.sa1_handshake(
                connect_packet(probe_member.identity.uri, msg1), initiator)
            conn.sock.close()
            assert session is not None, f"probe refused: 0x{rc:02x}"
            captured.append(msg1)

        replayed = [0]

        def replays_refused() -> None:
            for i, msg1 in enumerate(captured):
                replayed[0] += 1
                assert replay_msg1(broker.port, f"spiffe://{authority.trust_domain}/device/"
                               f"probe-{i}", msg1) == 0x287, f"msg1 {i} replayed"

        phases: list[str] = []

        def step(clock: FakeClock, offset: int, name: str) -> None:
            """Step ``clock``, wait until it shows (the broker's audit times or the
            device's payload times), then for a device re-handshake under it and ten
            more messages."""
            t0 = time.monotonic()
            before = len(device_handshakes())
            clock.set(offset)
            if clock is broker_clock:
                wait_for(lambda: any(abs(t - time.time() - offset) < 600
                                     for t in device_handshakes()[before:]), 20,
                         f"{name}: a device handshake at the broker's new time")
            else:
                seen = len(got)
                wait_for(lambda: any(abs(w - time.time() - offset) < 600
                                     for _, w in got[seen:]), 20,
                         f"{name}: a message stamped with the device's new time")
                shakes = len(device_handshakes())
                wait_for(lambda: len(device_handshakes()) > shakes, 20,
                         f"{name}: a device re-handshake after its clock stepped")
            count = len(got)
            wait_for(lambda: len(got) >= count + 10, 20, f"{name}: ten more messages")
            phases.append(f"{name}: {time.monotonic() - t0:.1f} s, "
                          f"{len(device_handshakes()) - before} device handshakes")

        try:
            wait_for(lambda: len(got) >= 5, 20, "the device's first messages")
            probe()
            step(broker_clock, 3600, "broker +1 h")
            replays_refused()  # a msg1 from before the step: its nonce is still held
            probe()  # a new device logs in at the broker's stepped time
            step(broker_clock, 0, "broker back 1 h")
            replays_refused()
            probe()
            step(device_clock, 3600, "device +1 h")
            step(device_clock, 0, "device back 1 h")
            replays_refused()
            assert agent.stdin is not None and agent.stdout is not None
            agent.stdin.write("stop\n")
            agent.stdin.flush()
            last = json.loads(agent.stdout.readline())["last"]
            wait_for(lambda: len({n for n, _ in got}) >= last, 20, "every message")
            agent.stdin.close()
            totals = json.loads(agent.stdout.readline())
            assert agent.wait(20) == 0
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
            subscriber.stop()
        rejections = {}
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                    timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("tessera_rejections_total{"):
                    name, _, value = line.rpartition(" ")
                    if float(value):
                        rejections[name.split('"')[1]] = int(float(value))

    numbers = [n for n, _ in got]
    assert sorted(numbers) == list(range(1, last + 1)), "lost or duplicated"
    events = collections.Counter(str(r["event"]) for r in audit())
    refused = [r for r in audit() if r["event"] in ("handshake_refused",
                                                     "refusals_aggregated")]
    assert not [e for e in events if "quarantin" in e], events
    assert rejections == {"handshake_replayed": replayed[0]}, rejections
    assert all(r.get("reason") == "handshake_replayed" for r in refused), refused
    assert totals["resyncs"] == 0 and totals["refused_dropped"] == 0, totals
    assert totals["reconnects"] == 0 and totals["errors"] == [], totals
    print(f"\nwall clock steps: {'; '.join(phases)}; device sent {last} QoS 1 messages, "
          f"subscriber got {len(numbers)} ({len(set(numbers))} distinct); broker "
          f"refusals {rejections} (the replays); agent: {totals['rehandshakes']} "
          f"re-handshakes, {totals['resyncs']} resyncs, {totals['resent']} resent, "
          f"{totals['requeued']} requeued, {totals['reconnects']} reconnects; audit "
          f"{dict(events)}")


@pytest.mark.broker
def test_a_broker_an_hour_behind_refuses_credentials_issued_since(tmp_path: Path) -> None:
    """The other direction, not a step back to the right time but a broker whose clock
    is an hour behind: it trusts its clock (docs/PROTOCOL.md §6, 5 min of skew), so a
    credential issued five minutes ago (the provisioning service's notBefore) is not
    yet valid for it. Refused at msg1 (credential_not_yet_valid), the device is not
    quarantined for it, and the same credential logs in once the clock is right."""
    from bench.mqtt_wire import Conn, _initiator, connect_packet

    authority = Fleet(t0=dt.datetime.now(dt.UTC) - dt.timedelta(days=1))
    broker, clock, me = _faked_broker(tmp_path, authority)
    fresh = authority.member("device", "fresh", not_before=dt.datetime.now(dt.UTC)
                             - dt.timedelta(minutes=5))

    def handshake() -> int:
        initiator = _initiator(fresh, authority.trust, me.identity)
        conn = Conn(broker.port)
        try:
            rc, session = conn.sa1_handshake(
                connect_packet(fresh.identity.uri, initiator.start()), initiator)
        finally:
            conn.sock.close()
        return 0 if session is not None else rc

    def audit() -> list[dict[str, object]]:
        path = tmp_path / "audit.jsonl"
        text = path.read_text() if path.exists() else ""
        return [json.loads(line) for line in text.splitlines() if line]

    with broker:
        clock.set(-3600)
        assert [handshake() for _ in range(5)] == [0x87] * 5
        wait_for(lambda: any(r["event"] == "handshake_refused" for r in audit()), 5,
                 "the refusal in the audit log")
        [refused] = [r for r in audit() if r["event"] == "handshake_refused"]
        assert refused["reason"] == "credential_not_yet_valid", refused
        clock.set(0)
        assert handshake() == 0
        wait_for(lambda: any(r["event"] == "handshake_ok" for r in audit()), 5,
                 "the login in the audit log")
    events = {str(r["event"]) for r in audit()}
    assert not [e for e in events if "quarantin" in e], events
