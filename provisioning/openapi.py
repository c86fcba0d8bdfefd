"""The provisioning API's OpenAPI 3.1 description, served at /openapi.json."""

from __future__ import annotations

from typing import Any

_B64 = {"type": "string", "contentEncoding": "base64"}
_OPERATOR = [{"operatorToken": []}]


def _obj(required: list[str], **props: Any) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": props}


def _op(
    summary: str, request: dict[str, Any] | None, response: str, secure: bool = True
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {
            "200": {
                "description": "OK",
                "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{response}"}}
                },
            },
            "default": {
                "description": "Refused",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            },
        },
    }
    if request is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": request}}}
    if secure:
        op["security"] = _OPERATOR
    return op


_ISSUED = _obj(
    ["serial", "identity", "operational_credential", "bundle"],
    serial={"type": "string"},
    identity={"type": "string", "format": "uri"},
    attestation={"enum": ["tpm-attested", "factory-witnessed"]},
    enrollment_credential={"type": "string", "description": "PEM"},
    operational_credential={"type": "string", "description": "PEM"},
    operational_not_after={"type": "string", "format": "date-time"},
    bundle={"type": "string", "description": "trust bundle, PEM"},
)
_START = _obj(
    ["serial"],
    serial={"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$"},
    kind={"enum": ["device", "broker"]},
    device_class={"type": "string"},
    reenroll={"type": "boolean"},
)

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "Tessera provisioning API", "version": "1"},
    "components": {
        "securitySchemes": {"operatorToken": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": _obj(
                ["error", "code", "detail"],
                error={"type": "string"},
                code={"type": "integer"},
                detail={"type": "string"},
            ),
            "Nonce": _obj(["enrollment_id", "nonce"], enrollment_id={"type": "string"}, nonce=_B64),
            "Challenge": _obj(
                ["enrollment_id", "challenge"],
                enrollment_id={"type": "string"},
                challenge=_obj(
                    ["credential_blob", "encrypted_secret"],
                    credential_blob=_B64,
                    encrypted_secret=_B64,
                ),
            ),
            "Issued": _ISSUED,
            "Device": {"type": "object"},
            "Devices": _obj(
                ["devices"],
                devices={"type": "array", "items": {"$ref": "#/components/schemas/Device"}},
            ),
            "Revocation": _obj(
                ["id", "serial", "identity", "cert_serials"],
                id={"type": "integer"},
                serial={"type": "string"},
                identity={"type": "string"},
                cert_serials={"type": "array", "items": {"type": "string"}},
                reason={"type": "string"},
                revoked_at={"type": "string", "format": "date-time"},
            ),
            "Revocations": _obj(
                ["events"],
                events={"type": "array", "items": {"$ref": "#/components/schemas/Revocation"}},
            ),
            "RenewalNonce": _obj(
                ["renewal_id", "nonce"], renewal_id={"type": "string"}, nonce=_B64
            ),
        },
    },
    "paths": {
        "/v1/enroll/tpm/start": {"post": _op("Start a TPM-attested enrollment", _START, "Nonce")},
        "/v1/enroll/tpm/evidence": {
            "post": _op(
                "Send TPM evidence (EK cert, EK/AK/key public areas, Certify over the nonce)",
                _obj(
                    ["enrollment_id", "evidence"],
                    enrollment_id={"type": "string"},
                    evidence={"type": "object"},
                ),
                "Challenge",
            )
        },
        "/v1/enroll/tpm/finish": {
            "post": _op(
                "Answer the credential-activation challenge; records the device",
                _obj(["enrollment_id", "secret"], enrollment_id={"type": "string"}, secret=_B64),
                "Issued",
            )
        },
        "/v1/enroll/witnessed/start": {
            "post": _op(
                "Start a factory-witnessed (PKCS#11) enrollment",
                {
                    **_START,
                    "properties": {
                        **_START["properties"],
                        "public_key": _B64,
                        "key_backend": {"enum": ["pkcs11", "insecure-software"]},
                    },
                },
                "Nonce",
            )
        },
        "/v1/enroll/witnessed/finish": {
            "post": _op(
                "Prove possession of the token key; records the device",
                _obj(
                    ["enrollment_id", "signature"], enrollment_id={"type": "string"}, signature=_B64
                ),
                "Issued",
            )
        },
        "/v1/renew/challenge": {
            "post": _op(
                "Ask for a renewal nonce",
                _obj(["serial"], serial={"type": "string"}),
                "RenewalNonce",
                secure=False,
            )
        },
        "/v1/renew": {
            "post": _op(
                "Renew the operational credential with a hardware signature over the nonce",
                _obj(["renewal_id", "signature"], renewal_id={"type": "string"}, signature=_B64),
                "Issued",
                secure=False,
            )
        },
        "/v1/devices": {"get": _op("List devices", None, "Devices")},
        "/v1/devices/{serial}": {"get": _op("Show one device", None, "Device")},
        "/v1/devices/{serial}/revoke": {
            "post": _op("Revoke a device", _obj([], reason={"type": "string"}), "Revocation")
        },
        "/v1/revocations": {
            "get": {
                **_op(
                    "Revocation feed: events after ?since=<id>, long-polling up to ?wait=<s>",
                    None,
                    "Revocations",
                    secure=False,
                )
            }
        },
        "/v1/bundle": {
            "get": {
                "summary": "Trust bundle (PEM)",
                "responses": {
                    "200": {"description": "PEM", "content": {"application/x-pem-file": {}}}
                },
            }
        },
        "/v1/crl": {
            "get": {
                "summary": "Signed revocation list (DER)",
                "responses": {
                    "200": {"description": "CRL", "content": {"application/pkix-crl": {}}}
                },
            }
        },
    },
}
