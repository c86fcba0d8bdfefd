"""SA1 handshake: the happy path and a negative test for every field and property."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from simulator.fleet import NOW, T0, Fleet, Member
from structauth import wire
from structauth.credentials import Credential, Identity, TimePolicy
from structauth.errors import (
    CredentialError,
    MalformedMessage,
    ProtocolError,
    Reason,
    ReplayDetected,
    StateError,
    VerificationFailed,
)
from structauth.handshake import (
    MLKEM_CT_SIZE,
    MLKEM_EK_SIZE,
    Initiator,
    InitiatorState,
    NonceCache,
    Responder,
    parse_msg1,
    parse_msg2,
)
from structauth.params import SessionParams
from structauth.session import SessionState
from tests.support import FakeClock, SessionPair

TOPIC = b"devices/d1/telemetry"


@pytest.fixture(scope="module")
def fleet() -> Fleet:
    return Fleet()


@pytest.fixture(scope="module")
def device(fleet: Fleet) -> Member:
    return fleet.member("device", "d1")


@pytest.fixture(scope="module")
def broker(fleet: Fleet) -> Member:
    return fleet.member("broker", "b1")


def make_pair(
    fleet: Fleet, device: Member, broker: Member, *, params: SessionParams | None = None
) -> tuple[Initiator, Responder]:
    ini = Initiator(
        signer=device.signer,
        credential=device.credential,
        trust=fleet.trust,
        expected_peer=broker.identity,
    )
    res = Responder(
        signer=broker.signer, credential=broker.credential, trust=fleet.trust, params=params
    )
    return ini, res


def handshake(fleet: Fleet, device: Member, broker: Member, **kw: object) -> SessionPair:
    clock = FakeClock()
    ini, res = make_pair(fleet, device, broker, **kw)  # type: ignore[arg-type]
    answered = res.accept(ini.start(), clock.now, NOW)
    done = ini.receive(answered.reply, clock.now, NOW)
    assert answered.peer == device.identity and done.peer == broker.identity
    return SessionPair(done.session, answered.session, clock)


def test_handshake_and_messages(fleet: Fleet, device: Member, broker: Member) -> None:
    pair = handshake(fleet, device, broker)
    assert pair.initiator.session_id == pair.responder.session_id
    assert pair.responder.state is SessionState.UNCONFIRMED
    h, b = pair.up(TOPIC, b"21.5")
    assert pair.responder.verify(h, TOPIC, b, pair.clock.now).session_confirmed
    h, b = pair.down(b"devices/d1/commands/x", b"go")
    assert pair.initiator.verify(h, b"devices/d1/commands/x", b, pair.clock.now).payload == b"go"


def test_params_chosen_by_responder_reach_initiator(
    fleet: Fleet, device: Member, broker: Member
) -> None:
    params = SessionParams(
        epoch_ms=5000, skew_epochs=1, lifetime_s=120, sealed=True, policy_digest=b"\x07" * 32
    )
    pair = handshake(fleet, device, broker, params=params)
    assert pair.initiator.params == params
    h, b = pair.up(TOPIC, b"secret")
    assert b != b"secret"
    assert pair.responder.verify(h, TOPIC, b, pair.clock.now).payload == b"secret"


def test_context_and_quote_reach_responder(fleet: Fleet, device: Member, broker: Member) -> None:
    ini, res = make_pair(fleet, device, broker)
    answered = res.accept(ini.start(context=b"challenge", quote=b"q" * 100), 0.0, NOW)
    assert answered.context == b"challenge" and answered.quote == b"q" * 100


def test_sessions_are_independent(fleet: Fleet, device: Member, broker: Member) -> None:
    a = handshake(fleet, device, broker)
    b = handshake(fleet, device, broker)
    assert a.initiator.session_id != b.initiator.session_id
    h, body = a.up(TOPIC, b"x")
    with pytest.raises(VerificationFailed):
        b.responder.verify(h, TOPIC, body, b.clock.now)


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
    for name, value in (("context", m.context), ("quote", m.quote), ("signature", m.signature)):
        spans.append((f"{name} length", pos, pos + 2))
        if value:
            spans.append((name, pos + 2, pos + 2 + len(value)))
        pos += 2 + len(value)
    assert pos == len(data)
    return spans


def test_msg1_every_field_tampered(fleet: Fleet, device: Member, broker: Member) -> None:
    ini, res = make_pair(fleet, device, broker)
    msg1 = ini.start(context=b"ctx", quote=b"quote")
    spans = msg1_fields(msg1)
    for name, start, end in spans:
        for pos in {start, (start + end) // 2, end - 1}:
            bad = bytearray(msg1)
            bad[pos] ^= 0x01
            with pytest.raises(ProtocolError) as exc:
                res.accept(bytes(bad), 0.0, NOW)
            assert exc.value.reason is not None, name
    assert len(res.nonces) == 0  # no failed msg1 left a trace
    res.accept(msg1, 0.0, NOW)  # and the genuine one still works


@pytest.mark.parametrize("cut", [0, 1, 5, 6, 38, 70, 1254, 1255, -73, -2, -1])
def test_msg1_truncated(fleet: Fleet, device: Member, broker: Member, cut: int) -> None:
    ini, res = make_pair(fleet, device, broker)
    msg1 = ini.start()
    with pytest.raises(MalformedMessage):
        res.accept(msg1[:cut], 0.0, NOW)


def test_msg1_extended(fleet: Fleet, device: Member, broker: Member) -> None:
    ini, res = make_pair(fleet, device, broker)
    with pytest.raises(MalformedMessage) as exc:
        res.accept(ini.start() + b"\x00", 0.0, NOW)
    assert exc.value.reason is Reason.TRAILING_BYTES


def test_msg1_replayed(fleet: Fleet, device: Member, broker: Member) -> None:
    ini, res = make_pair(fleet, device, broker)
    msg1 = ini.start()
    res.accept(msg1, 0.0, NOW)
    with pytest.raises(ReplayDetected) as exc:
        res.accept(msg1, 1.0, NOW)
    assert exc.value.reason is Reason.HANDSHAKE_REPLAYED


def test_msg1_replay_after_cache_expiry_never_confirms(
    fleet: Fleet, device: Member, broker: Member
) -> None:
    ini, _ = make_pair(fleet, device, broker)
    res = Responder(
        signer=broker.signer,
        credential=broker.credential,
        trust=fleet.trust,
        nonce_cache=NonceCache(ttl=10),
    )
    msg1 = ini.start()
    res.accept(msg1, 0.0, NOW)
    replayed = res.accept(msg1, 11.0, NOW)  # outside the cache: answered, but...
    assert replayed.session.state is SessionState.UNCONFIRMED
    with pytest.raises(StateError):  # ...the broker will not send on it
        replayed.session.protect(TOPIC, b"secret", 11.0)
    assert replayed.session.poll(11.0 + 60) is not None  # and it is dropped


def test_nonce_cache_is_bounded() -> None:
    cache = NonceCache(ttl=100, max_entries=3)
    for i in range(5):
        cache.add(bytes([i]) * 32, 0.0)
    assert len(cache) == 3
    cache.check(b"\x00" * 32, 0.0)  # evicted oldest
    with pytest.raises(ReplayDetected):
        cache.check(b"\x04" * 32, 0.0)


def test_msg1_signed_by_other_key(fleet: Fleet, device: Member, broker: Member) -> None:
    impostor = fleet.member("device", "d2")
    # the impostor presents d1's credential but signs with its own key
    ini = Initiator(signer=impostor.signer, credential=device.credential, trust=fleet.trust)
    _, res = make_pair(fleet, device, broker)
    with pytest.raises(VerificationFailed) as exc:
        res.accept(ini.start(), 0.0, NOW)
    assert exc.value.reason is Reason.BAD_SIGNATURE


def test_msg1_unknown_authority(fleet: Fleet, device: Member, broker: Member) -> None:
    rogue = Fleet()  # same trust domain name, different key
    outsider = rogue.member("device", "d1")
    ini = Initiator(signer=outsider.signer, credential=outsider.credential, trust=rogue.trust)
    _, res = make_pair(fleet, device, broker)
    with pytest.raises(CredentialError) as exc:
        res.accept(ini.start(), 0.0, NOW)
    assert exc.value.reason is Reason.UNKNOWN_AUTHORITY


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
    member = fleet.member("device", "dt", **kw)
    ini = Initiator(signer=member.signer, credential=member.credential, trust=fleet.trust)
    _, res = make_pair(fleet, member, broker)
    with pytest.raises(CredentialError) as exc:
        res.accept(ini.start(), 0.0, policy)
    assert exc.value.reason is reason


def test_msg1_revoked(fleet: Fleet, device: Member, broker: Member) -> None:
    ini, res = make_pair(fleet, device, broker)
    revoked = {device.credential.fingerprint}
    with pytest.raises(CredentialError) as exc:
        res.accept(ini.start(), 0.0, NOW, revoked=lambda c: c.fingerprint in revoked)
    assert exc.value.reason is Reason.CREDENTIAL_REVOKED
    assert len(res.nonces) == 0


def test_msg1_wrong_kind(fleet: Fleet, broker: Member) -> None:
    # a broker credential cannot log in as a device
    other = fleet.member("broker", "b2")
    ini = Initiator(signer=other.signer, credential=other.credential, trust=fleet.trust)
    _, res = make_pair(fleet, other, broker)
    with pytest.raises(CredentialError) as exc:
        res.accept(ini.start(), 0.0, NOW)
    assert exc.value.reason is Reason.WRONG_IDENTITY


def test_msg1_expected_identity(fleet: Fleet, device: Member, broker: Member) -> None:
    ini, res = make_pair(fleet, device, broker)
    with pytest.raises(CredentialError) as exc:
        res.accept(
            ini.start(), 0.0, NOW, expected_peer=Identity.parse("spiffe://fleet.test/device/d9")
        )
    assert exc.value.reason is Reason.WRONG_IDENTITY


def test_msg1_bad_key_shares(fleet: Fleet, device: Member, broker: Member) -> None:
    # low-order X25519 point, re-signed so only the share is wrong
    ini, res = make_pair(fleet, device, broker)
    m = parse_msg1(ini.start())
    signed = bytearray(m.signed)
    signed[38:70] = bytes(32)
    from structauth.handshake import LABEL_MSG1_SIG, _sign

    resigned = bytes(signed) + wire.var16(_sign(device.signer, LABEL_MSG1_SIG, bytes(signed)))
    with pytest.raises(VerificationFailed) as exc:
        res.accept(resigned, 0.0, NOW)
    assert exc.value.reason is Reason.BAD_KEY_SHARE
    # ML-KEM key whose coefficients are out of range
    signed = bytearray(m.signed)
    signed[70 : 70 + MLKEM_EK_SIZE] = b"\xff" * MLKEM_EK_SIZE
    resigned = bytes(signed) + wire.var16(_sign(device.signer, LABEL_MSG1_SIG, bytes(signed)))
    with pytest.raises(VerificationFailed) as exc:
        res.accept(resigned, 0.0, NOW)
    assert exc.value.reason is Reason.BAD_KEY_SHARE


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


def test_msg2_every_field_tampered(fleet: Fleet, device: Member, broker: Member) -> None:
    ini0, res = make_pair(fleet, device, broker)
    count = len(msg2_spans(res.accept(ini0.start(), 0.0, NOW).reply))
    for index in range(count):
        for where in ("start", "middle", "end"):
            # a fresh initiator each time: any msg2 failure is final for an initiator
            ini, res2 = make_pair(fleet, device, broker)
            good = res2.accept(ini.start(), 0.0, NOW).reply
            name, start, end = msg2_spans(good)[index]  # DER signature lengths vary
            pos = {"start": start, "middle": (start + end) // 2, "end": end - 1}[where]
            bad = bytearray(good)
            bad[pos] ^= 0x01
            with pytest.raises(ProtocolError):
                ini.receive(bytes(bad), 0.0, NOW)
            assert ini.state is InitiatorState.FAILED, name
            with pytest.raises(StateError):
                ini.receive(good, 0.0, NOW)  # failed is final


@pytest.mark.parametrize("cut", [0, 3, 6, 70, 1158, 1159, 1202, -33, -1])
def test_msg2_truncated_or_extended(fleet: Fleet, device: Member, broker: Member, cut: int) -> None:
    ini, res = make_pair(fleet, device, broker)
    reply = res.accept(ini.start(), 0.0, NOW).reply
    with pytest.raises(MalformedMessage):
        ini.receive(reply[:cut], 0.0, NOW)
    ini, res = make_pair(fleet, device, broker)
    reply = res.accept(ini.start(), 0.0, NOW).reply
    with pytest.raises(MalformedMessage) as exc:
        ini.receive(reply + b"\x00", 0.0, NOW)
    assert exc.value.reason is Reason.TRAILING_BYTES


def test_msg2_from_wrong_broker(fleet: Fleet, device: Member, broker: Member) -> None:
    other = fleet.member("broker", "evil")
    ini, _ = make_pair(fleet, device, broker)  # expects b1
    res = Responder(signer=other.signer, credential=other.credential, trust=fleet.trust)
    reply = res.accept(ini.start(), 0.0, NOW).reply
    with pytest.raises(CredentialError) as exc:
        ini.receive(reply, 0.0, NOW)
    assert exc.value.reason is Reason.WRONG_IDENTITY


def test_msg2_for_another_msg1(fleet: Fleet, device: Member, broker: Member) -> None:
    """A reply to a different handshake is refused: the signature covers the transcript."""
    a, res = make_pair(fleet, device, broker)
    b, _ = make_pair(fleet, device, broker)
    a.start()
    reply_b = res.accept(b.start(), 0.0, NOW).reply
    with pytest.raises(VerificationFailed) as exc:
        a.receive(reply_b, 0.0, NOW)
    assert exc.value.reason is Reason.BAD_SIGNATURE


def test_msg2_bad_params_rejected(fleet: Fleet, device: Member, broker: Member) -> None:
    ini, res = make_pair(fleet, device, broker)
    reply = bytearray(res.accept(ini.start(), 0.0, NOW).reply)
    reply[70 + MLKEM_CT_SIZE : 70 + MLKEM_CT_SIZE + 4] = (1).to_bytes(4, "big")  # epoch 1 ms
    with pytest.raises(MalformedMessage) as exc:
        ini.receive(bytes(reply), 0.0, NOW)
    assert exc.value.reason is Reason.BAD_PARAMETERS


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


def test_hybrid_secret_needs_both_halves(fleet: Fleet, device: Member, broker: Member) -> None:
    """Replacing the ML-KEM ciphertext (re-signed by the real broker, so only the KEM
    half differs) breaks key confirmation: the session depends on ML-KEM, not only
    on X25519."""
    from structauth.handshake import LABEL_MSG2_SIG, _sign, transcript_hash

    ini, res = make_pair(fleet, device, broker)
    msg1 = ini.start()
    reply = res.accept(msg1, 0.0, NOW).reply
    m = parse_msg2(reply)
    body = bytearray(m.body)
    body[70 : 70 + MLKEM_CT_SIZE] = bytes(MLKEM_CT_SIZE)
    sig = _sign(broker.signer, LABEL_MSG2_SIG, transcript_hash(msg1, bytes(body)))
    forged = bytes(body) + wire.var16(sig) + m.confirm
    with pytest.raises(VerificationFailed) as exc:
        ini.receive(forged, 0.0, NOW)
    assert exc.value.reason is Reason.BAD_CONFIRMATION


def test_credential_round_trip_matches(device: Member) -> None:
    again = Credential.from_der_chain(device.credential.der_chain())
    assert again.identity == device.identity
    assert isinstance(again.public_key, ec.EllipticCurvePublicKey)
