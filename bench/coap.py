"""``python -m bench coap``: CoAP request rates on SA1 sessions against plain CoAP and OSCORE.

One server process (spawned, so it has its own core on a 2-core machine) hosts five
aiocoap server contexts on 127.0.0.1, all around the same resource
(``POST /sensors/pi-0042/readings``, 100-byte payload in, 16-byte answer out):

``plain``    aiocoap's Site, nothing else;
``proven``   ``broker_plugin.coap_site.TesseraSite`` (tagged mode) with a policy check;
``sealed``   the same in sealed mode (ChaCha20-Poly1305 on both payloads);
``oscore``   aiocoap's ``OscoreSiteWrapper`` with a static RFC 8613 context held in
             memory (``bench.oscore_peer.MemoryContext``: no sequence-number fsync, so
             this is OSCORE at its fastest), replay window widened to 256 for the
             100-in-flight run;
``edhoc``    ``OscoreSiteWrapper`` with EDHOC credentials (method 3, P-256 static DH
             keys as CCS), for the time to the first authenticated request only.

The client (this process) drives each with aiocoap: the device side of Tessera is
``device.coap.TesseraCoapClient``. Figures:

* requests/s sequential (one request at a time) and with 100 in flight (100 tasks on one
  client context; aiocoap keeps NSTART = 1 confirmable exchange per peer on the wire, so
  this measures how well each stack pipelines its own work, not parallel transmission);
* client and server CPU per request (``time.process_time`` deltas of each process);
* time to the first authenticated request from a fresh client: the SA1 handshake
  (block-wise POST of msg1, ~1.85 KB, msg2 back) plus one proven request, against EDHOC +
  OSCORE (aiocoap's combined msg3 + request flow).

aiocoap 0.4.17's EDHOC initiator never caches the context it establishes (it stores the
result on the transport but checks the credentials object), so every request runs a new
EDHOC exchange and the server refuses after ~47 contexts; steady-state OSCORE therefore
uses the static context, and EDHOC is measured on first requests only.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from . import env
from .report import Report, Row
from .timing import Stats, percentile

PATH = ("sensors", "pi-0042", "readings")
PAYLOAD = bytes(range(100))
ANSWER = b"stored" + bytes(10)
INFLIGHT = 100
MODES = ("plain", "proven", "sealed", "oscore")
TRUST_DOMAIN = "fleet.example"
POLICY = """
version = 1
[classes.default.coap]
POST = ["sensors/{id}/readings"]
GET  = ["sensors/{id}/#"]
"""

TARGET_PROVEN_OVER_PLAIN = 0.9
TARGET_PROVEN_OVER_OSCORE = 1.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--requests",
        type=int,
        default=0,
        help="requests per timed batch (default 150 sequential / 600 in flight; --quick: 60 / 300)",
    )
    parser.add_argument(
        "--batches", type=int, default=0, help="timed batches per figure (default 30, --quick 3)"
    )


def _progress(text: str) -> None:
    print(f"  measuring {text} ...", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ server process


def _server_main(material: dict[str, Any], conn: Connection) -> None:
    import logging

    logging.getLogger("hw.software").setLevel(logging.ERROR)
    asyncio.run(_serve(material, conn))


async def _serve(material: dict[str, Any], conn: Connection) -> None:
    import aiocoap
    from aiocoap import resource
    from aiocoap.credentials import CredentialsMap
    from aiocoap.edhoc import EdhocCredentials
    from aiocoap.oscore_sitewrapper import OscoreSiteWrapper
    from cryptography import x509

    from broker_plugin.coap_site import TesseraSite, local_port
    from broker_plugin.policy import parse_policy
    from hw.software import InsecureSoftwareSigner
    from structauth.credentials import Credential, TrustStore
    from structauth.handshake import Responder
    from structauth.params import SessionParams

    from .oscore_peer import MemoryContext

    class Readings(resource.Resource):  # type: ignore[misc]
        async def render_post(self, request: Any) -> Any:
            return aiocoap.Message(code=aiocoap.CHANGED, payload=ANSWER)

    def inner() -> Any:
        site = resource.Site()
        site.add_resource(PATH, Readings())
        return site

    trust = TrustStore([x509.load_der_x509_certificate(material["root"])], TRUST_DOMAIN)
    signer = InsecureSoftwareSigner.from_seed(material["gw_seed"], deterministic=False)
    credential = Credential.from_der_chain(material["gw_chain"])
    policy = parse_policy(POLICY)

    def tessera(sealed: bool) -> Any:
        responder = Responder(
            signer=signer,
            credential=credential,
            trust=trust,
            params=SessionParams(sealed=sealed),
        )
        return TesseraSite(inner(), responder, policy)

    oscore_creds = CredentialsMap()
    oscore_creds[":client"] = MemoryContext(
        sender_id=b"\x02",
        recipient_id=b"\x01",
        master_secret=material["oscore_secret"],
        master_salt=material["oscore_salt"],
        window=256,
    )
    edhoc_creds = CredentialsMap()
    roots = {
        "plain": inner(),
        "proven": tessera(False),
        "sealed": tessera(True),
        "oscore": OscoreSiteWrapper(inner(), oscore_creds),
        "edhoc": OscoreSiteWrapper(inner(), edhoc_creds),
    }
    contexts = {}
    ports = {}
    for mode, root in roots.items():
        ctx = await aiocoap.Context.create_server_context(
            root, bind=("127.0.0.1", 0), transports=["udp6"]
        )
        if isinstance(root, TesseraSite):
            root.attach(ctx)  # what start_gateway does: the message layer bounded
        contexts[mode] = ctx
        ports[mode] = local_port(ctx)
    e = material["edhoc"]
    edhoc_creds[f"coap://127.0.0.1:{ports['edhoc']}/*"] = EdhocCredentials(
        suite=2,
        method=3,
        own_cred_style="by-key-id",
        own_cred=e["server_ccs"],
        private_key=e["server_key"],
        peer_cred=e["client_ccs"],
    )
    conn.send(ports)
    loop = asyncio.get_running_loop()
    while True:
        command = await loop.run_in_executor(None, conn.recv)
        if command == "cpu":
            conn.send(time.process_time())
        else:
            break
    for ctx in contexts.values():
        await ctx.shutdown()
    conn.send("stopped")


class Server:
    """The server process and its command pipe."""

    def __init__(self, material: dict[str, Any]) -> None:
        mp = multiprocessing.get_context("spawn")
        self.conn, child = mp.Pipe()
        self.process = mp.Process(target=_server_main, args=(material, child), daemon=True)
        self.process.start()
        if not self.conn.poll(60):
            self.process.kill()
            raise RuntimeError("the benchmark's CoAP server did not start")
        self.ports: dict[str, int] = self.conn.recv()

    def ask(self, command: str) -> Any:
        self.conn.send(command)
        return self.conn.recv()

    def stop(self) -> None:
        try:
            self.conn.send("stop")
            if self.conn.poll(10):
                self.conn.recv()
        finally:
            self.process.join(10)
            if self.process.is_alive():
                self.process.kill()


# ------------------------------------------------------------------ material


def _material() -> tuple[dict[str, Any], Any, Any]:
    """Keys and credentials: the gateway's go to the server process (as a seed and DER),
    the device's stay here."""
    from aiocoap.edhoc import CoseKeyForEdhoc
    from cryptography.hazmat.primitives.serialization import Encoding

    from hw.software import InsecureSoftwareSigner
    from simulator.fleet import Fleet

    now = dt.datetime.now(dt.UTC)
    fleet = Fleet(trust_domain=TRUST_DOMAIN, t0=now - dt.timedelta(hours=1))
    gw_seed = os.urandom(32)
    gateway = fleet.member(
        "broker",
        "gw-1",
        signer=InsecureSoftwareSigner.from_seed(gw_seed, deterministic=False),
        days=1,
    )
    device = fleet.member("device", "pi-0042", days=1)
    server_key, client_key = CoseKeyForEdhoc.generate(), CoseKeyForEdhoc.generate()
    edhoc = {
        "server_key": server_key.secret_to_map(),
        "server_ccs": server_key.as_ccs(kid=b"\x0a", subject="gw-1"),
        "client_key": client_key.secret_to_map(),
        "client_ccs": client_key.as_ccs(kid=b"\x2b", subject="pi-0042"),
    }
    material = {
        "root": fleet.root.public_bytes(Encoding.DER),
        "gw_seed": gw_seed,
        "gw_chain": gateway.credential.der_chain(),
        "gw_identity": gateway.credential.identity.uri,
        "oscore_secret": os.urandom(16),
        "oscore_salt": bytes.fromhex("9e7ca92223786340"),
        "edhoc": edhoc,
    }
    return material, fleet, device


# ------------------------------------------------------------------ client side


def _stats(per_op_us: list[float], per_batch: int) -> Stats:
    values = sorted(per_op_us)
    return Stats(
        median_us=statistics.median(values),
        p10_us=percentile(values, 10),
        p90_us=percentile(values, 90),
        batches=len(values),
        per_batch=per_batch,
    )


async def _batch(one: Callable[[], Awaitable[Any]], n: int, width: int) -> float:
    """Run ``n`` requests, ``width`` at a time; seconds elapsed."""
    t0 = time.perf_counter()
    if width == 1:
        for _ in range(n):
            await one()
    else:
        per_worker = n // width

        async def worker() -> None:
            for _ in range(per_worker):
                await one()

        await asyncio.gather(*(worker() for _ in range(width)))
    return time.perf_counter() - t0


@dataclass
class Measured:
    """One mode's results at one concurrency: per-request wall time over rounds, the
    median client and server CPU per request, and the raw per-round times."""

    stats: Stats
    client_cpu_us: float
    server_cpu_us: float
    rounds_us: list[float]


async def _measure(
    server: Server,
    ops: dict[str, Callable[[], Awaitable[Any]]],
    n: int,
    width: int,
    rounds: int,
) -> dict[str, Measured]:
    """Every mode runs one batch of ``n`` requests per round, back to back; the order
    rotates from round to round. Adjacent batches see the same machine, so the ratio of
    two modes is taken round by round (paired) and its median reported: on a shared VM
    the machine's speed drifts by more than the differences measured here."""
    n = max(width, (n // width) * width)
    for one in ops.values():
        await _batch(one, max(width, n // 2), width)  # warm-up
    wall: dict[str, list[float]] = {mode: [] for mode in ops}
    client_cpu: dict[str, list[float]] = {mode: [] for mode in ops}
    server_cpu: dict[str, list[float]] = {mode: [] for mode in ops}
    modes = list(ops)
    # The garbage collector stays on: aiocoap frees request state through reference
    # cycles, and a long run with it paused stalls; collections are part of the cost.
    for r in range(rounds):
        for mode in modes[r % len(modes) :] + modes[: r % len(modes)]:
            c0, s0 = time.process_time(), server.ask("cpu")
            elapsed = await _batch(ops[mode], n, width)
            c1, s1 = time.process_time(), server.ask("cpu")
            wall[mode].append(elapsed / n * 1e6)
            client_cpu[mode].append((c1 - c0) / n * 1e6)
            server_cpu[mode].append((s1 - s0) / n * 1e6)
    return {
        mode: Measured(
            _stats(wall[mode], n),
            statistics.median(client_cpu[mode]),
            statistics.median(server_cpu[mode]),
            wall[mode],
        )
        for mode in ops
    }


def paired_speedup(faster: Measured, baseline: Measured) -> float:
    """Median over rounds of (baseline time / time): requests/s of ``faster`` relative to
    ``baseline``, measured in the same round."""
    return statistics.median(
        b / f for f, b in zip(faster.rounds_us, baseline.rounds_us, strict=True)
    )


async def _clients(server: Server, material: dict[str, Any], fleet: Any, device: Any) -> Any:
    """One aiocoap client context per mode (plus one for first requests): a context has
    one 16-bit message-id counter for all peers, and a whole run sends more than 65,536
    requests inside EXCHANGE_LIFETIME (247 s), so one shared context would reuse message
    ids that servers still hold in their deduplication caches (RFC 7252 section 4.5)."""
    import aiocoap
    from aiocoap.numbers import codes

    from device.coap import TesseraCoapClient
    from structauth.credentials import Identity

    from .oscore_peer import MemoryContext

    gateway = Identity.parse(material["gw_identity"])

    contexts = {mode: await aiocoap.Context.create_client_context() for mode in (*MODES, "first")}
    base = {mode: f"coap://127.0.0.1:{port}" for mode, port in server.ports.items()}
    contexts["oscore"].client_credentials[base["oscore"] + "/*"] = MemoryContext(
        sender_id=b"\x01",
        recipient_id=b"\x02",
        master_secret=material["oscore_secret"],
        master_salt=material["oscore_salt"],
        window=256,
    )

    def raw(mode: str) -> Callable[[], Awaitable[Any]]:
        uri = base[mode]
        ctx = contexts[mode]

        async def one() -> Any:
            msg = aiocoap.Message(code=codes.POST, uri=uri, payload=PAYLOAD)
            msg.opt.uri_path = PATH
            response = await ctx.request(msg).response
            if response.code != codes.CHANGED or response.payload != ANSWER:
                raise RuntimeError(f"{mode}: unexpected answer {response}")
            return response

        return one

    def tessera_client(mode: str, context: str) -> TesseraCoapClient:
        return TesseraCoapClient(
            signer=device.signer,
            credential=device.credential,
            trust=fleet.trust,
            uri=base[mode],
            gateway=gateway,
            context=contexts[context],
        )

    def proven(mode: str) -> Callable[[], Awaitable[Any]]:
        client = tessera_client(mode, mode)

        async def one() -> Any:
            reply = await client.request("POST", PATH, PAYLOAD)
            if reply.code != codes.CHANGED or reply.payload != ANSWER:
                raise RuntimeError(f"{mode}: unexpected answer {reply}")
            return reply

        return one

    ops = {
        "plain": raw("plain"),
        "proven": proven("proven"),
        "sealed": proven("sealed"),
        "oscore": raw("oscore"),
    }
    return contexts, base, ops, tessera_client


async def _first_requests(
    samples: int,
    base: dict[str, str],
    ctx: Any,
    material: dict[str, Any],
    tessera_client: Callable[[str, str], Any],
) -> tuple[Stats, Stats, Stats | str]:
    import aiocoap
    from aiocoap.edhoc import EdhocCredentials
    from aiocoap.numbers import codes

    ttfa, handshakes = [], []
    for _ in range(samples + 1):
        client = tessera_client("proven", "first")
        t0 = time.perf_counter()
        await client.request("POST", PATH, PAYLOAD)
        ttfa.append((time.perf_counter() - t0) * 1e6)
        client2 = tessera_client("proven", "first")
        t0 = time.perf_counter()
        await client2.connect()
        handshakes.append((time.perf_counter() - t0) * 1e6)
    tessera = _stats(ttfa[1:], 1)
    handshake = _stats(handshakes[1:], 1)
    e = material["edhoc"]
    uri = base["edhoc"]
    times = []
    try:
        for _ in range(samples + 1):
            ctx.client_credentials[uri + "/*"] = EdhocCredentials(
                suite=2,
                method=3,
                own_cred_style="by-key-id",
                own_cred=e["client_ccs"],
                private_key=e["client_key"],
                peer_cred=e["server_ccs"],
            )
            msg = aiocoap.Message(code=codes.POST, uri=uri, payload=PAYLOAD)
            msg.opt.uri_path = PATH
            t0 = time.perf_counter()
            response = await ctx.request(msg).response
            times.append((time.perf_counter() - t0) * 1e6)
            if response.code != codes.CHANGED:
                raise RuntimeError(f"EDHOC + OSCORE answered {response.code}")
        edhoc: Stats | str = _stats(times[1:], 1)
    except Exception as exc:  # reported, not fatal: aiocoap's EDHOC is experimental
        edhoc = f"EDHOC + OSCORE failed in aiocoap: {exc!r}"
    return tessera, handshake, edhoc


def _ratio(report: Report, key: str, label: str, value: float) -> float:
    report.ratios[key] = value
    report.ratio_rows.append(Row(key, label, value, "x"))
    return value


async def _collect(report: Report, quick: bool, requests: int, batches: int) -> None:
    import logging

    logging.getLogger("hw.software").setLevel(logging.ERROR)
    material, fleet, device = _material()
    server = Server(material)
    try:
        contexts, base, ops, tessera_client = await _clients(server, material, fleet, device)
        n_seq = requests or (60 if quick else 150)
        n_par = requests or (300 if quick else 600)
        batches = batches or (3 if quick else 30)
        results: dict[int, dict[str, Measured]] = {}
        labels = {
            "plain": "plain CoAP",
            "proven": "Tessera proven",
            "sealed": "Tessera sealed",
            "oscore": "OSCORE (static context)",
        }
        for width, n, tag in ((1, n_seq, "sequential"), (INFLIGHT, n_par, "100 in flight")):
            _progress(f"{', '.join(labels.values())}: {tag}, {batches} rounds")
            measured = await _measure(server, ops, n, width, batches)
            results[width] = measured
            for mode in MODES:
                m = measured[mode]
                key = f"{mode}_{'seq' if width == 1 else 'inflight'}"
                report.figure(f"{key}_us", f"{labels[mode]}, {tag}: time per request", m.stats)
                rate = 1e6 / m.stats.median_us
                report.rate(f"{key}_rps", f"{labels[mode]}, {tag}", rate, "req/s")
                report.rate(
                    f"{key}_client_cpu_us", "  client CPU per request", m.client_cpu_us, "µs"
                )
                report.rate(
                    f"{key}_server_cpu_us", "  server CPU per request", m.server_cpu_us, "µs"
                )
        _progress("time to the first authenticated request")
        samples = 5 if quick else 25
        tessera, handshake, edhoc = await _first_requests(
            samples, base, contexts["first"], material, tessera_client
        )
        report.figure(
            "tessera_first_request_us", "Tessera: handshake + first proven request", tessera
        )
        report.figure("tessera_handshake_us", "Tessera: SA1 handshake alone", handshake)
        if isinstance(edhoc, Stats):
            report.figure(
                "edhoc_oscore_first_request_us",
                "EDHOC + OSCORE: first request (combined flow)",
                edhoc,
            )
            _ratio(
                report,
                "first_request_tessera_over_edhoc",
                "first request: Tessera time / EDHOC+OSCORE time",
                tessera.median_us / edhoc.median_us,
            )
        else:
            report.note(edhoc)
        for ctx in contexts.values():
            await ctx.shutdown()
    finally:
        server.stop()

    for width, tag in ((1, "seq"), (INFLIGHT, "inflight")):
        words = "sequential" if width == 1 else "100 in flight"
        by_mode = results[width]
        ratios = {}
        for mode, base in (
            ("proven", "plain"),
            ("sealed", "plain"),
            ("proven", "oscore"),
            ("sealed", "oscore"),
        ):
            ratios[(mode, base)] = _ratio(
                report,
                f"{mode}_over_{base}_{tag}",
                f"{mode} / {base} requests/s, {words} (paired by round)",
                paired_speedup(by_mode[mode], by_mode[base]),
            )
        report.target(
            f"proven_vs_plain_{tag}",
            f"proven >= 90% of plain, {words}",
            ratios[("proven", "plain")],
            ">=",
            TARGET_PROVEN_OVER_PLAIN,
            "x",
        )
        report.target(
            f"proven_vs_oscore_{tag}",
            f"proven faster than OSCORE, {words}",
            ratios[("proven", "oscore")],
            ">=",
            TARGET_PROVEN_OVER_OSCORE,
            "x",
        )
    report.note(
        "client and server are separate processes on 127.0.0.1 (one core each on a 2-core "
        "machine); the client is aiocoap in both cases and usually the bottleneck"
    )
    report.note(
        "100 in flight: 100 tasks on one aiocoap client context; aiocoap sends one "
        "confirmable exchange per peer at a time (NSTART = 1), the rest queue in its backlog"
    )
    report.note(
        "OSCORE uses an in-memory static context (no sequence-number fsync) with a 256-entry "
        "replay window; aiocoap 0.4.17's EDHOC re-runs the handshake on every request "
        "(the established context is stored on the transport, looked up on the "
        "credentials), so EDHOC is compared on the first request only"
    )
    report.info["workload"] = {
        "method": "POST",
        "path": "/" + "/".join(PATH),
        "request_payload": len(PAYLOAD),
        "response_payload": len(ANSWER),
        "inflight": INFLIGHT,
    }


def collect(*, quick: bool = False, requests: int = 0, batches: int = 0) -> Report:
    report = Report("coap", quick=quick)
    report.info["env"] = env.describe()
    asyncio.run(_collect(report, quick, requests, batches))
    return report


def run(args: argparse.Namespace) -> int:
    report = collect(quick=args.quick, requests=args.requests, batches=args.batches)
    print(report.table())
    if args.json:
        print(report.json_line())
    return 0
