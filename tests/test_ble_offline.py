"""Two enrolled devices, no network, no online authority: one (bleak central over a
bumble virtual controller) opens an SA1 session over GATT to the other (bumble
peripheral); each checks the other's credential against the trust bundle it holds and
the revocation list it last saw, no older than its configured max_crl_age_hours.
Both keys in swtpm."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from device.ble_central import scan
from device.ble_session import LastSeenRevocations, Sa1Central, Sa1Peripheral, sa1_link
from hw.tpm import TpmBackend
from simulator.ble import VirtualRadio
from simulator.fleet import NOW, T0, Fleet, Member
from structauth import gatt
from structauth.errors import ConfigurationError, ProtocolError, Reason
from structauth.handshake import Initiator, Responder
from structauth.params import SessionParams
from tests.support import wait_for_async

pytestmark = pytest.mark.hardware

WALL = T0 + dt.timedelta(days=1)  # the devices' wall clock (NOW's time)
CONFIG = {"max_crl_age_hours": 24}


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 40))  # type: ignore[arg-type]


def crl(fleet: Fleet, revoked: list[Member], *, issued: dt.datetime,
        key: Any = None) -> bytes:
    builder = (x509.CertificateRevocationListBuilder()
               .issuer_name(fleet.root.subject)
               .last_update(issued).next_update(issued + dt.timedelta(hours=1)))
    for member in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(member.credential.chain[0].serial_number)
            .revocation_date(issued).build())
    return builder.sign(key or fleet.key, hashes.SHA256()).public_bytes(
        serialization.Encoding.PEM)


@pytest.fixture
def fleet() -> Fleet:
    return Fleet()


@pytest.fixture
def pair(fleet: Fleet, tpm_backend: TpmBackend) -> tuple[Member, Member]:
    a = fleet.member("device", "field-a", signer=tpm_backend.get_or_create_signing_key("a"))
    b = fleet.member("device", "field-b", signer=tpm_backend.get_or_create_signing_key("b"))
    return a, b


def revocations(fleet: Fleet, data: bytes, wall: dt.datetime = WALL) -> LastSeenRevocations:
    return LastSeenRevocations.load(data, fleet.trust, CONFIG, clock=lambda: wall)


async def meet(fleet: Fleet, a: Member, b: Member, a_crl: bytes, b_crl: bytes,
               wall: dt.datetime = WALL) -> tuple[Sa1Central, Sa1Peripheral]:
    """Device B waits as a peripheral; device A finds it and opens a session."""
    radio = VirtualRadio()
    responder = Responder(signer=b.signer, credential=b.credential, trust=fleet.trust,
                          params=SessionParams(sealed=True), peer_kind="device")
    peripheral = await Sa1Peripheral(radio.add_device("field-b"), responder,
                                     policy=lambda: NOW,
                                     revoked=revocations(fleet, b_crl, wall)).start("field-b")
    a_radio = radio.add_device("field-a")
    await a_radio.power_on()
    backends = radio.bleak_backends(a_radio)
    found = await scan(gatt.SA1_SERVICE, timeout=5, backends=backends, stop_after=1)
    initiator = Initiator(signer=a.signer, credential=a.credential, trust=fleet.trust,
                          expected_peer=b.identity)
    central = Sa1Central(sa1_link(found[0][0], backends=backends), initiator,
                         policy=lambda: NOW, revoked=revocations(fleet, a_crl, wall))
    return central, peripheral


def test_two_devices_offline_exchange_sealed_messages(fleet: Fleet,
                                                      pair: tuple[Member, Member]) -> None:
    a, b = pair
    fresh = crl(fleet, [], issued=WALL - dt.timedelta(hours=2))

    async def scenario() -> None:
        central, peripheral = await meet(fleet, a, b, fresh, fresh)
        assert await central.open() == b.identity
        await wait_for_async(lambda: peripheral.established(), what="confirmed session")
        session = peripheral.established()[0]
        assert session.peer == a.identity
        await central.send("peer/valve", b"open 30%")
        got = await asyncio.wait_for(session.received.get(), 5)
        assert (got.topic, got.payload) == ("peer/valve", b"open 30%")
        await session.send("peer/valve/state", b"opened")
        assert (await central.receive()).payload == b"opened"
        await central.close()

    run(scenario())


def test_revoked_peer_is_refused_in_both_directions(fleet: Fleet,
                                                    pair: tuple[Member, Member]) -> None:
    a, b = pair
    fresh = crl(fleet, [], issued=WALL - dt.timedelta(hours=2))
    a_revoked = crl(fleet, [a], issued=WALL - dt.timedelta(hours=2))
    b_revoked = crl(fleet, [b], issued=WALL - dt.timedelta(hours=2))

    async def scenario() -> None:
        # B's list says A is revoked: B refuses A's msg1
        central, peripheral = await meet(fleet, a, b, fresh, a_revoked)
        with pytest.raises(ProtocolError) as exc:
            await central.open()
        assert exc.value.reason is Reason.CREDENTIAL_REVOKED
        assert [r.reason for r in peripheral.refusals] == [Reason.CREDENTIAL_REVOKED]
        assert peripheral.established() == []
        await central.close()
        # A's list says B is revoked: A refuses B's msg2 and sends no msg3
        central, peripheral = await meet(fleet, a, b, b_revoked, fresh)
        with pytest.raises(ProtocolError) as exc:
            await central.open()
        assert exc.value.reason is Reason.CREDENTIAL_REVOKED
        assert [r.reason for r in central.refused] == [Reason.CREDENTIAL_REVOKED]
        assert peripheral.established() == []
        await central.close()

    run(scenario())


def test_a_list_older_than_the_configured_staleness_refuses_every_peer(
        fleet: Fleet, pair: tuple[Member, Member]) -> None:
    a, b = pair
    fresh = crl(fleet, [], issued=WALL - dt.timedelta(hours=2))
    stale = crl(fleet, [], issued=WALL - dt.timedelta(hours=30))  # config: 24 h

    async def scenario() -> None:
        central, peripheral = await meet(fleet, a, b, fresh, stale)
        with pytest.raises(ProtocolError) as exc:
            await central.open()
        assert exc.value.reason is Reason.BACKEND_UNAVAILABLE
        assert "beyond the 1 day, 0:00:00 this device accepts" in peripheral.refusals[0].detail
        await central.close()
        central, peripheral = await meet(fleet, a, b, stale, fresh)
        with pytest.raises(ProtocolError) as exc:
            await central.open()
        assert exc.value.reason is Reason.BACKEND_UNAVAILABLE
        assert peripheral.established() == []
        await central.close()

    run(scenario())


def test_a_device_of_another_fleet_is_refused(fleet: Fleet,
                                              pair: tuple[Member, Member]) -> None:
    a, b = pair
    other = Fleet()
    stranger = other.member("device", "field-a", signer=a.signer)  # same name, other root
    fresh = crl(fleet, [], issued=WALL - dt.timedelta(hours=2))

    async def scenario() -> None:
        central, peripheral = await meet(fleet, stranger, b, fresh, fresh)
        with pytest.raises(ProtocolError) as exc:
            await central.open()
        assert exc.value.reason is Reason.UNKNOWN_AUTHORITY
        assert peripheral.established() == []
        await central.close()

    run(scenario())


def test_revocation_list_and_config_are_checked_when_loaded(fleet: Fleet) -> None:
    forged = crl(fleet, [], issued=WALL, key=Fleet().key)
    with pytest.raises(ConfigurationError) as exc:
        LastSeenRevocations.load(forged, fleet.trust, CONFIG)
    assert "not signed by a root of the trust bundle" in exc.value.detail
    good = crl(fleet, [], issued=WALL)
    with pytest.raises(ConfigurationError) as exc:
        LastSeenRevocations.load(good, fleet.trust, {})
    assert "max_crl_age_hours" in exc.value.detail
    with pytest.raises(ConfigurationError):
        LastSeenRevocations.load(b"not a crl", fleet.trust, CONFIG)
