"""A virtual Bluetooth LE radio: bumble controllers on one local link, and a bleak
backend over a bumble device, so that code written against bleak's public API (the
factory station, the gateway) runs with no Bluetooth hardware.

Why a bleak backend of our own: bleak selects a platform backend (BlueZ over D-Bus on
Linux) unless ``BleakScanner(..., backend=)`` / ``BleakClient(..., backend=)`` name
another class, and neither bleak nor bumble ships a backend that drives a bumble
``Device``. :func:`bleak_backends` builds one from bleak's public backend base classes
(``BaseBleakScanner``, ``BaseBleakClient``): scanning is bumble's scanning, GATT
operations are bumble's GATT client, errors are bleak's (``BleakGATTProtocolError``
with the ATT error code). The station and gateway code above it is the code that runs
on a Pi with BlueZ, where ``backend=None`` lets bleak pick BlueZ.

The radio: every device (each device under test, the station, the gateway, an
attacker) gets its own bumble ``Controller`` on the shared :class:`TimedLink`, and every
peer-to-peer exchange is its own LE connection (one link per device). ``TimedLink``
delays each packet to the next connection event of a configurable connection interval
plus its air time at the PHY's bit rate, so that benchmarks see BLE-like latency;
``interval=0`` (the default for tests) delivers at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import math
import uuid as uuidlib
from collections.abc import Callable
from typing import Any

from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.client import BaseBleakClient, NotifyCallback
from bleak.backends.descriptor import BleakGATTDescriptor
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData, BaseBleakScanner
from bleak.backends.service import BleakGATTService, BleakGATTServiceCollection
from bleak.exc import BleakDeviceNotFoundError, BleakError, BleakGATTProtocolError
from bumble import att, core, gatt, hci
from bumble.controller import Controller
from bumble.device import Connection, Device, Peer
from bumble.host import Host
from bumble.link import LocalLink
from bumble.transport.common import AsyncPipeSink

#: bits per second of the LE 1M PHY, and the bytes a link-layer packet adds on air
PHY_1M = 1_000_000
_AIR_OVERHEAD = 14  # preamble, access address, header, MIC-less CRC
_Due = tuple[float, Callable[[], None]]


class TimedLink(LocalLink):
    """bumble's LocalLink with BLE timing: a packet leaves at the next connection
    event (multiples of ``interval`` seconds), or right after the packet before it in
    the same event (at most ``per_event`` packets per event and direction), and arrives
    after its air time. Order per direction is kept."""

    def __init__(self, interval: float = 0.0, bitrate: int = PHY_1M,
                 per_event: int = 6) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.interval = interval
        self.bitrate = bitrate
        #: packets one direction sends in one connection event (controllers cap the
        #: event length; 4 to 8 is what phones and Pi-class controllers do)
        self.per_event = per_event
        self._free: dict[tuple[int, int], float] = {}
        self._in_event: dict[tuple[int, int], int] = {}
        self._queues: dict[tuple[int, int], collections.deque[_Due]] = {}
        #: seconds of air time and packets carried (benchmarks read these)
        self.air_time = 0.0
        self.packets = 0

    def send_acl_data(self, sender: Controller, destination_address: hci.Address,
                      transport: core.PhysicalTransport, data: bytes) -> None:
        self.packets += 1
        airtime = (len(data) + _AIR_OVERHEAD) * 8 / self.bitrate
        self.air_time += airtime
        if self.interval <= 0:
            super().send_acl_data(sender, destination_address, transport, data)
            return
        destination = self.find_le_controller(destination_address)
        if destination is None:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        key = (id(sender), id(destination))
        free = self._free.get(key, 0.0)
        if free > now and self._in_event.get(key, 0) < self.per_event:
            due = free + airtime  # the same connection event goes on
            self._in_event[key] = self._in_event.get(key, 0) + 1
        else:
            start = max(now, free)
            due = math.ceil(start / self.interval) * self.interval + airtime
            if due - airtime <= free:  # that event is full: the next one
                due += self.interval
            self._in_event[key] = 1
        self._free[key] = due
        source = sender.random_address
        queue = self._queues.setdefault(key, collections.deque())
        queue.append((due, lambda: destination.on_link_acl_data(source, transport, data)))
        loop.call_at(due, self._flush, key)

    def _flush(self, key: tuple[int, int]) -> None:
        queue = self._queues.get(key)
        now = asyncio.get_running_loop().time()
        while queue and queue[0][0] <= now + 1e-9:
            queue.popleft()[1]()


class VirtualRadio:
    """The air: one :class:`TimedLink`, one controller per device."""

    def __init__(self, interval: float = 0.0) -> None:
        self.link = TimedLink(interval)
        self._numbers = itertools.count(1)
        self.devices: list[Device] = []
        self.controllers: list[Controller] = []

    def add_device(self, name: str) -> Device:
        n = next(self._numbers)
        address = ":".join([f"{(n >> 8) & 0xFF:02X}", f"{n & 0xFF:02X}", "7E", "55", "C0", "C0"])
        controller = Controller(name, link=self.link, public_address=address)
        device = Device(name=name, address=hci.Address(address),
                        host=Host(controller, AsyncPipeSink(controller)))
        self.devices.append(device)
        return device

    async def serve_controller(self, spec: str, name: str = "hci") -> Any:
        """A controller on this radio for a host in another process, over a bumble HCI
        transport (e.g. ``tcp-server:127.0.0.1:PORT``; the host then opens
        ``tcp-client:127.0.0.1:PORT``): the code under test talks HCI to it as to a
        Pi's controller. Returns the transport (close() it)."""
        from bumble.transport import open_transport

        transport = await open_transport(spec)
        n = next(self._numbers)
        address = ":".join([f"{(n >> 8) & 0xFF:02X}", f"{n & 0xFF:02X}", "7E", "55", "C0", "C1"])
        self.controllers.append(Controller(name, host_source=transport.source,
                                           host_sink=transport.sink, link=self.link,
                                           public_address=address))
        return transport

    def bleak_backends(self, central: Device, *, mtu: int = 247
                       ) -> tuple[type[BaseBleakScanner], type[BaseBleakClient]]:
        return bleak_backends(central, mtu=mtu)


# -- the bleak backend ---------------------------------------------------------------


def _uuid_str(u: core.UUID) -> str:
    """bleak's form of a UUID: 128-bit, lower case, with dashes."""
    return str(uuidlib.UUID(bytes=bytes(reversed(u.to_bytes(force_128=True)))))


_PROPERTIES = {
    gatt.Characteristic.Properties.BROADCAST: "broadcast",
    gatt.Characteristic.Properties.READ: "read",
    gatt.Characteristic.Properties.WRITE_WITHOUT_RESPONSE: "write-without-response",
    gatt.Characteristic.Properties.WRITE: "write",
    gatt.Characteristic.Properties.NOTIFY: "notify",
    gatt.Characteristic.Properties.INDICATE: "indicate",
}


class BumbleScanner(BaseBleakScanner):
    """Scanning with a bumble device (the class is bound to one by :func:`bleak_backends`)."""

    central: Device

    def __init__(self, detection_callback: Any, service_uuids: list[str] | None,
                 scanning_mode: str = "active", **kwargs: Any) -> None:
        super().__init__(detection_callback, service_uuids)
        self._listening = False

    def _on_advertisement(self, adv: Any) -> None:
        data = adv.data
        uuids: list[str] = []
        for kind in (core.AdvertisingData.COMPLETE_LIST_OF_128_BIT_SERVICE_CLASS_UUIDS,
                     core.AdvertisingData.INCOMPLETE_LIST_OF_128_BIT_SERVICE_CLASS_UUIDS,
                     core.AdvertisingData.COMPLETE_LIST_OF_16_BIT_SERVICE_CLASS_UUIDS):
            for value in data.get_all(kind):
                uuids += [_uuid_str(u) for u in (value if isinstance(value, list) else [value])]
        if not self.is_allowed_uuid(uuids):
            return
        name = data.get(core.AdvertisingData.COMPLETE_LOCAL_NAME) or data.get(
            core.AdvertisingData.SHORTENED_LOCAL_NAME)
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        manufacturer: dict[int, bytes] = {}
        for value in data.get_all(core.AdvertisingData.MANUFACTURER_SPECIFIC_DATA):
            company, payload = value
            manufacturer[int(company)] = bytes(payload)
        advertisement = AdvertisementData(
            local_name=name, manufacturer_data=manufacturer, service_data={},
            service_uuids=uuids, tx_power=None, rssi=int(adv.rssi), platform_data=(adv,))
        address = str(adv.address).split("/")[0]
        device = self.create_or_update_device(address, address, name, adv.address, advertisement)
        self.call_detection_callbacks(device, advertisement)

    async def start(self) -> None:
        self.seen_devices = {}
        if not self._listening:
            self.central.on("advertisement", self._on_advertisement)
            self._listening = True
        await self.central.start_scanning(filter_duplicates=False)

    async def stop(self) -> None:
        if self._listening:
            self.central.remove_listener("advertisement", self._on_advertisement)
            self._listening = False
        await self.central.stop_scanning()


class BumbleClient(BaseBleakClient):
    """A GATT client connection made by a bumble device (bound by :func:`bleak_backends`)."""

    central: Device
    mtu_request: int = 247

    def __init__(self, address_or_ble_device: BLEDevice | str, **kwargs: Any) -> None:
        super().__init__(address_or_ble_device,
                         disconnected_callback=kwargs.get("disconnected_callback"),
                         timeout=kwargs.get("timeout", 10.0))
        details = address_or_ble_device.details if isinstance(
            address_or_ble_device, BLEDevice) else None
        self._target = details if isinstance(details, hci.Address) else hci.Address(
            str(address_or_ble_device if isinstance(address_or_ble_device, str)
                else address_or_ble_device.address))
        self._connection: Connection | None = None
        self._peer: Peer | None = None
        self._subscribers: dict[int, Callable[[bytes], None]] = {}
        #: BleakClient(services=...): discover only these (as BlueZ does with its cache
        #: and CoreBluetooth with discoverServices:), which saves round trips
        wanted = kwargs.get("services")
        self._wanted: list[str] | None = sorted(wanted) if wanted else None

    @property
    def name(self) -> str:
        return str(self.address)

    @property
    def mtu_size(self) -> int:
        return int(self._connection.att_mtu) if self._connection is not None else 23

    @property
    def is_connected(self) -> bool:
        return self._connection is not None

    async def connect(self, pair: bool, **kwargs: Any) -> None:
        try:
            connection = await asyncio.wait_for(self.central.connect(self._target),
                                                self._timeout)
        except (TimeoutError, core.BaseBumbleError) as exc:
            raise BleakDeviceNotFoundError(str(self.address), f"cannot connect: {exc}") from None
        self._connection = connection
        connection.on("disconnection", self._on_disconnection)
        peer = Peer(connection)
        self._peer = peer
        # BlueZ and CoreBluetooth exchange the MTU on their own when connecting
        if self.mtu_request > 23:
            await peer.request_mtu(self.mtu_request)
        if self._wanted is None:
            await peer.discover_all()  # type: ignore[no-untyped-call]
        else:
            for wanted in self._wanted:
                for service in await peer.discover_service(core.UUID(wanted)):
                    await peer.discover_characteristics(service=service)
                    for char in service.characteristics:
                        await peer.discover_descriptors(characteristic=char)
        self.services = self._collection(peer)

    def _on_disconnection(self, *args: Any) -> None:
        self._connection = None
        self._peer = None
        if self._disconnected_callback is not None:
            self._disconnected_callback()

    def _collection(self, peer: Peer) -> BleakGATTServiceCollection:
        collection = BleakGATTServiceCollection()
        for service in peer.services:
            bs = BleakGATTService(service, service.handle, _uuid_str(service.uuid))
            collection.add_service(bs)
            for char in service.characteristics:
                props = [name for flag, name in _PROPERTIES.items() if char.properties & flag]
                bc = BleakGATTCharacteristic(
                    char, char.handle, _uuid_str(char.uuid), props,  # type: ignore[arg-type]
                    lambda: self.mtu_size - 3, bs)
                collection.add_characteristic(bc)
                for desc in char.descriptors:
                    collection.add_descriptor(BleakGATTDescriptor(
                        desc, desc.handle, _uuid_str(desc.type), bc))
        return collection

    def _require(self) -> Peer:
        if self._peer is None:
            raise BleakError("Not connected")
        return self._peer

    async def disconnect(self) -> None:
        connection = self._connection
        if connection is not None:
            with contextlib.suppress(core.BaseBumbleError):
                await connection.disconnect()
            self._connection = None
            self._peer = None

    async def pair(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("Tessera does not pair: security rests on the protocol")

    async def unpair(self) -> None:
        raise NotImplementedError("Tessera does not pair")

    async def read_gatt_char(self, characteristic: BleakGATTCharacteristic, *,
                             use_cached: bool = False, **kwargs: Any) -> bytearray:
        try:
            return bytearray(await self._require().read_value(characteristic.handle))
        except att.ATT_Error as exc:
            raise BleakGATTProtocolError(exc.error_code) from None

    async def read_gatt_descriptor(self, descriptor: BleakGATTDescriptor, *,
                                   use_cached: bool = False, **kwargs: Any) -> bytearray:
        try:
            return bytearray(await self._require().read_value(descriptor.handle))
        except att.ATT_Error as exc:
            raise BleakGATTProtocolError(exc.error_code) from None

    async def write_gatt_char(self, characteristic: BleakGATTCharacteristic, data: Any,
                              response: bool) -> None:
        try:
            await self._require().write_value(characteristic.handle, bytes(data),
                                              with_response=response)
        except att.ATT_Error as exc:
            raise BleakGATTProtocolError(exc.error_code) from None

    async def write_gatt_descriptor(self, descriptor: BleakGATTDescriptor, data: Any) -> None:
        try:
            await self._require().write_value(descriptor.handle, bytes(data),
                                              with_response=True)
        except att.ATT_Error as exc:
            raise BleakGATTProtocolError(exc.error_code) from None

    async def start_notify(self, characteristic: BleakGATTCharacteristic,
                           callback: NotifyCallback, **kwargs: Any) -> None:
        def deliver(value: bytes) -> None:
            callback(bytearray(value))

        self._subscribers[characteristic.handle] = deliver
        await self._require().subscribe(characteristic.obj, deliver)

    async def stop_notify(self, characteristic: BleakGATTCharacteristic) -> None:
        deliver = self._subscribers.pop(characteristic.handle, None)
        await self._require().unsubscribe(characteristic.obj, deliver)


def bleak_backends(central: Device, *, mtu: int = 247
                   ) -> tuple[type[BaseBleakScanner], type[BaseBleakClient]]:
    """bleak backend classes (scanner, client) bound to the bumble device ``central``;
    pass them as ``BleakScanner(backend=...)`` and ``BleakClient(backend=...)``.
    ``mtu``: the ATT_MTU the client asks for when it connects (the peripheral may
    grant less)."""
    scanner = type("BumbleScannerBound", (BumbleScanner,), {"central": central})
    client = type("BumbleClientBound", (BumbleClient,),
                  {"central": central, "mtu_request": mtu})
    return scanner, client


__all__ = ["BumbleClient", "BumbleScanner", "TimedLink", "VirtualRadio", "bleak_backends"]
