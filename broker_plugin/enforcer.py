"""What the broker decides, without IO: handshakes in CONNECT/CONNACK, the proof on
every PUBLISH, topic ACLs, revocation and expiry of live sessions.

The Mosquitto shim calls :mod:`broker_plugin.host`, which calls this on the broker's
own thread with a monotonic ``now``; anything that needs IO (the revocation feed, the
audit file, metrics over HTTP) lives in host threads and reaches the enforcer through
:meth:`Enforcer.revoke` and the tick. Every refusal has a :class:`Reason`, is counted
and audited, and disturbs nothing else.

On the wire (MQTT 5), three messages before anything is granted:

* CONNECT carries Authentication Method ``tessera-sa1`` and SA1 msg1 as Authentication
  Data. The client id must be the identity in the credential (its SPIFFE URI), and msg1
  must name this broker. :meth:`Enforcer.connect` answers msg2, which Mosquitto sends in
  an AUTH packet (reason 0x18, continue authentication), and keeps a *pending*
  handshake: no Client record, no audit record, no step-up, no breaker count; Mosquitto
  itself takes no client-id over and accepts no PUBLISH or SUBSCRIBE until CONNACK.
* The client answers with an AUTH packet (0x18) carrying msg3, the key confirmation.
  :meth:`Enforcer.confirm` verifies it; only then is there a session, an identity
  logged in (``handshake_ok``), a client-id takeover and CONNACK. A replayed msg1 (after
  the nonce cache forgot it, after a restart, at another broker) gets msg2 at most and
  can never produce msg3.
* Re-authentication on a live connection is the same three steps: AUTH 0x19 with msg1,
  AUTH 0x18 with msg2, AUTH 0x18 with msg3, AUTH 0x00 from the broker. Mosquitto 2.0.11
  treats any other packet from the client between its 0x19 and its msg3 as a protocol
  error (the client holds its packets back meanwhile: device/mqtt.py).
* Pending handshakes are bounded (:class:`PendingLimits`: per client id, per source
  address, in total) and live until the responder's ``pending_timeout``; a new one
  evicts the oldest pending one of its client id, source or the whole table, never a
  confirmed session.
* A PUBLISH payload is ``application payload || SA1 header`` (31 bytes, a trailer). The
  broker verifies it under the publisher's session with the topic as the action and
  delivers the payload without the trailer.
* Toward a single recipient (a topic the policy's ``direct`` templates name for one
  device, e.g. ``devices/{id}/commands/#``) the broker re-proves the message under
  that device's session, so the device knows it came through the broker from an
  authenticated sender.

Step-up (fresh hardware proof on a live connection; knobs in
:class:`~broker_plugin.stepup.StepUpSettings`):

* Triggers: a publish to a topic the policy's ``step_up`` rules name (that publish is
  refused, PUBACK 0x87, until the device has stepped up within ``fresh_s`` on this
  connection, with a TPM quote if the rule asks); a device connecting from a network
  (IPv4 /24, IPv6 /64) it has not used before (its publishes are refused until it steps
  up; the first connect an identity ever makes is learned, not questioned); a device's
  message rate far above its own baseline (an EWMA per identity; the device is asked,
  not blocked); a policy change, or a change of the broker's credential or trust bundle
  (every live session is asked, with ``change_grace_s`` to answer).
* The ask: a tick action ``("publish", client_id, "tessera/step-up", payload, 1,
  False)``, payload ``{"nonce": b64 of 32 random bytes, "quote": bool, "reason":
  trigger, "deadline_s": int}`` followed by an SA1 header proving it under the device's
  session (as direct deliveries are), so only the broker can ask. One outstanding
  challenge per identity, with a deadline.
* The answer: an MQTT 5 AUTH packet, reason 0x19 (re-authenticate), method
  ``tessera-sa1``, data a new SA1 msg1 whose signed ``context`` is the nonce (compared
  in constant time) and whose ``quote`` is a TPM quote over it when asked (checked by
  :func:`broker_plugin.stepup.verify_quote`; its docstring says what that proves).
  msg2 goes back in an AUTH packet (0x18); the nonce and the quote are judged only once
  the device's msg3 has verified (a replayed msg1 carrying a nonce earns nothing, and a
  wrong one counts nothing toward quarantine). The new session then replaces the old one
  in the live connection. A re-authentication with an empty context is a plain rotation (the
  agent's make-before-break before the session lifetime ends), always allowed (an
  outstanding challenge stays outstanding). While a challenge is outstanding, a context
  that is not its nonce, or a missing or bad quote when one was asked, is a failed
  step-up: refused (Mosquitto 2.0.11 then sends CONNACK 0x87 and closes the
  connection; 2.0.15+ sends DISCONNECT 0x87). With no challenge outstanding a context
  is a stale answer and is ignored: the handshake counts as a plain one.
* In-flight messages across a swap: a replaced session keeps verifying messages whose
  header names it (the header carries the session id, so nothing is tried twice) for
  ``rotation_grace_s`` (30 s, the epoch window of the default parameters; at most
  MAX_PREVIOUS replaced sessions per connection), so QoS 1 messages proven before the
  swap and sent after it (paho holds back everything beyond its in-flight window, and
  an agent flushing its offline buffer proves hundreds at once) still pass. A message
  under a replaced session never counts as stepped up.
* Fallback: a device that has not answered at the deadline is kicked (Mosquitto 2.0.11
  offers plugins no DISCONNECT with a reason). The challenge outlives the connection for
  ``reconnect_window_s``: a fresh CONNECT whose msg1 context carries the nonce answers
  it; a CONNECT without it gets the request again on its new session.
* Circuit breaker: ``quarantine_failures`` failed step-ups (wrong nonce, bad or missing
  quote, no answer in time) or ``quarantine_rejections`` rejected messages within
  ``quarantine_window_s`` quarantine the identity for ``quarantine_s``: it is kicked and
  its handshakes are refused until the time has passed.

Audit events: ``step_up_requested``, ``step_up_ok``, ``step_up_failed``,
``quarantined``, ``released``, each with the session id where there is one.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import heapq
import hmac
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from broker_plugin.paths import (
    ACL_CONFIRMED,
    ACL_DELAYED,
    ACL_RETAIN,
    ACL_WILL,
    reserved_topic,
)
from broker_plugin.pending import Pending, PendingHandshakes
from broker_plugin.pending import PendingLimits as PendingLimits  # re-exported (host)
from broker_plugin.stepup import (
    LRU,
    NEW_NETWORK,
    RATE_SPIKE,
    SENSITIVE_TOPIC,
    Challenge,
    Counter,
    NetworkMemory,
    QuoteError,
    RateMeter,
    StepUpSettings,
    VerifiedQuote,
    network_of,
    verify_quote,
)
from structauth.credentials import Credential, Identity, TimePolicy
from structauth.errors import AuthorizationError, MalformedMessage, Reason, TesseraError
from structauth.events import HandshakeConfirmed
from structauth.fanout import ANCHOR_TOPIC, HELLO_TOPIC, FanoutSigner
from structauth.handshake import Responder, msg3_session_id
from structauth.mqtt_binding import (
    AUTH_METHOD,
    MAX_REPLACED,
    RC_NOT_AUTHORIZED,
    RC_PAYLOAD_FORMAT_INVALID,
    REKEYED_TOPIC,
    RESYNC_TOPIC,
    STEP_UP_TOPIC,
    ReplacedSessions,
    action,
    pick_session,
    refusal_text,
    resync_payload,
    seal,
    session_id_of,
    split,
)
from structauth.params import SessionParams
from structauth.session import Session, SessionState

SCAN_INTERVAL_S = 0.05
#: stale timer entries tolerated beyond twice the live sessions before a compaction
COMPACT_SLACK = 256

# Mosquitto return codes (mosquitto.h)
MOSQ_ERR_AUTH_CONTINUE = -4
MOSQ_ERR_SUCCESS = 0
MOSQ_ERR_AUTH = 11
MOSQ_ERR_ACL_DENIED = 12
MOSQ_ERR_PLUGIN_DEFER = 17
# mosquitto_plugin.h access values for ACL checks
MOSQ_ACL_READ = 0x01
MOSQ_ACL_WRITE = 0x02
MOSQ_ACL_SUBSCRIBE = 0x04
MOSQ_ACL_UNSUBSCRIBE = 0x08

# Reasons a rejected PUBLISH maps to, for QoS 1/2 publishers (PUBACK/PUBREC reason).
_PUBLISH_RC = {
    Reason.NOT_AUTHORIZED: RC_NOT_AUTHORIZED,
    Reason.EPOCH_OUT_OF_WINDOW: RC_NOT_AUTHORIZED,
    Reason.REPLAYED: RC_NOT_AUTHORIZED,
    Reason.CREDENTIAL_REVOKED: RC_NOT_AUTHORIZED,
    Reason.CREDENTIAL_EXPIRED: RC_NOT_AUTHORIZED,
}


class AuthAnswer(NamedTuple):
    rc: int
    data: bytes | None


class MessageAnswer(NamedTuple):
    rc: int  # 0: route it; otherwise drop it
    payload: bytes | None  # replacement payload (None: unchanged)
    reason_code: int  # MQTT 5 reason for the publisher (0: leave as is)
    reason: str | None


ROUTE_UNCHANGED = MessageAnswer(MOSQ_ERR_SUCCESS, None, 0, None)


@dataclass
class Client:
    """One authenticated connection."""

    client_id: str
    identity: Identity
    credential: Credential
    cert_serial: str
    device_class: str
    session: Session
    address: str
    not_after: dt.datetime
    rejections: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    #: sessions this connection's re-authentications replaced, by session id, each
    #: still verifying messages that name it until its time (in-flight QoS 1 across
    #: swaps); newest last, at most MAX_PREVIOUS (the grace is set at login)
    previous: ReplacedSessions = field(default_factory=ReplacedSessions)
    #: last successful step-up on this connection (monotonic), and whether it carried a
    #: verified TPM quote
    stepped_up_at: float | None = None
    stepped_up_quote: bool = False
    #: the identity's message-rate baseline (devices, when the rate trigger is on)
    rate: RateMeter | None = None
    #: topic -> the policy's step-up rule for it (key None: the policy it came from)
    step_ups: dict[Any, Any] = field(default_factory=dict)
    #: the session's receive direction is in the broker's C fast lane
    fast: bool = False
    #: when this session was last asked to re-handshake (tessera/resync)
    resync_at: float = float("-inf")


DEFAULT_DIRECT = ("devices/{id}/commands/#",)
#: replaced sessions kept per connection (rotations faster than this lose the oldest)
MAX_PREVIOUS = MAX_REPLACED
#: session ids remembered per identity (its newest sessions, over all its connections),
#: so a message under one of its own older sessions is told from a foreign session id
RECENT_SESSIONS = 16
#: refusals that say nothing against the sender when they concern one of its own
#: confirmed sessions: a clock that drifted or stepped (epoch), a message seen already
#: (a retransmission), a session that ended under a message still in flight
_HONEST = frozenset({Reason.EPOCH_OUT_OF_WINDOW, Reason.REPLAYED, Reason.SESSION_EXPIRED})
_UNKNOWN = object()
_STEP_UP_CACHE = 256  # topics remembered per connection


def direct_recipient(templates: tuple[tuple[str, ...], ...], topic: str) -> str | None:
    """The device name a topic addresses, if it matches a ``direct`` template (one
    ``{id}`` level; ``+`` and a final ``#`` as in MQTT); None otherwise."""
    levels = topic.split("/")
    for template in templates:
        found = None
        for i, part in enumerate(template):
            if part == "#":
                break
            if i >= len(levels):
                found = None
                break
            if part == "{id}":
                found = levels[i]
            elif part != "+" and part != levels[i]:
                found = None
                break
        else:
            if len(levels) != len(template):
                found = None
        if found:
            return found
    return None


class Enforcer:
    def __init__(
        self,
        responder: Responder,
        policy: Any,  # broker_plugin.policy.PolicyHolder or Policy (``.current`` or direct)
        *,
        wall_clock: Callable[[], dt.datetime],
        direct: tuple[str, ...] = DEFAULT_DIRECT,
        device_class_of: Callable[[Identity], str] = lambda identity: "default",
        audit: Callable[..., object] = lambda event, **fields: None,
        count: Callable[[str, str], None] = lambda metric, label: None,
        settings: StepUpSettings | None = None,
        metrics: Any = None,  # broker_plugin.metrics.BrokerMetrics
        timer: Callable[[], float] | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
        attestation_key_of: Callable[[Identity], bytes | None] = lambda identity: None,
        fast: Any = None,  # broker_plugin.fastlane.FastLane, inside the broker
        pending: PendingLimits | None = None,
    ) -> None:
        self.responder = responder
        self._policy = policy
        self.wall_clock = wall_clock
        self.device_class_of = device_class_of
        self.audit = audit
        self.count = count
        self.metrics = metrics
        #: a high-resolution clock to time each verify for the metrics (None: not timed)
        self.timer = timer
        self.random_bytes = random_bytes
        #: the enrolled attestation key (marshalled TPM2B_PUBLIC) of an identity, if known
        self.attestation_key_of = attestation_key_of
        self.settings = settings or StepUpSettings()
        self._next_scan = float("-inf")
        self.clients: dict[str, Client] = {}
        self.direct = tuple(tuple(t.split("/")) for t in direct)
        self._device_prefix = f"spiffe://{responder.trust_domain}/device/"
        self.revoked_serials: set[str] = set()
        self._pending_kicks: list[str] = []
        self._outbox: list[tuple[Any, ...]] = []
        s = self.settings
        #: outstanding step-up challenges by identity URI (they outlive a kick)
        self.challenges: dict[str, Challenge] = {}
        self.networks = NetworkMemory(s.networks_per_identity, s.max_identities)
        self.rates: LRU = LRU(s.max_identities)
        self._failures: LRU = LRU(s.max_identities)
        self._rejected: LRU = LRU(s.max_identities)
        #: identity URI -> its newest session ids (RECENT_SESSIONS of them)
        self._recent_sessions: LRU = LRU(s.max_identities)
        #: quarantined identity URI -> monotonic time it is released
        self.quarantined: dict[str, float] = {}
        self._params: tuple[bytes, SessionParams] | None = None
        #: the C fast lane (None: everything in Python) and the policy its cached
        #: decisions came from
        self.fast = fast
        self._fast_policy: Any = None
        #: fan-out proofs (structauth.fanout), when configured, and who said hello
        self.fanout: FanoutSigner | None = None
        self.fanout_subscribers: dict[str, None] = {}
        #: handshakes answered with msg2 and waiting for msg3: nothing granted on them
        self.pending = PendingHandshakes(pending)
        self._handshake_results: dict[str | None, Any] = {}
        #: when each live session next needs the tick: (monotonic time, serial, client
        #: id, session id); an entry whose session was replaced or closed is dropped
        #: when it comes up. The tick looks only at what is due, not at every session.
        #: Entries name the session by id, never hold it: a disconnected device's
        #: session would otherwise live on until its entry came up (a credential's
        #: whole life for _expiries), about 2 KiB per handshake.
        self._timers: list[tuple[float, int, str, bytes]] = []
        #: the same for credential expiry, by wall time (checked against the wall clock
        #: on every scan, so a clock step is noticed within SCAN_INTERVAL_S); entries of
        #: ended sessions are compacted away (_compact), so it holds O(live sessions)
        self._expiries: list[tuple[dt.datetime, int, str, bytes]] = []
        self._timer_serial = 0
        #: client ids whose connection keeps replaced sessions for in-flight messages
        self._rotated: dict[str, None] = {}

    @property
    def policy(self) -> Any:
        return getattr(self._policy, "current", self._policy)

    def _session_params(self) -> SessionParams:
        """The responder's parameters with the current policy's digest, so every session
        (and every step-up after a policy change) tells the device which policy holds."""
        digest = getattr(self.policy, "digest", None)
        base = self.responder.params
        if not isinstance(digest, bytes) or len(digest) != 32:
            return base
        cached = self._params
        if cached is None or cached[0] != digest or cached[1].epoch_ms != base.epoch_ms:
            cached = (digest, dataclasses.replace(base, policy_digest=digest))
            self._params = cached
        return cached[1]

    # -- metrics ---------------------------------------------------------------------
    def _handshake_counted(self, result: bool | str) -> None:
        """One handshake event: ``ok`` (True; confirmed), ``refused`` (False), or
        ``pending`` (msg2 sent), ``expired`` / ``evicted`` (a pending one dropped)."""
        label = ("ok" if result else "refused") if isinstance(result, bool) else result
        self.count("handshakes", label)
        m = self.metrics
        if m is not None:
            if self._handshake_results.get(None) is not m:  # bound to these metrics
                self._handshake_results = {None: m}
            child = self._handshake_results.get(label)
            if child is None:
                child = self._handshake_results[label] = m.handshakes.labels(result=label)
            child.inc()

    def _rejection_counted(self, name: str, reason: Reason | None = None) -> None:
        self.count("rejections", name)
        if self.metrics is not None:
            self.metrics.rejected(reason if reason is not None else name)

    def _step_up_counted(self, result: str) -> None:
        self.count("step_ups", result)
        m = self.metrics
        if m is not None:
            if result == "ok":
                m.step_ups_ok.inc()
            elif result == "failed":
                m.step_ups_failed.inc()
            else:
                m.step_ups.labels(result=result).inc()

    # -- connect -----------------------------------------------------------------
    def basic_auth(self, client_id: str, address: str, protocol: int) -> int:
        """A client that sent no authentication method (or an MQTT 3.1.x client):
        Mosquitto skips extended auth for it and asks here. Always refused."""
        why = (
            f"MQTT {'5' if protocol == 5 else '3.1.x'} client without authentication "
            f"method {AUTH_METHOD!r}"
        )
        # an outsider's refusal like a bad msg1: summarised per source in the audit log,
        # every one counted in the metrics
        self._refused(client_id, address, AuthorizationError(why, Reason.NOT_AUTHORIZED),
                      stage="connect", reauth=False, now=time.monotonic())
        return MOSQ_ERR_AUTH

    def _revoked(self, credential: Credential) -> bool:
        """Revoked if any certificate of its chain is: revoking an intermediate revokes
        every credential issued under it."""
        revoked = self.revoked_serials
        return bool(revoked) and any(serial in revoked for serial in credential.serials)

    def _refused(self, client_id: str, address: str, exc: TesseraError, *, stage: str,
                 reauth: bool, now: float) -> AuthAnswer:
        """A handshake refused before key confirmation: nothing about it is proven (a
        replayed msg1 verifies too). Audited without a session, so the broker's audit
        writer summarises such refusals per source and interval
        (broker_plugin.audit.RefusalAggregation); the metrics count every one."""
        self.audit("handshake_refused", client_id=client_id, address=address,
                   reason=exc.reason.name.lower(), detail=exc.detail, reauth=reauth,
                   stage=stage)
        self._handshake_counted(False)
        if self.metrics is not None:
            self.metrics.rejected(exc.reason)
        return AuthAnswer(MOSQ_ERR_AUTH, None)

    def _claimed(self, client_id: str, now: float) -> Identity:
        """The identity a client id claims (it must be the credential's SPIFFE URI);
        refused before any cryptography if quarantined or not an identity."""
        until = self.quarantined.get(client_id)
        if until is not None and now < until:
            raise AuthorizationError(
                f"{client_id} is quarantined for another {until - now:.0f} s",
                Reason.NOT_AUTHORIZED)
        try:
            return Identity.parse(client_id)
        except TesseraError:
            raise AuthorizationError(f"client id {client_id!r} is not a Tessera identity "
                                     "(spiffe://<trust domain>/device|broker/<name>)",
                                     Reason.WRONG_IDENTITY) from None

    def connect(
        self, client_id: str, address: str, method: str, data: bytes | None, now: float,
        *, reauth: bool = False,
    ) -> AuthAnswer:
        """CONNECT with SA1 msg1, or (``reauth``) an AUTH 0x19 re-authentication on the
        live connection: answer msg2 (``MOSQ_ERR_AUTH_CONTINUE``: Mosquitto sends it in
        an AUTH packet, reason 0x18) and keep the handshake pending. Nothing is granted,
        recorded or audited as a login here: that waits for :meth:`confirm`."""
        try:
            if method != AUTH_METHOD:
                raise AuthorizationError(
                    f"authentication method {method!r} is not {AUTH_METHOD!r}",
                    Reason.NOT_AUTHORIZED)
            if not data:
                raise AuthorizationError("no SA1 msg1 in the authentication data",
                                         Reason.MALFORMED)
            claimed = self._claimed(client_id, now)
            if reauth and client_id not in self.clients:
                raise AuthorizationError("re-authentication on a connection the broker no "
                                         "longer holds (kicked)", Reason.NOT_AUTHORIZED)
            answered = self.responder.accept(
                data, now, TimePolicy.trusted(self.wall_clock()), revoked=self._revoked,
                expected_peer=claimed, params=self._session_params(),
            )
        except TesseraError as exc:
            return self._refused(client_id, address, exc, stage="msg1", reauth=reauth,
                                 now=now)
        for _ in self.pending.add(Pending(answered.pending, client_id, address, reauth)):
            self._handshake_counted("evicted")
        self._handshake_counted("pending")
        return AuthAnswer(MOSQ_ERR_AUTH_CONTINUE, answered.reply)

    def confirm(
        self, client_id: str, address: str, method: str, data: bytes | None, now: float,
        *, reauth: bool = False,
    ) -> AuthAnswer:
        """The client's AUTH (0x18) with SA1 msg3 for a handshake :meth:`connect`
        answered. Only when its key confirmation verifies is there a session and an
        identity: the login (takeover of the client id by Mosquitto after this returns,
        ``handshake_ok``, step-up credit, breaker counts) happens here."""
        try:
            if method != AUTH_METHOD:
                raise AuthorizationError(
                    f"authentication method {method!r} is not {AUTH_METHOD!r}",
                    Reason.NOT_AUTHORIZED)
            session_id = msg3_session_id(data) if data else None
            if data is None or session_id is None:
                raise MalformedMessage("no SA1 msg3 in the AUTH packet", Reason.MALFORMED)
            entry = self.pending.take(client_id, session_id)
            if entry is None:
                raise AuthorizationError(
                    "msg3 for no pending handshake of this client id (never answered, "
                    "expired or evicted)", Reason.UNKNOWN_SESSION)
            if entry.address != address or entry.reauth != reauth:
                entry.handshake.discard()
                raise AuthorizationError("msg3 from another connection than its msg1",
                                         Reason.UNKNOWN_SESSION)
            confirmed = self.responder.confirm(entry.handshake, data, now)
        except TesseraError as exc:
            return self._refused(client_id, address, exc, stage="msg3", reauth=reauth,
                                 now=now)
        # proven now; what may have changed during the round trip is checked once more
        problem = None
        if self._revoked(confirmed.credential):
            problem = AuthorizationError(f"{confirmed.peer} is revoked",
                                         Reason.CREDENTIAL_REVOKED)
        elif client_id in self.quarantined:
            problem = AuthorizationError(f"{client_id} is quarantined", Reason.NOT_AUTHORIZED)
        elif reauth and client_id not in self.clients:
            problem = AuthorizationError("re-authentication on a connection the broker no "
                                         "longer holds (kicked)", Reason.NOT_AUTHORIZED)
        if problem is not None:
            confirmed.session.close()
            self.audit("handshake_refused", client_id=client_id, address=address,
                       reason=problem.reason.name.lower(), detail=problem.detail,
                       reauth=reauth, stage="confirmed",
                       session=confirmed.session.session_id.hex())
            self._handshake_counted(False)
            if self.metrics is not None:
                self.metrics.rejected(problem.reason)
            return AuthAnswer(MOSQ_ERR_AUTH, None)
        return self._login(client_id, address, confirmed, now, reauth)

    def _login(self, client_id: str, address: str, confirmed: HandshakeConfirmed,
               now: float, reauth: bool) -> AuthAnswer:
        identity = confirmed.peer
        session = confirmed.session
        previous = self.clients.get(client_id)
        challenge = self.challenges.get(identity.uri)
        answered_challenge: Challenge | None = None
        quote: VerifiedQuote | None = None
        if confirmed.context and challenge is not None:
            problem = self._check_answer(identity, confirmed, challenge)
            if isinstance(problem, tuple):
                session.close()
                return self._step_up_refused(client_id, identity, address, previous,
                                             challenge, *problem, now=now, reauth=reauth)
            quote = problem
            answered_challenge = challenge
        client = Client(
            client_id=client_id,
            identity=identity,
            credential=confirmed.credential,
            cert_serial=_serial(confirmed.credential),
            device_class=self.device_class_of(identity),
            session=session,
            address=address,
            not_after=confirmed.credential.not_after,
        )
        rotated = reauth and previous is not None
        if previous is not None:
            if rotated:
                # same connection: the old session verifies what is still in flight
                if previous.fast:
                    self.fast.take_back(client_id, previous.session)
                kept = previous.previous
                kept.grace_s = self.settings.rotation_grace_s
                kept.retire(previous.session, now)
                client.previous = kept
                client.stepped_up_at = previous.stepped_up_at
                client.stepped_up_quote = previous.stepped_up_quote
                client.rejections = previous.rejections
            else:  # a new connection took the client id over
                if previous.fast:
                    self.fast.release(client_id)
                previous.session.close()
                previous.previous.close()
        if self.settings.rate_spike and identity.kind == "device":
            client.rate = self.rates.touch(identity.uri, lambda: RateMeter(now))
        if self.fast is not None and not session.params.sealed:
            # confirmed: from now on the C fast lane verifies this session
            client.fast = self.fast.adopt(client_id, session)
        self.clients[client_id] = client
        self._recent_sessions.touch(identity.uri, lambda: deque(maxlen=RECENT_SESSIONS)
                                    ).append(session.session_id)
        self._arm(client, now)
        heapq.heappush(self._expiries, (client.not_after, self._timer_serial, client_id,
                                        session.session_id))
        if client.previous:
            self._rotated[client_id] = None
        network = network_of(address)
        new_network = False
        if not self.networks.seen_before(identity.uri) or answered_challenge is not None:
            self.networks.learn(identity.uri, network)
        elif self.networks.knows(identity.uri, network):
            self.networks.learn(identity.uri, network)  # most recently used
        else:
            new_network = True
        self.audit("handshake_ok", client_id=client_id, identity=identity.uri,
                   session=session.session_id.hex(), address=address,
                   reauth=rotated, network=network, new_network=new_network,
                   previous_session=previous.session.session_id.hex() if rotated and previous
                   else None)
        self._handshake_counted(True)
        if answered_challenge is not None:
            del self.challenges[identity.uri]
            client.stepped_up_at = now
            client.stepped_up_quote = quote is not None
            self.audit("step_up_ok", client_id=client_id, identity=identity.uri,
                       session=session.session_id.hex(),
                       new_session=session.session_id.hex(),
                       previous_session=previous.session.session_id.hex() if previous else None,
                       trigger=answered_challenge.trigger, via="auth" if reauth else "connect",
                       quote=quote is not None,
                       ak_name=quote.ak_name.hex() if quote else None,
                       enrolled_ak=quote.enrolled_ak if quote else None,
                       pcr_selection=[[alg, list(pcrs)] for alg, pcrs in quote.pcr_selection]
                       if quote else None,
                       pcr_digest=quote.pcr_digest.hex() if quote else None,
                       latency_s=round(now - answered_challenge.issued_at, 6))
            self._step_up_counted("ok")
        elif challenge is not None and not reauth:
            # a fresh connection without the answer: ask again on its new session
            challenge.sent = False
            if challenge.timed_out:
                challenge.timed_out = False
                challenge.deadline = now + self.settings.deadline_s
                challenge.expires = challenge.deadline + self.settings.reconnect_window_s
            if self.fast is not None:
                self.fast.tick_soon()
        if new_network and self.settings.new_network and identity.kind == "device":
            self._request(client, NEW_NETWORK, self.settings.new_network_quote, now,
                          blocking=True,
                          detail=f"{address} is in {network}, a network this device has "
                                 "not used before")
        if rotated:
            # Mosquitto 2.0.11 sends a client nothing between its AUTH 0x19 and its
            # msg3 and, after the AUTH 0x00, sends what it queued meanwhile only once
            # something new is queued for it: this small proven message is that
            # something (tests/test_step_up.py)
            self._send(client, REKEYED_TOPIC, b"", now, qos=0)
        return AuthAnswer(MOSQ_ERR_SUCCESS, None)

    def _check_answer(
        self, identity: Identity, confirmed: HandshakeConfirmed, challenge: Challenge
    ) -> VerifiedQuote | tuple[str, str] | None:
        """The verified quote (or None when none was asked) if the confirmed handshake's
        msg1 answers the challenge; (reason, detail) if it does not."""
        if not hmac.compare_digest(confirmed.context, challenge.nonce):
            return ("wrong_nonce", "the handshake's context is not the outstanding nonce")
        if not challenge.quote:
            return None
        if not confirmed.quote:
            return ("quote_missing", "the step-up asked for a TPM quote and got none")
        try:
            return verify_quote(confirmed.quote, challenge.nonce,
                                self.attestation_key_of(identity))
        except QuoteError as exc:
            return ("bad_quote", exc.detail)

    def _step_up_refused(
        self, client_id: str, identity: Identity, address: str, previous: Client | None,
        challenge: Challenge, reason: str, detail: str, *, now: float, reauth: bool,
    ) -> AuthAnswer:
        self.audit("step_up_failed", client_id=client_id, identity=identity.uri,
                   session=previous.session.session_id.hex() if previous else None,
                   trigger=challenge.trigger, reason=reason, detail=detail, address=address,
                   via="auth" if reauth else "connect")
        self._step_up_counted("failed")
        self._handshake_counted(False)
        self._failed(identity.uri, now)
        return AuthAnswer(MOSQ_ERR_AUTH, None)

    def disconnect(self, client_id: str) -> None:
        client = self.clients.pop(client_id, None)
        if client is not None:
            if client.fast:
                self.fast.release(client_id)
            client.session.close()
            client.previous.close()

    # -- authorization -------------------------------------------------------------
    def acl(self, client_id: str, access: int, topic: str, now: float | None = None) -> int:
        """One ACL check; ``access`` is Mosquitto's access bit plus the shim's flags
        (broker_plugin/paths.py). WRITE for a PUBLISH: ``$CONTROL`` / ``$SYS`` refused,
        the retain flag only where the policy keeps retained messages, the rest decided
        in message() with the proof. WRITE for a Will: :meth:`_will`. SUBSCRIBE and READ
        (``$SYS``, ``$CONTROL`` and ``$share/<group>/...`` filters too): the subscribe
        templates."""
        if access & MOSQ_ACL_WRITE:
            if access & ACL_WILL:
                return self._will(client_id, access, topic, now)
            client = self.clients.get(client_id)
            if client is None:
                return MOSQ_ERR_ACL_DENIED
            why = reserved_topic(topic)
            if why is None and access & ACL_RETAIN:
                kept = self.policy.may_retain(client.identity, client.device_class, topic)
                why = None if kept else kept.reason
            if why is None:
                return MOSQ_ERR_SUCCESS  # the publish itself: message(), with its proof
            return self._reject(client, client_id, topic, Reason.NOT_AUTHORIZED, why,
                                time.monotonic() if now is None else now).rc
        client = self.clients.get(client_id)
        if client is None:
            if access == MOSQ_ACL_READ:
                return self._offline_read(client_id, topic)
            return MOSQ_ERR_ACL_DENIED
        if access == MOSQ_ACL_UNSUBSCRIBE:
            return MOSQ_ERR_SUCCESS
        if access == MOSQ_ACL_SUBSCRIBE:
            decision = self.policy.may_subscribe(client.identity, client.device_class, topic)
        else:  # READ: delivery of one message to this client
            decision = self.policy.may_subscribe(client.identity, client.device_class, topic)
        if decision.allowed:
            return MOSQ_ERR_SUCCESS
        self.audit("acl_denied", client_id=client_id, identity=client.identity.uri,
                   session=client.session.session_id.hex(), topic=topic,
                   access=access, detail=decision.reason)
        self._rejection_counted("acl_denied")
        return MOSQ_ERR_ACL_DENIED

    def _offline_read(self, client_id: str, topic: str) -> int:
        """A message for a subscriber that is away with a persisted session (MQTT 5
        session expiry, clean start false): Mosquitto queues it if READ is granted.
        Only a connection that completed key confirmation ever subscribed, under its
        identity as client id; the message passed its proof on the way in. Judged by
        that identity's subscribe templates; delivered only after the next
        confirmation (docs/MQTT.md, session resumption)."""
        try:
            identity = Identity.parse(client_id)
        except TesseraError:
            return MOSQ_ERR_ACL_DENIED
        if identity.trust_domain != self.responder.trust_domain:
            return MOSQ_ERR_ACL_DENIED
        decision = self.policy.may_subscribe(identity, self.device_class_of(identity), topic)
        return MOSQ_ERR_SUCCESS if decision else MOSQ_ERR_ACL_DENIED

    def _will(self, client_id: str, access: int, topic: str, now: float | None) -> int:
        """Mosquitto is about to publish a Will (no message callback follows): only for
        a connection that completed key confirmation, of an identity not quarantined,
        on one of its will topics (inside its publish grant), retained and delayed only
        where the policy allows. ``client_id`` is the identity (checked at CONNECT)."""
        retain, delayed = bool(access & ACL_RETAIN), bool(access & ACL_DELAYED)
        confirmed = bool(access & ACL_CONFIRMED)
        reason, detail, identity = "not_authorized", "", None
        if not confirmed:
            reason = "unconfirmed"
            detail = "the connection that set this Will never completed key confirmation"
        else:
            try:
                identity = Identity.parse(client_id)
            except TesseraError as exc:
                detail = exc.detail
            if identity is None:
                pass
            elif identity.trust_domain != self.responder.trust_domain:
                reason, detail = "wrong_identity", f"{identity} is not of this trust domain"
            elif self.quarantined.get(identity.uri, float("-inf")) > (
                    time.monotonic() if now is None else now):
                reason, detail = "quarantined", f"{identity.uri} is quarantined"
            else:
                decision = self.policy.may_will(identity, self.device_class_of(identity),
                                                topic, retain=retain, delayed=delayed)
                if decision:
                    self.audit("will_published", client_id=client_id, identity=identity.uri,
                               topic=topic, retain=retain, delayed=delayed,
                               detail=decision.reason)
                    self.count("wills", "published")
                    return MOSQ_ERR_SUCCESS
                detail = decision.reason
        self.audit("will_refused", client_id=client_id,
                   identity=identity.uri if identity else None, topic=topic, reason=reason,
                   detail=detail, retain=retain, delayed=delayed, confirmed=confirmed)
        self.count("wills", "refused")
        self._rejection_counted(f"will_{reason}")
        return MOSQ_ERR_ACL_DENIED

    # -- messages --------------------------------------------------------------------
    def message(self, client_id: str, topic: str, payload: bytes, now: float) -> MessageAnswer:
        """A PUBLISH from ``client_id``: verify its proof, check the topic, strip the
        proof. Anything wrong drops it, with a reason for QoS 1/2 publishers."""
        client = self.clients.get(client_id)
        if client is None:
            # Messages the broker itself injects (client_id empty) are ours already.
            if not client_id:
                return ROUTE_UNCHANGED
            return self._reject(None, client_id, topic, Reason.UNKNOWN_SESSION,
                                "no Tessera session for this client", now)
        try:
            body, header = split(payload)
        except TesseraError as exc:
            return self._reject(client, client_id, topic, exc.reason, exc.detail, now)
        # in flight across a re-authentication: the replaced session it names
        old = pick_session(client.session, client.previous, header, now)
        session = old or client.session
        try:
            timer = self.timer
            if timer is None:
                verified = session.verify(header, action(topic), body, now)
            else:
                t0 = timer()
                verified = session.verify(header, action(topic), body, now)
                self.metrics.verify_seconds.observe(timer() - t0)
        except TesseraError as exc:
            return self._reject(client, client_id, topic, exc.reason, exc.detail, now,
                                session=session, sid=session_id_of(header))
        return self._after_verify(client, client_id, topic, verified.payload, now, old)[0]

    def verified(self, client_id: str, topic: str, payload: bytes,
                 now: float) -> tuple[MessageAnswer, bool]:
        """A PUBLISH the fast lane verified (proof stripped) on a topic it has no
        decision for: the answer, and whether the fast lane may route this topic for
        this client from now on without asking."""
        client = self.clients.get(client_id)
        if client is None:  # cannot happen while the fast lane holds a record for it
            return self._reject(None, client_id, topic, Reason.UNKNOWN_SESSION,
                                "no Tessera session for this client", now), False
        return self._after_verify(client, client_id, topic, payload, now, None)

    def rejected(self, client_id: str, topic: str, reason: str, detail: str,
                 now: float) -> MessageAnswer:
        """A PUBLISH the fast lane refused: recorded like one refused here."""
        try:
            why = Reason[reason.upper()]
        except KeyError:
            why = Reason.MALFORMED
        client = self.clients.get(client_id)
        # the fast lane holds only a client's current session and passes every other
        # session id to message(): its refusals concern that session
        return self._reject(client, client_id, topic, why, detail, now,
                            session=client.session if client is not None else None)

    def _after_verify(self, client: Client, client_id: str, topic: str, payload: bytes,
                      now: float, old: Session | None) -> tuple[MessageAnswer, bool]:
        """Everything after the proof: rate, ACL, step-up, re-proving to a direct
        recipient. The flag: the answer depends on nothing but the policy and the topic
        (a plain route), so the fast lane may repeat it."""
        if self.metrics is not None:
            self.metrics.messages_in.inc()
        if topic == HELLO_TOPIC and self.fanout is not None:
            # a subscriber asks for fan-out proofs: the anchor goes back, proven under its
            # session (the time bound starts from when it sent this), then every key
            self.fanout_subscribers[client_id] = None
            self._send(client, ANCHOR_TOPIC, self.fanout.anchor(now, payload), now)
            return MessageAnswer(MOSQ_ERR_ACL_DENIED, None, 0, None), False
        s = self.settings
        meter = client.rate
        if meter is not None and meter.add(now, s):
            self._request(client, RATE_SPIKE, False, now, detail=(
                f"{meter.count} messages in under {s.rate_window_s:g} s against a "
                f"baseline of {meter.baseline:.2f}/s"))
        policy = self.policy
        decision = policy.may_publish(client.identity, client.device_class, topic)
        if not decision.allowed:
            return self._reject(client, client_id, topic, Reason.NOT_AUTHORIZED,
                                decision.reason, now), False
        challenge = self.challenges.get(client.identity.uri)
        if challenge is not None and challenge.blocking:
            return self._held(topic), False
        cache = client.step_ups
        if cache.get(None) is not policy:  # the policy changed: forget what it said
            cache.clear()
            cache[None] = policy
        step = cache.get(topic, _UNKNOWN)
        if step is _UNKNOWN:
            if len(cache) > _STEP_UP_CACHE:
                cache.clear()
                cache[None] = policy
            step = cache[topic] = policy.step_up_for(client.identity, client.device_class, topic)
        if step is not None and (
            old is not None  # never on a replaced session
            or client.stepped_up_at is None
            or now - client.stepped_up_at > s.fresh_s
            or (step.quote and not client.stepped_up_quote)
        ):
            self._request(client, SENSITIVE_TOPIC, step.quote, now, topic=topic,
                          detail=f"{topic} matches the step-up template {step.template!r}")
            return self._held(topic), False
        name = direct_recipient(self.direct, topic) if self.direct else None
        if name is None:
            # a plain route; repeatable unless a step-up rule or a challenge decides
            plain = step is None and old is None and challenge is None
            if self.fanout is not None:
                sealed = self.fanout.seal(action(topic), payload, now)
                if plain and self.fast is not None:  # C seals the rest of this interval
                    self.fast.seal_interval(self.fanout.interval_key(now))
                return MessageAnswer(MOSQ_ERR_SUCCESS, sealed, 0, None), plain
            return MessageAnswer(MOSQ_ERR_SUCCESS, payload, 0, None), plain
        # One named recipient: prove the message to it under its own session, so it
        # knows the broker routed it from an authenticated sender.
        recipient = self.clients.get(self._device_prefix + name)
        if recipient is None:
            return self._reject(client, client_id, topic, Reason.UNKNOWN_SESSION,
                                f"{name} is not connected; direct messages are not queued",
                                now), False
        try:
            proven = seal(recipient.session, topic, payload, now)
        except TesseraError as exc:
            return self._reject(client, client_id, topic, exc.reason,
                                f"cannot prove the message to {name}: {exc.detail}",
                                now), False
        if self.metrics is not None:
            self.metrics.messages_out.inc()
        return MessageAnswer(MOSQ_ERR_SUCCESS, proven, 0, None), False

    def _held(self, topic: str) -> MessageAnswer:
        """A genuine publish refused until the device steps up (not a breaker failure)."""
        self._rejection_counted("step_up_required")
        return MessageAnswer(MOSQ_ERR_ACL_DENIED, None, RC_NOT_AUTHORIZED,
                             "tessera: step_up_required")

    def _reject(
        self, client: Client | None, client_id: str, topic: str, reason: Reason, detail: str,
        now: float | None = None, *, session: Session | None = None, sid: bytes | None = None,
    ) -> MessageAnswer:
        """Drop a PUBLISH. ``session``: the sender's own confirmed session its proof was
        checked under (None: none was); ``sid``: the session id its header names.

        What counts toward quarantine: forgeries and garbage (``bad_tag``, ``malformed``,
        a foreign session id, a topic the policy denies...). What does not: a refusal
        for the epoch, a replay of an accepted sequence number or a session that ended,
        under one of the sender's own sessions, and a message naming one of its own
        older sessions: a drifting or stepped clock, a retransmission (a QoS 2 DUP
        before PUBREL, a QoS 1 DUP after a reconnect) or a message in flight across a
        re-handshake, none an attack. A refusal for the epoch on the current session
        also asks the device to re-handshake (:meth:`_ask_resync`)."""
        name = reason.name.lower()
        honest = client is not None and (
            (session is not None and reason in _HONEST)
            or (reason is Reason.UNKNOWN_SESSION and sid is not None
                and sid in self._recent_sessions.get(client.identity.uri, ())))
        resync = False
        if client is not None and reason is Reason.EPOCH_OUT_OF_WINDOW \
                and session is client.session and now is not None:
            resync = self._ask_resync(client, now)
        self.audit("message_rejected", client_id=client_id,
                   identity=client.identity.uri if client else None,
                   session=client.session.session_id.hex() if client else None,
                   topic=topic, reason=name, detail=detail, counted=not honest,
                   resync=resync)
        self._rejection_counted(name, reason)
        if client is not None:
            client.rejections += 1
            s = self.settings
            if not honest and now is not None and s.quarantine_rejections > 0:
                counter: Counter = self._rejected.touch(client.identity.uri, Counter)
                if counter.add(now, s.quarantine_window_s) >= s.quarantine_rejections:
                    self._quarantine(client.identity.uri, now, "rejected_messages",
                                     counter.count)
        rc = _PUBLISH_RC.get(reason, RC_NOT_AUTHORIZED if reason is Reason.NOT_AUTHORIZED
                             else RC_PAYLOAD_FORMAT_INVALID)
        return MessageAnswer(MOSQ_ERR_ACL_DENIED, None, rc, refusal_text(reason))

    def _ask_resync(self, client: Client, now: float) -> bool:
        """Ask ``client`` to re-handshake: a message of its current session was refused
        for its epoch, so its clock and ours disagree by more than the window. The ask
        is a small proven QoS 0 message on ``tessera/resync`` (``{"reason":
        "epoch_out_of_window", "session": hex}``, the refused session), at most one per
        session per ``resync_interval_s``. Mosquitto 2.0.x gives QoS 1/2 publishers a
        bare PUBACK/PUBREC 0x87 (it drops a plugin's reason string), so this message is
        how every publisher learns why. The device may not be able to verify it (its
        clock is the problem): a refusal for the epoch on a delivery is a reason to
        re-handshake too (device/mqtt.py). True if the request was queued."""
        if now - client.resync_at < self.settings.resync_interval_s:
            return False
        client.resync_at = now
        sent = self._send(client, RESYNC_TOPIC, resync_payload(client.session.session_id),
                          now, qos=0)
        if sent:
            self.count("resync_requests", "")
        return sent

    # -- step-up -----------------------------------------------------------------------
    def _request(
        self, client: Client, trigger: str, quote: bool, now: float, *,
        blocking: bool = False, deadline_s: float | None = None, detail: str = "",
        topic: str | None = None,
    ) -> Challenge:
        """Ask ``client`` to step up, unless a challenge is already outstanding for its
        identity (then that one stands; a blocking trigger makes it blocking)."""
        uri = client.identity.uri
        if blocking and client.fast:
            self.fast.forget_topics(client.client_id)  # its publishes are held from now
        current = self.challenges.get(uri)
        if current is not None:
            current.blocking = current.blocking or blocking
            return current
        deadline = now + (self.settings.deadline_s if deadline_s is None else deadline_s)
        challenge = Challenge(
            nonce=self.random_bytes(32), quote=quote, trigger=trigger, detail=detail,
            issued_at=now, deadline=deadline,
            expires=deadline + self.settings.reconnect_window_s, blocking=blocking,
        )
        self.challenges[uri] = challenge
        self.audit("step_up_requested", client_id=client.client_id, identity=uri,
                   session=client.session.session_id.hex(), trigger=trigger, quote=quote,
                   nonce=challenge.nonce.hex(), deadline_s=round(deadline - now, 3),
                   blocking=blocking, topic=topic, detail=detail)
        self._step_up_counted("requested")
        self._send_challenge(client, challenge, now)
        return challenge

    def _send_challenge(self, client: Client, challenge: Challenge, now: float) -> None:
        """Queue the proven request for the next tick (a confirmed session can send at
        once; a closed one cannot, and the request waits for the next connection)."""
        session = client.session
        if session.state is not SessionState.ESTABLISHED:
            return
        if self._send(client, STEP_UP_TOPIC, challenge.request(now).encode(), now):
            challenge.sent = True

    def _send(self, client: Client, topic: str, body: bytes, now: float,
              qos: int = 1) -> bool:
        """Queue a message from the broker to ``client`` alone, proven under its
        session (QoS 1 unless said, for the next tick); False if the session cannot
        send."""
        if client.session.state is not SessionState.ESTABLISHED:
            return False
        try:
            proven = seal(client.session, topic, body, now)
        except TesseraError:
            return False
        self._outbox.append(("publish", client.client_id, topic, proven, qos, False))
        if self.fast is not None:
            self.fast.tick_soon()
        if self.metrics is not None:
            self.metrics.messages_out.inc()
        return True

    def require_step_up_all(self, trigger: str, now: float, detail: str = "") -> list[str]:
        """A policy or key change: every live session must step up within
        ``change_grace_s`` or is kicked. Returns the client ids asked."""
        asked = []
        for client in list(self.clients.values()):
            self._request(client, trigger, False, now, deadline_s=self.settings.change_grace_s,
                          detail=detail)
            asked.append(client.client_id)
        return asked

    def _failed(self, uri: str, now: float) -> None:
        s = self.settings
        if s.quarantine_failures <= 0:
            return
        counter: Counter = self._failures.touch(uri, Counter)
        if counter.add(now, s.quarantine_window_s) >= s.quarantine_failures:
            self._quarantine(uri, now, "step_up_failures", counter.count)

    def _quarantine(self, uri: str, now: float, cause: str, failures: int) -> None:
        if uri in self.quarantined:
            return
        s = self.settings
        self.quarantined[uri] = now + s.quarantine_s
        self.challenges.pop(uri, None)
        self._failures.pop(uri, None)
        self._rejected.pop(uri, None)
        client = self.clients.get(uri)
        until = self.wall_clock() + dt.timedelta(seconds=s.quarantine_s)
        self.audit("quarantined", client_id=uri, identity=uri,
                   session=client.session.session_id.hex() if client else None,
                   cause=cause, failures=failures, window_s=s.quarantine_window_s,
                   quarantine_s=s.quarantine_s, until=until.isoformat())
        if self.metrics is not None:
            self.metrics.quarantined_devices.set(len(self.quarantined))
        if client is not None:
            self._pending_kicks.append(uri)
            if self.fast is not None:
                self.fast.tick_soon()

    def release(self, uri: str, by: str = "operator") -> bool:
        """Let a quarantined identity back in before its time (True if it was)."""
        if self.quarantined.pop(uri, None) is None:
            return False
        self.audit("released", client_id=uri, identity=uri, by=by)
        if self.metrics is not None:
            self.metrics.quarantined_devices.set(len(self.quarantined))
        return True

    # -- revocation and expiry ------------------------------------------------------
    def revoke(self, cert_serials: list[str], reason: str = "revoked") -> list[str]:
        """Apply a revocation event: refuse these credentials from now on and close
        the connections that use them (at the next tick)."""
        self.revoked_serials.update(s.lower() for s in cert_serials)
        doomed = [c.client_id for c in self.clients.values() if self._revoked(c.credential)]
        for client_id in doomed:
            client = self.clients[client_id]
            if client.fast:  # refuse its messages now, not only after the kick
                self.fast.release(client_id)
                client.fast = False
            self.audit("revoked_disconnect", client_id=client_id, identity=client.identity.uri,
                       session=client.session.session_id.hex(), reason=reason)
            self.count("revocation_disconnects", "")
            if self.metrics is not None:
                self.metrics.revocation_disconnects.inc()
        self._pending_kicks.extend(doomed)
        return doomed

    def tick(self, now: float) -> list[tuple[Any, ...]]:
        """Actions for the broker thread: ("kick", client_id) and ("publish", ...)."""
        # Mosquitto ticks on every pass of its event loop (under load, once per message
        # or more): the scan over all sessions runs at most every SCAN_INTERVAL_S, which
        # bounds expiry kicks to that much late; revocations, challenges and kicks
        # queued by other events go out on every tick.
        fast = self.fast
        if fast is not None and self._fast_policy is not self.policy:
            fast.forget_topics(None)  # decisions of the old policy
            self._fast_policy = self.policy
        if now >= self._next_scan:
            self._next_scan = now + SCAN_INTERVAL_S
            if fast is not None:
                self._fast_tally(now)
            self._scan(now)
            if self.pending:
                for _ in self.pending.expire(now):
                    self._handshake_counted("expired")  # never confirmed: nothing to undo
        self._tick_challenges(now)
        if self.fanout is not None and self.fanout_subscribers:
            for topic, body in self.fanout.due(now):
                for client_id in list(self.fanout_subscribers):
                    client = self.clients.get(client_id)
                    if client is None:
                        del self.fanout_subscribers[client_id]
                    else:
                        self._send(client, topic, body, now)
        actions: list[tuple[Any, ...]] = [("kick", c) for c in dict.fromkeys(self._pending_kicks)]
        for client_id in dict.fromkeys(self._pending_kicks):
            self.disconnect(client_id)
        self._pending_kicks.clear()
        actions.extend(self._outbox)
        self._outbox.clear()
        if self.metrics is not None:
            self.metrics.active_sessions.set(len(self.clients))
        return actions

    def _fast_tally(self, now: float) -> None:
        """What the fast lane routed since the last scan: metrics and rate baselines."""
        s = self.settings
        for client_id, n in self.fast.take_counts():
            if self.metrics is not None:
                self.metrics.messages_in.inc(n)
            client = self.clients.get(client_id)
            meter = client.rate if client is not None else None
            if client is not None and meter is not None and meter.add_many(now, n, s):
                self._request(client, RATE_SPIKE, False, now, detail=(
                    f"{meter.count} messages in under {s.rate_window_s:g} s against a "
                    f"baseline of {meter.baseline:.2f}/s"))
        timing = self.fast.take_timing() if self.metrics is not None else None
        if timing is not None and timing[2]:
            self.metrics.verify_seconds.add_counts(timing[0], timing[1])

    def _arm(self, client: Client, now: float) -> None:
        """Schedule ``client``'s next look: its session's next key erasure or end."""
        self._timer_serial += 1
        heapq.heappush(self._timers, (client.session.next_deadline_at(now),
                                      self._timer_serial, client.client_id,
                                      client.session.session_id))

    def _current(self, client_id: str, session_id: bytes) -> Client | None:
        """The client whose current session is ``session_id`` (None: gone or replaced)."""
        client = self.clients.get(client_id)
        if client is None or client.session.session_id != session_id:
            return None
        return client

    def _compact(self) -> None:
        """Drop the heap entries of sessions that ended or were replaced once they
        outnumber the live ones: each heap stays within 2 x live + COMPACT_SLACK
        entries, at an amortised O(1) per handshake."""
        bound = 2 * len(self.clients) + COMPACT_SLACK
        if len(self._expiries) > bound:
            self._expiries = [e for e in self._expiries if self._current(e[2], e[3]) is not None]
            heapq.heapify(self._expiries)
        if len(self._timers) > bound:
            self._timers = [e for e in self._timers if self._current(e[2], e[3]) is not None]
            heapq.heapify(self._timers)

    def _scan(self, now: float) -> None:
        """What is due: credentials that expired, sessions whose keys must be erased
        or whose lifetime ended, replaced sessions past their grace, quarantines that
        ended. O(due) per call: a quiet fleet of any size costs nothing here."""
        self._compact()
        expiries = self._expiries
        if expiries:
            wall = self.wall_clock()
            while expiries and expiries[0][0] <= wall:
                _, _, client_id, session_id = heapq.heappop(expiries)
                client = self._current(client_id, session_id)
                if client is None:
                    continue  # gone, or replaced (its own entry is in the heap)
                self.audit("session_expired", client_id=client_id,
                           identity=client.identity.uri,
                           session=session_id.hex(), detail="credential expired")
                self._pending_kicks.append(client_id)
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, client_id, session_id = heapq.heappop(timers)
            client = self._current(client_id, session_id)
            if client is None:
                continue
            session = client.session
            if session.poll(now) is not None:
                self.audit("session_expired", client_id=client_id,
                           identity=client.identity.uri,
                           session=session.session_id.hex(), detail="session ended")
                self._pending_kicks.append(client_id)
            else:
                self._arm(client, now)
        for client_id in list(self._rotated):
            client = self.clients.get(client_id)
            if client is None or not client.previous:
                del self._rotated[client_id]
                continue
            client.previous.expire(now)
        for uri, until in list(self.quarantined.items()):
            if now >= until:
                self.release(uri, by="timeout")

    def _tick_challenges(self, now: float) -> None:
        for uri, challenge in list(self.challenges.items()):
            client = self.clients.get(uri)
            if now >= challenge.expires:
                del self.challenges[uri]
                if not challenge.timed_out:  # it went away before its deadline
                    self.audit("step_up_failed", client_id=uri, identity=uri,
                               session=client.session.session_id.hex() if client else None,
                               trigger=challenge.trigger, reason="expired",
                               detail="not answered, and the device did not come back")
                    self._step_up_counted("failed")
                continue
            if client is None or uri in self._pending_kicks:
                continue
            if not challenge.sent:
                self._send_challenge(client, challenge, now)
            if now >= challenge.deadline and not challenge.timed_out:
                challenge.timed_out = True
                self.audit("step_up_failed", client_id=uri, identity=uri,
                           session=client.session.session_id.hex(),
                           trigger=challenge.trigger, reason="timeout",
                           detail=f"no answer within {challenge.deadline - challenge.issued_at:g}"
                                  " s: disconnected; a CONNECT carrying the nonce still answers "
                                  f"for {self.settings.reconnect_window_s:g} s")
                self._step_up_counted("failed")
                self._pending_kicks.append(uri)
                self._failed(uri, now)


def _serial(credential: Credential) -> str:
    return format(credential.chain[0].serial_number, "x")
