"""paho-mqtt plus MQTT 5 AUTH, for device/mqtt.py: the one module that uses paho's
private API.

paho-mqtt 2.x does not implement AUTH: its packet dispatch (``Client._packet_handle``)
treats an incoming AUTH as an unknown command and drops the connection. This subclass
handles AUTH (and the CONNACK 0x87 with which Mosquitto 2.0.11 refuses a
re-authentication) before handing every other packet to paho, and gates paho's one
outgoing queue (``_packet_queue``) so that nothing else goes out between a
re-authentication's msg1 and msg3. Checked at import; tests/test_paho_hooks.py fails
when a paho release changes what this relies on.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode

from structauth import mqtt_binding as binding
from structauth.errors import TesseraError
from structauth.mqtt_binding import PACKET_AUTH, PACKET_CONNACK, PACKET_PUBREC, encode_auth

if not all(hasattr(mqtt.Client, name) for name in ("_packet_handle", "_packet_queue")):
    raise ImportError("this paho-mqtt has no Client._packet_handle / _packet_queue, which "
                      "device.mqtt hooks for MQTT 5 AUTH: use paho-mqtt 2.x (tested on 2.2)")


class AuthClient(mqtt.Client):
    """paho's client plus MQTT 5 AUTH: incoming AUTH packets (and a CONNACK while
    connected: a refused re-authentication) go to ``auth_handler``; everything else to
    paho. Outgoing packets can be held back (:meth:`send_auth` with ``hold``) until the
    next AUTH is queued with ``release``."""

    auth_handler: Callable[[int, bytes], int] | None = None
    #: a PUBREC with a failure reason: (packet id, reason code, reason string). paho
    #: ignores PUBREC reason codes (it sends PUBREL anyway and reports the PUBCOMP's)
    pubrec_handler: Callable[[int, int, str], None] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._gate = threading.Lock()
        #: packets queued while a re-authentication is between its msg1 and its msg3
        self._held: list[tuple[int, bytes | bytearray, int, int, Any]] | None = None
        super().__init__(*args, **kwargs)

    def _packet_handle(self) -> Any:
        command = self._in_packet["command"] & 0xF0
        if command == PACKET_PUBREC and self.pubrec_handler is not None:
            body = bytes(self._in_packet["packet"])
            if len(body) >= 3 and body[2] >= 0x80:
                text = ""
                if len(body) > 3:
                    with contextlib.suppress(TesseraError):  # no reason string then
                        raw = binding.properties(binding.property_block(body, 3)).get(
                            binding.PROP_REASON_STRING, b"")
                        text = raw.decode("utf-8", "replace")
                self.pubrec_handler(struct.unpack("!H", body[:2])[0], body[2], text)
        handler = self.auth_handler
        if handler is not None and (command == PACKET_AUTH or (
                command == PACKET_CONNACK and self.is_connected())):
            return handler(command, bytes(self._in_packet["packet"]))
        return super()._packet_handle()

    def _packet_queue(self, command: int, packet: bytes | bytearray, mid: int, qos: int,
                      info: Any = None) -> Any:
        # every outgoing packet passes here (PUBLISH, PUBACK, SUBSCRIBE, PINGREQ, ...),
        # from the application's threads and from paho's network thread
        with self._gate:
            if self._held is not None and command & 0xF0 != PACKET_AUTH:
                self._held.append((command, packet, mid, qos, info))
                return MQTTErrorCode.MQTT_ERR_SUCCESS
            return super()._packet_queue(command, packet, mid, qos, info)

    def _call_socket_open(self, sock: Any) -> None:
        # TCP_NODELAY: the handshake's small AUTH packets and a re-authentication's msg1
        # right behind a publish would otherwise wait for the broker's delayed ACK
        # (40 ms on Linux; measured: re-auth 45-50 ms -> a few ms)
        with contextlib.suppress(OSError, AttributeError):  # not TCP: nothing to tune
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super()._call_socket_open(sock)

    def send_auth(self, reason: int, data: bytes | None, *,
                  hold: bool = False, release: bool = False) -> Any:
        """Queue an AUTH packet behind what paho has queued already. ``hold``: every
        later packet waits (a re-authentication's msg1 went out); ``release``: what
        waited goes out right behind this one, in order (msg3 went out)."""
        with self._gate:
            if self._sock is None:
                self._held = None
                return MQTTErrorCode.MQTT_ERR_NO_CONN
            rc = super()._packet_queue(PACKET_AUTH, encode_auth(reason, data), 0, 0)
            if hold:
                self._held = []
            if release:
                held, self._held = self._held or [], None
                for packet in held:
                    super()._packet_queue(*packet)
            return rc

    def drop_held(self) -> int:
        """Forget what is held (the connection is gone); how many packets."""
        with self._gate:
            held, self._held = self._held or [], None
            return len(held)
