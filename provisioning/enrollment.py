"""Enrollment, renewal and revocation: the service's logic, without HTTP.

Every operation that records something is one registry transaction: an enrollment is
either fully recorded with its credentials or not at all. Multi-step protocols keep
their state between steps in the registry's one-shot pending table, so a service
restart between two round trips loses nothing and a step cannot be replayed.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from hw.tpm_evidence import TpmEvidence
from provisioning.attestation import (
    TpmMakerRoots,
    check_activation,
    make_challenge,
    verify_evidence,
)
from provisioning.authority import FleetAuthority
from provisioning.registry import DeviceRecord, Registry, RevocationEvent
from structauth.credentials import Identity
from structauth.errors import EnrollmentError, Reason
from structauth.possession import LABEL_ENROLL, LABEL_RENEW, possession_digest

_ECDSA = ec.ECDSA(Prehashed(hashes.SHA256()))
_SERIAL_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
KINDS = ("device", "broker")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(value: Any, field: str) -> bytes:
    if not isinstance(value, str):
        raise EnrollmentError(f"field {field!r} must be a base64 string", Reason.ATTESTATION_FAILED)
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise EnrollmentError(
            f"field {field!r} is not valid base64", Reason.ATTESTATION_FAILED
        ) from None


def check_serial(serial: Any) -> str:
    if (
        not isinstance(serial, str)
        or not 1 <= len(serial) <= 64
        or not set(serial) <= _SERIAL_CHARS
    ):
        raise EnrollmentError(
            "serial must be 1-64 characters of letters, digits, '.', '_' or '-'",
            Reason.ATTESTATION_FAILED,
        )
    return serial


def check_name(value: Any, field: str, default: str) -> str:
    if value is None:
        return default
    if not isinstance(value, str) or not 1 <= len(value) <= 64 or not set(value) <= _SERIAL_CHARS:
        raise EnrollmentError(
            f"field {field!r} must be 1-64 characters of [A-Za-z0-9._-]", Reason.ATTESTATION_FAILED
        )
    return value


@dataclass(frozen=True)
class Issued:
    """What a successful enrollment or renewal hands back to the device."""

    record: DeviceRecord
    enrollment_pem: bytes | None
    operational_pem: bytes
    bundle_pem: bytes
    revoked_previous: RevocationEvent | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "serial": self.record.serial,
            "identity": self.record.identity,
            "attestation": self.record.attestation,
            "operational_credential": self.operational_pem.decode(),
            "operational_not_after": _iso(self.record.operational_not_after),
            "bundle": self.bundle_pem.decode(),
        }
        if self.enrollment_pem is not None:
            out["enrollment_credential"] = self.enrollment_pem.decode()
        return out


def _iso(t: dt.datetime | None) -> str | None:
    return t.isoformat() if t is not None else None


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _spki(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _load_p256(der: bytes, field: str) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, TypeError):
        raise EnrollmentError(
            f"field {field!r} is not a DER public key", Reason.ATTESTATION_FAILED
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise EnrollmentError(f"field {field!r} must be an EC P-256 key", Reason.ATTESTATION_FAILED)
    return key


def _check_pop(key: ec.EllipticCurvePublicKey, signature: bytes, digest: bytes) -> None:
    try:
        key.verify(signature, digest, _ECDSA)
    except (InvalidSignature, ValueError):
        raise EnrollmentError(
            "proof of possession failed: the signature does not verify with the device's key",
            Reason.ATTESTATION_FAILED,
        ) from None


class EnrollmentService:
    """Enrollment (TPM-attested and factory-witnessed), renewal and revocation."""

    def __init__(
        self,
        authority: FleetAuthority,
        registry: Registry,
        maker_roots: TpmMakerRoots | None,
        *,
        operational_lifetime: dt.timedelta = dt.timedelta(hours=24),
        enrollment_lifetime: dt.timedelta = dt.timedelta(days=3650),
        pending_ttl: dt.timedelta = dt.timedelta(minutes=5),
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        if operational_lifetime < dt.timedelta(minutes=1):
            raise ValueError("operational credentials must live at least a minute")
        self.authority = authority
        self.registry = registry
        self.maker_roots = maker_roots
        self.operational_lifetime = operational_lifetime
        self.enrollment_lifetime = enrollment_lifetime
        self.pending_ttl = pending_ttl
        self.clock = clock

    # -- pending state -----------------------------------------------------------
    def _put(self, stage: str, state: dict[str, Any]) -> str:
        token = secrets.token_urlsafe(24)
        state["stage"] = stage
        self.registry.put_pending(
            token, json.dumps(state).encode(), self.clock() + self.pending_ttl
        )
        return token

    def _take(self, token: Any, stage: str) -> dict[str, Any]:
        if not isinstance(token, str) or not 8 <= len(token) <= 64:
            raise EnrollmentError("missing or malformed enrollment id", Reason.ENROLLMENT_EXPIRED)
        raw = self.registry.take_pending(token, self.clock())
        if raw is None:
            raise EnrollmentError(
                "unknown, used or expired enrollment id; start again", Reason.ENROLLMENT_EXPIRED
            )
        state: dict[str, Any] = json.loads(raw)
        if state.get("stage") != stage:
            raise EnrollmentError(
                "enrollment id used for the wrong step; start again", Reason.ENROLLMENT_EXPIRED
            )
        return state

    def _identity(self, kind: str, serial: str) -> Identity:
        if kind not in KINDS:
            raise EnrollmentError("kind must be 'device' or 'broker'", Reason.ATTESTATION_FAILED)
        return Identity.parse(f"spiffe://{self.authority.trust_domain}/{kind}/{serial}")

    def _refuse_duplicate(self, serial: str, reenroll: bool) -> None:
        # Checked early for a clear answer; the registry checks again inside the
        # transaction that records the device, which is what actually decides.
        if not reenroll and self.registry.get(serial) is not None:
            raise EnrollmentError(
                f"device {serial} is already enrolled; use --reenroll to replace it "
                "(this revokes its current credentials)",
                Reason.ALREADY_ENROLLED,
            )

    def _begin(self, request: dict[str, Any], operator: str) -> dict[str, Any]:
        """The operator's first step, common to both kinds of enrollment: check the
        names, refuse a duplicate, and draw the nonce the device must answer."""
        serial = check_serial(request.get("serial"))
        kind = check_name(request.get("kind"), "kind", "device")
        self._identity(kind, serial)
        reenroll = request.get("reenroll", False)
        if type(reenroll) is not bool:  # "false" or 1 must not mean anything
            raise EnrollmentError(
                "field 'reenroll' must be true or false", Reason.ATTESTATION_FAILED
            )
        self._refuse_duplicate(serial, reenroll)
        return {
            "serial": serial,
            "kind": kind,
            "reenroll": reenroll,
            "operator": operator,
            "device_class": check_name(request.get("device_class"), "device_class", "default"),
            "nonce": b64(secrets.token_bytes(32)),
        }

    # -- TPM-attested enrollment ------------------------------------------------
    def tpm_start(self, request: dict[str, Any], *, operator: str) -> dict[str, Any]:
        """Step 1: the operator names the device; the service answers with the
        nonce the TPM must put in its Certify (so a captured Certify is useless)."""
        state = self._begin(request, operator)
        if self.maker_roots is None:
            raise EnrollmentError(
                "this service has no TPM maker roots configured; TPM enrollment is disabled",
                Reason.UNKNOWN_TPM_MAKER,
            )
        return {"enrollment_id": self._put("tpm-evidence", state), "nonce": state["nonce"]}

    def tpm_evidence(self, request: dict[str, Any]) -> dict[str, Any]:
        """Step 2: check the TPM evidence and send the activation challenge."""
        state = self._take(request.get("enrollment_id"), "tpm-evidence")
        roots = self.maker_roots  # a SIGHUP reload may have removed them since step 1
        if roots is None:
            raise EnrollmentError(
                "this service has no TPM maker roots configured any more (reloaded since "
                "this enrollment started); add them with 'tessera roots add' and start over",
                Reason.UNKNOWN_TPM_MAKER,
            )
        evidence_json = request.get("evidence")
        if not isinstance(evidence_json, dict):
            raise EnrollmentError("field 'evidence' must be an object", Reason.ATTESTATION_FAILED)
        evidence = TpmEvidence.from_json(evidence_json)
        verified = verify_evidence(
            evidence,
            roots,
            expected_qualifying_data=unb64(state["nonce"], "nonce"),
            now=self.clock(),
        )
        challenge, secret = make_challenge(verified)
        state.update(
            {
                "secret": b64(secret),
                "key": b64(_spki(verified.key)),
                "ek_fingerprint": verified.ek_fingerprint,
                # the AK whose name the activation challenge is sealed to: recorded with
                # the device once activation proves it (brokers check quotes against it)
                "ak_public": b64(evidence.ak_public),
            }
        )
        token = self._put("tpm-activation", state)
        return {"enrollment_id": token, "challenge": challenge.to_json()}

    def tpm_finish(self, request: dict[str, Any]) -> Issued:
        """Step 3: the activated secret proves the AK (and so the device key it
        certified) lives in the TPM whose EK certificate we checked."""
        state = self._take(request.get("enrollment_id"), "tpm-activation")
        check_activation(unb64(state["secret"], "secret"), unb64(request.get("secret"), "secret"))
        return self._record(
            state,
            key_backend="tpm",
            attestation="tpm-attested",
            ek_fingerprint=state["ek_fingerprint"],
            ak_public=unb64(state["ak_public"], "ak_public") if "ak_public" in state else None,
        )

    # -- factory-witnessed enrollment (PKCS#11) ---------------------------------
    def witnessed_start(self, request: dict[str, Any], *, operator: str) -> dict[str, Any]:
        state = self._begin(request, operator)
        key = _load_p256(unb64(request.get("public_key"), "public_key"), "public_key")
        backend = check_name(request.get("key_backend"), "key_backend", "pkcs11")
        if backend not in ("pkcs11", "insecure-software"):
            raise EnrollmentError(
                "key_backend must be pkcs11 (or insecure-software in development)",
                Reason.ATTESTATION_FAILED,
            )
        state.update({"key": b64(_spki(key)), "key_backend": backend})
        return {"enrollment_id": self._put("witnessed-pop", state), "nonce": state["nonce"]}

    def witnessed_finish(self, request: dict[str, Any]) -> Issued:
        state = self._take(request.get("enrollment_id"), "witnessed-pop")
        key = _load_p256(unb64(state["key"], "key"), "key")
        _check_pop(
            key,
            unb64(request.get("signature"), "signature"),
            possession_digest(LABEL_ENROLL, unb64(state["nonce"], "nonce"), state["serial"]),
        )
        return self._record(
            state,
            key_backend=state["key_backend"],
            attestation="factory-witnessed",
            ek_fingerprint=None,
        )

    # -- recording ---------------------------------------------------------------
    def _record(
        self,
        state: dict[str, Any],
        *,
        key_backend: str,
        attestation: str,
        ek_fingerprint: str | None,
        ak_public: bytes | None = None,
    ) -> Issued:
        serial, kind = state["serial"], state["kind"]
        identity = self._identity(kind, serial)
        key = _load_p256(unb64(state["key"], "key"), "key")
        now = self.clock()
        enrollment = self.authority.issue(
            key,
            identity,
            not_before=now - dt.timedelta(minutes=5),
            not_after=now + self.enrollment_lifetime,
            profile="enrollment",
        )
        operational = self.authority.issue(
            key,
            identity,
            not_before=now - dt.timedelta(minutes=5),
            not_after=now + self.operational_lifetime,
            profile="operational",
        )
        record = DeviceRecord(
            serial=serial,
            identity=identity.uri,
            kind=kind,
            public_key_der=_spki(key),
            key_backend=key_backend,
            attestation=attestation,
            ek_fingerprint=ek_fingerprint,
            device_class=state["device_class"],
            status="active",
            enrolled_at=now,
            updated_at=now,
            enrolled_by=state["operator"],
            enrollment_cert_serial=format(enrollment.serial_number, "x"),
            operational_cert_serial=format(operational.serial_number, "x"),
            operational_not_after=operational.not_valid_after_utc,
            enrollment_not_after=enrollment.not_valid_after_utc,
            ak_public=ak_public,
        )
        reenroll = state.get("reenroll", False)
        if type(reenroll) is not bool:  # never truthiness: "false" must not re-enroll
            raise EnrollmentError(
                "field 'reenroll' must be true or false", Reason.ATTESTATION_FAILED
            )
        event = self.registry.enroll(record, reenroll=reenroll, revoked_by=state["operator"])
        return Issued(
            record, _pem(enrollment), _pem(operational), self.authority.bundle_pem(), event
        )

    # -- renewal -----------------------------------------------------------------
    def renew_challenge(self, request: dict[str, Any]) -> dict[str, Any]:
        serial = check_serial(request.get("serial"))
        record = self._active(serial)
        nonce = secrets.token_bytes(32)
        token = self._put("renewal", {"serial": record.serial, "nonce": b64(nonce)})
        return {"renewal_id": token, "nonce": b64(nonce)}

    def renew(self, request: dict[str, Any]) -> Issued:
        """Issue a fresh operational credential to a device that proves it still
        holds its enrolled hardware key."""
        state = self._take(request.get("renewal_id"), "renewal")
        record = self._active(state["serial"])
        key = _load_p256(record.public_key_der, "public_key")
        _check_pop(
            key,
            unb64(request.get("signature"), "signature"),
            possession_digest(LABEL_RENEW, unb64(state["nonce"], "nonce"), record.serial),
        )
        now = self.clock()
        cert = self.authority.issue(
            key,
            Identity.parse(record.identity),
            not_before=now - dt.timedelta(minutes=5),
            not_after=now + self.operational_lifetime,
            profile="operational",
        )
        self.registry.record_renewal(
            record.serial, format(cert.serial_number, "x"), cert.not_valid_after_utc, now
        )
        renewed = self.registry.get(record.serial) or record
        return Issued(renewed, None, _pem(cert), self.authority.bundle_pem())

    def _active(self, serial: str) -> DeviceRecord:
        record = self.registry.get(serial)
        if record is None:
            raise EnrollmentError(f"device {serial} is not enrolled", Reason.NOT_ENROLLED)
        if record.status != "active":
            raise EnrollmentError(f"device {serial} is revoked", Reason.DEVICE_REVOKED)
        return record

    # -- revocation --------------------------------------------------------------
    def revoke(self, serial: str, *, reason: str, operator: str) -> RevocationEvent:
        return self.registry.revoke(
            check_serial(serial), reason=reason, by=operator, at=self.clock()
        )

    def crl(self) -> x509.CertificateRevocationList:
        now = self.clock()
        revoked: Sequence[tuple[int, dt.datetime]] = [
            (int(serial, 16), at) for serial, at in self.registry.revoked_cert_serials(now)
        ]
        return self.authority.sign_crl(
            revoked,
            now=now,
            next_update=now + dt.timedelta(hours=1),
            crl_number=self.registry.next_crl_number(),
        )
