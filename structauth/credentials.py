"""X.509 credentials carrying SPIFFE identities, and their validation.

Sans-IO: the verifier passes time in through an explicit :class:`TimePolicy`, because
devices have no RTC and boot with a wrong clock.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID

from .errors import CredentialError, Reason

MAX_CHAIN = 4
MAX_CERT = 4096
KINDS = ("device", "broker")

_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True)
class Identity:
    """A SPIFFE ID of the form ``spiffe://<trust-domain>/<device|broker>/<name>``."""

    uri: str

    @classmethod
    def parse(cls, uri: str) -> Identity:
        prefix = "spiffe://"
        if not isinstance(uri, str) or not uri.startswith(prefix):
            raise CredentialError(f"identity {uri!r} is not a spiffe:// URI")
        parts = uri[len(prefix) :].split("/")
        if len(parts) != 3:
            raise CredentialError(
                f"identity {uri!r} must be spiffe://<trust-domain>/device|broker/<name>"
            )
        domain, kind, name = parts
        if not _TRUST_DOMAIN.fullmatch(domain) or domain.strip(".") != domain:
            raise CredentialError(f"identity {uri!r}: bad trust domain {domain!r}")
        if kind not in KINDS:
            raise CredentialError(f"identity {uri!r}: kind must be device or broker")
        if not _NAME.fullmatch(name) or name in (".", ".."):
            raise CredentialError(f"identity {uri!r}: bad name {name!r}")
        return cls(uri)

    @property
    def trust_domain(self) -> str:
        return self.uri.split("/")[2]

    @property
    def kind(self) -> str:
        return self.uri.split("/")[3]

    @property
    def name(self) -> str:
        return self.uri.split("/")[4]

    def __str__(self) -> str:
        return self.uri


def _identity_of(cert: x509.Certificate) -> Identity:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CredentialError("credential has no subject alternative name") from None
    except ValueError as exc:
        raise CredentialError(f"credential extensions unreadable: {exc}") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise CredentialError(f"credential must have exactly one URI SAN, has {len(uris)}")
    return Identity.parse(uris[0])


@dataclass(frozen=True)
class Credential:
    """An X.509 chain (leaf first, no root) whose leaf names one SPIFFE identity."""

    chain: tuple[x509.Certificate, ...]
    identity: Identity
    public_key: ec.EllipticCurvePublicKey
    _der: tuple[bytes, ...] = field(repr=False, compare=False)

    @classmethod
    def from_der_chain(cls, chain: Sequence[bytes]) -> Credential:
        if not 1 <= len(chain) <= MAX_CHAIN:
            raise CredentialError(f"credential chain of {len(chain)} certificates (1..{MAX_CHAIN})")
        certs = []
        for der in chain:
            if len(der) > MAX_CERT:
                raise CredentialError(f"certificate of {len(der)} bytes (max {MAX_CERT})")
            try:
                certs.append(x509.load_der_x509_certificate(bytes(der)))
            except (ValueError, x509.InvalidVersion):  # InvalidVersion is no ValueError
                raise CredentialError("certificate is not valid DER X.509") from None
        return cls._build(tuple(certs), tuple(bytes(d) for d in chain))

    @classmethod
    def from_pem(cls, data: bytes) -> Credential:
        try:
            certs = x509.load_pem_x509_certificates(data)
        except (ValueError, x509.InvalidVersion):
            raise CredentialError("no valid PEM certificates") from None
        if not 1 <= len(certs) <= MAX_CHAIN:
            raise CredentialError(f"credential chain of {len(certs)} certificates (1..{MAX_CHAIN})")
        return cls._build(tuple(certs), tuple(c.public_bytes(Encoding.DER) for c in certs))

    @classmethod
    def _build(cls, certs: tuple[x509.Certificate, ...], der: tuple[bytes, ...]) -> Credential:
        # cryptography parses most fields lazily; touch everything validation will use
        # now, so a malformed certificate fails here with our error, not later.
        for cert in certs:
            try:
                _ = (
                    cert.subject,
                    cert.issuer,
                    cert.extensions,
                    cert.not_valid_before_utc,
                    cert.not_valid_after_utc,
                )
                cert.public_key()
                _ = cert.signature_hash_algorithm
            except Exception as exc:  # untrusted DER: cryptography raises several types
                raise CredentialError(f"certificate fields unreadable: {exc}") from None
        leaf = certs[0]
        identity = _identity_of(leaf)
        try:
            key = leaf.public_key()
        except (ValueError, TypeError) as exc:
            raise CredentialError(f"credential key unreadable: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(
            key.curve, ec.SECP256R1
        ):
            raise CredentialError("credential key must be EC P-256")
        return cls(certs, identity, key, der)

    def der_chain(self) -> list[bytes]:
        return list(self._der)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the leaf certificate, hex."""
        return hashlib.sha256(self._der[0]).hexdigest()

    @property
    def not_after(self) -> dt.datetime:
        return self.chain[0].not_valid_after_utc

    @property
    def serials(self) -> tuple[str, ...]:
        """Serial numbers (lower-case hex) of every certificate in the chain, leaf first:
        a revocation check looks at all of them, so revoking an intermediate revokes
        every credential under it."""
        return tuple(format(c.serial_number, "x") for c in self.chain)


RevocationCheck = Callable[[Credential], bool]
"""Returns True when the credential, or any certificate above it in its chain
(:attr:`Credential.serials`), is revoked (the broker and service plug in here)."""


@dataclass(frozen=True)
class TimePolicy:
    """How a verifier judges validity times.

    * ``now`` known (brokers, the provisioning service): a credential must be inside
      its validity period, give or take ``skew``.
    * only ``floor`` known (a device without RTC that knows a lower bound on the time,
      e.g. its firmware build time or the newest authenticated time it has seen): only
      credentials that expired before the floor are refused; "not yet valid" cannot be
      judged.
    * neither: time is not judged at all. Acceptable only for a device that has
      nothing better; brokers always know the time and short-lived operational
      credentials plus revocation bound the exposure.
    """

    now: dt.datetime | None = None
    floor: dt.datetime | None = None
    skew: dt.timedelta = dt.timedelta(minutes=5)

    @classmethod
    def trusted(cls, now: dt.datetime, skew: dt.timedelta = dt.timedelta(minutes=5)) -> TimePolicy:
        return cls(now=now, skew=skew)

    @classmethod
    def unknown(cls, floor: dt.datetime | None = None) -> TimePolicy:
        return cls(floor=floor)

    @classmethod
    def for_device(
        cls, wall_now: dt.datetime, floor: dt.datetime,
        skew: dt.timedelta = dt.timedelta(minutes=5),
    ) -> TimePolicy:
        """A device's policy: its wall clock, unless that is behind a time it knows has
        passed (``floor``: e.g. its own credential's notBefore, or the newest
        authenticated time it has seen). A device without an RTC boots in 1970; trusting
        that clock would refuse every peer as "not yet valid" and lock it out, so it
        then judges only what it can: credentials that expired before the floor."""
        if wall_now + skew < floor:
            return cls(floor=floor)
        return cls(now=wall_now, skew=skew)

    def check(self, cert: x509.Certificate, what: str) -> None:
        if self.now is not None:
            if self.now + self.skew < cert.not_valid_before_utc:
                raise CredentialError(
                    f"{what} not valid before {cert.not_valid_before_utc}",
                    Reason.CREDENTIAL_NOT_YET_VALID,
                )
            if self.now - self.skew > cert.not_valid_after_utc:
                raise CredentialError(
                    f"{what} expired at {cert.not_valid_after_utc}", Reason.CREDENTIAL_EXPIRED
                )
        elif self.floor is not None and cert.not_valid_after_utc < self.floor:
            raise CredentialError(
                f"{what} expired at {cert.not_valid_after_utc}", Reason.CREDENTIAL_EXPIRED
            )


#: certificate signature digests accepted in a chain (SHA-1 and MD5 are collision-broken)
_STRONG_HASHES = (hashes.SHA256, hashes.SHA384, hashes.SHA512)
#: what a leaf's extended key usage, where present, must allow for each kind
_EKU_FOR_KIND = {
    "device": ExtendedKeyUsageOID.CLIENT_AUTH,
    "broker": ExtendedKeyUsageOID.SERVER_AUTH,
}


def _key_usage(cert: x509.Certificate) -> x509.KeyUsage | None:
    try:
        return cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return None


def _check_eku(leaf: x509.Certificate) -> None:
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return
    kind = _identity_of(leaf).kind
    need = _EKU_FOR_KIND[kind]
    if need not in eku and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in eku:
        raise CredentialError(
            f"a {kind} credential's extended key usage must include {need._name}",
            Reason.BAD_CREDENTIAL)


def _basic_constraints(cert: x509.Certificate) -> x509.BasicConstraints | None:
    try:
        return cert.extensions.get_extension_for_oid(ExtensionOID.BASIC_CONSTRAINTS).value  # type: ignore[return-value]
    except x509.ExtensionNotFound:
        return None


@dataclass(frozen=True)
class _Root:
    cert: x509.Certificate
    key: ec.EllipticCurvePublicKey
    path_length: int | None


def _verify_signed_by(cert: x509.Certificate, key: ec.EllipticCurvePublicKey) -> bool:
    algorithm = cert.signature_hash_algorithm
    if algorithm is None:
        return False
    try:
        key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(algorithm))
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


class TrustStore:
    """The fleet authority's roots for one trust domain.

    Chains that verified once are remembered (bounded LRU keyed by their exact DER):
    a certificate's signature cannot change, so a device that reconnects skips the
    parse and the chain signature check. Identity, validity times and revocation are
    checked on every call; failed chains are never cached. One chain per identity: a
    renewed credential replaces its predecessor's entry, so renewals do not fill the
    cache (each entry holds the parsed certificates, a few KiB).
    """

    def __init__(
        self, roots: Sequence[x509.Certificate], trust_domain: str, *, cache_size: int = 4096
    ) -> None:
        if not roots:
            raise CredentialError("a trust store needs at least one root", Reason.UNKNOWN_AUTHORITY)
        self.trust_domain = trust_domain
        self.roots = tuple(roots)
        self._roots: list[_Root] = []
        for root in self.roots:
            key = root.public_key()
            bc = _basic_constraints(root)
            if not isinstance(key, ec.EllipticCurvePublicKey) or bc is None or not bc.ca:
                raise CredentialError(
                    "fleet authority roots must be EC CA certificates", Reason.BAD_CREDENTIAL
                )
            self._roots.append(_Root(root, key, bc.path_length))
        self._cache_size = cache_size
        self._verified: OrderedDict[tuple[bytes, ...], tuple[Credential, x509.Certificate]] = (
            OrderedDict()
        )
        #: identity -> the key of its one entry in _verified
        self._by_identity: dict[Identity, tuple[bytes, ...]] = {}

    def credential(self, der_chain: Sequence[bytes]) -> Credential:
        """Parse a DER chain, reusing the parsed form of a chain that verified before."""
        hit = self._verified.get(tuple(der_chain))
        if hit is not None:
            return hit[0]
        return Credential.from_der_chain(der_chain)

    def validate(
        self,
        credential: Credential,
        policy: TimePolicy,
        *,
        revoked: RevocationCheck | None = None,
        expected: Identity | None = None,
        kind: str | None = None,
    ) -> Identity:
        """Check identity, chain, time and revocation; return the identity or raise
        :class:`CredentialError` with the most precise reason."""
        identity = credential.identity
        if identity.trust_domain != self.trust_domain:
            raise CredentialError(
                f"{identity} is not in trust domain {self.trust_domain}", Reason.WRONG_IDENTITY
            )
        if expected is not None and identity != expected:
            raise CredentialError(f"expected {expected}, got {identity}", Reason.WRONG_IDENTITY)
        if kind is not None and identity.kind != kind:
            raise CredentialError(f"{identity} is not a {kind}", Reason.WRONG_IDENTITY)
        root = self._verified_root(credential)
        for i, cert in enumerate(credential.chain):
            policy.check(cert, "credential" if i == 0 else f"intermediate {i}")
        policy.check(root, "fleet authority")
        if revoked is not None and revoked(credential):
            raise CredentialError(f"{identity} is revoked", Reason.CREDENTIAL_REVOKED)
        return identity

    def _verified_root(self, credential: Credential) -> x509.Certificate:
        key = credential._der
        hit = self._verified.get(key)
        if hit is not None:
            self._verified.move_to_end(key)
            return hit[1]
        root = self._check_chain(credential.chain)
        older = self._by_identity.get(credential.identity)
        if older is not None:  # renewed: the new chain takes the old one's place
            self._verified.pop(older, None)
        self._verified[key] = (credential, root)
        self._by_identity[credential.identity] = key
        if len(self._verified) > self._cache_size:
            evicted, (gone, _) = self._verified.popitem(last=False)
            if self._by_identity.get(gone.identity) == evicted:
                del self._by_identity[gone.identity]
        return root

    def _check_chain(self, chain: tuple[x509.Certificate, ...]) -> x509.Certificate:
        leaf = chain[0]
        leaf_bc = _basic_constraints(leaf)
        if leaf_bc is not None and leaf_bc.ca:
            raise CredentialError("a CA certificate cannot be a credential")
        for i, cert in enumerate(chain):
            algorithm = cert.signature_hash_algorithm
            if not isinstance(algorithm, _STRONG_HASHES):
                name = algorithm.name if algorithm is not None else "no digest"
                what = "credential" if i == 0 else f"intermediate {i}"
                raise CredentialError(
                    f"{what} is signed with {name}; only SHA-256/384/512 are accepted",
                    Reason.BAD_CREDENTIAL)
        usage = _key_usage(leaf)
        if usage is not None and not usage.digital_signature:
            raise CredentialError("credential key usage lacks digitalSignature")
        _check_eku(leaf)
        for depth, (cert, issuer) in enumerate(itertools.pairwise(chain)):
            bc = _basic_constraints(issuer)
            if bc is None or not bc.ca:
                raise CredentialError("chain issuer is not a CA", Reason.UNKNOWN_AUTHORITY)
            issuer_usage = _key_usage(issuer)
            if issuer_usage is None or not issuer_usage.key_cert_sign:
                # RFC 5280 4.2.1.3: a CA's key usage must be present and allow keyCertSign
                raise CredentialError("chain issuer's key usage does not allow keyCertSign",
                                      Reason.UNKNOWN_AUTHORITY)
            if bc.path_length is not None and bc.path_length < depth:
                raise CredentialError(
                    "chain exceeds an issuer's path length", Reason.UNKNOWN_AUTHORITY
                )
            issuer_key = issuer.public_key()
            if cert.issuer != issuer.subject or not (
                isinstance(issuer_key, ec.EllipticCurvePublicKey)
                and _verify_signed_by(cert, issuer_key)
            ):
                raise CredentialError("chain signature invalid", Reason.UNKNOWN_AUTHORITY)
        top = chain[-1]
        for root in self._roots:
            if top.issuer != root.cert.subject or not _verify_signed_by(top, root.key):
                continue
            if root.path_length is not None and root.path_length < len(chain) - 1:
                raise CredentialError(
                    "chain exceeds the root's path length", Reason.UNKNOWN_AUTHORITY
                )
            return root.cert
        raise CredentialError(
            "credential is not issued by the fleet authority", Reason.UNKNOWN_AUTHORITY
        )
