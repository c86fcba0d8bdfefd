"""BLE enrollment at the factory on the virtual radio: the station (bleak over a bumble
virtual controller) runs the TPM enrollment against the real provisioning service
(authority key in SoftHSM2) with devices whose TPMs are swtpm instances, and the
attacks the issue names: a rogue device, a relay, replays, an attacking central,
malformed writes, a dropped link."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from device.ble_central import GattLink, LinkError
from device.ble_enrollment import (
    MAX_BINDING_FAILURES,
    EnrollmentDevice,
    EnrollmentPeripheral,
    store_enrollment,
)
from device.ble_peripheral import Channel, MessageService
from device.ble_peripheral import start as advertise
from device.provisioner import LocalTpm, ProvisionerClient
from hw.tpm import TpmBackend
from provisioning.ble_station import BleStation
from simulator.ble import VirtualRadio
from simulator.provisioner import ProvisioningServer
from simulator.softhsm import SoftHsm
from simulator.swtpm import Swtpm
from structauth import gatt
from structauth.errors import EnrollmentError, ProtocolError, Reason

pytestmark = pytest.mark.hardware

CODE = "7K3QD-M9XPA"
OTHER_CODE = "J4HNW-2ZRTB"


def run(coro: Awaitable[Any], timeout: float = 50) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def second_tpm() -> Iterator[Swtpm]:
    tpm = Swtpm().start()
    try:
        yield tpm
    finally:
        tpm.close()


@pytest.fixture
def service(tmp_path: Path, softhsm: SoftHsm, swtpm_session: Swtpm,
            second_tpm: Swtpm) -> Iterator[ProvisioningServer]:
    server = ProvisioningServer(
        tmp_path / "authority", softhsm,
        maker_roots=[*swtpm_session.manufacturer_ca_paths, *second_tpm.manufacturer_ca_paths])
    with server:
        yield server


def registered(service: ProvisioningServer) -> list[str]:
    done = service.cli("--json", "list", check=True)
    return [d["serial"] for d in json.loads(done.stdout)]


@dataclass
class Unit:
    """A device under test: its TPM, state directory, enrollment and peripheral."""

    backend: TpmBackend
    state: Path
    enrollment: EnrollmentDevice
    peripheral: EnrollmentPeripheral


class Factory:
    def __init__(self, tmp: Path, service: ProvisioningServer, *, interval: float = 0.0
                 ) -> None:
        self.tmp = tmp
        self.service = service
        self.radio = VirtualRadio(interval)
        self.backends_open: list[TpmBackend] = []
        self.client = ProvisionerClient(service.url, operator_token=service.operator_token)

    async def device(self, tpm: Swtpm, serial: str, code: str = CODE, *, mtu: int = 247,
                     name: str | None = None) -> Unit:
        state = self.tmp / f"{serial}-{len(self.backends_open)}"
        backend = TpmBackend(tpm.tcti, state / "keys")
        self.backends_open.append(backend)
        enrollment = EnrollmentDevice(
            LocalTpm(backend), serial, code,
            store_enrollment(state, tcti=tpm.tcti, key_dir=str(state / "keys"), serial=serial))
        peripheral = EnrollmentPeripheral(self.radio.add_device(name or serial), enrollment)
        await peripheral.start(max_mtu=mtu, interval_ms=20)
        return Unit(backend, state, enrollment, peripheral)

    async def station(self, *, mtu: int = 247, **kwargs: Any) -> BleStation:
        central = self.radio.add_device("station")
        await central.power_on()
        return BleStation(self.client, backends=self.radio.bleak_backends(central, mtu=mtu),
                          **kwargs)

    async def central(self, name: str = "attacker") -> Any:
        dev = self.radio.add_device(name)
        await dev.power_on()
        return self.radio.bleak_backends(dev)

    def close(self) -> None:
        for backend in self.backends_open:
            backend.close()


@pytest.fixture
def factory(tmp_path: Path, service: ProvisioningServer) -> Iterator[Factory]:
    f = Factory(tmp_path, service)
    try:
        yield f
    finally:
        f.close()


async def only_device(station: BleStation) -> Any:
    found = await station.scan(timeout=5, stop_after=1)
    assert len(found) == 1, found
    return found[0]


# -- the exchange ------------------------------------------------------------------------


@pytest.mark.parametrize("mtu", [23, 247])
def test_enroll_over_ble(factory: Factory, swtpm_session: Swtpm, mtu: int) -> None:
    async def scenario() -> None:
        unit = await factory.device(swtpm_session, "ble-0001", mtu=mtu)
        station = await factory.station(mtu=247)
        done = await station.enroll(await only_device(station), serial="ble-0001", code=CODE)
        assert done.mtu == mtu
        assert done.issued["attestation"] == "tpm-attested"
        assert done.issued["identity"].endswith("/device/ble-0001")
        assert unit.enrollment.enrolled.is_set()
        stored = (unit.state / "operational.pem").read_text()
        assert stored == done.issued["operational_credential"]
        agent = json.loads((unit.state / "agent.json").read_text())
        assert agent["serial"] == "ble-0001" and agent["provisioner"] == factory.service.url
        # every fragment fit the negotiated MTU: at 23 there are many more
        assert done.timing.fragments > (150 if mtu == 23 else 15)
        assert unit.peripheral.service.refused == 0
        # an enrolled device no longer offers enrollment
        assert await station.scan(timeout=0.5) == []

    run(scenario())
    assert registered(factory.service) == ["ble-0001"]


def test_wrong_serial_is_not_enrolled(factory: Factory, swtpm_session: Swtpm) -> None:
    async def scenario() -> None:
        unit = await factory.device(swtpm_session, "ble-0002")
        station = await factory.station()
        with pytest.raises(EnrollmentError) as exc:
            await station.enroll(await only_device(station), serial="ble-9999", code=CODE)
        assert exc.value.reason is Reason.WRONG_IDENTITY
        assert "ble-0002, not ble-9999" in exc.value.detail
        assert not unit.enrollment.enrolled.is_set()

    run(scenario())
    assert registered(factory.service) == []


# -- attacking peripherals -------------------------------------------------------------------


def test_rogue_device_with_a_genuine_tpm_is_not_enrolled(factory: Factory,
                                                         second_tpm: Swtpm) -> None:
    """A rogue device in range with a genuine TPM claims the serial the operator is
    enrolling, but does not know the code on that device's label: refused before its
    evidence reaches the service; nothing is registered, nothing is delivered."""
    async def scenario() -> None:
        rogue = await factory.device(second_tpm, "ble-0003", code=OTHER_CODE)
        station = await factory.station()
        with pytest.raises(EnrollmentError) as exc:
            await station.enroll(await only_device(station), serial="ble-0003", code=CODE)
        assert exc.value.reason is Reason.WRONG_IDENTITY
        assert "does not know the code" in exc.value.detail
        assert not rogue.enrollment.enrolled.is_set()
        assert not (rogue.state / "operational.pem").exists()

    run(scenario())
    assert registered(factory.service) == []


class Relay:
    """An attacking peripheral that relays every step to a genuine device (over its
    own central connection) and can pretend to be another serial; it records the
    device's answers."""

    def __init__(self, factory: Factory, backends: Any, target: Any, claim: str | None) -> None:
        self.device = factory.radio.add_device("relay")
        self.backends = backends
        self.target = target
        self.claim = claim
        self.answers: list[bytes] = []
        self.service = MessageService(self.device, service_uuid=gatt.ENROLL_SERVICE,
                                      rx_uuid=gatt.ENROLL_RX, tx_uuid=gatt.ENROLL_TX,
                                      handler_for=self._handler)

    async def connect(self) -> None:
        """Connect to the genuine device now (before it goes out of the station's range)."""
        self.upstream = await GattLink(self.target, rx_uuid=gatt.ENROLL_RX,
                                       tx_uuid=gatt.ENROLL_TX, backends=self.backends).connect()

    def _handler(self, channel: Channel) -> Any:
        relay = self

        class Forward:
            async def on_message(self, message: bytes) -> None:
                await relay.upstream.send(message)
                answer = await relay.upstream.receive(30)
                relay.answers.append(answer)
                if relay.claim:
                    msg = json.loads(answer)
                    if msg.get("op") == "device":
                        msg["serial"] = relay.claim
                        answer = gatt.encode_json(msg)
                await channel.send(answer)

            def on_disconnect(self) -> None:
                pass

        return Forward()

    async def start(self, name: str) -> None:
        self.advertiser = await advertise(self.device, gatt.ENROLL_SERVICE, name, interval_ms=20)


def test_relay_to_another_genuine_device_is_refused(factory: Factory, swtpm_session: Swtpm,
                                                    second_tpm: Swtpm) -> None:
    """The operator enrolls ble-0004 (label code CODE). A relay in range answers as
    ble-0004 but forwards every step to another genuine device (ble-0005, its own
    label code): the TPM evidence is genuine, the binding is not for this label."""
    async def scenario() -> None:
        elsewhere = await factory.device(second_tpm, "ble-0005", code=OTHER_CODE,
                                         name="far-away")
        relay_backends = await factory.central("relay-central")
        found = await (await factory.station()).scan(timeout=5, stop_after=1)
        relay = Relay(factory, relay_backends, found[0], claim="ble-0004")
        await relay.connect()
        await relay.start("ble-0004")
        await elsewhere.peripheral.advertiser.stop()  # type: ignore[union-attr]  # out of range
        station = await factory.station()
        target = await only_device(station)
        assert target.address == str(relay.device.public_address).split("/")[0]
        with pytest.raises(EnrollmentError) as exc:
            await station.enroll(target, serial="ble-0004", code=CODE)
        assert exc.value.reason is Reason.WRONG_IDENTITY
        assert not elsewhere.enrollment.enrolled.is_set()

    run(scenario())
    assert registered(factory.service) == []


def test_replayed_device_answers_are_refused_by_the_station(factory: Factory,
                                                            swtpm_session: Swtpm) -> None:
    """A genuine enrollment is recorded through a relay; later a rogue peripheral
    replays the device's recorded answers (same serial, a binding made with the right
    code) to a station: the binding covers the station's fresh nonce, and refuses."""
    async def scenario() -> None:
        genuine = await factory.device(swtpm_session, "ble-0006")
        relay_backends = await factory.central("relay-central")
        found = await (await factory.station()).scan(timeout=5, stop_after=1)
        relay = Relay(factory, relay_backends, found[0], claim=None)
        await relay.connect()
        await relay.start("ble-0006")
        await genuine.peripheral.advertiser.stop()  # type: ignore[union-attr]
        station = await factory.station()
        await station.enroll(await only_device(station), serial="ble-0006", code=CODE)
        assert genuine.enrollment.enrolled.is_set()
        recorded = list(relay.answers)
        assert [json.loads(a)["op"] for a in recorded] == ["device", "evidence", "secret",
                                                           "stored"]
        await relay.advertiser.stop()

        replayer = factory.radio.add_device("replayer")
        answers = iter(recorded)

        class Replay:
            def __init__(self, channel: Channel) -> None:
                self.channel = channel

            async def on_message(self, message: bytes) -> None:
                await self.channel.send(next(answers))

            def on_disconnect(self) -> None:
                pass

        MessageService(replayer, service_uuid=gatt.ENROLL_SERVICE, rx_uuid=gatt.ENROLL_RX,
                       tx_uuid=gatt.ENROLL_TX, handler_for=Replay)
        await advertise(replayer, gatt.ENROLL_SERVICE, "ble-0006", interval_ms=20)
        station2 = await factory.station()
        with pytest.raises(EnrollmentError) as exc:
            await station2.enroll(await only_device(station2), serial="ble-0006", code=CODE,
                                  reenroll=True)
        assert exc.value.reason is Reason.WRONG_IDENTITY

    run(scenario())
    assert registered(factory.service) == ["ble-0006"]


def test_silent_peripheral_times_out(factory: Factory) -> None:
    async def scenario() -> None:
        mute = factory.radio.add_device("mute")

        class Mute:
            def __init__(self, channel: Channel) -> None:
                pass

            async def on_message(self, message: bytes) -> None:
                pass

            def on_disconnect(self) -> None:
                pass

        MessageService(mute, service_uuid=gatt.ENROLL_SERVICE, rx_uuid=gatt.ENROLL_RX,
                       tx_uuid=gatt.ENROLL_TX, handler_for=Mute)
        await advertise(mute, gatt.ENROLL_SERVICE, "mute", interval_ms=20)
        station = await factory.station(step_timeout=0.5)
        with pytest.raises(LinkError) as exc:
            await station.enroll(await only_device(station), serial="mute", code=CODE)
        assert "no answer within 0.5 s" in exc.value.detail

    run(scenario())


# -- attacking centrals ----------------------------------------------------------------------


def test_attacking_central_changes_nothing(factory: Factory, swtpm_session: Swtpm) -> None:
    """A central that does not know the label code: malformed fragments get an ATT
    error; credentials with a wrong binding, a replayed delivery, a step before hello
    are refused with their reasons; after MAX_BINDING_FAILURES the device refuses even
    a correct delivery until it restarts. Nothing is stored throughout; a genuine
    station then enrolls a device that was left alone."""
    async def scenario() -> None:
        unit = await factory.device(swtpm_session, "ble-0007")
        backends = await factory.central()
        target = (await (await factory.station()).scan(timeout=5, stop_after=1))[0]
        link = await GattLink(target, rx_uuid=gatt.ENROLL_RX, tx_uuid=gatt.ENROLL_TX,
                              backends=backends).connect()
        for junk in (b"\x00", bytes((0x01, 5)) + b"{}",
                     bytes((0x80, 0)) + (1 << 20).to_bytes(3, "big") + b"{"):
            with pytest.raises(ProtocolError) as perr:
                await link.write_raw(junk)
            assert perr.value.reason is Reason.MALFORMED
        assert unit.peripheral.service.refused == 3

        async def step(message: dict[str, Any]) -> dict[str, Any]:
            await link.send(gatt.encode_json(message))
            answer: dict[str, Any] = json.loads(await link.receive(10))
            return answer

        early = await step({"op": "activate", "challenge": {}})
        assert (early["op"], early["code"]) == ("error", int(Reason.INVALID_STATE))
        hello = await step({"op": "hello"})
        assert hello["serial"] == "ble-0007"
        forged = {"op": "credentials", "station_nonce": "A" * 22 + "==",
                  "issued": {"identity": "spiffe://evil/device/ble-0007"},
                  "binding": "B" * 43 + "="}
        for _ in range(MAX_BINDING_FAILURES):
            answer = await step(forged)
            assert (answer["op"], answer["code"]) == ("error", int(Reason.NOT_AUTHORIZED))
        assert unit.enrollment.binding_failures == MAX_BINDING_FAILURES
        assert not unit.enrollment.enrolled.is_set()
        assert not (unit.state / "operational.pem").exists()
        assert not (unit.state / "agent.json").exists()
        await link.close()

    run(scenario())
    assert registered(factory.service) == []


def test_replayed_delivery_is_refused_by_the_device(factory: Factory,
                                                   swtpm_session: Swtpm) -> None:
    """A recorded credentials delivery replayed to the same device (after a factory
    reset) on a new connection: its binding covers the old connection's nonce."""
    async def scenario() -> None:
        first = await factory.device(swtpm_session, "ble-0008")
        station = await factory.station()
        sent: list[bytes] = []
        original = GattLink.send

        async def recording(self: GattLink, message: bytes) -> None:
            sent.append(message)
            await original(self, message)

        GattLink.send = recording  # type: ignore[method-assign]
        try:
            await station.enroll(await only_device(station), serial="ble-0008", code=CODE)
        finally:
            GattLink.send = original  # type: ignore[method-assign]
        delivery = next(m for m in sent if json.loads(m)["op"] == "credentials")
        await first.peripheral.advertiser.stop()  # type: ignore[union-attr]

        # the same TPM and label after a factory reset: a fresh state directory
        reset = await factory.device(swtpm_session, "ble-0008")
        target = (await (await factory.station()).scan(timeout=5, stop_after=1))[0]
        link = await GattLink(target, rx_uuid=gatt.ENROLL_RX, tx_uuid=gatt.ENROLL_TX,
                              backends=await factory.central()).connect()
        await link.send(gatt.encode_json({"op": "hello"}))
        await link.receive(10)
        await link.send(delivery)
        answer = json.loads(await link.receive(10))
        assert (answer["op"], answer["code"]) == ("error", int(Reason.NOT_AUTHORIZED))
        assert not reset.enrollment.enrolled.is_set()
        assert not (reset.state / "operational.pem").exists()
        await link.close()

    run(scenario())


# -- a dropped link, and resuming ------------------------------------------------------------


def test_dropped_link_is_reconnected_and_an_interrupted_run_resumes(
        factory: Factory, swtpm_session: Swtpm, tmp_path: Path) -> None:
    """The radio drops the link when the credentials arrive (the device's controller
    disconnects). A station with retries reconnects and delivers; one without gives up
    and keeps the issued credentials, which the next run delivers without a second
    enrollment at the service."""
    async def scenario() -> None:
        unit = await factory.device(swtpm_session, "ble-0009")
        drops = {"left": 1}
        handler_for = unit.peripheral.service.handler_for

        def dropping(channel: Channel) -> Any:
            inner = handler_for(channel)

            class Dropper:
                async def on_message(self, message: bytes) -> None:
                    if json.loads(message).get("op") == "credentials" and drops["left"]:
                        drops["left"] -= 1
                        await channel.close()  # the link is gone mid-delivery
                        return
                    await inner.on_message(message)

                def on_disconnect(self) -> None:
                    inner.on_disconnect()

            return Dropper()

        unit.peripheral.service.handler_for = dropping
        resume = tmp_path / "resume"
        quitter = await factory.station(retries=0, resume_dir=resume, step_timeout=5)
        target = await only_device(quitter)
        with pytest.raises(LinkError):
            await quitter.enroll(target, serial="ble-0009", code=CODE)
        assert (resume / "ble-0009.json").exists()
        assert not unit.enrollment.enrolled.is_set()

        drops["left"] = 1  # and once more: this station reconnects
        patient = await factory.station(retries=2, resume_dir=resume, step_timeout=5)
        done = await patient.enroll(target, serial="ble-0009", code=CODE)
        assert done.resumed
        assert unit.enrollment.enrolled.is_set()
        assert not (resume / "ble-0009.json").exists()
        assert (unit.state / "operational.pem").read_text() == \
            done.issued["operational_credential"]

    run(scenario())
    assert registered(factory.service) == ["ble-0009"]
