"""Issuing fleet-authority and SPIFFE credential certificates.

Times are always passed in explicitly; the caller decides what "now" is.

The authority's key normally lives in a PKCS#11 token, and ``cryptography``'s builders
sign only with in-memory private keys. :func:`sign_certificate` and :func:`sign_crl`
therefore accept any :class:`structauth.keys.Signer` as well: they let the builder
produce the to-be-signed structure (signed once with a throwaway in-memory key, so that
it names ecdsa-with-SHA256), have the Signer sign SHA-256 of it, and assemble the final
DER themselves. Whatever signed it, a certificate or CRL is verified with the issuer's
public key before it is returned.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import TypeAlias

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, SignatureAlgorithmOID

from structauth.credentials import Identity
from structauth.errors import KeyBackendError, Reason, StateError
from structauth.keys import Signer

__all__ = [
    "PROFILES",
    "SigningKey",
    "issue_credential",
    "make_authority",
    "profile_of",
    "sign_certificate",
    "sign_crl",
]

SigningKey: TypeAlias = ec.EllipticCurvePrivateKey | Signer
"""An in-memory EC private key, or any hardware-backed :class:`Signer` (P-256)."""

#: credential profiles, written as the subject's organizational unit
PROFILES = ("enrollment", "operational")

# AlgorithmIdentifier ::= SEQUENCE { OID 1.2.840.10045.4.3.2 (ecdsa-with-SHA256) }
# (RFC 5758 section 3.2: the parameters field is absent)
_ECDSA_WITH_SHA256 = bytes.fromhex("300a06082a8648ce3d040302")
_SHA256_ECDSA = ec.ECDSA(hashes.SHA256())

_draft_key: ec.EllipticCurvePrivateKey | None = None


def _throwaway_key() -> ec.EllipticCurvePrivateKey:
    """An in-memory P-256 key that signs only drafts, which are discarded."""
    global _draft_key
    if _draft_key is None:
        _draft_key = ec.generate_private_key(ec.SECP256R1())
    return _draft_key


# -- a very small DER writer -----------------------------------------------------------


def _der_length(n: int) -> bytes:
    """DER definite length: short form below 128, else 0x80|count then big-endian bytes."""
    if n < 0:
        raise ValueError("DER length cannot be negative")
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _der(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + _der_length(len(content)) + content


def _signed_der(tbs: bytes, signature: bytes) -> bytes:
    """``SEQUENCE { tbs, ecdsa-with-SHA256, BIT STRING signature }`` (Certificate and
    CertificateList share this outer shape, RFC 5280 sections 4.1 and 5.1)."""
    bit_string = _der(0x03, b"\x00" + signature)  # no unused bits
    return _der(0x30, tbs + _ECDSA_WITH_SHA256 + bit_string)


def _check_draft(draft_der: bytes, tbs: bytes, signature: bytes) -> None:
    # The draft was encoded by cryptography; our writer must reproduce it exactly,
    # which proves the TBS names ecdsa-with-SHA256 and that the framing is right.
    if _signed_der(tbs, signature) != draft_der:
        raise RuntimeError("DER framing of the draft differs from cryptography's encoding")


def _sign_tbs(signer: Signer, tbs: bytes) -> bytes:
    signature = signer.sign_digest(hashlib.sha256(tbs).digest())
    if not isinstance(signature, bytes) or not signature:
        raise KeyBackendError(
            f"{signer.backend} signer returned no signature", Reason.BACKEND_FAILURE
        )
    return signature


def _public_key_of(key: SigningKey) -> ec.EllipticCurvePublicKey:
    public = key.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise StateError("the signing key must be an EC key", Reason.BAD_PARAMETERS)
    return public


def _check_signing_key(key: SigningKey) -> None:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return
    if not isinstance(key, Signer):
        raise StateError(
            f"cannot sign with {type(key).__name__}: pass an EC private key or a Signer",
            Reason.BAD_PARAMETERS,
        )
    if not isinstance(_public_key_of(key).curve, ec.SECP256R1):
        raise StateError("a Signer must hold a P-256 key", Reason.BAD_PARAMETERS)


def _same_key(a: ec.EllipticCurvePublicKey, b: ec.EllipticCurvePublicKey) -> bool:
    fmt = (Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return a.public_bytes(*fmt) == b.public_bytes(*fmt)


# -- signing builders --------------------------------------------------------------


def sign_certificate(
    builder: x509.CertificateBuilder,
    key: SigningKey,
    *,
    issuer_public_key: ec.EllipticCurvePublicKey | None = None,
) -> x509.Certificate:
    """Sign ``builder`` with an in-memory EC key or a :class:`Signer` (ECDSA, SHA-256).

    The result is verified with ``issuer_public_key`` (default: the signing key's own
    public half) before it is returned; a signature that does not verify raises
    :class:`KeyBackendError` (BACKEND_FAILURE) and no certificate comes out.
    """
    _check_signing_key(key)
    verify_key = issuer_public_key if issuer_public_key is not None else _public_key_of(key)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        cert = builder.sign(key, hashes.SHA256())
    else:
        draft = builder.sign(_throwaway_key(), hashes.SHA256())
        tbs = draft.tbs_certificate_bytes
        _check_draft(draft.public_bytes(Encoding.DER), tbs, draft.signature)
        der = _signed_der(tbs, _sign_tbs(key, tbs))
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError as exc:
            raise KeyBackendError(
                f"certificate signed by the {key.backend} signer is not valid DER: {exc}",
                Reason.BACKEND_FAILURE,
            ) from None
    if cert.signature_algorithm_oid != SignatureAlgorithmOID.ECDSA_WITH_SHA256:
        raise KeyBackendError("certificate is not signed with ecdsa-with-SHA256")
    try:
        verify_key.verify(cert.signature, cert.tbs_certificate_bytes, _SHA256_ECDSA)
    except InvalidSignature:
        raise KeyBackendError(
            "the new certificate's signature does not verify with the issuer's public key "
            "(the signing key does not match, or the key backend signed wrongly); "
            "nothing was issued",
            Reason.BACKEND_FAILURE,
        ) from None
    return cert


def sign_crl(
    builder: x509.CertificateRevocationListBuilder,
    key: SigningKey,
    *,
    issuer_public_key: ec.EllipticCurvePublicKey | None = None,
) -> x509.CertificateRevocationList:
    """Like :func:`sign_certificate`, for a certificate revocation list."""
    _check_signing_key(key)
    verify_key = issuer_public_key if issuer_public_key is not None else _public_key_of(key)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        crl = builder.sign(key, hashes.SHA256())
    else:
        draft = builder.sign(_throwaway_key(), hashes.SHA256())
        tbs = draft.tbs_certlist_bytes
        _check_draft(draft.public_bytes(Encoding.DER), tbs, draft.signature)
        der = _signed_der(tbs, _sign_tbs(key, tbs))
        try:
            crl = x509.load_der_x509_crl(der)
        except ValueError as exc:
            raise KeyBackendError(
                f"CRL signed by the {key.backend} signer is not valid DER: {exc}",
                Reason.BACKEND_FAILURE,
            ) from None
    if crl.signature_algorithm_oid != SignatureAlgorithmOID.ECDSA_WITH_SHA256:
        raise KeyBackendError("CRL is not signed with ecdsa-with-SHA256")
    if not crl.is_signature_valid(verify_key):
        raise KeyBackendError(
            "the new CRL's signature does not verify with the issuer's public key "
            "(the signing key does not match, or the key backend signed wrongly)",
            Reason.BACKEND_FAILURE,
        )
    return crl


# -- profiles ------------------------------------------------------------------------


def make_authority(
    trust_domain: str,
    key: SigningKey,
    *,
    not_before: dt.datetime,
    not_after: dt.datetime,
    common_name: str | None = None,
    serial: int | None = None,
) -> x509.Certificate:
    """A self-signed fleet authority root for ``trust_domain`` (CA, path length 0).

    ``key`` is an in-memory EC private key or a :class:`Signer` (PKCS#11, TPM).
    """
    _check_signing_key(key)
    public = _public_key_of(key)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tessera fleet authority"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name or f"{trust_domain} authority"),
        ]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.NameConstraints(
                permitted_subtrees=[x509.UniformResourceIdentifier(trust_domain)],
                excluded_subtrees=None,
            ),
            critical=True,
        )
    )
    return sign_certificate(builder, key)


def issue_credential(
    authority_cert: x509.Certificate,
    authority_key: SigningKey,
    public_key: ec.EllipticCurvePublicKey,
    identity: Identity,
    *,
    not_before: dt.datetime,
    not_after: dt.datetime,
    serial: int | None = None,
    profile: str | None = None,
) -> x509.Certificate:
    """A leaf credential whose only URI SAN is ``identity``.

    ``authority_key`` is an in-memory EC private key or a :class:`Signer`; it must be
    the key of ``authority_cert``. ``profile`` ("enrollment" or "operational"), if
    given, becomes the subject's organizational unit so the two kinds of credential
    can be told apart.
    """
    _check_signing_key(authority_key)
    issuer_public = authority_cert.public_key()
    if not isinstance(issuer_public, ec.EllipticCurvePublicKey) or not _same_key(
        issuer_public, _public_key_of(authority_key)
    ):
        raise StateError(
            "the signing key is not the key of the authority certificate", Reason.BAD_PARAMETERS
        )
    if profile is not None and profile not in PROFILES:
        raise StateError(
            f"credential profile {profile!r} is not one of {', '.join(PROFILES)}",
            Reason.BAD_PARAMETERS,
        )
    subject = [x509.NameAttribute(NameOID.COMMON_NAME, identity.name)]
    if profile is not None:
        subject.insert(0, x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, profile))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject))
        .issuer_name(authority_cert.subject)
        .public_key(public_key)
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public),
            critical=False,
        )
    )
    return sign_certificate(builder, authority_key, issuer_public_key=issuer_public)


def profile_of(cert: x509.Certificate) -> str | None:
    """The credential profile ("enrollment" / "operational") of a leaf, if it names one."""
    units = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if len(units) != 1:
        return None
    value = units[0].value
    return value if isinstance(value, str) and value in PROFILES else None
