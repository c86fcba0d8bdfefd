"""The one error hierarchy of Tessera.

Every error carries a :class:`Reason`, a stable numeric code that adapters put on the
wire (MQTT reason strings, CoAP diagnostics, audit records) and tests assert on.
Verification raises one of these; it never returns a bool.
"""

from __future__ import annotations

from enum import IntEnum


class Reason(IntEnum):
    """Stable reason codes. Never renumber; only append."""

    # 1xx: malformed input from a peer
    MALFORMED = 100
    BAD_VERSION = 101
    UNKNOWN_SUITE = 102
    TRUNCATED = 103
    TRAILING_BYTES = 104
    # 2xx: cryptographic proof failed
    BAD_SIGNATURE = 200
    BAD_CONFIRMATION = 201
    BAD_TAG = 202
    BAD_KEY_SHARE = 203
    # 3xx: freshness
    REPLAYED = 300
    EPOCH_OUT_OF_WINDOW = 301
    SESSION_EXPIRED = 302
    SEQUENCE_EXHAUSTED = 303
    HANDSHAKE_REPLAYED = 304
    UNKNOWN_SESSION = 305
    # 4xx: credentials and identity
    UNKNOWN_AUTHORITY = 400
    CREDENTIAL_EXPIRED = 401
    CREDENTIAL_NOT_YET_VALID = 402
    CREDENTIAL_REVOKED = 403
    WRONG_IDENTITY = 404
    BAD_CREDENTIAL = 405
    # 5xx: local state misuse
    INVALID_STATE = 500
    BAD_PARAMETERS = 501
    # 6xx: key backends (TPM, PKCS#11)
    KEY_NOT_FOUND = 600
    BACKEND_UNAVAILABLE = 601
    WRONG_PIN = 602
    TOKEN_LOCKED = 603
    BACKEND_FAILURE = 604
    BAD_CONFIGURATION = 605
    # 7xx: enrollment, registry and the provisioning service
    ATTESTATION_FAILED = 700
    UNKNOWN_TPM_MAKER = 701
    ALREADY_ENROLLED = 702
    NOT_ENROLLED = 703
    ACTIVATION_FAILED = 704
    CERTIFY_MISMATCH = 705
    KEY_NOT_IN_TPM = 706
    NOT_AUTHORIZED = 707
    ENROLLMENT_EXPIRED = 708
    REGISTRY_FAILURE = 709
    DEVICE_REVOKED = 710


class TesseraError(Exception):
    """Base of every error Tessera raises on purpose."""

    default_reason: Reason = Reason.MALFORMED

    def __init__(self, detail: str, reason: Reason | None = None) -> None:
        self.reason: Reason = reason if reason is not None else self.default_reason
        self.detail = detail
        # formatted lazily in __str__: rejecting a replay must stay cheap under a flood
        super().__init__(detail)

    def __str__(self) -> str:
        return f"{self.detail} [{self.reason.name.lower()}]"


class ProtocolError(TesseraError):
    """The peer sent something we refuse (malformed, forged, replayed, stale)."""


class MalformedMessage(ProtocolError):
    default_reason = Reason.MALFORMED


class VerificationFailed(ProtocolError):
    default_reason = Reason.BAD_TAG


class ReplayDetected(ProtocolError):
    default_reason = Reason.REPLAYED


class StaleMessage(ProtocolError):
    default_reason = Reason.EPOCH_OUT_OF_WINDOW


class SessionExpiredError(ProtocolError):
    default_reason = Reason.SESSION_EXPIRED


class CredentialError(ProtocolError):
    """A credential failed validation (chain, time, revocation, identity)."""

    default_reason = Reason.BAD_CREDENTIAL


class StateError(TesseraError):
    """Local misuse: an object was driven in the wrong state or with bad parameters."""

    default_reason = Reason.INVALID_STATE


class KeyBackendError(TesseraError):
    """A TPM or PKCS#11 operation failed; carries the backend's own message in detail."""

    default_reason = Reason.BACKEND_FAILURE


class ConfigurationError(TesseraError):
    default_reason = Reason.BAD_CONFIGURATION


class EnrollmentError(TesseraError):
    """An enrollment, renewal or attestation was refused; nothing was recorded."""

    default_reason = Reason.ATTESTATION_FAILED


class RegistryError(TesseraError):
    """The registry could not complete a transaction; it was rolled back."""

    default_reason = Reason.REGISTRY_FAILURE


class AuthorizationError(TesseraError):
    """The caller is not allowed to do this (operator or device authentication)."""

    default_reason = Reason.NOT_AUTHORIZED
