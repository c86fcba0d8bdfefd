"""A CoAP gateway on SA1 sessions: an aiocoap site wrapper any resource tree can sit behind.

::

    site = TesseraSite(inner_site, responder, policy, device_class_of=...)
    await aiocoap.Context.create_server_context(site, bind=("127.0.0.1", 5683))

* ``POST /.well-known/sa1`` carries SA1 msg1 and is answered ``2.04`` with msg2
  (aiocoap's block1/block2 moves the ~2 KB messages). Nothing else is reachable without
  a session.
* Every other request carries its 31-byte SA1 header in the **Tessera-Proof** option
  (:data:`PROOF_OPTION`, number 65003: experimental range, critical, unsafe to
  forward). The site looks the session up by the session id in the header, verifies the
  proof over the request's action (:func:`request_action`: method, full Uri-Path,
  Uri-Query, Content-Format, Accept, Observe) and payload, checks the policy
  (``[classes.X.coap]``), and only then hands the request to the inner site, with the
  payload opened (sealed mode) and the proof removed.
* Every response is proven under the session's other direction, bound to the request it
  answers (:func:`response_action` contains the request's whole header), so the device
  knows the gateway answered; Observe notifications are proven one by one.
* Refusals: ``4.02`` for an unknown critical option (aiocoap's own Site does not check),
  ``4.01`` with a diagnostic payload ``tessera: <reason> (<code>)`` for a missing,
  malformed, forged, replayed or stale proof or an unknown session (never proven: there
  is no authenticated peer to prove it to), ``4.03`` proven when the policy denies.
* A confirmable retransmission carries the same bytes; aiocoap's message deduplication
  answers it from its cache before it reaches this site, so the replay window only ever
  sees new message ids.

The wire format and its rationale are in docs/COAP.md.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiocoap
from aiocoap import error, interfaces, resource
from aiocoap.blockwise import Block1Spool, Block2Cache
from aiocoap.numbers import codes
from aiocoap.numbers.optionnumbers import OptionNumber
from aiocoap.optiontypes import OpaqueOption

from structauth.coap_actions import (
    HANDSHAKE_PATH,
    PROOF_OPTION_NUMBER,
    request_action,
    response_action,
)
from structauth.credentials import Credential, Identity, TimePolicy
from structauth.errors import MalformedMessage, ProtocolError, Reason, TesseraError
from structauth.handshake import Responder
from structauth.session import HEADER_SIZE, Session, SessionState

log = logging.getLogger("tessera.coap")

#: Tessera-Proof: 65003 = 0xFDEB, in the experimental range 65000-65535; odd, so
#: critical (a server that does not know it must refuse the request, never serve it
#: unauthenticated), and bit 1 set, so unsafe to forward (a proxy that does not know it
#: must not forward it: the proof binds the exact request). Opaque, exactly 31 bytes.
PROOF_OPTION = OptionNumber(PROOF_OPTION_NUMBER)
PROOF_OPTION.set_format(OpaqueOption)

#: the value standing for an absent Content-Format, Accept or Observe option
#: the largest request payload assembled from block1 transfers (413 beyond it)
MAX_PAYLOAD = 64 * 1024
#: the largest msg1 the handshake resource assembles: the biggest valid msg1 (four
#: 4 KB certificates, a 512-byte context, a 4 KB quote) is about 26 KB
MAX_MSG1 = 32 * 1024


METHODS = {1: "GET", 2: "POST", 3: "PUT", 4: "DELETE", 5: "FETCH", 6: "PATCH", 7: "iPATCH"}

#: critical options this site understands; any other critical option is refused 4.02.
#: Conditional requests (If-Match, If-None-Match) are not evaluated by aiocoap's
#: resources, so they are refused unless the application says its resources handle
#: them (``understood_options``). Proxy-Uri and Proxy-Scheme get 5.05.
UNDERSTOOD_CRITICAL = frozenset(
    {
        int(OptionNumber.URI_HOST),
        int(OptionNumber.URI_PORT),
        int(OptionNumber.URI_PATH),
        int(OptionNumber.URI_QUERY),
        int(OptionNumber.ACCEPT),
        int(OptionNumber.BLOCK2),
        int(OptionNumber.BLOCK1),
        int(PROOF_OPTION),
    }
)
_PROXY_OPTIONS = frozenset({int(OptionNumber.PROXY_URI), int(OptionNumber.PROXY_SCHEME)})


# ------------------------------------------------------------------ action strings


_request_action = functools.lru_cache(maxsize=4096)(request_action)


def diagnostic(reason: Reason, detail: str = "") -> bytes:
    """The payload of a refusal: ``tessera: <reason> (<code>)[: <detail>]``."""
    text = f"tessera: {reason.name.lower()} ({int(reason)})"
    return (text + (f": {detail}" if detail else "")).encode()


def _refusal(code: Any, reason: Reason, detail: str = "") -> aiocoap.Message:
    return aiocoap.Message(code=code, max_age=0, payload=diagnostic(reason, detail))


# ------------------------------------------------------------------ state


@dataclass
class CoapPeer:
    """One SA1 session of a device with this gateway (a device may hold several)."""

    session: Session
    identity: Identity
    credential: Credential
    cert_serial: str
    device_class: str
    address: str
    requests: int = 0
    rejections: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class ProvenAddress(interfaces.EndpointAddress):  # type: ignore[misc]
    """The remote of a request whose proof checked out, as the inner site sees it.

    Everything is the underlying UDP address's, except: ``peer`` (and
    ``authenticated_claims``) name the authenticated device, the blockwise key includes
    the session, and the maximum payload size is unbounded so that inner resources never
    slice a response themselves: the site proves the whole response, then slices it.
    """

    def __init__(self, underlying: Any, peer: CoapPeer) -> None:
        self.underlying = underlying
        self.peer = peer

    def __repr__(self) -> str:
        return f"<ProvenAddress {self.peer.identity} via {self.underlying!r}>"

    @property
    def hostinfo(self) -> Any:
        return self.underlying.hostinfo

    @property
    def hostinfo_local(self) -> Any:
        return self.underlying.hostinfo_local

    @property
    def uri_base(self) -> Any:
        return self.underlying.uri_base

    @property
    def uri_base_local(self) -> Any:
        return self.underlying.uri_base_local

    @property
    def is_multicast(self) -> bool:
        return bool(self.underlying.is_multicast)

    @property
    def is_multicast_locally(self) -> bool:
        return bool(self.underlying.is_multicast_locally)

    @property
    def scheme(self) -> Any:
        return self.underlying.scheme

    @property
    def maximum_block_size_exp(self) -> int:
        return int(self.underlying.maximum_block_size_exp)

    @property
    def maximum_payload_size(self) -> int:
        return MAX_PAYLOAD

    @property
    def blockwise_key(self) -> Any:
        return (self.underlying.blockwise_key, self.peer.session.session_id)

    @property
    def authenticated_claims(self) -> tuple[Identity, ...]:
        return (self.peer.identity,)

    def as_response_address(self) -> Any:
        return self.underlying.as_response_address()


class _ProvingPipe:
    """What the inner site renders into: every response is proven before it goes out.

    The first response, if it is also the last (every request but an observation), is
    held back so that the site can slice it into blocks after proving it whole."""

    def __init__(
        self,
        site: TesseraSite,
        outer: Any,
        request: aiocoap.Message,
        peer: CoapPeer,
        header: bytes,
    ) -> None:
        self.request = request
        self._site = site
        self._outer = outer
        self._peer = peer
        self._header = header
        self.final: aiocoap.Message | None = None
        self._count = 0
        self.closed = False

    def add_response(self, response: aiocoap.Message, is_last: bool = False) -> None:
        if self.closed:
            return
        proven = self._site._prove(self._peer, self._header, response)
        if proven is None:  # the session ended under an observation
            self.closed = True
            self._outer.add_response(
                _refusal(codes.UNAUTHORIZED, Reason.SESSION_EXPIRED), is_last=True
            )
            return
        self._count += 1
        if is_last:
            self.closed = True
            if self._count == 1:
                self.final = proven
                return
        self._outer.add_response(proven, is_last=is_last)

    def add_exception(self, exception: BaseException) -> None:
        if isinstance(exception, error.RenderableError):
            self.add_response(exception.to_message(), is_last=True)
        else:
            log.error("inner site failed: %r", exception)
            self.add_response(aiocoap.Message(code=codes.INTERNAL_SERVER_ERROR), is_last=True)

    def on_interest_end(self, callback: Callable[[], None]) -> None:
        self._outer.on_interest_end(callback)


class _HandshakeResource(resource.Resource):  # type: ignore[misc]
    """``/.well-known/sa1``: POST msg1, get msg2. Block-wise both ways by aiocoap."""

    def __init__(self, site: TesseraSite) -> None:
        super().__init__()
        self._site = site

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        return self._site._handshake(request)

    def get_link_description(self) -> None:
        return None


# ------------------------------------------------------------------ the site


class TesseraSite(interfaces.Resource, resource.PathCapable):  # type: ignore[misc]
    """Wraps ``inner`` (an aiocoap Site or any resource) with SA1 authentication.

    ``policy`` is a :class:`broker_plugin.policy.Policy` or a ``PolicyHolder`` (its
    ``current`` policy is used); ``None`` allows every authenticated request (tests,
    or an application that authorizes by ``request.remote.peer`` itself).
    """

    def __init__(
        self,
        inner: Any,
        responder: Responder,
        policy: Any = None,
        *,
        device_class_of: Callable[[Identity], str] = lambda identity: "default",
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        max_sessions: int = 10_000,
        max_sessions_per_peer: int = 4,
        understood_options: Iterable[int] = (),
        audit: Callable[..., None] = lambda event, **fields: None,
        count: Callable[[str, str], None] = lambda metric, label: None,
    ) -> None:
        self.inner = inner
        self.responder = responder
        self._policy = policy
        self.device_class_of = device_class_of
        self.clock = clock
        self.wall_clock = wall_clock
        self.max_sessions = max_sessions
        self.max_sessions_per_peer = max_sessions_per_peer
        self.understood = UNDERSTOOD_CRITICAL | {int(o) for o in understood_options}
        self.audit = audit
        self._count = count
        #: session id -> peer; one identity may hold several sessions (make-before-break)
        self.sessions: dict[bytes, CoapPeer] = {}
        #: identity URI -> its session ids, oldest first
        self._by_identity: dict[str, list[bytes]] = {}
        self.revoked_serials: set[str] = set()
        #: refusals and events by name (also reported through ``count``)
        self.stats: Counter[str] = Counter()
        self._handshake_resource = _HandshakeResource(self)
        self._block1 = Block1Spool()
        self._block2 = Block2Cache()
        self._next_sweep = 0.0

    @property
    def policy(self) -> Any:
        return getattr(self._policy, "current", self._policy)

    def count(self, metric: str, label: str) -> None:
        self.stats[f"{metric}:{label}" if label else metric] += 1
        self._count(metric, label)

    # -- aiocoap resource interface -------------------------------------------------
    async def render(self, request: aiocoap.Message) -> aiocoap.Message:
        raise RuntimeError("TesseraSite renders through render_to_pipe only")

    async def needs_blockwise_assembly(self, request: aiocoap.Message) -> bool:
        raise RuntimeError("TesseraSite renders through render_to_pipe only")

    def get_resources_as_linkheader(self) -> Any:
        return self.inner.get_resources_as_linkheader()

    async def render_to_pipe(self, pipe: Any) -> None:
        request: aiocoap.Message = pipe.request
        refusal = self._check_options(request)
        if refusal is not None:
            pipe.add_response(refusal, is_last=True)
            return
        if tuple(request.opt.uri_path) == HANDSHAKE_PATH:  # below where this site sits
            block1 = request.opt.block1
            if block1 is not None and block1.start + len(request.payload) > MAX_MSG1:
                self.count("handshakes", "too_large")
                pipe.add_response(
                    aiocoap.Message(code=codes.REQUEST_ENTITY_TOO_LARGE, size1=MAX_MSG1),
                    is_last=True,
                )
                return
            await self._handshake_resource.render_to_pipe(pipe)
            return
        path, query = _full_path_and_query(request)
        answer = await self._serve(pipe, request, path, query)
        if answer is not None:
            pipe.add_response(answer, is_last=True)

    def _check_options(self, request: aiocoap.Message) -> aiocoap.Message | None:
        for number, options in request.opt._options.items():
            if number & 1 and number not in self.understood:
                if number in _PROXY_OPTIONS:
                    self.count("rejections", "proxying_not_supported")
                    return aiocoap.Message(code=codes.PROXYING_NOT_SUPPORTED)
                self.count("rejections", "bad_option")
                return aiocoap.Message(
                    code=codes.BAD_OPTION, payload=f"unknown critical option {number}".encode()
                )
            if number == PROOF_OPTION and len(options) > 1:
                self.count("rejections", "bad_option")
                return aiocoap.Message(code=codes.BAD_OPTION, payload=b"repeated proof option")
        return None

    # -- handshake ----------------------------------------------------------------------
    def _handshake(self, request: aiocoap.Message) -> aiocoap.Message:
        now = self.clock()
        if now >= self._next_sweep or len(self.sessions) >= self.max_sessions:
            self.sweep(now)
        address = _address(request)
        if len(self.sessions) >= self.max_sessions:
            self.count("handshakes", "refused")
            msg = aiocoap.Message(
                code=codes.SERVICE_UNAVAILABLE, max_age=5, payload=b"tessera: too many sessions"
            )
            return msg
        try:
            answered = self.responder.accept(
                bytes(request.payload),
                now,
                TimePolicy.trusted(self.wall_clock()),
                revoked=lambda credential: _serial(credential) in self.revoked_serials,
            )
        except TesseraError as exc:
            self.audit(
                "handshake_refused",
                address=address,
                reason=exc.reason.name.lower(),
                detail=exc.detail,
            )
            self.count("handshakes", "refused")
            if isinstance(exc, MalformedMessage):
                return _refusal(codes.BAD_REQUEST, exc.reason)
            if isinstance(exc, ProtocolError):
                return _refusal(codes.UNAUTHORIZED, exc.reason)
            log.error("handshake failed on our side: %s", exc)
            return _refusal(codes.SERVICE_UNAVAILABLE, exc.reason)
        identity = answered.peer
        peer = CoapPeer(
            session=answered.session,
            identity=identity,
            credential=answered.credential,
            cert_serial=_serial(answered.credential),
            device_class=self.device_class_of(identity),
            address=address,
        )
        mine = self._by_identity.setdefault(identity.uri, [])
        while len(mine) >= self.max_sessions_per_peer:  # oldest first
            old = self.sessions.get(mine[0])
            if old is None:  # removed from ``sessions`` directly
                mine.pop(0)
                continue
            self._drop(old, "replaced by newer sessions of the same peer")
        self.sessions[answered.session.session_id] = peer
        mine.append(answered.session.session_id)
        self.audit(
            "handshake_ok",
            identity=identity.uri,
            session=answered.session.session_id.hex(),
            address=address,
        )
        self.count("handshakes", "ok")
        return aiocoap.Message(code=codes.CHANGED, payload=answered.reply)

    # -- requests -------------------------------------------------------------------------
    async def _serve(
        self, pipe: Any, request: aiocoap.Message, path: tuple[str, ...], query: tuple[str, ...]
    ) -> aiocoap.Message | None:
        proofs = request.opt._options.get(PROOF_OPTION)
        if not proofs:
            return self._reject(None, request, Reason.MALFORMED, "missing proof")
        header = bytes(proofs[0].value)
        if len(header) != HEADER_SIZE:
            return self._reject(None, request, Reason.MALFORMED, "proof is not 31 bytes")
        peer = self.sessions.get(header[1:9])
        if peer is None:
            return self._reject(None, request, Reason.UNKNOWN_SESSION, "unknown session")
        block2 = request.opt.block2
        if block2 is not None and block2.block_number > 0:
            # a later block of a response proven whole: served from the cache, whose key
            # includes this very proof (and the remote address)
            return await self._block2.extract_or_insert(request, _nothing_cached)
        if request.opt.block1 is not None:
            block1 = request.opt.block1
            if block1.start + len(request.payload) > MAX_PAYLOAD:
                return aiocoap.Message(code=codes.REQUEST_ENTITY_TOO_LARGE, size1=MAX_PAYLOAD)
            request = self._block1.feed_and_take(request)  # raises 2.31 Continue until whole
        now = self.clock()
        if now >= self._next_sweep:
            self.sweep(now)
        code = int(request.code)
        opt = request.opt
        action = _request_action(code, path, query, opt.content_format, opt.accept, opt.observe)
        try:
            verified = peer.session.verify(header, action, bytes(request.payload), now)
        except TesseraError as exc:
            return self._reject(peer, request, exc.reason, exc.detail)
        peer.requests += 1
        if verified.session_confirmed:
            self.audit(
                "session_confirmed",
                identity=peer.identity.uri,
                session=peer.session.session_id.hex(),
            )
        method = METHODS.get(code, str(code))
        policy = self.policy
        if policy is not None:
            decision = policy.may_request(peer.identity, peer.device_class, method, path)
            if not decision.allowed:
                self.audit(
                    "request_denied",
                    identity=peer.identity.uri,
                    session=peer.session.session_id.hex(),
                    method=method,
                    path="/".join(path),
                    detail=decision.reason,
                )
                self.count("rejections", "not_authorized")
                denied = aiocoap.Message(
                    code=codes.FORBIDDEN, payload=diagnostic(Reason.NOT_AUTHORIZED)
                )
                return self._prove(peer, header, denied) or _refusal(
                    codes.UNAUTHORIZED, Reason.SESSION_EXPIRED
                )
        inner = _inner_request(request, verified.payload, ProvenAddress(request.remote, peer))
        proving = _ProvingPipe(self, pipe, inner, peer, header)
        try:
            await self.inner.render_to_pipe(proving)
        except error.RenderableError as exc:
            proving.add_response(exc.to_message(), is_last=True)
        except Exception:
            log.exception("inner site failed on %s %s", method, "/".join(path))
            proving.add_response(aiocoap.Message(code=codes.INTERNAL_SERVER_ERROR), is_last=True)
        final = proving.final
        if final is None:
            return None

        if request.opt.block2 is None and len(final.payload) <= request.remote.maximum_payload_size:
            answer = final  # fits in one message: no block-wise state to keep
        else:

            async def built() -> aiocoap.Message:
                return final

            answer = await self._block2.extract_or_insert(request, built)
        block1 = request.opt.block1
        if block1 is not None:
            answer.opt.block1 = block1
        return answer

    def _prove(
        self, peer: CoapPeer, request_header: bytes, response: aiocoap.Message
    ) -> aiocoap.Message | None:
        """Prove ``response`` as the answer to the request whose header is given; None
        if the session can no longer send (lifetime over, closed)."""
        if response.code is None:
            response.code = codes.CONTENT
        action = response_action(request_header, int(response.code), response.opt.content_format)
        try:
            header, body = peer.session.protect(action, bytes(response.payload), self.clock())
        except TesseraError as exc:
            self.count("rejections", f"cannot_prove_{exc.reason.name.lower()}")
            return None
        response.payload = body
        response.opt.delete_option(PROOF_OPTION)
        response.opt.add_option(PROOF_OPTION.create_option(value=header))
        return response

    def _reject(
        self, peer: CoapPeer | None, request: aiocoap.Message, reason: Reason, detail: str
    ) -> aiocoap.Message:
        name = reason.name.lower()
        self.audit(
            "request_rejected",
            address=_address(request),
            identity=peer.identity.uri if peer else None,
            session=peer.session.session_id.hex() if peer else None,
            reason=name,
            detail=detail,
        )
        self.count("rejections", name)
        if peer is not None:
            peer.rejections += 1
        return _refusal(codes.UNAUTHORIZED, reason)

    # -- lifecycle -----------------------------------------------------------------------
    def sweep(self, now: float) -> None:
        """Drop sessions past their lifetime or confirmation deadline (runs at most once
        a second from the request path; call it from a timer on an idle gateway)."""
        self._next_sweep = now + 1.0
        for peer in list(self.sessions.values()):
            ended = peer.session.poll(now)
            if ended is not None or peer.session.state is SessionState.CLOSED:
                self._drop(peer, "session ended" if ended is None else ended.reason.name.lower())

    def _drop(self, peer: CoapPeer, why: str) -> None:
        sid = peer.session.session_id
        self.sessions.pop(sid, None)
        mine = self._by_identity.get(peer.identity.uri)
        if mine is not None:
            if sid in mine:
                mine.remove(sid)
            if not mine:
                del self._by_identity[peer.identity.uri]
        peer.session.close()
        self.audit(
            "session_closed",
            identity=peer.identity.uri,
            session=peer.session.session_id.hex(),
            detail=why,
        )
        self.count("sessions", "closed")

    def revoke(self, cert_serials: Iterable[str], reason: str = "revoked") -> list[CoapPeer]:
        """Refuse these credentials from now on and close their sessions at once."""
        self.revoked_serials.update(s.lower() for s in cert_serials)
        doomed = [p for p in self.sessions.values() if p.cert_serial in self.revoked_serials]
        for peer in doomed:
            self._drop(peer, reason)
        return doomed

    def sessions_of(self, identity: Identity) -> list[CoapPeer]:
        """The sessions ``identity`` holds, oldest first."""
        sessions = self.sessions
        return [sessions[s] for s in self._by_identity.get(identity.uri, ()) if s in sessions]

    def forget_all(self) -> None:
        """Drop every session (what a restart does); devices re-handshake on their
        next request."""
        for peer in list(self.sessions.values()):
            self._drop(peer, "forgotten")


# ------------------------------------------------------------------ helpers


async def _nothing_cached() -> aiocoap.Message:
    raise error.RequestEntityIncomplete()


def _full_path_and_query(request: aiocoap.Message) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The request's full Uri-Path and Uri-Query, also when this site is mounted below
    another Site (which strips the path it mounts on, keeping the original URI)."""
    original = getattr(request, "_original_request_uri", None)
    if original is None:
        return tuple(request.opt.uri_path), tuple(request.opt.uri_query)
    parsed = aiocoap.Message(uri=original)
    return tuple(parsed.opt.uri_path), tuple(parsed.opt.uri_query)


def _inner_request(
    request: aiocoap.Message, payload: bytes, remote: ProvenAddress
) -> aiocoap.Message:
    """The request the inner site sees: the opened payload, no proof and no block
    options (the site assembled the blocks), the authenticated remote."""
    inner = aiocoap.Message(code=request.code, payload=payload)
    for number, options in request.opt._options.items():
        if number not in _STRIPPED:
            for option in options:
                inner.opt.add_option(option)
    inner.mtype = request.mtype
    inner.mid = request.mid
    inner.token = request.token
    inner.remote = remote
    inner.direction = request.direction
    original = getattr(request, "_original_request_uri", None)
    if original is not None:
        inner._original_request_uri = original
    return inner


_STRIPPED = frozenset({int(PROOF_OPTION), int(OptionNumber.BLOCK1), int(OptionNumber.BLOCK2)})


def _address(request: aiocoap.Message) -> str:
    try:
        return str(request.remote.hostinfo)
    except Exception:
        return repr(request.remote)


def _serial(credential: Credential) -> str:
    return format(credential.chain[0].serial_number, "x")


def local_port(context: Any) -> int:
    """The UDP port an aiocoap server context bound (for ``bind=(host, 0)``)."""
    for interface in context.request_interfaces:
        manager = getattr(interface, "token_interface", None)
        transport = getattr(manager, "message_interface", None)
        port = getattr(transport, "_local_port", None)
        if port is not None:
            return int(port())
    raise RuntimeError("no UDP transport in this aiocoap context")


__all__ = [
    "HANDSHAKE_PATH",
    "PROOF_OPTION",
    "CoapPeer",
    "ProvenAddress",
    "TesseraSite",
    "diagnostic",
    "local_port",
    "request_action",
    "response_action",
]
