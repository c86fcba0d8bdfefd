"""A fleet (issue 17, point 1): three Mosquitto replicas with the plugin, one broker
identity, behind HAProxy (TCP) on 127.0.0.1, sharing the PostgreSQL registry and msg1
nonce table, following one revocation feed (simulator.fleet.BrokerFleet, what
``tessera-sim fleet up`` starts). One fleet for the module: it costs ~10 s to start."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.mqtt_wire import Conn, connect_packet, sa1_connect
from device.agent import Agent
from device.mqtt import MqttError, TesseraMqttClient
from simulator.fleet import BrokerFleet, Member
from tests.support import capture_msg1, replay_msg1, wait_for

pytestmark = pytest.mark.broker

REMEMBERED = 'tessera_nonce_store_total{store="database",event="remembered"}'
REPLAYED = 'tessera_rejections_total{reason="handshake_replayed"}'
PENDING = 'tessera_handshakes_total{result="pending"}'


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerFleet]:
    with BrokerFleet(tmp_path_factory.mktemp("fleet"), 3) as f:
        yield f


def _subscribers(fleet: BrokerFleet, name: str) -> tuple[list[TesseraMqttClient],
                                                        queue.Queue[tuple[str, bytes]]]:
    """A backend subscribed to every device's telemetry at every broker (the replicas
    share no subscriptions): one queue for all."""
    backend = fleet.enroll(name, kind="broker")
    got: queue.Queue[tuple[str, bytes]] = queue.Queue()
    clients = []
    for port in fleet.broker_ports:
        c = fleet.client(backend, port=port)
        c.connect()
        c.subscribe("devices/+/telemetry/#", lambda t, p: got.put((t, p)), qos=1,
                    proven=False)
        clients.append(c)
    return clients, got




def test_devices_reach_every_broker_through_the_front(fleet: BrokerFleet) -> None:
    """Round-robin spreads devices over the three replicas; each device's telemetry
    reaches the backend subscribed at every broker."""
    subs, got = _subscribers(fleet, "backend-spread")
    devices = [fleet.enroll(f"pi-s{i}") for i in range(6)]
    clients = [fleet.client(d) for d in devices]
    for c in clients:
        c.connect()
    for d, c in zip(devices, clients, strict=True):
        c.publish(f"devices/{d.serial}/telemetry/t", d.serial.encode(), qos=1
                  ).wait_for_publish(5)
    seen = {got.get(timeout=10) for _ in devices}
    assert seen == {(f"devices/{d.serial}/telemetry/t", d.serial.encode()) for d in devices}
    homes = {fleet.home(d.identity) for d in devices}
    assert homes == {0, 1, 2}, homes
    for c in clients + subs:
        c.close()


def test_a_captured_msg1_is_refused_at_every_broker(fleet: BrokerFleet) -> None:
    """A msg1 copied off the wire is refused (CONNACK 0x87, handshake_replayed, no
    msg2 signed) at every replica once the shared table has carried its nonce, and
    through the front; the genuine device is undisturbed."""
    device = fleet.enroll("pi-replay")
    before = [fleet.metric(i, REMEMBERED) for i in range(3)]
    client = fleet.client(device)
    captured = capture_msg1(client)
    client.connect()
    home = fleet.home(device.identity)
    for i in range(3):
        if i != home:
            wait_for(lambda i=i: fleet.metric(i, REMEMBERED) > before[i], 5,  # type: ignore[misc]
                     f"broker {i} to learn the nonce")
    for i, port in enumerate(fleet.broker_ports):
        pending, replayed = fleet.metric(i, PENDING), fleet.metric(i, REPLAYED)
        assert replay_msg1(port, device.identity.uri, captured[0]) == 0x287, f"broker {i}"
        assert fleet.metric(i, REPLAYED) == replayed + 1
        assert fleet.metric(i, PENDING) == pending  # nothing signed
    assert replay_msg1(fleet.front_port, device.identity.uri, captured[0]) == 0x287
    client.publish("devices/pi-replay/telemetry/t", b"x", qos=1).wait_for_publish(5)
    assert client.client.is_connected()
    client.close()


def test_a_revocation_cuts_the_session_at_whichever_broker_holds_it(
        fleet: BrokerFleet) -> None:
    """One device on each broker; each revocation reaches every broker through its own
    follower and cuts the session where it is; the device is then refused everywhere."""
    devices = [fleet.enroll(f"pi-rv{i}") for i in range(3)]
    gone: list[threading.Event] = []
    clients = []
    for d, port in zip(devices, fleet.broker_ports, strict=True):
        c = fleet.client(d, port=port)
        c.connect()
        event = threading.Event()
        c.client.on_disconnect = lambda *a, e=event: e.set()
        gone.append(event)
        clients.append(c)
    cut = []
    for d, event, c in zip(devices, gone, clients, strict=True):
        t0 = time.monotonic()
        fleet.revoke(d.serial)
        assert event.wait(10), f"{d.serial} was not disconnected"
        cut.append(time.monotonic() - t0)
        c.client.loop_stop()
    for d in devices:
        for port in [fleet.front_port, *fleet.broker_ports]:
            with pytest.raises(MqttError):
                fleet.client(d, port=port).connect(timeout=5)
    print("\nrevoke call -> disconnect at brokers 0, 1, 2: "
          + ", ".join(f"{1000 * x:.0f} ms" for x in cut))


def test_a_quarantine_at_one_broker_holds_at_every_broker(fleet: BrokerFleet) -> None:
    """A device floods broker 0 with forged proofs (500 rejections quarantine it there,
    and cut its session); the quarantine goes through the shared table, so its next
    handshake is refused at brokers 1 and 2 too (audited there with cause replica),
    while another device is welcome everywhere."""
    from structauth.mqtt_binding import packet, seal
    from structauth.wire import var16

    bad, good = fleet.enroll("pi-flood"), fleet.enroll("pi-calm")
    assert fleet.trust is not None and fleet.identity is not None
    conn, session = sa1_connect(fleet.broker_ports[0], Member(bad.signer, bad.credential),
                                fleet.trust, fleet.identity)
    topic = "devices/pi-flood/telemetry/t"
    with contextlib.suppress(OSError):  # the broker cuts it part-way
        for _ in range(520):
            body = bytearray(seal(session, topic, b"x", time.monotonic()))
            body[-1] ^= 1  # a forged tag
            conn.sock.sendall(packet(0x30, var16(topic.encode()) + b"\x00" + bytes(body)))
    wait_for(lambda: [r for r in fleet.audit(0, "quarantined")
                      if r["identity"] == bad.identity.uri], 10, "the quarantine at broker 0")
    conn.sock.close()
    for i in (1, 2):
        wait_for(lambda i=i: [r for r in fleet.audit(i, "quarantined")  # type: ignore[misc]
                              if r["identity"] == bad.identity.uri
                              and r["cause"] == "replica"], 5, f"the quarantine at broker {i}")
    for port in fleet.broker_ports:
        with pytest.raises(ConnectionError, match="refused"):
            sa1_connect(port, Member(bad.signer, bad.credential), fleet.trust, fleet.identity)
        ok, _ = sa1_connect(port, Member(good.signer, good.credential), fleet.trust,
                            fleet.identity)
        ok.close()


def test_a_step_up_left_unanswered_at_one_broker_is_asked_at_the_next(
        fleet: BrokerFleet) -> None:
    """A policy change at broker 0 asks its live sessions to step up; the device
    disconnects instead of answering and logs in at broker 1, which asks it at once
    (the challenge went through the shared table): a challenge cannot be shed by
    moving."""
    device = fleet.enroll("pi-shed")
    assert fleet.trust is not None and fleet.identity is not None
    member = Member(device.signer, device.credential)
    policy = fleet.directory / "broker-0" / "policy.toml"
    before = policy.read_text()
    conn, _ = sa1_connect(fleet.broker_ports[0], member, fleet.trust, fleet.identity)
    try:
        policy.write_text(before.replace('publish   = ["devices/{id}/telemetry/#"]',
                                         'publish   = ["devices/{id}/telemetry/#", '
                                         '"devices/{id}/extra/#"]'))
        fleet.brokers[0].reload()
        wait_for(lambda: [r for r in fleet.audit(0, "step_up_requested")
                          if r["identity"] == device.identity.uri], 10,
                 "the step-up request at broker 0")
        conn.close()  # leaves without answering
        there, _ = sa1_connect(fleet.broker_ports[1], member, fleet.trust, fleet.identity)
        wait_for(lambda: [r for r in fleet.audit(1, "step_up_requested")
                          if r["identity"] == device.identity.uri
                          and r["detail"] == "outstanding at another replica"], 10,
                 "broker 1 to ask the device that left broker 0 unanswered")
        first, body = there.read_packet()  # the proven request on tessera/step-up
        assert first >> 4 == 3 and body[2:2 + int.from_bytes(body[:2], "big")] == \
            b"tessera/step-up"
        there.close()
    finally:
        policy.write_text(before)
        fleet.brokers[0].reload()


def test_an_agent_moves_when_its_broker_dies_and_its_buffered_qos1_arrive(
        fleet: BrokerFleet, tmp_path: Path) -> None:
    """SIGKILL the broker an agent is on: the agent reconnects through the front to a
    live replica by itself; what it published meanwhile (buffered) and after arrives at
    the backend, every message at least once. The killed broker restarts and is back
    in rotation (a new device reaches it)."""
    subs, got = _subscribers(fleet, "backend-move")
    device = fleet.enroll("pi-move")
    agent = Agent(fleet.agent_config(device, tmp_path / "state"), signer=device.signer)
    agent.start()
    home = -1
    try:
        assert agent.wait_connected(15)
        home = fleet.home(device.identity)
        topic = "devices/pi-move/telemetry/seq"
        for i in range(20):
            assert agent.publish(topic, b"%d" % i)
        fleet.brokers[home].kill()
        for i in range(20, 40):  # while it moves: sent or buffered
            agent.publish(topic, b"%d" % i)
        wait_for(lambda: agent.connected.is_set() and agent.stats.reconnects >= 1, 15,
                 "the agent to reconnect")
        for i in range(40, 60):
            agent.publish(topic, b"%d" % i)
        seen: list[int] = []
        survivors = [s for i, s in enumerate(subs) if i != home]

        def arrived() -> bool:
            while True:
                try:
                    seen.append(int(got.get_nowait()[1]))
                except queue.Empty:
                    return set(range(20, 60)) <= set(seen)

        wait_for(arrived, 15, "messages 20..59 at the backend")
        wait_for(lambda: [i for i in fleet.where(device.identity) if i != home], 10,
                 "the agent's login at another broker")
        moved = [i for i in fleet.where(device.identity) if i != home]
        lost_before_kill = set(range(20)) - set(seen)  # delivered by the dead broker only
        print(f"\nagent moved from broker {home} to {moved}; received {len(seen)} "
              f"(unique {len(set(seen))}, duplicates {len(seen) - len(set(seen))}); "
              f"of 0..19 (before the kill, at the dead broker's subscriber) "
              f"{20 - len(lost_before_kill)} seen")
        for s in survivors:
            assert s.client.is_connected()
    finally:
        agent.stop()
        for s in subs:
            s.close()
        if home >= 0:
            fleet.brokers[home].start()  # a no-op if it runs
    # back in rotation (HAProxy's next health check): fresh connections land on it again
    count = iter(range(100))

    def landed() -> bool:
        c = fleet.client(fleet.enroll(f"pi-back{next(count)}"))
        c.connect()
        c.close()
        return any("/device/pi-back" in r["identity"] for r in fleet.audit(home, "handshake_ok"))

    wait_for(landed, 20, f"a new device at the restarted broker {home}")


def test_fleet_up_starts_and_stops_everything(tmp_path: Path) -> None:
    """``tessera-sim fleet up --brokers 2``: prints the front and the brokers; the front
    answers MQTT (a CONNECT without SA1 is refused by the plugin behind it); Ctrl-C
    stops it all with status 0."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulator.cli", "fleet", "up", "--brokers", "2",
         "--workdir", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("front (HAProxy, TCP): 127.0.0.1:"), (
            first, proc.stderr.read() if proc.poll() is not None and proc.stderr else "")
        port = int(first.rsplit(":", 1)[1])
        lines = [proc.stdout.readline() for _ in range(5)]
        assert sum(ln.startswith("broker-") for ln in lines) == 2, lines
        conn = Conn(port, timeout=5)
        conn.sock.sendall(connect_packet("spiffe://x/device/anonymous"))
        first_byte, body = conn.read_packet()
        assert first_byte >> 4 == 2 and body[1] >= 0x80  # CONNACK, refused
        conn.sock.close()
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_fleet_up_refuses_a_bad_broker_count() -> None:
    done = subprocess.run([sys.executable, "-m", "simulator.cli", "fleet", "up",
                           "--brokers", "0"], capture_output=True, text=True,
                          env={**os.environ})
    assert done.returncode == 2
    assert "'0' is not a number of brokers 1 .. 16" in done.stderr.splitlines()[-1]
