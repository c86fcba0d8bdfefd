"""A real CoAP gateway for the attack suite, in its own process (so its memory can be
measured): ``broker_plugin.coap.site.TesseraSite`` around an aiocoap Site, on UDP
127.0.0.1.

    python -m tests.attacks.gateway DIR

reads ``DIR/gateway.json`` (trust domain, bundle, credential, key, policy, devices),
serves on a free port and writes it to ``DIR/port``. What it leaves for the tests:

* ``DIR/served.jsonl``: one line per request the inner site served (identity, method,
  path, payload hex): what "routed" means for CoAP;
* ``DIR/audit.jsonl``: the site's audit records (broker_plugin.audit);
* ``DIR/gateway.log``: its log (one line per refusal problem; tracebacks show here);
* ``DIR/control.sock``: a Unix socket that answers one JSON object per connection:
  sessions, counters, the sizes of every bounded table it holds, and its RSS.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import aiocoap
from aiocoap import resource
from aiocoap.numbers import codes
from cryptography import x509

from broker_plugin.audit import AsyncAuditWriter, AuditLog
from broker_plugin.coap import site as coap_site
from broker_plugin.coap.site import TesseraSite, local_port
from broker_plugin.policy import parse_policy
from hw.software import InsecureSoftwareSigner
from structauth.credentials import Credential, TrustStore
from structauth.handshake import Responder

POLICY = """
version = 1

[classes.default]
publish = ["devices/{id}/telemetry/#"]

[classes.default.coap]
GET  = ["sensors/{id}/#", "big"]
POST = ["sensors/{id}/readings"]
"""


class Recorder(resource.Resource):  # type: ignore[misc]
    """Answers and writes every request it serves to served.jsonl."""

    def __init__(self, out: Any, body: bytes = b"21.5") -> None:
        super().__init__()
        self.out = out
        self.body = body

    def _record(self, request: aiocoap.Message, method: str) -> None:
        claims = getattr(request.remote, "authenticated_claims", ()) or ()
        who = claims[0].uri if claims else None
        self.out.write(json.dumps({
            "identity": who, "method": method, "path": list(request.opt.uri_path),
            "payload": bytes(request.payload).hex()}) + "\n")
        self.out.flush()

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        self._record(request, "GET")
        return aiocoap.Message(payload=self.body, content_format=0)

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        self._record(request, "POST")
        return aiocoap.Message(code=codes.CHANGED, payload=b"ok")


def _tables(obj: Any, prefix: str, out: dict[str, Any], depth: int = 0,
            seen: set[int] | None = None) -> None:
    """Sizes of every bounded table (anything with ``limits`` and ``bytes``) and every
    plain container reachable from the site's attributes, two levels down."""
    seen = seen if seen is not None else set()
    if depth > 2 or id(obj) in seen:
        return
    seen.add(id(obj))
    for name, value in list(vars(obj).items()):
        key = f"{prefix}{name}"
        if hasattr(value, "limits") and hasattr(value, "bytes"):
            out[key] = {"entries": len(value), "bytes": int(value.bytes)}
        elif isinstance(value, dict | list | set):
            out[key] = {"entries": len(value)}
        elif hasattr(value, "__dict__") and type(value).__module__.startswith(
                ("broker_plugin", "aiocoap.blockwise")):
            _tables(value, key + ".", out, depth + 1, seen)


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def main(directory: Path) -> None:
    config = json.loads((directory / "gateway.json").read_text())
    logging.basicConfig(filename=directory / "gateway.log", level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    bundle = x509.load_pem_x509_certificates(Path(config["bundle"]).read_bytes())
    credential = Credential.from_pem(Path(config["credential"]).read_bytes())
    signer = InsecureSoftwareSigner.load(Path(config["key"]))
    trust = TrustStore(bundle, config["trust_domain"])
    responder = Responder(signer=signer, credential=credential, trust=trust,
                          **config.get("responder", {}))
    served = (directory / "served.jsonl").open("a")
    inner = resource.Site()
    for name in config["devices"]:
        for leaf in ("readings", "temp"):
            inner.add_resource(["sensors", name, leaf], Recorder(served))
    inner.add_resource(["big"], Recorder(served, bytes(range(256)) * 12))
    audit = AsyncAuditWriter(AuditLog(directory / "audit.jsonl"))
    def record(event: str, **fields: Any) -> None:
        audit.submit(event, **fields)

    site = TesseraSite(inner, responder, parse_policy(POLICY), audit=record,
                       **config.get("site", {}))
    start = getattr(coap_site, "start_gateway", None)
    if start is not None:  # what a deployment runs: UDP only, message layer bounded
        context = await start(site, bind=("127.0.0.1", 0))
    else:
        context = await aiocoap.Context.create_server_context(site, bind=("127.0.0.1", 0))
    port = local_port(context)

    async def control(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tables: dict[str, Any] = {}
        _tables(site, "site.", tables)
        state = {"sessions": len(site.sessions), "stats": dict(site.stats),
                 "tables": tables, "rss_kib": _rss_kib()}
        writer.write(json.dumps(state).encode())
        await writer.drain()
        writer.close()

    sock_path = directory / "control.sock"
    sock_path.unlink(missing_ok=True)
    server = await asyncio.start_unix_server(control, path=str(sock_path))
    (directory / "port.tmp").write_text(str(port))
    os.replace(directory / "port.tmp", directory / "port")
    try:
        await asyncio.Event().wait()
    finally:
        server.close()
        await context.shutdown()
        audit.close()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(Path(sys.argv[1])))
