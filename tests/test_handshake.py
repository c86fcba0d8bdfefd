"""SA1 v2 handshake (three messages): the happy path and a negative test for every field
and property. Negative tests assert the refusal, its Reason, and that nothing else
changed (no nonce recorded, no signature made, the pending or initiator left as the
protocol says)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from simulator.fleet import NOW, T0, Fleet, Member
from structauth import handshake as hs
from structauth import wire
from structauth.credentials import Credential, Identity, TimePolicy
from structauth.errors import (
    CredentialError,
    MalformedMessage,
    ProtocolError,
    Reason,
    ReplayDetected,
    StateError,
    TesseraError,
    VerificationFailed,
)
from structauth.events import HandshakeAnswered, HandshakeConfirmed
from structauth.handshake import (
    LABEL_MSG1_SIG,
    LABEL_MSG2_SIG,
    MLKEM_CT_SIZE,
    MLKEM_EK_SIZE,
    MSG3_SIZE,
    TYPE_MSG1,
    TYPE_MSG2,
    TYPE_MSG3,
    Initiator,
    InitiatorState,
    NonceCache,
    PendingHandshake,
    Responder,
    msg3_session_id,
    parse_msg1,
    parse_msg2,
    parse_msg3,
    transcript_hash,
)
from structauth.params import SessionParams
from structauth.session import Session, SessionState
from tests.support import FakeClock, SessionPair

TOPIC = b"devices/d1/telemetry"
#: refusals that come from the byte framing (a length field that no longer fits)
FRAMING = {Reason.MALFORMED, Reason.TRUNCATED, Reason.TRAILING_BYTES}


class CountingSigner:
    """Wraps a signer and counts its signatures (to show a refusal cost none)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.backend = inner.backend
        self.calls = 0

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self.inner.public_key()  # type: ignore[no-any-return]

    def sign_digest(self, digest: bytes) -> bytes:
        self.calls += 1
        return self.inner.sign_digest(digest)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def fleet() -> Fleet:
    return Fleet()


@pytest.fixture(scope="module")
def device(fleet: Fleet) -> Member:
    return fleet.member("device", "d1")


@pytest.fixture(scope="module")
def broker(fleet: Fleet) -> Member:
    return fleet.member("broker", "b1")


def initiator(fleet: Fleet, device: Member, broker: Member | Identity) -> Initiator:
    peer = broker if isinstance(broker, Identity) else broker.identity
    return Initiator(
        signer=device.signer, credential=device.credential, trust=fleet.trust, expected_peer=peer
    )


def responder(fleet: Fleet, broker: Member, **kw: Any) -> Responder:
    kw.setdefault("signer", CountingSigner(broker.signer))
    return Responder(credential=broker.credential, trust=fleet.trust, **kw)


def make_pair(
    fleet: Fleet, device: Member, broker: Member, *, params: SessionParams | None = None
) -> tuple[Initiator, Responder]:
    return initiator(fleet, device, broker), responder(fleet, broker, params=params)


def signs(res: Responder) -> int:
    signer = res._signer
    assert isinstance(signer, CountingSigner)
    return signer.calls


def handshake(fleet: Fleet, device: Member, broker: Member, **kw: Any) -> SessionPair:
    ini, res = make_pair(fleet, device, broker, **kw)
    return SessionPair.handshake(ini, res, NOW)


@dataclasses.dataclass
class Flight:
    """One handshake stopped after msg2: everything a msg3 test needs."""

    ini: Initiator
    res: Responder
    msg1: bytes
    answered: HandshakeAnswered
    msg3: bytes
    #: the initiator's session (usable at once)
    session: Session
    now: float


def flight(fleet: Fleet, device: Member, broker: Member, now: float = 100.0, **kw: Any) -> Flight:
    ini = initiator(fleet, device, broker)
    res = responder(fleet, broker, **kw)
    msg1 = ini.start(context=b"ctx", quote=b"quote")
    answered = res.accept(msg1, now, NOW)
    done = ini.receive(answered.reply, now, NOW)
    return Flight(ini, res, msg1, answered, done.reply, done.session, now)


def resign_msg1(signer: Any, signed: bytes) -> bytes:
    digest = hashlib.sha256(LABEL_MSG1_SIG + signed).digest()
    return signed + wire.var16(signer.sign_digest(digest))


# -- the happy path ----------------------------------------------------------------


def test_three_message_handshake_and_messages(
    fleet: Fleet, device: Member, broker: Member
) -> None:
    clock = FakeClock()
    ini, res = make_pair(fleet, device, broker)
    msg1 = ini.start()
    assert msg1[:4] == b"SA1\x21" and parse_msg1(msg1).responder == broker.identity.uri
    answered = res.accept(msg1, clock.now, NOW)
    assert answered.reply[:4] == b"SA1\x22"
    assert [f.name for f in dataclasses.fields(answered)] == ["reply", "pending"]
    done = ini.receive(answered.reply, clock.now, NOW)
    assert done.peer == broker.identity and ini.state is InitiatorState.COMPLETED
    msg3 = done.reply
    assert len(msg3) == MSG3_SIZE == 46 and msg3[:6] == b"SA1\x23\x00\x01"
    assert msg3[6:14] == done.session.session_id == answered.pending.session_id
    assert msg3_session_id(msg3) == answered.pending.session_id
    confirmed = res.confirm(answered.pending, msg3, clock.now)
    assert isinstance(confirmed, HandshakeConfirmed)
    assert confirmed.peer == device.identity and confirmed.credential == device.credential
    assert confirmed.session.peer == device.identity
    assert confirmed.session.session_id == done.session.session_id
    assert confirmed.session.state is SessionState.ESTABLISHED
    assert done.session.state is SessionState.ESTABLISHED
    assert answered.pending.expired(clock.now)  # used up
    pair = SessionPair(done.session, confirmed.session, clock)
    h, b = pair.up(TOPIC, b"21.5")
    assert pair.responder.verify(h, TOPIC, b, pair.clock.now).payload == b"21.5"
    # the responder may send at once (there is no unconfirmed state any more)
    h, b = pair.down(b"devices/d1/commands/x", b"go")
    assert pair.initiator.verify(h, b"devices/d1/commands/x", b, pair.clock.now).payload == b"go"


def test_session_state_has_no_unconfirmed() -> None:
    assert {s.name for s in SessionState} == {"ESTABLISHED", "CLOSED"}


def test_initiator_needs_expected_peer(fleet: Fleet, device: Member) -> None:
    with pytest.raises(TypeError):
        Initiator(signer=device.signer, credential=device.credential, trust=fleet.trust)  # type: ignore[call-arg]
    with pytest.raises(StateError) as exc:
        Initiator(
            signer=device.signer,
            credential=device.credential,
            trust=fleet.trust,
            expected_peer="spiffe://fleet.test/broker/b1",  # type: ignore[arg-type]
        )
    assert exc.value.reason is Reason.BAD_PARAMETERS


def test_params_chosen_by_responder_reach_initiator(
    fleet: Fleet, device: Member, broker: Member
) -> None:
    params = SessionParams(
        epoch_ms=5000, skew_epochs=1, lifetime_s=120, sealed=True, policy_digest=b"\x07" * 32
    )
    pair = handshake(fleet, device, broker, params=params)
    assert pair.initiator.params == params == pair.responder.params
    h, b = pair.up(TOPIC, b"secret")
    assert b != b"secret"
    assert pair.responder.verify(h, TOPIC, b, pair.clock.now).payload == b"secret"


def test_context_and_quote_reach_responder_only_after_confirm(
    fleet: Fleet, device: Member, broker: Member
) -> None:
    f = flight(fleet, device, broker)
    confirmed = f.res.confirm(f.answered.pending, f.msg3, f.now)
    assert confirmed.context == b"ctx" and confirmed.quote == b"quote"


def test_pending_exposes_no_identity_and_no_session(
    fleet: Fleet, device: Member, broker: Member
) -> None:
    """Nothing may be granted before msg3: the pending has nothing to log in with."""
    f = flight(fleet, device, broker)
    pending = f.answered.pending
    public = {name for name in dir(pending) if not name.startswith("_")}
    assert public == {"deadline", "discard", "expired", "session_id", "start"}
    assert pending.deadline == f.now + hs.DEFAULT_PENDING_TIMEOUT == f.now + 10.0
    assert pending.start == f.now and not pending.expired(f.now)
    assert not hasattr(pending, "__dict__")  # slots: no attribute can be bolted on
    assert len(pending.session_id) == 8


def test_sessions_are_independent(fleet: Fleet, device: Member, broker: Member) -> None:
    a = handshake(fleet, device, broker)
    b = handshake(fleet, device, broker)
    assert a.initiator.session_id != b.initiator.session_id
    h, body = a.up(TOPIC, b"x")
    with pytest.raises(VerificationFailed) as exc:
        b.responder.verify(h, TOPIC, body, b.clock.now)
    assert exc.value.reason is Reason.UNKNOWN_SESSION


# -- msg1 ------------------------------------------------------------------------


def head_spans(kem_field: str, kem_size: int) -> list[tuple[str, int, int]]:
    """Spans of the fields msg1 and msg2 share at the front."""
    return [
        ("magic", 0, 3),
        ("type", 3, 4),
        ("suite", 4, 6),
        ("nonce", 6, 38),
        ("x25519", 38, 70),
        (kem_field, 70, 70 + kem_size),
    ]


def chain_spans(spans: list[tuple[str, int, int]], pos: int, chain: tuple[bytes, ...]) -> int:
    """Append the spans of a credential chain starting at ``pos``; return its end."""
    spans.append(("chain count", pos, pos + 1))
    pos += 1
    for i, cert in enumerate(chain):
        spans.append((f"cert{i} length", pos, pos + 2))
        spans.append((f"cert{i}", pos + 2, pos + 2 + len(cert)))
        pos += 2 + len(cert)
    return pos


def msg1_fields(data: bytes) -> list[tuple[str, int, int]]:
    """(name, start, end) of every field in a msg1, computed from the layout."""
    m = parse_msg1(data)
    spans = head_spans("mlkem_ek", MLKEM_EK_SIZE)
    pos = chain_spans(spans, 70 + MLKEM_EK_SIZE, m.chain)
    for name, value in (
        ("responder", m.responder.encode()),
        ("context", m.context),
        ("quote", m.quote),
        ("signature", m.signature),
    ):
        spans.append((f"{name} length", pos, pos + 2))
        if value:
            spans.append((name, pos + 2, pos + 2 + len(value)))
        pos += 2 + len(value)
    assert pos == len(data)
    return spans


#: what flipping the low bit of a byte in each msg1 field must produce
MSG1_REASONS: dict[str, set[Reason]] = {
    "magic": {Reason.BAD_VERSION},
    "type": {Reason.MALFORMED},  # 0x21 -> 0x20: not a type at all
    "suite": {Reason.UNKNOWN_SUITE},
    "nonce": {Reason.BAD_SIGNATURE},
    "x25519": {Reason.BAD_SIGNATURE},
    "mlkem_ek": {Reason.BAD_SIGNATURE},
    "chain count": FRAMING,
    "cert0 length": FRAMING,
    # a changed certificate no longer parses, or its authority's signature fails
    "cert0": {Reason.BAD_CREDENTIAL, Reason.UNKNOWN_AUTHORITY, Reason.WRONG_IDENTITY},
    "responder length": FRAMING,
    "responder": {Reason.WRONG_IDENTITY},
    "context length": FRAMING,
    "context": {Reason.BAD_SIGNATURE},
    "quote length": FRAMING,
    "quote": {Reason.BAD_SIGNATURE},
    "signature length": FRAMING,
    "signature": {Reason.BAD_SIGNATURE},
}


def test_msg1_every_field_tampered(fleet: Fleet, device: Member, broker: Member) -> None:
    ini, res = make_pair(fleet, device, broker)
    msg1 = ini.start(context=b"ctx", quote=b"quote")
    spans = msg1_fields(msg1)
    assert {name for name, _, _ in spans} == set(MSG1_REASONS)
    for name, start, end in spans:
        for pos in {start, (start + end) // 2, end - 1}:
            bad = bytearray(msg1)
            bad[pos] ^= 0x01
            with pytest.raises(ProtocolError) as exc:
                res.accept(bytes(bad), 0.0, NOW)
            assert exc.value.reason in MSG1_REASONS[name], (name, pos, exc.value)
    assert len(res.nonces) == 0  # no failed msg1 left a trace
    assert signs(res) == 0  # and none cost the responder a signature
    res.accept(msg1, 0.0, NOW)  # the genuine one still works
    assert len(res.nonces) == 1 and signs(res) == 1


def msg1_cuts(msg1: bytes) -> list[int]:
    cuts = {0, 1, len(msg1) - 1}
    for _, start, end in msg1_fields(msg1):
        cuts |= {start, start + 1, end - 1}
    return sorted(c for c in cuts if 0 <= c < len(msg1))


def test_msg1_truncated(fleet: Fleet, device: Member, broker: Member) -> None:
    ini, res = make_pair(fleet, device, broker)
    msg1 = ini.start(context=b"ctx")
    for cut in msg1_cuts(msg1):
        with pytest.raises(MalformedMessage) as exc:
            res.accept(msg1[:cut], 0.0, NOW)
        assert exc.value.reason is Reason.TRUNCATED, cut
    assert len(res.nonces) == 0 and signs(res) == 0


def test_msg1_extended(fleet: Fleet, device: Member, broker: Member) -> None:
    ini, res = make_pair(fleet, device, broker)
    msg1 = ini.start()
    for extra in (b"\x00", b"\xff" * 100):
        with pytest.raises(MalformedMessage) as exc:
            res.accept(msg1 + extra, 0.0, NOW)
        assert exc.value.reason is Reason.TRAILING_BYTES
    assert len(res.nonces) == 0 and signs(res) == 0


def test_msg1_replayed(fleet: Fleet, device: Member, broker: Member) -> None:
    ini, res = make_pair(fleet, device, broker)
    msg1 = ini.start()
    res.accept(msg1, 0.0, NOW)
    assert len(res.nonces) == 1 and signs(res) == 1
    with pytest.raises(ReplayDetected) as exc:
        res.accept(msg1, 1.0, NOW)
    assert exc.value.reason is Reason.HANDSHAKE_REPLAYED
    assert len(res.nonces) == 1 and signs(res) == 1  # refused before any signature


def replayer_attempts(f: Flight, pending: PendingHandshake) -> Iterator[bytes]:
    """What an attacker holding msg1, the genuine msg3 and a new msg2 can send as msg3
    for the new pending (it cannot derive the keys: it lacks the ephemeral secrets)."""
    yield f.msg3  # the genuine msg3 of the original handshake
    # the same MAC under the new session id (which an attacker could not even know)
    yield f.msg3[:6] + pending.session_id + f.msg3[14:]
    yield f.msg3[:6] + pending.session_id + bytes(32)


@pytest.mark.parametrize("where", ["after-ttl", "after-restart", "at-another-responder"])
def test_replayed_msg1_yields_only_a_pending_the_replayer_cannot_confirm(
    fleet: Fleet, device: Member, broker: Member, where: str
) -> None:
    f = flight(fleet, device, broker, now=0.0)
    f.res.confirm(f.answered.pending, f.msg3, 0.0)  # the genuine handshake, done
    for attempt in range(3):
        if where == "after-ttl":  # the same responder, each time the nonce fell out
            res, now = f.res, 601.0 + 700.0 * attempt
        else:  # a restarted responder, or a second one with the same identity: new cache
            res, now = responder(fleet, broker), 5.0
        answered = res.accept(f.msg1, now, NOW)  # answered: the cache cannot know
        pending = answered.pending
        msg3 = list(replayer_attempts(f, pending))[attempt]
        with pytest.raises(VerificationFailed) as exc:
            res.confirm(pending, msg3, now + 1.0)
        assert exc.value.reason in {Reason.UNKNOWN_SESSION, Reason.BAD_CONFIRMATION}
        expected = Reason.UNKNOWN_SESSION if attempt == 0 else Reason.BAD_CONFIRMATION
        assert exc.value.reason is expected
        assert pending.expired(now + 1.0)  # one try: discarded
        # nothing was ever granted: not even the genuine initiator's MAC would do now
        with pytest.raises(VerificationFailed):
            res.confirm(pending, msg3, now + 1.0)


def test_unanswered_pending_expires(fleet: Fleet, device: Member, broker: Member) -> None:
    f = flight(fleet, device, broker)
    pending = f.answered.pending
    assert not pending.expired(f.now + 9.999)
    assert pending.expired(f.now + 10.0)


def test_nonce_cache_is_bounded() -> None:
    cache = NonceCache(ttl=100, max_entries=3)
    for i in range(5):
        cache.add(bytes([i]) * 32, 0.0)
    assert len(cache) == 3
    cache.check(b"\x00" * 32, 0.0)  # evicted oldest
    with pytest.raises(ReplayDetected):
        cache.check(b"\x04" * 32, 0.0)


def test_nonce_cache_expires() -> None:
    cache = NonceCache(ttl=600)
    cache.add(b"\x01" * 32, 0.0)
    with pytest.raises(ReplayDetected):
        cache.check(b"\x01" * 32, 599.9)
    cache.check(b"\x01" * 32, 600.0)
    assert len(cache) == 0


def test_msg1_signed_by_other_key(fleet: Fleet, device: Member, broker: Member) -> None:
    impostor = fleet.member("device", "d2")
    # the impostor presents d1's credential but signs with its own key
    ini = Initiator(
        signer=impostor.signer,
        credential=device.credential,
        trust=fleet.trust,
        expected_peer=broker.identity,
    )
    res = responder(fleet, broker)
    with pytest.raises(VerificationFailed) as exc:
        res.accept(ini.start(), 0.0, NOW)
    assert exc.value.reason is Reason.BAD_SIGNATURE
    assert len(res.nonces) == 0 and signs(res) == 0


def test_msg1_unknown_authority(fleet: Fleet, device: Member, broker: Member) -> None:
    rogue = Fleet()  # same trust domain name, different key
    outsider = rogue.member("device", "d1")
    ini = Initiator(
        signer=outsider.signer,
        credential=outsider.credential,
        trust=rogue.trust,
        expected_peer=broker.identity,
    )
    res = responder(fleet, broker)
    with pytest.raises(CredentialError) as exc:
        res.accept(ini.start(), 0.0, NOW)
    assert exc.value.reason is Reason.UNKNOWN_AUTHORITY
    assert len(res.nonces) == 0 and signs(res) == 0


@pytest.mark.parametrize(
    ("kw", "policy", "reason"),
    [
        ({"days": 1}, TimePolicy.trusted(T0 + dt.timedelta(days=3)), Reason.CREDENTIAL_EXPIRED),
        ({"not_before": T0 + dt.timedelta(days=10)}, NOW, Reason.CREDENTIAL_NOT_YET_VALID),
    ],
)
def test_msg1_credential_time(
    fleet: Fleet, broker: Member, kw: dict[str, object], policy: TimePolicy, reason: Reason
) -> None:
    member = fleet.member("device", "dt", **kw)  # type: ignore[arg-type]
    ini = initiator(fleet, member, broker)
    res = responder(fleet, broker)
    with pytest.raises(CredentialError) as exc:
        res.accept(ini.start(), 0.0, policy)
    assert exc.value.reason is reason
    assert len(res.nonces) == 0 and signs(res) == 0


def test_msg1_revoked(fleet: Fleet, device: Member, broker: Member) -> None:
    ini, res = make_pair(fleet, device, broker)
    revoked = {device.credential.fingerprint}
    with pytest.raises(CredentialError) as exc:
        res.accept(ini.start(), 0.0, NOW, revoked=lambda c: c.fingerprint in revoked)
    assert exc.value.reason is Reason.CREDENTIAL_REVOKED
    assert len(res.nonces) == 0 and signs(res) == 0


def test_msg1_wrong_kind(fleet: Fleet, broker: Member) -> None:
    # a broker credential cannot log in as a device
    other = fleet.member("broker", "b2")
    ini = initiator(fleet, other, broker)
    res = responder(fleet, broker)
    with pytest.raises(CredentialError) as exc:
        res.accept(ini.start(), 0.0, NOW)
    assert exc.value.reason is Reason.WRONG_IDENTITY
    assert len(res.nonces) == 0 and signs(res) == 0


def test_msg1_expected_identity(fleet: Fleet, device: Member, broker: Member) -> None:
    ini, res = make_pair(fleet, device, broker)
    with pytest.raises(CredentialError) as exc:
        res.accept(
            ini.start(), 0.0, NOW, expected_peer=Identity.parse("spiffe://fleet.test/device/d9")
        )
    assert exc.value.reason is Reason.WRONG_IDENTITY
    assert len(res.nonces) == 0 and signs(res) == 0


def test_msg1_for_another_responder_refused_before_any_cryptography(
    fleet: Fleet, device: Member, broker: Member, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A msg1 captured at one broker is worthless at another, and costs it one parse:
    WRONG_IDENTITY comes before the nonce cache, the credential and any signature."""
    other = fleet.member("broker", "b2")
    res = responder(fleet, broker)
    res.nonces.add(b"\x55" * 32, 0.0)  # something in the cache, to see it untouched
    before = list(res.nonces._seen.items())
    touched: list[str] = []

    def spy(name: str, real: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            touched.append(name)
            return real(*a, **k)

        return wrapper

    monkeypatch.setattr(hs, "_verify", spy("signature check", hs._verify))
    monkeypatch.setattr(res.nonces, "check", spy("nonce cache", res.nonces.check))
    monkeypatch.setattr(res._trust, "credential", spy("credential", res._trust.credential))
    monkeypatch.setattr(res._trust, "validate", spy("validate", res._trust.validate))
    genuine = initiator(fleet, device, other).start()  # meant for b2, signed by d1
    # the same with a broken signature and a broken certificate: still WRONG_IDENTITY,
    # which shows neither was looked at
    m = parse_msg1(genuine)
    broken_sig = genuine[:-1] + bytes([genuine[-1] ^ 1])
    cert_at = 70 + MLKEM_EK_SIZE + 3
    broken_cert = genuine[:cert_at] + b"\x00" * 8 + genuine[cert_at + 8 :]
    for msg1 in (genuine, broken_sig, broken_cert):
        with pytest.raises(VerificationFailed) as exc:
            res.accept(msg1, 1.0, NOW)
        assert exc.value.reason is Reason.WRONG_IDENTITY
        assert other.identity.uri in exc.value.detail
    assert m.responder == other.identity.uri
    assert touched == []
    assert signs(res) == 0
    assert list(res.nonces._seen.items()) == before


@pytest.mark.parametrize("v1_type", [0x01, 0x02])
def test_v1_types_refused_with_bad_version(
    fleet: Fleet, device: Member, broker: Member, v1_type: int
) -> None:
    f = flight(fleet, device, broker)
    res = responder(fleet, broker)
    v1 = f.msg1[:3] + bytes([v1_type]) + f.msg1[4:]
    with pytest.raises(MalformedMessage) as exc:
        res.accept(v1, 0.0, NOW)
    assert exc.value.reason is Reason.BAD_VERSION
    assert "version 1" in exc.value.detail
    assert len(res.nonces) == 0 and signs(res) == 0
    # msg2 and msg3 slots refuse version-1 types the same way
    ini, res2 = make_pair(fleet, device, broker)
    reply = res2.accept(ini.start(), 0.0, NOW).reply
    with pytest.raises(MalformedMessage) as exc:
        ini.receive(reply[:3] + bytes([v1_type]) + reply[4:], 0.0, NOW)
    assert exc.value.reason is Reason.BAD_VERSION
    assert ini.state is InitiatorState.FAILED
    pending = f.answered.pending
    with pytest.raises(MalformedMessage) as exc:
        f.res.confirm(pending, f.msg3[:3] + bytes([v1_type]) + f.msg3[4:], f.now)
    assert exc.value.reason is Reason.BAD_VERSION
    assert pending.expired(f.now)


def test_msg1_bad_key_shares(fleet: Fleet, device: Member, broker: Member) -> None:
    # low-order X25519 point (the all-zero shared secret check), re-signed so only the
    # share is wrong
    ini, res = make_pair(fleet, device, broker)
    m = parse_msg1(ini.start())
    signed = bytearray(m.signed)
    signed[38:70] = bytes(32)
    with pytest.raises(VerificationFailed) as exc:
        res.accept(resign_msg1(device.signer, bytes(signed)), 0.0, NOW)
    assert exc.value.reason is Reason.BAD_KEY_SHARE
    # ML-KEM key whose coefficients are out of range (the encapsulation-key check)
    signed = bytearray(m.signed)
    signed[70 : 70 + MLKEM_EK_SIZE] = b"\xff" * MLKEM_EK_SIZE
    with pytest.raises(VerificationFailed) as exc:
        res.accept(resign_msg1(device.signer, bytes(signed)), 0.0, NOW)
    assert exc.value.reason is Reason.BAD_KEY_SHARE
    assert len(res.nonces) == 0 and signs(res) == 0


# -- msg2 ------------------------------------------------------------------------


def msg2_spans(data: bytes) -> list[tuple[str, int, int]]:
    m = parse_msg2(data)
    spans = head_spans("mlkem_ct", MLKEM_CT_SIZE)
    pos = 70 + MLKEM_CT_SIZE
    for name, size in (
        ("epoch_ms", 4),
        ("skew", 1),
        ("lifetime", 4),
        ("flags", 1),
        ("window", 2),
        ("policy_digest", 32),
    ):
        spans.append((name, pos, pos + size))
        pos += size
    pos = chain_spans(spans, pos, m.chain)
    spans.append(("signature length", pos, pos + 2))
    spans.append(("signature", pos + 2, pos + 2 + len(m.signature)))
    pos += 2 + len(m.signature)
    spans.append(("confirm", pos, pos + 32))
    assert pos + 32 == len(data)
    return spans


#: what flipping the low bit of a byte in each msg2 field must produce; parameters
#: still in range only change the transcript, so the signature fails
PARAM = {Reason.BAD_SIGNATURE, Reason.BAD_PARAMETERS, Reason.MALFORMED}
MSG2_REASONS: dict[str, set[Reason]] = {
    "magic": {Reason.BAD_VERSION},
    "type": {Reason.BAD_VERSION, Reason.MALFORMED},  # 0x22 -> 0x23
    "suite": {Reason.UNKNOWN_SUITE},
    "nonce": {Reason.BAD_SIGNATURE},
    "x25519": {Reason.BAD_SIGNATURE},
    "mlkem_ct": {Reason.BAD_SIGNATURE},
    "epoch_ms": PARAM,
    "skew": PARAM,
    "lifetime": PARAM,
    "flags": PARAM,
    "window": PARAM,
    "policy_digest": {Reason.BAD_SIGNATURE},
    "chain count": FRAMING,
    "cert0 length": FRAMING,
    "cert0": {Reason.BAD_CREDENTIAL, Reason.UNKNOWN_AUTHORITY, Reason.WRONG_IDENTITY},
    "signature length": FRAMING,
    "signature": {Reason.BAD_SIGNATURE},
    "confirm": {Reason.BAD_CONFIRMATION},
}


def test_msg2_every_field_tampered(fleet: Fleet, device: Member, broker: Member) -> None:
    ini0, res = make_pair(fleet, device, broker)
    names = [n for n, _, _ in msg2_spans(res.accept(ini0.start(), 0.0, NOW).reply)]
    assert set(names) == set(MSG2_REASONS)
    for index, name in enumerate(names):
        for where in ("start", "middle", "end"):
            # a fresh initiator each time: any msg2 failure is final for an initiator
            ini, res2 = make_pair(fleet, device, broker)
            good = res2.accept(ini.start(), 0.0, NOW).reply
            _, start, end = msg2_spans(good)[index]  # DER signature lengths vary
            pos = {"start": start, "middle": (start + end) // 2, "end": end - 1}[where]
            bad = bytearray(good)
            bad[pos] ^= 0x01
            with pytest.raises(ProtocolError) as exc:
                ini.receive(bytes(bad), 0.0, NOW)
            assert exc.value.reason in MSG2_REASONS[name], (name, where, exc.value)
            assert ini.state is InitiatorState.FAILED, name
            assert ini._x25519 is None and ini._mlkem is None  # ephemeral keys dropped
            with pytest.raises(StateError):
                ini.receive(good, 0.0, NOW)  # failed is final


def test_msg2_truncated_or_extended(fleet: Fleet, device: Member, broker: Member) -> None:
    ini, res = make_pair(fleet, device, broker)
    count = len(msg2_spans(res.accept(ini.start(), 0.0, NOW).reply))

    def cuts(reply: bytes) -> Iterator[int]:
        # computed from each msg2 itself: DER signature lengths vary by a byte or two
        yield from (0, 3, 6, 70, len(reply) - 33, len(reply) - 1)
        for _, start, end in msg2_spans(reply):
            yield from (start, end - 1)

    for index in range(6 + 2 * count):
        ini, res = make_pair(fleet, device, broker)
        reply = res.accept(ini.start(), 0.0, NOW).reply
        cut = list(cuts(reply))[index]
        with pytest.raises(MalformedMessage) as exc:
            ini.receive(reply[:cut], 0.0, NOW)
        assert exc.value.reason is Reason.TRUNCATED, cut
        assert ini.state is InitiatorState.FAILED
    ini, res = make_pair(fleet, device, broker)
    reply = res.accept(ini.start(), 0.0, NOW).reply
    with pytest.raises(MalformedMessage) as exc:
        ini.receive(reply + b"\x00", 0.0, NOW)
    assert exc.value.reason is Reason.TRAILING_BYTES


def test_msg2_from_wrong_broker(fleet: Fleet, device: Member, broker: Member) -> None:
    """An initiator accepts only the responder it named. (The other responder refuses
    this initiator's msg1 itself, so its msg2 comes from another handshake; the
    identity check comes before the signature.)"""
    other = fleet.member("broker", "evil")
    ini = initiator(fleet, device, broker)  # expects b1
    ini.start()
    evil = Responder(signer=other.signer, credential=other.credential, trust=fleet.trust)
    with pytest.raises(VerificationFailed) as exc0:
        evil.accept(initiator(fleet, device, broker).start(), 0.0, NOW)
    assert exc0.value.reason is Reason.WRONG_IDENTITY
    reply = evil.accept(initiator(fleet, device, other).start(), 0.0, NOW).reply
    with pytest.raises(CredentialError) as exc:
        ini.receive(reply, 0.0, NOW)
    assert exc.value.reason is Reason.WRONG_IDENTITY
    assert ini.state is InitiatorState.FAILED


def test_msg2_for_another_msg1(fleet: Fleet, device: Member, broker: Member) -> None:
    """A reply to a different handshake is refused: the signature covers the transcript."""
    a, res = make_pair(fleet, device, broker)
    b = initiator(fleet, device, broker)
    a.start()
    reply_b = res.accept(b.start(), 0.0, NOW).reply
    with pytest.raises(VerificationFailed) as exc:
        a.receive(reply_b, 0.0, NOW)
    assert exc.value.reason is Reason.BAD_SIGNATURE
    assert a.state is InitiatorState.FAILED


def test_msg2_bad_params_rejected(fleet: Fleet, device: Member, broker: Member) -> None:
    ini, res = make_pair(fleet, device, broker)
    reply = bytearray(res.accept(ini.start(), 0.0, NOW).reply)
    reply[70 + MLKEM_CT_SIZE : 70 + MLKEM_CT_SIZE + 4] = (1).to_bytes(4, "big")  # epoch 1 ms
    with pytest.raises(MalformedMessage) as exc:
        ini.receive(bytes(reply), 0.0, NOW)
    assert exc.value.reason is Reason.BAD_PARAMETERS
    assert ini.state is InitiatorState.FAILED


def test_initiator_state_machine(fleet: Fleet, device: Member, broker: Member) -> None:
    ini, res = make_pair(fleet, device, broker)
    with pytest.raises(StateError):
        ini.receive(b"", 0.0, NOW)
    msg1 = ini.start()
    with pytest.raises(StateError):
        ini.start()
    ini.receive(res.accept(msg1, 0.0, NOW).reply, 0.0, NOW)
    assert ini.state is InitiatorState.COMPLETED
    assert ini._x25519 is None and ini._mlkem is None  # ephemeral keys erased
    with pytest.raises(StateError):
        ini.receive(b"", 0.0, NOW)


def test_hybrid_secret_needs_both_halves(fleet: Fleet, device: Member, broker: Member) -> None:
    """Replacing the ML-KEM ciphertext (re-signed by the real broker, so only the KEM
    half differs) breaks key confirmation: the session depends on ML-KEM, not only
    on X25519."""
    ini, res = make_pair(fleet, device, broker)
    msg1 = ini.start()
    reply = res.accept(msg1, 0.0, NOW).reply
    m = parse_msg2(reply)
    body = bytearray(m.body)
    body[70 : 70 + MLKEM_CT_SIZE] = bytes(MLKEM_CT_SIZE)
    digest = hashlib.sha256(LABEL_MSG2_SIG + transcript_hash(msg1, bytes(body))).digest()
    forged = bytes(body) + wire.var16(broker.signer.sign_digest(digest)) + m.confirm
    with pytest.raises(VerificationFailed) as exc:
        ini.receive(forged, 0.0, NOW)
    assert exc.value.reason is Reason.BAD_CONFIRMATION


# -- msg3 ------------------------------------------------------------------------

MSG3_FIELDS = [("magic", 0, 3), ("type", 3, 4), ("suite", 4, 6), ("session id", 6, 14),
               ("mac", 14, 46)]


def msg3_reason(pos: int, value: int) -> Reason:
    """The reason a msg3 with byte ``pos`` set to ``value`` must be refused with."""
    if pos < 3:
        return Reason.BAD_VERSION
    if pos == 3:
        return Reason.BAD_VERSION if value in (0x01, 0x02) else Reason.MALFORMED
    if pos < 6:
        return Reason.UNKNOWN_SUITE
    if pos < 14:
        return Reason.UNKNOWN_SESSION
    return Reason.BAD_CONFIRMATION


@pytest.mark.parametrize("flip", [0x01, 0x80, 0x22])
def test_msg3_every_byte_tampered(
    fleet: Fleet, device: Member, broker: Member, flip: int
) -> None:
    for pos in range(MSG3_SIZE):
        f = flight(fleet, device, broker)
        nonces = len(f.res.nonces)
        bad = bytearray(f.msg3)
        bad[pos] ^= flip
        with pytest.raises(ProtocolError) as exc:
            f.res.confirm(f.answered.pending, bytes(bad), f.now)
        assert exc.value.reason is msg3_reason(pos, bad[pos]), (pos, exc.value)
        # one try: the pending is gone, so not even the genuine msg3 confirms it now
        assert f.answered.pending.expired(f.now)
        with pytest.raises(VerificationFailed) as exc:
            f.res.confirm(f.answered.pending, f.msg3, f.now)
        assert exc.value.reason is Reason.BAD_CONFIRMATION
        assert len(f.res.nonces) == nonces and signs(f.res) == 1
        # the initiator's own session is untouched by what happened to its msg3
        assert f.ini.state is InitiatorState.COMPLETED


def test_msg3_truncated_or_extended(fleet: Fleet, device: Member, broker: Member) -> None:
    for cut in range(MSG3_SIZE):
        f = flight(fleet, device, broker)
        with pytest.raises(MalformedMessage) as exc:
            f.res.confirm(f.answered.pending, f.msg3[:cut], f.now)
        assert exc.value.reason is Reason.TRUNCATED, cut
        assert f.answered.pending.expired(f.now)
        assert msg3_session_id(f.msg3[:cut]) is None
    for extra in (b"\x00", f.msg3):
        f = flight(fleet, device, broker)
        with pytest.raises(MalformedMessage) as exc:
            f.res.confirm(f.answered.pending, f.msg3 + extra, f.now)
        assert exc.value.reason is Reason.TRAILING_BYTES
        assert f.answered.pending.expired(f.now)
        assert msg3_session_id(f.msg3 + extra) is None


def test_msg3_for_another_pending(fleet: Fleet, device: Member, broker: Member) -> None:
    a = flight(fleet, device, broker)
    b = flight(fleet, device, broker)
    with pytest.raises(VerificationFailed) as exc:
        a.res.confirm(a.answered.pending, b.msg3, a.now)
    assert exc.value.reason is Reason.UNKNOWN_SESSION
    assert a.answered.pending.expired(a.now)  # the pending it was tried on is gone
    # the other handshake is not affected: its own msg3 still confirms it
    assert not b.answered.pending.expired(b.now)
    assert b.res.confirm(b.answered.pending, b.msg3, b.now).peer == device.identity
    # and a msg3 routed by its session id finds the right pending
    c = flight(fleet, device, broker)
    d = flight(fleet, device, broker)
    table = {p.session_id: p for p in (c.answered.pending, d.answered.pending)}
    for f in (d, c):
        sid = msg3_session_id(f.msg3)
        assert sid is not None
        assert c.res.confirm(table[sid], f.msg3, f.now).session.session_id == sid


def test_msg3_after_the_pending_deadline(fleet: Fleet, device: Member, broker: Member) -> None:
    f = flight(fleet, device, broker)
    assert f.res.confirm(f.answered.pending, f.msg3, f.now + 9.999).peer == device.identity
    f = flight(fleet, device, broker)
    with pytest.raises(VerificationFailed) as exc:
        f.res.confirm(f.answered.pending, f.msg3, f.now + 10.0)  # the default: 10 s
    assert exc.value.reason is Reason.BAD_CONFIRMATION
    assert f.answered.pending.expired(f.now)
    # configurable
    f = flight(fleet, device, broker, pending_timeout=2.0)
    assert f.answered.pending.deadline == f.now + 2.0
    with pytest.raises(VerificationFailed) as exc:
        f.res.confirm(f.answered.pending, f.msg3, f.now + 2.5)
    assert exc.value.reason is Reason.BAD_CONFIRMATION


@pytest.mark.parametrize("timeout", [0.0, -1.0, 60.5])
def test_pending_timeout_bounded(fleet: Fleet, broker: Member, timeout: float) -> None:
    with pytest.raises(StateError) as exc:
        responder(fleet, broker, pending_timeout=timeout)
    assert exc.value.reason is Reason.BAD_PARAMETERS


def test_second_confirm_with_the_same_pending(
    fleet: Fleet, device: Member, broker: Member
) -> None:
    f = flight(fleet, device, broker)
    first = f.res.confirm(f.answered.pending, f.msg3, f.now)
    with pytest.raises(VerificationFailed) as exc:
        f.res.confirm(f.answered.pending, f.msg3, f.now)
    assert exc.value.reason is Reason.BAD_CONFIRMATION
    # the session the first confirm made is not disturbed by the refused second one
    header, body = f.session.protect(TOPIC, b"x", f.now)
    assert first.session.verify(header, TOPIC, body, f.now).payload == b"x"


def test_msg3_session_id_never_raises() -> None:
    for data in (b"", b"SA1", b"SA1\x23\x00\x01" + bytes(39), b"SA1\x01" + bytes(42),
                 bytes(46), b"\xff" * 46):
        assert msg3_session_id(data) is None
    good = b"SA1" + bytes([TYPE_MSG3]) + b"\x00\x01" + b"S" * 8 + bytes(32)
    assert msg3_session_id(good) == b"S" * 8
    assert parse_msg3(good).confirm == bytes(32)


def test_msg_types_are_v2() -> None:
    assert (TYPE_MSG1, TYPE_MSG2, TYPE_MSG3) == (0x21, 0x22, 0x23)


def test_errors_are_ours(fleet: Fleet, device: Member, broker: Member) -> None:
    """Garbage in the msg3 slot raises a TesseraError, never anything else."""
    for data in (b"", b"\x00" * 46, b"SA1\x23" + b"\xff" * 100):
        f = flight(fleet, device, broker)
        with pytest.raises(TesseraError):
            f.res.confirm(f.answered.pending, data, f.now)


def test_credential_round_trip_matches(device: Member) -> None:
    again = Credential.from_der_chain(device.credential.der_chain())
    assert again.identity == device.identity
    assert isinstance(again.public_key, ec.EllipticCurvePublicKey)
