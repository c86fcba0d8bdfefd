"""The SA1 handshake (version 2): three messages, hybrid X25519 + ML-KEM-768, hardware
signatures, and key confirmation by the initiator before the responder grants anything.

    msg1  initiator -> responder   nonce, X25519 share, ML-KEM-768 encapsulation key,
                                   credential, the responder it means to reach,
                                   context, optional TPM quote, signature
    msg2  responder -> initiator   nonce, X25519 share, ML-KEM-768 ciphertext, session
                                   parameters, credential, signature, key confirmation
    msg3  initiator -> responder   session id, key confirmation over the whole transcript

Version 1 had no msg3: an outsider replaying a captured msg1 got a responder session
that adapters treated as a login. Now :meth:`Responder.accept` yields only a
:class:`PendingHandshake` (no session, no identity to log in) and
:meth:`Responder.confirm` turns it into a session once msg3 proves the initiator holds
the keys, as TLS 1.3 Finished and EDHOC message 3 do.

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
from collections.abc import Callable
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
from .keys import Signer
from .params import SessionParams
from .session import Role, Session

MAGIC = b"SA1"
#: message types; the high nibble is the handshake version (2). Version-1 types (0x01,
#: 0x02) are refused with BAD_VERSION so an old peer gets a precise reason.
TYPE_MSG1 = 0x21
TYPE_MSG2 = 0x22
TYPE_MSG3 = 0x23
_V1_TYPES = (0x01, 0x02)
#: the one suite: X25519 + ML-KEM-768, ECDSA P-256/SHA-256, HKDF-SHA-256, BLAKE2s-128,
#: ChaCha20-Poly1305. There is no negotiation, so there is nothing to downgrade.
SUITE = 0x0001

NONCE_SIZE = 32
X25519_SIZE = 32
MLKEM_EK_SIZE = 1184
MLKEM_CT_SIZE = 1088
CONFIRM_SIZE = 32
SESSION_ID_SIZE = 8
MAX_CHAIN = 4
MAX_CERT = 4096
MAX_RESPONDER = 255
MAX_CONTEXT = 512
MAX_QUOTE = 4096
MAX_SIGNATURE = 72  # DER ECDSA P-256 is at most 72 bytes
MSG3_SIZE = 6 + SESSION_ID_SIZE + CONFIRM_SIZE

LABEL_MSG1_SIG = b"SA1v2 msg1 signature"
LABEL_MSG2_SIG = b"SA1v2 msg2 signature"
LABEL_TRANSCRIPT = b"SA1v2 transcript"
LABEL_CONFIRM_R = b"SA1v2 responder confirmation"
LABEL_CONFIRM_I = b"SA1v2 initiator confirmation"
#: one HKDF-Expand gives, in order: session id (8), initiator-to-responder chain key
#: (32), responder-to-initiator chain key (32), responder confirmation key (32),
#: initiator confirmation key (32)
LABEL_KEYS = b"SA1v2 session keys"
KEYS_SIZE = 8 + 4 * 32
#: a pending responder handshake (msg2 sent, no msg3) is dropped after this
DEFAULT_PENDING_TIMEOUT = 10.0

_ECDSA = ec.ECDSA(Prehashed(hashes.SHA256()))


# ---------------------------------------------------------------------------- wire


@dataclass(frozen=True, slots=True)
class HandshakeAnswered:
    """Responder side: msg1 was valid; send ``reply`` (msg2) and keep ``pending``.

    Nothing is granted yet: ``pending`` is not a session and names no peer. Only
    :meth:`~structauth.handshake.Responder.confirm` with the initiator's msg3 yields
    :class:`HandshakeConfirmed`.
    """

    reply: bytes
    pending: PendingHandshake


@dataclass(frozen=True, slots=True)
class HandshakeConfirmed:
    """Responder side: msg3 proved the initiator holds the session keys. Only now is
    there a session, an authenticated peer to log in and a "handshake ok" to audit."""

    session: Session
    peer: Identity
    credential: Credential
    context: bytes
    quote: bytes


@dataclass(frozen=True, slots=True)
class HandshakeCompleted:
    """Initiator side: msg2 was valid and confirmed; ``session`` is ready once
    ``reply`` (msg3) has been sent to the responder."""

    session: Session
    peer: Identity
    credential: Credential
    reply: bytes


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


@dataclass(frozen=True)
class Msg3:
    session_id: bytes
    confirm: bytes


def _read_header(r: wire.Reader, msg_type: int, what: str) -> None:
    magic = r.fixed(3, "magic")
    kind = r.u8("type")
    if magic != MAGIC:
        raise MalformedMessage(f"{what}: not an SA1 message", Reason.BAD_VERSION)
    if kind in _V1_TYPES:
        raise MalformedMessage(
            f"{what}: an SA1 version 1 handshake message; this peer speaks version 2 "
            "(three messages): upgrade the other side", Reason.BAD_VERSION)
    if kind != msg_type:
        raise MalformedMessage(f"{what}: message type {kind:#04x}, expected {msg_type:#04x}")
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
    raw_name = r.var16("responder", min_len=1, max_len=MAX_RESPONDER)
    try:
        responder = raw_name.decode("ascii")
    except UnicodeDecodeError:
        raise MalformedMessage("msg1: responder name is not ASCII") from None
    context = r.var16("context", max_len=MAX_CONTEXT)
    quote = r.var16("quote", max_len=MAX_QUOTE)
    signed = r.consumed
    sig = r.var16("signature", min_len=8, max_len=MAX_SIGNATURE)
    r.end()
    return Msg1(nonce, x, ek, chain, responder, context, quote, sig, signed, data)


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


def parse_msg3(data: bytes) -> Msg3:
    r = wire.Reader(data, "msg3")
    _read_header(r, TYPE_MSG3, "msg3")
    sid = r.fixed(SESSION_ID_SIZE, "session id")
    confirm = r.fixed(CONFIRM_SIZE, "key confirmation")
    r.end()
    return Msg3(sid, confirm)


def msg3_session_id(data: bytes) -> bytes | None:
    """The session id a msg3 names (to find its pending handshake), or None if the bytes
    are not a well-formed msg3. Cheap: no cryptography."""
    try:
        return parse_msg3(data).session_id
    except MalformedMessage:
        return None


# ------------------------------------------------------------------ key schedule


def transcript_hash(msg1: bytes, msg2_body: bytes) -> bytes:
    """Hash of msg1 and msg2 up to its signature: both credentials, both shares,
    both nonces, the responder's name and the session parameters."""
    return hashlib.sha256(
        LABEL_TRANSCRIPT + wire.u32(len(msg1)) + msg1 + wire.u32(len(msg2_body)) + msg2_body
    ).digest()


@dataclass(frozen=True)
class SessionKeys:
    session_id: bytes
    initiator_to_responder: bytes
    responder_to_initiator: bytes
    confirm_responder: bytes
    confirm_initiator: bytes


def derive_keys(x25519_secret: bytes, mlkem_secret: bytes, transcript: bytes) -> SessionKeys:
    """HKDF-SHA-256: extract with the transcript hash as salt over both shared
    secrets (hybrid: an attacker must break X25519 *and* ML-KEM-768), then expand."""
    prk = hmac.digest(transcript, x25519_secret + mlkem_secret, "sha256")
    okm = HKDFExpand(hashes.SHA256(), KEYS_SIZE, LABEL_KEYS).derive(prk)
    return SessionKeys(
        session_id=okm[:8],
        initiator_to_responder=okm[8:40],
        responder_to_initiator=okm[40:72],
        confirm_responder=okm[72:104],
        confirm_initiator=okm[104:136],
    )


def responder_confirmation(keys: SessionKeys, transcript: bytes, signature: bytes) -> bytes:
    """msg2's MAC: BLAKE2s-256(K_cr, label || TH || var16(signature))."""
    return hashlib.blake2s(
        LABEL_CONFIRM_R + transcript + wire.var16(signature), key=keys.confirm_responder
    ).digest()


def initiator_confirmation(
    keys: SessionKeys, transcript: bytes, signature: bytes, confirm_r: bytes
) -> bytes:
    """msg3's MAC over the whole transcript: TH covers msg1 and msg2's body, and the
    rest of msg2 (its signature and MAC) follows."""
    return hashlib.blake2s(
        LABEL_CONFIRM_I + transcript + wire.var16(signature) + confirm_r,
        key=keys.confirm_initiator,
    ).digest()


def build_msg3(session_id: bytes, confirm: bytes) -> bytes:
    return MAGIC + wire.u8(TYPE_MSG3) + wire.u16(SUITE) + session_id + confirm


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
    """Device side of one handshake. Use once: ``start()`` then ``receive()``, then send
    the completion's ``reply`` (msg3) to the responder.

    ``expected_peer`` is the responder this initiator means to reach; it is named in
    msg1 (signed), so a responder refuses a msg1 meant for another and a msg1 captured
    at one broker is worthless at another. Only that identity is accepted in msg2.
    """

    def __init__(
        self,
        *,
        signer: Signer,
        credential: Credential,
        trust: TrustStore,
        expected_peer: Identity,
        entropy: Entropy | None = None,
    ) -> None:
        if not isinstance(expected_peer, Identity):
            raise StateError("expected_peer: the responder's Identity is required",
                             Reason.BAD_PARAMETERS)
        self.state = InitiatorState.IDLE
        self._signer = signer
        self._credential = credential
        self._trust = trust
        self._expected = expected_peer
        self._entropy: Entropy = entropy or SystemEntropy()
        self._x25519: x25519.X25519PrivateKey | None = None
        self._mlkem: mlkem.MLKEM768PrivateKey | None = None
        self._msg1 = b""

    @property
    def expected_peer(self) -> Identity:
        return self._expected

    def start(self, *, context: bytes = b"", quote: bytes = b"") -> bytes:
        """Build msg1. ``context`` is bound by the signature (adapters put e.g. a
        step-up challenge there); ``quote`` carries a TPM quote when asked for."""
        if self.state is not InitiatorState.IDLE:
            raise StateError(f"start() in state {self.state.value}")
        if len(context) > MAX_CONTEXT or len(quote) > MAX_QUOTE:
            raise StateError("context or quote too long", Reason.BAD_PARAMETERS)
        name = self._expected.uri.encode("ascii")
        if len(name) > MAX_RESPONDER:
            raise StateError("responder identity longer than 255 bytes", Reason.BAD_PARAMETERS)
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
                wire.var16(name),
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

    def receive(
        self, data: bytes, now: float, policy: TimePolicy, *,
        revoked: RevocationCheck | None = None,
    ) -> HandshakeCompleted:
        """Process msg2 at monotonic time ``now``; any failure is final. The event's
        ``reply`` is msg3, which the adapter must send before anything else."""
        if self.state is not InitiatorState.SENT_MSG1:
            raise StateError(f"receive() in state {self.state.value}")
        try:
            return self._receive(data, now, policy, revoked)
        except BaseException:
            self._fail()
            raise

    def _receive(
        self, data: bytes, now: float, policy: TimePolicy, revoked: RevocationCheck | None
    ) -> HandshakeCompleted:
        m = parse_msg2(data)
        assert self._x25519 is not None and self._mlkem is not None
        credential = self._trust.credential(m.chain)
        peer = self._trust.validate(credential, policy, revoked=revoked, expected=self._expected)
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
        if not hmac.compare_digest(
            responder_confirmation(keys, transcript, m.signature), m.confirm
        ):
            raise VerificationFailed("key confirmation failed", Reason.BAD_CONFIRMATION)
        self._erase()
        msg3 = build_msg3(
            keys.session_id, initiator_confirmation(keys, transcript, m.signature, m.confirm)
        )
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
        return HandshakeCompleted(session, peer, credential, msg3)

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
    gets through the cache, but it cannot become a session: the replayer lacks the
    ephemeral keys, so it cannot produce msg3 and the pending handshake is dropped at
    its deadline having granted nothing. The cache saves the CPU of building msg2 and
    the hardware signature. Bound: ``max_entries`` nonces (~100 B each).

    The cache itself is in memory and sans-IO. Adapters make it outlive a restart or
    span replicas (docs/PROTOCOL.md section 4.8) through two hooks:

    * ``on_add(nonce, expires_at)`` is called for every nonce this responder records
      (after a msg1 proved itself), with its expiry on the caller's clock: what to
      persist or share. It runs inside :meth:`Responder.accept`, so it must be cheap
      and must not raise (hand the entry to a bounded queue; drop and count if full).
    * :meth:`remember` feeds in a nonce seen elsewhere (loaded from a file, or recorded
      by another replica), with its expiry converted to the caller's clock. It does not
      call ``on_add``.

    Both kinds of entry share the one bound. Entries are kept in arrival order; an
    entry remembered with an earlier expiry than newer ones leaves when the older ones
    ahead of it do (at most ``ttl`` late), and :meth:`check` tests each entry's own
    expiry.
    """

    def __init__(
        self,
        ttl: float = 600.0,
        max_entries: int = 100_000,
        *,
        on_add: Callable[[bytes, float], None] | None = None,
    ) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.on_add = on_add
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
        expiry = self._seen.get(nonce)
        if expiry is not None and expiry > now:
            raise ReplayDetected("msg1 nonce seen before", Reason.HANDSHAKE_REPLAYED)

    def add(self, nonce: bytes, now: float) -> None:
        expiry = now + self.ttl
        seen = self._seen
        if nonce in seen:  # an expired entry still waiting behind a longer-lived one
            del seen[nonce]
        seen[nonce] = expiry
        self._expire(now)
        if self.on_add is not None:
            self.on_add(nonce, expiry)

    def remember(self, nonce: bytes, expires_at: float, now: float) -> bool:
        """Record a nonce seen elsewhere until ``expires_at`` (the caller's clock, as
        ``now``), at most ``ttl`` from now. False if it is already expired or already
        known for at least as long; does not call ``on_add``."""
        expires_at = min(expires_at, now + self.ttl)
        if not expires_at > now:  # also refuses NaN
            return False
        seen = self._seen
        known = seen.get(nonce)
        if known is not None:
            if known >= expires_at:
                return False
            seen[nonce] = expires_at
            return True
        seen[nonce] = expires_at
        self._expire(now)
        return True

    def __len__(self) -> int:
        return len(self._seen)


class PendingHandshake:
    """A responder's handshake between msg2 and msg3. It is *not* a session and carries
    no identity an adapter could log in: the only way forward is
    :meth:`Responder.confirm` with a msg3 that verifies before ``deadline``.

    Size: the session id, the expected msg3 MAC, two chain keys, the parameters and
    references to the (cached) credential, plus the context and quote the initiator
    signed (at most 512 and 4096 bytes; usually empty): about 400 bytes of Python
    objects. Adapters bound how many they hold.
    """

    __slots__ = (
        "_ck_i2r",
        "_ck_r2i",
        "_context",
        "_credential",
        "_expect",
        "_params",
        "_peer",
        "_quote",
        "_used",
        "deadline",
        "session_id",
        "start",
    )

    def __init__(
        self, *, session_id: bytes, expect: bytes, ck_i2r: bytes, ck_r2i: bytes,
        params: SessionParams, start: float, deadline: float, peer: Identity,
        credential: Credential, context: bytes, quote: bytes,
    ) -> None:
        self.session_id = session_id
        self.start = start
        self.deadline = deadline
        self._expect = expect
        self._ck_i2r = ck_i2r
        self._ck_r2i = ck_r2i
        self._params = params
        self._peer = peer
        self._credential = credential
        self._context = context
        self._quote = quote
        self._used = False

    def expired(self, now: float) -> bool:
        return self._used or now >= self.deadline

    def discard(self) -> None:
        """Drop the keys (timed out, connection gone, replaced)."""
        self._used = True
        self._ck_i2r = self._ck_r2i = self._expect = b""


class Responder:
    """Broker/gateway side. Long-lived: answers any number of msg1s.

    ``accept(msg1)`` returns msg2 and a :class:`PendingHandshake`;
    ``confirm(pending, msg3)`` returns the session and the peer's identity. Nothing
    before ``confirm`` succeeds is an authenticated peer.
    """

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
        pending_timeout: float = DEFAULT_PENDING_TIMEOUT,
    ) -> None:
        if not 0 < pending_timeout <= 60:
            raise StateError(f"pending_timeout {pending_timeout} outside (0, 60] s",
                             Reason.BAD_PARAMETERS)
        self._signer = signer
        self._credential = credential
        self._chain = _chain_bytes(credential.der_chain())
        self._trust = trust
        self.params = params or SessionParams()
        self.nonces = nonce_cache if nonce_cache is not None else NonceCache()
        self._kind = peer_kind
        self._entropy: Entropy = entropy or SystemEntropy()
        self.pending_timeout = pending_timeout

    @property
    def trust_domain(self) -> str:
        """The trust domain whose credentials this responder accepts."""
        return self._trust.trust_domain

    @property
    def identity(self) -> Identity:
        """This responder's own identity: what initiators must name in msg1."""
        return self._credential.identity

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
        """Validate msg1 and answer it with msg2. Raises a ProtocolError for anything
        wrong; the responder's own state is untouched by a failed msg1. The result
        grants nothing until :meth:`confirm` verifies msg3."""
        m = parse_msg1(data)
        if m.responder != self._credential.identity.uri:
            # before any cryptography: a msg1 for another responder costs a parse
            raise VerificationFailed(
                f"msg1 is addressed to {m.responder}, not to this responder "
                f"({self._credential.identity.uri})", Reason.WRONG_IDENTITY)
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
            x_secret = eph.exchange(peer_x)  # raises on an all-zero shared secret
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
        confirm_r = responder_confirmation(keys, transcript, sig)
        reply = body + wire.var16(sig) + confirm_r
        # Record the nonce only once msg1 proved itself, so junk cannot fill the cache.
        self.nonces.add(m.nonce, now)
        pending = PendingHandshake(
            session_id=keys.session_id,
            expect=initiator_confirmation(keys, transcript, sig, confirm_r),
            ck_i2r=keys.initiator_to_responder,
            ck_r2i=keys.responder_to_initiator,
            params=chosen,
            start=now,
            deadline=now + self.pending_timeout,
            peer=peer,
            credential=credential,
            context=m.context,
            quote=m.quote,
        )
        return HandshakeAnswered(reply, pending)

    def confirm(self, pending: PendingHandshake, data: bytes, now: float) -> HandshakeConfirmed:
        """Verify msg3 for ``pending``. On success the session exists, established,
        and the event names the authenticated peer. Any failure discards ``pending``
        (a pending handshake gets one try)."""
        try:
            m = parse_msg3(data)
            if pending.expired(now):
                raise VerificationFailed(
                    "no key confirmation before the pending handshake's deadline",
                    Reason.BAD_CONFIRMATION)
            if m.session_id != pending.session_id:
                raise VerificationFailed("msg3 names another session", Reason.UNKNOWN_SESSION)
            if not hmac.compare_digest(m.confirm, pending._expect):
                raise VerificationFailed("key confirmation failed", Reason.BAD_CONFIRMATION)
        except BaseException:
            pending.discard()
            raise
        session = Session(
            role=Role.RESPONDER,
            session_id=pending.session_id,
            send_chain_key=pending._ck_r2i,
            receive_chain_key=pending._ck_i2r,
            params=pending._params,
            start=pending.start,
            peer=pending._peer,
        )
        event = HandshakeConfirmed(
            session, pending._peer, pending._credential, pending._context, pending._quote
        )
        pending.discard()
        return event


__all__ = [
    "DEFAULT_PENDING_TIMEOUT",
    "HandshakeAnswered",
    "HandshakeCompleted",
    "HandshakeConfirmed",
    "Initiator",
    "InitiatorState",
    "NonceCache",
    "PendingHandshake",
    "ProtocolError",
    "Responder",
    "msg3_session_id",
    "parse_msg1",
    "parse_msg2",
    "parse_msg3",
]
