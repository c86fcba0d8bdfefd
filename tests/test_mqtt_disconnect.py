"""The device reads why the broker ended its connection (MQTT 5 DISCONNECT reason code
and reason string) and reports it.

Mosquitto 2.0.15+ ends a connection with a DISCONNECT carrying a reason code (0x87 for
a refused re-authentication, 0x8E when another connection takes the client id over);
the Debian 2.0.11 these tests run against mostly closes without one (tests with the
real broker: test_broker_mqtt, test_broker_shim). To test the client's side of the
newer behaviour here, a scripted broker speaks the few packets needed: a real SA1
responder answers the handshake, then the script sends what a newer broker sends.
That script is the only stand-in in these tests, and only for packets 2.0.11 cannot
produce.
"""

from __future__ import annotations

import datetime as dt
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from device.agent import revocation_of
from device.mqtt import MqttError, TesseraMqttClient
from simulator.fleet import Fleet
from structauth import mqtt_binding as mb
from structauth.credentials import TimePolicy
from structauth.errors import Reason
from structauth.handshake import Responder
from tests.support import wait_for


def _read(sock: socket.socket) -> tuple[int, bytes]:
    def exact(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    first = exact(1)[0]
    length, shift = 0, 0
    while True:
        b = exact(1)[0]
        length |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return first, exact(length)


def _msg1_of_connect(body: bytes) -> bytes:
    """SA1 msg1 in a CONNECT: after protocol name, level, flags, keepalive, properties."""
    at = 2 + int.from_bytes(body[:2], "big") + 1 + 1 + 2
    data = mb.properties(mb.property_block(body, at)).get(mb.PROP_AUTHENTICATION_DATA)
    assert data is not None
    return data


def _disconnect(code: int, reason: str) -> bytes:
    text = reason.encode()
    props = bytes([mb.PROP_REASON_STRING]) + len(text).to_bytes(2, "big") + text
    return mb.packet(mb.PACKET_DISCONNECT, bytes([code]) + mb.varint(len(props)) + props)


@dataclass
class Script:
    """What the scripted broker sends once the device is connected."""

    after_connack: bytes
    keepalive: int | None = None  # what the device's CONNECT asked for


@pytest.fixture
def fleet() -> Fleet:
    return Fleet(t0=dt.datetime.now(dt.UTC) - dt.timedelta(days=1))


@pytest.fixture
def scripted(fleet: Fleet) -> Iterator[tuple[int, Script, threading.Event]]:
    broker = fleet.member("broker", "mqtt-1")
    responder = Responder(signer=broker.signer, credential=broker.credential,
                          trust=fleet.trust)
    server = socket.create_server(("127.0.0.1", 0))
    script = Script(b"")
    done = threading.Event()

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            kind, body = _read(conn)
            assert kind == 0x10
            at = 2 + int.from_bytes(body[:2], "big") + 2  # name, level, flags
            script.keepalive = int.from_bytes(body[at:at + 2], "big")
            policy = TimePolicy.trusted(dt.datetime.now(dt.UTC))
            answered = responder.accept(_msg1_of_connect(body), 0.0, policy)
            conn.sendall(mb.encode_auth(mb.RC_CONTINUE_AUTHENTICATION, answered.reply))
            kind, body = _read(conn)
            _, method, msg3 = mb.decode_auth(body)
            assert kind == mb.PACKET_AUTH and method == mb.AUTH_METHOD and msg3
            responder.confirm(answered.pending, msg3, 0.0)
            conn.sendall(mb.packet(mb.PACKET_CONNACK, b"\x00\x00\x00"))
            conn.sendall(script.after_connack)
            done.wait(10)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], script, done
    finally:
        done.set()
        server.close()
        thread.join(5)


def _device(fleet: Fleet, port: int, keepalive: int = 60) -> TesseraMqttClient:
    member = fleet.member("device", "pi-d")
    return TesseraMqttClient(signer=member.signer, credential=member.credential,
                             trust=fleet.trust, host="127.0.0.1", port=port,
                             broker=fleet.member("broker", "mqtt-1").identity,
                             keepalive=keepalive)


def test_a_disconnect_with_a_reason_is_read_and_reported(
        fleet: Fleet, scripted: tuple[int, Script, threading.Event]) -> None:
    port, script, done = scripted
    script.after_connack = _disconnect(mb.RC_NOT_AUTHORIZED, "tessera: credential_revoked")
    device = _device(fleet, port)
    device.connect()
    wait_for(lambda: device.disconnect_error is not None, 10, "the disconnect's reason")
    error = device.disconnect_error
    assert isinstance(error, MqttError)
    assert error.reason is Reason.CREDENTIAL_REVOKED  # the reason string named it
    assert "0x87 not authorized" in error.detail and "credential_revoked" in error.detail
    assert revocation_of(error) is not None  # what the agent acts on
    done.set()
    device.client.loop_stop()


def test_a_takeover_is_reported_as_such(
        fleet: Fleet, scripted: tuple[int, Script, threading.Event]) -> None:
    port, script, done = scripted
    script.after_connack = mb.packet(mb.PACKET_DISCONNECT, bytes([mb.RC_SESSION_TAKEN_OVER]))
    device = _device(fleet, port)
    device.connect()
    wait_for(lambda: device.disconnect_error is not None, 10, "the disconnect's reason")
    error = device.disconnect_error
    assert error is not None and error.reason is Reason.NOT_AUTHORIZED
    assert "0x8e session taken over" in error.detail
    assert revocation_of(error) is None  # not a revocation: the agent retries
    done.set()
    device.client.loop_stop()


def test_the_configured_keepalive_is_what_connect_asks_for(
        fleet: Fleet, scripted: tuple[int, Script, threading.Event]) -> None:
    """mqtt.keepalive_s reaches the wire (the agent passes it as ``keepalive``)."""
    port, script, done = scripted
    device = _device(fleet, port, keepalive=17)
    device.connect()
    assert script.keepalive == 17
    done.set()
    device.client.loop_stop()
