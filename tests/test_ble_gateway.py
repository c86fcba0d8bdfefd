"""The gateway side of SA1 over GATT, on the virtual radio with swtpm keys at both ends:
the shared policy (broker_plugin.ble.GattPolicy over broker_plugin.policy), the bound
on pending handshakes across connections, and renewal before a session's lifetime ends
(make-before-break) driven by a fake clock."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import pytest

from broker_plugin.ble import STEP_UP_OVER_GATT, GattPolicy
from broker_plugin.policy import parse_policy
from device.ble_central import GattLink
from device.ble_session import PeerRefusedError, Sa1Central, Sa1Peripheral, sa1_link
from hw.tpm import TpmBackend
from simulator.ble import VirtualRadio
from simulator.fleet import NOW, Fleet, Member
from structauth import gatt
from structauth.errors import ProtocolError, Reason
from structauth.gatt_session import NOT_ALLOWED, State
from structauth.handshake import Initiator, Responder
from structauth.params import SessionParams
from tests.support import wait_for_async

pytestmark = pytest.mark.hardware

POLICY = """
version = 1
[classes.default]
publish   = ["sensors/{id}/#", "devices/{id}/firmware/#"]
subscribe = ["config/{id}/#"]
will      = ["sensors/{id}/will"]
[classes.default.step_up]
publish   = ["devices/{id}/firmware/#"]
"""


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 40))


@dataclass
class World:
    fleet: Fleet
    device: Member
    gateway: Member


@pytest.fixture
def world(tpm_backend: TpmBackend) -> World:
    fleet = Fleet()
    device = fleet.member("device", "ble-1",
                          signer=tpm_backend.get_or_create_signing_key("device"))
    gateway = fleet.member("broker", "gw-1",
                           signer=tpm_backend.get_or_create_signing_key("gateway"))
    return World(fleet, device, gateway)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def initiator(w: World) -> Initiator:
    return Initiator(signer=w.device.signer, credential=w.device.credential,
                     trust=w.fleet.trust, expected_peer=w.gateway.identity)


async def gateway(w: World, radio: VirtualRadio, **kwargs: Any) -> Sa1Peripheral:
    params = kwargs.pop("params", SessionParams())
    responder = Responder(signer=w.gateway.signer, credential=w.gateway.credential,
                          trust=w.fleet.trust, params=params, peer_kind="device")
    return await Sa1Peripheral(radio.add_device("gateway"), responder, policy=lambda: NOW,
                               **kwargs).start("gw-1")


async def new_backends(radio: VirtualRadio, name: str) -> Any:
    dev = radio.add_device(name)
    await dev.power_on()
    return radio.bleak_backends(dev)


async def target_of(backends: Any) -> Any:
    from device.ble_central import scan

    found = await scan(gatt.SA1_SERVICE, timeout=5, backends=backends, stop_after=1)
    assert found, "the gateway's advertisement was not seen"
    return found[0][0]


# -- 1. the shared policy ------------------------------------------------------------------


def test_policy_refuses_denied_topics_with_their_reason_and_nothing_else(world: World) -> None:
    audit: list[tuple[str, dict[str, Any]]] = []
    counted: list[tuple[str, str]] = []
    rules = GattPolicy(parse_policy(POLICY), audit=lambda event, **f: audit.append((event, f)),
                       count=lambda metric, label: counted.append((metric, label)))

    async def scenario() -> None:
        radio = VirtualRadio()
        peripheral = await gateway(world, radio, authorize=rules)
        backends = await new_backends(radio, "device")
        central = Sa1Central(sa1_link(await target_of(backends), backends=backends),
                             initiator(world), policy=lambda: NOW)
        await central.open()
        await wait_for_async(lambda: peripheral.established(), what="confirmed session")
        session = peripheral.established()[0]

        await central.send("sensors/ble-1/temp", b"21.5")
        assert (await asyncio.wait_for(session.received.get(), 5)).payload == b"21.5"
        # another device's topic, a will topic, a step-up topic: each refused
        for topic in ("sensors/ble-2/temp", "sensors/ble-1/will", "devices/ble-1/firmware/x"):
            await central.send(topic, b"x")
            with pytest.raises(PeerRefusedError) as exc:
                await central.receive()
            assert exc.value.reason is Reason.NOT_AUTHORIZED
            assert str(exc.value.detail) == NOT_ALLOWED  # the policy's reason stays here
        assert session.received.empty()
        assert [r.reason for r in peripheral.refusals] == [Reason.NOT_AUTHORIZED] * 3
        assert ("no publish template matches (topic 'sensors/ble-2/temp', in)"
                in peripheral.refusals[0].detail)
        assert "will topic" in peripheral.refusals[1].detail
        assert STEP_UP_OVER_GATT in peripheral.refusals[2].detail
        assert [(e, f["topic"], f["direction"]) for e, f in audit] == [
            ("gatt_denied", "sensors/ble-2/temp", "in"),
            ("gatt_denied", "sensors/ble-1/will", "in"),
            ("gatt_denied", "devices/ble-1/firmware/x", "in")]
        assert all(f["identity"] == world.device.identity.uri for _, f in audit)
        assert counted == [("rejections", "not_authorized")] * 3

        # gateway -> device: a topic the device may not receive is not sent
        with pytest.raises(ProtocolError) as refused:
            await session.send("config/ble-2/interval", b"60")
        assert refused.value.reason is Reason.NOT_AUTHORIZED
        assert rules.denied == {"in": 3, "out": 1}
        await session.send("config/ble-1/interval", b"60")
        back = await central.receive()  # the first thing the device gets is the allowed one
        assert (back.topic, back.payload) == ("config/ble-1/interval", b"60")

        # nothing else disturbed: the session goes on, in order
        await central.send("sensors/ble-1/temp", b"22.0")
        got = await asyncio.wait_for(session.received.get(), 5)
        assert got.payload == b"22.0"
        assert session.connection.state is State.ESTABLISHED
        assert central.refused == [] and len(audit) == 4
        await central.close()

    run(scenario())


# -- 2. pending handshakes across connections ----------------------------------------------


def test_pending_handshakes_are_bounded_across_connections(world: World) -> None:
    """Two centrals leave a handshake pending (msg1, no msg3) at a gateway that allows
    two: a third msg1 is refused BACKEND_UNAVAILABLE and its link ended; the session
    already confirmed on another connection is untouched; once a pending one goes, a
    device gets in again."""
    async def scenario() -> None:
        radio = VirtualRadio()
        peripheral = await gateway(world, radio, max_pending=2)
        backends = await new_backends(radio, "device")
        target = await target_of(backends)
        central = Sa1Central(sa1_link(target, backends=backends), initiator(world),
                             policy=lambda: NOW)
        await central.open()
        await wait_for_async(lambda: peripheral.established(), what="confirmed session")
        assert peripheral.budget.held == 0  # a confirmed handshake holds nothing

        stalled: list[GattLink] = []
        for n in range(2):
            link = GattLink(target, rx_uuid=gatt.SA1_RX, tx_uuid=gatt.SA1_TX,
                            backends=await new_backends(radio, f"stall-{n}"))
            await link.connect()
            await link.send(bytes((gatt.SA1_MSG1,)) + initiator(world).start())
            assert (await link.receive(5))[0] == gatt.SA1_MSG2  # and no msg3, ever
            stalled.append(link)
        assert peripheral.budget.held == 2

        third = GattLink(target, rx_uuid=gatt.SA1_RX, tx_uuid=gatt.SA1_TX,
                         backends=await new_backends(radio, "third"))
        await third.connect()
        await third.send(bytes((gatt.SA1_MSG1,)) + initiator(world).start())
        reason, detail = gatt.decode_error(await third.receive(5))
        assert reason is Reason.BACKEND_UNAVAILABLE and "2 handshakes already pending" in detail
        await wait_for_async(lambda: not third.connected, what="the third link ended")
        assert peripheral.budget.held == 2
        assert [r.reason for r in peripheral.refusals] == [Reason.BACKEND_UNAVAILABLE]

        await central.send("a/b", b"still here")
        session = peripheral.established()[0]
        assert (await asyncio.wait_for(session.received.get(), 5)).payload == b"still here"

        await stalled[0].close()  # its pending handshake (and its budget) goes with it
        await wait_for_async(lambda: peripheral.budget.held == 1, what="budget released")
        again = Sa1Central(sa1_link(target, backends=await new_backends(radio, "again")),
                           initiator(world), policy=lambda: NOW)
        assert await again.open() == world.gateway.identity
        await wait_for_async(lambda: len(peripheral.established()) == 2,
                             what="second confirmed session")
        assert peripheral.budget.held == 1
        for link in (stalled[1], third):
            await link.close()
        await again.close()
        await central.close()

    run(scenario())


# -- 3. renewal before the lifetime ends (make-before-break) ----------------------------------


def test_session_is_renewed_before_its_lifetime_ends(world: World) -> None:
    clock = FakeClock()

    async def scenario() -> None:
        radio = VirtualRadio()
        peripheral = await gateway(world, radio, clock=clock,
                                   params=SessionParams(lifetime_s=60))
        backends = await new_backends(radio, "device")
        central = Sa1Central(sa1_link(await target_of(backends), backends=backends),
                             initiator(world), policy=lambda: NOW, clock=clock,
                             renew=lambda: initiator(world), renew_before=6)
        await central.open()
        await wait_for_async(lambda: peripheral.established(), what="confirmed session")
        session = peripheral.established()[0]
        first = central.connection.session
        assert first is not None
        assert central.renew_at() == first.expires_at - 6

        await central.maintain()  # not due yet: nothing happens
        assert central.connection.handshakes == 1 and not central.connection.pending

        clock.now = first.expires_at - 5  # past the renewal time, before the end
        in_flight = central.connection.send("a/b", b"sent on the old session", clock())
        await central.maintain()
        await wait_for_async(lambda: session.connection.handshakes == 2,
                             what="the renewal confirmed at the gateway")
        second = central.connection.session
        assert second is not None and second is not first
        assert second.session_id != first.session_id
        assert session.connection.peer == world.device.identity
        # make-before-break: a message made on the old session still counts
        await central.link.send(in_flight)
        got = await asyncio.wait_for(session.received.get(), 5)
        assert got.payload == b"sent on the old session"
        await central.send("a/b", b"new")
        assert (await asyncio.wait_for(session.received.get(), 5)).payload == b"new"
        await session.send("c/d", b"back")
        assert (await central.receive()).payload == b"back"

        # past the old session's end: its keys are gone at both ends, the new one goes on
        clock.now = first.expires_at + 1
        await central.maintain()
        session._tick()
        assert central.connection.previous is None and session.connection.previous is None
        await central.link.send(in_flight)
        with pytest.raises(PeerRefusedError) as exc:
            await central.receive()
        assert exc.value.reason in (Reason.UNKNOWN_SESSION, Reason.REPLAYED)
        await central.send("a/b", b"after")
        assert (await asyncio.wait_for(session.received.get(), 5)).payload == b"after"
        assert session.connection.state is State.ESTABLISHED
        assert central.connection.handshakes == 2
        await central.close()

    run(scenario())


def test_a_renewal_for_another_peer_ends_the_link(world: World) -> None:
    """A re-handshake on an established link must be the same device: another enrolled
    device's msg1 there is refused WRONG_IDENTITY and the link ends."""
    other = world.fleet.member("device", "ble-2")
    clock = FakeClock()

    async def scenario() -> None:
        radio = VirtualRadio()
        peripheral = await gateway(world, radio, clock=clock)
        backends = await new_backends(radio, "device")
        central = Sa1Central(sa1_link(await target_of(backends), backends=backends),
                             initiator(world), policy=lambda: NOW, clock=clock)
        await central.open()
        await wait_for_async(lambda: peripheral.established(), what="confirmed session")
        clock.now += 3000  # in the second half of the hour: a renewal may come now
        msg1 = Initiator(signer=other.signer, credential=other.credential,
                         trust=world.fleet.trust, expected_peer=world.gateway.identity).start()
        await central.link.send(bytes((gatt.SA1_MSG1,)) + msg1)
        with pytest.raises(PeerRefusedError) as exc:
            await central.receive()
        assert exc.value.reason is Reason.WRONG_IDENTITY
        await wait_for_async(lambda: not central.link.connected, what="link ended")
        assert peripheral.budget.held == 0
        await central.close()

    run(scenario())


def test_the_renewal_timer_runs_on_its_own(world: World) -> None:
    """The same renewal from the central's own timer (real clock, a 2 s lifetime:
    renewed a tenth of the lifetime before its end), waited for as an event."""
    async def scenario() -> None:
        radio = VirtualRadio()
        peripheral = await gateway(world, radio, params=SessionParams(lifetime_s=2,
                                                                      epoch_ms=500))
        backends = await new_backends(radio, "device")
        central = Sa1Central(sa1_link(await target_of(backends), backends=backends),
                             initiator(world), policy=lambda: NOW,
                             renew=lambda: initiator(world))
        await central.open()
        await wait_for_async(lambda: peripheral.established(), what="confirmed session")
        session = peripheral.established()[0]
        await wait_for_async(lambda: session.connection.handshakes >= 2, timeout=10,
                             what="renewed by the timer")
        await central.send("a/b", b"renewed")
        assert (await asyncio.wait_for(session.received.get(), 5)).payload == b"renewed"
        await central.close()

    run(scenario())


# -- the same bounds without a radio (sans-IO, software keys), at the default bound ----------


def _responder_and_msg1(fleet: Fleet, gw: Member) -> tuple[Responder, Any]:
    responder = Responder(signer=gw.signer, credential=gw.credential, trust=fleet.trust,
                          params=SessionParams(), peer_kind="device")
    dev = fleet.member("device", "soft-1")

    def msg1() -> bytes:
        return bytes((gatt.SA1_MSG1,)) + Initiator(
            signer=dev.signer, credential=dev.credential, trust=fleet.trust,
            expected_peer=gw.identity).start()

    return responder, msg1


def test_pending_budget_at_the_default_bound() -> None:
    from structauth.gatt_session import (
        Outgoing,
        PendingBudget,
        Refused,
        ResponderConnection,
    )

    fleet = Fleet()
    gw = fleet.member("broker", "gw-soft")
    responder, msg1 = _responder_and_msg1(fleet, gw)
    budget = PendingBudget()
    assert budget.limit == 16
    connections = [ResponderConnection(responder, budget=budget) for _ in range(16)]
    for conn in connections:
        events = conn.receive(msg1(), 0.0, NOW)
        assert isinstance(events[0], Outgoing) and events[0].message[0] == gatt.SA1_MSG2
    assert budget.held == 16
    # the 17th: refused before its bytes are even parsed (garbage would be MALFORMED)
    extra = ResponderConnection(responder, budget=budget)
    events = extra.receive(bytes((gatt.SA1_MSG1,)) + b"garbage", 0.0, NOW)
    refused = [e for e in events if isinstance(e, Refused)]
    assert refused and refused[0].reason is Reason.BACKEND_UNAVAILABLE and refused[0].fatal
    assert extra.state is State.CLOSED and budget.held == 16
    assert all(c.state is State.PENDING for c in connections)  # nobody else disturbed
    # one connection, one pending handshake: a second msg1 ends it and frees its share
    events = connections[0].receive(msg1(), 0.0, NOW)
    assert [e.reason for e in events if isinstance(e, Refused)] == [Reason.INVALID_STATE]
    assert connections[0].state is State.CLOSED and budget.held == 15
    # a pending handshake past its deadline ends its connection and frees its share
    deadline = connections[1].next_deadline(0.0)
    connections[1].poll(deadline + 0.001)
    assert connections[1].state is State.CLOSED and budget.held == 14
    late = ResponderConnection(responder, budget=budget)
    assert isinstance(late.receive(msg1(), 0.0, NOW)[0], Outgoing)
    assert budget.held == 15
    for conn in [*connections, late]:
        conn.close()
    assert budget.held == 0


def test_a_renewal_in_the_first_half_of_the_lifetime_ends_the_link() -> None:
    """An authenticated peer cannot make the responder check a signature per round
    trip: a renewal before half the lifetime is refused INVALID_STATE, before its
    bytes are parsed, and ends the connection; in the second half it is taken."""
    from structauth.gatt_session import (
        Established,
        InitiatorConnection,
        Outgoing,
        PendingBudget,
        Refused,
        ResponderConnection,
    )

    fleet = Fleet()
    gw = fleet.member("broker", "gw-soft")
    dev = fleet.member("device", "soft-1")
    responder = Responder(signer=gw.signer, credential=gw.credential, trust=fleet.trust,
                          params=SessionParams(lifetime_s=3600), peer_kind="device")

    def new_initiator() -> Initiator:
        return Initiator(signer=dev.signer, credential=dev.credential, trust=fleet.trust,
                         expected_peer=gw.identity)

    def pair() -> tuple[InitiatorConnection, ResponderConnection, PendingBudget]:
        budget = PendingBudget()
        ini = InitiatorConnection(new_initiator())
        res = ResponderConnection(responder, budget=budget)
        msg2 = res.receive(ini.start(), 0.0, NOW)[0]
        assert isinstance(msg2, Outgoing)
        msg3 = ini.receive(msg2.message, 0.0, NOW)[0]
        assert isinstance(msg3, Outgoing)
        assert isinstance(res.receive(msg3.message, 0.0, NOW)[0], Established)
        return ini, res, budget

    ini, res, budget = pair()
    events = res.receive(bytes((gatt.SA1_MSG1,)) + b"garbage", 1799.0, NOW)
    assert [(e.reason, e.fatal) for e in events if isinstance(e, Refused)] == [
        (Reason.INVALID_STATE, True)]
    assert res.state is State.CLOSED and budget.held == 0

    ini, res, budget = pair()
    msg2 = res.receive(ini.rekey(new_initiator()), 1801.0, NOW)[0]
    assert isinstance(msg2, Outgoing) and msg2.message[0] == gatt.SA1_MSG2
    assert budget.held == 1
    msg3 = ini.receive(msg2.message, 1801.0, NOW)[0]
    assert isinstance(msg3, Outgoing)
    assert isinstance(res.receive(msg3.message, 1801.0, NOW)[0], Established)
    assert res.handshakes == 2 and budget.held == 0


def test_policy_reload_applies_to_the_next_message(tmp_path: Any) -> None:
    """GattPolicy reads a PolicyHolder's current policy per message; an invalid file
    keeps the one in force. Device classes come from the caller (registry)."""
    from broker_plugin.policy import PolicyHolder
    from structauth.credentials import Identity
    from structauth.errors import ConfigurationError

    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    holder = PolicyHolder(path)
    classes = {"spiffe://fleet.test/device/pi-9": "gateway"}
    rules = GattPolicy(holder, device_class_of=lambda i: classes.get(i.uri, "default"))
    pi = Identity.parse("spiffe://fleet.test/device/pi-9")
    ble = Identity.parse("spiffe://fleet.test/device/ble-1")
    assert rules(ble, "in", "sensors/ble-1/t") is None
    assert rules(pi, "in", "sensors/pi-9/t") is not None  # class "gateway": not in the file
    path.write_text(POLICY + '[classes.gateway]\ninherits = "default"\n'
                    'publish = ["sites/{id}/#"]\n')
    assert holder.reload()
    assert rules(pi, "in", "sensors/pi-9/t") is None and rules(pi, "in", "sites/pi-9/a") is None
    assert rules(ble, "in", "sites/ble-1/a") is not None
    path.write_text("version = 2\n")
    with pytest.raises(ConfigurationError):
        holder.reload()
    assert rules(pi, "in", "sites/pi-9/a") is None  # the policy in force stays
    assert rules(ble, "sideways", "sensors/ble-1/t") is not None
    assert rules.denied == {"in": 2, "out": 0, "sideways": 1}
