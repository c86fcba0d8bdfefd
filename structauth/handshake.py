"""The SA1 handshake: two messages, hybrid X25519 + ML-KEM-768, hardware signatures.

    msg1  initiator -> responder   nonce, X25519 share, ML-KEM-768 encapsulation key,
                                   credential, context, optional TPM quote, signature
    msg2  responder -> initiator   nonce, X25519 share, ML-KEM-768 ciphertext, session
                                   parameters, credential, signature, key confirmation

Byte layouts, the key schedule and the reasons behind each check are in
docs/PROTOCOL.md. Everything here is sans-IO: bytes and a time value in, bytes and
events out. Signing goes through the :class:`~structauth.keys.Signer` the caller hands
in (a TPM or PKCS#11 key); the core never sees private key material of long-term keys.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections import OrderedDict
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, mlkem, x25519
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from . import wire
from .credentials import Credential, Identity, RevocationCheck, TimePolicy, TrustStore
from .entropy import Entropy, SystemEntropy
from .errors import (
    MalformedMessage,
    ProtocolError,
    Reason,
    ReplayDetected,
    StateError,
    VerificationFailed,
)
from .events import HandshakeAnswered, HandshakeCompleted
from .keys import Signer
from .params import SessionParams
from .session import DEFAULT_CONFIRM_TIMEOUT, Role, Session

MAGIC = b"SA1"
TYPE_MSG1 = 0x01
TYPE_MSG2 = 0x02
#: the one suite: X25519 + ML-KEM-768, ECDSA P-256/SHA-256, HKDF-SHA-256, BLAKE2s-128,
#: ChaCha20-Poly1305. There is no negotiation, so there is nothing to downgrade.
SUITE = 0x0001

NONCE_SIZE = 32
X25519_SIZE = 32
MLKEM_EK_SIZE = 1184
MLKEM_CT_SIZE = 1088
CONFIRM_SIZE = 32
MAX_CHAIN = 4
MAX_CERT = 4096
MAX_CONTEXT = 512
MAX_QUOTE = 4096
MAX_SIGNATURE = 72  # DER ECDSA P-256 is at most 72 bytes

LABEL_MSG1_SIG = b"SA1 msg1 signature"
LABEL_MSG2_SIG = b"SA1 msg2 signature"
LABEL_TRANSCRIPT = b"SA1 transcript"
LABEL_CONFIRM = b"SA1 key confirmation"
#: one HKDF-Expand gives, in order: session id (8), initiator-to-responder chain key
#: (32), responder-to-initiator chain key (32), confirmation key (32)
LABEL_KEYS = b"SA1 session keys"

_ECDSA = ec.ECDSA(Prehashed(hashes.SHA256()))


# ---------------------------------------------------------------------------- wire


@dataclass(frozen=True)
class Msg1:
    nonce: bytes
    x25519: bytes
    mlkem_ek: bytes
    chain: tuple[bytes, ...]
    context: bytes
    quote: bytes
    signature: bytes
    #: every byte before the signature field, which is what the signature covers
    signed: bytes
    raw: bytes


@dataclass(frozen=True)
class Msg2:
    nonce: bytes
    x25519: bytes
    mlkem_ct: bytes
    params: SessionParams
    chain: tuple[bytes, ...]
    signature: bytes
    confirm: bytes
    #: every byte before the signature field
    body: bytes


def _read_header(r: wire.Reader, msg_type: int, what: str) -> None:
    magic = r.fixed(3, "magic")
    kind = r.u8("type")
    if magic != MAGIC:
        raise MalformedMessage(f"{what}: not an SA1 message", Reason.BAD_VERSION)
    if kind != msg_type:
        raise MalformedMessage(f"{what}: message type {kind}, expected {msg_type}")
    suite = r.u16("suite")
    if suite != SUITE:
        raise MalformedMessage(f"{what}: unknown suite {suite:#06x}", Reason.UNKNOWN_SUITE)


def _read_chain(r: wire.Reader) -> tuple[bytes, ...]:
    count = r.u8("credential count")
    if not 1 <= count <= MAX_CHAIN:
        raise MalformedMessage(f"credential chain of {count} certificates (1..{MAX_CHAIN})")
    return tuple(r.var16("certificate", min_len=1, max_len=MAX_CERT) for _ in range(count))


def _chain_bytes(chain: list[bytes]) -> bytes:
    return wire.u8(len(chain)) + b"".join(wire.var16(c) for c in chain)


def parse_msg1(data: bytes) -> Msg1:
    r = wire.Reader(data, "msg1")
    _read_header(r, TYPE_MSG1, "msg1")
    nonce = r.fixed(NONCE_SIZE, "nonce")
    x = r.fixed(X25519_SIZE, "x25519 share")
    ek = r.fixed(MLKEM_EK_SIZE, "ML-KEM encapsulation key")
    chain = _read_chain(r)
    context = r.var16("context", max_len=MAX_CONTEXT)
    quote = r.var16("quote", max_len=MAX_QUOTE)
    signed = r.consumed
    sig = r.var16("signature", min_len=8, max_len=MAX_SIGNATURE)
    r.end()
    return Msg1(nonce, x, ek, chain, context, quote, sig, signed, data)


def parse_msg2(data: bytes) -> Msg2:
    r = wire.Reader(data, "msg2")
    _read_header(r, TYPE_MSG2, "msg2")
    nonce = r.fixed(NONCE_SIZE, "nonce")
    x = r.fixed(X25519_SIZE, "x25519 share")
    ct = r.fixed(MLKEM_CT_SIZE, "ML-KEM ciphertext")
    params = SessionParams.read(r)
    chain = _read_chain(r)
    body = r.consumed
    sig = r.var16("signature", min_len=8, max_len=MAX_SIGNATURE)
    confirm = r.fixed(CONFIRM_SIZE, "key confirmation")
    r.end()
    return Msg2(nonce, x, ct, params, chain, sig, confirm, body)


# ------------------------------------------------------------------ key schedule


def transcript_hash(msg1: bytes, msg2_body: bytes) -> bytes:
    """Hash of msg1 and msg2 up to its signature: both credentials, both shares,
    both nonces and the session parameters."""
    return hashlib.sha256(
        LABEL_TRANSCRIPT + wire.u32(len(msg1)) + msg1 + wire.u32(len(msg2_body)) + msg2_body
    ).digest()


@dataclass(frozen=True)
class SessionKeys:
    session_id: bytes
    initiator_to_responder: bytes
    responder_to_initiator: bytes
    confirm: bytes


def derive_keys(x25519_secret: bytes, mlkem_secret: bytes, transcript: bytes) -> SessionKeys:
    """HKDF-SHA-256: extract with the transcript hash as salt over both shared
    secrets (hybrid: an attacker must break X25519 *and* ML-KEM-768), then expand."""
    prk = hmac.digest(transcript, x25519_secret + mlkem_secret, "sha256")
    okm = HKDFExpand(hashes.SHA256(), 104, LABEL_KEYS).derive(prk)
    return SessionKeys(
        session_id=okm[:8],
        initiator_to_responder=okm[8:40],
        responder_to_initiator=okm[40:72],
        confirm=okm[72:104],
    )


def confirmation(keys: SessionKeys, transcript: bytes, signature: bytes) -> bytes:
    return hashlib.blake2s(LABEL_CONFIRM + transcript + signature, key=keys.confirm).digest()


def _sign(signer: Signer, label: bytes, data: bytes) -> bytes:
    sig = signer.sign_digest(hashlib.sha256(label + data).digest())
    if not 8 <= len(sig) <= MAX_SIGNATURE:
        raise StateError("key backend returned a malformed signature", Reason.BACKEND_FAILURE)
    return sig


def _verify(key: ec.EllipticCurvePublicKey, sig: bytes, label: bytes, data: bytes) -> None:
    try:
        key.verify(sig, hashlib.sha256(label + data).digest(), _ECDSA)
    except (InvalidSignature, ValueError):
        raise VerificationFailed("handshake signature invalid", Reason.BAD_SIGNATURE) from None


# ---------------------------------------------------------------------- initiator


class InitiatorState(enum.Enum):
    IDLE = "idle"
    SENT_MSG1 = "sent-msg1"
    COMPLETED = "completed"
    FAILED = "failed"


class Initiator:
    """Device side of one handshake. Use once: ``start()`` then ``receive()``."""

    def __init__(
        self,
        *,
        signer: Signer,
        credential: Credential,
        trust: TrustStore,
        expected_peer: Identity | None = None,
        peer_kind: str | None = "broker",
        entropy: Entropy | None = None,
    ) -> None:
        self.state = InitiatorState.IDLE
        self._signer = signer
        self._credential = credential
        self._trust = trust
        self._expected = expected_peer
        self._kind = peer_kind
        self._entropy: Entropy = entropy or SystemEntropy()
        self._x25519: x25519.X25519PrivateKey | None = None
        self._mlkem: mlkem.MLKEM768PrivateKey | None = None
        self._msg1 = b""

    def start(self, *, context: bytes = b"", quote: bytes = b"") -> bytes:
        """Build msg1. ``context`` is bound by the signature (adapters put e.g. a
        step-up challenge there); ``quote`` carries a TPM quote when asked for."""
        if self.state is not InitiatorState.IDLE:
            raise StateError(f"start() in state {self.state.value}")
        if len(context) > MAX_CONTEXT or len(quote) > MAX_QUOTE:
            raise StateError("context or quote too long", Reason.BAD_PARAMETERS)
        e = self._entropy
        nonce = e.random_bytes(NONCE_SIZE)
        self._x25519 = x25519.X25519PrivateKey.from_private_bytes(e.random_bytes(32))
        self._mlkem = mlkem.MLKEM768PrivateKey.from_seed_bytes(e.random_bytes(64))
        signed = b"".join(
            (
                MAGIC,
                wire.u8(TYPE_MSG1),
                wire.u16(SUITE),
                nonce,
                self._x25519.public_key().public_bytes_raw(),
                self._mlkem.public_key().public_bytes_raw(),
                _chain_bytes(self._credential.der_chain()),
                wire.var16(context),
                wire.var16(quote),
            )
        )
        try:
            sig = _sign(self._signer, LABEL_MSG1_SIG, signed)
        except BaseException:
            self._fail()
            raise
        self._msg1 = signed + wire.var16(sig)
        self.state = InitiatorState.SENT_MSG1
        return self._msg1

    def receive(self, data: bytes, now: float, policy: TimePolicy) -> HandshakeCompleted:
        """Process msg2 at monotonic time ``now``; any failure is final."""
        if self.state is not InitiatorState.SENT_MSG1:
            raise StateError(f"receive() in state {self.state.value}")
        try:
            return self._receive(data, now, policy)
        except BaseException:
            self._fail()
            raise

    def _receive(self, data: bytes, now: float, policy: TimePolicy) -> HandshakeCompleted:
        m = parse_msg2(data)
        assert self._x25519 is not None and self._mlkem is not None
        credential = self._trust.credential(m.chain)
        peer = self._trust.validate(credential, policy, expected=self._expected, kind=self._kind)
        transcript = transcript_hash(self._msg1, m.body)
        _verify(credential.public_key, m.signature, LABEL_MSG2_SIG, transcript)
        try:
            x_secret = self._x25519.exchange(x25519.X25519PublicKey.from_public_bytes(m.x25519))
        except ValueError:
            raise VerificationFailed("bad X25519 share", Reason.BAD_KEY_SHARE) from None
        try:
            k_secret = self._mlkem.decapsulate(m.mlkem_ct)
        except ValueError:
            raise VerificationFailed("bad ML-KEM ciphertext", Reason.BAD_KEY_SHARE) from None
        keys = derive_keys(x_secret, k_secret, transcript)
        if not hmac.compare_digest(confirmation(keys, transcript, m.signature), m.confirm):
            raise VerificationFailed("key confirmation failed", Reason.BAD_CONFIRMATION)
        self._erase()
        session = Session(
            role=Role.INITIATOR,
            session_id=keys.session_id,
            send_chain_key=keys.initiator_to_responder,
            receive_chain_key=keys.responder_to_initiator,
            params=m.params,
            start=now,
            peer=peer,
        )
        self.state = InitiatorState.COMPLETED
        return HandshakeCompleted(session, peer, credential)

    def _erase(self) -> None:
        # Ephemeral private keys are dropped as soon as the secrets are derived.
        self._x25519 = None
        self._mlkem = None

    def _fail(self) -> None:
        self._erase()
        self.state = InitiatorState.FAILED


# ---------------------------------------------------------------------- responder


class NonceCache:
    """msg1 nonces seen recently, to refuse replayed handshakes cheaply.

    A replay older than ``ttl`` (or pushed out by ``max_entries`` newer handshakes)
    gets through the cache, but it still cannot become a usable session: the replayer
    lacks the ephemeral keys, so the responder session never leaves UNCONFIRMED and is
    dropped at its confirmation deadline. The cache saves the CPU and the state.
    """

    def __init__(self, ttl: float = 600.0, max_entries: int = 100_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._seen: OrderedDict[bytes, float] = OrderedDict()

    def _expire(self, now: float) -> None:
        seen = self._seen
        while seen:
            nonce, expiry = next(iter(seen.items()))
            if expiry > now and len(seen) <= self.max_entries:
                break
            del seen[nonce]

    def check(self, nonce: bytes, now: float) -> None:
        self._expire(now)
        if nonce in self._seen:
            raise ReplayDetected("msg1 nonce seen before", Reason.HANDSHAKE_REPLAYED)

    def add(self, nonce: bytes, now: float) -> None:
        self._seen[nonce] = now + self.ttl
        self._expire(now)

    def __len__(self) -> int:
        return len(self._seen)


class Responder:
    """Broker/gateway side. Long-lived: answers any number of msg1s."""

    def __init__(
        self,
        *,
        signer: Signer,
        credential: Credential,
        trust: TrustStore,
        params: SessionParams | None = None,
        nonce_cache: NonceCache | None = None,
        peer_kind: str | None = "device",
        entropy: Entropy | None = None,
        confirm_timeout: float = DEFAULT_CONFIRM_TIMEOUT,
    ) -> None:
        self._signer = signer
        self._credential = credential
        self._chain = _chain_bytes(credential.der_chain())
        self._trust = trust
        self.params = params or SessionParams()
        self.nonces = nonce_cache if nonce_cache is not None else NonceCache()
        self._kind = peer_kind
        self._entropy: Entropy = entropy or SystemEntropy()
        self._confirm_timeout = confirm_timeout

    @property
    def trust_domain(self) -> str:
        """The trust domain whose credentials this responder accepts."""
        return self._trust.trust_domain

    def accept(
        self,
        data: bytes,
        now: float,
        policy: TimePolicy,
        *,
        revoked: RevocationCheck | None = None,
        expected_peer: Identity | None = None,
        params: SessionParams | None = None,
    ) -> HandshakeAnswered:
        """Validate msg1 and answer it. Raises a ProtocolError for anything wrong;
        the responder's own state is untouched by a failed msg1."""
        m = parse_msg1(data)
        self.nonces.check(m.nonce, now)
        credential = self._trust.credential(m.chain)
        peer = self._trust.validate(
            credential, policy, revoked=revoked, expected=expected_peer, kind=self._kind
        )
        _verify(credential.public_key, m.signature, LABEL_MSG1_SIG, m.signed)
        try:
            peer_x = x25519.X25519PublicKey.from_public_bytes(m.x25519)
            peer_ek = mlkem.MLKEM768PublicKey.from_public_bytes(m.mlkem_ek)
        except ValueError:
            raise VerificationFailed("bad key share in msg1", Reason.BAD_KEY_SHARE) from None
        e = self._entropy
        nonce = e.random_bytes(NONCE_SIZE)
        eph = x25519.X25519PrivateKey.from_private_bytes(e.random_bytes(32))
        try:
            x_secret = eph.exchange(peer_x)
        except ValueError:
            raise VerificationFailed("bad X25519 share", Reason.BAD_KEY_SHARE) from None
        k_secret, ct = e.encapsulate(peer_ek)
        chosen = params or self.params
        body = b"".join(
            (
                MAGIC,
                wire.u8(TYPE_MSG2),
                wire.u16(SUITE),
                nonce,
                eph.public_key().public_bytes_raw(),
                ct,
                chosen.encode(),
                self._chain,
            )
        )
        del eph  # ephemeral private key erased once the secret is derived
        transcript = transcript_hash(m.raw, body)
        keys = derive_keys(x_secret, k_secret, transcript)
        sig = _sign(self._signer, LABEL_MSG2_SIG, transcript)
        reply = body + wire.var16(sig) + confirmation(keys, transcript, sig)
        # Record the nonce only once msg1 proved itself, so junk cannot fill the cache.
        self.nonces.add(m.nonce, now)
        session = Session(
            role=Role.RESPONDER,
            session_id=keys.session_id,
            send_chain_key=keys.responder_to_initiator,
            receive_chain_key=keys.initiator_to_responder,
            params=chosen,
            start=now,
            peer=peer,
            confirm_timeout=self._confirm_timeout,
        )
        return HandshakeAnswered(reply, session, peer, credential, m.context, m.quote)


__all__ = [
    "HandshakeAnswered",
    "HandshakeCompleted",
    "Initiator",
    "InitiatorState",
    "NonceCache",
    "ProtocolError",
    "Responder",
    "parse_msg1",
    "parse_msg2",
]
