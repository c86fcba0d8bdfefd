"""Tessera over Bluetooth LE GATT: the layout both ends agree on, and the framing.

Sans-IO: bytes in, bytes out. The GATT stacks (bumble on the device, bleak on the
station and the gateway) only move what this module produces.

Services and characteristics (128-bit UUIDs under one Tessera base)::

    ENROLL_SERVICE   advertised by a device that is not enrolled yet
        ENROLL_RX    write (with response): station -> device fragments
        ENROLL_TX    notify:                device -> station fragments
        ENROLL_INFO  read: {"serial", "state", "proto"} (JSON), a hint only
    SA1_SERVICE      advertised by an enrolled device or a gateway that answers SA1
        SA1_RX       write (with response): central -> peripheral fragments
        SA1_TX       notify:                peripheral -> central fragments

Framing. A message (an enrollment step, an SA1 handshake message, a proven message)
is cut into fragments that each fit one ATT write or notification (ATT_MTU - 3
bytes)::

    byte 0     flags: 0x80 FIRST, 0x40 LAST, low 6 bits: message number (mod 64)
    byte 1     fragment index (mod 256)
    bytes 2-4  FIRST only: total message length (unsigned 24-bit, big endian)
    rest       the message's next bytes

A fragment is checked completely before it changes anything: one that does not fit
(wrong index, wrong message number, beyond the announced length, a length above the
limit) raises :class:`~structauth.errors.MalformedMessage` and leaves the message being
assembled as it was; the peripheral answers the write with an ATT error. A repeat of
the fragment just taken (a write retried after a lost response) is ignored. A new
FIRST fragment starts a new message (the sender gave up the previous one).

The out-of-band binding of BLE enrollment (:func:`oob_key`, :func:`device_binding`,
:func:`station_binding`) is here too: it is pure computation on bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import MalformedMessage, Reason

# -- the GATT layout ---------------------------------------------------------------

_BASE = "7e55{:04x}-7e55-4a1e-9b1e-0000a5a1c0de"


def _uuid(n: int) -> str:
    return _BASE.format(n)


ENROLL_SERVICE = _uuid(0x0100)
ENROLL_RX = _uuid(0x0101)
ENROLL_TX = _uuid(0x0102)
ENROLL_INFO = _uuid(0x0103)
SA1_SERVICE = _uuid(0x0200)
SA1_RX = _uuid(0x0201)
SA1_TX = _uuid(0x0202)

#: the smallest ATT_MTU (Bluetooth Core, Vol 3 Part F 3.2.8) and what BLE 4.2+ offers
MIN_MTU = 23
MAX_MTU = 517
#: ATT write / notification header: opcode (1) + handle (2)
ATT_OVERHEAD = 3
#: framing header of a continuation fragment, and the first fragment's extra length
HEADER = 2
FIRST_EXTRA = 3
FLAG_FIRST = 0x80
FLAG_LAST = 0x40
#: the largest message anyone may send (enrollment credentials with a bundle fit in
#: ~8 KiB; SA1 msg1 with a full chain is ~2 KB, its upper bound 26 KB)
DEFAULT_MAX_MESSAGE = 32 * 1024
#: ATT application error codes (0x80-0x9F are the application's, Core Vol 3 Part F 3.4.1.1)
ATT_MALFORMED = 0x80
ATT_REFUSED = 0x81
ATT_BUSY = 0x82


def fragment_payload(mtu: int) -> int:
    """Bytes of message per fragment at ATT_MTU ``mtu`` (continuation fragments)."""
    if not MIN_MTU <= mtu <= MAX_MTU:
        raise ValueError(f"ATT_MTU {mtu} outside {MIN_MTU}..{MAX_MTU}")
    return mtu - ATT_OVERHEAD - HEADER


def fragment(message: bytes, number: int, mtu: int) -> list[bytes]:
    """Cut ``message`` (message number ``number``) into fragments for ATT_MTU ``mtu``."""
    if not message:
        raise ValueError("empty message")
    if len(message) >= 1 << 24:
        raise ValueError("message longer than 16 MiB")
    room = fragment_payload(mtu)
    first_room = room - FIRST_EXTRA
    number &= 0x3F
    out: list[bytes] = []
    pos = min(first_room, len(message))
    flags = FLAG_FIRST | (FLAG_LAST if pos == len(message) else 0) | number
    out.append(bytes((flags, 0)) + len(message).to_bytes(3, "big") + message[:pos])
    index = 1
    while pos < len(message):
        end = min(pos + room, len(message))
        flags = (FLAG_LAST if end == len(message) else 0) | number
        out.append(bytes((flags, index & 0xFF)) + message[pos:end])
        pos = end
        index += 1
    return out


class Reassembler:
    """Puts one direction's fragments back together (one per connection)."""

    def __init__(self, max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        self.max_message = max_message
        self._number: int | None = None
        self._next = 0
        self._total = 0
        self._buffer = bytearray()
        self._last: bytes | None = None
        #: fragments refused and repeats ignored (for tests and metrics)
        self.refused = 0
        self.repeats = 0

    @property
    def busy(self) -> bool:
        """A message is partly assembled."""
        return self._number is not None

    def reset(self) -> None:
        self._number = None
        self._buffer = bytearray()
        self._last = None

    def feed(self, data: bytes) -> bytes | None:
        """Take one fragment; return the message it completes, if any."""
        try:
            return self._feed(bytes(data))
        except MalformedMessage:
            self.refused += 1
            raise

    def _feed(self, data: bytes) -> bytes | None:
        if len(data) < HEADER:
            raise MalformedMessage("fragment shorter than its 2-byte header")
        if self._last is not None and data == self._last:
            self.repeats += 1  # a retried write whose response was lost
            return None
        flags, index = data[0], data[1]
        number = flags & 0x3F
        last = bool(flags & FLAG_LAST)
        if flags & FLAG_FIRST:
            if index != 0:
                raise MalformedMessage("first fragment with a non-zero index")
            if len(data) < HEADER + FIRST_EXTRA:
                raise MalformedMessage("first fragment without its length")
            total = int.from_bytes(data[2:5], "big")
            body = data[5:]
            if not 0 < total <= self.max_message:
                raise MalformedMessage(
                    f"message length {total} outside 1..{self.max_message}")
            if len(body) > total or (last and len(body) != total) or (
                    not last and len(body) == total):
                raise MalformedMessage("first fragment does not match the announced length")
            if last:
                self.reset()
                self._last = data
                return body
            self._number, self._next, self._total = number, 1, total
            self._buffer = bytearray(body)
            self._last = data
            return None
        if self._number is None:
            raise MalformedMessage("continuation fragment without a first fragment")
        if number != self._number:
            raise MalformedMessage(f"fragment of message {number}, expected {self._number}")
        if index != self._next & 0xFF:
            raise MalformedMessage(f"fragment {index} out of order, expected {self._next & 0xFF}")
        size = len(self._buffer) + len(data) - HEADER
        if size > self._total or (last and size != self._total) or (
                not last and size == self._total):
            raise MalformedMessage("fragment does not match the announced length")
        if len(data) == HEADER:
            raise MalformedMessage("empty continuation fragment")
        self._buffer += data[HEADER:]
        self._next += 1
        self._last = data
        if last:
            message = bytes(self._buffer)
            self._number = None
            self._buffer = bytearray()
            return message
        return None


# -- SA1 over GATT: message types ----------------------------------------------------

#: first byte of a reassembled message on the SA1 service
SA1_MSG1 = 0x01
SA1_MSG2 = 0x02
SA1_MSG3 = 0x03
SA1_DATA = 0x10
SA1_ERROR = 0x7F
#: proven messages are bound to this action prefix and the message's topic
ACTION_PREFIX = b"tessera-gatt/"
MAX_TOPIC = 255


def action(topic: str) -> bytes:
    return ACTION_PREFIX + topic.encode("utf-8")


def encode_data(header: bytes, topic: str, body: bytes) -> bytes:
    raw = topic.encode("utf-8")
    if not 0 < len(raw) <= MAX_TOPIC:
        raise ValueError(f"topic must be 1..{MAX_TOPIC} bytes of UTF-8")
    return bytes((SA1_DATA,)) + header + bytes((len(raw),)) + raw + body


def decode_data(message: bytes, header_size: int) -> tuple[bytes, str, bytes]:
    """(header, topic, body) of a DATA message; MalformedMessage if it is not one."""
    if len(message) < 2 + header_size or message[0] != SA1_DATA:
        raise MalformedMessage("not a proven GATT message")
    header = message[1:1 + header_size]
    n = message[1 + header_size]
    start = 2 + header_size
    raw = message[start:start + n]
    if n == 0 or len(raw) != n:
        raise MalformedMessage("proven GATT message with a truncated topic")
    try:
        topic = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedMessage("topic is not UTF-8") from None
    return header, topic, message[start + n:]


def encode_error(reason: Reason, detail: str) -> bytes:
    """An unproven refusal: what MQTT puts in a reason string and CoAP in a diagnostic."""
    return bytes((SA1_ERROR,)) + struct.pack(">H", int(reason)) + detail.encode()[:200]


def decode_error(message: bytes) -> tuple[Reason, str]:
    if not message or message[0] != SA1_ERROR:
        raise MalformedMessage("not an error message")
    if len(message) < 3:
        return Reason.MALFORMED, "truncated error message"
    code = struct.unpack(">H", message[1:3])[0]
    try:
        reason = Reason(code)
    except ValueError:
        reason = Reason.MALFORMED
    return reason, message[3:].decode("utf-8", "replace")


# -- enrollment messages (JSON objects with an "op") ---------------------------------

ENROLL_OPS = ("hello", "evidence", "activate", "credentials")
#: what a device answers, besides errors
ENROLL_ANSWERS = ("device", "evidence", "secret", "stored", "error")
MAX_ENROLL_MESSAGE = 24 * 1024


def encode_json(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def decode_json(message: bytes, field: str = "op") -> dict[str, Any]:
    """A JSON object with a string ``field``; MalformedMessage otherwise."""
    if len(message) > MAX_ENROLL_MESSAGE:
        raise MalformedMessage("enrollment message too long")
    try:
        obj = json.loads(message)
    except (ValueError, RecursionError):
        raise MalformedMessage("enrollment message is not JSON") from None
    if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
        raise MalformedMessage(f"enrollment message must be an object with a string {field!r}")
    return obj


def digest(obj: Any) -> bytes:
    """SHA-256 of a JSON value in canonical form (what a binding covers)."""
    return hashlib.sha256(
        json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()).digest()


# -- the out-of-band binding -----------------------------------------------------------

#: Crockford base32: no I, L, O, U (read off a label without confusion)
CODE_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
CODE_LENGTH = 10  # 50 bits
_CODE_FIX = str.maketrans({"I": "1", "L": "1", "O": "0", "U": "V"})
NONCE_SIZE = 16
_LABEL_DEVICE = b"tessera-ble-enroll/device/v1"
_LABEL_STATION = b"tessera-ble-enroll/station/v1"


def new_code() -> str:
    """A fresh label code: 10 characters, printed as XXXXX-XXXXX."""
    raw = "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))
    return f"{raw[:5]}-{raw[5:]}"


def normalize_code(code: str) -> str:
    """What an operator typed, as the code's 10 characters (dashes, spaces and case
    ignored; I/L read as 1, O as 0). ValueError says what is wrong."""
    text = "".join(code.split()).replace("-", "").upper().translate(_CODE_FIX)
    if len(text) != CODE_LENGTH or any(c not in CODE_ALPHABET for c in text):
        raise ValueError(
            f"the label code must be {CODE_LENGTH} characters of {CODE_ALPHABET} "
            "(e.g. 7K3QD-M9XPA)")
    return text


def oob_key(code: str, serial: str) -> bytes:
    """The binding key both ends derive from the label code. scrypt (memory-hard) so
    that someone who recorded an exchange pays for every guess of the 50-bit code."""
    return hashlib.scrypt(normalize_code(code).encode(),
                          salt=b"tessera-ble-oob/v1/" + serial.encode(),
                          n=1 << 14, r=8, p=1, dklen=32)


@dataclass(frozen=True)
class BindingContext:
    """What both bindings cover: both fresh nonces and the serial."""

    serial: str
    device_nonce: bytes
    station_nonce: bytes

    def transcript(self, label: bytes, covered: bytes) -> bytes:
        serial = self.serial.encode()
        return b"".join((label, bytes((len(serial),)), serial, self.device_nonce,
                         self.station_nonce, covered))


def device_binding(key: bytes, ctx: BindingContext, evidence_digest: bytes) -> bytes:
    """The device's proof that it knows the label code, over this very TPM evidence
    (whose Certify holds the provisioning service's nonce) and both nonces."""
    return hmac.new(key, ctx.transcript(_LABEL_DEVICE, evidence_digest), "sha256").digest()


def station_binding(key: bytes, ctx: BindingContext, issued_digest: bytes) -> bytes:
    """The station's proof that it knows the label code, over the credentials it
    hands the device and both nonces."""
    return hmac.new(key, ctx.transcript(_LABEL_STATION, issued_digest), "sha256").digest()


def check_binding(expected: bytes, given: Any) -> bool:
    return isinstance(given, bytes) and hmac.compare_digest(expected, given)


__all__ = [
    "ENROLL_INFO",
    "ENROLL_RX",
    "ENROLL_SERVICE",
    "ENROLL_TX",
    "SA1_RX",
    "SA1_SERVICE",
    "SA1_TX",
    "BindingContext",
    "Reassembler",
    "fragment",
]
