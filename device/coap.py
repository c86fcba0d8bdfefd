"""The agent's CoAP transport: aiocoap requests on an SA1 session with a gateway.

::

    client = TesseraCoapClient(signer=..., credential=..., trust=...,
                               uri="coap://gateway.local")
    reply = await client.request("POST", "sensors/pi-1/readings", b"21.5",
                                 content_format=0)
    async for note in client.observe("sensors/pi-1/config"):
        ...

* The first request (or the first after the session's lifetime, less a margin) runs
  the SA1 handshake: ``POST /.well-known/sa1`` with msg1, msg2 back (block-wise by
  aiocoap). Re-handshakes happen before the lifetime ends (make-before-break: requests
  in flight finish on the session they started on).
* Every request carries its proof in the Tessera-Proof option (:data:`PROOF_OPTION`),
  bound to the method, full path, query, Content-Format, Accept, Observe and payload;
  in sealed mode the payload travels encrypted.
* Every response must carry the gateway's proof bound to this very request
  (:func:`response_action`); anything else raises :class:`ResponseRejected`. Refusals
  the gateway cannot prove (4.00/4.01/4.02, no session to prove them with) raise
  :class:`GatewayRefused`; if one says the gateway lost our session, the client
  re-handshakes once and retries.
* Confirmable retransmissions are aiocoap's: the same bytes, so the same proof; the
  gateway answers duplicates from its deduplication cache.
* Credential time checks on msg2 follow ``time_policy`` (default: trust the wall
  clock); a device without an RTC passes ``lambda: TimePolicy.unknown(floor)``.

docs/COAP.md defines the option, the action strings and the refusals.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiocoap
from aiocoap import error as coap_error
from aiocoap.numbers import codes
from aiocoap.numbers.optionnumbers import OptionNumber
from aiocoap.optiontypes import OpaqueOption

from structauth.coap_actions import (
    HANDSHAKE_PATH,
    PROOF_OPTION_NUMBER,
    request_action,
    response_action,
)
from structauth.credentials import Credential, Identity, TimePolicy, TrustStore
from structauth.errors import Reason, TesseraError
from structauth.handshake import Initiator
from structauth.keys import Signer
from structauth.session import HEADER_SIZE, Session, SessionState

#: Tessera-Proof, 65003: experimental range, critical (odd), unsafe to forward (bit 1).
#: Must equal broker_plugin.coap_site.PROOF_OPTION (device and broker_plugin are
#: independent layers, so each defines it; tests/test_coap.py checks they agree).
PROOF_OPTION = OptionNumber(PROOF_OPTION_NUMBER)
PROOF_OPTION.set_format(OpaqueOption)


_DIAGNOSTIC = re.compile(rb"^tessera: ([a-z_]+) \((\d+)\)")
#: refusals after which a fresh handshake can help (the gateway lost or ended our session)
_RETRY_REASONS = frozenset(
    {Reason.UNKNOWN_SESSION, Reason.SESSION_EXPIRED, Reason.BAD_CONFIRMATION}
)
#: critical options a response may carry (RFC 7252 responses carry few critical options)
_UNDERSTOOD_CRITICAL = frozenset(
    {int(OptionNumber.BLOCK2), int(OptionNumber.BLOCK1), int(PROOF_OPTION)}
)
_REASON_CODES = frozenset(int(r) for r in Reason)
METHODS = {"GET": 1, "POST": 2, "PUT": 3, "DELETE": 4, "FETCH": 5, "PATCH": 6, "iPATCH": 7}
_CODES = {name: codes.Code(number) for name, number in METHODS.items()}


_request_action = functools.lru_cache(maxsize=1024)(request_action)


# ------------------------------------------------------------------ errors and results


class CoapError(TesseraError):
    """The gateway could not be reached, or the exchange failed."""

    default_reason = Reason.BACKEND_UNAVAILABLE


class GatewayRefused(CoapError):
    """An unproven refusal (4.00, 4.01, 4.02, 5.03 ...): the gateway, or anyone on the
    path, said no. Carries the CoAP code and the diagnostic payload."""

    def __init__(self, code: Any, diagnostic: bytes) -> None:
        match = _DIAGNOSTIC.match(diagnostic)
        reason = Reason.NOT_AUTHORIZED
        if match and int(match.group(2)) in _REASON_CODES:
            reason = Reason(int(match.group(2)))
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
    """A device's CoAP client toward one gateway (``uri``: ``coap://host[:port]``)."""

    def __init__(
        self,
        *,
        signer: Signer,
        credential: Credential,
        trust: TrustStore,
        uri: str,
        gateway: Identity | None = None,
        context: aiocoap.Context | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        time_policy: Callable[[], TimePolicy] | None = None,
        renew_before: float = 60.0,
        min_handshake_interval: float = 1.0,
        handshake_path: Sequence[str] = HANDSHAKE_PATH,
    ) -> None:
        self.signer = signer
        self.credential = credential
        self.trust = trust
        self.uri = uri.rstrip("/")
        self.gateway = gateway
        self.clock = clock
        self._time_policy = time_policy or (lambda: TimePolicy.trusted(wall_clock()))
        self.renew_before = renew_before
        self.min_handshake_interval = min_handshake_interval
        self.handshake_path = tuple(handshake_path)
        self.session: Session | None = None
        self.handshakes = 0
        self._last_handshake = float("-inf")
        self._context = context
        self._own_context = context is None
        self._lock = asyncio.Lock()

    async def _ctx(self) -> aiocoap.Context:
        if self._context is None:
            self._context = await aiocoap.Context.create_client_context()
        return self._context

    async def close(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None
        if self._own_context and self._context is not None:
            await self._context.shutdown()
            self._context = None

    async def __aenter__(self) -> TesseraCoapClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

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
            peer_kind="broker",
        )
        msg1 = initiator.start()
        request = aiocoap.Message(code=codes.POST, uri=self.uri, payload=msg1, content_format=42)
        request.opt.uri_path = self.handshake_path
        self._last_handshake = self.clock()
        response = await self._send(request)
        if response.code != codes.CHANGED:
            raise GatewayRefused(response.code, bytes(response.payload))
        done = initiator.receive(bytes(response.payload), self.clock(), self._time_policy())
        old, self.session = self.session, done.session
        self.handshakes += 1
        # make-before-break: requests in flight keep their reference to the old session
        del old
        return done.session

    async def _send(self, request: aiocoap.Message) -> aiocoap.Message:
        ctx = await self._ctx()
        try:
            return await ctx.request(request).response
        except coap_error.Error as exc:
            raise CoapError(f"no answer from {self.uri}: {exc!r}") from None

    # -- requests --------------------------------------------------------------------
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
        code = _CODES.get(method)
        if code is None:
            raise CoapError(f"unknown CoAP method {method!r}", Reason.BAD_PARAMETERS)
        segments = tuple(path.strip("/").split("/")) if isinstance(path, str) else tuple(path)
        if segments == ("",):
            segments = ()
        query = tuple(query)
        action = _request_action(int(code), segments, query, content_format, accept, observe)
        header, body = session.protect(action, payload, self.clock())
        msg = aiocoap.Message(code=code, uri=self.uri, payload=body)
        msg.opt.uri_path = segments
        if query:
            msg.opt.uri_query = tuple(query)
        if content_format is not None:
            msg.opt.content_format = content_format
        if accept is not None:
            msg.opt.accept = accept
        if observe is not None:
            msg.opt.observe = observe
        msg.opt.add_option(PROOF_OPTION.create_option(value=header))
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
        cf = opt.content_format
        return ProvenResponse(
            response.code,
            verified.payload,
            None if cf is None else int(cf),
            response,
            verified.seq,
        )

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
    "PROOF_OPTION",
    "CoapError",
    "GatewayRefused",
    "ProvenResponse",
    "ResponseRejected",
    "TesseraCoapClient",
    "request_action",
    "response_action",
]
