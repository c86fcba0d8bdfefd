"""The provisioning API's OpenAPI 3.1 document, generated from the service's routes
(``Operation``, one per route: provisioning.service builds both its Starlette routes
and this document from the same table) and the pydantic models of
``provisioning.schemas``. Served at ``/openapi.json``; tests validate it with
openapi-spec-validator and run schemathesis against the live service with it.
``python -m provisioning.service`` prints it (docs/openapi.json)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from provisioning import schemas

_REF = "#/components/schemas/{model}"


@dataclass(frozen=True)
class Operation:
    """One route of the API: what it takes, what it answers, who may call it."""

    method: str
    path: str
    summary: str
    handler: Any  # async (Call) -> Response; typed in provisioning.service
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    answer: type[BaseModel] | None = None
    #: media type of a non-JSON answer (the bundle's PEM, the CRL's DER)
    media: str | None = None
    operator: bool = False
    #: the one-use id field a malformed request still uses up (one try per id)
    one_use_id: str | None = None
    path_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    description: str | None = None

    @property
    def operation_id(self) -> str:
        words = re.sub(r"[{}]", "", self.path).strip("/").replace("/", "_").replace(".", "_")
        return f"{self.method.lower()}_{words or 'root'}"


def serial_param(description: str = "the device's serial") -> dict[str, Any]:
    return {"type": "string", "minLength": 1, "maxLength": 64,
            "pattern": schemas.SERIAL_PATTERN, "description": description}


def build_openapi(operations: Sequence[Operation], *, title: str, version: str
                  ) -> dict[str, Any]:
    models: list[type[BaseModel]] = [schemas.Error]
    for op in operations:
        models += [m for m in (op.body, op.answer) if m is not None]
    unique = list(dict.fromkeys(models))
    refs, defs = models_json_schema(
        [(m, "validation") for m in unique], ref_template=_REF
    )
    components = defs.get("$defs", {})

    def ref(model: type[BaseModel]) -> dict[str, Any]:
        return dict(refs[(model, "validation")])

    error = {"description": "Refused: {error, code, detail}",
             "content": {"application/json": {"schema": ref(schemas.Error)}}}
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        entry: dict[str, Any] = {"operationId": op.operation_id, "summary": op.summary}
        if op.description:
            entry["description"] = op.description
        params: list[dict[str, Any]] = [
            {"name": name, "in": "path", "required": True, "schema": schema}
            for name, schema in op.path_params.items()
        ]
        if op.query is not None:
            qschema = op.query.model_json_schema(ref_template=_REF)
            required = set(qschema.get("required", []))
            for name, prop in qschema["properties"].items():
                prop = {k: v for k, v in prop.items() if k != "title"}
                description = prop.pop("description", None)
                param: dict[str, Any] = {"name": name, "in": "query",
                                         "required": name in required, "schema": prop}
                if description:
                    param["description"] = description
                params.append(param)
        if params:
            entry["parameters"] = params
        if op.body is not None:
            entry["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref(op.body)}},
            }
        if op.answer is not None:
            ok: dict[str, Any] = {"description": "OK", "content": {
                "application/json": {"schema": ref(op.answer)}}}
        else:
            media = op.media or "application/octet-stream"
            ok = {"description": "OK", "content": {media: {
                "schema": {"type": "object" if media == "application/json" else "string"}}}}
        entry["responses"] = {"200": ok, "default": error}
        if op.operator:
            entry["security"] = [{"operatorToken": []}]
        paths.setdefault(op.path, {})[op.method.lower()] = entry
    return {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": version,
            "description": "Every refusal is one JSON object {error, code, detail}; "
                           "error and code name a structauth.errors.Reason.",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"operatorToken": {
                "type": "http", "scheme": "bearer",
                "description": "an operator token (tessera init prints the first one)"}},
        },
    }

