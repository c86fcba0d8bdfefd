"""A raw MQTT client for attacks, written from the OASIS MQTT Version 5.0 standard (and
3.1.1 / 3.1 for the old CONNECT forms): struct packing over a plain TCP socket.

Nothing here uses paho, aiocoap or the project's adapters (device/, broker_plugin/): the
point is to send exactly the bytes an attacker chooses, including ones a well-behaved
client library would refuse to build. Section numbers refer to MQTT 5.0.

    conn = Conn.open("127.0.0.1", port)
    conn.send(connect("spiffe://fleet.test/device/pi-1", auth_method="tessera-sa1",
                      auth_data=msg1))
    packet = conn.read(timeout=5)          # a Packet, or None on timeout / closed socket
    if packet.type == AUTH: reason, props = parse_auth(packet)

Builders return whole packets (bytes); parsers take a :class:`Packet`. Properties are
passed as a list of ``(identifier, value)`` pairs, so a property can be repeated or put
in a packet where the standard forbids it.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

# -- control packet types (2.1.2) ------------------------------------------------------
CONNECT = 1
CONNACK = 2
PUBLISH = 3
PUBACK = 4
PUBREC = 5
PUBREL = 6
PUBCOMP = 7
SUBSCRIBE = 8
SUBACK = 9
UNSUBSCRIBE = 10
UNSUBACK = 11
PINGREQ = 12
PINGRESP = 13
DISCONNECT = 14
AUTH = 15

NAMES = {CONNECT: "CONNECT", CONNACK: "CONNACK", PUBLISH: "PUBLISH", PUBACK: "PUBACK",
         PUBREC: "PUBREC", PUBREL: "PUBREL", PUBCOMP: "PUBCOMP", SUBSCRIBE: "SUBSCRIBE",
         SUBACK: "SUBACK", UNSUBSCRIBE: "UNSUBSCRIBE", UNSUBACK: "UNSUBACK",
         PINGREQ: "PINGREQ", PINGRESP: "PINGRESP", DISCONNECT: "DISCONNECT", AUTH: "AUTH"}

# -- properties (2.2.2.2): identifier -> type ------------------------------------------
PAYLOAD_FORMAT_INDICATOR = 0x01
MESSAGE_EXPIRY_INTERVAL = 0x02
CONTENT_TYPE = 0x03
RESPONSE_TOPIC = 0x08
CORRELATION_DATA = 0x09
SUBSCRIPTION_IDENTIFIER = 0x0B
SESSION_EXPIRY_INTERVAL = 0x11
ASSIGNED_CLIENT_IDENTIFIER = 0x12
SERVER_KEEP_ALIVE = 0x13
AUTHENTICATION_METHOD = 0x15
AUTHENTICATION_DATA = 0x16
REQUEST_PROBLEM_INFORMATION = 0x17
WILL_DELAY_INTERVAL = 0x18
REQUEST_RESPONSE_INFORMATION = 0x19
RESPONSE_INFORMATION = 0x1A
SERVER_REFERENCE = 0x1C
REASON_STRING = 0x1F
RECEIVE_MAXIMUM = 0x21
TOPIC_ALIAS_MAXIMUM = 0x22
TOPIC_ALIAS = 0x23
MAXIMUM_QOS = 0x24
RETAIN_AVAILABLE = 0x25
USER_PROPERTY = 0x26
MAXIMUM_PACKET_SIZE = 0x27
WILDCARD_SUBSCRIPTION_AVAILABLE = 0x28
SUBSCRIPTION_IDENTIFIER_AVAILABLE = 0x29
SHARED_SUBSCRIPTION_AVAILABLE = 0x2A

_BYTE, _U16, _U32, _VARINT, _STR, _BIN, _PAIR = range(7)
PROPERTY_TYPES = {
    PAYLOAD_FORMAT_INDICATOR: _BYTE, MESSAGE_EXPIRY_INTERVAL: _U32, CONTENT_TYPE: _STR,
    RESPONSE_TOPIC: _STR, CORRELATION_DATA: _BIN, SUBSCRIPTION_IDENTIFIER: _VARINT,
    SESSION_EXPIRY_INTERVAL: _U32, ASSIGNED_CLIENT_IDENTIFIER: _STR, SERVER_KEEP_ALIVE: _U16,
    AUTHENTICATION_METHOD: _STR, AUTHENTICATION_DATA: _BIN,
    REQUEST_PROBLEM_INFORMATION: _BYTE, WILL_DELAY_INTERVAL: _U32,
    REQUEST_RESPONSE_INFORMATION: _BYTE, RESPONSE_INFORMATION: _STR, SERVER_REFERENCE: _STR,
    REASON_STRING: _STR, RECEIVE_MAXIMUM: _U16, TOPIC_ALIAS_MAXIMUM: _U16, TOPIC_ALIAS: _U16,
    MAXIMUM_QOS: _BYTE, RETAIN_AVAILABLE: _BYTE, USER_PROPERTY: _PAIR,
    MAXIMUM_PACKET_SIZE: _U32, WILDCARD_SUBSCRIPTION_AVAILABLE: _BYTE,
    SUBSCRIPTION_IDENTIFIER_AVAILABLE: _BYTE, SHARED_SUBSCRIPTION_AVAILABLE: _BYTE,
}

# -- reason codes (2.4) used by the tests ------------------------------------------------
SUCCESS = 0x00
DISCONNECT_WITH_WILL = 0x04
NO_MATCHING_SUBSCRIBERS = 0x10
CONTINUE_AUTHENTICATION = 0x18
REAUTHENTICATE = 0x19
UNSPECIFIED_ERROR = 0x80
MALFORMED_PACKET = 0x81
PROTOCOL_ERROR = 0x82
UNSUPPORTED_PROTOCOL_VERSION = 0x84
BAD_USERNAME_OR_PASSWORD = 0x86
NOT_AUTHORIZED = 0x87
BAD_AUTHENTICATION_METHOD = 0x8C
SESSION_TAKEN_OVER = 0x8E
TOPIC_FILTER_INVALID = 0x8F
TOPIC_NAME_INVALID = 0x90
PACKET_TOO_LARGE = 0x95
TOPIC_ALIAS_INVALID = 0x94
QUOTA_EXCEEDED = 0x97
PAYLOAD_FORMAT_INVALID = 0x99
SHARED_SUBSCRIPTIONS_NOT_SUPPORTED = 0x9E
# MQTT 3.1.1 CONNACK return codes (3.2.2.3 of 3.1.1)
V3_REFUSED_PROTOCOL = 1
V3_REFUSED_IDENTIFIER = 2
V3_BAD_USERNAME_PASSWORD = 4
V3_NOT_AUTHORIZED = 5


# ------------------------------------------------------------------ primitive encoders


def varint(n: int) -> bytes:
    """Variable Byte Integer (1.5.5): 7 bits per byte, high bit = more follows."""
    if not 0 <= n <= 268_435_455:
        raise ValueError(f"{n} does not fit a Variable Byte Integer")
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def utf8(text: str | bytes) -> bytes:
    """UTF-8 Encoded String (1.5.4): u16 length then the bytes. Bytes are taken as is, so
    an attacker can send ill-formed UTF-8."""
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("!H", len(raw)) + raw


def binary(data: bytes) -> bytes:
    """Binary Data (1.5.6): u16 length then the bytes."""
    return struct.pack("!H", len(data)) + data


Props = Sequence[tuple[int, object]]


def properties(props: Props = ()) -> bytes:
    """Property Length (varint) then each property: identifier, value in its type."""
    body = bytearray()
    for ident, value in props:
        kind = PROPERTY_TYPES[ident]
        body += varint(ident)
        if kind == _BYTE:
            body.append(int(value))  # type: ignore[call-overload]
        elif kind == _U16:
            body += struct.pack("!H", value)
        elif kind == _U32:
            body += struct.pack("!I", value)
        elif kind == _VARINT:
            body += varint(int(value))  # type: ignore[call-overload]
        elif kind == _STR:
            body += utf8(value)  # type: ignore[arg-type]
        elif kind == _BIN:
            body += binary(value)  # type: ignore[arg-type]
        else:
            assert isinstance(value, tuple) and len(value) == 2
            body += utf8(value[0]) + utf8(value[1])
    return varint(len(body)) + bytes(body)


def packet(ptype: int, flags: int, body: bytes) -> bytes:
    """Fixed header (2.1.1): type << 4 | flags, Remaining Length, then the rest."""
    return bytes([(ptype << 4) | (flags & 0x0F)]) + varint(len(body)) + body


# ------------------------------------------------------------------ packet builders


@dataclass
class Will:
    topic: str | bytes
    payload: bytes
    qos: int = 0
    retain: bool = False
    props: Props = ()  # Will Properties (3.1.3.2): Will Delay Interval, ...


def connect(
    client_id: str | bytes,
    *,
    auth_method: str | None = None,
    auth_data: bytes | None = None,
    props: Props = (),
    will: Will | None = None,
    username: str | bytes | None = None,
    password: bytes | None = None,
    clean_start: bool = True,
    keepalive: int = 60,
    level: int = 5,
    protocol_name: bytes | None = None,
    reserved_flag: bool = False,
) -> bytes:
    """CONNECT (3.1). ``level`` 5 (MQTT 5), 4 (3.1.1) or 3 (3.1, protocol name MQIsdp);
    levels below 5 have no properties. ``auth_method`` / ``auth_data`` are added as the
    Authentication Method / Data properties after ``props``."""
    name = protocol_name if protocol_name is not None else (b"MQIsdp" if level == 3 else b"MQTT")
    flags = 0
    if clean_start:
        flags |= 0x02
    if will is not None:
        flags |= 0x04 | ((will.qos & 3) << 3) | (0x20 if will.retain else 0)
    if password is not None:
        flags |= 0x40
    if username is not None:
        flags |= 0x80
    if reserved_flag:
        flags |= 0x01
    variable = utf8(name) + bytes([level, flags]) + struct.pack("!H", keepalive)
    all_props = list(props)
    if auth_method is not None:
        all_props.append((AUTHENTICATION_METHOD, auth_method))
    if auth_data is not None:
        all_props.append((AUTHENTICATION_DATA, auth_data))
    if level >= 5:
        variable += properties(all_props)
    payload = utf8(client_id)
    if will is not None:
        if level >= 5:
            payload += properties(will.props)
        payload += utf8(will.topic) + binary(will.payload)
    if username is not None:
        payload += utf8(username)
    if password is not None:
        payload += binary(password)
    return packet(CONNECT, 0, variable + payload)


def publish(
    topic: str | bytes,
    payload: bytes,
    *,
    qos: int = 0,
    packet_id: int | None = None,
    retain: bool = False,
    dup: bool = False,
    props: Props = (),
    v5: bool = True,
) -> bytes:
    """PUBLISH (3.3). Topic Alias and friends go in ``props``. ``packet_id`` defaults
    to 1 for QoS 1/2 (0 is a protocol error there, which an attacker may also send)."""
    if packet_id is None:
        packet_id = 1 if qos else 0
    flags = (0x08 if dup else 0) | ((qos & 3) << 1) | (0x01 if retain else 0)
    body = utf8(topic)
    if qos:
        body += struct.pack("!H", packet_id)
    if v5:
        body += properties(props)
    return packet(PUBLISH, flags, body + payload)


def ack(ptype: int, packet_id: int, reason: int = 0, props: Props = ()) -> bytes:
    """PUBACK / PUBREC / PUBREL / PUBCOMP (3.4-3.7); PUBREL has flags 0b0010."""
    body = struct.pack("!H", packet_id)
    if reason or props:
        body += bytes([reason]) + properties(props)
    return packet(ptype, 0x02 if ptype == PUBREL else 0, body)


def subscribe(packet_id: int, filters: Iterable[tuple[str | bytes, int]],
              props: Props = ()) -> bytes:
    """SUBSCRIBE (3.8): each filter with its Subscription Options byte (QoS in bits 0-1,
    No Local 2, Retain As Published 3, Retain Handling 4-5)."""
    body = struct.pack("!H", packet_id) + properties(props)
    for topic, options in filters:
        body += utf8(topic) + bytes([options])
    return packet(SUBSCRIBE, 0x02, body)


def unsubscribe(packet_id: int, filters: Iterable[str | bytes]) -> bytes:
    body = struct.pack("!H", packet_id) + properties()
    for topic in filters:
        body += utf8(topic)
    return packet(UNSUBSCRIBE, 0x02, body)


def pingreq() -> bytes:
    return packet(PINGREQ, 0, b"")


def disconnect(reason: int = 0, props: Props = ()) -> bytes:
    """DISCONNECT (3.14); reason 0x04 asks the server to publish the Will."""
    if not reason and not props:
        return packet(DISCONNECT, 0, b"")
    return packet(DISCONNECT, 0, bytes([reason]) + properties(props))


def auth(reason: int, method: str | None = None, data: bytes | None = None,
         props: Props = ()) -> bytes:
    """AUTH (3.15): reason code and properties (Authentication Method and Data)."""
    all_props = list(props)
    if method is not None:
        all_props.append((AUTHENTICATION_METHOD, method))
    if data is not None:
        all_props.append((AUTHENTICATION_DATA, data))
    return packet(AUTH, 0, bytes([reason]) + properties(all_props))


# ------------------------------------------------------------------ parsing


class MalformedPacket(Exception):
    pass


@dataclass
class Packet:
    type: int
    flags: int
    body: bytes

    @property
    def name(self) -> str:
        return NAMES.get(self.type, f"type {self.type}")

    def __repr__(self) -> str:
        return f"<{self.name} flags={self.flags:#x} {len(self.body)} bytes>"


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise MalformedPacket("packet shorter than its fields")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(struct.unpack("!H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack("!I", self.take(4))[0])

    def varint(self) -> int:
        value, shift = 0, 0
        for _ in range(4):
            byte = self.u8()
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
        raise MalformedPacket("Variable Byte Integer longer than 4 bytes")

    def string(self) -> str:
        return self.take(self.u16()).decode("utf-8", "replace")

    def binary(self) -> bytes:
        return self.take(self.u16())

    def rest(self) -> bytes:
        out = self.data[self.pos:]
        self.pos = len(self.data)
        return out

    def at_end(self) -> bool:
        return self.pos >= len(self.data)

    def props(self) -> dict[int, list[object]]:
        length = self.varint()
        end = self.pos + length
        if end > len(self.data):
            raise MalformedPacket("properties longer than the packet")
        out: dict[int, list[object]] = {}
        while self.pos < end:
            ident = self.varint()
            kind = PROPERTY_TYPES.get(ident)
            value: object
            if kind == _BYTE:
                value = self.u8()
            elif kind == _U16:
                value = self.u16()
            elif kind == _U32:
                value = self.u32()
            elif kind == _VARINT:
                value = self.varint()
            elif kind == _STR:
                value = self.string()
            elif kind == _BIN:
                value = self.binary()
            elif kind == _PAIR:
                value = (self.string(), self.string())
            else:
                raise MalformedPacket(f"unknown property {ident:#x}")
            out.setdefault(ident, []).append(value)
        return out


def prop(props: dict[int, list[object]], ident: int, default: object = None) -> object:
    values = props.get(ident)
    return values[0] if values else default


@dataclass
class Connack:
    session_present: bool
    reason: int
    props: dict[int, list[object]] = field(default_factory=dict)

    @property
    def auth_data(self) -> bytes | None:
        value = prop(self.props, AUTHENTICATION_DATA)
        return value if isinstance(value, bytes) else None


def parse_connack(p: Packet, v5: bool = True) -> Connack:
    r = _Reader(p.body)
    flags, reason = r.u8(), r.u8()
    props = r.props() if v5 and not r.at_end() else {}
    return Connack(bool(flags & 1), reason, props)


@dataclass
class Auth:
    reason: int
    props: dict[int, list[object]]

    @property
    def method(self) -> str | None:
        value = prop(self.props, AUTHENTICATION_METHOD)
        return value if isinstance(value, str) else None

    @property
    def data(self) -> bytes | None:
        value = prop(self.props, AUTHENTICATION_DATA)
        return value if isinstance(value, bytes) else None


def parse_auth(p: Packet) -> Auth:
    if not p.body:
        return Auth(SUCCESS, {})
    r = _Reader(p.body)
    reason = r.u8()
    return Auth(reason, r.props() if not r.at_end() else {})


@dataclass
class Publish:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    packet_id: int
    props: dict[int, list[object]]


def parse_publish(p: Packet, v5: bool = True) -> Publish:
    r = _Reader(p.body)
    topic = r.string()
    qos = (p.flags >> 1) & 3
    packet_id = r.u16() if qos else 0
    props = r.props() if v5 else {}
    return Publish(topic, r.rest(), qos, bool(p.flags & 1), bool(p.flags & 8), packet_id, props)


@dataclass
class Ack:
    packet_id: int
    reason: int
    props: dict[int, list[object]]


def parse_ack(p: Packet) -> Ack:
    """PUBACK/PUBREC/PUBREL/PUBCOMP: a missing reason code means 0x00 (3.4.2.1)."""
    r = _Reader(p.body)
    packet_id = r.u16()
    reason = r.u8() if not r.at_end() else SUCCESS
    props = r.props() if not r.at_end() else {}
    return Ack(packet_id, reason, props)


@dataclass
class Suback:
    packet_id: int
    reasons: list[int]


def parse_suback(p: Packet) -> Suback:
    r = _Reader(p.body)
    packet_id = r.u16()
    r.props()
    return Suback(packet_id, list(r.rest()))


def parse_disconnect(p: Packet) -> int:
    return p.body[0] if p.body else SUCCESS


# ------------------------------------------------------------------ the connection


class Conn:
    """One TCP connection: send bytes, read whole packets with a timeout."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray()
        self.closed = False

    @classmethod
    def open(cls, host: str, port: int, timeout: float = 5.0,
             source: str | None = None) -> Conn:
        """Connect, from the local address ``source`` if given (any 127.x.y.z on
        loopback, to look like many hosts)."""
        sock = socket.create_connection((host, port), timeout=timeout,
                                        source_address=(source, 0) if source else None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(sock)

    def send(self, data: bytes) -> bool:
        """Send everything; False if the peer has closed the connection."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            self.closed = True
            return False

    def _fill(self, deadline: float) -> bool:
        """Read more bytes; False on timeout or a closed connection."""
        if self.closed:
            return False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        ready, _, _ = select.select([self.sock], [], [], remaining)
        if not ready:
            return False
        try:
            chunk = self.sock.recv(65536)
        except OSError:
            chunk = b""
        if not chunk:
            self.closed = True
            return False
        self._buf += chunk
        return True

    def _complete(self) -> Packet | None:
        buf = self._buf
        if len(buf) < 2:
            return None
        length, shift, i = 0, 0, 1
        while True:
            if i >= len(buf):
                return None
            byte = buf[i]
            length |= (byte & 0x7F) << shift
            i += 1
            if not byte & 0x80:
                break
            shift += 7
            if shift > 21:
                raise MalformedPacket("Remaining Length longer than 4 bytes")
        if len(buf) < i + length:
            return None
        first = buf[0]
        body = bytes(buf[i:i + length])
        del buf[:i + length]
        return Packet(first >> 4, first & 0x0F, body)

    def read(self, timeout: float = 5.0) -> Packet | None:
        """The next whole packet; None on timeout or when the connection closed."""
        deadline = time.monotonic() + timeout
        while True:
            p = self._complete()
            if p is not None:
                return p
            if not self._fill(deadline):
                return None

    def expect(self, ptype: int, timeout: float = 5.0) -> Packet:
        """The next packet, which must be of ``ptype`` (skipping PINGRESP)."""
        while True:
            p = self.read(timeout)
            if p is None:
                raise AssertionError(f"no {NAMES[ptype]} within {timeout} s "
                                     f"({'closed' if self.closed else 'timeout'})")
            if p.type == PINGRESP and ptype != PINGRESP:
                continue
            if p.type != ptype:
                raise AssertionError(f"expected {NAMES[ptype]}, got {p!r}: {p.body[:40]!r}")
            return p

    def wait_closed(self, timeout: float = 5.0) -> bool:
        """Read (and drop) packets until the server closes; True if it did in time."""
        deadline = time.monotonic() + timeout
        while not self.closed:
            if self._complete() is not None:
                continue
            if not self._fill(deadline) and not self.closed:
                return False
        return True

    def drain(self, timeout: float) -> list[Packet]:
        """Every packet that arrives within ``timeout`` (or until the socket closes)."""
        out: list[Packet] = []
        deadline = time.monotonic() + timeout
        while True:
            p = self.read(max(0.0, deadline - time.monotonic()))
            if p is None:
                return out
            out.append(p)

    def sync(self, timeout: float = 5.0) -> list[Packet]:
        """PINGREQ, then every packet up to its PINGRESP. The broker handles one
        connection's packets in order, so everything sent before has been processed.
        Raises AssertionError if the connection closes or nothing comes back."""
        if not self.send(pingreq()):
            raise AssertionError("connection closed before the ping")
        seen: list[Packet] = []
        while True:
            p = self.read(timeout)
            if p is None:
                raise AssertionError(f"no PINGRESP ({'closed' if self.closed else 'timeout'}); "
                                     f"saw {[(x, x.body[:8]) for x in seen]}")
            if p.type == PINGRESP:
                return seen
            seen.append(p)

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.close()

    def abort(self) -> None:
        """Close with a TCP RST (SO_LINGER 0): an abrupt network loss."""
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close()
