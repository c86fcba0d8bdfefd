"""Faults a fleet meets (issue 17, point 3), each against the real processes of a
simulator.fleet.BrokerFleet (PostgreSQL, the provisioning service, three Mosquitto
replicas behind HAProxy). A broker killed and restarted is in tests/test_fleet.py
(the agent moves, its buffered QoS 1 messages arrive, the broker rejoins)."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import queue
import shutil
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from bench.mqtt_wire import Conn, sa1_connect
from device.agent import Agent
from device.mqtt import TesseraMqttClient
from hw.software import InsecureSoftwareSigner
from hw.tpm import TpmBackend
from simulator.fleet import BrokerFleet, Enrolled, Fleet, Member
from simulator.mosquitto import Mosquitto, plugin_files
from simulator.provisioner import free_port
from simulator.swtpm import Swtpm
from tests.support import wait_for

pytestmark = pytest.mark.broker

#: sessions each device of the storm opens one after another (the last is kept)
ROUNDS = 3


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerFleet]:
    with BrokerFleet(tmp_path_factory.mktemp("fleet"), 3) as f:
        yield f


def _closed(conn: Conn, timeout: float) -> bool:
    """The broker closed this connection (EOF) within ``timeout``."""
    conn.sock.settimeout(timeout)
    try:
        while conn.sock.recv(65536):
            pass
        return True
    except TimeoutError:
        return False
    except OSError:
        return True


def _violations(fleet: BrokerFleet, revoked: set[str]) -> list[str]:
    """Sessions granted to a revoked identity at a broker after that broker applied
    its revocation: read in each audit log's order (one writer per broker)."""
    bad = []
    for i in range(fleet.count):
        applied: set[str] = set()
        for row in fleet.audit(i):
            if row["event"] == "revocation_applied":
                applied.add(row.get("identity") or "")
            elif row["event"] == "handshake_ok" and row["identity"] in applied:
                bad.append(f"broker {i}: {row['identity']} session {row['session']}")
    return [b for b in bad if any(b.split(": ")[1].startswith(r) for r in revoked)]


@pytest.mark.parametrize("devices", [pytest.param(200, marks=pytest.mark.slow), 60])
def test_revocation_during_a_connect_storm(fleet: BrokerFleet, devices: int) -> None:
    """``devices`` connect through the front (16 at a time), each ROUNDS times one
    after another like reconnecting agents; when a quarter of the handshakes are done,
    ten devices are revoked (the first five and the last five to start).
    No revoked device keeps a session or is granted one after its broker applied the
    revocation; every other device gets its session (no false rejects); the revoked
    ones are then refused at every broker."""
    tag = f"st{devices}"
    with ThreadPoolExecutor(4) as pool:
        enrolled: list[Enrolled] = list(pool.map(
            lambda i: fleet.enroll(f"{tag}-{i:03d}"), range(devices)))
    assert fleet.trust is not None and fleet.identity is not None
    trust, broker = fleet.trust, fleet.identity
    doomed = {e.serial for e in enrolled[:5] + enrolled[-5:]}
    done = threading.Semaphore(0)
    conns: dict[str, Conn] = {}
    refused: dict[str, str] = {}
    revoked_at: list[float] = []

    def connect(e: Enrolled) -> None:
        """Like an agent that keeps reconnecting: ROUNDS sessions one after another,
        the last kept open; a refusal ends it."""
        for r in range(ROUNDS):
            try:
                conn, _ = sa1_connect(fleet.front_port, Member(e.signer, e.credential),
                                      trust, broker)
            except (ConnectionError, OSError) as exc:
                refused[e.serial] = f"round {r}: {exc}"
                done.release()
                return
            finally:
                done.release()
            if r < ROUNDS - 1:
                conn.close()
            else:
                conns[e.serial] = conn

    def revoke_when_a_quarter_is_in() -> None:
        for _ in range(devices * ROUNDS // 4):
            done.acquire()
        for serial in sorted(doomed):
            fleet.revoke(serial, "storm")
        revoked_at.append(time.monotonic())

    revoker = threading.Thread(target=revoke_when_a_quarter_is_in)
    revoker.start()
    t0 = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(connect, enrolled))
    storm_s = time.monotonic() - t0
    revoker.join(30)

    false_rejects = {s: why for s, why in refused.items() if s not in doomed}
    assert not false_rejects, false_rejects
    still_open = [s for s in doomed if s in conns and not _closed(conns[s], 10)]
    assert not still_open, f"revoked devices still connected: {still_open}"
    uris = {e.identity.uri for e in enrolled if e.serial in doomed}
    wait_for(lambda: all(
        {r.get("identity") for r in fleet.audit(i, "revocation_applied")} >= uris
        for i in range(3)), 10, "every broker to audit the ten revocations")
    assert _violations(fleet, uris) == []
    for e in enrolled:
        if e.serial in doomed:
            for port in fleet.broker_ports:
                with pytest.raises(ConnectionError, match="refused"):
                    sa1_connect(port, Member(e.signer, e.credential), trust, broker)
    for s, conn in conns.items():
        if s not in doomed:
            conn.close()
    print(f"\nstorm: {devices} devices x {ROUNDS} sessions in {storm_s:.1f} s through "
          f"the front, revocations done {revoked_at[0] - t0:.1f} s in; of the ten "
          f"revoked, {sum(s in conns for s in doomed)} ended connected (all cut), "
          f"{sum(s in refused for s in doomed)} were refused "
          f"({sorted(refused.values())[:3]}...)")


def test_a_full_audit_disk_keeps_the_broker_enforcing_and_raises_the_alarm(
        tmp_path: Path) -> None:
    """A real full disk: the broker runs in a private mount namespace (``unshare -rm``)
    with its audit log on a 256 kB tmpfs, filled through /proc/<pid>/root. Decision
    (docs/MQTT.md): the broker keeps enforcing, a device still logs in and publishes,
    an unauthorised publish is still refused, and ``tessera_audit_failing`` is 1 with
    the lost records counted; when there is room again the alarm clears and the log
    holds an audit_overflow record saying how many records are missing."""
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is needed to mount a small tmpfs", pytrace=False)
    authority = Fleet(t0=dt.datetime.now(dt.UTC) - dt.timedelta(days=1))
    key = InsecureSoftwareSigner.generate()
    me = authority.member("broker", "mqtt-1", signer=key)
    audit_dir = tmp_path / "audit"
    audit_dir.mkdir()
    port = free_port()
    options = plugin_files(
        tmp_path, trust_domain=authority.trust_domain,
        bundle_pem=authority.root.public_bytes(Encoding.PEM),
        credential_pem=me.credential.chain[0].public_bytes(Encoding.PEM),
        key=f"insecure-software:{key.save(tmp_path / 'bk.pem')}",
        audit_log=str(audit_dir / "audit.jsonl"), metrics_port=str(port))
    broker = Mosquitto(tmp_path / "mosquitto", plugin_options=options)
    wrapper = tmp_path / "mosquitto-in-ns"
    wrapper.write_text(
        "#!/bin/sh\nexec unshare -rm sh -c 'mount -t tmpfs -o size=256k tmpfs \"$0\" && "
        f"exec {broker.binary} \"$@\"' {audit_dir} \"$@\"\n")
    wrapper.chmod(0o755)
    broker.binary = str(wrapper)

    def metric(series: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                name, _, value = line.rpartition(" ")
                if name == series:
                    return float(value)
        return 0.0

    def device(name: str) -> TesseraMqttClient:
        m = authority.member("device", name)
        return TesseraMqttClient(signer=m.signer, credential=m.credential,
                                 trust=authority.trust, host="127.0.0.1", port=broker.port,
                                 broker=me.identity)

    with broker:
        inside = Path(f"/proc/{broker.pid}/root") / str(audit_dir).lstrip("/")
        log = inside / "audit.jsonl"
        wait_for(lambda: log.exists(), 5, "the audit log on the tmpfs")
        assert not (audit_dir / "audit.jsonl").exists()  # the tmpfs is the broker's own
        first = device("pi-1")
        first.connect()
        filler = inside / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            with contextlib.suppress(OSError):  # until ENOSPC
                while True:
                    os.write(fd, b"\0" * 4096)
        finally:
            os.close(fd)
        assert metric("tessera_audit_failing") == 0
        second = device("pi-2")
        second.connect()  # a login while nothing can be audited
        codes: list[int] = []
        second.client.on_publish = lambda c, u, mid, rc, p: codes.append(rc.value)
        second.publish("devices/pi-2/telemetry/t", b"ok", qos=1).wait_for_publish(5)
        second.publish("devices/pi-1/telemetry/t", b"not mine", qos=1).wait_for_publish(5)
        wait_for(lambda: len(codes) == 2, 5, "both PUBACKs")
        assert codes[0] in (0x00, 0x10) and codes[1] == 0x87  # still enforcing
        more = iter(range(100))

        def alarm() -> bool:
            # the log's last tmpfs page may still hold a few records: log in more devices
            extra = device(f"pi-x{next(more)}")
            extra.connect()
            extra.close()
            return metric("tessera_audit_failing") == 1

        wait_for(alarm, 20, "the audit alarm")
        assert metric("tessera_audit_records_lost_total") >= 1
        filler.unlink()
        third = device("pi-3")
        third.connect()  # a record to write: the alarm clears once it is
        wait_for(lambda: metric("tessera_audit_failing") == 0, 10, "the alarm to clear")
        rows = []
        for line in log.read_text().splitlines():
            with contextlib.suppress(ValueError):  # a line the full disk cut short
                rows.append(json.loads(line))
        [overflow] = [r for r in rows if r["event"] == "audit_overflow"]
        assert overflow["failed"] >= 1
        assert any(r["event"] == "handshake_ok" and r["identity"].endswith("/pi-3")
                   for r in rows)
        for c in (first, second, third):
            c.close()


def test_swtpm_killed_and_restarted_the_agent_comes_back_on_the_first_retry(
        swtpm: Swtpm, tmp_path: Path) -> None:
    """An agent whose key is in swtpm, connected through the front. swtpm is
    SIGKILLed and the agent's broker restarted, so the agent must sign a new handshake:
    its attempts fail (the TPM is unreachable) and what it publishes is buffered. Once
    swtpm is back on its port, the first retry connects (no failure noted after it
    came back) and the buffered QoS 1 messages reach the backend."""
    with BrokerFleet(tmp_path / "fleet", 2, maker_roots=swtpm.manufacturer_ca_paths) as fleet:
        _swtpm_fault(fleet, swtpm, tmp_path)


def _swtpm_fault(fleet: BrokerFleet, swtpm: Swtpm, tmp_path: Path) -> None:
    subs, got = [], queue.Queue()  # type: ignore[var-annotated]
    backend = fleet.enroll("backend-tpm", kind="broker")
    for port in fleet.broker_ports:
        c = fleet.client(backend, port=port)
        c.connect()
        c.subscribe("devices/pi-tpm/telemetry/#", lambda t, p: got.put(p), qos=1,
                    proven=False)
        subs.append(c)
    key_dir = tmp_path / "keys"
    with TpmBackend(swtpm.tcti, key_dir) as tpm:
        device = fleet.enroll_tpm("pi-tpm", tpm)  # EK certificate, activation
    config = fleet.agent_config(device, tmp_path / "state", key={
        "backend": "tpm", "tcti": swtpm.tcti, "key_dir": str(key_dir)},
        reconnect="initial_s = 0.2\nmax_s = 0.5")
    agent = Agent(config).start()
    home = -1
    try:
        assert agent.wait_connected(20)
        home = fleet.home(device.identity)
        assert agent.publish("devices/pi-tpm/telemetry/t", b"before")
        assert got.get(timeout=10) == b"before"
        os.kill(swtpm.pid, signal.SIGKILL)  # type: ignore[arg-type]
        wait_for(lambda: not _alive(swtpm.pid), 5, "swtpm to die")
        swtpm.pid = None
        fleet.brokers[home].kill()
        fleet.brokers[home].start()
        wait_for(lambda: sum("connect" in e for e in agent.stats.errors) >= 2, 20,
                 "connection attempts failing on the dead TPM")
        assert not agent.connected.is_set()
        for i in range(5):
            agent.publish("devices/pi-tpm/telemetry/t", b"%d" % i)
        swtpm.start()  # same port, same state: the key is still there
        failures = len(agent.stats.errors)
        assert agent.wait_connected(20)
        after = agent.stats.errors[failures:]
        assert after == [], f"failed after swtpm came back: {after}"
        wait_for(lambda: got.qsize() >= 5, 10, "the five buffered messages")
        assert sorted(got.get_nowait() for _ in range(5)) == [b"%d" % i for i in range(5)]
        print(f"\nswtpm down: {failures} failed attempts noted "
              f"(last: {agent.stats.errors[-1][:100]}); first retry after restart connected")
    finally:
        agent.stop()
        for c in subs:
            c.close()


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"
    return True
