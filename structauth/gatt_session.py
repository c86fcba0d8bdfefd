"""SA1 sessions over GATT, sans-IO: one object per BLE connection and side.

The transport adapters (``device.ble_session``) are thin loops: they hand every
reassembled message to :meth:`receive` with the time and the credential policy, send
every :class:`Outgoing` it returns, and deliver :class:`Received` messages. The GATT
central is the SA1 initiator; the peripheral is the responder. Message types are those
of :mod:`structauth.gatt` (MSG1, MSG2, MSG3, DATA, ERROR).

The rules are MQTT's and CoAP's:

* nothing is granted before msg3 confirms the handshake: a DATA message on a
  connection whose handshake is pending or absent is refused with UNKNOWN_SESSION;
* a handshake failure (bad credential, wrong identity, revoked, replayed msg1, bad
  confirmation) is answered with ERROR carrying the core's reason and ends the
  connection (the adapter disconnects), as a refused MQTT CONNECT does;
* a proven message that fails verification (bad tag, replay, epoch out of window,
  expired session) is refused with ERROR and its reason; the session goes on, as a
  refused CoAP request does; nothing is delivered;
* refusals are unproven (there may be no session to prove them with): a receiver treats
  an ERROR as information, never as a proof;
* the responder may authorize topics (``authorize``, e.g. the gateway's policy from
  ``broker_plugin.ble``): a proven message on a topic the peer may not send on is
  refused NOT_AUTHORIZED after its proof checked out (so it also spends its sequence
  number) and delivers nothing; the session goes on. Sending on a topic the peer may
  not receive raises, and nothing is sent;
* pending handshakes are bounded: one per connection, and at most
  ``PendingBudget.limit`` across the connections sharing a budget; a msg1 beyond that
  is refused BACKEND_UNAVAILABLE before its signature is checked (and ends the
  connection);
* make-before-break: on an established connection the initiator may start a new
  handshake with the *same* peer in the second half of the session's lifetime
  (:meth:`InitiatorConnection.rekey`; earlier ends the connection, INVALID_STATE);
  once msg3 confirms it the new session is used to send, and the previous one still
  verifies messages in flight until its own lifetime ends.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from .credentials import Credential, Identity, RevocationCheck, TimePolicy
from .errors import MalformedMessage, ProtocolError, Reason, StateError, TesseraError
from .gatt import (
    SA1_DATA,
    SA1_ERROR,
    SA1_MSG1,
    SA1_MSG2,
    SA1_MSG3,
    action,
    decode_data,
    decode_error,
    encode_data,
    encode_error,
)
from .handshake import Initiator, PendingHandshake, Responder
from .session import HEADER_SIZE, Session


@dataclass(frozen=True, slots=True)
class Outgoing:
    """Send this message to the peer."""

    message: bytes


@dataclass(frozen=True, slots=True)
class Established:
    """The handshake is confirmed: ``peer`` is authenticated."""

    peer: Identity
    credential: Credential


@dataclass(frozen=True, slots=True)
class Received:
    """A proven message from the peer (``payload`` is the plaintext)."""

    topic: str
    payload: bytes
    seq: int


@dataclass(frozen=True, slots=True)
class Refused:
    """We refused something the peer sent (an ERROR went out); ``fatal``: the
    connection must end."""

    reason: Reason
    detail: str
    fatal: bool


@dataclass(frozen=True, slots=True)
class PeerRefused:
    """The peer sent an (unproven) ERROR."""

    reason: Reason
    detail: str


Event = Outgoing | Established | Received | Refused | PeerRefused


#: ``authorize(peer, direction, topic)``: None if allowed, else why not (logged and
#: audited by the caller, never sent to the peer). ``direction`` is ``"in"`` (a proven
#: message from the peer) or ``"out"`` (one the responder is about to send to it).
Authorize = Callable[[Identity, str, str], "str | None"]

#: what a peer is told when the policy refuses a topic (the policy's own reason may name
#: classes and templates: it goes to the audit, not over the air)
NOT_ALLOWED = "topic not allowed by the responder's policy"


class PendingBudget:
    """How many handshakes may be pending (msg1 answered, msg3 not yet confirmed) at
    once across the connections that share this budget, e.g. all connections of one
    :class:`~device.ble_session.Sa1Peripheral`. Each pending handshake holds its
    ephemeral keys and a signature check's worth of work until msg3 or its timeout."""

    def __init__(self, limit: int = 16) -> None:
        if limit < 1:
            raise StateError("a pending-handshake budget needs a limit of at least 1",
                             Reason.BAD_PARAMETERS)
        self.limit = limit
        self.held = 0

    def take(self) -> bool:
        if self.held >= self.limit:
            return False
        self.held += 1
        return True

    def give(self) -> None:
        self.held = max(0, self.held - 1)


class State(enum.Enum):
    IDLE = "idle"
    PENDING = "pending"
    ESTABLISHED = "established"
    CLOSED = "closed"


class _Connection:
    def __init__(self) -> None:
        self.state = State.IDLE
        #: the session messages are sent with (the newest confirmed one)
        self.session: Session | None = None
        #: the session before the last re-handshake: verifies messages in flight until
        #: its lifetime ends (make-before-break), never used to send
        self.previous: Session | None = None
        self.peer: Identity | None = None
        #: confirmed handshakes on this connection (1 + re-handshakes)
        self.handshakes = 0

    def send(self, topic: str, payload: bytes, now: float) -> bytes:
        """One proven (sealed, if the session is) message on ``topic``."""
        if self.state is not State.ESTABLISHED or self.session is None:
            raise StateError("no established session on this connection")
        header, body = self.session.protect(action(topic), payload, now)
        return encode_data(header, topic, body)

    def _sessions(self) -> list[Session]:
        return [s for s in (self.session, self.previous) if s is not None]

    def _install(self, session: Session, peer: Identity) -> None:
        if self.previous is not None:
            self.previous.close()  # at most two: the one before last is erased now
        self.previous, self.session, self.peer = self.session, session, peer
        self.state = State.ESTABLISHED
        self.handshakes += 1

    def next_deadline(self, now: float) -> float:
        return min((s.next_deadline_at(now) for s in self._sessions()), default=float("inf"))

    def poll(self, now: float) -> None:
        if self.previous is not None and self.previous.poll(now) is not None:
            self.previous = None
        if self.session is not None and self.session.poll(now) is not None:
            self.state = State.CLOSED

    def close(self) -> None:
        for session in self._sessions():
            session.close()
        self.state = State.CLOSED

    def _refuse(self, exc: TesseraError, *, fatal: bool, told: str | None = None
                ) -> list[Event]:
        if fatal:
            self.close()
        return [Outgoing(encode_error(exc.reason, exc.detail if told is None else told)),
                Refused(exc.reason, exc.detail, fatal)]

    def _data(self, message: bytes, now: float, authorize: Authorize | None = None
              ) -> list[Event]:
        if self.state is not State.ESTABLISHED or self.session is None:
            return self._refuse(ProtocolError("no confirmed session on this connection",
                                              Reason.UNKNOWN_SESSION), fatal=False)
        try:
            header, topic, body = decode_data(message, HEADER_SIZE)
            # the header names its session (bytes 1-9): the current one, or the one
            # before a re-handshake for a message that was in flight
            session = next((s for s in self._sessions() if s.session_id == header[1:9]),
                           self.session)
            verified = session.verify(header, action(topic), body, now)
        except ProtocolError as exc:
            return self._refuse(exc, fatal=False)
        if authorize is not None and self.peer is not None:
            why = authorize(self.peer, "in", topic)
            if why is not None:
                return self._refuse(ProtocolError(why, Reason.NOT_AUTHORIZED), fatal=False,
                                    told=NOT_ALLOWED)
        return [Received(topic, verified.payload, verified.seq)]


class ResponderConnection(_Connection):
    """The peripheral's side: answers msg1, confirms msg3, then proven messages (and a
    re-handshake by the same peer, make-before-break)."""

    def __init__(self, responder: Responder, *, revoked: RevocationCheck | None = None,
                 expected_peer: Identity | None = None, budget: PendingBudget | None = None,
                 authorize: Authorize | None = None) -> None:
        super().__init__()
        self.responder = responder
        self.revoked = revoked
        self.expected_peer = expected_peer
        self.budget = budget
        self.authorize = authorize
        self._pending: PendingHandshake | None = None

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def _drop_pending(self) -> PendingHandshake | None:
        pending, self._pending = self._pending, None
        if pending is not None and self.budget is not None:
            self.budget.give()
        return pending

    def close(self) -> None:
        pending = self._drop_pending()
        if pending is not None:
            pending.discard()
        super().close()

    def poll(self, now: float) -> None:
        if self._pending is not None and self._pending.expired(now):
            self.close()  # a handshake started and not finished ends the connection
            return
        super().poll(now)

    def next_deadline(self, now: float) -> float:
        deadline = super().next_deadline(now)
        if self._pending is not None:
            return min(deadline, self._pending.deadline)
        return deadline

    def send(self, topic: str, payload: bytes, now: float) -> bytes:
        if self.authorize is not None and self.peer is not None:
            why = self.authorize(self.peer, "out", topic)
            if why is not None:
                raise ProtocolError(why, Reason.NOT_AUTHORIZED)
        return super().send(topic, payload, now)

    @staticmethod
    def _rekey_from(session: Session) -> float:
        """The earliest a renewal is accepted: half the session's lifetime."""
        return session.expires_at - session.params.lifetime_s / 2

    def _msg1(self, message: bytes, now: float, policy: TimePolicy) -> list[Event]:
        rekey = self.state is State.ESTABLISHED
        if self._pending is not None or not (rekey or self.state is State.IDLE):
            return self._refuse(ProtocolError("one pending handshake per connection",
                                              Reason.INVALID_STATE), fatal=True)
        if rekey and self.session is not None and now < self._rekey_from(self.session):
            # an authenticated peer could otherwise make us check a signature per round
            # trip; a central renews a tenth of the lifetime before the end at the earliest
            return self._refuse(ProtocolError(
                "renewal before half the session's lifetime", Reason.INVALID_STATE),
                fatal=True)
        if self.budget is not None and not self.budget.take():
            # checked before the signature: a flood of msg1 costs a comparison each
            return self._refuse(ProtocolError(
                f"{self.budget.limit} handshakes already pending: try again later",
                Reason.BACKEND_UNAVAILABLE), fatal=True)
        try:
            # a re-handshake must come from the peer already authenticated here
            answered = self.responder.accept(
                message[1:], now, policy, revoked=self.revoked,
                expected_peer=self.peer if rekey else self.expected_peer)
        except TesseraError as exc:
            if self.budget is not None:
                self.budget.give()
            return self._refuse(exc, fatal=True)
        self._pending = answered.pending
        if not rekey:
            self.state = State.PENDING
        return [Outgoing(bytes((SA1_MSG2,)) + answered.reply)]

    def receive(self, message: bytes, now: float, policy: TimePolicy) -> list[Event]:
        if self.state is State.CLOSED:
            return []
        kind = message[0] if message else -1
        if kind == SA1_MSG1:
            return self._msg1(message, now, policy)
        if kind == SA1_MSG3:
            pending = self._drop_pending()
            if pending is None:
                return self._refuse(ProtocolError("msg3 without a pending handshake",
                                                  Reason.UNKNOWN_SESSION), fatal=True)
            try:
                confirmed = self.responder.confirm(pending, message[1:], now)
            except TesseraError as exc:
                return self._refuse(exc, fatal=True)
            self._install(confirmed.session, confirmed.peer)
            return [Established(confirmed.peer, confirmed.credential)]
        if kind == SA1_DATA:
            return self._data(message, now, self.authorize)
        if kind == SA1_ERROR:
            reason, detail = decode_error(message)
            return [PeerRefused(reason, detail)]
        return self._refuse(MalformedMessage(f"unknown GATT message type {kind}"),
                            fatal=False)


class InitiatorConnection(_Connection):
    """The central's side: sends msg1, checks msg2, sends msg3, then proven messages;
    :meth:`rekey` starts a new handshake with the same peer on the same connection."""

    def __init__(self, initiator: Initiator, *, revoked: RevocationCheck | None = None) -> None:
        super().__init__()
        self.initiator = initiator
        self.revoked = revoked
        self._handshaking = False

    @property
    def pending(self) -> bool:
        return self._handshaking

    def start(self, *, context: bytes = b"", quote: bytes = b"") -> bytes:
        if self.state is not State.IDLE:
            raise StateError("start() once per connection")
        self.state = State.PENDING
        self._handshaking = True
        return bytes((SA1_MSG1,)) + self.initiator.start(context=context, quote=quote)

    def rekey(self, initiator: Initiator, *, context: bytes = b"", quote: bytes = b"") -> bytes:
        """msg1 of a new handshake on this established connection (a fresh
        ``initiator`` expecting the same peer); the current session stays in use until
        msg2 checks out."""
        if self.state is not State.ESTABLISHED or self._handshaking:
            raise StateError("rekey() needs an established connection and no handshake "
                             "in progress")
        if initiator.expected_peer != self.peer:
            raise StateError("a re-handshake is with the same peer", Reason.BAD_PARAMETERS)
        self.initiator = initiator
        self._handshaking = True
        return bytes((SA1_MSG1,)) + initiator.start(context=context, quote=quote)

    def receive(self, message: bytes, now: float, policy: TimePolicy) -> list[Event]:
        if self.state is State.CLOSED:
            return []
        kind = message[0] if message else -1
        if kind == SA1_MSG2:
            if not self._handshaking:
                return self._refuse(ProtocolError("unexpected msg2", Reason.INVALID_STATE),
                                    fatal=True)
            self._handshaking = False
            try:
                done = self.initiator.receive(message[1:], now, policy, revoked=self.revoked)
            except TesseraError as exc:
                return self._refuse(exc, fatal=True)
            self._install(done.session, done.peer)
            return [Outgoing(bytes((SA1_MSG3,)) + done.reply),
                    Established(done.peer, done.credential)]
        if kind == SA1_DATA:
            return self._data(message, now)
        if kind == SA1_ERROR:
            reason, detail = decode_error(message)
            if self.state is State.PENDING:
                self.close()  # the handshake was refused
            # a refused re-handshake: the peripheral ends the link (fatal there); any
            # other ERROR is about one message and the session goes on
            return [PeerRefused(reason, detail)]
        return self._refuse(MalformedMessage(f"unknown GATT message type {kind}"),
                            fatal=False)


__all__ = [
    "NOT_ALLOWED",
    "Authorize",
    "Established",
    "Event",
    "InitiatorConnection",
    "Outgoing",
    "PeerRefused",
    "PendingBudget",
    "Received",
    "Refused",
    "ResponderConnection",
    "State",
]
