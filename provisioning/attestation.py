"""TPM enrollment attestation, service side: verify the evidence, challenge the EK.

Modelled on Azure DPS TPM attestation and SPIRE's TPM attestors. The device (see
``device.attestation``) sends :class:`TpmEvidence` produced with the service's nonce;
:func:`verify_evidence` checks, in this order and each with its own reason:

1. the EK certificate chains to a configured TPM maker root and is valid now
   (``UNKNOWN_TPM_MAKER``);
2. ``ek_public`` carries the certificate's key and an EK's attributes
   (``ATTESTATION_FAILED``);
3. ``ak_public`` is a restricted ECC P-256 signing key generated in a TPM
   (``ATTESTATION_FAILED``);
4. the AK signed a TPM-generated Certify of exactly ``key_public`` with this
   enrollment's nonce as extraData (``CERTIFY_MISMATCH``);
5. ``key_public`` is a P-256 signing key generated in the TPM and unable to leave it
   (``KEY_NOT_IN_TPM``).

Steps 3 to 5 take the attributes from public areas the device sent. They become facts
only with credential activation: :func:`make_challenge` seals a fresh secret to the
certified EK and the AK's *name* (a hash over the AK's whole public area, attributes
included), and the TPM releases it only if that exact AK is loaded in the TPM that holds
that EK. A restricted AK signs only structures the TPM produced, so its Certify is the
TPM's own word on the device key's attributes. Until :func:`check_activation` passes, a
:class:`VerifiedEvidence` is a claim, not a fact: record nothing before it.

The wire records, :class:`TpmEvidence` and :class:`ActivationChallenge` (JSON with
base64 bytes fields), are defined once, in ``hw.tpm_evidence`` (shared with the device), and
re-exported here; they validate their fields on construction, so ``verify_evidence``
starts from well-formed structures.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from tpm2_pytss import (
    TPM2_ALG,
    TPM2_ECC,
    TPM2_GENERATED,
    TPM2_ST,
    TPM2B_NAME,
    TPM2B_PUBLIC,
    TPMA_OBJECT,
    TPMS_ATTEST,
    TPMT_PUBLIC,
)
from tpm2_pytss.utils import make_credential

from hw.tpm_evidence import MAX_INTERMEDIATES, ActivationChallenge, TpmEvidence
from structauth.errors import ConfigurationError, EnrollmentError, Reason, StateError

__all__ = [
    "MIN_QUALIFYING_DATA",
    "SECRET_SIZE",
    "ActivationChallenge",
    "TpmEvidence",
    "TpmMakerRoots",
    "VerifiedEvidence",
    "check_activation",
    "make_challenge",
    "tpm_name",
    "verify_evidence",
]

#: size of the activation secret
SECRET_SIZE = 32
#: the shortest nonce the service may use as qualifying data
MIN_QUALIFYING_DATA = 16
_HASHES = {TPM2_ALG.SHA256: "sha256", TPM2_ALG.SHA384: "sha384", TPM2_ALG.SHA512: "sha512"}
_CURVES: dict[int, ec.EllipticCurve] = {
    TPM2_ECC.NIST_P256: ec.SECP256R1(),
    TPM2_ECC.NIST_P384: ec.SECP384R1(),
    TPM2_ECC.NIST_P521: ec.SECP521R1(),
}
_ATTRIBUTE_NAMES = (
    (TPMA_OBJECT.FIXEDTPM, "fixedTPM"),
    (TPMA_OBJECT.FIXEDPARENT, "fixedParent"),
    (TPMA_OBJECT.SENSITIVEDATAORIGIN, "sensitiveDataOrigin"),
    (TPMA_OBJECT.RESTRICTED, "restricted"),
    (TPMA_OBJECT.DECRYPT, "decrypt"),
    (TPMA_OBJECT.SIGN_ENCRYPT, "sign"),
)
_IN_TPM = TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN
_EK_REQUIRED = _IN_TPM | TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.DECRYPT
_AK_REQUIRED = _IN_TPM | TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.SIGN_ENCRYPT
_KEY_REQUIRED = _IN_TPM | TPMA_OBJECT.SIGN_ENCRYPT
_STRONG_CERT_HASHES = (hashes.SHA256, hashes.SHA384, hashes.SHA512)


# --------------------------------------------------------------------------------------
# TPM maker roots and the EK certificate chain


def _describe(cert: x509.Certificate) -> str:
    subject = cert.subject.rfc4514_string() or "<empty subject>"
    return f"{subject!r} (serial {cert.serial_number:x})"


def _self_signed(cert: x509.Certificate) -> bool:
    return cert.subject == cert.issuer and _signature_problem(cert, cert) is None


def _signature_problem(cert: x509.Certificate, issuer: x509.Certificate) -> str | None:
    """Why ``issuer``'s key does not verify ``cert``'s signature, or None if it does.

    A direct check over tbsCertificate rather than a strict path validator: EK
    certificates carry critical extensions (a SAN of TPM directoryName attributes,
    subjectDirectoryAttributes) that such validators refuse, and what this step proves
    is only who signed the certificate. SHA-1 and unknown hashes are refused.
    """
    try:
        algorithm = cert.signature_hash_algorithm
    except UnsupportedAlgorithm:
        return f"{_describe(cert)} uses an unsupported signature algorithm"
    if not isinstance(algorithm, _STRONG_CERT_HASHES):
        name = algorithm.name if algorithm is not None else "none"
        return f"{_describe(cert)} is signed with a weak or unknown hash ({name})"
    key = issuer.public_key()
    signed, signer = _describe(cert), _describe(issuer)
    try:
        if isinstance(key, rsa.RSAPublicKey):
            padding = cert.signature_algorithm_parameters
            key.verify(cert.signature, cert.tbs_certificate_bytes, padding, algorithm)  # type: ignore[arg-type]
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(algorithm))
        else:
            return f"the key type of {signer} is not supported"
    except InvalidSignature:
        return f"the signature of {signed} does not verify with the key of {signer}"
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return f"the signature of {signed} cannot be checked with the key of {signer}"
    return None


def _time_problem(cert: x509.Certificate, now: dt.datetime) -> str | None:
    if now < cert.not_valid_before_utc:
        return f"{_describe(cert)} is not valid before {cert.not_valid_before_utc.isoformat()}"
    if now > cert.not_valid_after_utc:
        return f"{_describe(cert)} expired at {cert.not_valid_after_utc.isoformat()}"
    return None


def _ca_problem(cert: x509.Certificate, below: int) -> str | None:
    """Whether ``cert`` may issue a chain with ``below`` intermediates under it."""
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return f"{_describe(cert)} is not a CA (no basicConstraints)"
    except Exception:
        return f"{_describe(cert)} has extensions that cannot be parsed"
    if not constraints.ca:
        return f"{_describe(cert)} is not a CA"
    if constraints.path_length is not None and below > constraints.path_length:
        return f"{_describe(cert)} allows only {constraints.path_length} CAs below it"
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return None
    if not usage.key_cert_sign:
        return f"{_describe(cert)} may not sign certificates (keyUsage)"
    return None


class TpmMakerRoots:
    """The TPM makers this service trusts: root certificates plus known intermediates.

    ``certs`` are trust anchors; ``intermediates`` are CA certificates that link EK
    certificates to them (a device may also send its own in the evidence). Neither kind
    is trusted for anything but EK certificates.
    """

    def __init__(
        self,
        certs: Sequence[x509.Certificate],
        intermediates: Sequence[x509.Certificate] = (),
    ) -> None:
        roots = tuple(certs)
        links = tuple(intermediates)
        if not roots:
            raise ConfigurationError("TpmMakerRoots needs at least one TPM maker root")
        for cert in roots + links:
            if not isinstance(cert, x509.Certificate):
                raise ConfigurationError(
                    f"TPM maker roots must be x509.Certificate objects, not {type(cert).__name__}"
                )
        self.roots = roots
        self.intermediates = links

    @classmethod
    def from_pem_files(cls, paths: Iterable[str | os.PathLike[str]]) -> TpmMakerRoots:
        """Load every certificate in the PEM files: self-signed ones become roots, the
        others intermediates (e.g. ``Swtpm.manufacturer_ca_paths``)."""
        roots: list[x509.Certificate] = []
        links: list[x509.Certificate] = []
        for path in paths:
            try:
                data = Path(path).read_bytes()
            except OSError as exc:
                raise ConfigurationError(
                    f"cannot read TPM maker roots from {path}: {exc}"
                ) from None
            try:
                certs = x509.load_pem_x509_certificates(data)
            except ValueError:
                raise ConfigurationError(f"{path} holds no PEM certificate") from None
            for cert in certs:
                (roots if _self_signed(cert) else links).append(cert)
        if not roots:
            raise ConfigurationError(
                "none of the TPM maker certificates is a self-signed root; "
                "pass the maker's root CA certificate"
            )
        return cls(roots, links)

    def __repr__(self) -> str:
        return f"<TpmMakerRoots {len(self.roots)} roots, {len(self.intermediates)} intermediates>"

    def chain(
        self, ek_cert: x509.Certificate, extra: Sequence[x509.Certificate], now: dt.datetime
    ) -> x509.Certificate:
        """The root that ``ek_cert`` chains to at ``now``; UNKNOWN_TPM_MAKER otherwise."""
        problem = _time_problem(ek_cert, now)
        if problem is not None:
            raise EnrollmentError(f"EK certificate: {problem}", Reason.UNKNOWN_TPM_MAKER)
        pool = self.intermediates + tuple(extra)
        problems: list[str] = []

        def walk(
            cert: x509.Certificate, below: int, seen: frozenset[bytes]
        ) -> x509.Certificate | None:
            # ``below``: intermediates between ``cert``'s issuer and the EK certificate
            candidates = 0
            for root in self.roots:
                if root.subject != cert.issuer:
                    continue
                candidates += 1
                problem = _signature_problem(cert, root) or _time_problem(root, now)
                if problem is None:
                    return root
                problems.append(problem)
            for link in pool:
                fingerprint = link.fingerprint(hashes.SHA256())
                if link.subject != cert.issuer or fingerprint in seen:
                    continue
                candidates += 1
                if len(seen) >= MAX_INTERMEDIATES:
                    problems.append(f"the chain has more than {MAX_INTERMEDIATES} intermediates")
                    return None
                problem = (
                    _signature_problem(cert, link)
                    or _time_problem(link, now)
                    or _ca_problem(link, below)
                )
                if problem is not None:
                    problems.append(problem)
                    continue
                found = walk(link, below + 1, seen | {fingerprint})
                if found is not None:
                    return found
            if not candidates:
                issuer = cert.issuer.rfc4514_string() or "<empty name>"
                problems.append(
                    f"the issuer {issuer!r} of {_describe(cert)} is neither a configured TPM "
                    "maker root nor a known intermediate"
                )
            return None

        root = walk(ek_cert, 0, frozenset())
        if root is not None:
            return root
        raise EnrollmentError(
            "EK certificate does not chain to a configured TPM maker root: "
            + "; ".join(dict.fromkeys(problems)),
            Reason.UNKNOWN_TPM_MAKER,
        )


# --------------------------------------------------------------------------------------
# TPM public areas


def tpm_name(public: bytes) -> bytes:
    """The TPM name of a marshalled TPM2B_PUBLIC: nameAlg || H_nameAlg(TPMT_PUBLIC)."""
    area, used = TPMT_PUBLIC.unmarshal(public[2:])
    if used != len(public) - 2:
        raise ValueError("trailing bytes after the TPMT_PUBLIC")
    hash_name = _HASHES.get(int(area.nameAlg))
    if hash_name is None:
        raise ValueError(f"unsupported nameAlg {area.nameAlg}")
    return int(area.nameAlg).to_bytes(2, "big") + hashlib.new(hash_name, public[2:]).digest()


def _area(public: bytes) -> TPMT_PUBLIC:
    return TPM2B_PUBLIC.unmarshal(public)[0].publicArea


def _area_key(area: TPMT_PUBLIC) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    """The public key of an ECC or RSA public area (ValueError if there is none)."""
    if area.type == TPM2_ALG.ECC:
        curve = _CURVES.get(int(area.parameters.eccDetail.curveID))
        if curve is None:
            raise ValueError(f"unsupported curve {area.parameters.eccDetail.curveID}")
        x = int.from_bytes(bytes(area.unique.ecc.x), "big")
        y = int.from_bytes(bytes(area.unique.ecc.y), "big")
        return ec.EllipticCurvePublicNumbers(x, y, curve).public_key()
    if area.type == TPM2_ALG.RSA:
        exponent = int(area.parameters.rsaDetail.exponent) or 65537
        n = int.from_bytes(bytes(area.unique.rsa), "big")
        return rsa.RSAPublicNumbers(exponent, n).public_key()
    raise ValueError(f"unsupported key type {area.type}")


def _attribute_problem(area: TPMT_PUBLIC, required: int, forbidden: int) -> str | None:
    attrs = int(area.objectAttributes)
    missing = [name for bit, name in _ATTRIBUTE_NAMES if required & bit and not attrs & bit]
    extra = [name for bit, name in _ATTRIBUTE_NAMES if forbidden & bit and attrs & bit]
    parts = []
    if missing:
        parts.append("lacks " + ", ".join(missing))
    if extra:
        parts.append("has " + ", ".join(extra))
    return " and ".join(parts) or None


def _is_p256_ecdsa_sha256(area: TPMT_PUBLIC, *, allow_null: bool) -> str | None:
    if area.type != TPM2_ALG.ECC:
        return f"is not an ECC key (type {area.type})"
    if area.parameters.eccDetail.curveID != TPM2_ECC.NIST_P256:
        return f"is not on curve P-256 ({area.parameters.eccDetail.curveID})"
    scheme = area.parameters.eccDetail.scheme
    if scheme.scheme == TPM2_ALG.NULL and allow_null:
        return None
    if scheme.scheme != TPM2_ALG.ECDSA or scheme.details.ecdsa.hashAlg != TPM2_ALG.SHA256:
        return "does not use the ECDSA-SHA256 scheme"
    return None


def _same_key(a: Any, b: Any) -> bool:
    if isinstance(a, ec.EllipticCurvePublicKey) and isinstance(b, ec.EllipticCurvePublicKey):
        return a.public_numbers() == b.public_numbers()
    if isinstance(a, rsa.RSAPublicKey) and isinstance(b, rsa.RSAPublicKey):
        return a.public_numbers() == b.public_numbers()
    return False


# --------------------------------------------------------------------------------------
# verification


@dataclass(frozen=True)
class VerifiedEvidence:
    """Evidence that passed :func:`verify_evidence`; a claim until activation passes.

    ``key``: the device's P-256 public key. ``key_name`` and ``ak_name``: TPM names of
    the device key and the AK. ``ek_fingerprint``: SHA-256 of the EK certificate's DER,
    hex. ``ek_public``: the EK's marshalled TPM2B_PUBLIC (the challenge is sealed to
    it). ``maker_root``: subject of the TPM maker root the EK certificate chains to.
    """

    key: ec.EllipticCurvePublicKey
    key_name: bytes
    ak_name: bytes
    ek_fingerprint: str
    ek_public: bytes
    maker_root: str


def _check_now(now: dt.datetime) -> dt.datetime:
    if not isinstance(now, dt.datetime) or now.utcoffset() is None:
        raise StateError("now must be a timezone-aware datetime", Reason.BAD_PARAMETERS)
    return now


def verify_evidence(
    evidence: TpmEvidence,
    roots: TpmMakerRoots,
    *,
    expected_qualifying_data: bytes,
    now: dt.datetime,
) -> VerifiedEvidence:
    """Check TPM evidence (the five steps of the module docstring, in order).

    ``expected_qualifying_data`` is the nonce this service issued for this enrollment.
    """
    if not isinstance(roots, TpmMakerRoots):
        raise StateError("roots must be TpmMakerRoots", Reason.BAD_PARAMETERS)
    if (
        not isinstance(expected_qualifying_data, bytes)
        or not MIN_QUALIFYING_DATA <= len(expected_qualifying_data) <= 64
    ):
        raise StateError(
            f"expected_qualifying_data must be the enrollment's nonce, "
            f"{MIN_QUALIFYING_DATA} to 64 bytes",
            Reason.BAD_PARAMETERS,
        )
    now = _check_now(now)
    if not isinstance(evidence, TpmEvidence):
        raise StateError(
            "evidence must be a TpmEvidence (parse JSON with TpmEvidence.from_json)",
            Reason.BAD_PARAMETERS,
        )

    # 1. the EK certificate chains to a TPM maker root
    ek_cert = x509.load_der_x509_certificate(evidence.ek_certificate)
    extra = [x509.load_der_x509_certificate(der) for der in evidence.ek_intermediates]
    root = roots.chain(ek_cert, extra, now)

    # 2. ek_public is the certified EK
    ek_area = _area(evidence.ek_public)
    try:
        ek_key = _area_key(ek_area)
        cert_key = ek_cert.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise EnrollmentError(f"ek_public: {exc}", Reason.ATTESTATION_FAILED) from None
    if not _same_key(ek_key, cert_key):
        raise EnrollmentError(
            "ek_public is not the key in the EK certificate", Reason.ATTESTATION_FAILED
        )
    problem = _attribute_problem(ek_area, _EK_REQUIRED, TPMA_OBJECT.SIGN_ENCRYPT)
    if problem is not None:
        raise EnrollmentError(
            f"ek_public is not an endorsement key: it {problem}", Reason.ATTESTATION_FAILED
        )
    symmetric = ek_area.parameters.asymDetail.symmetric
    if (
        int(ek_area.nameAlg) not in _HASHES
        or symmetric.algorithm != TPM2_ALG.AES
        or symmetric.mode.aes != TPM2_ALG.CFB
    ):
        raise EnrollmentError(
            "ek_public is not a TCG EK storage key (nameAlg SHA-256/384/512, AES-CFB)",
            Reason.ATTESTATION_FAILED,
        )

    # 3. ak_public is a restricted signing key generated in a TPM
    ak_area = _area(evidence.ak_public)
    problem = _is_p256_ecdsa_sha256(ak_area, allow_null=False) or _attribute_problem(
        ak_area, _AK_REQUIRED, TPMA_OBJECT.DECRYPT
    )
    if problem is None and int(ak_area.nameAlg) not in _HASHES:
        problem = f"has an unsupported nameAlg {ak_area.nameAlg}"
    if problem is not None:
        raise EnrollmentError(
            f"ak_public is not an attestation key: it {problem}", Reason.ATTESTATION_FAILED
        )
    try:
        ak_key = _area_key(ak_area)
    except ValueError as exc:
        raise EnrollmentError(f"ak_public: {exc}", Reason.ATTESTATION_FAILED) from None
    assert isinstance(ak_key, ec.EllipticCurvePublicKey)
    ak_name = tpm_name(evidence.ak_public)

    # 4. the AK certified exactly key_public, for this enrollment
    try:
        ak_key.verify(
            evidence.certify_signature, evidence.certify_attest, ec.ECDSA(hashes.SHA256())
        )
    except InvalidSignature:
        raise EnrollmentError(
            "certify_signature does not verify with the AK", Reason.CERTIFY_MISMATCH
        ) from None
    attest = TPMS_ATTEST.unmarshal(evidence.certify_attest)[0]
    if attest.magic != TPM2_GENERATED.VALUE:
        raise EnrollmentError(
            "certify_attest was not generated by a TPM (magic)", Reason.CERTIFY_MISMATCH
        )
    if attest.type != TPM2_ST.ATTEST_CERTIFY:
        raise EnrollmentError(
            f"certify_attest is not a TPM2_Certify (type {attest.type})", Reason.CERTIFY_MISMATCH
        )
    if not hmac.compare_digest(bytes(attest.extraData), expected_qualifying_data):
        raise EnrollmentError(
            "certify_attest was made for another enrollment (its qualifying data is not "
            "this enrollment's nonce)",
            Reason.CERTIFY_MISMATCH,
        )
    try:
        key_name = tpm_name(evidence.key_public)
    except ValueError as exc:
        raise EnrollmentError(
            f"key_public has no TPM name: {exc}", Reason.CERTIFY_MISMATCH
        ) from None
    if not hmac.compare_digest(bytes(attest.attested.certify.name), key_name):
        raise EnrollmentError(
            "certify_attest certifies another key than key_public", Reason.CERTIFY_MISMATCH
        )

    # 5. key_public is a signing key generated in the TPM and bound to it
    key_area = _area(evidence.key_public)
    problem = _is_p256_ecdsa_sha256(key_area, allow_null=True) or _attribute_problem(
        key_area, _KEY_REQUIRED, TPMA_OBJECT.DECRYPT | TPMA_OBJECT.RESTRICTED
    )
    if problem is not None:
        raise EnrollmentError(
            f"key_public is not a device key generated in the TPM: it {problem}",
            Reason.KEY_NOT_IN_TPM,
        )
    try:
        key = _area_key(key_area)
    except ValueError as exc:
        raise EnrollmentError(f"key_public: {exc}", Reason.KEY_NOT_IN_TPM) from None
    assert isinstance(key, ec.EllipticCurvePublicKey)

    return VerifiedEvidence(
        key=key,
        key_name=key_name,
        ak_name=ak_name,
        ek_fingerprint=hashlib.sha256(evidence.ek_certificate).hexdigest(),
        ek_public=evidence.ek_public,
        maker_root=root.subject.rfc4514_string(),
    )


# --------------------------------------------------------------------------------------
# credential activation


def make_challenge(verified: VerifiedEvidence) -> tuple[ActivationChallenge, bytes]:
    """Seal a fresh secret to the EK, for the AK named in the evidence.

    Returns the challenge for the device and the secret, which the service keeps (in its
    pending-enrollment state) and compares with :func:`check_activation`.
    """
    if not isinstance(verified, VerifiedEvidence):
        raise StateError("make_challenge needs a VerifiedEvidence", Reason.BAD_PARAMETERS)
    secret = secrets.token_bytes(SECRET_SIZE)
    ek = TPM2B_PUBLIC.unmarshal(verified.ek_public)[0]
    try:
        blob, encrypted = make_credential(ek, secret, TPM2B_NAME(verified.ak_name))
    except Exception as exc:  # unsupported EK parameters: nothing the device can answer
        raise EnrollmentError(
            f"cannot make a credential for this EK: {exc}", Reason.ATTESTATION_FAILED
        ) from None
    challenge = ActivationChallenge(
        credential_blob=bytes(blob.marshal()), encrypted_secret=bytes(encrypted.marshal())
    )
    return challenge, secret


def check_activation(expected_secret: bytes, answered_secret: bytes) -> None:
    """Constant-time check of the device's answer; ACTIVATION_FAILED if it differs."""
    if not isinstance(expected_secret, bytes) or len(expected_secret) < 16:
        raise StateError(
            "expected_secret is not a secret from make_challenge", Reason.BAD_PARAMETERS
        )
    if not isinstance(answered_secret, (bytes, bytearray)):
        raise EnrollmentError("the activation answer must be bytes", Reason.ACTIVATION_FAILED)
    if not hmac.compare_digest(expected_secret, bytes(answered_secret)):
        raise EnrollmentError(
            "the activation answer is wrong: the AK is not in the TPM that holds the certified EK",
            Reason.ACTIVATION_FAILED,
        )
