"""What a client can make the provisioning service (and a device's enrollment endpoint)
hold, and how each refusal looks: the real app on the real runner (uvicorn, in a child
process on 127.0.0.1, tests.service_host) with small limits, raw sockets for what an
HTTP client library would not send. Each refusal is checked for its status, its JSON
reason and that nothing else changed (the registry's devices, pending steps and
revocations, the service still answering)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import os
import socket
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization

from device.enrollment_endpoint import EnrollmentEndpoint
from device.provisioner import pop_signature
from hw.software import InsecureSoftwareSigner
from provisioning.registry import open_registry
from provisioning.server import run_service
from provisioning.service import Limits
from structauth.errors import ConfigurationError
from structauth.possession import LABEL_ENROLL
from tests.service_host import Child, Served, child, make_service
from tests.support import wait_for

SMALL = Limits(max_body=4096, body_timeout_s=0.5, header_timeout_s=0.5, keep_alive_s=1,
               max_connections=20, limit_concurrency=50, renew_per_s=0.001, renew_burst=3,
               max_pending=1000, purge_interval_s=0.1, long_poll_max_s=30)


def snapshot(directory: Path) -> dict[str, Any]:
    with open_registry(str(directory / "registry.db")) as registry:
        return {"devices": [(r.serial, r.status) for r in registry.list()],
                "pending": registry.count_pending(),
                "revocations": len(registry.revocations())}


def exchange(port: int, data: bytes, *, timeout: float = 10.0, close_write: bool = False
             ) -> tuple[int, dict[str, str], dict[str, Any]]:
    """Send raw bytes, read one answer to the end of its body (or of the connection):
    (status, headers, JSON body). A missing or non-JSON answer fails the test."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(data)
        if close_write:
            conn.shutdown(socket.SHUT_WR)
        return read_answer(conn)


def read_answer(conn: socket.socket) -> tuple[int, dict[str, str], dict[str, Any]]:
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = conn.recv(65536)
        assert chunk, f"connection closed without an answer: {received[:200]!r}"
        received += chunk
    head, _, rest = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
    length = int(headers["content-length"])
    while len(rest) < length:
        chunk = conn.recv(65536)
        assert chunk, "connection closed mid-answer"
        rest += chunk
    assert headers["content-type"].startswith("application/json"), headers
    return int(lines[0].split()[1]), headers, json.loads(rest[:length])


def closed_by_peer(conn: socket.socket) -> bool:
    """Has the other side closed (EOF or reset)? Waits up to the socket's timeout."""
    try:
        while chunk := conn.recv(65536):
            del chunk
        return True
    except ConnectionResetError:
        return True


def refused(data: dict[str, Any], error: str = "malformed") -> str:
    assert set(data) == {"error", "code", "detail"}, data
    assert data["error"] == error, data
    return str(data["detail"])


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Child]:
    with child(tmp_path / "svc", SMALL) as c:
        yield c


def healthy(c: Child) -> bool:
    with urllib.request.urlopen(c.url + "/healthz", timeout=5) as resp:
        return bool(json.loads(resp.read())["status"] == "ok")


# -- bodies -----------------------------------------------------------------------------
def test_body_over_limit_refused_from_its_content_length(served: Child, tmp_path: Path) -> None:
    """A 100 MiB Content-Length is refused before a byte of the body is read."""
    before = snapshot(tmp_path / "svc")
    status, headers, data = exchange(served.port, (
        b"POST /v1/renew/challenge HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 104857600\r\n\r\n"))
    assert status == 413 and headers.get("connection") == "close"
    assert "104857600 bytes is over the 4096-byte limit" in refused(data)
    assert snapshot(tmp_path / "svc") == before and healthy(served)


def test_body_over_limit_refused_while_streaming(served: Child, tmp_path: Path) -> None:
    """A chunked body (no Content-Length) that never ends is refused once it passes the
    limit, not read to its end."""
    before = snapshot(tmp_path / "svc")
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as conn:
        conn.sendall(b"POST /v1/renew/challenge HTTP/1.1\r\nHost: x\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        try:
            for _ in range(64):  # 64 KiB, sixteen times the limit, never the last chunk
                conn.sendall(b"400\r\n" + b"x" * 1024 + b"\r\n")
        except OSError:
            pass  # refused and closed while we were still sending
        status, _, data = read_answer(conn)
    assert status == 413 and "over the 4096-byte limit" in refused(data)
    assert snapshot(tmp_path / "svc") == before and healthy(served)


@pytest.mark.parametrize("length", [b"abc", b"-1", b"0x10", b"+2"])
def test_content_length_not_a_number(served: Child, length: bytes) -> None:
    status, _, data = exchange(served.port, b"POST /v1/renew HTTP/1.1\r\nHost: x\r\n"
                               b"Content-Length: " + length + b"\r\n\r\n{}")
    assert status == 400
    assert "Content-Length" in refused(data)
    assert healthy(served)


def test_slow_body_times_out(served: Child, tmp_path: Path) -> None:
    """Headers promise 100 bytes, 10 come: 408 after the body deadline, not a held task."""
    before = snapshot(tmp_path / "svc")
    status, headers, data = exchange(served.port, (
        b"POST /v1/renew HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789"))
    assert status == 408 and headers.get("connection") == "close"
    assert refused(data) == "request body not received within 0.5 s"
    assert snapshot(tmp_path / "svc") == before and healthy(served)


def test_client_gone_mid_body_is_one_line(served: Child) -> None:
    with socket.create_connection(("127.0.0.1", served.port), timeout=5) as conn:
        conn.sendall(b"POST /v1/renew HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123")
    wait_for(lambda: "client went away" in served.log.read_text(), 10,
             "the service to log the client that went away")
    assert healthy(served)
    log = served.log.read_text()
    assert log.count("client went away after 4 body bytes") == 1, log
    assert "Traceback" not in log and "Exception" not in log, log


# -- headers, connections ----------------------------------------------------------------
def test_slow_headers_time_out(served: Child) -> None:
    """Half a request head, then silence: a 408 JSON and a closed connection after the
    header deadline; a connection that sends nothing is closed too."""
    status, headers, data = exchange(served.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    assert status == 408 and headers.get("connection") == "close"
    assert refused(data) == "request headers not received within 0.5 s"
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as silent:
        assert closed_by_peer(silent)
    assert healthy(served)


def test_oversized_head_is_json(served: Child) -> None:
    """A request head still incomplete past the limit (16 KiB) is refused as it grows."""
    status, _, data = exchange(served.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: "
                               + b"a" * 40_000)
    assert status == 400 and "or is over 16384 bytes" in refused(data)


def test_connections_over_the_cap_are_closed(tmp_path: Path) -> None:
    limits = Limits(max_connections=20, header_timeout_s=60, keep_alive_s=60)
    with child(tmp_path / "svc", limits) as c:
        idle = [socket.create_connection(("127.0.0.1", c.port), timeout=10) for _ in range(20)]
        try:
            wait_for(lambda: healthy_or_refused(c) == "refused", 10,
                     "a connection over the cap to be closed")
            log = c.log.read_text()
            assert "connections open (limit 20)" in log
        finally:
            for conn in idle:
                conn.close()
        wait_for(lambda: healthy_or_refused(c) == "ok", 10, "the service to answer again")


def healthy_or_refused(c: Child) -> str:
    try:
        return "ok" if healthy(c) else "?"
    except (ConnectionError, OSError):
        return "refused"


# -- long polls, concurrency, shutdown -----------------------------------------------------
def test_requests_over_the_concurrency_limit_and_shutdown_with_clients(tmp_path: Path) -> None:
    """Two long polls hold the service's two request slots: a third request is a JSON
    503. SIGTERM then ends the polls at once (answered, empty) and the process exits 0
    with them, a slow client and an idle connection attached."""
    limits = Limits(limit_concurrency=2, long_poll_max_s=30, header_timeout_s=60)
    with child(tmp_path / "svc", limits) as c:
        answers: list[tuple[float, Any]] = []

        def poll() -> None:
            t0 = time.monotonic()
            with urllib.request.urlopen(c.url + "/v1/revocations?wait=30", timeout=40) as r:
                answers.append((time.monotonic() - t0, json.loads(r.read())))

        polls = [threading.Thread(target=poll) for _ in range(2)]
        for thread in polls:
            thread.start()

        def third() -> int:
            try:
                with urllib.request.urlopen(c.url + "/healthz", timeout=5) as resp:
                    return int(resp.status)
            except urllib.error.HTTPError as exc:
                data = json.loads(exc.read())
                assert refused(data, "backend_unavailable").startswith("the service is answering")
                return int(exc.code)

        wait_for(lambda: third() == 503, 10, "the third request to be refused")
        slow = socket.create_connection(("127.0.0.1", c.port), timeout=10)
        slow.sendall(b"GET /healthz HTTP/1.1\r\n")
        idle = socket.create_connection(("127.0.0.1", c.port), timeout=10)
        t0 = time.monotonic()
        assert c.stop(timeout=10) == 0
        stopped = time.monotonic() - t0
        for thread in polls:
            thread.join(timeout=10)
        slow.close()
        idle.close()
    assert [data for _, data in answers] == [{"events": []}, {"events": []}]
    # answered at the SIGTERM, not at the 30 s deadline (a loose bound: the figure is
    # the benchmark's, bench service_limits)
    assert all(took < 20 for took, _ in answers) and stopped < 10, (answers, stopped)


# -- the anonymous renewal challenge -------------------------------------------------------
def _enroll(served: Served, serial: str) -> None:
    signer = InsecureSoftwareSigner.generate()
    spki = signer.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    start = served.service.witnessed_start(
        {"serial": serial, "public_key": base64.b64encode(spki).decode(),
         "key_backend": "insecure-software"}, operator="bounds")
    signature = pop_signature(signer, LABEL_ENROLL, base64.b64decode(start["nonce"]), serial)
    served.service.witnessed_finish({"enrollment_id": start["enrollment_id"],
                                     "signature": base64.b64encode(signature).decode()})


def _challenge(c: Child, serial: str, **headers: str) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(c.url + "/v1/renew/challenge", method="POST",
                                 data=json.dumps({"serial": serial}).encode(),
                                 headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return int(resp.status), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), {**json.loads(exc.read()), "retry_after": exc.headers.get(
            "Retry-After")}


def test_renew_challenge_rate_limited_per_source(tmp_path: Path) -> None:
    """Three challenges (the burst) from one address, then 429 with Retry-After; the
    refused ones write nothing."""
    directory = tmp_path / "svc"
    here = make_service(directory)
    _enroll(here, "rate-1")
    with child(directory, Limits(renew_burst=3, renew_per_s=0.001)) as c:
        answers = [_challenge(c, "rate-1") for _ in range(3)]
        assert [status for status, _ in answers] == [200, 200, 200]
        before = snapshot(directory)
        for _ in range(5):
            status, data = _challenge(c, "rate-1")
            assert status == 429 and data.pop("retry_after")
            assert refused(data, "backend_unavailable").startswith(
                "too many renewal challenges from 127.0.0.1")
        # the source is the TCP peer: a forwarded-for header names no other bucket
        status, data = _challenge(c, "rate-1", **{"X-Forwarded-For": "10.9.9.9",
                                                  "Forwarded": "for=10.9.9.9"})
        assert status == 429 and "from 127.0.0.1" in data["detail"]
        assert snapshot(directory) == before and before["pending"] == 3


def test_rate_limit_source_keys() -> None:
    """IPv6 clients are limited per /64 (a host holds a whole /64); IPv4-mapped
    addresses are their IPv4 address."""
    from provisioning.service import RateLimiter, _source

    assert _source("2001:db8::1") == _source("2001:db8::ffff:2") == "2001:db8::/64"
    assert _source("2001:db8:0:1::1") != _source("2001:db8::1")
    assert _source("::ffff:192.0.2.7") == _source("192.0.2.7") == "192.0.2.7"
    now = [0.0]
    limiter = RateLimiter(per_s=1.0, burst=2, sources=2, clock=lambda: now[0])
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 1.0]
    now[0] += 1.0
    assert limiter.take("a") == 0.0 and limiter.take("a") == 1.0
    limiter.take("b"), limiter.take("c")  # "a" is forgotten: the table holds two
    assert "a" not in limiter._buckets and len(limiter._buckets) == 2


def test_renew_challenge_refused_at_the_pending_cap(tmp_path: Path) -> None:
    directory = tmp_path / "svc"
    here = make_service(directory)
    _enroll(here, "cap-1")
    with child(directory, Limits(max_pending=2, renew_burst=10)) as c:
        assert [_challenge(c, "cap-1")[0] for _ in range(2)] == [200, 200]
        before = snapshot(directory)
        status, data = _challenge(c, "cap-1")
        assert status == 503 and data.pop("retry_after") == "60"
        assert "too many renewals are waiting" in refused(data, "backend_unavailable")
        assert snapshot(directory) == before and before["pending"] == 2


def test_expired_pending_steps_purged_on_a_timer(served: Child, tmp_path: Path) -> None:
    """Abandoned steps go without anyone taking one; live ones stay."""
    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    future = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)
    with open_registry(str(tmp_path / "svc" / "registry.db")) as registry:
        for i in range(3):
            registry.put_pending(f"expired-{i:04d}", b"{}", past)
        registry.put_pending("live-000001", b"{}", future)
        wait_for(lambda: registry.count_pending() == 1, 10, "the expired rows to be purged")
        assert registry.take_pending("live-000001", dt.datetime.now(dt.UTC)) == b"{}"


# -- the runner and the error handler, in process ------------------------------------------
def test_refuses_to_announce_a_port_it_cannot_bind(tmp_path: Path) -> None:
    served = make_service(tmp_path / "svc")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        announced: list[str] = []
        with pytest.raises(ConfigurationError) as exc:
            run_service(served.app, host="127.0.0.1", port=taken.getsockname()[1],
                        on_ready=announced.append)
    assert announced == [] and "cannot listen on 127.0.0.1:" in exc.value.detail
    assert "\n" not in exc.value.detail
    with pytest.raises(ConfigurationError) as exc:
        run_service(served.app, host="127.0.0.1", port=0, ssl_certfile=str(tmp_path / "no.pem"),
                    ssl_keyfile=str(tmp_path / "no.key"), on_ready=announced.append)
    assert announced == [] and "cannot load the TLS certificate" in exc.value.detail


def test_unknown_path_wrong_method_and_internal_error_are_json(tmp_path: Path,
                                                             caplog: Any) -> None:
    served = make_service(tmp_path / "svc")

    def broken() -> Any:
        # a mock, for a fault that cannot be produced for real: a bug raising out of
        # an endpoint
        raise RuntimeError("a bug")

    served.service.crl = broken  # type: ignore[method-assign]
    asyncio.run(_probe(served))
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert [r.getMessage() for r in errors] == ["internal error answering GET /v1/crl from "
                                                "127.0.0.1"]


async def _probe(served: Served) -> None:
    transport = httpx.ASGITransport(app=served.app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
        resp = await client.get("/nowhere")
        assert resp.status_code == 404 and "no such endpoint /nowhere" in refused(resp.json())
        resp = await client.delete("/v1/devices")
        assert resp.status_code == 405
        assert set(resp.headers["allow"].split(", ")) == {"GET", "HEAD"}
        refused(resp.json())
        resp = await client.get("/v1/crl")
        assert resp.status_code == 500
        assert refused(resp.json(), "backend_failure") == "internal error; the service logged it"
        resp = await client.get("/healthz")
        assert resp.status_code == 200


def test_schema_refusals_change_nothing(tmp_path: Path) -> None:
    """``"reenroll": "false"`` (it re-enrolled, revoking the device, before the schema
    layer), ``?wait=nan``, ``?since`` past 64 bits and 60 KB of nesting on the anonymous
    endpoints: each a 4xx JSON refusal naming the problem, the registry untouched."""
    served = make_service(tmp_path / "svc")
    _enroll(served, "schema-1")
    before = snapshot(tmp_path / "svc")
    asyncio.run(_schema_probe(served))
    assert snapshot(tmp_path / "svc") == before
    assert before["devices"] == [("schema-1", "active")] and before["revocations"] == 0


async def _schema_probe(served: Served) -> None:
    transport = httpx.ASGITransport(app=served.app, raise_app_exceptions=False)
    auth = {"Authorization": f"Bearer {served.token}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
        for value in ("false", "true", 0, 1, None, "no"):
            resp = await client.post("/v1/enroll/tpm/start", headers=auth,
                                     json={"serial": "schema-1", "reenroll": value})
            assert resp.status_code == 422, (value, resp.text)
            assert refused(resp.json()) == "field 'reenroll' must be true or false"
        resp = await client.post("/v1/enroll/tpm/start", headers=auth,
                                 json={"serial": "schema-1", "reenrol": True})
        assert resp.status_code == 422
        assert refused(resp.json()) == ("field 'reenrol' is not a field of this request "
                                        "(see /openapi.json)")
        for query, field in (("wait=nan", "wait"), ("wait=inf", "wait"), ("wait=61", "wait"),
                             (f"since={2**63}", "since"), (f"since={-(2**63) - 1}", "since"),
                             ("sinse=3", "sinse")):
            resp = await client.get(f"/v1/revocations?{query}")
            assert resp.status_code == 422, (query, resp.text)
            assert refused(resp.json()).startswith(f"query parameter '{field}'"), query
        for path in ("/v1/renew/challenge", "/v1/renew"):
            resp = await client.post(path, content=b"[" * 60_000)
            assert resp.status_code == 400
            assert refused(resp.json()) == "request body is nested too deep"


# -- the device's enrollment endpoint -------------------------------------------------------
class _UntouchedTpm:
    """Stands in for the device's TPM where no request may reach it: any use fails the
    test (the refusals here happen before the TPM is asked anything)."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the TPM was reached ({name})")


@pytest.fixture
def endpoint() -> Iterator[EnrollmentEndpoint]:
    ep = EnrollmentEndpoint(_UntouchedTpm(), "dev-1", lambda issued: None,  # type: ignore[arg-type]
                            timeout=0.5).start()
    tracebacks: list[str] = []

    def record(request: Any, client_address: Any) -> None:
        import traceback

        tracebacks.append(traceback.format_exc())

    ep._server.handle_error = record  # type: ignore[method-assign]
    ep.tracebacks = tracebacks  # type: ignore[attr-defined]
    yield ep
    ep.close()
    assert tracebacks == []


def _device(ep: EnrollmentEndpoint, head: bytes, body: bytes = b""
            ) -> tuple[int, dict[str, Any]]:
    """Send one request, read its one JSON answer, and check the endpoint then closed
    the connection (no hang: the socket's timeout fails the test)."""
    port = int(ep.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(head + b"\r\n" + body)
        status, headers, data = read_answer(conn)
        assert headers.get("connection") == "close"
        assert closed_by_peer(conn)
    return status, data


def _head(ep: EnrollmentEndpoint, first: str, *extra: str) -> bytes:
    return ("\r\n".join([first, "Host: dev", f"Authorization: Bearer {ep.code}", *extra])
            + "\r\n").encode()


@pytest.mark.parametrize("length", ["abc", "-5", str(10**12), "1e3"])
def test_device_endpoint_bad_content_length(endpoint: EnrollmentEndpoint, length: str) -> None:
    status, data = _device(endpoint, _head(endpoint, "POST /v1/evidence HTTP/1.1",
                                           f"Content-Length: {length}"), b'{"nonce": "AA=="}')
    assert status == 400 and "Content-Length" in refused(data)
    assert not endpoint.enrolled.is_set()


def test_device_endpoint_nested_json(endpoint: EnrollmentEndpoint) -> None:
    body = b"[" * 60_000
    status, data = _device(endpoint, _head(endpoint, "POST /v1/activate HTTP/1.1",
                                           f"Content-Length: {len(body)}"), body)
    assert status == 400 and refused(data) == "request body must be a JSON object"


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
def test_device_endpoint_other_methods(endpoint: EnrollmentEndpoint, method: str) -> None:
    port = int(endpoint.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(_head(endpoint, f"{method} /v1/evidence HTTP/1.1",
                           "Content-Length: 2") + b"\r\n{}")
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 405") or head.startswith(b"HTTP/1.1 405"), head
    if method != "HEAD":
        assert "is not allowed here" in refused(json.loads(body))


def test_device_endpoint_unknown_method_and_silent_client(endpoint: EnrollmentEndpoint) -> None:
    status, data = _device(endpoint, _head(endpoint, "BREW /v1/evidence HTTP/1.1"))
    assert status == 501 and "BREW" in refused(data)
    port = int(endpoint.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as silent:
        assert closed_by_peer(silent)  # dropped after the endpoint's 0.5 s timeout


# -- tessera serve ----------------------------------------------------------------------------
@pytest.mark.hardware
def test_tessera_serve_binds_before_serving_and_stops_with_clients(tmp_path: Path,
                                                                  softhsm: Any) -> None:
    """`tessera serve` (authority key in SoftHSM2): on a taken port, one line and exit
    1 with nothing announced; running, SIGTERM with a long poll and a half-sent head
    attached ends the poll with an answer and exits 0."""
    import subprocess

    from simulator.provisioner import ProvisioningServer

    server = ProvisioningServer(tmp_path / "authority", softhsm)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", server.port))
        taken.listen(1)
        done = subprocess.run(
            [str(Path(sys.executable).parent / "tessera"), "serve", "--dir",
             str(server.directory), "--port", str(server.port)],
            env=server.env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "serving" not in done.stdout, done
    assert done.stderr.count("\n") == 1 and "cannot listen on 127.0.0.1:" in done.stderr
    # service.toml [limits]: a misspelt or wrong value is one line naming it
    toml = server.directory / "service.toml"
    original = toml.read_text()
    for table, expected in (("renw_per_s = 5", "unknown limit 'renw_per_s'"),
                            ("renew_burst = 0", "renew_burst must be a positive whole"),
                            ("max_body = \"64k\"", "max_body must be a positive whole")):
        toml.write_text(original + f"\n[limits]\n{table}\n")
        done = subprocess.run(
            [str(Path(sys.executable).parent / "tessera"), "serve", "--dir",
             str(server.directory), "--port", str(server.port)],
            env=server.env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 1 and "serving" not in done.stdout, done
        assert done.stderr.count("\n") == 1 and expected in done.stderr, done.stderr
    toml.write_text(original + "\n[limits]\nrenew_burst = 50\nrenew_per_s = 100.0\n")
    with server:
        proc = server._proc
        assert proc is not None
        # the [limits] table took effect: 12 challenges from one address, none refused
        # for the rate (the default burst is 10); 404: the serial is not enrolled
        statuses = [_challenge(Child(proc, server.url, "", server.log), "nobody")[0]  # type: ignore[arg-type]
                    for _ in range(12)]
        assert statuses == [404] * 12
        poll = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        poll.sendall(b"GET /v1/revocations?wait=60 HTTP/1.1\r\nHost: x\r\n\r\n")
        half = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        half.sendall(b"GET /healthz HTTP/1.1\r\n")
        wait_for(lambda: _accepted(proc.pid, server.port, poll) and _accepted(
            proc.pid, server.port, half), 10, "the service to accept both connections")
        proc.terminate()
        assert proc.wait(timeout=20) == 0
        server._proc = None
        status, _, answer = read_answer(poll)
        poll.close()
        half.close()
    assert status == 200 and answer == {"events": []}
    assert "serving factory.tessera.test on http://127.0.0.1:" in server.log.read_text()


def _accepted(pid: int, port: int, client: socket.socket) -> bool:
    """Has process ``pid`` accepted ``client``'s connection to ``port``? (its server
    side socket, found in /proc/net/tcp by the two ports, is one of pid's files)"""
    mine = client.getsockname()[1]
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if int(local.split(":")[1], 16) == port and int(remote.split(":")[1], 16) == mine:
            inodes.add(f"socket:[{fields[9]}]")
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # closed meanwhile
            if os.readlink(fd) in inodes:
                return True
    return False
