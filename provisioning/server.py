"""Runs the provisioning service on uvicorn with its limits (``service.Limits``).

What uvicorn gives: the keep-alive timeout, the largest request head
(``h11_max_incomplete_event_size``), a graceful-shutdown deadline, a concurrency cap.
What it lacks, added here in a subclass of its h11 protocol: a deadline for a request's
headers (uvicorn has none: a client sending one header byte a minute is held forever,
and any byte cancels the keep-alive timer), a hard cap on open connections (its
``limit_concurrency`` answers 503 in plain text but keeps the connection), and JSON for
the 400 it sends for a request it cannot parse. The body's size and deadline are
``service.Guard``'s.

``run_service`` binds the socket before it announces anything, and on SIGTERM or
SIGINT ends the revocation feed's long polls at once (``service.Control.stop``), so the
process is gone well within a second with clients attached.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable, Generator
from types import FrameType
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from provisioning.service import Control, Limits
from structauth.errors import ConfigurationError, Reason

log = logging.getLogger("tessera.provisioning")


def _json_error(status: int, phrase: str, detail: str) -> bytes:
    """A complete HTTP/1.1 error answer with the service's JSON body; the connection
    closes after it."""
    body = json.dumps({"error": Reason.MALFORMED.name.lower(), "code": int(Reason.MALFORMED),
                       "detail": detail}).encode()
    return (f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


def bounded_protocol(limits: Limits) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a header deadline and a connection cap."""

    refused_at = [0.0]  # when a connection over the cap was last logged (once a second)

    class BoundedH11(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        _seen_cycle: Any = None
        _partial = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                now = time.monotonic()
                if now - refused_at[0] >= 1.0:
                    refused_at[0] = now
                    log.warning("refused a connection from %s: %d connections open (limit %d)",
                                self.client[0] if self.client else "?", len(self.connections),
                                limits.max_connections)
                transport.abort()
                return
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._partial = False
            self._header_timer = self.loop.call_later(limits.header_timeout_s,
                                                      self._header_timeout)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def data_received(self, data: bytes) -> None:
            self._partial = True
            super().data_received(data)

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and self.cycle is not self._seen_cycle:
                self._seen_cycle = self.cycle  # a request's headers are in: no deadline
                self._disarm()

        def on_response_complete(self) -> None:
            # waiting for the next request's headers from now (the parent may take a
            # pipelined request at once, which disarms again)
            self._arm()
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _header_timeout(self) -> None:
            self._header_timer = None
            if self.transport.is_closing():
                return
            if self.cycle is not None and not self.cycle.response_complete:
                return  # a request is being answered (its body has Guard's deadline)
            if self._partial and self.conn.our_state is h11.IDLE:
                self.transport.write(_json_error(
                    408, "Request Timeout",
                    f"request headers not received within {limits.header_timeout_s:g} s"))
            log.info("closed a connection from %s: no complete request within %g s",
                     self.client[0] if self.client else "?", limits.header_timeout_s)
            self.transport.close()

        def send_400_response(self, msg: str) -> None:
            self.transport.write(_json_error(
                400, "Bad Request",
                "request head is not valid HTTP/1.1 (a malformed line or header, e.g. a "
                f"Content-Length that is not a number) or is over {limits.max_header_bytes} "
                "bytes"))
            self.transport.close()

    return BoundedH11


class _Server(uvicorn.Server):
    """uvicorn's server, ending the long polls when told to stop, and leaving the
    signal it stopped on handled (uvicorn re-raises it after a graceful exit, which
    would make a clean stop look like a kill)."""

    def __init__(self, config: uvicorn.Config, control: Control | None) -> None:
        super().__init__(config)
        self.control = control
        self.stopped_by: int | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.stopped_by = sig
        super().handle_exit(sig, frame)
        if self.control is not None:
            control = self.control
            with contextlib.suppress(RuntimeError):  # no loop yet: nothing to end
                asyncio.get_running_loop().call_soon_threadsafe(control.stop)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _listen(host: str, port: int, backlog: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ConfigurationError(f"cannot listen on {host}:{port}: {exc.strerror}; "
                                 "check --host") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise ConfigurationError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port "
            "or stop what holds it") from None
    sock.set_inheritable(True)
    return sock


def run_service(
    app: Any,
    *,
    host: str,
    port: int,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
    limits: Limits | None = None,
    on_ready: Callable[[str], None] | None = None,
    log_level: str = "warning",
) -> int:
    """Serve ``app`` (``service.build_app``) until SIGTERM or SIGINT; 0 then.

    The TLS files are loaded and the socket bound first; a failure there raises
    ConfigurationError (one line) before anything is announced. Then ``on_ready(url)``
    is called (the URL has the bound port, which matters for ``port=0``)."""
    state = getattr(app, "state", None)
    limits = limits or getattr(state, "limits", None) or Limits()
    control = getattr(state, "control", None)
    backlog = 1024
    config = uvicorn.Config(
        app,
        http=bounded_protocol(limits),
        lifespan="on",
        log_level=log_level,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
        timeout_keep_alive=max(1, round(limits.keep_alive_s)),
        h11_max_incomplete_event_size=limits.max_header_bytes,
        # a backstop only: the connection cap above keeps connections under
        # max_connections, and Guard answers requests over limit_concurrency with JSON
        limit_concurrency=limits.max_connections + limits.limit_concurrency,
        timeout_graceful_shutdown=limits.graceful_shutdown_s,  # type: ignore[arg-type]
        backlog=backlog,
        server_header=False,
        # the client address is the TCP peer's: with proxy headers on (uvicorn's default
        # trusts them from 127.0.0.1) a local client could name any address and escape
        # the renewal challenge's per-address limit
        proxy_headers=False,
    )
    try:
        config.load()
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(
            f"cannot load the TLS certificate {ssl_certfile} / key {ssl_keyfile}: "
            f"{getattr(exc, 'strerror', None) or exc}; check --tls-cert and --tls-key"
        ) from None
    sock = _listen(host, port, backlog)
    bound = sock.getsockname()
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    url = f"{'https' if ssl_certfile else 'http'}://{shown}:{bound[1]}"
    if on_ready is not None:
        on_ready(url)
    server = _Server(config, control)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0
