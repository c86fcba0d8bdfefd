"""Per-message proofs: every property has a negative test."""

from __future__ import annotations

import pytest

from structauth.errors import (
    MalformedMessage,
    ProtocolError,
    Reason,
    ReplayDetected,
    SessionExpiredError,
    StaleMessage,
    StateError,
    VerificationFailed,
)
from structauth.params import SessionParams
from structauth.session import HEADER_SIZE, SessionState
from tests.support import SessionPair

TOPIC = b"devices/d1/telemetry/temp"
PAYLOAD = b'{"t": 21.5}' * 10


@pytest.fixture(params=[False, True], ids=["tagged", "sealed"])
def pair(request: pytest.FixtureRequest) -> SessionPair:
    p = SessionPair.direct(SessionParams(sealed=request.param))
    return p


def test_round_trip_both_directions(pair: SessionPair) -> None:
    h, body = pair.up(TOPIC, PAYLOAD)
    assert len(h) == HEADER_SIZE == 31
    ev = pair.responder.verify(h, TOPIC, body, pair.clock.now)
    assert ev.payload == PAYLOAD and ev.seq == 0 and ev.session_confirmed
    h, body = pair.down(b"devices/d1/commands/reboot", b"now")
    ev = pair.initiator.verify(h, b"devices/d1/commands/reboot", body, pair.clock.now)
    assert ev.payload == b"now" and not ev.session_confirmed


def test_sealed_mode_hides_payload() -> None:
    p = SessionPair.direct(SessionParams(sealed=True))
    h, body = p.up(TOPIC, PAYLOAD)
    assert body != PAYLOAD and len(body) == len(PAYLOAD)
    assert p.responder.verify(h, TOPIC, body, p.clock.now).payload == PAYLOAD


def test_responder_cannot_send_before_confirmation(pair: SessionPair) -> None:
    assert pair.responder.state is SessionState.UNCONFIRMED
    with pytest.raises(StateError) as exc:
        pair.down(TOPIC, b"x")
    assert exc.value.reason is Reason.INVALID_STATE
    pair.confirm()
    assert pair.responder.state is SessionState.ESTABLISHED
    pair.down(TOPIC, b"x")


def test_unconfirmed_session_times_out(pair: SessionPair) -> None:
    pair.clock.advance(61)
    h, body = pair.up(TOPIC, PAYLOAD)
    with pytest.raises(SessionExpiredError) as exc:
        pair.responder.verify(h, TOPIC, body, pair.clock.now)
    assert exc.value.reason is Reason.BAD_CONFIRMATION
    assert pair.responder.state is SessionState.CLOSED


def test_poll_reports_unconfirmed_timeout_and_lifetime() -> None:
    p = SessionPair.direct()
    assert p.responder.poll(p.clock.now) is None
    ev = p.responder.poll(p.clock.now + 60)
    assert ev is not None and ev.reason is Reason.BAD_CONFIRMATION
    q = SessionPair.direct(SessionParams(lifetime_s=30))
    assert q.initiator.next_deadline == q.clock.now + 30
    ev = q.initiator.poll(q.clock.now + 30)
    assert ev is not None and ev.reason is Reason.SESSION_EXPIRED
    assert q.initiator.poll(q.clock.now + 31) is None  # final: reported once


def test_replay_rejected(pair: SessionPair) -> None:
    h, body = pair.up(TOPIC, PAYLOAD)
    pair.responder.verify(h, TOPIC, body, pair.clock.now)
    with pytest.raises(ReplayDetected) as exc:
        pair.responder.verify(h, TOPIC, body, pair.clock.now)
    assert exc.value.reason is Reason.REPLAYED


def test_reordering_inside_window_accepted_once(pair: SessionPair) -> None:
    msgs = [pair.up(TOPIC, b"%d" % i) for i in range(10)]
    for i in (9, 3, 0, 5):
        h, body = msgs[i]
        pair.responder.verify(h, TOPIC, body, pair.clock.now)
    for i in (9, 3, 0, 5):
        h, body = msgs[i]
        with pytest.raises(ReplayDetected):
            pair.responder.verify(h, TOPIC, body, pair.clock.now)


def test_too_old_sequence_rejected() -> None:
    p = SessionPair.direct(SessionParams(replay_window=32))
    old = p.up(TOPIC, b"old")
    for _ in range(40):
        h, body = p.up(TOPIC, b"x")
    p.responder.verify(h, TOPIC, body, p.clock.now)
    with pytest.raises(ReplayDetected, match="outside the replay window"):
        p.responder.verify(old[0], TOPIC, old[1], p.clock.now)


def test_tag_moved_to_another_topic_or_payload(pair: SessionPair) -> None:
    h, body = pair.up(TOPIC, PAYLOAD)
    with pytest.raises(VerificationFailed) as exc:
        pair.responder.verify(h, b"devices/d2/telemetry/temp", body, pair.clock.now)
    assert exc.value.reason is Reason.BAD_TAG
    altered = bytes([body[0] ^ 1]) + body[1:]
    with pytest.raises(VerificationFailed):
        pair.responder.verify(h, TOPIC, altered, pair.clock.now)
    # the failures did not consume the sequence number: the genuine message still passes
    assert pair.responder.verify(h, TOPIC, body, pair.clock.now).payload == PAYLOAD


def test_action_payload_boundary_is_bound(pair: SessionPair) -> None:
    h, body = pair.up(b"a/b", b"cd")
    with pytest.raises(VerificationFailed):
        pair.responder.verify(h, b"a/b" + body[:1], body[1:], pair.clock.now)


@pytest.mark.parametrize("offset", range(HEADER_SIZE))
def test_every_header_byte_is_protected(pair: SessionPair, offset: int) -> None:
    h, body = pair.up(TOPIC, PAYLOAD)
    bad = bytearray(h)
    bad[offset] ^= 0x01
    with pytest.raises(ProtocolError):
        pair.responder.verify(bytes(bad), TOPIC, body, pair.clock.now)
    assert pair.responder.verify(h, TOPIC, body, pair.clock.now).payload == PAYLOAD


@pytest.mark.parametrize("length", [0, 1, 15, 30, 32, 62])
def test_truncated_or_extended_header(pair: SessionPair, length: int) -> None:
    h, body = pair.up(TOPIC, PAYLOAD)
    bad = (h * 3)[:length]
    with pytest.raises(MalformedMessage) as exc:
        pair.responder.verify(bad, TOPIC, body, pair.clock.now)
    assert exc.value.reason is Reason.MALFORMED


def test_unknown_version_rejected(pair: SessionPair) -> None:
    h, body = pair.up(TOPIC, PAYLOAD)
    bad = bytes([0x20 | (h[0] & 0x0F)]) + h[1:]
    with pytest.raises(MalformedMessage) as exc:
        pair.responder.verify(bad, TOPIC, body, pair.clock.now)
    assert exc.value.reason is Reason.BAD_VERSION


def test_epoch_skew_inside_window_accepted() -> None:
    p = SessionPair.direct(SessionParams(epoch_ms=10_000, skew_epochs=2))
    p.clock.advance(25)  # receiver at epoch 2
    h, body = p.up(TOPIC, b"a")
    # the same message arriving when the receiver is two epochs later still verifies
    p.responder.verify(h, TOPIC, body, p.clock.now + 20)
    # and a sender whose clock runs two epochs ahead is accepted too
    ahead = p.initiator.protect(TOPIC, b"b", p.clock.now + 20)
    p.responder.verify(*ahead[:1], TOPIC, ahead[1], p.clock.now)


def test_epoch_outside_window_rejected() -> None:
    p = SessionPair.direct(SessionParams(epoch_ms=10_000, skew_epochs=2))
    h, body = p.up(TOPIC, b"a")  # epoch 0
    with pytest.raises(StaleMessage) as exc:
        p.responder.verify(h, TOPIC, body, p.clock.now + 30)  # receiver at epoch 3
    assert exc.value.reason is Reason.EPOCH_OUT_OF_WINDOW
    future = p.initiator.protect(TOPIC, b"b", p.clock.now + 30)
    with pytest.raises(StaleMessage):
        p.responder.verify(future[0], TOPIC, future[1], p.clock.now)


def test_old_keys_are_erased() -> None:
    p = SessionPair.direct(SessionParams(epoch_ms=1000, skew_epochs=1))
    h, body = p.up(TOPIC, b"a")
    p.responder.poll(p.clock.now + 10)  # epochs 0..8 fall out of the window
    assert min(p.responder._recv.keys, default=9) >= 9
    assert p.responder._recv.next_epoch >= 9
    with pytest.raises(StaleMessage):
        p.responder.verify(h, TOPIC, body, p.clock.now + 10)


def test_lifetime_exceeded() -> None:
    p = SessionPair.direct(SessionParams(lifetime_s=60))
    p.confirm()
    p.clock.advance(59)
    h, body = p.up(TOPIC, b"a")
    p.responder.verify(h, TOPIC, body, p.clock.now)
    p.clock.advance(1)
    with pytest.raises(SessionExpiredError) as exc:
        p.up(TOPIC, b"late")
    assert exc.value.reason is Reason.SESSION_EXPIRED
    with pytest.raises(SessionExpiredError):
        p.responder.verify(h, TOPIC, body, p.clock.now)
    assert p.responder.state is SessionState.CLOSED and not p.responder._recv.keys


def test_other_session_rejected() -> None:
    a = SessionPair.direct()
    b = SessionPair.direct()
    b.responder.session_id = b"\xff" * 8
    h, body = a.up(TOPIC, PAYLOAD)
    with pytest.raises(VerificationFailed) as exc:
        b.responder.verify(h, TOPIC, body, a.clock.now)
    assert exc.value.reason is Reason.UNKNOWN_SESSION


def test_mode_mismatch_rejected() -> None:
    tagged = SessionPair.direct(SessionParams(sealed=False))
    sealed = SessionPair.direct(SessionParams(sealed=True))
    h, body = tagged.up(TOPIC, PAYLOAD)
    with pytest.raises(MalformedMessage, match="sealed flag"):
        sealed.responder.verify(h, TOPIC, body, sealed.clock.now)


def test_sequence_exhaustion() -> None:
    p = SessionPair.direct()
    p.initiator._next_seq = 0xFFFFFFFF
    p.up(TOPIC, b"last")
    with pytest.raises(SessionExpiredError) as exc:
        p.up(TOPIC, b"one too many")
    assert exc.value.reason is Reason.SEQUENCE_EXHAUSTED


@pytest.mark.parametrize(
    "kwargs",
    [
        {"epoch_ms": 10},
        {"skew_epochs": 17},
        {"lifetime_s": 0},
        {"replay_window": 8},
        {"policy_digest": b"short"},
        {"epoch_ms": 100, "lifetime_s": 7 * 86400},
    ],
)
def test_bad_parameters_rejected(kwargs: dict[str, object]) -> None:
    with pytest.raises(StateError) as exc:
        SessionParams(**kwargs)  # type: ignore[arg-type]
    assert exc.value.reason is Reason.BAD_PARAMETERS
