"""The agent's MQTT 5 transport: paho-mqtt with the three-message SA1 handshake in
CONNECT / AUTH / AUTH before CONNACK, a proof on every PUBLISH, and re-authentication
inside the live connection (MQTT 5 AUTH).

Connecting: CONNECT carries Authentication Method ``tessera-sa1`` and SA1 msg1 (signed
by the device's hardware key, naming the broker it means to reach); the broker answers
msg2 in an AUTH packet (reason 0x18, continue authentication); the client checks it
(the broker must be exactly the configured identity) and sends msg3, its key
confirmation, in an AUTH packet (0x18); only then does the broker send CONNACK, log the
device in and take its client id over from an older connection. A CONNACK without that
exchange (or with msg2 in it: an SA1 v1 broker) is refused. Each PUBLISH payload is
then ``payload || SA1 header`` (31 bytes) proven under the session for its topic; the
broker verifies it and strips it before routing.

Re-authentication (:meth:`TesseraMqttClient.reauthenticate`): AUTH 0x19 with a new
msg1, AUTH 0x18 with msg2 from the broker, AUTH 0x18 with msg3 from the client, AUTH
0x00 from the broker. Mosquitto 2.0.11 treats ANY other packet from the client between
its 0x19 and its msg3 (PUBLISH, PUBACK, SUBSCRIBE, PINGREQ) as a protocol error and
closes the connection (handle_auth.c sets the state ``reauthenticating``; every other
handler requires ``active``), so the client holds every packet paho queues in that
round trip and sends them right behind msg3, in order. paho-mqtt 2.2 does not implement
AUTH: its packet dispatch (``Client._packet_handle``) treats an incoming AUTH as an
unknown command and drops the connection (MQTT_ERR_PROTOCOL).
:class:`device.paho_auth.AuthClient` subclasses paho's client, handles AUTH (and
the CONNACK 0x87 with which Mosquitto 2.0.11 refuses a re-authentication) before
handing every other packet to paho, and gates paho's one outgoing queue
(``_packet_queue``). Both are private paho APIs, used in that module only and checked
at import and by tests/test_paho_hooks.py.

The swap and in-flight messages: publishes are proven and queued under one lock, and
the swap takes the same lock when msg3 is queued, so every message goes out proven
under the session that was current when it was queued, and nothing under the new
session precedes msg3. paho may still hold QoS 1/2 messages back (beyond its in-flight
window) and send them after the swap, so the broker keeps the previous session for a
grace period (``rotation_grace_s``, default 30 s) and verifies each message under the
session its header names; the device does the same for deliveries the broker proved
under a previous session (:attr:`TesseraMqttClient.rotation_grace_s`; Mosquitto queues
QoS 1 deliveries beyond its own in-flight window after proving them at ingress).

Step-up: the broker asks with a message on ``tessera/step-up`` proven under this
device's session (it is delivered without a subscription). Requests that do not verify
are ignored and counted in :attr:`TesseraMqttClient.step_ups_ignored`; a verified one is
kept in :attr:`TesseraMqttClient.pending_step_up` and handed to :attr:`on_step_up` (on
its own thread). :meth:`TesseraMqttClient.answer_step_ups` installs the built-in
answer: ``reauthenticate(context=nonce, quote=quote_fn(nonce))``. If the connection is
lost before an answer got through, connect again with ``connect(context=nonce,
quote=...)`` within the broker's reconnect window.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from structauth import mqtt_binding as binding
from structauth.credentials import Credential, Identity, TimePolicy, TrustStore
from structauth.errors import Reason, TesseraError
from structauth.handshake import Initiator
from structauth.keys import Signer
from structauth.mqtt_binding import (
    AUTH_METHOD,
    EPOCH_REFUSAL,
    PACKET_CONNACK,
    RC_CONTINUE_AUTHENTICATION,
    RC_REAUTHENTICATE,
    RC_SUCCESS,
    RESYNC_TOPIC,
    STEP_UP_TOPIC,
    ReplacedSessions,
    decode_auth,
    encode_quote,
)
from structauth.session import Session

from .paho_auth import AuthClient

log = logging.getLogger("tessera.agent.mqtt")

#: refused deliveries whose reasons are kept (TesseraMqttClient.rejected)
REJECTED_KEPT = 256
#: what a re-handshake cures when protect() raises it
_RESYNC_REASONS = frozenset({Reason.EPOCH_OUT_OF_WINDOW, Reason.SESSION_EXPIRED,
                             Reason.SEQUENCE_EXHAUSTED})

class MqttError(TesseraError):
    """The broker refused us, or the connection failed."""


def _reason_string(properties: Any) -> str:
    """The MQTT 5 Reason String of a packet's properties (paho's), or ""."""
    return str(getattr(properties, "ReasonString", "") or "") if properties else ""


def _broker_error(what: str, code: int, text: str) -> MqttError:
    """A refusal or disconnection the broker explained with a reason code and maybe a
    reason string: ``what: 0x87 not authorized (tessera: credential_revoked)``."""
    detail = f"{what}: {binding.reason_text(code)}" + (f" ({text[:200]})" if text else "")
    return MqttError(detail, binding.broker_refusal(code, text))


def tpm_quote_fn(backend: Any, ak_name: str, pcrs: tuple[int, ...] = tuple(range(8))
                 ) -> Callable[[bytes], bytes]:
    """A ``quote_fn`` for :meth:`TesseraMqttClient.answer_step_ups`: TPM2_Quote of
    ``pcrs`` (SHA-256 bank) by the attestation key ``ak_name`` of a
    :class:`hw.tpm.TpmBackend`, with the nonce as qualifying data."""
    ak_public = backend.load_attestation_key(ak_name).public_area_bytes()

    def quote(nonce: bytes) -> bytes:
        attest, signature = backend.quote(ak_name, nonce, pcrs)
        return encode_quote(attest, signature, ak_public)

    return quote


@dataclass(frozen=True)
class StepUpRequest(binding.StepUpRequest):
    """A verified ``tessera/step-up`` request from the broker, and when it came."""

    received_at: float = 0.0  # the client's clock

    @classmethod
    def received(cls, payload: bytes, now: float) -> StepUpRequest:
        """The request in a verified payload (MalformedMessage if it is not one)."""
        request = binding.StepUpRequest.parse(payload)
        return cls(request.nonce, request.quote, request.reason, request.deadline_s, now)


@dataclass
class Outgoing:
    """A QoS 1/2 message published through :meth:`TesseraMqttClient.publish` that the
    broker has not accepted (yet): kept until its PUBACK/PUBCOMP, and after a refusal
    until it is resent under a newer session or given up."""

    topic: str
    payload: bytes  # without the proof: a resend is proven afresh
    qos: int
    retain: bool
    #: the session it was proven under (b"": not sent)
    session_id: bytes
    resends: int = 0
    refused_at: float = 0.0
    reason: str = ""
    #: the broker's answer to this attempt: None (none yet), "" (accepted) or why not
    verdict: str | None = None


class Publication:
    """What :meth:`TesseraMqttClient.publish` returns: paho's MQTTMessageInfo (``mid``,
    ``rc``, ``wait_for_publish()``, ``is_published()``) plus the broker's answer.

    At QoS 1/2 the broker answers (PUBACK/PUBREC): :meth:`accepted` waits for it and
    says whether the message was taken (a topic the policy denies, a refused proof:
    False, and :attr:`refused` says why). At QoS 0 there is no answer: a message
    counts as accepted once it is sent."""

    def __init__(self, info: Any, outgoing: Outgoing | None) -> None:
        self.info = info
        self._outgoing = outgoing

    def __getattr__(self, name: str) -> Any:
        return getattr(self.info, name)

    @property
    def refused(self) -> str | None:
        """Why the broker refused this message (its reason string, or the bare reason
        code, e.g. ``0x87``: Mosquitto 2.0.x drops plugins' reason strings); None if it
        did not (yet)."""
        out = self._outgoing
        return out.verdict or None if out is not None else None

    def accepted(self, timeout: float = 10.0) -> bool:
        """Wait for the broker's answer: True if it took the message, False if it
        refused it (:attr:`refused`). MqttError if nothing came within ``timeout``.
        (A message refused for its epoch is resent after a resynchronisation, and may
        be accepted then: this is the answer to the first attempt.)"""
        out = self._outgoing
        if out is not None and out.verdict is not None:
            return out.verdict == ""
        try:
            self.info.wait_for_publish(timeout)
        except (RuntimeError, ValueError) as exc:  # paho: not queued, or the connection went
            raise MqttError(f"not sent: {exc}", Reason.BACKEND_UNAVAILABLE) from None
        if not self.info.is_published():
            raise MqttError(f"no answer from the broker within {timeout:g} s",
                            Reason.BACKEND_UNAVAILABLE)
        return out is None or out.verdict == ""


class _Reauth:
    """One re-authentication: msg1 sent (AUTH 0x19), then msg3 sent, then done."""

    def __init__(self, initiator: Initiator, context: bytes) -> None:
        self.initiator = initiator
        self.context = context
        self.confirmed = False  # msg3 sent; waiting for the broker's AUTH 0x00
        self.done = threading.Event()
        self.session: Session | None = None
        self.error: MqttError | None = None

    def fail(self, error: MqttError) -> None:
        self.error = error
        self.done.set()


class TesseraMqttClient:
    """One device connection. ``connect()`` blocks until the handshake is done.

    ``broker`` is required: the identity of the broker this device means to reach. It is
    named in msg1 (a broker refuses a msg1 addressed to another) and msg2 must come from
    exactly it."""

    #: how long deliveries the broker proved under a replaced session still open
    rotation_grace_s: float = 30.0
    #: replaced sessions kept (newest last)
    max_previous: int = 4
    #: resynchronisation (:meth:`resync_on_refusal`): re-handshakes on an unproven
    #: sign (a delivery refused for its epoch, a PUBACK reason string) at most this
    #: often; a refused message is resent at most ``max_resends`` times, and one refused
    #: under the current session with no resync following is given up after
    #: ``refusal_hold_s`` (a refusal that was not about the clock: the topic is denied)
    resync_min_interval_s: float = 1.0
    max_resends: int = 3
    refusal_hold_s: float = 10.0
    #: refused (or unsent) QoS 1/2 messages kept for a resend; beyond it the oldest is
    #: given up (counted in refused_dropped)
    max_parked: int = 1000

    def __init__(
        self,
        *,
        signer: Signer,
        credential: Credential,
        trust: TrustStore,
        host: str,
        port: int,
        broker: Identity,
        tls_cafile: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        client_id: str | None = None,
        keepalive: int = 60,
        revoked: Callable[[Credential], bool] | None = None,
    ) -> None:
        if not isinstance(broker, Identity) or broker.kind != "broker":
            raise MqttError(f"broker must be the broker's Identity (spiffe://<trust domain>/"
                            f"broker/<name>), not {broker!r}", Reason.BAD_CONFIGURATION)
        self.signer = signer
        self.credential = credential
        self.trust = trust
        self.host, self.port = host, port
        self.broker = broker
        self.clock = clock
        self.wall_clock = wall_clock
        self.keepalive = keepalive
        self.client_id = client_id or credential.identity.uri
        self.session: Session | None = None
        #: why the broker ended the last connection, when it said (reason code and
        #: string); None if it did not, or the client closed it
        self.disconnect_error: MqttError | None = None
        self._replaced = ReplacedSessions(self.rotation_grace_s, self.max_previous)
        self._connected = threading.Event()
        self._failure: MqttError | None = None
        self._initiator: Initiator | None = None
        self._confirmed: Session | None = None  # msg3 sent, CONNACK not yet read
        self._context = b""
        # protect()/verify() from several threads, and the session swap
        self._lock = threading.RLock()
        self._reauth: _Reauth | None = None
        self._reauth_serial = threading.Lock()  # one re-authentication at a time
        #: the reasons of the most recent deliveries refused here (unproven, forged,
        #: stale), newest last; at most REJECTED_KEPT, the rest only counted
        self.rejected: deque[Reason] = deque(maxlen=REJECTED_KEPT)
        self.rejected_count = 0
        #: called (on paho's network thread) with each refused delivery's topic and reason
        self.on_rejected: Callable[[str, Reason], None] | None = None
        #: step-up: what to do with a verified request (on its own thread)
        self.on_step_up: Callable[[StepUpRequest], None] | None = None
        #: the last verified step-up request not answered yet
        self.pending_step_up: StepUpRequest | None = None
        self.step_ups_ignored = 0  # requests that did not verify
        self.step_ups_answered = 0
        self.step_ups_failed = 0
        self.reauthentications = 0
        self._quote_fn: Callable[[bytes], bytes] | None = None
        #: the broker's credential is checked against this in every handshake (True:
        #: revoked, any certificate of its chain); None: no revocation source
        self.revoked = revoked
        # -- resynchronisation and QoS 1/2 tracking (resync_on_refusal) --
        #: for the client's own timers (hold, rate limit): not the protocol clock
        self.timer: Callable[[], float] = time.monotonic
        self._track = threading.Lock()  # never taken around a paho call
        self._inflight: dict[int, Outgoing] = {}  # by packet id, until PUBACK/PUBCOMP
        self._early: dict[int, tuple[bool, str]] = {}  # acks that beat publish() back
        self._pubrec_refused: dict[int, str] = {}
        self._parked: list[Outgoing] = []  # refused, waiting for a resync or given up
        self._resync_cause: str | None = None
        self._deferred: str | None = None  # a request the rate limit held back
        self._resyncing = False
        self._last_resync = float("-inf")
        self._wake = threading.Event()
        self._worker: threading.Thread | None = None
        self._closing = False
        #: called (on the resync thread) after each resynchronisation attempt
        self.on_resynced: Callable[[], None] | None = None
        self.resyncs = 0  # re-handshakes done to resynchronise
        self.resync_failures = 0
        self.resync_requests: dict[str, int] = {}  # by cause, acted on or not
        self.resyncs_suppressed = 0  # unproven requests inside the rate limit
        self.resync_ignored = 0  # tessera/resync messages that did not verify
        self.acked = 0  # QoS 1/2 messages the broker accepted
        self.resent = 0
        self.refused_dropped = 0  # refused and given up
        self.client = AuthClient(
            CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5
        )
        self.client.auth_handler = self._on_auth_packet
        if tls_cafile:
            self.client.tls_set(ca_certs=tls_cafile)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.pubrec_handler = self._on_pubrec_refused
        self.client.message_callback_add(STEP_UP_TOPIC, self._on_step_up_message)
        self.client.message_callback_add(RESYNC_TOPIC, self._on_resync_message)

    # -- connection ------------------------------------------------------------
    def _new_initiator(self) -> Initiator:
        return Initiator(signer=self.signer, credential=self.credential, trust=self.trust,
                         expected_peer=self.broker)

    def connect(self, timeout: float = 15.0, *, context: bytes = b"",
                quote: bytes = b"") -> Session:
        """Connect with a fresh handshake (msg1 in CONNECT, msg2 and msg3 in AUTH, then
        CONNACK). ``context`` / ``quote``: to answer a step-up request after the
        connection it came on was lost (the nonce, and a quote over it when the request
        asked for one)."""
        self._initiator = self._new_initiator()
        self._confirmed = None
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.AuthenticationMethod = AUTH_METHOD
        props.AuthenticationData = self._initiator.start(context=context, quote=quote)
        self._context = context
        self._connected.clear()
        self._failure = None
        self.disconnect_error = None
        try:
            self.client.connect(self.host, self.port, keepalive=self.keepalive,
                                clean_start=True, properties=props)
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
        if context:
            self._answered(context)
        return self.session

    def _fail_connect(self, error: TesseraError) -> None:
        if self._failure is None:
            self._failure = error if isinstance(error, MqttError) else MqttError(
                error.detail, error.reason)
        self._connected.set()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any,
                    properties: Any) -> None:
        try:
            if reason_code.is_failure:
                raise _broker_error("the broker refused the connection", reason_code.value,
                                    _reason_string(properties))
            if getattr(properties, "AuthenticationData", None):
                raise MqttError("CONNACK carries authentication data: an SA1 v1 broker "
                                "(msg2 in CONNACK, no key confirmation); refused",
                                Reason.BAD_VERSION)
            if self._confirmed is None:
                raise MqttError("CONNACK before the SA1 handshake completed: not a "
                                "Tessera broker", Reason.MALFORMED)
            with self._lock:
                self.session = self._confirmed
                self._confirmed = None
                self._drop_previous()
            self._connected.set()
        except TesseraError as exc:
            self._fail_connect(exc)
            client.disconnect()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any,
                       properties: Any) -> None:
        """paho's network thread: the connection is gone. With a DISCONNECT from the
        broker (MQTT 5: Mosquitto 2.0.15+ sends one when it refuses a re-authentication
        or another connection takes the client id over) its reason code and reason
        string say why; 2.0.11 mostly just closes. The why is kept in
        :attr:`disconnect_error` (the agent reads it) and given to a waiting handshake."""
        held = self.client.drop_held()
        from_broker = bool(getattr(flags, "is_disconnect_packet_from_server", False))
        error = None
        if from_broker:
            error = _broker_error("the broker ended the connection",
                                  getattr(reason_code, "value", binding.RC_UNSPECIFIED_ERROR),
                                  _reason_string(properties))
            log.warning("%s", error.detail)
        if error is not None or self.disconnect_error is None:
            self.disconnect_error = error
        waiter = self._reauth
        if waiter is not None:
            self._reauth = None
            # a DISCONNECT from the broker here is its refusal (2.0.15+; 2.0.11 answers
            # with CONNACK 0x87, _on_connack): the same words either way
            waiter.fail(MqttError(
                (f"the broker refused the re-authentication (DISCONNECT): {error.detail}"
                 if error is not None else "the connection closed during re-authentication")
                + (f" ({held} packets held back were lost)" if held else ""),
                error.reason if error is not None else Reason.NOT_AUTHORIZED))
        if not self._connected.is_set():  # closed before CONNACK: refused
            self._fail_connect(error or MqttError(
                "the broker closed the connection during the handshake",
                Reason.NOT_AUTHORIZED))

    # -- re-authentication --------------------------------------------------------
    def reauthenticate(self, context: bytes = b"", quote: bytes = b"",
                       timeout: float = 10.0) -> Session:
        """A new SA1 handshake inside the live connection (MQTT 5 AUTH: 0x19 msg1,
        0x18 msg2, 0x18 msg3, 0x00); blocks until the broker answers. The new session
        replaces the current one when msg3 is queued; the connection stays up. Raises
        MqttError if the broker refuses (it then closes the connection) or does not
        answer within ``timeout``."""
        if threading.current_thread() is getattr(self.client, "_thread", None):
            raise MqttError("reauthenticate() waits for a packet paho's network thread must "
                            "read: call it from another thread, not a paho callback",
                            Reason.INVALID_STATE)
        with self._reauth_serial:
            if self.session is None or not self.client.is_connected():
                raise MqttError("not connected", Reason.INVALID_STATE)
            initiator = self._new_initiator()
            msg1 = initiator.start(context=context, quote=quote)  # the hardware signature
            waiter = _Reauth(initiator, context)
            self._reauth = waiter
            # from here until msg3, every other packet waits (Mosquitto 2.0.11 closes a
            # connection that sends anything else while it re-authenticates)
            rc = self.client.send_auth(RC_REAUTHENTICATE, msg1, hold=True)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._reauth = None
                self.client.drop_held()
                raise MqttError(f"cannot send AUTH: {mqtt.error_string(rc)}",
                                Reason.BACKEND_UNAVAILABLE)
            if not waiter.done.wait(timeout):
                # A late answer still completes the swap; the caller only learns it did
                # not come in time.
                raise MqttError(f"no AUTH reply within {timeout:g} s",
                                Reason.BACKEND_UNAVAILABLE)
            if waiter.error is not None:
                raise waiter.error
            assert waiter.session is not None
            self.reauthentications += 1
            if context:
                self._answered(context)
            return waiter.session

    def _on_auth_packet(self, command: int, body: bytes) -> Any:
        """paho's network thread: an AUTH packet, or a CONNACK on a live connection."""
        ok = MQTTErrorCode.MQTT_ERR_SUCCESS
        waiter = self._reauth
        if command == PACKET_CONNACK:
            # Mosquitto 2.0.11 refuses a re-authentication with CONNACK 0x87, then closes
            # (2.0.15+ sends DISCONNECT: _on_disconnect)
            reason = body[1] if len(body) > 1 else binding.RC_UNSPECIFIED_ERROR
            text = ""
            with contextlib.suppress(TesseraError, IndexError):
                raw = binding.properties(binding.property_block(body, 2)).get(
                    binding.PROP_REASON_STRING, b"")
                text = raw.decode("utf-8", "replace")
            error = _broker_error("the broker refused the re-authentication (CONNACK)",
                                  reason, text)
            self.disconnect_error = error
            self.client.drop_held()
            if waiter is not None:
                self._reauth = None
                waiter.fail(error)
            log.warning("%s", error.detail)
            return MQTTErrorCode.MQTT_ERR_CONN_REFUSED
        try:
            reason, method, data = decode_auth(body)
        except TesseraError as exc:
            reason, method, data = -1, None, None
            log.warning("malformed AUTH packet: %s", exc)
        if not self.client.is_connected():
            return self._connect_auth(reason, method, data)
        if waiter is None:
            log.warning("AUTH (reason %s) without a re-authentication of ours: "
                        "protocol error, disconnecting", reason)
            return MQTTErrorCode.MQTT_ERR_PROTOCOL
        if waiter.confirmed:  # msg3 went out: the broker's verdict
            self._reauth = None
            if reason != RC_SUCCESS or method not in (None, AUTH_METHOD):
                waiter.fail(MqttError(f"re-authentication failed: AUTH reason {reason:#04x}",
                                      Reason.NOT_AUTHORIZED))
                return MQTTErrorCode.MQTT_ERR_PROTOCOL
            waiter.done.set()
            return ok
        if reason != RC_CONTINUE_AUTHENTICATION or method != AUTH_METHOD or not data:
            self._reauth = None
            self.client.drop_held()
            why = ("the broker completed it without key confirmation (an SA1 v1 broker)"
                   if reason == RC_SUCCESS else
                   f"AUTH reason {reason:#04x}, method {method!r}, "
                   f"{'with' if data else 'without'} msg2")
            waiter.fail(MqttError(f"re-authentication failed: {why}", Reason.MALFORMED))
            return MQTTErrorCode.MQTT_ERR_PROTOCOL
        now = self.clock()
        try:
            done = waiter.initiator.receive(data, now, self._time_policy(),
                                            revoked=self.revoked)
        except TesseraError as exc:
            self._reauth = None
            self.client.drop_held()
            waiter.fail(MqttError(f"broker's re-authentication answer refused: {exc.detail}",
                                  exc.reason))
            return MQTTErrorCode.MQTT_ERR_PROTOCOL
        with self._lock:
            # msg3 first, then what waited (proven under the old session, which the
            # broker keeps for in-flight messages), then anything proven under the new one
            old = self.session
            self.session = done.session
            if old is not None:
                self._replaced.retire(old, now)
            waiter.session = done.session
            waiter.confirmed = True
            self.client.send_auth(RC_CONTINUE_AUTHENTICATION, done.reply, release=True)
        return ok

    def _time_policy(self) -> TimePolicy:
        """The wall clock, unless it is behind this device's own credential's notBefore
        (no RTC, booted in 1970): then only expiry before that floor is judged."""
        floor = self.credential.chain[0].not_valid_before_utc
        return TimePolicy.for_device(self.wall_clock(), floor)

    def _connect_auth(self, reason: int, method: str | None, data: bytes | None) -> Any:
        """AUTH before CONNACK: msg2 (reason 0x18); answer msg3."""
        initiator = self._initiator
        try:
            if initiator is None or self._confirmed is not None:
                raise MqttError("AUTH out of step during the handshake", Reason.MALFORMED)
            if reason != RC_CONTINUE_AUTHENTICATION or method != AUTH_METHOD or not data:
                raise MqttError(f"AUTH reason {reason:#04x}, method {method!r}, "
                                f"{'with' if data else 'without'} data: not SA1 msg2",
                                Reason.MALFORMED)
            done = initiator.receive(data, self.clock(), self._time_policy(),
                                     revoked=self.revoked)
        except TesseraError as exc:
            self._fail_connect(exc)
            return MQTTErrorCode.MQTT_ERR_PROTOCOL
        self._confirmed = done.session
        return self.client.send_auth(RC_CONTINUE_AUTHENTICATION, done.reply)

    # -- step-up -------------------------------------------------------------------
    def answer_step_ups(self, quote_fn: Callable[[bytes], bytes] | None = None) -> None:
        """Answer the broker's step-up requests by re-authenticating with the nonce as
        context, and ``quote_fn(nonce)`` (e.g. :func:`tpm_quote_fn`) as quote when the
        request asks for one. A request already received is answered now."""
        self._quote_fn = quote_fn
        self.on_step_up = self._answer_step_up
        pending = self.pending_step_up
        if pending is not None:
            self._dispatch(pending)

    def _on_step_up_message(self, client: Any, userdata: Any, msg: Any) -> None:
        data = bytes(msg.payload)
        try:
            request = StepUpRequest.received(self.open_delivery(msg.topic, data), self.clock())
        except TesseraError as exc:
            self.step_ups_ignored += 1
            self._rejected(msg.topic, exc.reason)
            log.warning("ignored a step-up request that the broker did not prove: %s", exc)
            return
        log.info("step-up requested by the broker (%s, quote %s, %d s)", request.reason,
                 request.quote, request.deadline_s)
        self.pending_step_up = request
        if self.on_step_up is not None:
            self._dispatch(request)

    def _dispatch(self, request: StepUpRequest) -> None:
        handler = self.on_step_up
        if handler is None:
            return

        def run() -> None:
            try:
                handler(request)
            except Exception as exc:  # the answer failed; the broker's deadline decides
                self.step_ups_failed += 1
                log.warning("step-up (%s) not answered: %s", request.reason, exc)

        # never on paho's network thread: the answer waits for a packet it must read
        threading.Thread(target=run, name="tessera-step-up", daemon=True).start()

    def _answer_step_up(self, request: StepUpRequest) -> None:
        quote = b""
        if request.quote:
            if self._quote_fn is None:
                raise MqttError("the broker asks for a TPM quote and this client has no "
                                "quote_fn", Reason.BAD_CONFIGURATION)
            quote = self._quote_fn(request.nonce)
        self.reauthenticate(context=request.nonce, quote=quote)
        self.step_ups_answered += 1

    def _answered(self, context: bytes) -> None:
        pending = self.pending_step_up
        if pending is not None and pending.nonce == context:
            self.pending_step_up = None

    # -- messages ----------------------------------------------------------------
    def proven(self, topic: str, payload: bytes) -> bytes:
        """``payload || header``: what goes on the wire for ``topic``."""
        with self._lock:
            if self.session is None:
                raise MqttError("not connected", Reason.INVALID_STATE)
            return binding.seal(self.session, topic, payload, self.clock())

    def publish(self, topic: str, payload: bytes, qos: int = 0,
                retain: bool = False) -> Publication:
        """Prove and send one message: a :class:`Publication` (paho's MQTTMessageInfo,
        and at QoS 1/2 the broker's answer: ``accepted()`` is False for a topic the
        policy denies). QoS 1/2 messages are tracked until the broker accepts them (see
        :meth:`resync_on_refusal`). If the session cannot prove it (keys of this epoch
        erased because the clock went back, session over because it jumped ahead), a
        resynchronisation is requested and the error raised: nothing was sent."""
        return self._send_tracked(topic, payload, qos, retain, 0)

    def _send_tracked(self, topic: str, payload: bytes, qos: int, retain: bool,
                      resends: int) -> Publication:
        # proven and queued under the lock the session swap takes, so nothing proven
        # under an old session is queued after a newer session's first message
        with self._lock:
            try:
                wire = self.proven(topic, payload)
            except TesseraError as exc:
                if exc.reason in _RESYNC_REASONS and self.session is not None:
                    self.request_resync(f"protect_{exc.reason.name.lower()}", local=True)
                raise
            assert self.session is not None
            sid = self.session.session_id
            info = self.client.publish(topic, wire, qos=qos, retain=retain)
        out = None
        if qos:
            out = Outgoing(topic, payload, qos, retain, sid, resends)
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                # not sent (the connection is going): kept for the next resync or the
                # next connection, and this attempt does not count as a resend
                out.session_id = b""
                out.resends = max(resends - 1, 0)
                self._refused(out, f"not sent: {mqtt.error_string(info.rc)}")
            else:
                with self._track:
                    early = self._early.pop(info.mid, None)
                    if early is None:
                        self._inflight[info.mid] = out
                if early is not None:
                    self._settled(out, *early)
        return Publication(info, out)

    # -- refusals and resynchronisation ---------------------------------------------
    def resync_on_refusal(self, on_resynced: Callable[[], None] | None = None) -> None:
        """Resynchronise by itself from now on (the agent turns this on).

        A message refused for its epoch means the two clocks disagree by more than the
        session's window (drift, or a step). The client re-handshakes inside the live
        connection (:meth:`reauthenticate`, make-before-break) when: the broker asks on
        ``tessera/resync`` naming the current session (proven: acted on at once);
        protect() cannot prove a message (its keys are gone: local, at once); a
        delivery the broker proved under the current session is refused here for its
        epoch, or a PUBACK/PUBREC says ``tessera: epoch_out_of_window`` (unproven: at
        most once per ``resync_min_interval_s``, so forged signs cost at most that).
        Then every QoS 1/2 message refused (PUBACK/PUBREC >= 0x80; Mosquitto 2.0.x
        gives no reason) under an older session, or never sent, is proven again under
        the new one and resent: a refusal means the broker routed nothing, so a resend
        is never a duplicate. ``on_resynced`` runs after each attempt (the agent sends
        what it buffered meanwhile)."""
        self.on_resynced = on_resynced
        if self._worker is None:
            self._worker = threading.Thread(target=self._resync_loop, name="tessera-resync",
                                            daemon=True)
            self._worker.start()

    def request_resync(self, cause: str, *, proven: bool = False, local: bool = False
                       ) -> bool:
        """Ask for a resynchronisation (done on the resync thread); False if one is
        already coming or the rate limit holds an unproven request back (it is then
        done once the limit allows)."""
        now = self.timer()
        with self._track:
            self.resync_requests[cause] = self.resync_requests.get(cause, 0) + 1
            if self._resyncing or self._resync_cause is not None:
                return False
            if not (proven or local) and now - self._last_resync < self.resync_min_interval_s:
                self.resyncs_suppressed += 1
                self._deferred = cause
                return False
            self._resync_cause = cause
        self._wake.set()
        return True

    def unacknowledged(self) -> list[Outgoing]:
        """Take every QoS 1/2 message not accepted by the broker (in flight, refused,
        never sent), oldest first: what a new connection must send again. One in
        flight when the connection died may have been routed (its PUBACK lost): QoS 1
        is at least once."""
        with self._track:
            out = sorted(self._parked, key=lambda o: o.refused_at)
            out += list(self._inflight.values())
            self._parked, self._inflight = [], {}
            self._early.clear()
        return out

    def _on_pubrec_refused(self, mid: int, code: int, text: str) -> None:
        with self._track:
            self._pubrec_refused[mid] = text or f"PUBREC {code:#04x}"

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any,
                    properties: Any) -> None:
        # paho's network thread, holding paho's message lock: no paho call, no self._lock
        code = getattr(reason_code, "value", 0) if reason_code is not None else 0
        text = str(getattr(properties, "ReasonString", "") or "") if properties else ""
        with self._track:
            pubrec = self._pubrec_refused.pop(mid, None)
            out = self._inflight.pop(mid, None)
            failed = code >= 0x80 or pubrec is not None
            if pubrec is not None:
                text = pubrec
            if out is None:  # publish() has not recorded it yet (or it was QoS 0)
                self._early[mid] = (failed, text)
                while len(self._early) > 1024:
                    self._early.pop(next(iter(self._early)))
                return
        self._settled(out, failed, text)

    def _settled(self, out: Outgoing, failed: bool, text: str) -> None:
        if not failed:
            out.verdict = ""
            with self._track:
                self.acked += 1
            return
        out.verdict = text or f"{binding.RC_NOT_AUTHORIZED:#04x}"
        self._refused(out, out.verdict)
        if text == EPOCH_REFUSAL:
            self.request_resync("puback_epoch")

    def _refused(self, out: Outgoing, why: str) -> None:
        out.refused_at = self.timer()
        out.reason = why
        if out.verdict is None:  # not sent at all
            out.verdict = why
        with self._track:
            self._parked.append(out)
            while len(self._parked) > self.max_parked:  # oldest first: given up
                gone = self._parked.pop(0)
                self.refused_dropped += 1
                log.warning("gave up %s (QoS %d): more than %d refused messages wait",
                            gone.topic, gone.qos, self.max_parked)
        session = self.session
        if session is None or out.session_id != session.session_id:
            self._wake.set()  # refused under an older session: resend it now

    def _on_resync_message(self, client: Any, userdata: Any, msg: Any) -> None:
        try:  # a refusal for the epoch here requests a resync itself (open_delivery)
            named = binding.resync_session(self.open_delivery(msg.topic, bytes(msg.payload)))
        except TesseraError as exc:
            self.resync_ignored += 1
            log.info("tessera/resync not verified: %s", exc)
            return
        session = self.session
        if session is not None and named == session.session_id:
            self.request_resync("broker", proven=True)

    def _resync_loop(self) -> None:
        while not self._closing:
            self._wake.wait(0.25)
            self._wake.clear()
            if self._closing:
                return
            now = self.timer()
            with self._track:
                if (self._resync_cause is None and self._deferred is not None
                        and now - self._last_resync >= self.resync_min_interval_s):
                    self._resync_cause, self._deferred = self._deferred, None
                cause = self._resync_cause
                if cause is not None:
                    self._resyncing = True
            if cause is not None:
                try:
                    if self.session is not None and self.client.is_connected():
                        self.reauthenticate()
                        self.resyncs += 1
                        log.info("re-handshook to resynchronise (%s)", cause)
                except MqttError as exc:
                    self.resync_failures += 1
                    log.warning("resynchronisation (%s) failed: %s", cause, exc)
                finally:
                    with self._track:
                        self._resyncing = False
                        self._resync_cause = self._deferred = None
                        self._last_resync = self.timer()
            self._resend_refused()
            if cause is not None and self.on_resynced is not None:
                try:
                    self.on_resynced()
                except Exception:  # the agent's business; never stop this thread
                    log.exception("on_resynced failed")

    def _resend_refused(self) -> None:
        """Resend what was refused under an older session (or never sent); give up on
        what was refused under the current one and waited ``refusal_hold_s`` for a
        resync that did not come."""
        session = self.session
        if session is None or not self.client.is_connected():
            return
        now = self.timer()
        take: list[Outgoing] = []
        with self._track:
            keep = []
            for out in self._parked:
                if out.session_id != session.session_id:
                    take.append(out)
                elif now - out.refused_at >= self.refusal_hold_s:
                    self.refused_dropped += 1
                    log.warning("gave up %s (QoS %d): refused (%s)", out.topic, out.qos,
                                out.reason)
                else:
                    keep.append(out)
            self._parked = keep
        for i, out in enumerate(take):
            if not self.client.is_connected():  # gone meanwhile: the next connection
                with self._track:
                    self._parked[:0] = take[i:]
                return
            if out.resends >= self.max_resends:
                with self._track:
                    self.refused_dropped += 1
                log.warning("gave up %s (QoS %d) after %d resends (%s)", out.topic, out.qos,
                            out.resends, out.reason)
                continue
            try:
                self._send_tracked(out.topic, out.payload, out.qos, out.retain,
                                   out.resends + 1)
            except TesseraError:
                with self._track:  # not sent: after the next resync, in order
                    for rest in take[i:]:
                        rest.session_id = b""
                    self._parked[:0] = take[i:]
                return
            with self._track:
                self.resent += 1

    def open_delivery(self, topic: str, data: bytes) -> bytes:
        """The payload of a message the broker proved to us (``payload || header``
        under this session, bound to ``topic``); raises a ProtocolError otherwise."""
        if self.session is None:
            raise MqttError("message without the broker's proof", Reason.TRUNCATED)
        body, header = binding.split(data)
        now = self.clock()
        with self._lock:
            current = self.session
            self._replaced.expire(now)
            # proven before the broker switched: the replaced session it names
            session = binding.pick_session(current, self._replaced, header, now) or current
            try:
                return session.verify(header, binding.action(topic), body, now).payload
            except TesseraError as exc:
                if (exc.reason is Reason.EPOCH_OUT_OF_WINDOW and session is current
                        and binding.session_id_of(header) == current.session_id):
                    # our clock and the broker's disagree: unproven (the epoch is read
                    # before any proof), hence rate-limited
                    self.request_resync("receive_epoch")
                raise

    def _rejected(self, topic: str, reason: Reason) -> None:
        self.rejected.append(reason)
        self.rejected_count += 1
        if self.on_rejected is not None:
            self.on_rejected(topic, reason)

    def _drop_previous(self) -> None:
        self._replaced.close()

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
                self._rejected(msg.topic, exc.reason)
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
        self._closing = True
        self._wake.set()
        self.client.disconnect()
        self.client.loop_stop()
        with self._lock:
            if self.session is not None:
                self.session.close()
            self._drop_previous()
