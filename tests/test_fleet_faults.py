"""Faults a fleet meets (issue 17, point 3), each against the real processes of a
simulator.fleet.BrokerFleet (PostgreSQL, the provisioning service, three Mosquitto
replicas behind HAProxy). A broker killed and restarted is in tests/test_fleet.py
(the agent moves, its buffered QoS 1 messages arrive, the broker rejoins)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from bench.broker import Conn, sa1_connect
from simulator.fleet import BrokerFleet, Enrolled, Member
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
