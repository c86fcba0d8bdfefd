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
  an ERROR as information, never as a proof.
"""

from __future__ import annotations

import enum
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


class State(enum.Enum):
    IDLE = "idle"
    PENDING = "pending"
    ESTABLISHED = "established"
    CLOSED = "closed"


class _Connection:
    def __init__(self) -> None:
        self.state = State.IDLE
        self.session: Session | None = None
        self.peer: Identity | None = None

    def send(self, topic: str, payload: bytes, now: float) -> bytes:
        """One proven (sealed, if the session is) message on ``topic``."""
        if self.state is not State.ESTABLISHED or self.session is None:
            raise StateError("no established session on this connection")
        header, body = self.session.protect(action(topic), payload, now)
        return encode_data(header, topic, body)

    def next_deadline(self, now: float) -> float:
        return self.session.next_deadline_at(now) if self.session else float("inf")

    def poll(self, now: float) -> None:
        if self.session is not None and self.session.poll(now) is not None:
            self.state = State.CLOSED

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
        self.state = State.CLOSED

    def _refuse(self, exc: TesseraError, *, fatal: bool) -> list[Event]:
        if fatal:
            self.close()
        return [Outgoing(encode_error(exc.reason, exc.detail)),
                Refused(exc.reason, exc.detail, fatal)]

    def _data(self, message: bytes, now: float) -> list[Event]:
        if self.state is not State.ESTABLISHED or self.session is None:
            return self._refuse(ProtocolError("no confirmed session on this connection",
                                              Reason.UNKNOWN_SESSION), fatal=False)
        try:
            header, topic, body = decode_data(message, HEADER_SIZE)
            verified = self.session.verify(header, action(topic), body, now)
        except ProtocolError as exc:
            return self._refuse(exc, fatal=False)
        return [Received(topic, verified.payload, verified.seq)]


class ResponderConnection(_Connection):
    """The peripheral's side: answers msg1, confirms msg3, then proven messages."""

    def __init__(self, responder: Responder, *, revoked: RevocationCheck | None = None,
                 expected_peer: Identity | None = None) -> None:
        super().__init__()
        self.responder = responder
        self.revoked = revoked
        self.expected_peer = expected_peer
        self._pending: PendingHandshake | None = None

    def poll(self, now: float) -> None:
        if self._pending is not None and self._pending.expired(now):
            self._pending.discard()
            self._pending = None
            self.close()
        super().poll(now)

    def next_deadline(self, now: float) -> float:
        if self._pending is not None:
            return self._pending.deadline
        return super().next_deadline(now)

    def receive(self, message: bytes, now: float, policy: TimePolicy) -> list[Event]:
        if self.state is State.CLOSED:
            return []
        kind = message[0] if message else -1
        if kind == SA1_MSG1:
            if self.state is not State.IDLE:
                return self._refuse(ProtocolError("one handshake per connection",
                                                  Reason.INVALID_STATE), fatal=True)
            try:
                answered = self.responder.accept(message[1:], now, policy, revoked=self.revoked,
                                                 expected_peer=self.expected_peer)
            except TesseraError as exc:
                return self._refuse(exc, fatal=True)
            self._pending = answered.pending
            self.state = State.PENDING
            return [Outgoing(bytes((SA1_MSG2,)) + answered.reply)]
        if kind == SA1_MSG3:
            pending, self._pending = self._pending, None
            if pending is None or self.state is not State.PENDING:
                return self._refuse(ProtocolError("msg3 without a pending handshake",
                                                  Reason.UNKNOWN_SESSION), fatal=True)
            try:
                confirmed = self.responder.confirm(pending, message[1:], now)
            except TesseraError as exc:
                return self._refuse(exc, fatal=True)
            self.session, self.peer = confirmed.session, confirmed.peer
            self.state = State.ESTABLISHED
            return [Established(confirmed.peer, confirmed.credential)]
        if kind == SA1_DATA:
            return self._data(message, now)
        if kind == SA1_ERROR:
            reason, detail = decode_error(message)
            return [PeerRefused(reason, detail)]
        return self._refuse(MalformedMessage(f"unknown GATT message type {kind}"),
                            fatal=False)


class InitiatorConnection(_Connection):
    """The central's side: sends msg1, checks msg2, sends msg3, then proven messages."""

    def __init__(self, initiator: Initiator, *, revoked: RevocationCheck | None = None) -> None:
        super().__init__()
        self.initiator = initiator
        self.revoked = revoked

    def start(self, *, context: bytes = b"", quote: bytes = b"") -> bytes:
        if self.state is not State.IDLE:
            raise StateError("start() once per connection")
        self.state = State.PENDING
        return bytes((SA1_MSG1,)) + self.initiator.start(context=context, quote=quote)

    def receive(self, message: bytes, now: float, policy: TimePolicy) -> list[Event]:
        if self.state is State.CLOSED:
            return []
        kind = message[0] if message else -1
        if kind == SA1_MSG2:
            if self.state is not State.PENDING:
                return self._refuse(ProtocolError("unexpected msg2", Reason.INVALID_STATE),
                                    fatal=True)
            try:
                done = self.initiator.receive(message[1:], now, policy, revoked=self.revoked)
            except TesseraError as exc:
                return self._refuse(exc, fatal=True)
            self.session, self.peer = done.session, done.peer
            self.state = State.ESTABLISHED
            return [Outgoing(bytes((SA1_MSG3,)) + done.reply),
                    Established(done.peer, done.credential)]
        if kind == SA1_DATA:
            return self._data(message, now)
        if kind == SA1_ERROR:
            reason, detail = decode_error(message)
            if self.state is State.PENDING:
                self.close()  # the handshake was refused
            return [PeerRefused(reason, detail)]
        return self._refuse(MalformedMessage(f"unknown GATT message type {kind}"),
                            fatal=False)


__all__ = [
    "Established",
    "Event",
    "InitiatorConnection",
    "Outgoing",
    "PeerRefused",
    "Received",
    "Refused",
    "ResponderConnection",
    "State",
]
