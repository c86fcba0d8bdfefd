"""``python -m bench.service_limits``: what hostile clients can make the provisioning
service hold (issue 13, "bounded service").

The service runs as a child process (tests.service_host: the real app on the real
runner, provisioning.server, with its default limits) on 127.0.0.1; the peer is the same
app as `tessera serve` ran it before (no Guard, uvicorn's defaults), measured in the
same run. Figures:

- peak RSS of the service under 100 concurrent 100 MiB uploads, with a Content-Length
  and chunked (the peer gets one 100 MiB upload only: it buffers each whole body, and
  100 would be 10 GiB on a shared machine);
- connections still held by 1,000 clients that send half a request head and stop, once
  the header deadline (10 s) has passed;
- seconds from SIGTERM to exit with 100 revocation-feed long polls attached.

Noisy on a shared machine; the memory and connection figures are what matter.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from provisioning.service import Limits
from tests.service_host import Child, child

from .report import Report

MIB = 1024 * 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--uploads", type=int, default=100)
    parser.add_argument("--upload-mib", type=int, default=100)
    parser.add_argument("--slow-clients", type=int, default=1000)
    parser.add_argument("--polls", type=int, default=100)


def _status(pid: int, field: str) -> int:
    """A /proc/PID/status figure in bytes (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _sockets(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return count


def _upload(port: int, size: int, chunked: bool, results: list[str]) -> None:
    """Send up to ``size`` bytes of body as fast as the service takes them; record how
    it ended (the answer's status, or the error that stopped the sending)."""
    head = b"POST /v1/renew/challenge HTTP/1.1\r\nHost: bench\r\n"
    head += b"Transfer-Encoding: chunked\r\n\r\n" if chunked else (
        b"Content-Length: %d\r\n\r\n" % size)
    block = b"x" * (64 * 1024)
    frame = b"10000\r\n" + block + b"\r\n" if chunked else block
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:
            conn.sendall(head)
            sent = 0
            try:
                while sent < size:
                    conn.sendall(frame)
                    sent += len(block)
                if chunked:
                    conn.sendall(b"0\r\n\r\n")
            except OSError:
                pass  # refused and closed while sending: what a bounded service does
            try:
                answer = conn.recv(200)
                results.append(answer.split(b" ", 2)[1].decode() if answer else "closed")
            except OSError as exc:
                results.append(type(exc).__name__)
    except OSError as exc:
        results.append(type(exc).__name__)


def _uploads(c: Child, count: int, size: int, chunked: bool) -> tuple[int, dict[str, int]]:
    pid = c.proc.pid
    results: list[str] = []
    threads = [threading.Thread(target=_upload, args=(c.port, size, chunked, results))
               for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    outcomes: dict[str, int] = {}
    for r in results:
        outcomes[r] = outcomes.get(r, 0) + 1
    return _status(pid, "VmHWM"), outcomes


def _slow_clients(c: Child, count: int, wait: float) -> tuple[int, int]:
    """(connections the service holds after ``wait`` s, of ``count`` slow clients;
    clients whose connection the service closed)."""
    baseline = _sockets(c.proc.pid)
    conns = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", c.port), timeout=30)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: bench\r\n")  # never finished
        conns.append(s)
    time.sleep(wait)  # the figure is the state after the deadline
    held = max(0, _sockets(c.proc.pid) - baseline)
    closed = 0
    for s in conns:
        s.setblocking(False)
        try:
            while chunk := s.recv(65536):
                del chunk
            closed += 1
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
        s.close()
    return held, closed


def _stop_with_polls(c: Child, polls: int) -> tuple[float, int]:
    """(seconds from SIGTERM to exit, long polls answered)."""
    answered: list[int] = []

    def poll() -> None:
        try:
            with urllib.request.urlopen(c.url + "/v1/revocations?wait=60", timeout=90) as r:
                json.loads(r.read())
                answered.append(1)
        except OSError:
            pass

    threads = [threading.Thread(target=poll) for _ in range(polls)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # let them all be waiting
    t0 = time.monotonic()
    c.proc.send_signal(signal.SIGTERM)
    c.proc.wait(30)
    took = time.monotonic() - t0
    for t in threads:
        t.join(5)
    return took, len(answered)


def run(args: argparse.Namespace) -> int:
    quick = args.quick
    uploads = 10 if quick else args.uploads
    size = (8 if quick else args.upload_mib) * MIB
    slow = 100 if quick else args.slow_clients
    polls = 10 if quick else args.polls
    report = Report("service_limits", quick=quick)
    limits = Limits()
    with tempfile.TemporaryDirectory(prefix="tessera-bench-limits-") as tmp:
        directory = Path(tmp) / "svc"
        with child(directory, limits) as c:
            base = _status(c.proc.pid, "VmRSS")
            peak_cl, outcomes_cl = _uploads(c, uploads, size, chunked=False)
            peak_ch, outcomes_ch = _uploads(c, uploads, size, chunked=True)
            held, closed = _slow_clients(c, slow, limits.header_timeout_s + 1.0)
            stop, answered = _stop_with_polls(c, polls)
        with child(directory, limits, peer=True) as peer:
            peer_base = _status(peer.proc.pid, "VmRSS")
            peer_peak, peer_outcomes = _uploads(peer, 1, size, chunked=False)
            peer_held, _ = _slow_clients(peer, min(slow, 200), limits.header_timeout_s + 1.0)
    mib = float(MIB)
    report.rate("rss_base", "service RSS at rest", base / mib, "MiB")
    report.rate("rss_peak_uploads", f"peak RSS, {uploads} x {size // MIB} MiB uploads "
                "(Content-Length, then chunked)", max(peak_cl, peak_ch) / mib, "MiB",
                f"Content-Length {outcomes_cl}, chunked {outcomes_ch}")
    report.rate("rss_peak_growth", "peak RSS growth under those uploads",
                (max(peak_cl, peak_ch) - base) / mib, "MiB")
    report.rate("peer_rss_growth_one_upload", f"peer: peak RSS growth, ONE {size // MIB} MiB "
                "upload", (peer_peak - peer_base) / mib, "MiB", str(peer_outcomes))
    report.rate("held_after_timeout", f"connections held, {slow} slow clients, "
                f"{limits.header_timeout_s + 1:g} s later", held, "conn",
                f"{closed} closed by the service")
    report.rate("peer_held_after_timeout", f"peer: connections held, {min(slow, 200)} slow "
                "clients, same wait", peer_held, "conn")
    report.rate("stop_seconds", f"SIGTERM to exit, {polls} long polls attached", stop, "s",
                f"{answered} polls answered")
    report.target("rss_growth", "peak RSS growth under the uploads",
                  (max(peak_cl, peak_ch) - base) / mib, "<=", 64.0, "MiB")
    report.target("held", "connections held after the header deadline", held, "<=", 0.0,
                  "conn")
    report.target("stop", "SIGTERM to exit with long polls attached", stop, "<=", 1.0, "s")
    report.note("2 shared cores: timings are noisy; the peer runs one upload (it buffers "
                "whole bodies) and at most 200 slow clients")
    print(report.table())
    if args.json:
        print(json.dumps(report.as_json()))
    return 0 if report.all_passed else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.service_limits",
                                     description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
