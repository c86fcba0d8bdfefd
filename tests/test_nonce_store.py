"""The msg1 nonce cache across responder restarts and replicas (broker_plugin/nonce_store).

Unit tests of the core hooks (NonceCache.remember / on_add), the file (records, damage,
size bound, a real full disk, the lock) and the shared PostgreSQL table; then a real
Mosquitto with the plugin: a genuine device's msg1 replayed after a restart and after a
crash, and at a second broker with the same identity sharing a database, is refused
with HANDSHAKE_REPLAYED before any signature work; bad options stop the broker with
one error line."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from broker_plugin import nonce_store as ns
from broker_plugin.nonce_store import (
    RECORD_SIZE,
    TABLE,
    FileStore,
    NonceFile,
    NonceSync,
    PostgresStore,
    decode_record,
    encode_record,
)
from device.mqtt import TesseraMqttClient
from hw.software import InsecureSoftwareSigner
from simulator.fleet import NOW, Fleet, Member
from simulator.mosquitto import Mosquitto, plugin_files
from simulator.postgres import PostgresServer
from simulator.provisioner import free_port
from structauth import handshake as hs
from structauth.credentials import Identity
from structauth.errors import ConfigurationError, Reason, ReplayDetected
from structauth.handshake import Initiator, NonceCache, Responder
from tests.attacks import mqtt5 as m5
from tests.support import capture_msg1, wait_for

N = 32  # nonce size


def nonce(i: int) -> bytes:
    return i.to_bytes(4, "big") * 8


# -- the core's hooks ------------------------------------------------------------------


def test_on_add_reports_every_recorded_nonce_with_its_expiry() -> None:
    added: list[tuple[bytes, float]] = []
    cache = NonceCache(ttl=600, on_add=lambda n, e: added.append((n, e)))
    cache.add(nonce(1), 10.0)
    cache.add(nonce(2), 11.0)
    assert added == [(nonce(1), 610.0), (nonce(2), 611.0)]
    assert cache.remember(nonce(3), 100.0, 12.0)  # from elsewhere: not reported
    assert added == [(nonce(1), 610.0), (nonce(2), 611.0)]


def test_remember_refuses_like_add_is_clamped_and_bounded() -> None:
    cache = NonceCache(ttl=600, max_entries=3)
    assert cache.remember(nonce(1), 50.0, 0.0)
    with pytest.raises(ReplayDetected) as exc:
        cache.check(nonce(1), 49.9)
    assert exc.value.reason is Reason.HANDSHAKE_REPLAYED
    cache.check(nonce(1), 50.0)  # its own expiry
    assert not cache.remember(nonce(2), 5.0, 5.0)  # already expired
    assert not cache.remember(nonce(2), float("nan"), 5.0)
    assert cache.remember(nonce(3), 1e12, 0.0)  # a far-future expiry: ttl at most
    cache.check(nonce(3), 600.0)
    # an earlier expiry behind a later one is honoured by check() itself
    cache = NonceCache(ttl=600, max_entries=3)
    cache.remember(nonce(1), 500.0, 0.0)
    cache.remember(nonce(2), 100.0, 0.0)
    with pytest.raises(ReplayDetected):
        cache.check(nonce(2), 99.0)
    cache.check(nonce(2), 100.0)
    assert not cache.remember(nonce(1), 400.0, 0.0)  # known for longer already
    assert cache.remember(nonce(1), 550.0, 0.0)
    for i in range(10, 20):  # the one bound holds for both kinds of entry
        cache.remember(nonce(i), 300.0, 0.0)
        cache.add(nonce(100 + i), 0.0)
    assert len(cache) == 3


class CountingSigner:
    """Counts the responder's signatures (the hardware key's work)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.backend = inner.backend
        self.calls = 0

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self.inner.public_key()  # type: ignore[no-any-return]

    def sign_digest(self, digest: bytes) -> bytes:
        self.calls += 1
        return self.inner.sign_digest(digest)  # type: ignore[no-any-return]


def test_a_restarted_responder_refuses_a_replay_before_any_signature_work(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In process: a responder records a msg1, 'reboots' (a new cache, a monotonic
    clock that restarted near zero, the same wall clock), loads the file and refuses
    the replay at step 3: no credential validation, no ECDSA verification, no
    signature."""
    fleet = Fleet()
    device, broker = fleet.member("device", "d1"), fleet.member("broker", "b1")
    msg1 = Initiator(signer=device.signer, credential=device.credential, trust=fleet.trust,
                     expected_peer=broker.credential.identity).start()
    path = tmp_path / "nonces"
    wall = [1_800_000_000.0]
    cache = NonceCache()
    store = FileStore(path, max_entries=cache.max_entries, mono=lambda: 5000.0,
                      wall=lambda: wall[0])
    sync = NonceSync(cache, file=store)
    store.start(cache)
    first = Responder(signer=CountingSigner(broker.signer), credential=broker.credential,
                      trust=fleet.trust, nonce_cache=cache)
    first.accept(msg1, 5000.0, NOW)
    sync.close()
    assert store.stats.written == 1

    wall[0] += 30.0  # the reboot took 30 s of wall-clock time
    cache = NonceCache()
    store = FileStore(path, max_entries=cache.max_entries, mono=lambda: 3.0,
                      wall=lambda: wall[0])
    assert store.start(cache) == 1
    signer = CountingSigner(broker.signer)
    second = Responder(signer=signer, credential=broker.credential, trust=fleet.trust,
                       nonce_cache=cache)
    touched: list[str] = []
    monkeypatch.setattr(hs, "_verify", lambda *a: touched.append("verify"))
    monkeypatch.setattr(second._trust, "validate", lambda *a, **k: touched.append("validate"))
    with pytest.raises(ReplayDetected) as exc:
        second.accept(msg1, 3.0, NOW)
    assert exc.value.reason is Reason.HANDSHAKE_REPLAYED
    assert touched == [] and signer.calls == 0
    # remembered until 600 s after the first accept: 570 s left on the new clock
    with pytest.raises(ReplayDetected):
        cache.check(hs.parse_msg1(msg1).nonce, 3.0 + 569.9)
    cache.check(hs.parse_msg1(msg1).nonce, 3.0 + 570.0)
    store.close()


# -- the file -----------------------------------------------------------------------------


def test_records_round_trip_and_every_damage_is_detected() -> None:
    rec = encode_record(nonce(7), 1_800_000_000.123)
    assert len(rec) == RECORD_SIZE and rec.endswith(b"\n")
    assert decode_record(rec[:-1]) == (nonce(7), 1_800_000_000.123)
    body = rec[:-1]
    for i in range(len(body)):  # any one flipped bit
        for bit in (0x01, 0x20):
            damaged = body[:i] + bytes([body[i] ^ bit]) + body[i + 1:]
            assert decode_record(damaged) is None, (i, bit)
    for bad in (b"", body[:-1], body + b"0", b"x" * (RECORD_SIZE - 1),
                body.replace(b" ", b"_"), body.upper()):
        assert decode_record(bad) is None
    with pytest.raises(ValueError):
        encode_record(b"short", 1.0)


def test_damaged_lines_are_skipped_and_counted_never_fatal(tmp_path: Path) -> None:
    path = tmp_path / "nonces"
    now = 1_800_000_000.0
    good = [encode_record(nonce(i), now + 100 + i) for i in range(5)]
    flipped = bytearray(good[1])
    flipped[10] ^= 0x04
    path.write_bytes(b"".join([
        good[0], bytes(flipped), b"\n", b"garbage line\n", b"\x00\xff" * 60 + b"\n",
        encode_record(nonce(50), now - 1),  # expired: dropped, not damaged
        good[2], good[3][:40] + good[4],  # a torn record, then a whole one after it
        good[4][:30],  # a torn last line
    ]))
    f = NonceFile(path, max_entries=100)
    live = f.load(now)
    assert dict(live) == {nonce(0): now + 100, nonce(2): now + 102}
    assert f.corrupt == 6  # flipped, blank, garbage, binary, torn+whole, torn tail
    # the store starts anyway, compacts away the damage, and appends cleanly
    cache = NonceCache()
    store = FileStore(path, max_entries=100, wall=lambda: now, mono=lambda: 0.0)
    assert store.start(cache) == 2 and store.stats.corrupt == 6
    store.offer(nonce(9), 50.0)
    store.close()
    f = NonceFile(path, max_entries=100)
    assert sorted(n for n, _ in f.load(now)) == [nonce(0), nonce(2), nonce(9)]
    assert f.corrupt == 0


def test_a_torn_write_costs_at_most_the_record_it_tore(tmp_path: Path) -> None:
    """A failed write may leave half a record; the next append starts on a new line."""
    path = tmp_path / "nonces"
    now = 1_800_000_000.0
    f = NonceFile(path, max_entries=100)
    f.load(now)
    f.compact(now)
    f.append([(nonce(1), now + 60)], now)
    assert f._fd is not None
    os.write(f._fd, encode_record(nonce(2), now + 60)[:50])  # what a failing write left
    f._torn = True
    f.append([(nonce(3), now + 60)], now)
    f.close()
    g = NonceFile(path, max_entries=100)
    assert sorted(n for n, _ in g.load(now)) == [nonce(1), nonce(3)] and g.corrupt == 1


def test_file_size_is_bounded_whatever_the_rate(tmp_path: Path) -> None:
    """Compaction keeps the file within 2 x max(max_entries, 1024) records plus one
    batch, whether nonces expire (live set small) or pile up to max_entries."""
    path = tmp_path / "nonces"
    for max_entries, ttl in ((2000, 1e9), (2000, 5.0), (100, 1e9)):
        path.unlink(missing_ok=True)
        f = NonceFile(path, max_entries=max_entries, fsync=False)
        now = 1_800_000_000.0
        f.load(now)
        f.compact(now)
        batch = 64
        biggest = 0
        for b in range(300):
            now += 0.1
            f.append([(nonce(b * batch + i), now + ttl) for i in range(batch)], now)
            biggest = max(biggest, path.stat().st_size)
        assert biggest <= f.size_bound() + batch * RECORD_SIZE, (max_entries, ttl)
        assert len(f.live) <= max_entries
        f.close()
        # and what is left loads back: the newest max_entries live nonces
        g = NonceFile(path, max_entries=max_entries)
        live = g.load(now)
        assert g.corrupt == 0
        newest = {nonce(300 * batch - 1 - i) for i in range(min(len(live), 10))}
        assert newest <= {n for n, _ in live}
    assert ns.COMPACT_MIN * RECORD_SIZE * 2 == 180_224


def test_a_second_broker_cannot_share_the_file(tmp_path: Path) -> None:
    one = FileStore(tmp_path / "nonces", max_entries=10)
    one.start(NonceCache())
    two = FileStore(tmp_path / "nonces", max_entries=10)
    with pytest.raises(ConfigurationError) as exc:
        two.start(NonceCache())
    assert "in use by another process" in str(exc.value)
    one.close()
    two.start(NonceCache())  # free once the first let go
    two.close()


_DISK_FULL_CHILD = textwrap.dedent("""
    import json, os, sys, time
    sys.path.insert(0, sys.argv[2])
    from pathlib import Path
    from broker_plugin.nonce_store import FileStore, NonceFile, RECORD_SIZE
    from structauth.handshake import NonceCache
    from tests.support import wait_for

    d = Path(sys.argv[1])
    ballast = d / "ballast"
    ballast.write_bytes(b"b" * 24576)  # 8 kB left of 32 kB
    path = d / "nonces"
    cache = NonceCache()
    store = FileStore(path, max_entries=1000)
    store.start(cache)
    nonces = [i.to_bytes(4, "big") * 8 for i in range(200)]  # 17.6 kB: does not fit yet
    for n in nonces:
        cache.add(n, time.monotonic())
        store.offer(n, time.monotonic() + 600)
    wait_for(lambda: store.stats.errors > 0, 20, "a write refused by the full disk")
    errors_while_full = store.stats.errors
    in_memory = sum(1 for n in nonces if n in cache._seen)
    ballast.unlink()  # room again: the writer catches up with what it holds
    wait_for(lambda: store.stats.written >= 200, 20, "the writer catching up")
    written = store.stats.written
    store.close()
    f = NonceFile(path, max_entries=1000)
    loaded = {n for n, _ in f.load(time.time())}
    # a broker starting on a full disk starts, and appends once there is room
    free = os.statvfs(d)
    (d / "ballast2").write_bytes(b"b" * (free.f_bavail * free.f_frsize))
    store = FileStore(path, max_entries=1000)
    store.start(NonceCache())
    start_errors = store.stats.errors
    more = [b"\\x77" * 28 + i.to_bytes(4, "big") for i in range(100)]  # 8.8 kB
    for n in more:
        store.offer(n, time.monotonic() + 600)
    wait_for(lambda: store.stats.errors > start_errors, 20, "a refused write at start")
    errors_at_start_full = store.stats.errors - start_errors
    (d / "ballast2").unlink()
    wait_for(lambda: store.stats.written >= 100, 20, "the writer catching up again")
    store.close()
    g = NonceFile(path, max_entries=1000)
    reloaded = {n for n, _ in g.load(time.time())}
    print(json.dumps({"errors_while_full": errors_while_full, "in_memory": in_memory,
                      "written": written, "loaded": len(loaded & set(nonces)),
                      "corrupt": f.corrupt, "start_errors": start_errors,
                      "after_restart": len(reloaded), "corrupt2": g.corrupt,
                      "errors_at_start_full": errors_at_start_full,
                      "has_new": set(more) <= reloaded}))
""")


def test_a_full_disk_is_survived_and_caught_up(tmp_path: Path) -> None:
    """A real full disk: a 32 kB tmpfs in a private mount namespace (``unshare -rm``,
    no root needed where user namespaces are allowed). Writes fail with ENOSPC, the
    cache keeps refusing in memory, and once there is room the writer catches up with
    what it held; a broker starting on a full disk starts (not compacted) and appends
    later. The file loses at most the record a failed write tore."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.fail("unshare (util-linux) is needed to mount a small tmpfs", pytrace=False)
    script = tmp_path / "child.py"
    script.write_text(_DISK_FULL_CHILD)
    repo = str(Path(__file__).resolve().parents[1])
    done = subprocess.run(
        [unshare, "-rm", "sh", "-c",
         'd=$(mktemp -d) && mount -t tmpfs -o size=32k tmpfs "$d" && '
         f'"{sys.executable}" "{script}" "$d" "{repo}"; rc=$?; umount "$d"; exit $rc'],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["errors_while_full"] >= 1 and out["in_memory"] == 200
    assert out["written"] == 200 and out["loaded"] == 200 and out["corrupt"] <= 1
    assert out["start_errors"] >= 1 and out["errors_at_start_full"] >= 1
    assert out["has_new"] and out["after_restart"] == 300 and out["corrupt2"] <= 2
    assert "No space left on device" in done.stderr


# -- the shared table ---------------------------------------------------------------------


@pytest.fixture
def database(postgres_server: PostgresServer) -> str:
    return postgres_server.create_database()


def _rows(url: str) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(f"SELECT responder, origin, nonce FROM {TABLE} ORDER BY id"
                            ).fetchall()


def _collect(store: PostgresStore, want: int, timeout: float = 10.0) -> list[bytes]:
    got: list[bytes] = []

    def enough() -> bool:
        got.extend(n for n, _ in store.take(10_000))
        return len(got) >= want

    with contextlib.suppress(AssertionError):  # the caller asserts on what arrived
        wait_for(enough, timeout, f"{want} nonces from the table")
    return got


def test_replicas_share_nonces_through_the_table(database: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Three replicas of one identity and a broker of another on one database. Two
    replicas write 3,000 nonces each at the same time; the third reads every one of
    them (ids become visible in order: none is skipped), none reads its own back, the
    other identity reads none, and expired rows are deleted."""
    monkeypatch.setattr(ns, "CLEANUP_S", 0.2)
    me = "spiffe://fleet.test/broker/mqtt-1"
    a, b, c = (PostgresStore(database, me, max_entries=10_000, poll_s=0.5) for _ in range(3))
    other = PostgresStore(database, "spiffe://fleet.test/broker/mqtt-2", max_entries=100)
    stores = (a, b, c, other)
    for s in stores:
        s.prepare()  # concurrent CREATE TABLE IF NOT EXISTS is serialised too
        s.start()
    try:
        for s in stores:
            assert s.caught_up.wait(5)
        now = time.monotonic()
        def write(store: PostgresStore, base: int) -> None:
            for i in range(3000):
                store.offer(nonce(base + i), now + 600)

        writers = [threading.Thread(target=write, args=(s, base))
                   for s, base in ((a, 0), (b, 10_000))]
        for t in writers:
            t.start()
        for t in writers:
            t.join()
        got = _collect(c, 6000)
        assert sorted(got) == sorted([nonce(i) for i in range(3000)] +
                                     [nonce(10_000 + i) for i in range(3000)])
        assert sorted(_collect(a, 3000)) == sorted(nonce(10_000 + i) for i in range(3000))
        assert other.take(10) == [] and a.take(10) == []
        # expiry travels as remaining seconds on the database's clock
        sent = time.monotonic()
        c.offer(nonce(99_999), sent + 0.5)
        wait_for(lambda: len(a._in) > 0, 5, "the short-lived nonce at A")
        [(n, expiry)] = a.take(10)
        assert n == nonce(99_999) and sent + 0.3 < expiry <= sent + 0.5 + 0.05
        wait_for(lambda: all(r[2] != nonce(99_999) for r in _rows(database)), 10,
                 "the expired row to be deleted")
    finally:
        for s in stores:
            s.close()
    rows = _rows(database)
    assert {r[0] for r in rows} <= {me, "spiffe://fleet.test/broker/mqtt-2"}
    assert all(len(r[2]) == N for r in rows)


# -- a real broker ----------------------------------------------------------------------


@dataclass
class Broker:
    mosquitto: Mosquitto
    directory: Path
    port: int  # metrics
    identity: Identity
    fleet: Fleet

    def metric(self, series: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics",
                                    timeout=5) as resp:
            for line in resp.read().decode().splitlines():
                name, _, value = line.rpartition(" ")
                if name == series:
                    return float(value)
        return 0.0

    def audit(self, event: str) -> list[dict[str, Any]]:
        path = self.directory / "audit.jsonl"
        if not path.exists():
            return []
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return [r for r in rows if r["event"] == event]

    def client(self, member: Member) -> TesseraMqttClient:
        return TesseraMqttClient(signer=member.signer, credential=member.credential,
                                 trust=self.fleet.trust, host="127.0.0.1",
                                 port=self.mosquitto.port, broker=self.identity)


REPLAYED = 'tessera_rejections_total{reason="handshake_replayed"}'
PENDING = 'tessera_handshakes_total{result="pending"}'  # msg2 sent: the key signed
OK = 'tessera_handshakes_total{result="ok"}'


def store_metric(store: str, event: str) -> str:
    return f'tessera_nonce_store_total{{store="{store}",event="{event}"}}'


def _fleet() -> Fleet:
    return Fleet(t0=dt.datetime.now(dt.UTC) - dt.timedelta(days=1))


def _broker(directory: Path, fleet: Fleet, key: tuple[Path, Member], **options: str) -> Broker:
    """A broker (not started) with the identity ``key`` names: replicas share it."""
    key_path, member = key
    port = free_port()
    opts = plugin_files(
        directory, trust_domain=fleet.trust_domain,
        bundle_pem=fleet.root.public_bytes(Encoding.PEM),
        credential_pem=member.credential.chain[0].public_bytes(Encoding.PEM),
        key=f"insecure-software:{key_path}", audit_log=str(directory / "audit.jsonl"),
        metrics_port=str(port), **options)
    return Broker(Mosquitto(directory / "mosquitto", plugin_options=opts), directory, port,
                  member.identity, fleet)


def _identity(directory: Path, fleet: Fleet, name: str = "mqtt-1") -> tuple[Path, Member]:
    directory.mkdir(parents=True, exist_ok=True)
    signer = InsecureSoftwareSigner.generate()
    member = fleet.member("broker", name, signer=signer)
    return signer.save(directory / f"{name}-key.pem"), member



def _replay(broker: Broker, client_id: str, msg1: bytes) -> m5.Packet:
    """A raw MQTT 5 CONNECT carrying a captured msg1: the first packet back."""
    conn = m5.Conn.open("127.0.0.1", broker.mosquitto.port)
    try:
        conn.send(m5.connect(client_id, auth_method="tessera-sa1", auth_data=msg1))
        packet = conn.read(5)
        assert packet is not None, "no answer to the replayed CONNECT"
        return packet
    finally:
        conn.close()


def _refused_as_replayed(broker: Broker, client_id: str, msg1: bytes) -> None:
    """The replay gets CONNACK 0x87 at once (no AUTH with msg2), is counted and audited
    as handshake_replayed at msg1 (the audit log writes the first per source in full
    and summarises repeats within 10 s), and the broker's key made no signature."""
    pending, refused = broker.metric(PENDING), broker.metric(REPLAYED)
    packet = _replay(broker, client_id, msg1)
    assert packet.type == m5.CONNACK, f"answered with {packet!r}: msg2 was built and signed"
    assert m5.parse_connack(packet).reason == 0x87
    assert broker.metric(REPLAYED) == refused + 1
    assert broker.metric(PENDING) == pending  # no msg2: nothing signed, nothing pending
    wait_for(lambda: [r for r in broker.audit("handshake_refused")
                      if r["reason"] == "handshake_replayed" and r["stage"] == "msg1"
                      and r["client_id"] == client_id], 5, "the replay in the audit log")


def _delivers(device: TesseraMqttClient, topic: str) -> None:
    """A QoS 1 publish from the live device is accepted (PUBACK 0x00 or 0x10)."""
    codes: list[int] = []
    device.client.on_publish = lambda c, u, mid, rc, p: codes.append(rc.value)
    device.publish(topic, b"still here", qos=1).wait_for_publish(5)
    wait_for(lambda: codes, 5, "the PUBACK")
    assert codes[0] in (0x00, 0x10) and device.client.is_connected()


@pytest.mark.broker
def test_a_msg1_replayed_after_a_restart_or_a_crash_is_refused_before_any_signature(
        tmp_path: Path) -> None:
    fleet = _fleet()
    broker = _broker(tmp_path / "b", fleet, _identity(tmp_path, fleet),
                     nonce_file=str(tmp_path / "nonces"))
    member = fleet.member("device", "pi-1")
    uri = member.identity.uri
    with broker.mosquitto:
        device = broker.client(member)
        captured = capture_msg1(device)
        device.connect()
        wait_for(lambda: broker.metric(store_metric("file", "written")) >= 1, 5,
                 "the nonce in the file")
        device.close()

        broker.mosquitto.restart()  # SIGTERM: a clean stop, then a new process
        assert broker.metric(store_metric("file", "loaded")) == 1
        _refused_as_replayed(broker, uri, captured[0])
        [refused] = [r for r in broker.audit("handshake_refused")
                     if r["reason"] == "handshake_replayed"]
        assert refused["stage"] == "msg1" and refused["client_id"] == uri
        assert broker.metric(OK) == 0
        # the genuine device, with a new msg1, is welcome and undisturbed
        device = broker.client(member)
        captured = capture_msg1(device)
        device.connect()
        _delivers(device, "devices/pi-1/telemetry/t")
        assert broker.metric(PENDING) == 1 and broker.metric(OK) == 1
        wait_for(lambda: broker.metric(store_metric("file", "written")) >= 1, 5,
                 "the new nonce in the file")
        device.close()

        broker.mosquitto.kill()  # SIGKILL: no cleanup, like a crash
        broker.mosquitto.start()
        assert broker.metric(store_metric("file", "loaded")) == 2
        _refused_as_replayed(broker, uri, captured[0])  # the nonce written before
        assert broker.metric(PENDING) == 0 and broker.metric(OK) == 0


@pytest.mark.broker
def test_replicas_refuse_a_msg1_the_other_answered_once_synced(
        tmp_path: Path, database: str) -> None:
    """Two brokers with one identity (key and credential) share a PostgreSQL database:
    a genuine msg1 answered at A is refused at B as soon as B has synced (B's
    `remembered` counter: the event waited on), before any signature work at B. The
    live device at A is undisturbed; it may also log in at B with a new msg1, which A
    then refuses in turn."""
    fleet = _fleet()
    key = _identity(tmp_path, fleet)
    a = _broker(tmp_path / "a", fleet, key, nonce_database=database)
    b = _broker(tmp_path / "b", fleet, key, nonce_database=database, nonce_poll_s="0.5")
    member = fleet.member("device", "pi-r")
    uri = member.identity.uri
    with a.mosquitto, b.mosquitto:
        assert a.identity == b.identity
        device = a.client(member)
        captured = capture_msg1(device)
        t0 = time.monotonic()
        device.connect()
        t1 = time.monotonic()
        wait_for(lambda: b.metric(store_metric("database", "remembered")) >= 1, 5,
                 "replica B to learn A's nonce")
        synced = time.monotonic()
        _refused_as_replayed(b, uri, captured[0])
        assert b.metric(PENDING) == 0 and b.metric(OK) == 0
        _refused_as_replayed(a, uri, captured[0])  # and at A, from its own cache
        _delivers(device, "devices/pi-r/telemetry/t")
        # the other way round
        there = b.client(member)
        captured_b = capture_msg1(there)
        there.connect()
        wait_for(lambda: a.metric(store_metric("database", "remembered")) >= 1, 5,
                 "replica A to learn B's nonce")
        _refused_as_replayed(a, uri, captured_b[0])
        _delivers(there, "devices/pi-r/telemetry/t")
        assert a.metric(store_metric("database", "errors")) == 0
        for c in (device, there):
            c.close()
    print(f"\nsync: handshake at A took {1000 * (t1 - t0):.1f} ms; B refused "
          f"{1000 * (synced - t1):.1f} ms after A's CONNACK (metrics polled every 10 ms)")


@pytest.mark.broker
def test_bad_nonce_options_stop_the_broker_with_one_line(
        tmp_path: Path, postgres_server: PostgresServer) -> None:
    fleet = _fleet()
    key = _identity(tmp_path, fleet)
    dead = f"postgresql://tessera:s3cret-pw@127.0.0.1:{free_port()}/nonces"
    wrong_pw = postgres_server.url().replace(postgres_server.password, "s3cret-pw")
    holder = FileStore(tmp_path / "held", max_entries=10)
    holder.start(NonceCache())
    cases = [
        ({"nonce_file": "/nonexistent-dir/nonces"},
         "plugin_opt_nonce_file: /nonexistent-dir/nonces: directory /nonexistent-dir "
         "does not exist"),
        ({"nonce_file": str(tmp_path)}, f"plugin_opt_nonce_file: {tmp_path} is a directory"),
        ({"nonce_file": str(tmp_path / "held")}, "is in use by another process"),
        ({"nonce_database": "mysql://root:s3cret-pw@db/nonces"},
         "plugin_opt_nonce_database: 'mysql://root:***@db/nonces' is not a postgresql:// URL"),
        ({"nonce_database": dead}, "plugin_opt_nonce_database postgresql://tessera:***@"),
        ({"nonce_database": wrong_pw}, "password authentication failed"),
        ({"nonce_poll_s": "fast", "nonce_file": str(tmp_path / "n")},
         "plugin_opt_nonce_poll_s: 'fast' is not seconds in [0.05, 60]"),
    ]
    try:
        for i, (options, expect) in enumerate(cases):
            broker = _broker(tmp_path / f"case{i}", fleet, key, **options)
            with pytest.raises(ConfigurationError) as exc, broker.mosquitto:
                pass
            text = str(exc.value)
            errors = [ln for ln in text.split(" | ") if "tessera:" in ln
                      and "refused to start" in ln]
            assert len(errors) == 1 and expect in errors[0], text
            assert "s3cret-pw" not in text
    finally:
        holder.close()


@pytest.fixture(autouse=True)
def _no_leftover_threads() -> Iterator[None]:
    before = {t.name for t in threading.enumerate()}
    yield
    left = [t.name for t in threading.enumerate()
            if t.name.startswith("tessera-nonce") and t.name not in before and t.is_alive()]
    assert not left, left
