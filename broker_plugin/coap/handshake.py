"""The gateway's handshake endpoint: ``POST /.well-known/sa1`` (msg1 -> msg2) and the
key confirmation (msg3) that arrives on the device's first proven request.

Everything here happens before anyone is authenticated, so everything here is bounded
(:class:`HandshakeLimits`, docs/COAP.md "Bounds"):

* **msg1 assembly.** msg1 (~1.9 KB) arrives as Block1 blocks. The blocks of one msg1
  are spooled per client endpoint (address, port and Request-Tag), at most
  :data:`MAX_MSG1` bytes each (4.13 beyond), at most a few assemblies and 40 KiB per
  source address and 1 MiB in all, each for 5 s after its last block (10 s at most).
* **Pending handshakes.** A valid msg1 is answered with msg2 and leaves a
  :class:`~structauth.handshake.PendingHandshake` (no identity, no session, nothing
  granted) plus msg2 itself, so that its Block2 blocks can be fetched: at most 8 per
  source and 1,024 in all, for the responder's ``pending_timeout`` (10 s). A full table
  pushes out its oldest entry (the same source's first), never a confirmed session.
* **Confirmation.** msg3 rides on the first proven request (option 65007,
  :data:`~structauth.coap_binding.CONFIRM_OPTION_NUMBER`): :meth:`HandshakeEndpoint.confirm`
  finds the pending handshake by the session id, lets the responder check msg3 (one
  try), and only then does the site create the session, log the device in and audit
  ``handshake_ok``.

The block-wise transfer itself is RFC 7959's, as aiocoap's client does it
automatically: no new state in aiocoap's own Block1Spool/Block2Cache (which keep every
entry for 93 s, with no per-source cap).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import aiocoap
from aiocoap.numbers import codes

from structauth.credentials import Credential, TimePolicy
from structauth.errors import MalformedMessage, ProtocolError, Reason, TesseraError
from structauth.handshake import HandshakeConfirmed, PendingHandshake, Responder, msg3_session_id

from .limits import BoundedTable, Limits, source_of

PeerT = TypeVar("PeerT", covariant=True)


class GatewaySite(Protocol[PeerT]):
    """What the endpoint needs from its site (broker_plugin.coap.site.TesseraSite): a
    protocol, so that this module does not import the site (which imports it)."""

    responder: Responder
    clock: Callable[[], float]
    wall_clock: Callable[[], dt.datetime]

    def count(self, metric: str, label: str) -> None: ...

    def refuse(self, request: aiocoap.Message, code: Any, reason: Reason, detail: str,
               metric: str = ..., *, max_age: int = ...,
               size1: int | None = ...) -> aiocoap.Message: ...

    def full(self, now: float) -> bool: ...

    def is_revoked(self, credential: Credential) -> bool: ...

    def admit(self, request: aiocoap.Message, confirmed: HandshakeConfirmed,
              now: float) -> PeerT: ...

#: the largest msg1 the endpoint assembles: the biggest valid msg1 (four 4 KB
#: certificates, a 255-byte responder name, a 512-byte context, a 4 KB quote) is ~26 KB
MAX_MSG1 = 32 * 1024
#: bytes a pending handshake costs besides its msg2 (PendingHandshake and our record)
PENDING_OVERHEAD = 600


def _default_msg1() -> Limits:
    return Limits(per_owner=4, per_owner_bytes=40 * 1024, total=256,
                  total_bytes=1024 * 1024, idle=5.0, max_age=10.0)


def _default_pending() -> Limits:
    # idle is replaced by the responder's pending_timeout (each entry's own deadline)
    return Limits(per_owner=8, per_owner_bytes=8 * 4096, total=1024,
                  total_bytes=1024 * 4096, idle=10.0)


@dataclass(frozen=True)
class HandshakeLimits:
    """Bounds of the handshake endpoint's pre-authentication state (owner: the source
    address, see :func:`~broker_plugin.coap.limits.source_of`)."""

    msg1: Limits = field(default_factory=_default_msg1)
    pending: Limits = field(default_factory=_default_pending)


class _Pending:
    __slots__ = ("endpoint", "handshake", "msg2")

    def __init__(self, handshake: PendingHandshake, msg2: bytes, endpoint: Any) -> None:
        self.handshake = handshake
        self.msg2 = msg2
        self.endpoint = endpoint


class ConfirmRefused(Exception):
    """msg3 did not confirm a session; ``response`` is the refusal to send."""

    def __init__(self, response: aiocoap.Message) -> None:
        super().__init__(str(response))
        self.response = response


def _endpoint(request: aiocoap.Message) -> tuple[Any, bytes]:
    """What the blocks of one msg1 (and the Block2 requests for its msg2) share: the
    client's address and port, and its Request-Tag (RFC 9175) if it sends one, so that
    one client endpoint can run several handshakes at once."""
    tags = request.opt.request_tag
    return (request.remote, bytes(tags[0]) if tags else b"")


class HandshakeEndpoint(Generic[PeerT]):
    """``/.well-known/sa1`` of one :class:`~broker_plugin.coap.site.TesseraSite`."""

    def __init__(self, site: GatewaySite[PeerT], limits: HandshakeLimits | None = None
                 ) -> None:
        self.site = site
        self.limits = limits or HandshakeLimits()
        self.assemblies: BoundedTable[Any, bytearray] = BoundedTable(self.limits.msg1)
        self.pending: BoundedTable[bytes, _Pending] = BoundedTable(
            self.limits.pending, on_evict=self._evicted
        )
        #: client endpoint -> session id of its latest pending handshake (for Block2);
        #: at most one per pending handshake, removed with it
        self._by_endpoint: dict[Any, bytes] = {}

    def _evicted(self, sid: bytes, entry: _Pending, why: str) -> None:
        entry.handshake.discard()
        if self._by_endpoint.get(entry.endpoint) == sid:
            del self._by_endpoint[entry.endpoint]
        self.site.count("handshakes", f"pending_{why}")

    def expire(self, now: float) -> None:
        self.assemblies.expire(now)
        self.pending.expire(now)

    def clear(self) -> None:
        self.assemblies.clear()
        self.pending.clear()

    # -- msg1 -> msg2 ------------------------------------------------------------------
    def render(self, request: aiocoap.Message) -> aiocoap.Message:
        site = self.site
        if request.code != codes.POST:
            return site.refuse(request, codes.METHOD_NOT_ALLOWED, Reason.MALFORMED,
                               "the handshake resource takes POST only", "handshakes")
        now = site.clock()
        endpoint = _endpoint(request)
        block2 = request.opt.block2
        if block2 is not None and block2.block_number > 0:
            return self._msg2_block(request, endpoint, now)
        block1 = request.opt.block1
        payload = bytes(request.payload)
        if block1 is not None:
            assembled = self._assemble(request, endpoint, block1, payload, now)
            if isinstance(assembled, aiocoap.Message):
                return assembled
            payload = assembled
        return self._answer(request, endpoint, payload, now)

    def _assemble(self, request: aiocoap.Message, endpoint: Any, block1: Any,
                  payload: bytes, now: float) -> bytes | aiocoap.Message:
        site = self.site
        if block1.start + len(payload) > MAX_MSG1:
            self.assemblies.pop(endpoint)
            return site.refuse(request, codes.REQUEST_ENTITY_TOO_LARGE, Reason.MALFORMED,
                               f"msg1 beyond {MAX_MSG1} bytes", "handshakes", size1=MAX_MSG1)
        if block1.size_exponent > 6 or (block1.more and len(payload) != block1.size):
            self.assemblies.pop(endpoint)
            return site.refuse(request, codes.BAD_REQUEST, Reason.MALFORMED,
                               "block size does not match Block1", "handshakes")
        if block1.block_number == 0:
            if not block1.more:
                self.assemblies.pop(endpoint)
                return payload
            if not self.assemblies.put(endpoint, source_of(request.remote),
                                       bytearray(payload), len(payload), now):
                return site.refuse(request, codes.REQUEST_ENTITY_TOO_LARGE, Reason.MALFORMED,
                                   "no room for this msg1", "handshakes", size1=MAX_MSG1)
        else:
            spool = self.assemblies.get(endpoint, now, touch=True)
            if spool is None or len(spool) != block1.start:
                self.assemblies.pop(endpoint)
                return site.refuse(request, codes.REQUEST_ENTITY_INCOMPLETE, Reason.MALFORMED,
                                   "msg1 block out of sequence or expired", "handshakes")
            if not self.assemblies.grow(endpoint, len(payload), now):
                return site.refuse(request, codes.REQUEST_ENTITY_TOO_LARGE, Reason.MALFORMED,
                                   "msg1 assembly over this source's budget", "handshakes",
                                   size1=MAX_MSG1)
            spool += payload
            if not block1.more:
                self.assemblies.pop(endpoint)
                return bytes(spool)
        site.count("handshakes", "block")
        response = aiocoap.Message(code=codes.CONTINUE)
        response.opt.block1 = block1
        return response

    def _answer(self, request: aiocoap.Message, endpoint: Any, msg1: bytes,
                now: float) -> aiocoap.Message:
        site = self.site
        if site.full(now):
            return site.refuse(request, codes.SERVICE_UNAVAILABLE, Reason.BACKEND_UNAVAILABLE,
                               "too many sessions", "handshakes", max_age=5)
        try:
            answered = site.responder.accept(
                msg1,
                now,
                TimePolicy.trusted(site.wall_clock()),
                revoked=site.is_revoked,
            )
        except TesseraError as exc:
            if isinstance(exc, MalformedMessage):
                code = codes.BAD_REQUEST
            elif isinstance(exc, ProtocolError):
                code = codes.UNAUTHORIZED
            else:
                code = codes.SERVICE_UNAVAILABLE
            return site.refuse(request, code, exc.reason, exc.detail, "handshakes")
        pending, msg2 = answered.pending, answered.reply
        source = source_of(request.remote)
        if not self.pending.put(pending.session_id, source, _Pending(pending, msg2, endpoint),
                                PENDING_OVERHEAD + len(msg2), now, deadline=pending.deadline):
            pending.discard()
            return site.refuse(request, codes.SERVICE_UNAVAILABLE, Reason.BACKEND_UNAVAILABLE,
                               "no room for a pending handshake", "handshakes", max_age=1)
        self._by_endpoint[endpoint] = pending.session_id
        site.count("handshakes", "answered")
        response = aiocoap.Message(code=codes.CHANGED, payload=msg2, max_age=0)
        if request.opt.block1 is not None:
            response.opt.block1 = request.opt.block1
        return self._slice(request, response, msg2, 0)

    def _slice(self, request: aiocoap.Message, response: aiocoap.Message, body: bytes,
               number: int) -> aiocoap.Message:
        szx = int(request.remote.maximum_block_size_exp)
        if request.opt.block2 is not None:
            szx = min(szx, request.opt.block2.size_exponent)
        szx = min(szx, 6)
        size = 1 << (szx + 4)
        if number == 0 and len(body) <= size and request.opt.block2 is None:
            return response
        start = number * size
        if start >= len(body):
            return self.site.refuse(request, codes.BAD_REQUEST, Reason.MALFORMED,
                                    "Block2 request out of bounds", "handshakes")
        end = min(start + size, len(body))
        response.payload = body[start:end]
        response.opt.block2 = (number, end < len(body), szx)
        if number == 0:
            response.opt.size2 = len(body)
        return response

    def _msg2_block(self, request: aiocoap.Message, endpoint: Any,
                    now: float) -> aiocoap.Message:
        sid = self._by_endpoint.get(endpoint)
        entry = None if sid is None else self.pending.get(sid, now)
        if entry is None:
            return self.site.refuse(request, codes.REQUEST_ENTITY_INCOMPLETE, Reason.MALFORMED,
                                    "no msg2 for this endpoint (expired?)", "handshakes")
        self.site.count("handshakes", "msg2_block")
        response = aiocoap.Message(code=codes.CHANGED, max_age=0)
        block2 = request.opt.block2
        return self._slice(request, response, entry.msg2, block2.block_number)

    # -- msg3 --------------------------------------------------------------------------
    def confirm(self, request: aiocoap.Message, sid: bytes, msg3: bytes,
                now: float) -> PeerT:
        """Confirm the pending handshake ``sid`` with ``msg3`` (carried on a proven
        request whose header names ``sid``). Returns the new session's peer; raises
        :class:`ConfirmRefused` (with a 4.01/4.00/5.03 to send) otherwise. One try: a
        failed msg3 ends the pending handshake."""
        site = self.site
        if msg3_session_id(msg3) is None:
            raise ConfirmRefused(site.refuse(request, codes.BAD_REQUEST, Reason.MALFORMED,
                                             "malformed msg3", "handshakes"))
        if msg3_session_id(msg3) != sid:
            raise ConfirmRefused(site.refuse(request, codes.UNAUTHORIZED, Reason.UNKNOWN_SESSION,
                                             "msg3 names another session than the proof",
                                             "handshakes"))
        entry = self.pending.pop(sid)
        if entry is None:
            raise ConfirmRefused(site.refuse(request, codes.UNAUTHORIZED, Reason.UNKNOWN_SESSION,
                                             "no pending handshake (expired or evicted)",
                                             "handshakes"))
        if self._by_endpoint.get(entry.endpoint) == sid:
            del self._by_endpoint[entry.endpoint]
        try:
            confirmed: HandshakeConfirmed = site.responder.confirm(entry.handshake, msg3, now)
        except TesseraError as exc:
            raise ConfirmRefused(site.refuse(request, codes.UNAUTHORIZED, exc.reason,
                                             exc.detail, "handshakes")) from None
        return site.admit(request, confirmed, now)

__all__ = ["MAX_MSG1", "ConfirmRefused", "HandshakeEndpoint", "HandshakeLimits"]
