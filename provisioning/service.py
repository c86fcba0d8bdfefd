"""The provisioning service's HTTP API (Starlette; run by provisioning.server on uvicorn).

Operator endpoints need ``Authorization: Bearer <operator token>``; device endpoints
(renewal) need the device's proof of possession; the trust bundle, CRL and revocation
feed are public, as a CRL is. Every refusal, 404, 405, 413 and 500 included, answers
with one JSON object ``{"error": <reason>, "code": <number>, "detail": <text>}`` and is
logged in one line.

One table (``operations``) makes both the routes and the OpenAPI document; request
bodies and queries go through the pydantic models of ``provisioning.schemas`` (422 when
they do not fit). Around the app, ``_Guard`` bounds what a client can make the service
hold: a body is refused as soon as it passes ``Limits.max_body`` (from its
Content-Length, else while it streams in), a body that does not arrive within
``Limits.body_timeout_s`` is a 408, a client that goes away mid-body is one log line,
and nothing an endpoint raises gets past it as anything but a JSON 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, cast

import pydantic
import pydantic_core
from cryptography.hazmat.primitives.serialization import Encoding
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from provisioning import schemas
from provisioning.enrollment import EnrollmentService, Issued, b64
from provisioning.openapi import Operation, build_openapi, serial_param
from provisioning.operators import Operators
from provisioning.registry import DeviceRecord, RevocationEvent
from structauth.errors import ConfigurationError, Reason, TesseraError

log = logging.getLogger("tessera.provisioning")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@dataclass(frozen=True)
class Limits:
    """What one service process lets its clients hold. docs/ENROLLMENT.md lists these
    values and why; tests shrink them."""

    #: largest request body (bytes); the biggest genuine one, TPM evidence with four
    #: intermediate certificates, is under 60 KiB of base64
    max_body: int = 64 * 1024
    #: a request's whole body must arrive within this (s) once its headers are in
    body_timeout_s: float = 10.0
    #: a connection must deliver a request's complete headers within this (s) of
    #: opening or of its previous answer (provisioning.server)
    header_timeout_s: float = 10.0
    #: idle keep-alive connections are closed after this (s)
    keep_alive_s: float = 5.0
    #: connections beyond this are closed as they are accepted
    max_connections: int = 1024
    #: requests beyond this many connections or tasks in flight get uvicorn's 503
    limit_concurrency: int = 512
    #: largest request line plus headers (bytes)
    max_header_bytes: int = 16 * 1024
    #: longest revocation-feed long poll (s); ?wait above it is refused
    long_poll_max_s: float = 60.0
    #: anonymous renewal challenges per source address: a bucket of ``renew_burst``
    #: refilled at ``renew_per_s``
    renew_per_s: float = 0.5
    renew_burst: int = 10
    #: source addresses the rate limiter remembers (least recently seen forgotten first)
    rate_sources: int = 10_000
    #: renewal challenges are refused (503) while this many pending rows exist
    max_pending: int = 10_000
    #: expired pending rows are deleted this often (s)
    purge_interval_s: float = 30.0
    #: at shutdown, requests still running after this (s) are cancelled
    graceful_shutdown_s: float = 0.5

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str = "[limits]") -> Limits:
        """Limits from a config table (service.toml's ``[limits]``): every key one of the
        fields, every value a positive number of the field's type; anything else is
        refused in one line naming the key."""
        defaults = cls()
        chosen: dict[str, Any] = {}
        for key, value in values.items():
            if not hasattr(defaults, key) or key.startswith("_"):
                known = ", ".join(f.name for f in fields(cls))
                raise ConfigurationError(f"{where}: unknown limit {key!r} (known: {known})")
            kind = type(getattr(defaults, key))
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or (kind is int and not isinstance(value, int)) or not (
                    0 < value < float("inf")):
                raise ConfigurationError(
                    f"{where}: {key} must be a positive {'whole ' if kind is int else ''}"
                    f"number, not {value!r}")
            chosen[key] = kind(value)
        return replace(defaults, **chosen)


_STATUS = {
    Reason.NOT_AUTHORIZED: 401,
    Reason.NOT_ENROLLED: 404,
    Reason.ALREADY_ENROLLED: 409,
    Reason.DEVICE_REVOKED: 403,
    Reason.ENROLLMENT_EXPIRED: 410,
    Reason.REGISTRY_FAILURE: 503,
    Reason.BACKEND_FAILURE: 503,
    Reason.BACKEND_UNAVAILABLE: 503,
}


def record_json(r: DeviceRecord) -> dict[str, Any]:
    return {
        "serial": r.serial,
        "identity": r.identity,
        "kind": r.kind,
        "status": r.status,
        "key_backend": r.key_backend,
        "attestation": r.attestation,
        "ek_fingerprint": r.ek_fingerprint,
        "device_class": r.device_class,
        "enrolled_at": r.enrolled_at.isoformat(),
        "updated_at": r.updated_at.isoformat(),
        "enrolled_by": r.enrolled_by,
        "enrollment_cert_serial": r.enrollment_cert_serial,
        "operational_cert_serial": r.operational_cert_serial,
        "operational_not_after": (
            r.operational_not_after.isoformat() if r.operational_not_after else None
        ),
        "public_key": b64(r.public_key_der),
        "ak_public": b64(r.ak_public) if r.ak_public is not None else None,
    }


def event_json(e: RevocationEvent) -> dict[str, Any]:
    return {
        "id": e.id,
        "serial": e.serial,
        "identity": e.identity,
        "cert_serials": list(e.cert_serials),
        "reason": e.reason,
        "revoked_at": e.revoked_at.isoformat(),
        "revoked_by": e.revoked_by,
    }


def refusal(status: int, reason: Reason, detail: str, *,
            headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": reason.name.lower(), "code": int(reason), "detail": detail},
                        status_code=status, headers=headers)


def error_response(exc: TesseraError, where: str) -> JSONResponse:
    log.warning("refused %s: %s (%s)", where, exc.detail, exc.reason.name.lower())
    return refusal(_STATUS.get(exc.reason, 400), exc.reason, exc.detail)


class _Refused(Exception):
    """A refusal decided by the HTTP layer (the request's shape, size or rate)."""

    def __init__(self, status: int, detail: str, reason: Reason = Reason.MALFORMED,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.reason, self.headers = status, detail, reason, headers


@dataclass
class Call:
    """What an endpoint gets: the request, its validated body and query, the operator."""

    request: Request
    body: Any = None
    query: Any = None
    operator: str | None = None


class RateLimiter:
    """Token buckets per source address, the table bounded (least recently seen
    forgotten first: a forgotten source starts with a full bucket, which the pending
    cap still bounds)."""

    def __init__(self, per_s: float, burst: int, sources: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_s, self.burst, self.sources, self.clock = per_s, burst, sources, clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, source: str) -> float:
        """0 if ``source`` may go on now, else the seconds until it may."""
        now = self.clock()
        tokens, at = self._buckets.pop(source, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.per_s)
        if tokens >= 1.0:
            tokens -= 1.0
            wait = 0.0
        else:
            wait = (1.0 - tokens) / self.per_s if self.per_s > 0 else 3600.0
        self._buckets[source] = (tokens, now)
        while len(self._buckets) > self.sources:
            self._buckets.popitem(last=False)
        return wait


@dataclass
class Control:
    """The app's handle for its runner: ``stop()`` ends every long poll at once (they
    answer with what they have), so a shutdown does not wait for them."""

    stopping: bool = False
    waiters: list[asyncio.Event] = field(default_factory=list)

    def wake(self) -> None:
        for waiter in self.waiters:
            waiter.set()

    def stop(self) -> None:
        self.stopping = True
        self.wake()


def _parse_json(raw: bytes) -> Any:
    """The JSON value of a body, refused in one line when it is not JSON, nests deeper
    than pydantic's parser allows (about 200 levels, far beyond any genuine body; no
    RecursionError is possible) or holds a string that is not text."""
    if not raw:
        return {}
    try:
        return pydantic_core.from_json(raw)
    except ValueError as exc:
        if "recursion limit" in str(exc):
            raise _Refused(400, "request body is nested too deep") from None
        # the parser also refuses a lone surrogate escape ("\ud800"), which the standard
        # parser reads, to be named precisely below; it cannot recurse past the depth
        # the first parser got to without an error
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            raise _Refused(400, "request body is not JSON") from None
        problem = _text_problem(data)
        raise _Refused(400, problem or "request body is not JSON") from None


def _validation_detail(exc: pydantic.ValidationError) -> str:
    first = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in first["loc"])
    message = first["msg"]
    if first["type"] in ("bool_type", "bool_parsing"):
        message = "must be true or false"
    elif first["type"] == "extra_forbidden":
        message = "is not a field of this request (see /openapi.json)"
    elif first["type"] == "missing":
        message = "is missing"
    else:
        message = ": " + message[:1].lower() + message[1:]
    more = exc.error_count() - 1
    return f"field {where!r} {message}".replace(" :", ":") + (
        f" (and {more} more)" if more else "")


def build_app(service: EnrollmentService, operators: Operators,
              limits: Limits | None = None) -> Guard:
    """The service's ASGI app: the Starlette app inside its ``Guard``."""
    limits = limits or Limits()
    return Guard(_starlette(service, operators, limits), limits)


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document, without a service (nothing is called to build it)."""
    document: dict[str, Any] = _starlette(cast(Any, None), cast(Any, None), Limits()).state.openapi
    return document


def _starlette(service: EnrollmentService, operators: Operators, limits: Limits
               ) -> Starlette:
    control = Control()
    renew_limiter = RateLimiter(limits.renew_per_s, limits.renew_burst, limits.rate_sources)
    # One lock around the registry and authority: SQLite/psycopg connections and
    # PKCS#11 sessions are not shared across threads concurrently.
    lock = threading.Lock()

    def locked(fn: Callable[..., Any], *args: Any, **kw: Any) -> Awaitable[Any]:
        def call() -> Any:
            with lock:
                return fn(*args, **kw)

        return run_in_threadpool(call)

    def issued(result: Issued) -> JSONResponse:
        payload = result.to_json()
        if result.revoked_previous is not None:
            payload["revoked_previous"] = event_json(result.revoked_previous)
            control.wake()
        log.info("issued credentials to %s (%s)", result.record.identity, result.record.attestation)
        return JSONResponse(payload)

    # -- endpoints ----------------------------------------------------------------------
    async def tpm_start(c: Call) -> Response:
        return JSONResponse(
            await locked(service.tpm_start, c.body.model_dump(), operator=c.operator))

    async def tpm_evidence(c: Call) -> Response:
        return JSONResponse(await locked(service.tpm_evidence, c.body.model_dump()))

    async def tpm_finish(c: Call) -> Response:
        return issued(await locked(service.tpm_finish, c.body.model_dump()))

    async def witnessed_start(c: Call) -> Response:
        return JSONResponse(
            await locked(service.witnessed_start, c.body.model_dump(), operator=c.operator))

    async def witnessed_finish(c: Call) -> Response:
        return issued(await locked(service.witnessed_finish, c.body.model_dump()))

    def _renew_challenge(request: dict[str, Any]) -> dict[str, Any]:
        if service.registry.count_pending() >= limits.max_pending:
            raise _Refused(503, "too many renewals are waiting for their answer; retry "
                                "in a minute", Reason.BACKEND_UNAVAILABLE,
                           {"Retry-After": "60"})
        result: dict[str, Any] = service.renew_challenge(request)
        return result

    async def renew_challenge(c: Call) -> Response:
        source = _source(c.request.client.host if c.request.client else "unknown")
        wait = renew_limiter.take(source)
        if wait > 0:
            raise _Refused(429, f"too many renewal challenges from {source}; retry in "
                                f"{wait:.0f} s", Reason.BACKEND_UNAVAILABLE,
                           {"Retry-After": str(max(1, round(wait)))})
        return JSONResponse(await locked(_renew_challenge, c.body.model_dump()))

    async def renew(c: Call) -> Response:
        return issued(await locked(service.renew, c.body.model_dump()))

    async def list_devices(c: Call) -> Response:
        records = await locked(service.registry.list, c.query.status)
        return JSONResponse({"devices": [record_json(r) for r in records]})

    async def show_device(c: Call) -> Response:
        serial = c.request.path_params["serial"]
        record = await locked(service.registry.get, serial)
        if record is None:
            return refusal(404, Reason.NOT_ENROLLED, f"device {serial} is not enrolled")
        return JSONResponse(record_json(record))

    async def revoke(c: Call) -> Response:
        reason = c.body.reason
        event = await locked(service.revoke, c.request.path_params["serial"], reason=reason,
                             operator=c.operator)
        log.info("revoked %s by %s: %s", event.identity, c.operator, reason)
        control.wake()
        return JSONResponse(event_json(event))

    async def revocations(c: Call) -> Response:
        """Events after ``since``; waits up to ``wait`` seconds (long poll) when there
        are none yet. Woken by a revocation in this process; looks again every second
        for one made by another instance sharing a PostgreSQL registry; ends at once
        when the service stops."""
        since, wait = c.query.since, min(c.query.wait, limits.long_poll_max_s)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        waiter = asyncio.Event()
        control.waiters.append(waiter)
        try:
            while True:
                waiter.clear()
                events = await locked(service.registry.revocations, since, 1000)
                left = deadline - loop.time()
                if events or left <= 0 or control.stopping:
                    return JSONResponse({"events": [event_json(e) for e in events]})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waiter.wait(), min(left, 1.0))
        finally:
            control.waiters.remove(waiter)

    async def bundle(c: Call) -> Response:
        return Response(service.authority.bundle_pem(), media_type="application/x-pem-file")

    async def crl(c: Call) -> Response:
        signed = await locked(service.crl)
        return Response(signed.public_bytes(Encoding.DER), media_type="application/pkix-crl")

    async def openapi(c: Call) -> Response:
        return JSONResponse(document)

    async def health(c: Call) -> Response:
        return JSONResponse({"status": "ok", "trust_domain": service.authority.trust_domain})

    serial = {"serial": serial_param()}
    ops = [
        Operation("POST", "/v1/enroll/tpm/start", "Start a TPM-attested enrollment",
                  tpm_start, body=schemas.TpmStart, answer=schemas.Nonce, operator=True),
        Operation("POST", "/v1/enroll/tpm/evidence",
                  "Send TPM evidence (EK certificate, EK/AK/key public areas, Certify over "
                  "the nonce)", tpm_evidence, body=schemas.TpmEvidenceRequest,
                  answer=schemas.Challenge, operator=True, one_use_id="enrollment_id"),
        Operation("POST", "/v1/enroll/tpm/finish",
                  "Answer the credential-activation challenge; records the device",
                  tpm_finish, body=schemas.TpmFinish, answer=schemas.Issued, operator=True,
                  one_use_id="enrollment_id"),
        Operation("POST", "/v1/enroll/witnessed/start",
                  "Start a factory-witnessed (PKCS#11) enrollment", witnessed_start,
                  body=schemas.WitnessedStart, answer=schemas.Nonce, operator=True),
        Operation("POST", "/v1/enroll/witnessed/finish",
                  "Prove possession of the token key; records the device", witnessed_finish,
                  body=schemas.WitnessedFinish, answer=schemas.Issued, operator=True,
                  one_use_id="enrollment_id"),
        Operation("POST", "/v1/renew/challenge", "Ask for a renewal nonce (anonymous; "
                  "rate-limited per source address)", renew_challenge,
                  body=schemas.RenewChallengeRequest, answer=schemas.RenewalNonce),
        Operation("POST", "/v1/renew",
                  "Renew the operational credential with a hardware signature over the "
                  "nonce", renew, body=schemas.RenewRequest, answer=schemas.Issued,
                  one_use_id="renewal_id"),
        Operation("GET", "/v1/devices", "List devices", list_devices,
                  query=schemas.DevicesQuery, answer=schemas.Devices, operator=True),
        Operation("GET", "/v1/devices/{serial}", "Show one device", show_device,
                  answer=schemas.Device, operator=True, path_params=serial),
        Operation("POST", "/v1/devices/{serial}/revoke", "Revoke a device", revoke,
                  body=schemas.RevokeRequest, answer=schemas.Revocation, operator=True,
                  path_params=serial),
        Operation("GET", "/v1/revocations",
                  "Revocation feed: events after ?since=<id>, long-polling up to ?wait=<s>",
                  revocations, query=schemas.RevocationsQuery, answer=schemas.Revocations),
        Operation("GET", "/v1/bundle", "Trust bundle (PEM)", bundle,
                  media="application/x-pem-file"),
        Operation("GET", "/v1/crl", "Signed revocation list (DER)", crl,
                  media="application/pkix-crl"),
        Operation("GET", "/openapi.json", "This document", openapi,
                  media="application/json"),
        Operation("GET", "/healthz", "Liveness", health, answer=schemas.Health),
    ]
    document = build_openapi(ops, title="Tessera provisioning API", version="1")

    async def one_use_id_spent(op: Operation, data: Any) -> None:
        """A step answered with a malformed request uses its id up, as a wrong answer
        does: one try per id, whatever the try looked like."""
        if op.one_use_id is None or not isinstance(data, dict):
            return
        token = data.get(op.one_use_id)
        if isinstance(token, str) and 8 <= len(token) <= 64:
            await locked(service.registry.take_pending, token, service.clock())

    def route(op: Operation) -> Route:
        async def endpoint(request: Request) -> Response:
            where = f"{request.method} {_printable(request.url.path)}"
            try:
                c = Call(request)
                if op.operator:
                    c.operator = operators.authenticate(request.headers.get("authorization"))
                for name in op.path_params:
                    value = request.path_params[name]
                    problem = _text_problem(value)
                    if problem is not None:
                        raise _Refused(400, problem.replace("request body", "path"))
                    if not isinstance(value, str) or not 1 <= len(value) <= 64 or not set(
                            value) <= _SERIAL_CHARS:
                        raise _Refused(422, f"{name} must be 1-64 characters of letters, "
                                            "digits, '.', '_' or '-'")
                if op.query is not None:
                    params = dict(request.query_params)
                    problem = _text_problem(params)
                    if problem is not None:
                        raise _Refused(400, problem.replace("request body", "query"))
                    try:
                        c.query = op.query.model_validate(params)
                    except pydantic.ValidationError as exc:
                        raise _Refused(422, _validation_detail(exc).replace(
                            "field", "query parameter", 1)) from None
                if op.body is not None:
                    data = _parse_json(await request.body())
                    if not isinstance(data, dict):
                        raise _Refused(400, "request body must be a JSON object")
                    problem = _text_problem(data)
                    if problem is not None:
                        raise _Refused(400, problem)
                    try:
                        c.body = op.body.model_validate(data)
                    except pydantic.ValidationError as exc:
                        await one_use_id_spent(op, data)
                        raise _Refused(422, _validation_detail(exc)) from None
                response: Response = await op.handler(c)
                return response
            except TesseraError as exc:
                return error_response(exc, where)
            except _Refused as exc:
                log.warning("refused %s: %s", where, exc.detail)
                return refusal(exc.status, exc.reason, exc.detail, headers=exc.headers)

        return Route(op.path, endpoint, methods=[op.method])

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        where = f"{request.method} {_printable(request.url.path)}"
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            detail = f"{request.method} is not allowed on {_printable(request.url.path)} " \
                     f"(allowed: {', '.join(sorted(headers.get('Allow', '?').split(', ')))})"
        elif exc.status_code == 404:
            detail = f"no such endpoint {_printable(request.url.path)} (see /openapi.json)"
        else:
            detail = str(exc.detail)
        log.warning("refused %s: %s", where, detail)
        return refusal(exc.status_code, Reason.MALFORMED, detail, headers=headers)

    async def server_error(request: Request, exc: Exception) -> Response:
        # logged with its traceback by _Guard, which sees it re-raised
        return refusal(500, Reason.BACKEND_FAILURE,
                       "internal error; the service logged it")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async def purge() -> None:
            while True:
                await asyncio.sleep(limits.purge_interval_s)
                try:
                    gone = await locked(service.registry.purge_pending, service.clock())
                except TesseraError as exc:  # registry down: say so, try again later
                    log.warning("purging expired pending steps failed: %s", exc.detail)
                    continue
                if gone:
                    log.info("purged %d expired pending steps", gone)

        task = asyncio.create_task(purge())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app = Starlette(
        routes=[route(op) for op in ops],
        exception_handlers={HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
    )
    app.router.redirect_slashes = False  # an API path is exact; no 307 to guess at
    app.state.control = control
    app.state.limits = limits
    app.state.operations = ops
    app.state.openapi = document
    return app


_SERIAL_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


class Guard:
    """ASGI middleware bounding each request's body and turning anything the app lets
    escape into a JSON 500 (see the module docstring). Wraps the Starlette app; the
    Starlette app stays reachable as ``.app`` (its state, its routes)."""

    def __init__(self, app: Starlette, limits: Limits) -> None:
        self.app = app
        self.limits = limits
        self.state = app.state
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        where = f"{scope.get('method')} {_printable(str(scope.get('path')))}"
        client = scope.get("client")
        source = client[0] if client else "unknown"
        if self.in_flight >= self.limits.limit_concurrency:
            log.warning("refused %s from %s: %d requests in flight", where, source,
                        self.in_flight)
            await refusal(503, Reason.BACKEND_UNAVAILABLE,
                          f"the service is answering {self.in_flight} requests; retry",
                          headers={"Retry-After": "1", "Connection": "close"}
                          )(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self._request(scope, receive, send, where, source)
        finally:
            self.in_flight -= 1

    async def _request(self, scope: Scope, receive: Receive, send: Send, where: str,
                       source: str) -> None:
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            body = await self._body(scope, receive)
        except _Refused as exc:
            log.warning("refused %s from %s: %s", where, source, exc.detail)
            # the rest of the body stays unread: the connection cannot carry another request
            response = refusal(exc.status, exc.reason, exc.detail,
                               headers={"Connection": "close", **(exc.headers or {})})
            await response(scope, receive, send)
            return
        except _ClientGone as gone:
            log.info("%s from %s: client went away after %d body bytes", where, source,
                     gone.received)
            return

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: only http.disconnect comes

        try:
            await self.app(scope, replay, tracked)
        except Exception:
            log.exception("internal error answering %s from %s", where, source)
            if not started:
                await refusal(500, Reason.BACKEND_FAILURE,
                              "internal error; the service logged it")(scope, receive, send)

    async def _body(self, scope: Scope, receive: Receive) -> bytes:
        limit = self.limits.max_body
        length = None
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                if not value.isdigit():  # ASCII digits only: no sign, space or 0x
                    raise _Refused(400, "Content-Length is not a number")
                length = int(value)
                if length > limit:
                    raise _Refused(413, f"request body of {length} bytes is over the "
                                        f"{limit}-byte limit")
        chunks: list[bytes] = []
        received = 0
        try:
            async with asyncio.timeout(self.limits.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise _ClientGone(received)
                    chunk = message.get("body", b"")
                    received += len(chunk)
                    if received > limit:
                        raise _Refused(413, f"request body is over the {limit}-byte limit")
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(chunks)
        except TimeoutError:
            raise _Refused(408, f"request body not received within "
                                f"{self.limits.body_timeout_s:g} s") from None


class _ClientGone(Exception):
    def __init__(self, received: int) -> None:
        super().__init__(received)
        self.received = received


def _source(host: str) -> str:
    """The rate limiter's key for a client address: the address, or its /64 for IPv6
    (one host commonly holds a whole /64, and would otherwise have 2**64 buckets)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def _printable(text: str, limit: int = 200) -> str:
    """``text`` for a log line or a detail: control and non-ASCII characters escaped
    (no forged log lines), cut at ``limit``."""
    escaped = json.dumps(text)[1:-1]
    return escaped if len(escaped) <= limit else escaped[:limit] + "..."


def _text_problem(data: object) -> str | None:
    """Why a parsed JSON body cannot be stored or logged as text, or None: a string or
    key holding NUL (PostgreSQL refuses it in text) or a lone surrogate (``"\\ud800"``
    parses, but is not UTF-8)."""
    stack = [data]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value)
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, str):
            if "\0" in value:
                return "request body holds a string with NUL (\\u0000)"
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    return "request body holds a string with a lone surrogate (\\ud800-\\udfff)"
    return None


if __name__ == "__main__":  # python -m provisioning.service > docs/openapi.json
    import sys

    sys.stdout.write(json.dumps(openapi_document(), indent=1, sort_keys=True) + "\n")
