"""The provisioning service's HTTP API (Starlette on uvicorn).

Operator endpoints need ``Authorization: Bearer <operator token>``; device endpoints
(renewal) need the device's proof of possession; the trust bundle, CRL and revocation
feed are public, as a CRL is. Every refusal answers with one JSON object
``{"error": <reason>, "code": <number>, "detail": <text>}`` and is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from provisioning.enrollment import EnrollmentService, Issued, b64, check_serial
from provisioning.openapi import OPENAPI
from provisioning.operators import Operators
from provisioning.registry import DeviceRecord, RevocationEvent
from structauth.errors import Reason, TesseraError

log = logging.getLogger("tessera.provisioning")

MAX_BODY = 64 * 1024

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


def error_response(exc: TesseraError, where: str) -> JSONResponse:
    status = _STATUS.get(exc.reason, 400)
    log.warning("refused %s: %s (%s)", where, exc.detail, exc.reason.name.lower())
    return JSONResponse(
        {"error": exc.reason.name.lower(), "code": int(exc.reason), "detail": exc.detail},
        status_code=status,
    )


def build_app(service: EnrollmentService, operators: Operators) -> Starlette:
    # One lock around the registry and authority: SQLite/psycopg connections and
    # PKCS#11 sessions are not shared across threads concurrently.
    lock = threading.Lock()

    def locked(fn: Callable[..., Any], *args: Any, **kw: Any) -> Awaitable[Any]:
        def call() -> Any:
            with lock:
                return fn(*args, **kw)

        return run_in_threadpool(call)

    async def body(request: Request) -> dict[str, Any]:
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise _BadRequest("request body too large")
        try:
            data = json.loads(raw or b"{}")
        except ValueError:
            raise _BadRequest("request body is not JSON") from None
        except RecursionError:
            raise _BadRequest("request body is nested too deep") from None
        if not isinstance(data, dict):
            raise _BadRequest("request body must be a JSON object")
        problem = _text_problem(data)
        if problem is not None:
            raise _BadRequest(problem)
        return data

    def operator(request: Request) -> str:
        return operators.authenticate(request.headers.get("authorization"))

    def endpoint(
        fn: Callable[[Request], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def wrapped(request: Request) -> Response:
            where = f"{request.method} {request.url.path}"
            try:
                return await fn(request)
            except TesseraError as exc:
                return error_response(exc, where)
            except _BadRequest as exc:
                log.warning("refused %s: %s", where, exc)
                return JSONResponse(
                    {"error": "malformed", "code": int(Reason.MALFORMED), "detail": str(exc)},
                    status_code=400,
                )

        return wrapped

    # Long-poll waiters sleep on this until a revocation in this process wakes them;
    # they also look again every second, for revocations made by another service
    # instance sharing a PostgreSQL registry.
    revoked_here: list[asyncio.Event] = []

    def wake_feed() -> None:
        for waiter in revoked_here:
            waiter.set()

    def issued(result: Issued) -> JSONResponse:
        payload = result.to_json()
        if result.revoked_previous is not None:
            payload["revoked_previous"] = event_json(result.revoked_previous)
            wake_feed()
        log.info("issued credentials to %s (%s)", result.record.identity, result.record.attestation)
        return JSONResponse(payload)

    @endpoint
    async def tpm_start(request: Request) -> Response:
        who = operator(request)
        return JSONResponse(await locked(service.tpm_start, await body(request), operator=who))

    @endpoint
    async def tpm_evidence(request: Request) -> Response:
        operator(request)
        return JSONResponse(await locked(service.tpm_evidence, await body(request)))

    @endpoint
    async def tpm_finish(request: Request) -> Response:
        operator(request)
        return issued(await locked(service.tpm_finish, await body(request)))

    @endpoint
    async def witnessed_start(request: Request) -> Response:
        who = operator(request)
        return JSONResponse(
            await locked(service.witnessed_start, await body(request), operator=who)
        )

    @endpoint
    async def witnessed_finish(request: Request) -> Response:
        operator(request)
        return issued(await locked(service.witnessed_finish, await body(request)))

    @endpoint
    async def renew_challenge(request: Request) -> Response:
        return JSONResponse(await locked(service.renew_challenge, await body(request)))

    @endpoint
    async def renew(request: Request) -> Response:
        return issued(await locked(service.renew, await body(request)))

    @endpoint
    async def list_devices(request: Request) -> Response:
        operator(request)
        status = request.query_params.get("status")
        if status not in (None, "active", "revoked"):
            raise _BadRequest("status must be active or revoked")
        records = await locked(service.registry.list, status)
        return JSONResponse({"devices": [record_json(r) for r in records]})

    @endpoint
    async def show_device(request: Request) -> Response:
        operator(request)
        serial = check_serial(request.path_params["serial"])
        record = await locked(service.registry.get, serial)
        if record is None:
            return JSONResponse(
                {
                    "error": "not_enrolled",
                    "code": int(Reason.NOT_ENROLLED),
                    "detail": f"device {serial} is not enrolled",
                },
                status_code=404,
            )
        return JSONResponse(record_json(record))

    @endpoint
    async def revoke(request: Request) -> Response:
        who = operator(request)
        data = await body(request)
        reason = data.get("reason", "unspecified")
        if not isinstance(reason, str) or len(reason) > 200:
            raise _BadRequest("reason must be a string of at most 200 characters")
        event = await locked(
            service.revoke, request.path_params["serial"], reason=reason, operator=who
        )
        log.info("revoked %s by %s: %s", event.identity, who, reason)
        wake_feed()
        return JSONResponse(event_json(event))

    @endpoint
    async def revocations(request: Request) -> Response:
        """The feed brokers follow: events after ``since``; waits up to ``wait``
        seconds (long poll) when there are none yet."""
        try:
            since = int(request.query_params.get("since", "0"))
            wait = min(float(request.query_params.get("wait", "0")), 60.0)
        except ValueError:
            raise _BadRequest("since must be an integer and wait a number") from None
        if not -(2**63) <= since < 2**63 or math.isnan(wait):
            raise _BadRequest("since must be a 64-bit integer and wait a number")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(wait, 0.0)
        waiter = asyncio.Event()
        revoked_here.append(waiter)
        try:
            while True:
                waiter.clear()
                events = await locked(service.registry.revocations, since, 1000)
                left = deadline - loop.time()
                if events or left <= 0:
                    return JSONResponse({"events": [event_json(e) for e in events]})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waiter.wait(), min(left, 1.0))
        finally:
            revoked_here.remove(waiter)

    @endpoint
    async def bundle(request: Request) -> Response:
        return Response(service.authority.bundle_pem(), media_type="application/x-pem-file")

    @endpoint
    async def crl(request: Request) -> Response:
        signed = await locked(service.crl)
        return Response(signed.public_bytes(Encoding.DER), media_type="application/pkix-crl")

    async def openapi(request: Request) -> Response:
        return JSONResponse(OPENAPI)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "trust_domain": service.authority.trust_domain})

    routes = [
        Route("/v1/enroll/tpm/start", tpm_start, methods=["POST"]),
        Route("/v1/enroll/tpm/evidence", tpm_evidence, methods=["POST"]),
        Route("/v1/enroll/tpm/finish", tpm_finish, methods=["POST"]),
        Route("/v1/enroll/witnessed/start", witnessed_start, methods=["POST"]),
        Route("/v1/enroll/witnessed/finish", witnessed_finish, methods=["POST"]),
        Route("/v1/renew/challenge", renew_challenge, methods=["POST"]),
        Route("/v1/renew", renew, methods=["POST"]),
        Route("/v1/devices", list_devices, methods=["GET"]),
        Route("/v1/devices/{serial}", show_device, methods=["GET"]),
        Route("/v1/devices/{serial}/revoke", revoke, methods=["POST"]),
        Route("/v1/revocations", revocations, methods=["GET"]),
        Route("/v1/bundle", bundle, methods=["GET"]),
        Route("/v1/crl", crl, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/healthz", health, methods=["GET"]),
    ]
    return Starlette(routes=routes)


class _BadRequest(Exception):
    pass


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
