"""MQTT 5 on the wire for the broker benchmark (and the broker tests): hand-made
packets and a blocking connection over a raw socket, so that the load generator costs
the shared cores as little as possible. The SA1 parts (authentication method, AUTH
packets, properties) are structauth.mqtt_binding's.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import socket
import time
from typing import TYPE_CHECKING, Any

from structauth import mqtt_binding
from structauth.mqtt_binding import packet, varint
from structauth.wire import var16

if TYPE_CHECKING:
    from simulator.fleet import Member
    from structauth.credentials import Identity, TrustStore
    from structauth.handshake import Initiator
    from structauth.session import Session

HOST = "127.0.0.1"


def _str(value: str | bytes) -> bytes:
    return var16(value.encode() if isinstance(value, str) else value)


def connect_packet(client_id: str, auth_data: bytes | None = None, keepalive: int = 600) -> bytes:
    """MQTT 5 CONNECT, clean start; with ``auth_data``, SA1 msg1 as Authentication Data."""
    props = mqtt_binding.auth_properties(auth_data) if auth_data is not None else b""
    body = (_str("MQTT") + bytes((5, 0x02)) + keepalive.to_bytes(2, "big")
            + varint(len(props)) + props + _str(client_id))
    return packet(0x10, body)


def subscribe_packet(topic_filter: str, packet_id: int = 1) -> bytes:
    return packet(0x82, packet_id.to_bytes(2, "big") + b"\x00" + _str(topic_filter) + b"\x00")


def publish_packet(topic: bytes, payload: bytes) -> bytes:
    """QoS 0 PUBLISH without properties."""
    return packet(0x30, _str(topic) + b"\x00" + payload)


def auth_data_of(body: bytes) -> tuple[int, bytes | None]:
    """(reason code, Authentication Data) of an AUTH packet's body (the binding's own
    parser: paho's general Properties parser costs the connectors ~100 µs a packet,
    which the storm would bill to the cores the broker shares)."""
    reason, _, data = mqtt_binding.decode_auth(body)
    return reason, data


DISCONNECT = b"\xe0\x00"


def _split(buf: bytearray, start: int = 0) -> tuple[int, int, int] | None:
    """(first byte, body offset, end offset) of the whole packet at ``buf[start:]``, or
    None if it has not all arrived yet."""
    length, mult, i = 0, 1, start + 1
    while True:
        if i >= len(buf):
            return None
        b = buf[i]
        length += (b & 0x7F) * mult
        i += 1
        if b < 0x80:
            break
        mult *= 128
    if len(buf) < i + length:
        return None
    return buf[start], i, i + length


class Conn:
    """A blocking MQTT 5 connection over a raw socket."""

    def __init__(self, port: int, timeout: float = 15.0) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()

    def read_packet(self) -> tuple[int, bytes]:
        while True:
            got = _split(self.buf)
            if got is not None:
                first, body_at, end = got
                body = bytes(self.buf[body_at:end])
                del self.buf[:end]
                return first, body
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the broker closed the connection")
            self.buf += data

    def connack(self) -> tuple[int, Any]:
        """(reason code, paho Properties) of the CONNACK."""
        first, body = self.read_packet()
        return _connack(first, body)

    def sa1_handshake(self, connect: bytes, initiator: Initiator) -> tuple[int, Session | None]:
        """Send ``connect`` (carrying ``initiator``'s msg1), answer the broker's msg2
        (AUTH 0x18) with msg3, read CONNACK: (its reason code, the session if 0)."""
        from structauth.credentials import TimePolicy

        self.sock.sendall(connect)
        first, body = self.read_packet()
        if first >> 4 != 15:  # refused at msg1: a CONNACK
            return _connack(first, body)[0], None
        reason, msg2 = auth_data_of(body)
        if reason != mqtt_binding.RC_CONTINUE_AUTHENTICATION or not msg2:
            raise ConnectionError(f"AUTH reason 0x{reason:02x} without SA1 msg2")
        wall = TimePolicy.trusted(dt.datetime.now(dt.UTC))
        done = initiator.receive(msg2, time.monotonic(), wall)
        self.sock.sendall(mqtt_binding.encode_auth(mqtt_binding.RC_CONTINUE_AUTHENTICATION,
                                                   done.reply))
        first, body = self.read_packet()
        if first >> 4 != 2:
            raise ConnectionError(f"expected CONNACK, got packet type {first >> 4}")
        rc = body[1]
        carried = (mqtt_binding.properties(mqtt_binding.property_block(body, 2)).get(
            mqtt_binding.PROP_AUTHENTICATION_DATA) if len(body) > 2 else None)
        if rc == 0 and carried:
            raise ConnectionError("CONNACK with authentication data: an SA1 v1 broker")
        return rc, done.session if rc == 0 else None

    def subscribe(self, topic_filter: str) -> None:
        self.sock.sendall(subscribe_packet(topic_filter))
        first, body = self.read_packet()
        if first >> 4 != 9 or body[-1] >= 0x80:
            raise ConnectionError(f"subscription to {topic_filter} refused: {body.hex()}")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(DISCONNECT)
        self.sock.close()


def _connack(first: int, body: bytes) -> tuple[int, Any]:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    if first >> 4 != 2:
        raise ConnectionError(f"expected CONNACK, got packet type {first >> 4}")
    props, _ = Properties(PacketTypes.CONNACK).unpack(  # type: ignore[no-untyped-call]
        body[2:])
    return body[1], props


def _initiator(member: Member, trust: TrustStore, broker: Identity) -> Initiator:
    from structauth.handshake import Initiator

    return Initiator(signer=member.signer, credential=member.credential, trust=trust,
                     expected_peer=broker)


def sa1_connect(port: int, member: Member, trust: TrustStore,
                broker: Identity) -> tuple[Conn, Session]:
    """The three-message handshake (CONNECT msg1, AUTH msg2, AUTH msg3, CONNACK)."""
    initiator = _initiator(member, trust, broker)
    conn = Conn(port)
    rc, session = conn.sa1_handshake(
        connect_packet(member.credential.identity.uri, initiator.start()), initiator)
    if session is None:
        conn.sock.close()
        raise ConnectionError(f"{member.credential.identity} refused: reason 0x{rc:02x}")
    return conn, session


def plain_connect(port: int, client_id: str) -> Conn:
    conn = Conn(port)
    conn.sock.sendall(connect_packet(client_id))
    reason, _ = conn.connack()
    if reason != 0:
        raise ConnectionError(f"plain CONNECT refused: reason 0x{reason:02x}")
    return conn
