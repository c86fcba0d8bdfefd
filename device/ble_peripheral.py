"""The device's GATT peripheral: a Tessera message service on a bumble ``Device``.

One service = a write characteristic (central -> peripheral fragments), a notify
characteristic (peripheral -> central fragments) and optionally a read-only info
characteristic (see :mod:`structauth.gatt`). Per connection, a
:class:`~structauth.gatt.Reassembler` puts fragments together and a handler made for
that connection gets whole messages, one at a time, in order.

A fragment that does not fit is answered with an ATT error
(:data:`~structauth.gatt.ATT_MALFORMED`) and changes nothing: not the message being
assembled, not the handler's state, not another connection's.

bumble drives the radio: in tests a virtual controller (``simulator.ble``); on a Pi
the board's controller over ``hci-socket:0`` (BlueZ's bluetoothd must leave that
adapter alone: ``btmgmt -i hci0 power off`` then bumble takes it; docs/BLE.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from bumble import att, core, gatt
from bumble.device import Connection, Device

from structauth.errors import MalformedMessage
from structauth.gatt import ATT_BUSY, ATT_MALFORMED, DEFAULT_MAX_MESSAGE, Reassembler, fragment

log = logging.getLogger("tessera.ble")

#: messages a connection may have queued for its handler before writes are refused
MAX_QUEUED = 4


class Channel:
    """What a handler holds: its connection's way back to the central."""

    def __init__(self, service: MessageService, connection: Connection) -> None:
        self._service = service
        self.connection = connection
        self._number = 0
        self.closed = False

    @property
    def mtu(self) -> int:
        return int(self.connection.att_mtu)

    async def send(self, message: bytes) -> None:
        """Notify ``message``, fragmented to this connection's ATT_MTU."""
        if self.closed:
            return
        self._number = (self._number + 1) & 0x3F
        for piece in fragment(message, self._number, self.mtu):
            await self._service.device.notify_subscriber(self.connection, self._service.tx,
                                                         piece)
            self._service.fragments_out += 1

    async def close(self) -> None:
        """End the connection (after a fatal refusal)."""
        if not self.closed:
            self.closed = True
            with contextlib.suppress(core.BaseBumbleError):
                await self.connection.disconnect()


class Handler(Protocol):
    async def on_message(self, message: bytes) -> None: ...

    def on_disconnect(self) -> None: ...


class _Link:
    def __init__(self, channel: Channel, handler: Handler, max_message: int) -> None:
        self.channel = channel
        self.handler = handler
        self.reassembler = Reassembler(max_message)
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None


class MessageService:
    """A Tessera message service on ``device``. ``handler_for(channel)`` makes the
    handler of each new connection."""

    def __init__(
        self,
        device: Device,
        *,
        service_uuid: str,
        rx_uuid: str,
        tx_uuid: str,
        handler_for: Callable[[Channel], Handler],
        info_uuid: str | None = None,
        info: Callable[[], bytes] | None = None,
        max_message: int = DEFAULT_MAX_MESSAGE,
    ) -> None:
        self.device = device
        self.service_uuid = service_uuid
        self.handler_for = handler_for
        self.max_message = max_message
        self._links: dict[int, _Link] = {}
        #: fragments refused with an ATT error, and fragments sent (tests, benchmarks)
        self.refused = 0
        self.fragments_in = 0
        self.fragments_out = 0
        self.rx: gatt.Characteristic[bytes] = gatt.Characteristic(
            rx_uuid,
            gatt.Characteristic.Properties.WRITE
            | gatt.Characteristic.Properties.WRITE_WITHOUT_RESPONSE,
            gatt.Characteristic.WRITEABLE,
            gatt.CharacteristicValue[bytes](write=self._on_write),
        )
        self.tx = gatt.Characteristic(
            tx_uuid, gatt.Characteristic.Properties.NOTIFY, gatt.Characteristic.READABLE, b"")
        characteristics = [self.rx, self.tx]
        if info_uuid is not None and info is not None:
            read_info = info
            characteristics.append(gatt.Characteristic(
                info_uuid, gatt.Characteristic.Properties.READ, gatt.Characteristic.READABLE,
                gatt.CharacteristicValue(read=lambda _conn: read_info())))
        device.add_service(gatt.Service(service_uuid, characteristics))
        device.on("connection", self._on_connection)

    @property
    def connections(self) -> int:
        return len(self._links)

    def _on_connection(self, connection: Connection) -> None:
        channel = Channel(self, connection)
        link = _Link(channel, self.handler_for(channel), self.max_message)
        self._links[connection.handle] = link
        link.task = asyncio.get_running_loop().create_task(self._serve(link))
        connection.on("disconnection", lambda *_: self._on_disconnection(connection))

    def _on_disconnection(self, connection: Connection) -> None:
        link = self._links.pop(connection.handle, None)
        if link is None:
            return
        link.channel.closed = True
        if link.task is not None:
            link.task.cancel()
        link.handler.on_disconnect()

    def _on_write(self, connection: Connection, value: bytes) -> None:
        link = self._links.get(connection.handle)
        if link is None:  # pragma: no cover - bumble reports connections first
            raise att.ATT_Error(ATT_MALFORMED)
        if link.queue.qsize() >= MAX_QUEUED:
            self.refused += 1
            raise att.ATT_Error(ATT_BUSY)
        try:
            message = link.reassembler.feed(bytes(value))
        except MalformedMessage as exc:
            self.refused += 1
            log.info("refused a GATT write from %s: %s", connection.peer_address, exc.detail)
            raise att.ATT_Error(ATT_MALFORMED, message=exc.detail) from None
        self.fragments_in += 1
        if message is not None:
            link.queue.put_nowait(message)

    async def _serve(self, link: _Link) -> None:
        while True:
            message = await link.queue.get()
            try:
                await link.handler.on_message(message)
            except asyncio.CancelledError:
                raise
            except Exception:  # a handler bug must not take the radio down
                log.exception("handler failed on a %d-byte message", len(message))
                await link.channel.close()
                return


def advertising_data(service_uuid: str, name: str) -> bytes:
    """Flags, the service's 128-bit UUID and as much of ``name`` as fits in 31 bytes
    (the serial's start: a hint for the operator; the device's info is authoritative)."""
    room = 31 - 3 - 18 - 2
    raw = name.encode()
    kind = (core.AdvertisingData.COMPLETE_LOCAL_NAME if len(raw) <= room
            else core.AdvertisingData.SHORTENED_LOCAL_NAME)
    return bytes(core.AdvertisingData([
        (core.AdvertisingData.FLAGS, bytes([0x06])),
        (core.AdvertisingData.COMPLETE_LIST_OF_128_BIT_SERVICE_CLASS_UUIDS,
         core.UUID(service_uuid).to_bytes()),
        (kind, raw[:room]),
    ]))


class Advertiser:
    """Advertises one service until :meth:`stop`, again after every connection (a
    peripheral stops advertising when a central connects; going on lets a second
    station, or another device, connect too)."""

    def __init__(self, device: Device, data: bytes, interval_ms: float) -> None:
        self.device = device
        self.data = data
        self.interval_ms = interval_ms
        self.stopped = False

    async def _advertise(self) -> None:
        if self.stopped:
            return
        with contextlib.suppress(core.BaseBumbleError):
            await self.device.start_advertising(
                advertising_data=self.data, advertising_interval_min=self.interval_ms,
                advertising_interval_max=self.interval_ms)

    def _again(self, _connection: Connection) -> None:
        if not self.stopped and not self.device.is_advertising:
            asyncio.get_running_loop().create_task(self._advertise())

    async def start(self) -> Advertiser:
        self.device.on("connection", self._again)
        await self._advertise()
        return self

    async def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        self.device.remove_listener("connection", self._again)
        with contextlib.suppress(core.BaseBumbleError):
            await self.device.stop_advertising()


async def start(device: Device, service_uuid: str, name: str, *, max_mtu: int = 247,
                interval_ms: float = 100.0) -> Advertiser:
    """Power the device on and advertise ``service_uuid`` until the returned
    advertiser is stopped. ``max_mtu``: the largest ATT_MTU this device grants."""
    device.gatt_server.max_mtu = max_mtu
    await device.power_on()
    return await Advertiser(device, advertising_data(service_uuid, name), interval_ms).start()


Sender = Callable[[bytes], Awaitable[None]]
__all__ = ["Advertiser", "Channel", "Handler", "MessageService", "advertising_data", "start"]
