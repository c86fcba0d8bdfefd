"""The GATT central's side of a Tessera message service, on bleak's public API.

:class:`GattLink` connects to one peripheral, subscribes to its notify
characteristic, and then sends and receives whole messages: fragmented to the
negotiated ATT_MTU, each fragment a write with response (so an ATT error comes back
for a fragment the peripheral refuses), each write under a timeout and retried on
timeout (the peripheral ignores a repeat of the fragment it just took).

``backend``: ``None`` on a real machine (bleak picks BlueZ on Linux); in tests and
benchmarks the classes of ``simulator.ble.bleak_backends`` (bleak over a bumble
virtual controller). Only bleak's public API is used here.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from bleak import BleakClient, BleakScanner
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from bleak.exc import BleakError, BleakGATTProtocolError

from structauth.errors import MalformedMessage, ProtocolError, Reason, TesseraError
from structauth.gatt import ATT_BUSY, DEFAULT_MAX_MESSAGE, Reassembler, fragment

Backends = tuple[Any, Any] | None


class LinkError(TesseraError):
    """The radio link failed (not found, dropped, timed out)."""

    default_reason = Reason.BACKEND_UNAVAILABLE


async def scan(service_uuid: str, *, timeout: float = 3.0, backends: Backends = None,
               stop_after: int | None = None) -> list[tuple[BLEDevice, AdvertisementData]]:
    """Devices advertising ``service_uuid`` seen within ``timeout`` seconds (or as
    soon as ``stop_after`` of them were seen)."""
    found: dict[str, tuple[BLEDevice, AdvertisementData]] = {}
    enough = asyncio.Event()

    def seen(device: BLEDevice, adv: AdvertisementData) -> None:
        if service_uuid in adv.service_uuids:
            found[device.address] = (device, adv)
            if stop_after is not None and len(found) >= stop_after:
                enough.set()

    scanner = BleakScanner(seen, service_uuids=[service_uuid],
                           backend=backends[0] if backends else None)
    async with scanner:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(enough.wait(), timeout)
    return sorted(found.values(), key=lambda item: item[0].address)


class GattLink:
    """One connection to one peripheral's message service."""

    def __init__(
        self,
        target: BLEDevice | str,
        *,
        rx_uuid: str,
        tx_uuid: str,
        service_uuid: str | None = None,
        backends: Backends = None,
        connect_timeout: float = 10.0,
        write_timeout: float = 5.0,
        retries: int = 3,
        max_message: int = DEFAULT_MAX_MESSAGE,
    ) -> None:
        self.target = target
        self.rx_uuid = rx_uuid
        self.tx_uuid = tx_uuid
        self.write_timeout = write_timeout
        self.retries = retries
        self._client = BleakClient(target, services=[service_uuid] if service_uuid else None,
                                   timeout=connect_timeout,
                                   disconnected_callback=self._dropped,
                                   backend=backends[1] if backends else None)
        self._reassembler = Reassembler(max_message)
        self._inbox: asyncio.Queue[bytes | BaseException] = asyncio.Queue()
        self._number = 0
        #: counters for benchmarks and tests
        self.fragments_out = 0
        self.fragments_in = 0
        self.retried = 0
        self.connected = False

    @property
    def mtu(self) -> int:
        return int(self._client.mtu_size)

    @property
    def address(self) -> str:
        return str(self._client.address)

    def _dropped(self, _client: BleakClient) -> None:
        self.connected = False
        self._inbox.put_nowait(LinkError("the peripheral disconnected"))

    def _notified(self, _char: Any, data: bytearray) -> None:
        self.fragments_in += 1
        try:
            message = self._reassembler.feed(bytes(data))
        except MalformedMessage as exc:
            self._inbox.put_nowait(exc)
            return
        if message is not None:
            self._inbox.put_nowait(message)

    async def connect(self) -> GattLink:
        try:
            await self._client.connect()
            await self._client.start_notify(self.tx_uuid, self._notified)
        except BleakError as exc:
            await self.close()
            raise LinkError(f"cannot open the GATT service of {self.target}: {exc}") from None
        self.connected = True
        return self

    async def read(self, uuid: str) -> bytes:
        try:
            return bytes(await self._client.read_gatt_char(uuid))
        except BleakError as exc:
            raise LinkError(f"cannot read {uuid}: {exc}") from None

    async def send(self, message: bytes) -> None:
        """Every fragment but the last as a write without response (several go in one
        connection event), the last with response: the peripheral answers it with an
        ATT error if any fragment of the message did not fit (it dropped that one and
        changed nothing), so a message is acknowledged as a whole."""
        self._number = (self._number + 1) & 0x3F
        pieces = fragment(message, self._number, self.mtu)
        for piece in pieces[:-1]:
            await self.write_raw(piece, response=False)
        await self.write_raw(pieces[-1])

    async def write_raw(self, piece: bytes, *, response: bool = True) -> None:
        """One fragment, retried on timeout; an ATT error from the peripheral raises
        :class:`~structauth.errors.ProtocolError` (it refused the fragment)."""
        for attempt in range(self.retries + 1):
            try:
                await asyncio.wait_for(
                    self._client.write_gatt_char(self.rx_uuid, piece, response=response),
                    self.write_timeout)
                self.fragments_out += 1
                return
            except TimeoutError:
                self.retried += 1
                if attempt == self.retries:
                    raise LinkError(f"no write response after {self.retries + 1} tries"
                                    ) from None
            except BleakGATTProtocolError as exc:
                if int(exc.code) == ATT_BUSY and attempt < self.retries:
                    self.retried += 1
                    await asyncio.sleep(0.05 * (attempt + 1))
                    continue
                raise ProtocolError(f"the peripheral refused a fragment (ATT error "
                                    f"{int(exc.code):#04x})", Reason.MALFORMED) from None
            except BleakError as exc:
                raise LinkError(f"write failed: {exc}") from None

    async def receive(self, timeout: float) -> bytes:
        try:
            item = await asyncio.wait_for(self._inbox.get(), timeout)
        except TimeoutError:
            raise LinkError(f"no answer within {timeout:g} s") from None
        if isinstance(item, BaseException):
            raise item
        return item

    async def close(self) -> None:
        self.connected = False
        with contextlib.suppress(BleakError, AttributeError):
            await self._client.disconnect()

    async def __aenter__(self) -> GattLink:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


__all__ = ["GattLink", "LinkError", "scan"]
