"""Enrollment of a device over the factory network: the agent's enrollment endpoint
and the station's client for it.

The station (``tessera enroll --device URL``) holds the operator token and talks to
the provisioning service; the device only answers the TPM's two questions and finally
takes its credentials:

    GET  /v1/device        -> {"serial", "key_backend"}
    POST /v1/evidence      {"nonce"}            -> TpmEvidence JSON
    POST /v1/activate      {"challenge"}        -> {"secret"}
    POST /v1/credentials   <issued credentials> -> {"identity"}; the endpoint then closes

Every request carries ``Authorization: Bearer <pairing code>``; the agent makes the code
when it starts and shows it on its console (or writes it to a file), so only the station
the code was given to can drive the enrollment. The device checks that the credentials
it is given are for its own key and serial and chain to the bundle that came with them
before it keeps anything. The endpoint serves one enrollment and then stops.

Plain HTTP: the link is the factory's station network, the TPM evidence is not secret,
and activation only answers for challenges sealed to this TPM. What the pairing code
protects is the last step (who may hand this device its trust bundle); on a network
that others can sniff, put the endpoint behind TLS or use the local ``tessera-agent
enroll`` instead.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import secrets
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from device.attestation import ActivationChallenge, TpmEvidence
from device.provisioner import LocalTpm, ProvisionerClient, check_issued
from structauth.errors import (
    ConfigurationError,
    EnrollmentError,
    Reason,
    TesseraError,
)

log = logging.getLogger("tessera.agent.enrollment")

MAX_BODY = 64 * 1024


def new_pairing_code() -> str:
    # 8 groups of 4 base32-ish characters would be kinder to type; 20 random bytes in
    # URL-safe base64 are what a station pastes.
    return secrets.token_urlsafe(20)


class EnrollmentEndpoint:
    """Serves one enrollment of ``tpm`` (a LocalTpm) as device ``serial``;
    ``on_enrolled(issued)`` stores the credentials (it runs before the answer goes
    out, so the station learns of a failure to store them)."""

    def __init__(
        self,
        tpm: LocalTpm,
        serial: str,
        on_enrolled: Callable[[dict[str, Any]], None],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        code: str | None = None,
    ) -> None:
        self.tpm = tpm
        self.serial = serial
        self.code = code or new_pairing_code()
        self.on_enrolled = on_enrolled
        self.enrolled = threading.Event()
        self.issued: dict[str, Any] | None = None
        self._lock = threading.Lock()  # one TPM, one request at a time
        self._server = ThreadingHTTPServer((host, port), self._handler())
        self._server.daemon_threads = True

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        if isinstance(host, bytes):  # an AF_UNIX-style address: not what we bind
            host = host.decode()
        return f"http://{host}:{port}"

    def serve_until_enrolled(self, timeout: float | None = None) -> bool:
        thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        thread.start()
        try:
            return self.enrolled.wait(timeout)
        finally:
            self._server.shutdown()
            self._server.server_close()

    def start(self) -> EnrollmentEndpoint:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- requests -----------------------------------------------------------------
    def _answer(self, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        if self.enrolled.is_set():
            raise EnrollmentError("this device is already enrolled", Reason.ALREADY_ENROLLED)
        if method == "GET" and path == "/v1/device":
            return {"serial": self.serial, "key_backend": "tpm"}
        if method != "POST":
            raise _NotFound(path)
        if path == "/v1/evidence":
            nonce = _unb64(body.get("nonce"), "nonce")
            return self.tpm.evidence(nonce).to_json()
        if path == "/v1/activate":
            challenge = ActivationChallenge.from_json(body.get("challenge"))
            return {"secret": base64.b64encode(self.tpm.activate(challenge)).decode()}
        if path == "/v1/credentials":
            check_issued(body, self.tpm.public_key(), self.serial)
            self.on_enrolled(body)
            self.issued = body
            self.enrolled.set()
            log.info("enrolled as %s", body["identity"])
            return {"identity": body["identity"]}
        raise _NotFound(path)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                log.debug(format, *args)

            def _reply(self, status: int, data: dict[str, Any]) -> None:
                raw = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def _handle(self, method: str) -> None:
                given = self.headers.get("Authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {endpoint.code}".encode()):
                    self.close_connection = True  # the body is left unread
                    log.warning("refused %s %s from %s: wrong pairing code", method, self.path,
                                self.client_address[0])
                    return self._reply(401, _error(EnrollmentError(
                        "wrong or missing pairing code", Reason.NOT_AUTHORIZED)))
                try:
                    try:
                        length = int(self.headers.get("Content-Length") or 0)
                    except ValueError:
                        length = -1
                    if not 0 <= length <= MAX_BODY:
                        self.close_connection = True  # the body is left unread
                        raise EnrollmentError("request body too large or Content-Length not "
                                              "a number", Reason.MALFORMED)
                    raw = self.rfile.read(length) if length else b"{}"
                    try:
                        body = json.loads(raw)
                    except (ValueError, RecursionError):  # not JSON, or nested too deep
                        body = None
                    if not isinstance(body, dict):
                        raise EnrollmentError("request body must be a JSON object",
                                              Reason.MALFORMED)
                    with endpoint._lock:
                        answer = endpoint._answer(method, self.path, body)
                except _NotFound:
                    return self._reply(404, {"error": "not_found", "code": 404,
                                             "detail": f"no {method} {self.path} here"})
                except TesseraError as exc:
                    log.warning("refused %s %s: %s", method, self.path, exc)
                    return self._reply(400, _error(exc))
                self._reply(200, answer)

            def do_GET(self) -> None:
                self._handle("GET")

            def do_POST(self) -> None:
                self._handle("POST")

        return Handler


class _NotFound(Exception):
    pass


def _error(exc: TesseraError) -> dict[str, Any]:
    return {"error": exc.reason.name.lower(), "code": int(exc.reason), "detail": exc.detail}


def _unb64(value: Any, field: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (TypeError, ValueError):
        raise EnrollmentError(f"field {field!r} must be base64", Reason.MALFORMED) from None


class RemoteDevice:
    """The station's view of a device's enrollment endpoint (an ``Attester``)."""

    def __init__(self, url: str, code: str, *, timeout: float = 60.0) -> None:
        if not url.startswith("http://"):
            raise ConfigurationError(f"device endpoint URL {url!r} must start with http://")
        if not code:
            raise ConfigurationError(
                "the device's pairing code is missing: pass --device-code (the agent shows it)"
            )
        # the same JSON-over-HTTP client as for the provisioning service; the pairing
        # code goes where the operator token would
        self._http = ProvisionerClient(url, operator_token=code, timeout=timeout,
                                       peer="the device")
        self.url = self._http.url

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return self._http.call(method, path, body)

    def info(self) -> dict[str, Any]:
        data: dict[str, Any] = self._call("GET", "/v1/device")
        return data

    def evidence(self, nonce: bytes) -> TpmEvidence:
        return TpmEvidence.from_json(
            self._call("POST", "/v1/evidence", {"nonce": base64.b64encode(nonce).decode()})
        )

    def activate(self, challenge: ActivationChallenge) -> bytes:
        answer = self._call("POST", "/v1/activate", {"challenge": challenge.to_json()})
        return _unb64(answer.get("secret") if isinstance(answer, dict) else None, "secret")

    def deliver(self, issued: dict[str, Any]) -> None:
        self._call("POST", "/v1/credentials", issued)
