"""The agent's CoAP transport: aiocoap requests on an SA1 session with a gateway.

::

    client = TesseraCoapClient(signer=..., credential=..., trust=...,
                               uri="coap://gateway.local", gateway=gateway_identity)
    reply = await client.request("POST", "sensors/pi-1/readings", b"21.5",
                                 content_format=0)
    async for note in client.observe("sensors/pi-1/config"):
        ...

* ``gateway`` is required: the identity of the gateway this device means to reach. It
  is named (signed) in msg1, so a gateway refuses a msg1 meant for another, and only
  that identity is accepted in msg2.
* The first request (or the first after the session's lifetime, less a margin) runs
  the SA1 handshake: ``POST /.well-known/sa1`` with msg1, msg2 back (block-wise by
  aiocoap, with a Request-Tag so that handshakes never mix). msg3 then rides on the
  first proven request in the Tessera-Confirm option (:data:`CONFIRM_OPTION`), and on
  every request after it until a proven response shows the gateway holds the session:
  no extra round trip. Re-handshakes happen before the lifetime ends
  (make-before-break: requests in flight finish on the session they started on).
* Every request carries its proof in the Tessera-Proof option (:data:`PROOF_OPTION`),
  bound to the method, full path, query, Content-Format, Accept, Observe and payload;
  in sealed mode the payload travels encrypted. A body larger than one block is sent
  block by block, each block proven and chained to the one before (the gateway spools
  nothing unproven).
* Every response must carry the gateway's proof bound to this very request
  (:func:`response_action`); anything else raises :class:`ResponseRejected`. Refusals
  the gateway cannot prove (4.00/4.01/4.02, no session to prove them with) raise
  :class:`GatewayRefused`; if one says the gateway lost our session, the client
  re-handshakes once and retries.
* Keys are erased on schedule: a timer re-armed to ``Session.next_deadline_at`` calls
  ``poll`` on every session the client still holds, so a device that sends nothing
  keeps no old keys.
* Confirmable retransmissions are aiocoap's: the same bytes, so the same proof; the
  gateway answers duplicates from its deduplication cache.
* Credential time checks on msg2 follow ``time_policy`` (default: trust the wall
  clock); a device without an RTC passes ``lambda: TimePolicy.unknown(floor)``.

docs/COAP.md defines the options, the action strings and the refusals.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiocoap
from aiocoap import error as coap_error
from aiocoap.numbers import codes
from aiocoap.numbers.optionnumbers import OptionNumber
from aiocoap.optiontypes import OpaqueOption

from structauth import accel
from structauth.coap_binding import (
    CONFIRM_OPTION_NUMBER,
    HANDSHAKE_PATH,
    METHODS,
    NO_PREVIOUS,
    PROOF_OPTION_NUMBER,
    block_action,
    cached_request_action,
    diagnostic_reason,
    response_action,
)
from structauth.credentials import Credential, Identity, TimePolicy, TrustStore
from structauth.errors import Reason, TesseraError
from structauth.handshake import Initiator
from structauth.keys import Signer
from structauth.session import HEADER_SIZE, Session, SessionState

#: Tessera-Proof, 65003: experimental range, critical (odd), unsafe to forward (bit 1);
#: the number is the binding's (structauth.coap_binding), registered with aiocoap here
PROOF_OPTION = OptionNumber(PROOF_OPTION_NUMBER)
PROOF_OPTION.set_format(OpaqueOption)
#: Tessera-Confirm, 65007: msg3 on the first proven request(s) of a session.
CONFIRM_OPTION = OptionNumber(CONFIRM_OPTION_NUMBER)
CONFIRM_OPTION.set_format(OpaqueOption)


#: refusals after which a fresh handshake can help (the gateway lost or ended our session)
_RETRY_REASONS = frozenset(
    {Reason.UNKNOWN_SESSION, Reason.SESSION_EXPIRED, Reason.BAD_CONFIRMATION}
)
#: critical options a response may carry (RFC 7252 responses carry few critical options)
_UNDERSTOOD_CRITICAL = frozenset(
    {int(OptionNumber.BLOCK2), int(OptionNumber.BLOCK1), int(PROOF_OPTION)}
)
_CODES = {name: codes.Code(number) for name, number in METHODS.items()}
#: Block1 size exponent of uploads (1024-byte blocks, aiocoap's UDP default)
BLOCK_SZX = 6


# ------------------------------------------------------------------ errors and results


class CoapError(TesseraError):
    """The gateway could not be reached, or the exchange failed."""

    default_reason = Reason.BACKEND_UNAVAILABLE


class GatewayRefused(CoapError):
    """An unproven refusal (4.00, 4.01, 4.02, 5.03 ...): the gateway, or anyone on the
    path, said no. Carries the CoAP code and the diagnostic payload."""

    def __init__(self, code: Any, diagnostic: bytes) -> None:
        reason = diagnostic_reason(diagnostic) or Reason.NOT_AUTHORIZED
        text = diagnostic[:200].decode("utf-8", "replace")
        super().__init__(f"gateway answered {code}: {text or '(no diagnostic)'}", reason)
        self.code = code
        self.diagnostic = diagnostic


class ResponseRejected(CoapError):
    """A response without a valid proof bound to our request: not from the gateway we
    hold the session with, altered on the way, replayed, or for another request."""

    default_reason = Reason.BAD_TAG


@dataclass(frozen=True, slots=True)
class ProvenResponse:
    """A response whose proof checked out. ``payload`` is the plaintext."""

    code: Any  # aiocoap.numbers.codes.Code
    payload: bytes
    content_format: int | None
    #: the response as aiocoap received it (payload still sealed in sealed mode)
    message: aiocoap.Message
    #: the gateway's sequence number for this response
    seq: int


# ------------------------------------------------------------------ the client


class TesseraCoapClient:
    """A device's CoAP client toward one gateway (``uri``: ``coap://host[:port]``,
    ``gateway``: the gateway's identity, required)."""

    def __init__(
        self,
        *,
        signer: Signer,
        credential: Credential,
        trust: TrustStore,
        uri: str,
        gateway: Identity,
        context: aiocoap.Context | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        time_policy: Callable[[], TimePolicy] | None = None,
        revoked: Callable[[Credential], bool] | None = None,
        renew_before: float = 60.0,
        min_handshake_interval: float = 1.0,
        handshake_path: Sequence[str] = HANDSHAKE_PATH,
        accelerate: bool = True,
    ) -> None:
        if not isinstance(gateway, Identity):
            raise TypeError("gateway: the Identity of the gateway to reach is required")
        self.signer = signer
        self.credential = credential
        self.trust = trust
        self.uri = uri.rstrip("/")
        self.gateway = gateway
        self.clock = clock
        self._time_policy = time_policy or (lambda: TimePolicy.trusted(wall_clock()))
        self.revoked = revoked
        self.renew_before = renew_before
        self.min_handshake_interval = min_handshake_interval
        self.handshake_path = tuple(handshake_path)
        #: verify the gateway's responses in C (structauth.accel) where it was built
        self.accelerate = accelerate and accel.available()
        self.session: Session | None = None
        self.handshakes = 0
        #: how often the key-erasure timer ran (tests wait on it)
        self.polls = 0
        self._last_handshake = float("-inf")
        self._context = context
        self._own_context = context is None
        self._lock = asyncio.Lock()
        #: msg3 of each session the gateway has not yet shown it holds
        self._unconfirmed: dict[bytes, bytes] = {}
        #: every session still open (the current one and any older one a request in
        #: flight may still use), polled by the key-erasure timer
        self._live: list[Session] = []
        self._timer: asyncio.TimerHandle | None = None
        #: the gateway's transport address, from its first answer (None: resolve ``uri``)
        self._remote: Any = None

    async def _ctx(self) -> aiocoap.Context:
        if self._context is None:
            # coap:// needs only the UDP transport (aiocoap's default list adds an OSCORE
            # transport that looks up credentials on every request, TCP and TLS)
            udp = self.uri.startswith("coap://")
            self._context = await aiocoap.Context.create_client_context(
                transports=["udp6"] if udp else None
            )
        return self._context

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for session in self._live:
            session.close()
        self._live.clear()
        self._unconfirmed.clear()
        self.session = None
        if self._own_context and self._context is not None:
            await self._context.shutdown()
            self._context = None

    async def __aenter__(self) -> TesseraCoapClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- key erasure -----------------------------------------------------------------
    def _arm(self) -> None:
        """(Re-)arm the timer to the soonest key-erasure deadline of the live sessions."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        now = self.clock()
        deadlines = [s.next_deadline_at(now) for s in self._live]
        if not deadlines:
            return
        delay = max(0.0, min(deadlines) - now)
        self._timer = asyncio.get_running_loop().call_later(delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        now = self.clock()
        self.polls += 1
        for session in list(self._live):
            session.poll(now)  # erases keys that left the window; ends the session at L
            if session.state is SessionState.CLOSED:
                self._live.remove(session)
                self._unconfirmed.pop(session.session_id, None)
                if session is self.session:
                    self.session = None
        self._arm()

    # -- handshake -------------------------------------------------------------------
    def _renew_at(self, session: Session) -> float:
        lifetime = session.params.lifetime_s
        return session.expires_at - min(self.renew_before, lifetime / 10)

    def _usable(self, session: Session | None) -> bool:
        return (
            session is not None
            and session.state is not SessionState.CLOSED
            and self.clock() < self._renew_at(session)
        )

    async def connect(self) -> Session:
        """Run a handshake now (also when the current session is still good)."""
        async with self._lock:
            return await self._handshake()

    async def session_for_use(self) -> Session:
        """The current session, after a handshake if there is none or it is about to
        end."""
        session = self.session
        if self._usable(session):
            assert session is not None
            return session
        async with self._lock:
            if self._usable(self.session):
                assert self.session is not None
                return self.session
            return await self._handshake()

    async def _handshake(self) -> Session:
        initiator = Initiator(
            signer=self.signer,
            credential=self.credential,
            trust=self.trust,
            expected_peer=self.gateway,
        )
        msg1 = initiator.start()
        self._last_handshake = self.clock()
        code, msg2 = await self._post_handshake(msg1)
        if code != codes.CHANGED:
            raise GatewayRefused(code, msg2)
        done = initiator.receive(msg2, self.clock(), self._time_policy(), revoked=self.revoked)
        session = done.session
        if self.accelerate:
            accel.accelerate(session)  # tagged sessions only; sealed stay in Python
        self._unconfirmed[session.session_id] = done.reply
        # make-before-break: requests in flight keep their reference to the old session
        self.session = session
        self._live.append(session)
        self.handshakes += 1
        self._arm()
        return session

    async def _post_handshake(self, msg1: bytes) -> tuple[Any, bytes]:
        """``POST /.well-known/sa1`` with msg1 in Block1 blocks and msg2 back in Block2
        blocks (RFC 7959, one block per exchange), every block of this handshake under
        one Request-Tag (RFC 9175) so that it never mixes with another handshake from
        the same endpoint. Returns the final code and the (reassembled) payload."""
        tag = os.urandom(4)
        size = 1 << (BLOCK_SZX + 4)

        def message(payload: bytes) -> aiocoap.Message:
            msg = self._new_message(codes.POST, payload)
            msg.opt.uri_path = self.handshake_path
            msg.opt.content_format = 42
            msg.opt.add_option(OptionNumber.REQUEST_TAG.create_option(value=tag))
            return msg

        count = max(1, -(-len(msg1) // size))
        response: aiocoap.Message | None = None
        for number in range(count):
            msg = message(msg1[number * size : (number + 1) * size])
            more = number + 1 < count
            if count > 1:
                msg.opt.block1 = (number, more, BLOCK_SZX)
            response = await self._send(msg, blockwise=False)
            if more and response.code != codes.CONTINUE:
                return response.code, bytes(response.payload)
        assert response is not None
        body = bytearray(response.payload)
        block2 = response.opt.block2
        while block2 is not None and block2.more and response.code == codes.CHANGED:
            follow = message(b"")
            follow.opt.block2 = (len(body) // block2.size, False, block2.size_exponent)
            part = await self._send(follow, blockwise=False)
            if part.code != codes.CHANGED or part.opt.block2 is None or (
                part.opt.block2.start != len(body)
            ):
                return part.code, bytes(part.payload)
            body += part.payload
            block2 = part.opt.block2
        return response.code, bytes(body)

    def _new_message(self, code: Any, payload: bytes) -> aiocoap.Message:
        """A request to the gateway: to its address as last seen (no name resolution
        per request), or to ``uri`` before the first answer."""
        msg = aiocoap.Message(code=code, payload=payload)
        if self._remote is not None:
            msg.remote = self._remote
        else:
            msg.set_request_uri(self.uri)
        return msg

    async def _send(self, request: aiocoap.Message, blockwise: bool = True) -> aiocoap.Message:
        ctx = await self._ctx()
        try:
            response = await ctx.request(request, handle_blockwise=blockwise).response
        except coap_error.Error as exc:
            self._remote = None  # resolve the name again next time
            raise CoapError(f"no answer from {self.uri}: {exc!r}") from None
        if self._remote is None and response.remote is not None:
            self._remote = response.remote
        return response

    # -- requests --------------------------------------------------------------------
    def _message(
        self,
        session: Session,
        code: Any,
        segments: tuple[str, ...],
        query: tuple[str, ...],
        content_format: int | None,
        accept: int | None,
        observe: int | None,
        header: bytes,
        body: bytes,
    ) -> aiocoap.Message:
        msg = self._new_message(code, body)
        msg.opt.uri_path = segments
        if query:
            msg.opt.uri_query = query
        if content_format is not None:
            msg.opt.content_format = content_format
        if accept is not None:
            msg.opt.accept = accept
        if observe is not None:
            msg.opt.observe = observe
        msg.opt.add_option(PROOF_OPTION.create_option(value=header))
        msg3 = self._unconfirmed.get(session.session_id)
        if msg3 is not None:
            msg.opt.add_option(CONFIRM_OPTION.create_option(value=msg3))
        return msg

    @staticmethod
    def _parse(
        method: str, path: str | Sequence[str], query: Sequence[str]
    ) -> tuple[Any, tuple[str, ...], tuple[str, ...]]:
        code = _CODES.get(method)
        if code is None:
            raise CoapError(f"unknown CoAP method {method!r}", Reason.BAD_PARAMETERS)
        segments = tuple(path.strip("/").split("/")) if isinstance(path, str) else tuple(path)
        if segments == ("",):
            segments = ()
        return code, segments, tuple(query)

    def _build(
        self,
        session: Session,
        method: str,
        path: str | Sequence[str],
        payload: bytes,
        query: Sequence[str],
        content_format: int | None,
        accept: int | None,
        observe: int | None,
    ) -> tuple[aiocoap.Message, bytes]:
        """One proven request (its whole payload in one message)."""
        code, segments, query = self._parse(method, path, query)
        action = cached_request_action(int(code), segments, query, content_format, accept, observe)
        header, body = session.protect(action, payload, self.clock())
        msg = self._message(session, code, segments, query, content_format, accept, observe,
                            header, body)
        return msg, header

    def open_response(
        self, session: Session, request_header: bytes, response: aiocoap.Message
    ) -> ProvenResponse:
        """Check that ``response`` is the gateway's proven answer to the request with
        ``request_header``; raise :class:`GatewayRefused` or :class:`ResponseRejected`."""
        opt = response.opt
        proofs = opt._options.get(PROOF_OPTION)
        if not proofs:
            if response.code.is_successful():
                raise ResponseRejected(
                    "a success response without the gateway's proof", Reason.MALFORMED
                )
            raise GatewayRefused(response.code, bytes(response.payload))
        for number in opt._options:
            if number & 1 and number not in _UNDERSTOOD_CRITICAL:
                raise ResponseRejected(
                    f"response with unknown critical option {number}", Reason.MALFORMED
                )
        if len(proofs) != 1 or len(proofs[0].value) != HEADER_SIZE:
            raise ResponseRejected("malformed proof option", Reason.MALFORMED)
        header = bytes(proofs[0].value)
        action = response_action(request_header, int(response.code), opt.content_format)
        try:
            verified = session.verify(header, action, bytes(response.payload), self.clock())
        except TesseraError as exc:
            raise ResponseRejected(f"response refused: {exc.detail}", exc.reason) from None
        # a proven response: the gateway holds this session, msg3 has done its job
        self._unconfirmed.pop(session.session_id, None)
        cf = opt.content_format
        return ProvenResponse(
            response.code,
            verified.payload,
            None if cf is None else int(cf),
            response,
            verified.seq,
        )

    async def _upload(
        self,
        session: Session,
        method: str,
        path: str | Sequence[str],
        payload: bytes,
        query: Sequence[str],
        content_format: int | None,
        accept: int | None,
    ) -> tuple[aiocoap.Message, bytes]:
        """Send ``payload`` block by block, each block proven and chained to the one
        before; returns the (reassembled) final response and the last block's header."""
        code, segments, query = self._parse(method, path, query)
        action = cached_request_action(int(code), segments, query, content_format, accept, None)
        size = 1 << (BLOCK_SZX + 4)
        previous = NO_PREVIOUS
        number = 0
        while True:
            chunk = payload[number * size : (number + 1) * size]
            more = (number + 1) * size < len(payload)
            bound = block_action(action, number, BLOCK_SZX, more, previous)
            header, body = session.protect(bound, chunk, self.clock())
            msg = self._message(session, code, segments, query, content_format, accept, None,
                                header, body)
            msg.opt.block1 = (number, more, BLOCK_SZX)
            response = await self._send(msg, blockwise=False)
            if not more:
                return await self._rest_of_response(msg, response), header
            if response.code != codes.CONTINUE:
                return response, header
            previous = header
            number += 1

    async def _rest_of_response(
        self, request: aiocoap.Message, response: aiocoap.Message
    ) -> aiocoap.Message:
        """Fetch the later Block2 blocks of a response to a request sent without
        aiocoap's automatic block-wise handling (same proof: the gateway serves them
        from the response it proved whole)."""
        block2 = response.opt.block2
        if block2 is None or not block2.more:
            return response
        body = bytearray(response.payload)
        while block2 is not None and block2.more:
            follow = request.copy(payload=b"", mid=None, token=None, block1=None,
                                  block2=(len(body) // block2.size, False, block2.size_exponent))
            follow.opt.delete_option(CONFIRM_OPTION)
            part = await self._send(follow, blockwise=False)
            if part.opt.block2 is None or part.opt.block2.start != len(body):
                return part  # a refusal, or something that does not continue the body
            body += part.payload
            block2 = part.opt.block2
        whole = response.copy(payload=bytes(body))
        whole.opt.block2 = None
        return whole

    async def request(
        self,
        method: str,
        path: str | Sequence[str],
        payload: bytes = b"",
        *,
        query: Sequence[str] = (),
        content_format: int | None = None,
        accept: int | None = None,
    ) -> ProvenResponse:
        """Send one proven request and return the gateway's proven response."""
        for attempt in (0, 1):
            session = await self.session_for_use()
            if len(payload) > 1 << (BLOCK_SZX + 4):
                response, header = await self._upload(
                    session, method, path, payload, query, content_format, accept
                )
            else:
                msg, header = self._build(
                    session, method, path, payload, query, content_format, accept, None
                )
                response = await self._send(msg)
            try:
                return self.open_response(session, header, response)
            except GatewayRefused as refused:
                if attempt or not self._may_retry(refused, session):
                    raise
                session.close()  # the gateway no longer knows it
                self._unconfirmed.pop(session.session_id, None)
        raise AssertionError("unreachable")

    def _may_retry(self, refused: GatewayRefused, session: Session) -> bool:
        return (
            refused.code == codes.UNAUTHORIZED
            and refused.reason in _RETRY_REASONS
            and session is self.session
            and self.clock() - self._last_handshake >= self.min_handshake_interval
        )

    async def observe(
        self,
        path: str | Sequence[str],
        *,
        query: Sequence[str] = (),
        accept: int | None = None,
    ) -> AsyncIterator[ProvenResponse]:
        """GET with Observe: yield the first response and every notification, each
        verified on its own (a notification that fails raises and ends the
        observation)."""
        session = await self.session_for_use()
        msg, header = self._build(session, "GET", path, b"", query, None, accept, 0)
        ctx = await self._ctx()
        req = ctx.request(msg)
        try:
            try:
                first = await req.response
            except coap_error.Error as exc:
                raise CoapError(f"no answer from {self.uri}: {exc!r}") from None
            yield self.open_response(session, header, first)
            if not first.code.is_successful() or first.opt.observe is None:
                return
            async for note in req.observation:
                yield self.open_response(session, header, note)
        finally:
            req.observation.cancel()


__all__ = [
    "CONFIRM_OPTION",
    "PROOF_OPTION",
    "CoapError",
    "GatewayRefused",
    "ProvenResponse",
    "ResponseRejected",
    "TesseraCoapClient",
]
