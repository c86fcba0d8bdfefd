"""The provisioning API against its own OpenAPI document: the document is valid
(openapi-spec-validator) and generated from the routes, and schemathesis, driving the
live ASGI app with an operator's token, finds no server error and no answer that breaks
the document, and every request that breaks the document is refused
(negative_data_rejection). Not checked: that every well-formed request succeeds
(positive_data_acceptance) - a well-formed request is refused on its merits, e.g. a
signature that does not verify is a 400 attestation_failed.
``TESSERA_SCHEMATHESIS_EXAMPLES`` (default 25) sets the examples per operation and
mode; CI keeps the default, a longer run sets it higher."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from openapi_spec_validator import validate
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from device.provisioner import pop_signature
from hw.software import InsecureSoftwareSigner
from provisioning.service import Limits, openapi_document
from structauth.possession import LABEL_ENROLL
from tests.service_host import Served, make_service

EXAMPLES = int(os.environ.get("TESSERA_SCHEMATHESIS_EXAMPLES", "25"))
ENROLLED = "api-dev-1"

#: what the runs saw, per operation: examples, status codes
SEEN: dict[str, dict[str, Any]] = {}


def _enroll(served: Served, serial: str) -> None:
    """A device in the registry (through the service, in process), so that listing
    and showing devices answer real Device objects."""
    signer = InsecureSoftwareSigner.generate()
    from cryptography.hazmat.primitives import serialization

    spki = signer.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    start = served.service.witnessed_start(
        {"serial": serial, "public_key": base64.b64encode(spki).decode(),
         "key_backend": "insecure-software"}, operator="api-test")
    signature = pop_signature(signer, LABEL_ENROLL, base64.b64decode(start["nonce"]), serial)
    served.service.witnessed_finish({"enrollment_id": start["enrollment_id"],
                                     "signature": base64.b64encode(signature).decode()})


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    # long polls cut to 50 ms: schemathesis asks for ?wait= up to 60 s
    served = make_service(tmp_path_factory.mktemp("api"), Limits(long_poll_max_s=0.05))
    _enroll(served, ENROLLED)
    yield served
    served.service.registry.close()
    served.service.authority.close()
    total = sum(s["examples"] for s in SEEN.values())
    operations = len({name.rsplit(" ", 1)[0] for name in SEEN})
    print(f"\nschemathesis: {operations} operations ({len(SEEN)} operation/mode runs), "
          f"{total} examples, {EXAMPLES} per run asked, failures 0 (any fails its test)")
    for name, seen in sorted(SEEN.items()):
        print(f"  {name}: {seen['examples']} examples, statuses {sorted(seen['statuses'])}")


@pytest.fixture(scope="module")
def api_schema(served: Served) -> Any:
    return schemathesis.openapi.from_asgi("/openapi.json", served.app)


#: every documented operation (the document needs no service to be made); schemathesis's
#: own pytest loader (from_fixture) does not run under pytest 9, so each operation's
#: strategy is driven here with hypothesis
#: (operations without parameters or a body have no negative examples to make)
OPERATIONS = [
    (method.upper(), path, mode)
    for path, ops in openapi_document()["paths"].items()
    for method, op in ops.items()
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if mode is GenerationMode.POSITIVE or "parameters" in op or "requestBody" in op
]


@pytest.mark.parametrize(("method", "path", "mode"), OPERATIONS,
                         ids=[f"{m} {p} {mode}" for m, p, mode in OPERATIONS])
def test_api_conforms_to_its_document(api_schema: Any, served: Served, method: str,
                                      path: str, mode: GenerationMode) -> None:
    """Positive examples (they fit the document) and negative ones (they do not: those
    must be refused with a 4xx, negative_data_rejection)."""
    operation = api_schema[path][method]
    seen = SEEN.setdefault(f"{method} {path} {mode}", {"examples": 0, "statuses": set()})

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case: Any) -> None:
        response = case.call_and_validate(headers={"Authorization": f"Bearer {served.token}"},
                                          excluded_checks=[positive_data_acceptance])
        seen["examples"] += 1
        seen["statuses"].add(response.status_code)
        assert response.status_code < 500, response.text[:300]
        if response.status_code >= 400:  # every refusal is the service's JSON shape
            assert response.headers["content-type"][0].startswith("application/json")
            assert set(json.loads(response.content)) == {"error", "code", "detail"}

    check()


def test_openapi_document_is_valid_and_generated(served: Served) -> None:
    """The served document validates as OpenAPI 3.1, has every route (with its declared
    path parameter), /healthz, and a real Device schema."""
    async def fetch() -> Any:
        transport = httpx.ASGITransport(app=served.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            return (await client.get("/openapi.json")).json()

    doc = asyncio.run(fetch())
    validate(doc)
    routes = {(r.path, m) for r in served.app.app.routes for m in r.methods if m != "HEAD"}
    documented = {(p, m.upper()) for p, ops in doc["paths"].items() for m in ops}
    assert documented == routes
    show = doc["paths"]["/v1/devices/{serial}"]["get"]
    assert [p["name"] for p in show["parameters"] if p["in"] == "path"] == ["serial"]
    assert "/healthz" in doc["paths"]
    device = doc["components"]["schemas"]["Device"]
    assert {"serial", "identity", "status", "public_key"} <= set(device["required"])
    start = doc["components"]["schemas"]["TpmStart"]
    assert start["properties"]["reenroll"]["type"] == "boolean"
    assert start["additionalProperties"] is False


def test_openapi_checked_in_copy_is_current(served: Served) -> None:
    """docs/openapi.json is the generated document (regenerate it with
    ``python -m provisioning.service > docs/openapi.json``)."""
    checked_in = Path(__file__).resolve().parent.parent / "docs" / "openapi.json"
    assert json.loads(checked_in.read_text()) == served.app.state.openapi, \
        "docs/openapi.json is stale: python -m provisioning.service > docs/openapi.json"
