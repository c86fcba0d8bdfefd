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
#: a body over MAX_BODY but not over this is read and dropped before the refusal (a
#: larger one, or a Content-Length that is not a number, is left unread: the connection
#: closes, and the kernel may reset it before the client reads the answer)
DRAIN_MAX = 1024 * 1024


def new_pairing_code() -> str:
    # 160 random bits as 8 groups of base32: never starts with '-' (URL-safe base64 did
    # one time in 64, and argparse then took the code for an option), easy to read aloud.
    raw = base64.b32encode(secrets.token_bytes(20)).decode()
    return "-".join(raw[i:i + 4] for i in range(0, len(raw), 4))


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
        timeout: float = 30.0,
    ) -> None:
        self.tpm = tpm
        self.serial = serial
        self.code = code or new_pairing_code()
        self.on_enrolled = on_enrolled
        self.enrolled = threading.Event()
        self.issued: dict[str, Any] | None = None
        self._lock = threading.Lock()  # one TPM, one request at a time
        self.timeout = timeout  # a client silent this long mid-request is dropped
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
            # socket timeout: a request line, header or body that stops arriving ends
            # the connection (http.server catches the timeout and closes quietly)
            timeout = endpoint.timeout

            def log_message(self, format: str, *args: Any) -> None:
                log.debug(format, *args)

            def _reply(self, status: int, data: dict[str, Any]) -> None:
                if status != 200:
                    self.close_connection = True  # one refusal per connection
                raw = json.dumps(data).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(raw)))
                    if self.close_connection:
                        self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(raw)
                except OSError as exc:  # the client left before its answer: one line
                    self.close_connection = True
                    log.info("client %s left before its answer: %s", self.client_address[0],
                             exc.strerror or type(exc).__name__)

            def send_error(self, code: int, message: str | None = None,
                           explain: str | None = None) -> None:
                """http.server's own refusals (a request line or header it cannot
                parse, too long, an unknown method) as the endpoint's JSON, not HTML."""
                self.close_connection = True
                self._reply(code, {"error": Reason.MALFORMED.name.lower(),
                                   "code": int(Reason.MALFORMED),
                                   "detail": message or explain or "bad request"})

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
                        self.close_connection = True
                        if MAX_BODY < length <= DRAIN_MAX:
                            # read and drop it: closing on an unread body resets the
                            # connection, and the client may never see why
                            left = length
                            while left > 0 and (chunk := self.rfile.read(min(left, 65536))):
                                left -= len(chunk)
                        raise EnrollmentError("request body too large or Content-Length not "
                                              "a number", Reason.MALFORMED)
                    raw = self.rfile.read(length) if length else b"{}"
                    if len(raw) < length:
                        raise EnrollmentError("request body shorter than its Content-Length",
                                              Reason.MALFORMED)
                    body = None
                    if not _too_deep(raw):
                        try:
                            body = json.loads(raw)
                        except (ValueError, RecursionError):  # not JSON (or a backstop)
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
                except Exception as exc:  # a fault of ours: a JSON 500, one log line
                    log.error("failed %s %s: %s: %s", method, self.path,
                              type(exc).__name__, exc)
                    return self._reply(500, {"error": Reason.INVALID_STATE.name.lower(),
                                             "code": int(Reason.INVALID_STATE),
                                             "detail": "the device failed to answer; see "
                                                       "its log"})
                self._reply(200, answer)

            def do_GET(self) -> None:
                self._handle("GET")

            def do_POST(self) -> None:
                self._handle("POST")

            def _not_allowed(self) -> None:
                log.warning("refused %s %s from %s: method not allowed", self.command,
                            self.path, self.client_address[0])
                self.close_connection = True  # any body is left unread
                self._reply(405, {"error": Reason.MALFORMED.name.lower(),
                                  "code": int(Reason.MALFORMED),
                                  "detail": f"{self.command} is not allowed here "
                                            "(GET or POST)"})

            do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _not_allowed
            do_TRACE = do_CONNECT = _not_allowed

        return Handler


class _NotFound(Exception):
    pass


#: deepest JSON nesting a request may have (the deepest genuine one has 2 levels)
MAX_DEPTH = 32


def _too_deep(raw: bytes, limit: int = MAX_DEPTH) -> bool:
    """Does JSON text nest brackets deeper than ``limit``? Counted outside strings, so
    json.loads is never asked to recurse that far."""
    depth = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return True
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return False


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
