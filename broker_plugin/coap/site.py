"""A CoAP gateway on SA1 sessions: an aiocoap site wrapper any resource tree can sit behind.

::

    site = TesseraSite(inner_site, responder, policy, device_class_of=...)
    context = await start_gateway(site, bind=("::", 5683))

* ``POST /.well-known/sa1`` carries SA1 msg1 and is answered ``2.04`` with msg2
  (block-wise both ways; broker_plugin/coap/handshake.py). The gateway then holds only
  a pending handshake: no session, no identity, nothing granted.
* The device's first proven request carries msg3 in the **Tessera-Confirm** option
  (65007) beside its proof: the gateway confirms the session (only now is the device
  logged in and ``handshake_ok`` audited), then verifies and serves the request. msg3
  costs no round trip.
* Every request carries its 31-byte SA1 header in the **Tessera-Proof** option
  (:data:`PROOF_OPTION`, 65003: experimental range, critical, unsafe to forward). The
  site looks the session up by the session id in the header, verifies the proof over
  the request's action (method, full Uri-Path, Uri-Query, Content-Format, Accept,
  Observe) and payload, checks the policy (``[classes.X.coap]``), and only then hands
  the request to the inner site, with the payload opened (sealed mode) and the proof
  removed. A Block1 upload is proven block by block (each block's proof chained to the
  previous one), so nothing is spooled that was not proven.
* Every response is proven under the session's other direction, bound to the request it
  answers, so the device knows the gateway answered; Observe notifications are proven
  one by one.
* Refusals: ``4.02`` for an unknown critical option, ``4.00`` for a request that does not
  fit the wire format (malformed Uri-Host, an action beyond 65,535 bytes), ``4.01`` with
  a diagnostic payload ``tessera: <reason> (<code>)`` for a missing, malformed, forged,
  replayed or stale proof or an unknown session (never proven: there is no
  authenticated peer to prove it to), ``4.03`` proven when the policy denies. Each
  refusal is one log line (rate-limited) and a counter; refusals are audited as
  per-interval counts by reason and source, so a flood cannot fill the audit log.
* Everything kept before authentication is bounded per source address and in total
  (:class:`GatewayLimits`, docs/COAP.md "Bounds"), including aiocoap's own message
  deduplication (:func:`start_gateway` / :func:`~broker_plugin.coap.transport.harden`),
  and datagrams from addresses without a session are decoded only within a budget
  (:meth:`TesseraSite.admit_datagram`), so devices with sessions are served during a
  flood.
* Session keys are erased on schedule: a timer re-armed to each session's
  ``next_deadline_at`` calls ``poll`` (no request needed).

The wire format and its rationale are in docs/COAP.md.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import heapq
import ipaddress
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import aiocoap
from aiocoap import error, interfaces, resource
from aiocoap.numbers import codes
from aiocoap.numbers.optionnumbers import OptionNumber
from aiocoap.optiontypes import OpaqueOption

from structauth import accel
from structauth.coap_binding import (
    CONFIRM_OPTION_NUMBER,
    HANDSHAKE_PATH,
    METHOD_NAMES,
    PROOF_OPTION_NUMBER,
    block_action,
    cached_request_action,
    diagnostic,
    response_action,
)
from structauth.credentials import Credential, Identity
from structauth.errors import MalformedMessage, Reason, TesseraError
from structauth.handshake import HandshakeConfirmed, Responder
from structauth.session import HEADER_SIZE, Session, SessionState

from .handshake import MAX_MSG1, ConfirmRefused, HandshakeEndpoint
from .limits import BoundedTable, Limits, source_of, source_of_host
from .state import (  # re-exported: the gateway's public types
    MAX_PAYLOAD,
    CoapPeer,
    GatewayLimits,
    ProvenAddress,
    _Transfer,
)
from .transport import (
    BoundedDedup,
    TokenBucket,
    harden,
    harden_interface,
    interface_of,
)

log = logging.getLogger("tessera.coap")

#: Tessera-Proof: 65003 = 0xFDEB, in the experimental range 65000-65535; odd, so
#: critical (a server that does not know it must refuse the request, never serve it
#: unauthenticated), and bit 1 set, so unsafe to forward (a proxy that does not know it
#: must not forward it: the proof binds the exact request). Opaque, exactly 31 bytes.
PROOF_OPTION = OptionNumber(PROOF_OPTION_NUMBER)
PROOF_OPTION.set_format(OpaqueOption)
#: Tessera-Confirm: 65007 = 0xFDEF, critical and unsafe to forward too; SA1 msg3
#: (46 bytes) on the first proven request(s) of a new session.
CONFIRM_OPTION = OptionNumber(CONFIRM_OPTION_NUMBER)
CONFIRM_OPTION.set_format(OpaqueOption)



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
        int(CONFIRM_OPTION),
    }
)
_PROXY_OPTIONS = frozenset({int(OptionNumber.PROXY_URI), int(OptionNumber.PROXY_SCHEME)})
_SINGLE = (int(PROOF_OPTION), int(CONFIRM_OPTION))
_URI_HOST = int(OptionNumber.URI_HOST)
#: a Uri-Host must be an IPv4 address, an IPv6 address (bracketed or not) or a
#: reg-name made of unreserved and sub-delim characters (RFC 3986 3.2.2, RFC 7252 6.4);
#: non-ASCII letters are allowed for internationalized names
_REG_NAME = re.compile(r"^[A-Za-z0-9\-._~!$&'()*+,;=]+$")


def _valid_host(host: str) -> bool:
    if not host or len(host.encode("utf-8")) > 255:
        return False
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return False
        return True
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return False
        return True
    if host.isascii():
        return bool(_REG_NAME.match(host))
    return all(ch.isalnum() or ch in "-._~" for ch in host)


# ------------------------------------------------------------------ action strings


def _is_proven(message: Any) -> bool:
    return bool(message.opt._options.get(PROOF_OPTION_NUMBER))


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
                aiocoap.Message(code=codes.UNAUTHORIZED, max_age=0,
                                payload=diagnostic(Reason.SESSION_EXPIRED)),
                is_last=True,
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


class _Refused(Exception):
    def __init__(self, response: aiocoap.Message) -> None:
        super().__init__(str(response))
        self.response = response


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
        limits: GatewayLimits | None = None,
        accelerate: bool = True,
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
        self.limits = limits or GatewayLimits()
        #: verify tagged sessions in C (structauth.accel) where the extension was built;
        #: the Python path stays for sealed sessions and for everything C does not judge
        self.accelerate = accelerate and accel.available()
        #: session id -> peer; one identity may hold several sessions (make-before-break)
        self.sessions: dict[bytes, CoapPeer] = {}
        #: identity URI -> its session ids, oldest first
        self._by_identity: dict[str, list[bytes]] = {}
        self.revoked_serials: set[str] = set()
        #: refusals and events by name (also reported through ``count``)
        self.stats: Counter[str] = Counter()
        self.handshakes = HandshakeEndpoint(self, self.limits.handshake)
        #: Block1 uploads in progress, by (session id, request action); owner: identity
        self.transfers: BoundedTable[tuple[bytes, bytes], _Transfer] = BoundedTable(
            self.limits.block1)
        #: proven responses larger than a block, by the request's header; owner: identity
        self.responses: BoundedTable[bytes, aiocoap.Message] = BoundedTable(
            self.limits.block2)
        #: aiocoap's message-layer store, once :meth:`attach` ran
        self.dedup: list[BoundedDedup] = []
        self._attached: set[int] = set()
        self._next_sweep = 0.0
        # key erasure: (deadline, session id), soonest first, and the armed timer
        self._timers: list[tuple[float, bytes]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        # refusal log and audit aggregation
        self._log_second = 0
        self._log_lines = 0
        self._log_suppressed = 0
        self._refusals: Counter[tuple[str, str]] = Counter()
        self._refusals_since = 0.0
        # admission of datagrams before decoding (sources without a session)
        lim = self.limits
        self._known: BoundedTable[str, None] = BoundedTable(
            Limits(per_owner=1, per_owner_bytes=1, total=65536, total_bytes=65536,
                   idle=lim.known_for))
        self._buckets: BoundedTable[str, TokenBucket] = BoundedTable(
            Limits(per_owner=1, per_owner_bytes=1, total=1024, total_bytes=1024, idle=10.0))
        self._preauth = TokenBucket(lim.preauth_rate, lim.preauth_burst, self.clock())

    @property
    def policy(self) -> Any:
        return getattr(self._policy, "current", self._policy)

    def count(self, metric: str, label: str) -> None:
        self.stats[f"{metric}:{label}" if label else metric] += 1
        self._count(metric, label)

    def attach(self, context: Any) -> None:
        """Bound the message-layer state of the aiocoap ``context`` serving this site
        and catch undecodable datagrams (broker_plugin/coap/transport.py). The site
        also does this by itself for the interface of the first request it sees, so a
        context made with plain ``create_server_context`` is covered from then on."""
        self.dedup += harden(context, **self._harden_options())

    def _harden_options(self) -> dict[str, Any]:
        return {
            "limits": self.limits.dedup,
            "is_proven": _is_proven,
            "on_malformed": self._malformed_datagram,
            "admit": self.admit_datagram,
            "clock": self.clock,
        }

    def admit_datagram(self, address: Any) -> bool:
        """Before aiocoap decodes a datagram: always for an address that recently sent a
        proven request; otherwise within the pre-authentication budget (total and per
        source). Dropped datagrams are counted, not logged."""
        host = address[0] if isinstance(address, tuple) else str(address)
        if host in self._known:
            return True
        now = self.clock()
        source = source_of_host(host)
        bucket = self._buckets.get(source, now, touch=True)
        if bucket is None:
            lim = self.limits
            bucket = TokenBucket(lim.preauth_rate_per_source, lim.preauth_burst_per_source,
                                 now)
            self._buckets.put(source, source, bucket, 1, now)
        if bucket.take(now) and self._preauth.take(now):
            return True
        self.stats["dropped:preauth_budget"] += 1
        return False

    def _known_source(self, peer: CoapPeer, request: aiocoap.Message, now: float) -> None:
        """The request's address holds a session: admit its datagrams (refreshed at
        most every 10 s per session and address)."""
        sockaddr = getattr(request.remote, "sockaddr", None)
        if not sockaddr:
            return
        host = str(sockaddr[0])
        if peer.extra.get("known") == host and now < peer.extra.get("known_until", 0.0):
            return
        if self._known.get(host, now, touch=True) is None and host not in self._known:
            self._known.put(host, host, None, 1, now)
        peer.extra["known"] = host
        peer.extra["known_until"] = now + 10.0

    def _attach_remote(self, remote: Any) -> None:
        found = interface_of(remote)
        if found is not None:
            store = harden_interface(*found, **self._harden_options())
            if store is not None:
                self.dedup.append(store)
        self._attached.add(id(getattr(remote, "interface", None)))

    def close(self) -> None:
        """Cancel the key-erasure timer (the context is shutting down)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = float("inf")

    # -- aiocoap resource interface -------------------------------------------------
    async def render(self, request: aiocoap.Message) -> aiocoap.Message:
        raise RuntimeError("TesseraSite renders through render_to_pipe only")

    async def needs_blockwise_assembly(self, request: aiocoap.Message) -> bool:
        raise RuntimeError("TesseraSite renders through render_to_pipe only")

    def get_resources_as_linkheader(self) -> Any:
        return self.inner.get_resources_as_linkheader()

    async def render_to_pipe(self, pipe: Any) -> None:
        request: aiocoap.Message = pipe.request
        if id(getattr(request.remote, "interface", None)) not in self._attached:
            self._attach_remote(request.remote)
        try:
            answer = await self._dispatch(pipe, request)
        except _Refused as refused:
            answer = refused.response
        except MalformedMessage as exc:
            answer = self.refuse(request, codes.BAD_REQUEST, exc.reason, exc.detail)
        if answer is not None:
            pipe.add_response(answer, is_last=True)

    async def _dispatch(self, pipe: Any, request: aiocoap.Message) -> aiocoap.Message | None:
        self._check_options(request)
        if tuple(request.opt.uri_path) == HANDSHAKE_PATH:  # below where this site sits
            if request.opt._options.get(PROOF_OPTION_NUMBER) or request.opt._options.get(
                CONFIRM_OPTION_NUMBER
            ):
                return self.refuse(request, codes.BAD_OPTION, Reason.MALFORMED,
                                   "proof or confirmation on the handshake resource")
            return self.handshakes.render(request)
        path, query = self._full_path_and_query(request)
        return await self._serve(pipe, request, path, query)

    def _check_options(self, request: aiocoap.Message) -> None:
        for number, options in request.opt._options.items():
            if number & 1 and number not in self.understood:
                if number in _PROXY_OPTIONS:
                    raise _Refused(self.refuse(request, codes.PROXYING_NOT_SUPPORTED,
                                               Reason.MALFORMED, "proxying is not offered"))
                raise _Refused(self.refuse(request, codes.BAD_OPTION, Reason.MALFORMED,
                                           f"unknown critical option {int(number)}"))
            if len(options) > 1 and number in _SINGLE:
                raise _Refused(self.refuse(request, codes.BAD_OPTION, Reason.MALFORMED,
                                           f"option {int(number)} repeated"))
            if number == _URI_HOST and not all(_valid_host(str(o.value)) for o in options):
                raise _Refused(self.refuse(request, codes.BAD_REQUEST, Reason.MALFORMED,
                                           "malformed Uri-Host"))

    def _full_path_and_query(
        self, request: aiocoap.Message
    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The request's full Uri-Path and Uri-Query, also when this site is mounted
        below another Site (which strips the path it mounts on, keeping the original
        URI)."""
        original = getattr(request, "_original_request_uri", None)
        if original is None:
            return tuple(request.opt.uri_path), tuple(request.opt.uri_query)
        try:
            parsed = aiocoap.Message(uri=original)
        except (ValueError, error.Error):
            raise _Refused(self.refuse(request, codes.BAD_REQUEST, Reason.MALFORMED,
                                       "request URI does not parse")) from None
        return tuple(parsed.opt.uri_path), tuple(parsed.opt.uri_query)

    # -- refusals ------------------------------------------------------------------------
    def refuse(
        self,
        request: aiocoap.Message,
        code: Any,
        reason: Reason,
        detail: str,
        metric: str = "rejections",
        *,
        peer: CoapPeer | None = None,
        max_age: int = 0,
        size1: int | None = None,
    ) -> aiocoap.Message:
        """An unproven refusal: counted, one log line (rate-limited), counted for the
        interval's audit record by reason and source; the diagnostic payload names
        the reason. ``peer``: the session the proof named (its counter only: the
        refusal is not attributed to the device, anyone can name a session)."""
        name = reason.name.lower()
        self.count(metric, name)
        address = _address(request)
        self._log(f"refused {code} {name} from {address}: {detail}")
        self._note_refusal(name, source_of(request.remote))
        if peer is not None:
            peer.rejections += 1
        payload = diagnostic(reason)
        if code == codes.BAD_OPTION and detail.startswith("unknown critical option"):
            payload = diagnostic(reason, detail)
        message = aiocoap.Message(code=code, max_age=max_age, payload=payload)
        if size1 is not None:
            message.opt.size1 = size1
        return message

    def _malformed_datagram(self, address: str, detail: str) -> None:
        self.count("rejections", "bad_option")
        self._log(f"refused 4.02 undecodable datagram from {address}: {detail}")
        self._note_refusal("bad_option", source_of_text(address))

    def _log(self, line: str) -> None:
        second = int(time.monotonic())
        if second != self._log_second:
            if self._log_suppressed:
                log.info("%d more refusals not logged in the last second (see metrics)",
                         self._log_suppressed)
            self._log_second, self._log_lines, self._log_suppressed = second, 0, 0
        if self._log_lines < self.limits.log_per_second:
            self._log_lines += 1
            log.info("%s", line)
        else:
            self._log_suppressed += 1

    def _note_refusal(self, reason: str, source: str) -> None:
        refusals = self._refusals
        key = (reason, source)
        if key not in refusals and len(refusals) >= self.limits.audit_keys:
            key = (reason, "other")
        refusals[key] += 1

    def flush_refusals(self, now: float) -> None:
        """Audit the refusals counted since the last flush as one record."""
        if self._refusals:
            self.audit(
                "refusals",
                seconds=round(now - self._refusals_since, 3),
                counts=[
                    {"reason": reason, "source": source, "count": n}
                    for (reason, source), n in sorted(self._refusals.items())
                ],
            )
            self._refusals.clear()
        self._refusals_since = now

    # -- handshake (msg3 on the first proven request) ------------------------------------
    def full(self, now: float) -> bool:
        """True if no new session can be admitted (after dropping ended ones)."""
        if len(self.sessions) >= self.max_sessions:
            self.sweep(now)
        return len(self.sessions) >= self.max_sessions

    def is_revoked(self, credential: Credential) -> bool:
        return _serial(credential) in self.revoked_serials

    def admit(
        self, request: aiocoap.Message, confirmed: HandshakeConfirmed, now: float
    ) -> CoapPeer:
        """msg3 verified: the session exists. Log the device in (unless its credential
        was revoked meanwhile or the gateway is full)."""
        session, identity = confirmed.session, confirmed.peer
        serial = _serial(confirmed.credential)
        if serial in self.revoked_serials:
            session.close()
            raise ConfirmRefused(self.refuse(request, codes.UNAUTHORIZED,
                                             Reason.CREDENTIAL_REVOKED,
                                             "credential revoked during the handshake",
                                             "handshakes"))
        if self.full(now):
            session.close()
            raise ConfirmRefused(self.refuse(request, codes.SERVICE_UNAVAILABLE,
                                             Reason.BACKEND_UNAVAILABLE, "too many sessions",
                                             "handshakes", max_age=5))
        address = _address(request)
        peer = CoapPeer(
            session=session,
            identity=identity,
            credential=confirmed.credential,
            cert_serial=serial,
            device_class=self.device_class_of(identity),
            address=address,
        )
        mine = self._by_identity.setdefault(identity.uri, [])
        while len(mine) >= self.max_sessions_per_peer:  # oldest first
            old = self.sessions.get(mine[0])
            if old is None:  # removed from ``sessions`` directly
                mine.pop(0)
                continue
            self._drop(old, "replaced by newer confirmed sessions of the same device")
        sid = session.session_id
        if self.accelerate:
            accel.accelerate(session)  # False for sealed sessions: they stay in Python
        self.sessions[sid] = peer
        mine.append(sid)
        self._arm(session, now)
        self.audit("handshake_ok", identity=identity.uri, session=sid.hex(), address=address)
        self.count("handshakes", "ok")
        return peer

    # -- requests -------------------------------------------------------------------------
    async def _serve(
        self, pipe: Any, request: aiocoap.Message, path: tuple[str, ...], query: tuple[str, ...]
    ) -> aiocoap.Message | None:
        opt = request.opt
        proofs = opt._options.get(PROOF_OPTION_NUMBER)
        if not proofs:
            return self.refuse(request, codes.UNAUTHORIZED, Reason.MALFORMED, "missing proof")
        header = bytes(proofs[0].value)
        if len(header) != HEADER_SIZE:
            return self.refuse(request, codes.UNAUTHORIZED, Reason.MALFORMED,
                               "proof is not 31 bytes")
        now = self.clock()
        if now >= self._next_sweep:
            self.sweep(now)
        sid = header[1:9]
        peer = self.sessions.get(sid)
        confirms = opt._options.get(CONFIRM_OPTION_NUMBER)
        if confirms and peer is None:
            try:
                peer = self.handshakes.confirm(request, sid, bytes(confirms[0].value), now)
            except ConfirmRefused as refused:
                return refused.response
        if peer is None:
            return self.refuse(request, codes.UNAUTHORIZED, Reason.UNKNOWN_SESSION,
                               "unknown session")
        block2 = opt.block2
        if block2 is not None and block2.block_number > 0:
            # a later block of a response proven whole, found by the request's proof
            return self._later_block(request, header, block2)
        code = int(request.code)
        action = cached_request_action(code, path, query, opt.content_format, opt.accept,
                                       opt.observe)
        block1 = opt.block1
        if block1 is not None:
            return await self._block(pipe, request, peer, header, action, path, block1, now)
        try:
            verified = peer.session.verify(header, action, bytes(request.payload), now)
        except TesseraError as exc:
            return self.refuse(request, codes.UNAUTHORIZED, exc.reason, exc.detail, peer=peer)
        peer.requests += 1
        self._known_source(peer, request, now)
        return await self._authorized(pipe, request, peer, header, path, verified.payload)

    async def _block(
        self,
        pipe: Any,
        request: aiocoap.Message,
        peer: CoapPeer,
        header: bytes,
        action: bytes,
        path: tuple[str, ...],
        block1: Any,
        now: float,
    ) -> aiocoap.Message | None:
        """One block of a Block1 upload: verified on its own (its proof chains to the
        previous block's), spooled only then, within the device's budget."""
        payload = bytes(request.payload)
        sid = peer.session.session_id
        key = (sid, action)
        if block1.size_exponent > 6 or (block1.more and len(payload) != block1.size):
            return self.refuse(request, codes.BAD_REQUEST, Reason.MALFORMED,
                               "block size does not match Block1", peer=peer)
        if block1.start + len(payload) > MAX_PAYLOAD:
            self.transfers.pop(key)
            return self.refuse(request, codes.REQUEST_ENTITY_TOO_LARGE, Reason.MALFORMED,
                               f"request body beyond {MAX_PAYLOAD} bytes", peer=peer,
                               size1=MAX_PAYLOAD)
        transfer: _Transfer | None
        if block1.block_number == 0:
            transfer = _Transfer(block1.size_exponent)
        else:
            transfer = self.transfers.get(key, now)
            if (transfer is None or transfer.next != block1.block_number
                    or transfer.szx != block1.size_exponent):
                return self.refuse(request, codes.REQUEST_ENTITY_INCOMPLETE, Reason.MALFORMED,
                                   "block out of sequence, or its transfer expired", peer=peer)
        bound = block_action(action, block1.block_number, block1.size_exponent,
                             bool(block1.more), transfer.previous)
        try:
            verified = peer.session.verify(header, bound, payload, now)
        except TesseraError as exc:
            return self.refuse(request, codes.UNAUTHORIZED, exc.reason, exc.detail, peer=peer)
        peer.requests += 1
        self._known_source(peer, request, now)
        if block1.block_number == 0:
            if not block1.more:
                return await self._authorized(pipe, request, peer, header, path,
                                              verified.payload, block1)
            # refuse a transfer the device may not make before spooling any of it
            denied = self._denied(request, peer, header, path)
            if denied is not None:
                return denied
            if not self.transfers.put(key, peer.identity.uri, transfer, 64, now):
                return self.refuse(request, codes.SERVICE_UNAVAILABLE, Reason.MALFORMED,
                                   "no room for this upload", peer=peer, max_age=1)
        if not self.transfers.grow(key, len(verified.payload), now):
            return self.refuse(request, codes.REQUEST_ENTITY_TOO_LARGE, Reason.MALFORMED,
                               "upload over this device's budget", peer=peer,
                               size1=MAX_PAYLOAD)
        transfer.body += verified.payload
        transfer.next = block1.block_number + 1
        transfer.previous = header
        if block1.more:
            self.count("blocks", "continue")
            answer = aiocoap.Message(code=codes.CONTINUE)
            answer.opt.block1 = block1
            return answer
        self.transfers.pop(key)
        return await self._authorized(pipe, request, peer, header, path,
                                      bytes(transfer.body), block1)

    def _denied(self, request: aiocoap.Message, peer: CoapPeer, header: bytes,
                path: tuple[str, ...]) -> aiocoap.Message | None:
        """The proven 4.03 if the policy refuses the request, else None."""
        policy = self.policy
        if policy is None:
            return None
        method = METHOD_NAMES.get(int(request.code), str(request.code))
        decision = policy.may_request(peer.identity, peer.device_class, method, path)
        if decision.allowed:
            return None
        self.audit(
            "request_denied",
            identity=peer.identity.uri,
            session=peer.session.session_id.hex(),
            method=method,
            path="/".join(path),
            detail=decision.reason,
        )
        self.count("rejections", "not_authorized")
        denied = aiocoap.Message(code=codes.FORBIDDEN, payload=diagnostic(Reason.NOT_AUTHORIZED))
        return self._prove(peer, header, denied) or aiocoap.Message(
            code=codes.UNAUTHORIZED, max_age=0, payload=diagnostic(Reason.SESSION_EXPIRED))

    async def _authorized(
        self,
        pipe: Any,
        request: aiocoap.Message,
        peer: CoapPeer,
        header: bytes,
        path: tuple[str, ...],
        payload: bytes,
        block1: Any = None,
    ) -> aiocoap.Message | None:
        """A verified request (whole): policy, the inner site, the proven answer."""
        denied = self._denied(request, peer, header, path)
        if denied is not None:
            return denied
        inner = _inner_request(request, payload, ProvenAddress(request.remote, peer))
        proving = _ProvingPipe(self, pipe, inner, peer, header)
        try:
            await self.inner.render_to_pipe(proving)
        except error.RenderableError as exc:
            proving.add_response(exc.to_message(), is_last=True)
        except Exception:
            method = METHOD_NAMES.get(int(request.code), str(request.code))
            log.exception("inner site failed on %s %s", method, "/".join(path))
            proving.add_response(aiocoap.Message(code=codes.INTERNAL_SERVER_ERROR), is_last=True)
        final = proving.final
        if final is None:
            return None
        answer = self._first_block(request, peer, header, final)
        if block1 is not None:
            answer.opt.block1 = block1
        return answer

    def _block_exponent(self, request: aiocoap.Message) -> int:
        szx = min(int(request.remote.maximum_block_size_exp), 6)
        if request.opt.block2 is not None:
            szx = min(szx, request.opt.block2.size_exponent)
        return szx

    def _first_block(self, request: aiocoap.Message, peer: CoapPeer, header: bytes,
                     final: aiocoap.Message) -> aiocoap.Message:
        szx = self._block_exponent(request)
        size = 1 << (szx + 4)
        if request.opt.block2 is None and len(final.payload) <= size:
            return final  # fits in one message: no block-wise state to keep
        self.responses.put(header, peer.identity.uri, final, len(final.payload) + 200,
                           self.clock())
        return _slice(final, 0, szx)

    def _later_block(self, request: aiocoap.Message, header: bytes,
                     block2: Any) -> aiocoap.Message:
        whole = self.responses.get(header, self.clock(), touch=True)
        if whole is None:
            return self.refuse(request, codes.REQUEST_ENTITY_INCOMPLETE, Reason.MALFORMED,
                               "no response to take a block from (expired?)")
        szx = self._block_exponent(request)
        if block2.block_number * (1 << (szx + 4)) >= len(whole.payload):
            return self.refuse(request, codes.BAD_REQUEST, Reason.MALFORMED,
                               "Block2 request out of bounds")
        return _slice(whole, block2.block_number, szx)

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

    # -- lifecycle -----------------------------------------------------------------------
    def _arm(self, session: Session, now: float) -> None:
        heapq.heappush(self._timers, (session.next_deadline_at(now), session.session_id))
        self._schedule()

    def _schedule(self) -> None:
        if not self._timers:
            return
        when = self._timers[0][0]
        if self._timer is not None and self._timer_at <= when:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (unit use): sweep() and the request path still poll
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_later(max(0.0, when - self.clock()), self._on_timer)
        self._timer_at = when

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        now = self.clock()
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, sid = heapq.heappop(timers)
            peer = self.sessions.get(sid)
            if peer is None:
                continue
            ended = peer.session.poll(now)
            if ended is not None or peer.session.state is SessionState.CLOSED:
                self._drop(peer, "session ended" if ended is None else ended.reason.name.lower())
                continue
            heapq.heappush(timers, (peer.session.next_deadline_at(now), sid))
        self.stats["timer_runs"] += 1
        self._expire(now)
        self._schedule()

    def _expire(self, now: float) -> None:
        self._known.expire(now)
        self._buckets.expire(now)
        self.handshakes.expire(now)
        self.transfers.expire(now)
        self.responses.expire(now)
        for store in self.dedup:
            store.expire(now)
        if now - self._refusals_since >= self.limits.audit_interval:
            self.flush_refusals(now)

    def sweep(self, now: float) -> None:
        """Drop sessions past their lifetime and expired pre-authentication state (runs
        at most once a second from the request path and on every key-erasure timer;
        call it from a timer on an idle gateway if you like)."""
        self._next_sweep = now + 1.0
        for peer in list(self.sessions.values()):
            ended = peer.session.poll(now)
            if ended is not None or peer.session.state is SessionState.CLOSED:
                self._drop(peer, "session ended" if ended is None else ended.reason.name.lower())
        self._expire(now)

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
        """Refuse these credentials from now on (also a handshake already answered:
        its msg3 is refused) and close their sessions at once."""
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
        """Drop every session and pending handshake (what a restart does); devices
        re-handshake on their next request."""
        for peer in list(self.sessions.values()):
            self._drop(peer, "forgotten")
        self.handshakes.clear()
        self.transfers.clear()
        self.responses.clear()

    def preauth_state(self) -> dict[str, int]:
        """Entries and bytes held before authentication (the bounded tables)."""
        hs = self.handshakes
        out = {
            "msg1_assemblies": len(hs.assemblies),
            "msg1_bytes": hs.assemblies.bytes,
            "pending": len(hs.pending),
            "pending_bytes": hs.pending.bytes,
            "dedup_unproven": sum(len(s.unproven) for s in self.dedup),
            "dedup_unproven_bytes": sum(s.unproven.bytes for s in self.dedup),
            "admission_buckets": len(self._buckets),
        }
        return out


# ------------------------------------------------------------------ helpers


def _slice(whole: aiocoap.Message, number: int, szx: int) -> aiocoap.Message:
    size = 1 << (szx + 4)
    start = number * size
    end = min(start + size, len(whole.payload))
    part = whole.copy(payload=whole.payload[start:end], mid=None)
    part.opt.block2 = (number, end < len(whole.payload), szx)
    if number == 0:
        part.opt.size2 = len(whole.payload)
    return part


def _inner_request(
    request: aiocoap.Message, payload: bytes, remote: ProvenAddress
) -> aiocoap.Message:
    """The request the inner site sees: the opened payload, no proof, confirmation or
    block options (the site assembled the blocks), the authenticated remote."""
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


_STRIPPED = frozenset(
    {
        int(PROOF_OPTION),
        int(CONFIRM_OPTION),
        int(OptionNumber.BLOCK1),
        int(OptionNumber.BLOCK2),
        int(OptionNumber.SIZE1),
        int(OptionNumber.REQUEST_TAG),
    }
)


def _address(request: aiocoap.Message) -> str:
    try:
        return str(request.remote.hostinfo)
    except Exception:
        return repr(request.remote)


def source_of_text(address: str) -> str:
    return source_of_host(address.rsplit(":", 1)[0].strip("[]"))


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


async def start_gateway(site: TesseraSite, bind: tuple[str, int] = ("::", 5683)) -> Any:
    """An aiocoap server context for ``site`` on UDP only (no TCP/TLS listeners to
    bound as well), with the message layer bounded (:meth:`TesseraSite.attach`)."""
    context = await aiocoap.Context.create_server_context(site, bind=bind, transports=["udp6"])
    site.attach(context)
    return context


__all__ = [
    "CONFIRM_OPTION",
    "HANDSHAKE_PATH",
    "MAX_MSG1",
    "MAX_PAYLOAD",
    "PROOF_OPTION",
    "CoapPeer",
    "GatewayLimits",
    "ProvenAddress",
    "TesseraSite",
    "local_port",
    "start_gateway",
]
