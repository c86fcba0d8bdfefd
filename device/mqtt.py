"""The agent's MQTT 5 transport: paho-mqtt with SA1 in CONNECT/CONNACK and a proof on
every PUBLISH.

CONNECT carries Authentication Method ``tessera-sa1`` and SA1 msg1 (signed by the
device's hardware key) as Authentication Data; the broker answers msg2 in CONNACK, and
the session keys are derived on both sides. Each PUBLISH payload is then
``payload || SA1 header`` (31 bytes) proven under the session for its topic; the broker
verifies it and strips it before routing. Right after the handshake the client sends
an empty proven ``sa1/confirm`` message so the broker's session is confirmed even if
the application has nothing to say yet.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from structauth.credentials import Credential, Identity, TimePolicy, TrustStore
from structauth.errors import Reason, TesseraError
from structauth.handshake import Initiator
from structauth.keys import Signer
from structauth.session import HEADER_SIZE, Session

log = logging.getLogger("tessera.agent.mqtt")

AUTH_METHOD = "tessera-sa1"
CONFIRM_TOPIC = "sa1/confirm"


class MqttError(TesseraError):
    """The broker refused us, or the connection failed."""


class TesseraMqttClient:
    """One device connection. ``connect()`` blocks until the handshake is done."""

    def __init__(
        self,
        *,
        signer: Signer,
        credential: Credential,
        trust: TrustStore,
        host: str,
        port: int,
        broker: Identity | None = None,
        tls_cafile: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        client_id: str | None = None,
    ) -> None:
        self.signer = signer
        self.credential = credential
        self.trust = trust
        self.host, self.port = host, port
        self.broker = broker
        self.clock = clock
        self.wall_clock = wall_clock
        self.client_id = client_id or credential.identity.uri
        self.session: Session | None = None
        self._connected = threading.Event()
        self._failure: MqttError | None = None
        self._initiator: Initiator | None = None
        self._lock = threading.Lock()  # protect()/verify() from several threads
        self.rejected: list[Reason] = []
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5
        )
        if tls_cafile:
            self.client.tls_set(ca_certs=tls_cafile)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect

    # -- connection ------------------------------------------------------------
    def connect(self, timeout: float = 15.0) -> Session:
        self._initiator = Initiator(
            signer=self.signer, credential=self.credential, trust=self.trust,
            expected_peer=self.broker, peer_kind="broker",
        )
        props = Properties(PacketTypes.CONNECT)
        props.AuthenticationMethod = AUTH_METHOD
        props.AuthenticationData = self._initiator.start()
        self._connected.clear()
        self._failure = None
        try:
            self.client.connect(self.host, self.port, clean_start=True, properties=props)
        except OSError as exc:
            raise MqttError(f"cannot reach the broker at {self.host}:{self.port}: {exc}",
                            Reason.BACKEND_UNAVAILABLE) from None
        self.client.loop_start()
        if not self._connected.wait(timeout):
            self.close()
            raise MqttError("no CONNACK from the broker in time", Reason.BACKEND_UNAVAILABLE)
        if self._failure is not None:
            self.close()
            raise self._failure
        assert self.session is not None
        self.publish(CONFIRM_TOPIC, b"")
        return self.session

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any,
                    properties: Any) -> None:
        try:
            if reason_code.is_failure:
                raise MqttError(f"broker refused the connection: {reason_code}",
                                Reason.NOT_AUTHORIZED)
            msg2 = getattr(properties, "AuthenticationData", None)
            if not msg2 or self._initiator is None:
                raise MqttError("CONNACK without SA1 msg2: not a Tessera broker",
                                Reason.MALFORMED)
            done = self._initiator.receive(
                bytes(msg2), self.clock(), TimePolicy.trusted(self.wall_clock())
            )
            self.session = done.session
        except TesseraError as exc:
            self._failure = exc if isinstance(exc, MqttError) else MqttError(exc.detail,
                                                                              exc.reason)
            client.disconnect()
        finally:
            self._connected.set()

    def _on_disconnect(self, *args: Any) -> None:
        pass

    # -- messages ----------------------------------------------------------------
    def proven(self, topic: str, payload: bytes) -> bytes:
        """``payload || header``: what goes on the wire for ``topic``."""
        if self.session is None:
            raise MqttError("not connected", Reason.INVALID_STATE)
        with self._lock:
            header, body = self.session.protect(topic.encode(), payload, self.clock())
        return body + header

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> Any:
        return self.client.publish(topic, self.proven(topic, payload), qos=qos, retain=retain)

    def open_delivery(self, topic: str, data: bytes) -> bytes:
        """The payload of a message the broker proved to us (``payload || header``
        under this session, bound to ``topic``); raises a ProtocolError otherwise."""
        if self.session is None or len(data) < HEADER_SIZE:
            raise MqttError("message without the broker's proof", Reason.TRUNCATED)
        cut = len(data) - HEADER_SIZE
        with self._lock:
            return self.session.verify(
                data[cut:], topic.encode(), data[:cut], self.clock()
            ).payload

    def subscribe(self, topic: str, callback: Callable[[str, bytes], None], qos: int = 0,
                  *, proven: bool = True) -> None:
        """Deliver messages on ``topic`` to ``callback(topic, payload)``.

        ``proven`` (the default for a device): each message must carry the broker's
        proof under this session (the broker re-proves messages on topics that name one
        recipient, e.g. ``devices/{id}/commands/#``); anything else is dropped, logged
        and counted in :attr:`rejected`. ``proven=False`` hands payloads over as the
        broker routed them (fan-out topics; see docs/MQTT.md)."""
        def on_message(client: Any, userdata: Any, msg: Any) -> None:
            data = bytes(msg.payload)
            if not proven:
                callback(msg.topic, data)
                return
            try:
                payload = self.open_delivery(msg.topic, data)
            except TesseraError as exc:
                self.rejected.append(exc.reason)
                log.warning("dropped a message on %s: %s", msg.topic, exc)
                return
            callback(msg.topic, payload)

        self.client.message_callback_add(topic, on_message)
        done = threading.Event()
        granted: list[Any] = []

        def on_subscribe(client: Any, userdata: Any, mid: Any, codes: Any, props: Any) -> None:
            granted.extend(codes)
            done.set()

        self.client.on_subscribe = on_subscribe
        self.client.subscribe(topic, qos=qos)
        if not done.wait(10) or any(c.is_failure for c in granted):
            raise MqttError(f"subscription to {topic} refused: {granted}", Reason.NOT_AUTHORIZED)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        if self.session is not None:
            self.session.close()
