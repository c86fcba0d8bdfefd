"""The TPM enrollment records both ends exchange: :class:`TpmEvidence` (device ->
service) and :class:`ActivationChallenge` (service -> device).

Defined once, here in ``hw`` (they are TPM structures: unmarshalled with tpm2-pytss),
so the device (``device.attestation``, which builds and answers them) and the
provisioning service (``provisioning.attestation``, which checks and issues them) share
them without one role importing the other.

:meth:`TpmEvidence.to_json` / :meth:`~TpmEvidence.from_json` and
:meth:`ActivationChallenge.to_json` / :meth:`~ActivationChallenge.from_json` carry
``bytes`` fields as canonical standard base64 with padding. Both validate on
construction (sizes, exact TPM unmarshalling with no trailing bytes, DER that parses),
so a service never works on a half-parsed structure; anything malformed raises
``EnrollmentError(ATTESTATION_FAILED)`` whose detail names the field.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from tpm2_pytss import (
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_PUBLIC,
    TPMS_ATTEST,
)

from structauth.errors import EnrollmentError, Reason

__all__ = ["MAX_INTERMEDIATES", "ActivationChallenge", "TpmEvidence"]

#: at most this many intermediate certificates travel with the EK certificate
MAX_INTERMEDIATES = 4

_MAX_CERT = 8192  # DER certificate
_MAX_PUBLIC = 1024  # TPM2B_PUBLIC (an RSA-4096 area with a SHA-512 policy is ~600 bytes)
_MAX_ATTEST = 1024  # TPMS_ATTEST
_MAX_SIGNATURE = 72  # DER ECDSA P-256
_MAX_CREDENTIAL = 1024  # TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET

#: field -> (what it holds, size limit in bytes), in wire order
_EVIDENCE_FIELDS = {
    "ek_certificate": ("certificate", _MAX_CERT),
    "ek_public": ("public", _MAX_PUBLIC),
    "ak_public": ("public", _MAX_PUBLIC),
    "key_public": ("public", _MAX_PUBLIC),
    "certify_attest": ("attest", _MAX_ATTEST),
    "certify_signature": ("signature", _MAX_SIGNATURE),
}


def _fail(field: str, problem: str) -> EnrollmentError:
    return EnrollmentError(f"field {field!r} {problem}", Reason.ATTESTATION_FAILED)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: Any, field: str, limit: int) -> bytes:
    if not isinstance(value, str):
        raise _fail(field, f"must be a base64 string, not {type(value).__name__}")
    if len(value) > 4 * (limit // 3 + 1):
        raise _fail(field, f"is longer than {limit} bytes")
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise _fail(field, "is not valid base64") from None
    if _b64(raw) != value:  # one encoding per value: no stray padding bits
        raise _fail(field, "is not canonical base64")
    return raw


def _check_bytes(value: Any, field: str, limit: int) -> bytes:
    if not isinstance(value, bytes):
        raise _fail(field, f"must be bytes, not {type(value).__name__}")
    if not value:
        raise _fail(field, "is empty")
    if len(value) > limit:
        raise _fail(field, f"is longer than {limit} bytes")
    return value


def _check_tpm(value: bytes, field: str, struct: Any, label: str) -> Any:
    """Unmarshal exactly: no short buffer, no trailing bytes, one encoding."""
    try:
        parsed, used = struct.unmarshal(value)
    except Exception:
        raise _fail(field, f"is not a marshalled {label} (truncated or corrupt)") from None
    if used != len(value):
        raise _fail(field, f"has {len(value) - used} bytes after the {label}")
    if bytes(parsed.marshal()) != value:
        raise _fail(field, f"is not a canonical {label}")
    return parsed


def _check_certificate(value: bytes, field: str) -> bytes:
    try:
        x509.load_der_x509_certificate(value)
    except Exception:
        raise _fail(field, "is not a DER X.509 certificate (truncated or corrupt)") from None
    return value


def _check_field(kind: str, value: bytes, field: str) -> bytes:
    if kind == "certificate":
        return _check_certificate(value, field)
    if kind == "public":
        public = _check_tpm(value, field, TPM2B_PUBLIC, "TPM2B_PUBLIC")
        if len(value) <= 2 or int(public.publicArea.type) == 0:
            raise _fail(field, "is an empty TPM2B_PUBLIC")
        return value
    if kind == "attest":
        _check_tpm(value, field, TPMS_ATTEST, "TPMS_ATTEST")
        return value
    if kind == "signature":
        try:
            r, s = decode_dss_signature(value)
            canonical = encode_dss_signature(r, s) == value
        except Exception:
            raise _fail(field, "is not a DER ECDSA signature (truncated or corrupt)") from None
        if not canonical:
            raise _fail(field, "is not a canonical DER ECDSA signature")
        return value
    raise AssertionError(kind)  # pragma: no cover


def _object(data: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise EnrollmentError(
            f"{what} must be a JSON object, not {type(data).__name__}", Reason.ATTESTATION_FAILED
        )
    return data


def _known_fields(data: Mapping[str, Any], known: Sequence[str], what: str) -> None:
    for key in data:
        if key not in known:
            raise EnrollmentError(f"unknown field {key!r} in {what}", Reason.ATTESTATION_FAILED)


def _required(data: Mapping[str, Any], field: str) -> Any:
    if field not in data:
        raise _fail(field, "is missing")
    return data[field]


@dataclass(frozen=True)
class TpmEvidence:
    """What a device sends to enroll with its TPM; validated on construction.

    ``ek_certificate`` (DER), ``ek_intermediates`` (DER certificates between the EK
    certificate and the TPM maker's root, if the device has them), ``ek_public``,
    ``ak_public`` and ``key_public`` (marshalled TPM2B_PUBLIC), ``certify_attest`` (the
    marshalled TPMS_ATTEST of TPM2_Certify) and ``certify_signature`` (the AK's DER ECDSA
    signature over it).

    JSON: ``{"ek_certificate": b64, "ek_intermediates": [b64, ...], "ek_public": b64,
    "ak_public": b64, "key_public": b64, "certify_attest": b64, "certify_signature": b64}``
    (``ek_intermediates`` may be absent).
    """

    ek_certificate: bytes
    ek_public: bytes
    ak_public: bytes
    key_public: bytes
    certify_attest: bytes
    certify_signature: bytes
    ek_intermediates: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        for field, (kind, limit) in _EVIDENCE_FIELDS.items():
            _check_field(kind, _check_bytes(getattr(self, field), field, limit), field)
        chain = self.ek_intermediates
        if not isinstance(chain, (tuple, list)):
            raise _fail("ek_intermediates", "must be a sequence of DER certificates")
        if len(chain) > MAX_INTERMEDIATES:
            raise _fail("ek_intermediates", f"holds more than {MAX_INTERMEDIATES} certificates")
        for i, cert in enumerate(chain):
            name = f"ek_intermediates[{i}]"
            _check_certificate(_check_bytes(cert, name, _MAX_CERT), name)
        object.__setattr__(self, "ek_intermediates", tuple(chain))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {field: _b64(getattr(self, field)) for field in _EVIDENCE_FIELDS}
        out["ek_intermediates"] = [_b64(cert) for cert in self.ek_intermediates]
        return out

    @classmethod
    def from_json(cls, data: Any) -> TpmEvidence:
        data = _object(data, "TPM evidence")
        _known_fields(data, [f.name for f in fields(cls)], "TPM evidence")
        values = {
            field: _unb64(_required(data, field), field, limit)
            for field, (_, limit) in _EVIDENCE_FIELDS.items()
        }
        chain = data.get("ek_intermediates", [])
        if not isinstance(chain, list):
            raise _fail("ek_intermediates", "must be a list of base64 strings")
        if len(chain) > MAX_INTERMEDIATES:
            raise _fail("ek_intermediates", f"holds more than {MAX_INTERMEDIATES} certificates")
        intermediates = tuple(
            _unb64(item, f"ek_intermediates[{i}]", _MAX_CERT) for i, item in enumerate(chain)
        )
        return cls(**values, ek_intermediates=intermediates)


@dataclass(frozen=True)
class ActivationChallenge:
    """MakeCredential output: marshalled TPM2B_ID_OBJECT and TPM2B_ENCRYPTED_SECRET.

    JSON: ``{"credential_blob": b64, "encrypted_secret": b64}``.
    """

    credential_blob: bytes
    encrypted_secret: bytes

    def __post_init__(self) -> None:
        for field, struct in (
            ("credential_blob", TPM2B_ID_OBJECT),
            ("encrypted_secret", TPM2B_ENCRYPTED_SECRET),
        ):
            value = _check_bytes(getattr(self, field), field, _MAX_CREDENTIAL)
            _check_tpm(value, field, struct, struct.__name__)
            if len(value) <= 2:
                raise _fail(field, f"is an empty {struct.__name__}")

    def to_json(self) -> dict[str, Any]:
        return {
            "credential_blob": _b64(self.credential_blob),
            "encrypted_secret": _b64(self.encrypted_secret),
        }

    @classmethod
    def from_json(cls, data: Any) -> ActivationChallenge:
        data = _object(data, "activation challenge")
        _known_fields(data, ("credential_blob", "encrypted_secret"), "activation challenge")
        return cls(
            credential_blob=_unb64(
                _required(data, "credential_blob"), "credential_blob", _MAX_CREDENTIAL
            ),
            encrypted_secret=_unb64(
                _required(data, "encrypted_secret"), "encrypted_secret", _MAX_CREDENTIAL
            ),
        )
