"""SA1 over GATT on the virtual radio: a device (bleak central over a bumble virtual
controller) and a gateway (bumble peripheral), device and gateway keys in swtpm; the
same rules and reason codes as MQTT and CoAP."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from device.ble_central import GattLink
from device.ble_session import PeerRefusedError, Sa1Central, Sa1Peripheral, sa1_link
from hw.tpm import TpmBackend
from simulator.ble import VirtualRadio
from simulator.fleet import NOW, Fleet, Member
from structauth import gatt
from structauth.credentials import Credential
from structauth.errors import ProtocolError, Reason
from structauth.gatt_session import State
from structauth.handshake import Initiator, Responder
from structauth.params import SessionParams
from structauth.session import HEADER_SIZE
from tests.support import wait_for_async

pytestmark = pytest.mark.hardware


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 40))  # type: ignore[arg-type]


@dataclass
class World:
    fleet: Fleet
    device: Member
    gateway: Member
    other_gateway: Member


@pytest.fixture
def world(tpm_backend: TpmBackend) -> World:
    fleet = Fleet()
    device = fleet.member("device", "ble-1",
                          signer=tpm_backend.get_or_create_signing_key("device"))
    gateway = fleet.member("broker", "gw-1",
                           signer=tpm_backend.get_or_create_signing_key("gateway"))
    return World(fleet, device, gateway, fleet.member("broker", "gw-2"))


async def setup(w: World, *, mtu: int = 247, sealed: bool = False,
                revoked: Callable[[Credential], bool] | None = None
                ) -> tuple[VirtualRadio, Sa1Peripheral, Any]:
    radio = VirtualRadio()
    gw_dev = radio.add_device("gateway")
    responder = Responder(signer=w.gateway.signer, credential=w.gateway.credential,
                          trust=w.fleet.trust, params=SessionParams(sealed=sealed),
                          peer_kind="device")
    peripheral = await Sa1Peripheral(gw_dev, responder, policy=lambda: NOW,
                                     revoked=revoked).start("gw-1", max_mtu=mtu)
    central = radio.add_device("device")
    await central.power_on()
    return radio, peripheral, radio.bleak_backends(central, mtu=mtu)


def initiator(w: World, expected: Member | None = None) -> Initiator:
    return Initiator(signer=w.device.signer, credential=w.device.credential,
                     trust=w.fleet.trust, expected_peer=(expected or w.gateway).identity)


async def find_gateway(backends: Any) -> Any:
    from device.ble_central import scan

    found = await scan(gatt.SA1_SERVICE, timeout=5, backends=backends, stop_after=1)
    assert found, "the gateway's advertisement was not seen"
    return found[0][0]


@pytest.mark.parametrize("mtu,sealed", [(23, False), (247, True), (247, False)])
def test_proven_messages_both_ways(world: World, mtu: int, sealed: bool) -> None:
    async def scenario() -> None:
        _radio, peripheral, backends = await setup(world, mtu=mtu, sealed=sealed)
        target = await find_gateway(backends)
        central = Sa1Central(sa1_link(target, backends=backends), initiator(world),
                             policy=lambda: NOW)
        assert await central.open() == world.gateway.identity
        assert central.link.mtu == mtu
        await wait_for_async(lambda: peripheral.established(), what="confirmed session")
        session = peripheral.established()[0]
        assert session.peer == world.device.identity
        reading = b"21.5 C " * 40  # several fragments at MTU 23
        await central.send("sensors/ble-1/temp", reading)
        got = await asyncio.wait_for(session.received.get(), 5)
        assert (got.topic, got.payload) == ("sensors/ble-1/temp", reading)
        await session.send("sensors/ble-1/config", b"interval=60")
        back = await central.receive()
        assert (back.topic, back.payload) == ("sensors/ble-1/config", b"interval=60")
        assert peripheral.refusals == [] and central.refused == []
        await central.close()

    run(scenario())


def test_sealed_payload_is_not_on_the_air(world: World) -> None:
    """In sealed mode the payload travels encrypted: the bytes the link carries do not
    hold it (the DATA message is what the radio sees, reassembled)."""
    async def scenario() -> None:
        _radio, peripheral, backends = await setup(world, sealed=True)
        central = Sa1Central(sa1_link(await find_gateway(backends), backends=backends),
                             initiator(world), policy=lambda: NOW)
        await central.open()
        secret = b"door code 4711"
        message = central.connection.send("locks/1", secret, central.clock())
        assert secret not in message
        await central.link.send(message)
        await wait_for_async(lambda: peripheral.established(), what="confirmed session")
        got = await asyncio.wait_for(peripheral.established()[0].received.get(), 5)
        assert got.payload == secret
        await central.close()

    run(scenario())


def test_msg1_for_another_gateway_is_refused(world: World) -> None:
    async def scenario() -> None:
        _radio, peripheral, backends = await setup(world)
        central = Sa1Central(sa1_link(await find_gateway(backends), backends=backends),
                             initiator(world, expected=world.other_gateway), policy=lambda: NOW)
        with pytest.raises(PeerRefusedError) as exc:
            await central.open()
        assert exc.value.reason is Reason.WRONG_IDENTITY
        assert [r.reason for r in peripheral.refusals] == [Reason.WRONG_IDENTITY]
        assert peripheral.established() == []
        await central.close()

    run(scenario())


def test_revoked_device_is_refused(world: World) -> None:
    async def scenario() -> None:
        _radio, peripheral, backends = await setup(
            world, revoked=lambda cred: cred.identity == world.device.identity)
        central = Sa1Central(sa1_link(await find_gateway(backends), backends=backends),
                             initiator(world), policy=lambda: NOW)
        with pytest.raises(PeerRefusedError) as exc:
            await central.open()
        assert exc.value.reason is Reason.CREDENTIAL_REVOKED
        assert peripheral.established() == []
        await central.close()

    run(scenario())


def test_tampered_and_replayed_messages_are_refused_and_the_session_goes_on(
        world: World) -> None:
    async def scenario() -> None:
        _radio, peripheral, backends = await setup(world)
        central = Sa1Central(sa1_link(await find_gateway(backends), backends=backends),
                             initiator(world), policy=lambda: NOW)
        await central.open()
        await wait_for_async(lambda: peripheral.established(), what="confirmed session")
        session = peripheral.established()[0]
        good = central.connection.send("a/b", b"one", central.clock())
        tampered = good[:-1] + bytes([good[-1] ^ 1])
        await central.link.send(tampered)
        with pytest.raises(PeerRefusedError) as exc:
            await central.receive()
        assert exc.value.reason is Reason.BAD_TAG
        await central.link.send(good)
        assert (await asyncio.wait_for(session.received.get(), 5)).payload == b"one"
        await central.link.send(good)  # the same proven message again
        with pytest.raises(PeerRefusedError) as exc:
            await central.receive()
        assert exc.value.reason is Reason.REPLAYED
        # a header for another session
        header, topic, body = gatt.decode_data(good, HEADER_SIZE)
        forged = gatt.encode_data(header[:1] + bytes(8) + header[9:], topic, body)
        await central.link.send(forged)
        with pytest.raises(PeerRefusedError) as exc:
            await central.receive()
        assert exc.value.reason is Reason.UNKNOWN_SESSION
        assert session.received.empty()
        assert [r.reason for r in peripheral.refusals] == [
            Reason.BAD_TAG, Reason.REPLAYED, Reason.UNKNOWN_SESSION]
        await central.send("a/b", b"two")  # the session was not disturbed
        assert (await asyncio.wait_for(session.received.get(), 5)).payload == b"two"
        assert session.connection.state is State.ESTABLISHED
        await central.close()

    run(scenario())


def test_attacking_central_gets_nothing_before_msg3(world: World) -> None:
    """An attacker's own connection: a proven-looking message with no handshake, a
    msg3 with no pending handshake, malformed fragments. Each is refused with its
    reason; the device's session on its own connection is untouched."""
    async def scenario() -> None:
        radio, peripheral, backends = await setup(world)
        target = await find_gateway(backends)
        central = Sa1Central(sa1_link(target, backends=backends), initiator(world),
                             policy=lambda: NOW)
        sent: list[bytes] = []
        send = central.link.send

        async def recording(message: bytes) -> None:
            sent.append(message)
            await send(message)

        central.link.send = recording  # type: ignore[method-assign]
        await central.open()
        await wait_for_async(lambda: peripheral.established(), what="confirmed session")
        legit = peripheral.established()[0]
        captured = central.connection.send("a/b", b"captured", central.clock())

        attacker_dev = radio.add_device("attacker")
        await attacker_dev.power_on()
        attacker = GattLink(target, rx_uuid=gatt.SA1_RX, tx_uuid=gatt.SA1_TX,
                            backends=radio.bleak_backends(attacker_dev))
        await attacker.connect()
        await attacker.send(sent[0])  # the device's msg1, replayed
        reason, _ = gatt.decode_error(await attacker.receive(5))
        assert reason is Reason.HANDSHAKE_REPLAYED
        await wait_for_async(lambda: not attacker.connected, what="attacker disconnected")
        attacker = GattLink(target, rx_uuid=gatt.SA1_RX, tx_uuid=gatt.SA1_TX,
                            backends=radio.bleak_backends(attacker_dev))
        await attacker.connect()
        await attacker.send(captured)  # replayed on another connection: no session there
        reason, _ = gatt.decode_error(await attacker.receive(5))
        assert reason is Reason.UNKNOWN_SESSION
        await attacker.send(bytes((gatt.SA1_MSG3,)) + bytes(46))
        reason, _ = gatt.decode_error(await attacker.receive(5))
        assert reason is Reason.UNKNOWN_SESSION
        await wait_for_async(lambda: not attacker.connected, what="attacker disconnected")

        attacker2 = GattLink(target, rx_uuid=gatt.SA1_RX, tx_uuid=gatt.SA1_TX,
                             backends=radio.bleak_backends(attacker_dev))
        await attacker2.connect()
        for junk in (b"\x00", bytes((0x05, 7)) + b"x", bytes((0x80, 0)) + (10**6).to_bytes(3,
                     "big") + b"x"):
            with pytest.raises(ProtocolError) as exc:
                await attacker2.write_raw(junk)
            assert exc.value.reason is Reason.MALFORMED
        assert peripheral.service.refused == 3
        # a message whose middle fragment (a write without response: no answer of its
        # own) does not fit is refused as a whole on its last fragment
        pieces = gatt.fragment(b"\x10" + bytes(100), 9, 23)
        await attacker2.write_raw(pieces[0], response=False)
        await attacker2.write_raw(bytes((9, 7)) + pieces[1][2:], response=False)
        for piece in pieces[2:-1]:
            await attacker2.write_raw(piece, response=False)
        with pytest.raises(ProtocolError):
            await attacker2.write_raw(pieces[-1])
        await attacker2.close()

        await central.link.send(captured)
        assert (await asyncio.wait_for(legit.received.get(), 5)).payload == b"captured"
        assert legit.connection.state is State.ESTABLISHED
        await central.close()

    run(scenario())
