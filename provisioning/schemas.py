"""The provisioning API's one schema layer: every request body, query and answer.

Request bodies are validated strictly (a boolean is JSON true or false, a string is a
string: nothing is coerced), with every string, list and object bounded; the service
refuses what does not fit with 422 before anything is looked up or written. The same
models produce the OpenAPI document (``provisioning.openapi``), so the document cannot
drift from what the service accepts and answers.

Unknown fields: refused in what an operator sends (a misspelt ``reenrol`` or
``device_clas`` must not be silently ignored and change what happens) and in the TPM
evidence (every field of it is checked against the TPM); ignored in the proof steps
(finish, renew), where a newer or older device agent may add a field and nothing
optional exists that a typo could lose.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from hw.tpm_evidence import MAX_INTERMEDIATES

#: what check_serial accepts (provisioning.enrollment), as a pattern
SERIAL_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
#: standard base64 (what base64.b64decode(validate=True) accepts, padding included)
_B64_PATTERN = r"^[A-Za-z0-9+/]*={0,2}$"
#: the service's one-use ids (secrets.token_urlsafe(24) is 32 characters)
_ID_PATTERN = r"^[A-Za-z0-9_-]{8,64}$"


def _b64(max_bytes: int, description: str) -> Any:
    """The constraints of a base64 string of at most ``max_bytes`` decoded bytes."""
    return Field(
        max_length=4 * math.ceil(max_bytes / 3),
        pattern=_B64_PATTERN,
        description=f"{description} (base64, at most {max_bytes} bytes)",
        json_schema_extra={"contentEncoding": "base64"},
    )


Serial = Annotated[
    str, Field(min_length=1, max_length=64, pattern=SERIAL_PATTERN, description="device serial")
]
Name = Annotated[str, Field(min_length=1, max_length=64, pattern=SERIAL_PATTERN)]
OneUseId = Annotated[
    str,
    Field(min_length=8, max_length=64, pattern=_ID_PATTERN,
          description="the one-use id the previous step answered with"),
]

# Size limits of the TPM's structures, as device.attestation enforces them (bytes).
_MAX_CERT = 8192
_MAX_PUBLIC = 1024
_MAX_ATTEST = 1024
_MAX_SIGNATURE = 72
_MAX_SECRET = 128  # the activated credential (make_challenge draws 32 bytes)
_MAX_SPKI = 512  # DER SubjectPublicKeyInfo of a P-256 key is 91 bytes
#: an ECDSA signature over the nonce as DER; room for a non-minimal encoding, which
#: the signature check (not the schema) refuses
_MAX_POP_SIGNATURE = 192

CertB64 = Annotated[str, _b64(_MAX_CERT, "certificate, DER")]
PublicB64 = Annotated[str, _b64(_MAX_PUBLIC, "TPM2B_PUBLIC")]
AttestB64 = Annotated[str, _b64(_MAX_ATTEST, "TPMS_ATTEST")]
TpmSignatureB64 = Annotated[str, _b64(_MAX_SIGNATURE, "DER ECDSA signature")]
SecretB64 = Annotated[str, _b64(_MAX_SECRET, "the activated credential")]
SpkiB64 = Annotated[str, _b64(_MAX_SPKI, "P-256 public key, DER SubjectPublicKeyInfo")]
PopSignatureB64 = Annotated[
    str, _b64(_MAX_POP_SIGNATURE, "ECDSA P-256 signature over the nonce, DER")
]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class _StrictOpen(BaseModel):
    """Strict types, unknown fields ignored (see the module docstring)."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


# -- requests -----------------------------------------------------------------------
class TpmStart(_Strict):
    """Step 1 of a TPM-attested enrollment (operator)."""

    serial: Serial
    kind: Literal["device", "broker"] = "device"
    device_class: Name = "default"
    reenroll: bool = Field(
        False, description="replace an enrolled device (this revokes its credentials)"
    )


class WitnessedStart(TpmStart):
    """Step 1 of a factory-witnessed (PKCS#11) enrollment (operator)."""

    public_key: SpkiB64
    key_backend: Literal["pkcs11", "insecure-software"] = "pkcs11"


class Evidence(_Strict):
    """What the device's TPM produced for the service's nonce (device.attestation)."""

    ek_certificate: CertB64
    ek_public: PublicB64
    ak_public: PublicB64
    key_public: PublicB64
    certify_attest: AttestB64
    certify_signature: TpmSignatureB64
    ek_intermediates: list[CertB64] = Field(
        default_factory=list, max_length=MAX_INTERMEDIATES
    )


class TpmEvidenceRequest(_StrictOpen):
    enrollment_id: OneUseId
    evidence: Evidence


class TpmFinish(_StrictOpen):
    enrollment_id: OneUseId
    secret: SecretB64


class WitnessedFinish(_StrictOpen):
    enrollment_id: OneUseId
    signature: PopSignatureB64


class RenewChallengeRequest(_StrictOpen):
    serial: Serial


class RenewRequest(_StrictOpen):
    renewal_id: OneUseId
    signature: PopSignatureB64


class RevokeRequest(_Strict):
    reason: str = Field("unspecified", max_length=200)


# -- queries ------------------------------------------------------------------------
# Query strings are text: numbers are parsed from it (lax), then bounded. A parameter
# the endpoint does not know is refused (a misspelt ?sinse= must not mean since=0).
class RevocationsQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    since: int = Field(
        0, ge=-(2**63), le=2**63 - 1, description="answer events with an id above this one"
    )
    wait: float = Field(
        0.0, ge=0.0, le=60.0, allow_inf_nan=False,
        description="seconds to wait for an event when there is none yet (long poll)",
    )


class DevicesQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    status: Literal["active", "revoked"] | None = Field(None, description="only these devices")


# -- answers ------------------------------------------------------------------------
class Error(BaseModel):
    """Every refusal: the reason's name, its stable number (structauth.errors.Reason)
    and one line saying what is wrong."""

    error: str
    code: int
    detail: str


class Nonce(BaseModel):
    enrollment_id: str
    nonce: str = Field(json_schema_extra={"contentEncoding": "base64"})


class ActivationChallenge(BaseModel):
    credential_blob: str = Field(json_schema_extra={"contentEncoding": "base64"})
    encrypted_secret: str = Field(json_schema_extra={"contentEncoding": "base64"})


class Challenge(BaseModel):
    enrollment_id: str
    challenge: ActivationChallenge


class RenewalNonce(BaseModel):
    renewal_id: str
    nonce: str = Field(json_schema_extra={"contentEncoding": "base64"})


class Revocation(BaseModel):
    id: int
    serial: str
    identity: str
    cert_serials: list[str]
    reason: str
    revoked_at: dt.datetime
    revoked_by: str


class Revocations(BaseModel):
    events: list[Revocation]


class Issued(BaseModel):
    serial: str
    identity: str
    attestation: Literal["tpm-attested", "factory-witnessed"]
    operational_credential: str = Field(description="PEM")
    operational_not_after: dt.datetime | None
    bundle: str = Field(description="trust bundle, PEM")
    enrollment_credential: str | None = Field(
        None, description="PEM; absent from a renewal"
    )
    revoked_previous: Revocation | None = Field(
        None, description="the revocation a re-enrollment made"
    )


class Device(BaseModel):
    serial: str
    identity: str
    kind: Literal["device", "broker"]
    status: Literal["active", "revoked"]
    key_backend: str
    attestation: Literal["tpm-attested", "factory-witnessed"]
    ek_fingerprint: str | None
    device_class: str
    enrolled_at: dt.datetime
    updated_at: dt.datetime
    enrolled_by: str
    enrollment_cert_serial: str
    operational_cert_serial: str
    operational_not_after: dt.datetime | None
    public_key: str = Field(json_schema_extra={"contentEncoding": "base64"})
    ak_public: str | None = Field(json_schema_extra={"contentEncoding": "base64"})


class Devices(BaseModel):
    devices: list[Device]


class Health(BaseModel):
    status: Literal["ok"]
    trust_domain: str
