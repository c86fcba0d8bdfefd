"""SA1 version 2, implemented from docs/PROTOCOL.md alone.

Section numbers in comments (§n) are those of docs/PROTOCOL.md. Nothing here comes from
Tessera's own packages: only the standard library and ``cryptography``. Failures raise
:class:`Refused` carrying the *name* of the reason code of PROTOCOL.md §11.

Deliberately different code paths from the reference where the document allows it:
signatures are verified as plain ECDSA-with-SHA-256 over ``label || data`` (not as a
prehash), HKDF is written out with ``hmac``, and the ML-KEM encapsulation-key modulus
check is done here by decoding the coefficients, besides the library's own check.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import struct
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, mlkem, x25519
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.x509.oid import ExtensionOID

# ----------------------------------------------------------------------- §11 reasons

REASONS: dict[str, int] = {
    "MALFORMED": 100, "BAD_VERSION": 101, "UNKNOWN_SUITE": 102, "TRUNCATED": 103,
    "TRAILING_BYTES": 104,
    "BAD_SIGNATURE": 200, "BAD_CONFIRMATION": 201, "BAD_TAG": 202, "BAD_KEY_SHARE": 203,
    "REPLAYED": 300, "EPOCH_OUT_OF_WINDOW": 301, "SESSION_EXPIRED": 302,
    "SEQUENCE_EXHAUSTED": 303, "HANDSHAKE_REPLAYED": 304, "UNKNOWN_SESSION": 305,
    "UNKNOWN_AUTHORITY": 400, "CREDENTIAL_EXPIRED": 401, "CREDENTIAL_NOT_YET_VALID": 402,
    "CREDENTIAL_REVOKED": 403, "WRONG_IDENTITY": 404, "BAD_CREDENTIAL": 405,
    "INVALID_STATE": 500, "BAD_PARAMETERS": 501,
    "KEY_NOT_FOUND": 600, "BACKEND_UNAVAILABLE": 601, "WRONG_PIN": 602, "TOKEN_LOCKED": 603,
    "BACKEND_FAILURE": 604, "BAD_CONFIGURATION": 605,
    "ATTESTATION_FAILED": 700, "UNKNOWN_TPM_MAKER": 701, "ALREADY_ENROLLED": 702,
    "NOT_ENROLLED": 703, "ACTIVATION_FAILED": 704, "CERTIFY_MISMATCH": 705,
    "KEY_NOT_IN_TPM": 706, "NOT_AUTHORIZED": 707, "ENROLLMENT_EXPIRED": 708,
    "REGISTRY_FAILURE": 709, "DEVICE_REVOKED": 710,
}


class Refused(Exception):
    """The input was refused; ``reason`` is a name from PROTOCOL.md §11."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in REASONS:
            raise AssertionError(f"not a reason of PROTOCOL.md §11: {reason}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# ----------------------------------------------------------------------- §2 primitives

SUITE = 0x0001
MAGIC = b"SA1"
TYPE_MSG1, TYPE_MSG2, TYPE_MSG3 = 0x21, 0x22, 0x23
V1_TYPES = (0x01, 0x02)

LABEL_MSG1_SIG = b"SA1v2 msg1 signature"
LABEL_MSG2_SIG = b"SA1v2 msg2 signature"
LABEL_TRANSCRIPT = b"SA1v2 transcript"
LABEL_KEYS = b"SA1v2 session keys"
LABEL_CONFIRM_R = b"SA1v2 responder confirmation"
LABEL_CONFIRM_I = b"SA1v2 initiator confirmation"
LABEL_CHAIN = b"SA1 chain key"
LABEL_MESSAGE = b"SA1 message key"
LABEL_SEAL = b"SA1 seal key"

MLKEM_Q = 3329


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def b256(key: bytes, data: bytes) -> bytes:
    """Keyed BLAKE2s, 32-byte digest."""
    return hashlib.blake2s(data, key=key).digest()


def b128(key: bytes, data: bytes) -> bytes:
    """Keyed BLAKE2s with the digest-length parameter 16 (not a truncation)."""
    return hashlib.blake2s(data, key=key, digest_size=16).digest()


def hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    return hmac.new(salt, ikm, hashlib.sha256).digest()


def hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes((counter,)), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def verify_signature(key: ec.EllipticCurvePublicKey, sig: bytes, label: bytes, data: bytes) -> None:
    """ECDSA P-256 with SHA-256 over ``label || data`` (§2 Sign/Verify)."""
    try:
        key.verify(sig, label + data, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError) as exc:
        raise Refused("BAD_SIGNATURE", f"signature does not verify ({exc!r})") from None


def sign(key: ec.EllipticCurvePrivateKey, label: bytes, data: bytes) -> bytes:
    return key.sign(label + data, ec.ECDSA(hashes.SHA256()))


def x25519_shared(private: bytes, public: bytes) -> bytes:
    """X25519 with the all-zero check (§2)."""
    try:
        out = x25519.X25519PrivateKey.from_private_bytes(private).exchange(
            x25519.X25519PublicKey.from_public_bytes(public))
    except ValueError:
        raise Refused("BAD_KEY_SHARE", "X25519 shared secret is all zero") from None
    if out == bytes(32):
        raise Refused("BAD_KEY_SHARE", "X25519 shared secret is all zero")
    return out


def x25519_public(private: bytes) -> bytes:
    return x25519.X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def mlkem_modulus_ok(ek: bytes) -> bool:
    """FIPS 203 encapsulation-key check: every 12-bit coefficient of t-hat < q."""
    if len(ek) != 1184:
        return False
    t = ek[:1152]
    for i in range(0, 1152, 3):
        c0 = t[i] | ((t[i + 1] & 0x0F) << 8)
        c1 = (t[i + 1] >> 4) | (t[i + 2] << 4)
        if c0 >= MLKEM_Q or c1 >= MLKEM_Q:
            return False
    return True


def mlkem_import(ek: bytes) -> mlkem.MLKEM768PublicKey:
    ours = mlkem_modulus_ok(ek)
    try:
        key = mlkem.MLKEM768PublicKey.from_public_bytes(ek)
    except ValueError:
        key = None
    if (key is not None) != ours:  # the document says the library does this very check
        raise AssertionError("cryptography's ML-KEM key check disagrees with FIPS 203's")
    if key is None:
        raise Refused("BAD_KEY_SHARE", "ML-KEM-768 encapsulation key fails the modulus check")
    return key


# ----------------------------------------------------------------------- §3 encoding


def u8(v: int) -> bytes:
    return bytes((v,))


def u16(v: int) -> bytes:
    return struct.pack(">H", v)


def u32(v: int) -> bytes:
    return struct.pack(">I", v)


def var16(b: bytes) -> bytes:
    return u16(len(b)) + b


class Reader:
    def __init__(self, data: bytes) -> None:
        self.data = bytes(data)
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise Refused("TRUNCATED", f"input ends inside a field at {self.pos}")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def var16(self, lo: int, hi: int) -> bytes:
        n = self.u16()
        if not lo <= n <= hi:
            raise Refused("MALFORMED", f"length {n} outside {lo}..{hi}")
        return self.take(n)

    def chain(self) -> tuple[bytes, ...]:
        count = self.u8()
        if not 1 <= count <= 4:
            raise Refused("MALFORMED", f"chain of {count} certificates")
        return tuple(self.var16(1, 4096) for _ in range(count))

    def done(self) -> None:
        if self.pos != len(self.data):
            raise Refused("TRAILING_BYTES", f"{len(self.data) - self.pos} bytes after the end")


def encode_chain(chain: Sequence[bytes]) -> bytes:
    return u8(len(chain)) + b"".join(var16(c) for c in chain)


def read_prefix(r: Reader, expected: int) -> None:
    """§4.1: magic and type read together, then checked, then the suite."""
    magic = r.take(3)
    kind = r.u8()
    if magic != MAGIC:
        raise Refused("BAD_VERSION", "magic is not SA1")
    if kind in V1_TYPES:
        raise Refused("BAD_VERSION", "SA1 version 1 message")
    if kind != expected:
        raise Refused("MALFORMED", f"type {kind:#04x}, expected {expected:#04x}")
    suite = r.u16()
    if suite != SUITE:
        raise Refused("UNKNOWN_SUITE", f"suite {suite:#06x}")


# ----------------------------------------------------------------------- §4 messages


@dataclass(frozen=True)
class Msg1:
    nonce: bytes
    x25519: bytes
    mlkem_ek: bytes
    chain: tuple[bytes, ...]
    responder: str
    context: bytes
    quote: bytes
    signature: bytes
    signed: bytes
    raw: bytes


def parse_msg1(data: bytes) -> Msg1:
    r = Reader(data)
    read_prefix(r, TYPE_MSG1)
    nonce, share, ek = r.take(32), r.take(32), r.take(1184)
    chain = r.chain()
    raw_name = r.var16(1, 255)
    if any(b > 0x7F for b in raw_name):
        raise Refused("MALFORMED", "responder name is not ASCII")
    context = r.var16(0, 512)
    quote = r.var16(0, 4096)
    signed = r.data[:r.pos]
    sig = r.var16(8, 72)
    r.done()
    return Msg1(nonce, share, ek, chain, raw_name.decode("ascii"), context, quote, sig,
                signed, bytes(data))


@dataclass(frozen=True)
class Params:
    epoch_ms: int = 10_000
    skew_epochs: int = 2
    lifetime_s: int = 3600
    sealed: bool = False
    replay_window: int = 1024
    policy_digest: bytes = bytes(32)

    def encode(self) -> bytes:
        return (u32(self.epoch_ms) + u8(self.skew_epochs) + u32(self.lifetime_s)
                + u8(1 if self.sealed else 0) + u16(self.replay_window) + self.policy_digest)

    @property
    def last_epoch(self) -> int:
        return self.lifetime_s * 1000 // self.epoch_ms + self.skew_epochs


def read_params(r: Reader) -> Params:
    epoch_ms, skew, lifetime = r.u32(), r.u8(), r.u32()
    flags, window, digest = r.u8(), r.u16(), r.take(32)
    if flags & ~0x01:
        raise Refused("MALFORMED", f"parameter flags {flags:#x}")
    if not 100 <= epoch_ms <= 3_600_000:
        raise Refused("BAD_PARAMETERS", "epoch_ms")
    if not 0 <= skew <= 16:
        raise Refused("BAD_PARAMETERS", "skew_epochs")
    if not 1 <= lifetime <= 604_800:
        raise Refused("BAD_PARAMETERS", "lifetime_s")
    if not 32 <= window <= 65_535:
        raise Refused("BAD_PARAMETERS", "replay_window")
    if lifetime * 1000 // epoch_ms + skew >= 65_535:
        raise Refused("BAD_PARAMETERS", "epoch counter")
    return Params(epoch_ms, skew, lifetime, bool(flags & 1), window, digest)


@dataclass(frozen=True)
class Msg2:
    nonce: bytes
    x25519: bytes
    mlkem_ct: bytes
    params: Params
    chain: tuple[bytes, ...]
    signature: bytes
    mac_r: bytes
    body: bytes
    raw: bytes


def parse_msg2(data: bytes) -> Msg2:
    r = Reader(data)
    read_prefix(r, TYPE_MSG2)
    nonce, share, ct = r.take(32), r.take(32), r.take(1088)
    params = read_params(r)
    chain = r.chain()
    body = r.data[:r.pos]
    sig = r.var16(8, 72)
    mac = r.take(32)
    r.done()
    return Msg2(nonce, share, ct, params, chain, sig, mac, body, bytes(data))


@dataclass(frozen=True)
class Msg3:
    session_id: bytes
    mac_i: bytes


def parse_msg3(data: bytes) -> Msg3:
    r = Reader(data)
    read_prefix(r, TYPE_MSG3)
    sid, mac = r.take(8), r.take(32)
    r.done()
    return Msg3(sid, mac)


def build_msg3(session_id: bytes, mac_i: bytes) -> bytes:
    return MAGIC + u8(TYPE_MSG3) + u16(SUITE) + session_id + mac_i


# ----------------------------------------------------------------------- §4.5 keys


def transcript_hash(msg1: bytes, body2: bytes) -> bytes:
    return sha256(LABEL_TRANSCRIPT + u32(len(msg1)) + msg1 + u32(len(body2)) + body2)


@dataclass(frozen=True)
class Keys:
    prk: bytes
    okm: bytes

    @property
    def session_id(self) -> bytes:
        return self.okm[0:8]

    @property
    def ck_i2r(self) -> bytes:
        return self.okm[8:40]

    @property
    def ck_r2i(self) -> bytes:
        return self.okm[40:72]

    @property
    def k_confirm_r(self) -> bytes:
        return self.okm[72:104]

    @property
    def k_confirm_i(self) -> bytes:
        return self.okm[104:136]


def derive_keys(ss_x: bytes, ss_k: bytes, th: bytes) -> Keys:
    prk = hkdf_extract(th, ss_x + ss_k)
    return Keys(prk, hkdf_expand(prk, LABEL_KEYS, 136))


def mac_r_input(th: bytes, sig2: bytes) -> bytes:
    return LABEL_CONFIRM_R + th + var16(sig2)


def mac_i_input(th: bytes, sig2: bytes, mac_r: bytes) -> bytes:
    return LABEL_CONFIRM_I + th + var16(sig2) + mac_r


def mac_r(keys: Keys, th: bytes, sig2: bytes) -> bytes:
    return b256(keys.k_confirm_r, mac_r_input(th, sig2))


def mac_i(keys: Keys, th: bytes, sig2: bytes, mac_r_value: bytes) -> bytes:
    return b256(keys.k_confirm_i, mac_i_input(th, sig2, mac_r_value))


# ----------------------------------------------------------------------- §6 credentials

_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def parse_spiffe(uri: str) -> tuple[str, str, str]:
    prefix = "spiffe://"
    if not uri.startswith(prefix):
        raise Refused("BAD_CREDENTIAL", f"{uri!r} is not spiffe://")
    parts = uri[len(prefix):].split("/")
    if len(parts) != 3:
        raise Refused("BAD_CREDENTIAL", f"{uri!r} does not have three parts")
    domain, kind, name = parts
    if (not _TRUST_DOMAIN.fullmatch(domain) or domain.startswith(".")
            or domain.endswith(".")):
        raise Refused("BAD_CREDENTIAL", f"bad trust domain in {uri!r}")
    if kind not in ("device", "broker"):
        raise Refused("BAD_CREDENTIAL", f"bad kind in {uri!r}")
    if not _NAME.fullmatch(name) or name in (".", ".."):
        raise Refused("BAD_CREDENTIAL", f"bad name in {uri!r}")
    return domain, kind, name


@dataclass(frozen=True)
class Credential:
    certs: tuple[x509.Certificate, ...]
    identity: str
    trust_domain: str
    kind: str
    key: ec.EllipticCurvePublicKey

    @property
    def serials(self) -> tuple[str, ...]:
        """Serial numbers (lower-case hex) of every chain certificate, leaf first: what a
        revocation check looks at (§6 step 6)."""
        return tuple(format(c.serial_number, "x") for c in self.certs)


def parse_credential(ders: Sequence[bytes]) -> Credential:
    certs: list[x509.Certificate] = []
    for der in ders:
        try:
            cert = x509.load_der_x509_certificate(bytes(der))
            _ = (cert.subject, cert.issuer, cert.extensions, cert.not_valid_before_utc,
                 cert.not_valid_after_utc, cert.signature_hash_algorithm)
            cert.public_key()
        except Exception as exc:  # untrusted DER: several exception types
            raise Refused("BAD_CREDENTIAL", f"certificate unreadable: {exc}") from None
        certs.append(cert)
    leaf = certs[0]
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise Refused("BAD_CREDENTIAL", "no subject alternative name") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise Refused("BAD_CREDENTIAL", f"{len(uris)} URI SANs")
    domain, kind, _ = parse_spiffe(uris[0])
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise Refused("BAD_CREDENTIAL", "leaf key is not P-256")
    return Credential(tuple(certs), uris[0], domain, kind, key)


@dataclass(frozen=True)
class TimePolicy:
    now: datetime | None = None
    floor: datetime | None = None
    skew: timedelta = timedelta(minutes=5)

    def check(self, cert: x509.Certificate) -> None:
        if self.now is not None:
            if self.now + self.skew < cert.not_valid_before_utc:
                raise Refused("CREDENTIAL_NOT_YET_VALID", str(cert.subject))
            if self.now - self.skew > cert.not_valid_after_utc:
                raise Refused("CREDENTIAL_EXPIRED", str(cert.subject))
        elif self.floor is not None and cert.not_valid_after_utc < self.floor:
            raise Refused("CREDENTIAL_EXPIRED", str(cert.subject))


_EKU = {"device": "1.3.6.1.5.5.7.3.2", "broker": "1.3.6.1.5.5.7.3.1"}


def parse_credential_kind(leaf: x509.Certificate) -> str:
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return parse_spiffe(san.get_values_for_type(x509.UniformResourceIdentifier)[0])[1]


def _bc(cert: x509.Certificate) -> x509.BasicConstraints | None:
    try:
        ext = cert.extensions.get_extension_for_oid(ExtensionOID.BASIC_CONSTRAINTS)
    except x509.ExtensionNotFound:
        return None
    value = ext.value
    assert isinstance(value, x509.BasicConstraints)
    return value


def _signed_by(cert: x509.Certificate, key: object) -> bool:
    algorithm = cert.signature_hash_algorithm
    if algorithm is None or not isinstance(key, ec.EllipticCurvePublicKey):
        return False
    try:
        key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(algorithm))
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


@dataclass
class Trust:
    roots: tuple[x509.Certificate, ...]
    trust_domain: str

    def validate(
        self, cred: Credential, policy: TimePolicy, *, expected: str | None = None,
        kind: str | None = None, revoked: Callable[[Credential], bool] | None = None,
    ) -> str:
        """§6 validation, in the document's order; returns the identity URI."""
        if cred.trust_domain != self.trust_domain:
            raise Refused("WRONG_IDENTITY", f"{cred.identity} not in {self.trust_domain}")
        if expected is not None and cred.identity != expected:
            raise Refused("WRONG_IDENTITY", f"expected {expected}, got {cred.identity}")
        if kind is not None and cred.kind != kind:
            raise Refused("WRONG_IDENTITY", f"{cred.identity} is not a {kind}")
        root = self._chain(cred.certs)
        for cert in cred.certs:
            policy.check(cert)
        policy.check(root)
        if revoked is not None and revoked(cred):
            raise Refused("CREDENTIAL_REVOKED", cred.identity)
        return cred.identity

    def _chain(self, certs: tuple[x509.Certificate, ...]) -> x509.Certificate:
        leaf = certs[0]
        bc = _bc(leaf)
        if bc is not None and bc.ca:
            raise Refused("BAD_CREDENTIAL", "CA leaf")
        for cert in certs:
            algorithm = cert.signature_hash_algorithm
            if algorithm is None or algorithm.name not in ("sha256", "sha384", "sha512"):
                raise Refused("BAD_CREDENTIAL", "certificate not signed with SHA-2")
        try:
            usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound:
            usage = None
        if usage is not None and not usage.digital_signature:
            raise Refused("BAD_CREDENTIAL", "leaf without digitalSignature")
        try:
            eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            eku = None
        if eku is not None:
            kind = parse_credential_kind(leaf)
            purposes = {oid.dotted_string for oid in eku}
            if not purposes & {_EKU[kind], "2.5.29.37.0"}:
                raise Refused("BAD_CREDENTIAL", f"a {kind} leaf's EKU lacks {_EKU[kind]}")
        for depth in range(len(certs) - 1):
            cert, issuer = certs[depth], certs[depth + 1]
            ibc = _bc(issuer)
            if ibc is None or not ibc.ca:
                raise Refused("UNKNOWN_AUTHORITY", "issuer is not a CA")
            try:
                iku = issuer.extensions.get_extension_for_class(x509.KeyUsage).value
            except x509.ExtensionNotFound:
                raise Refused("UNKNOWN_AUTHORITY", "issuer without keyUsage") from None
            if not iku.key_cert_sign:
                raise Refused("UNKNOWN_AUTHORITY", "issuer without keyCertSign")
            if ibc.path_length is not None and ibc.path_length < depth:
                raise Refused("UNKNOWN_AUTHORITY", "path length")
            if cert.issuer != issuer.subject or not _signed_by(cert, issuer.public_key()):
                raise Refused("UNKNOWN_AUTHORITY", "chain signature")
        top = certs[-1]
        for root in self.roots:
            if top.issuer != root.subject or not _signed_by(top, root.public_key()):
                continue
            rbc = _bc(root)
            if rbc is not None and rbc.path_length is not None and \
                    rbc.path_length < len(certs) - 1:
                raise Refused("UNKNOWN_AUTHORITY", "root path length")
            return root
        raise Refused("UNKNOWN_AUTHORITY", "not issued by a configured root")


# ----------------------------------------------------------------------- §4.7 processing


class NonceCache:
    """§4.8: nonces of msg1s that passed every check, for ``ttl`` seconds, at most
    ``max_entries``."""

    def __init__(self, ttl: float = 600.0, max_entries: int = 100_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.seen: OrderedDict[bytes, float] = OrderedDict()

    def _expire(self, now: float) -> None:
        while self.seen:
            nonce, expiry = next(iter(self.seen.items()))
            if expiry > now and len(self.seen) <= self.max_entries:
                return
            del self.seen[nonce]

    def check(self, nonce: bytes, now: float) -> None:
        self._expire(now)
        if nonce in self.seen:
            raise Refused("HANDSHAKE_REPLAYED", "nonce cached")

    def add(self, nonce: bytes, now: float) -> None:
        self.seen[nonce] = now + self.ttl
        self._expire(now)


@dataclass(frozen=True)
class CheckedMsg1:
    msg1: Msg1
    credential: Credential
    peer: str
    ek: mlkem.MLKEM768PublicKey


def responder_check_msg1(
    data: bytes, now: float, *, own_identity: str, trust: Trust, policy: TimePolicy,
    nonces: NonceCache | None = None, kind: str | None = "device", expected: str | None = None,
    revoked: Callable[[Credential], bool] | None = None,
) -> CheckedMsg1:
    """Steps 1-6 of the responder's msg1 rules (the X25519 all-zero check of step 6
    needs the responder's ephemeral key: :func:`responder_answer` does it)."""
    m = parse_msg1(data)
    if m.responder != own_identity:
        raise Refused("WRONG_IDENTITY", f"msg1 for {m.responder}")
    if nonces is not None:
        nonces.check(m.nonce, now)
    cred = parse_credential(m.chain)
    peer = trust.validate(cred, policy, expected=expected, kind=kind, revoked=revoked)
    verify_signature(cred.key, m.signature, LABEL_MSG1_SIG, m.signed)
    ek = mlkem_import(m.mlkem_ek)
    return CheckedMsg1(m, cred, peer, ek)


@dataclass
class Pending:
    session_id: bytes
    expect: bytes
    ck_i2r: bytes
    ck_r2i: bytes
    params: Params
    start: float
    deadline: float
    peer: str
    used: bool = False


@dataclass(frozen=True)
class Answer:
    msg2: bytes
    body2: bytes
    th: bytes
    ss_x: bytes
    keys: Keys
    pending: Pending


def responder_answer(
    checked: CheckedMsg1, now: float, *, nonce_r: bytes, x25519_private: bytes,
    encapsulation: tuple[bytes, bytes], params: Params, chain: Sequence[bytes],
    signature: Callable[[bytes], bytes], nonces: NonceCache | None = None,
    pending_timeout: float = 10.0,
) -> Answer:
    """Steps 6-8: build msg2. ``encapsulation`` is (shared secret, ciphertext) to the
    initiator's key; ``signature(th)`` returns the responder's DER signature over
    LABEL_MSG2_SIG || th."""
    m = checked.msg1
    ss_x = x25519_shared(x25519_private, m.x25519)
    ss_k, ct = encapsulation
    body2 = b"".join((MAGIC, u8(TYPE_MSG2), u16(SUITE), nonce_r, x25519_public(x25519_private),
                      ct, params.encode(), encode_chain(chain)))
    th = transcript_hash(m.raw, body2)
    keys = derive_keys(ss_x, ss_k, th)
    sig2 = signature(th)
    mr = mac_r(keys, th, sig2)
    if nonces is not None:
        nonces.add(m.nonce, now)
    pending = Pending(keys.session_id, mac_i(keys, th, sig2, mr), keys.ck_i2r, keys.ck_r2i,
                      params, now, now + pending_timeout, checked.peer)
    return Answer(body2 + var16(sig2) + mr, body2, th, ss_x, keys, pending)


def responder_confirm(pending: Pending, data: bytes, now: float) -> Session:
    """The responder's msg3 rules; any failure discards ``pending`` (one try)."""
    try:
        m = parse_msg3(data)
        if pending.used or now >= pending.deadline:
            raise Refused("BAD_CONFIRMATION", "pending handshake expired or used")
        if m.session_id != pending.session_id:
            raise Refused("UNKNOWN_SESSION", "msg3 for another session")
        if not hmac.compare_digest(m.mac_i, pending.expect):
            raise Refused("BAD_CONFIRMATION", "MAC_i")
    finally:
        pending.used = True  # one try, whatever the outcome
    return Session(role="responder", session_id=pending.session_id, send_chain=pending.ck_r2i,
                   receive_chain=pending.ck_i2r, params=pending.params, start=pending.start)


@dataclass(frozen=True)
class Completed:
    msg2: Msg2
    th: bytes
    ss_x: bytes
    ss_k: bytes
    keys: Keys
    msg3: bytes
    peer: str
    session: Session


def initiator_process_msg2(
    msg1: bytes, data: bytes, now: float, *, x25519_private: bytes, mlkem_seed: bytes,
    expected: str, trust: Trust, policy: TimePolicy,
    revoked: Callable[[Credential], bool] | None = None,
) -> Completed:
    """The initiator's msg2 rules, steps 1-6."""
    m = parse_msg2(data)
    cred = parse_credential(m.chain)
    peer = trust.validate(cred, policy, expected=expected, revoked=revoked)
    th = transcript_hash(msg1, m.body)
    verify_signature(cred.key, m.signature, LABEL_MSG2_SIG, th)
    ss_x = x25519_shared(x25519_private, m.x25519)
    ss_k = mlkem.MLKEM768PrivateKey.from_seed_bytes(mlkem_seed).decapsulate(m.mlkem_ct)
    keys = derive_keys(ss_x, ss_k, th)
    if not hmac.compare_digest(mac_r(keys, th, m.signature), m.mac_r):
        raise Refused("BAD_CONFIRMATION", "MAC_r")
    msg3 = build_msg3(keys.session_id, mac_i(keys, th, m.signature, m.mac_r))
    session = Session(role="initiator", session_id=keys.session_id, send_chain=keys.ck_i2r,
                      receive_chain=keys.ck_r2i, params=m.params, start=now)
    return Completed(m, th, ss_x, ss_k, keys, msg3, peer, session)


def build_msg1(
    *, nonce: bytes, x25519_private: bytes, mlkem_seed: bytes, chain: Sequence[bytes],
    responder: str, context: bytes = b"", quote: bytes = b"",
    signature: Callable[[bytes], bytes],
) -> bytes:
    """``signature(signed)`` returns the DER signature over LABEL_MSG1_SIG || signed."""
    ek = mlkem.MLKEM768PrivateKey.from_seed_bytes(mlkem_seed).public_key().public_bytes_raw()
    signed = b"".join((MAGIC, u8(TYPE_MSG1), u16(SUITE), nonce, x25519_public(x25519_private),
                       ek, encode_chain(chain), var16(responder.encode("ascii")),
                       var16(context), var16(quote)))
    return signed + var16(signature(signed))


# ----------------------------------------------------------------------- §5 sessions

HEADER_SIZE = 31


@dataclass
class _Direction:
    chain_key: bytes | None
    next_epoch: int = 0  # the epoch chain_key belongs to
    keys: dict[int, bytes] = field(default_factory=dict)  # epoch -> CK[epoch]

    def key(self, epoch: int) -> bytes:
        if epoch in self.keys:
            return self.keys[epoch]
        if epoch < self.next_epoch or self.chain_key is None:
            raise Refused("EPOCH_OUT_OF_WINDOW", f"keys of epoch {epoch} erased")
        ck = self.chain_key
        while self.next_epoch <= epoch:
            self.keys[self.next_epoch] = ck
            ck = b256(ck, LABEL_CHAIN)
            self.next_epoch += 1
        self.chain_key = ck
        return self.keys[epoch]

    def erase_before(self, epoch: int) -> None:
        for e in [e for e in self.keys if e < epoch]:
            del self.keys[e]
        if self.chain_key is not None:
            while self.next_epoch < epoch:
                self.chain_key = b256(self.chain_key, LABEL_CHAIN)
                self.next_epoch += 1


def epoch_key(chain_key: bytes, sealed: bool) -> bytes:
    """MK[e] (tagged) or SK[e] (sealed) from CK[e]."""
    return b256(chain_key, LABEL_SEAL if sealed else LABEL_MESSAGE)


class Session:
    """One side of an established session (§5)."""

    def __init__(self, *, role: str, session_id: bytes, send_chain: bytes, receive_chain: bytes,
                 params: Params, start: float) -> None:
        self.role = role
        self.session_id = session_id
        self.params = params
        self.start = start
        self.closed = False
        self.flags = 0x10 | (1 if params.sealed else 0)
        self.send = _Direction(send_chain)
        self.recv = _Direction(receive_chain)
        self.send_epoch = 0
        self.recv_floor = 0
        self.top = -1
        self.mask = 0
        self.next_seq = 0

    @property
    def expires_at(self) -> float:
        return self.start + self.params.lifetime_s

    def epoch_at(self, now: float) -> int:
        if now <= self.start:
            return 0
        return math.floor((now - self.start) / (self.params.epoch_ms / 1000))

    def _erase(self, current: int) -> None:
        floor = current - self.params.skew_epochs
        if floor > self.recv_floor:
            self.recv_floor = floor
            self.recv.erase_before(floor)
        if current > self.send_epoch:
            self.send_epoch = current
            self.send.erase_before(current)

    def close(self) -> None:
        self.closed = True
        for d in (self.send, self.recv):
            d.keys.clear()
            d.chain_key = None

    def poll(self, now: float) -> None:
        if self.closed:
            return
        if now >= self.expires_at:
            self.close()
            return
        self._erase(self.epoch_at(now))

    def protect(self, action: bytes, payload: bytes, now: float) -> tuple[bytes, bytes]:
        if self.closed or now >= self.expires_at:
            self.close()
            raise Refused("SESSION_EXPIRED", "closed")
        if len(action) > 0xFFFF:
            raise Refused("BAD_PARAMETERS", "action too long")
        seq = self.next_seq
        if seq > 0xFFFFFFFF:
            raise Refused("SEQUENCE_EXHAUSTED", "")
        self.next_seq += 1
        epoch = self.epoch_at(now)
        self._erase(epoch)
        key = epoch_key(self.send.key(epoch), self.params.sealed)
        prefix = u8(self.flags) + self.session_id + u16(epoch) + u32(seq)
        bound = prefix + u16(len(action)) + action
        if self.params.sealed:
            out = ChaCha20Poly1305(key).encrypt(prefix[9:15] + bytes(6), payload, bound)
            return prefix + out[-16:], out[:-16]
        return prefix + b128(key, bound + payload), payload

    def verify(self, header: bytes, action: bytes, body: bytes, now: float) -> bytes:
        """§5.3, steps 1-10; returns the payload."""
        if len(header) != HEADER_SIZE:
            raise Refused("MALFORMED", f"header of {len(header)} bytes")
        flags = header[0]
        if flags != self.flags:
            if flags >> 4 != 1:
                raise Refused("BAD_VERSION", f"header version {flags >> 4}")
            raise Refused("MALFORMED", f"header flags {flags:#04x}")
        if header[1:9] != self.session_id:
            raise Refused("UNKNOWN_SESSION", "another session id")
        if self.closed or now >= self.expires_at:
            self.close()
            raise Refused("SESSION_EXPIRED", "")
        epoch = int.from_bytes(header[9:11], "big")
        seq = int.from_bytes(header[11:15], "big")
        current, w = self.epoch_at(now), self.params.skew_epochs
        if not current - w <= epoch <= current + w or epoch > self.params.last_epoch:
            raise Refused("EPOCH_OUT_OF_WINDOW", f"epoch {epoch}, receiver at {current}±{w}")
        size = self.params.replay_window
        if seq <= self.top:
            behind = self.top - seq
            if behind >= size or (self.mask >> behind) & 1:
                raise Refused("REPLAYED", f"sequence {seq}")
        self._erase(current)
        key = epoch_key(self.recv.key(epoch), self.params.sealed)
        if len(action) > 0xFFFF:
            raise Refused("MALFORMED", "action too long")
        bound = header[:15] + u16(len(action)) + action
        if self.params.sealed:
            try:
                payload = ChaCha20Poly1305(key).decrypt(header[9:15] + bytes(6),
                                                        body + header[15:], bound)
            except InvalidTag:
                raise Refused("BAD_TAG", "AEAD") from None
        else:
            if not hmac.compare_digest(b128(key, bound + body), header[15:]):
                raise Refused("BAD_TAG", "tag")
            payload = body
        if seq > self.top:
            jump = seq - self.top
            self.mask = ((self.mask << jump) | 1) & ((1 << size) - 1) if jump < size else 1
            self.top = seq
        else:
            self.mask |= 1 << (self.top - seq)
        return payload

    def kept_receive_epochs(self) -> list[int]:
        return sorted(self.recv.keys)


# ----------------------------------------------------------------------- §8 fan-out

LABEL_FANOUT_CHAIN = b"SA1 fanout chain"
LABEL_FANOUT_MAC = b"SA1 fanout mac"
LABEL_FANOUT_ID = b"SA1 fanout id"
FANOUT_FLAGS = 0x12


def fanout_chain(k_n: bytes, length: int) -> list[bytes]:
    """[K_0, K_1, ..., K_N] from K_N."""
    keys = [k_n]
    for _ in range(length):
        keys.append(b256(keys[-1], LABEL_FANOUT_CHAIN))
    keys.reverse()
    return keys


def fanout_chain_id(anchor: bytes) -> bytes:
    return b256(anchor, LABEL_FANOUT_ID)[:8]


def fanout_tag(k_i: bytes, prefix: bytes, topic: bytes, payload: bytes) -> bytes:
    return b128(b256(k_i, LABEL_FANOUT_MAC), prefix + u16(len(topic)) + topic + payload)


def fanout_seal(k_i: bytes, chain_id: bytes, interval: int, topic: bytes, payload: bytes) -> bytes:
    prefix = u8(FANOUT_FLAGS) + chain_id + u16(0) + u32(interval)
    return payload + prefix + fanout_tag(k_i, prefix, topic, payload)


@dataclass
class _FanoutChain:
    interval_s: float
    delay: int
    length: int
    start: float  # seconds on the broker's fan-out clock
    latest: tuple[int, bytes]
    waiting: dict[int, list[tuple[str, bytes]]] = field(default_factory=dict)


class FanoutSubscriber:
    """§8 subscriber rules: the TESLA condition U(t) - start < (i + d - 1) * P_f with
    U(t) = c + max(t - h, 0) * (1 + rho)."""

    def __init__(self, max_pending: int = 10_000, max_drift_ppm: float = 500.0,
                 margin_s: float | None = None) -> None:
        self.chains: dict[bytes, _FanoutChain] = {}
        self.max_pending = max_pending
        self.rho = max_drift_ppm / 1e6
        self.margin_s = margin_s
        self.buffered = 0
        self.hellos: list[tuple[float, bytes]] = []
        self.origin: bytes | None = None
        self.retired: list[bytes] = []
        self.bound: tuple[float, float] | None = None  # (c, h)
        self.used: list[float] = []  # every c used
        self.violation_since: float | None = None

    def hello(self, t: float, nonce: bytes = b"") -> None:
        if len(self.hellos) >= 64:
            raise Refused("INVALID_STATE", "64 hellos unanswered")
        self.hellos.append((t, nonce))

    def upper(self, t: float) -> float:
        assert self.bound is not None
        c, h = self.bound
        return c + max(t - h, 0.0) * (1 + self.rho)

    def _margin(self, chain: _FanoutChain) -> float:
        return self.margin_s if self.margin_s is not None else chain.delay * chain.interval_s / 4

    def _violate(self, t: float) -> list[tuple[str, str]]:
        self.violation_since = t
        out = [(topic, "BAD_CONFIGURATION") for c in self.chains.values()
               for msgs in c.waiting.values() for topic, _ in msgs]
        for c in self.chains.values():
            c.waiting = {}
        self.buffered = 0
        return out

    def _drop(self, cid: bytes, reason: str) -> list[tuple[str, str]]:
        c = self.chains.pop(cid)
        out = [(topic, reason) for msgs in c.waiting.values() for topic, _ in msgs]
        self.buffered -= len(out)
        return out

    def on_anchor(self, body: bytes, hello_sent_at: float | None = None,
                  t: float | None = None) -> list[tuple[str, str]]:
        try:
            a = json.loads(body)
            anchor, cid = bytes.fromhex(a["anchor"]), bytes.fromhex(a["chain"])
            origin = bytes.fromhex(a["origin"])
            interval_s = a["interval_ms"] / 1000
            delay, length = int(a["delay"]), int(a["length"])
            elapsed, start = float(a["elapsed_ms"]), float(a["start_ms"])
            answer, nonce = a["hello"], bytes.fromhex(a.get("nonce", ""))
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:
            raise Refused("MALFORMED", f"anchor: {exc}") from None
        if (len(anchor) != 32 or fanout_chain_id(anchor) != cid or len(origin) != 8
                or type(answer) is not bool or len(nonce) > 32
                or not all(math.isfinite(x) for x in (interval_s, elapsed, start))
                or interval_s <= 0 or not 1 <= delay <= 0xFFFFFFFF
                or not 1 <= length <= 0xFFFFFFFF):
            raise Refused("MALFORMED", "anchor inconsistent")
        start /= 1000
        old = self.chains.get(cid)
        if old is not None and (old.interval_s, old.delay, old.length, old.start) != (
                interval_s, delay, length, start):
            raise Refused("MALFORMED", "anchor contradicts its chain")
        # 1. which hello it answers
        h = hello_sent_at
        if h is None and answer:
            if nonce:
                hit = [n for n, (_, x) in enumerate(self.hellos) if x == nonce]
                if hit:
                    h = self.hellos[hit[0]][0]
                    del self.hellos[: hit[0] + 1]
            elif self.hellos:
                h = self.hellos.pop(0)[0]
        # 2. the broker's clock
        if origin in self.retired:
            return []
        out: list[tuple[str, str]] = []
        if origin != self.origin:
            if self.origin is not None:
                self.retired.append(self.origin)
            for other in list(self.chains):
                out += self._drop(other, "UNKNOWN_SESSION")
            self.origin, self.bound, self.used = origin, None, []
        # 3. the chain
        if cid not in self.chains:
            self.chains[cid] = _FanoutChain(interval_s, delay, length, start, (0, anchor))
            if len(self.chains) > 2:
                first = min(self.chains, key=lambda k: self.chains[k].start)
                out += self._drop(first, "EPOCH_OUT_OF_WINDOW")
        # 4. the bound
        if h is None:
            return out
        c = start + elapsed / 1000
        if any(c <= u for u in self.used):
            return out
        self.used.append(c)
        if self.bound is not None and t is not None and c > self.upper(max(t, h)) + 1e-6:
            out += self._violate(t)
        elif self.violation_since is not None and h >= self.violation_since:
            self.violation_since = None
        self.bound = (c, h)
        return out

    def on_message(self, topic: str, data: bytes, t: float) -> None:
        if len(data) < 31:
            raise Refused("TRUNCATED", "shorter than the trailer")
        cut = len(data) - 31
        trailer = data[cut:]
        flags, cid, zero = trailer[0], trailer[1:9], int.from_bytes(trailer[9:11], "big")
        i = int.from_bytes(trailer[11:15], "big")
        if flags != FANOUT_FLAGS or zero != 0:
            raise Refused("MALFORMED", "not a fan-out trailer")
        c = self.chains.get(cid)
        if c is None:
            raise Refused("UNKNOWN_SESSION", "unknown chain")
        if not 1 <= i <= c.length or i <= c.latest[0]:
            raise Refused("REPLAYED", f"interval {i}")
        if (topic, data) in c.waiting.get(i, []):
            raise Refused("REPLAYED", "duplicate")
        if self.violation_since is not None:
            raise Refused("BAD_CONFIGURATION", "drift beyond the bound")
        if self.bound is None:
            raise Refused("SESSION_EXPIRED", "no bound")
        if self.rho * max(t - self.bound[1], 0.0) > self._margin(c):
            raise Refused("SESSION_EXPIRED", "bound too old")
        if self.upper(t) - c.start >= (i + c.delay - 1) * c.interval_s:
            raise Refused("EPOCH_OUT_OF_WINDOW", f"interval {i} too late")
        if self.buffered >= self.max_pending:
            raise Refused("REPLAYED", "buffer full")
        c.waiting.setdefault(i, []).append((topic, data))
        self.buffered += 1

    def on_key(self, body: bytes, t: float | None = None
               ) -> tuple[list[tuple[str, bytes]], list[tuple[str, str]]]:
        try:
            k = json.loads(body)
            cid, i, key = bytes.fromhex(k["chain"]), int(k["interval"]), bytes.fromhex(k["key"])
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:
            raise Refused("MALFORMED", f"key: {exc}") from None
        c = self.chains.get(cid)
        if c is None:
            raise Refused("UNKNOWN_SESSION", "key for an unknown chain")
        j, kj = c.latest
        if len(key) != 32 or not j < i <= c.length:
            raise Refused("MALFORMED", f"key for interval {i} out of order")
        probe = key
        for _ in range(i - j):
            probe = b256(probe, LABEL_FANOUT_CHAIN)
        if not hmac.compare_digest(probe, kj):
            raise Refused("BAD_TAG", "key does not hash to the chain")
        c.latest = (i, key)
        bad: list[tuple[str, str]] = []
        if (t is not None and self.bound is not None and self.violation_since is None
                and c.start + (i + c.delay - 1) * c.interval_s > self.upper(t) + 1e-6):
            bad += self._violate(t)
        keys = {i: key}
        for n in range(i - 1, j, -1):
            keys[n] = b256(keys[n + 1], LABEL_FANOUT_CHAIN)
        good: list[tuple[str, bytes]] = []
        for n in sorted(x for x in c.waiting if x <= i):
            for topic, data in c.waiting.pop(n):
                self.buffered -= 1
                cut = len(data) - 31
                payload, prefix, tag = data[:cut], data[cut:cut + 15], data[cut + 15:]
                if hmac.compare_digest(fanout_tag(keys[n], prefix, topic.encode(), payload), tag):
                    good.append((topic, payload))
                else:
                    bad.append((topic, "BAD_TAG"))
        return good, bad


# ----------------------------------------------------------------------- §9 CoAP actions

ABSENT = 0xFFFFFFFF


def _str16s(items: Sequence[str]) -> bytes:
    if len(items) > 0xFFFF:
        raise Refused("MALFORMED", "more than 65535 items")
    out = [u16(len(items))]
    for item in items:
        try:
            raw = item.encode("utf-8")
        except UnicodeEncodeError:
            raise Refused("MALFORMED", "not UTF-8") from None
        if len(raw) > 0xFFFF:
            raise Refused("MALFORMED", "item longer than 65535 bytes")
        out.append(var16(raw))
    return b"".join(out)


def _opt(value: int | None) -> bytes:
    if value is not None and not 0 <= value < ABSENT:
        raise Refused("MALFORMED", f"option value {value}")
    return u32(ABSENT if value is None else value)


def _fits(action: bytes) -> bytes:
    if len(action) > 0xFFFF:
        raise Refused("MALFORMED", f"action of {len(action)} bytes")
    return action


def coap_request_action(code: int, path: Sequence[str], query: Sequence[str] = (),
                        content_format: int | None = None, accept: int | None = None,
                        observe: int | None = None) -> bytes:
    if not 0 <= code <= 0xFF:
        raise Refused("MALFORMED", f"code {code}")
    return _fits(b"coap-req\x00" + u8(code) + _str16s(path) + _str16s(query)
                 + _opt(content_format) + _opt(accept) + _opt(observe))


def coap_block_action(request: bytes, number: int, szx: int, more: bool,
                      previous: bytes = bytes(31)) -> bytes:
    """One Block1 block: chained to the previous block's header (zeros for block 0)."""
    if len(previous) != 31 or not 0 <= number < 1 << 20 or not 0 <= szx <= 7:
        raise Refused("MALFORMED", "block fields")
    return _fits(b"coap-blk\x00" + u32(number) + u8(szx) + u8(1 if more else 0) + previous
                 + request)


def coap_response_action(request_header: bytes, code: int, content_format: int | None) -> bytes:
    return b"coap-res\x00" + request_header + u8(code) + _opt(content_format)
