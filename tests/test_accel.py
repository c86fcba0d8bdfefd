"""The optional C accelerator behind Session.verify (structauth.accel) against the pure
Python path, message by message: same payloads, same epochs and sequence numbers, same
refusals with the same reasons; sessions it cannot take stay in Python; its table
empties when sessions close or are collected; keys age on the session's timer."""

from __future__ import annotations

import gc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from structauth import accel
from structauth.errors import TesseraError
from structauth.params import SessionParams
from structauth.session import Session
from tests.support import FakeClock, SessionPair

pytestmark = pytest.mark.skipif(not accel.available(),
                                reason="structauth._accel not built (no compiler at install)")
TOPIC = b"devices/pi-1/telemetry/t"


def _outcome(session: Session, header: bytes, action: bytes, body: bytes,
             now: float) -> tuple[str, object]:
    try:
        v = session.verify(header, action, body, now)
        return "ok", (v.payload, v.epoch, v.seq)
    except TesseraError as exc:
        return type(exc).__name__, exc.reason


def _twins(params: SessionParams) -> tuple[SessionPair, Session]:
    """A session pair, and a second responder with the same keys handed to C."""
    clock = FakeClock()
    ref = SessionPair.direct(params, clock)
    twin = SessionPair.direct(params, clock).responder
    assert accel.accelerate(twin) and twin.accelerated
    return ref, twin


_STEP = st.one_of(
    st.tuples(st.just("send"), st.binary(max_size=80)),
    st.tuples(st.just("replay"), st.integers(0, 1000)),
    st.tuples(st.just("held"), st.binary(max_size=8)),
    st.tuples(st.just("deliver"), st.integers(0, 1000)),
    st.tuples(st.just("tamper"), st.integers(0, 30)),
    st.tuples(st.just("move"), st.binary(min_size=1, max_size=5)),
    st.tuples(st.just("wait"), st.floats(0, 25)),
    st.tuples(st.just("poll"), st.just(b"")),
    st.tuples(st.just("burst"), st.integers(1, 100)),
    st.tuples(st.just("jump"), st.integers(100, 2**31)),  # far, leaving room to send
)


@given(st.lists(_STEP, min_size=1, max_size=40))
@settings(max_examples=200, deadline=None)
def test_accelerated_verify_agrees_with_python(steps: list) -> None:  # type: ignore[type-arg]
    ref, twin = _twins(SessionParams(replay_window=64, lifetime_s=120))
    clock, sender = ref.clock, ref.initiator
    seen: list[tuple[bytes, bytes, bytes]] = []
    held: list[tuple[bytes, bytes, bytes]] = []

    def check(header: bytes, action: bytes, body: bytes) -> None:
        assert _outcome(twin, header, action, body, clock.now) == _outcome(
            ref.responder, header, action, body, clock.now)
        seen.append((header, action, body))

    for kind, arg in steps:
        live = clock.now < sender.expires_at
        if kind == "send" and live:
            check(*_sent(sender, arg, clock.now))
        elif kind == "burst" and live:
            for _ in range(arg):
                sender.protect(TOPIC, b"", clock.now)
        elif kind == "jump" and live and sender._next_seq < arg:
            sender._next_seq = arg
        elif kind == "held" and live:
            held.append(_sent(sender, arg, clock.now))
        elif kind == "deliver" and held:
            check(*held.pop(arg % len(held)))
        elif kind == "replay" and seen:
            check(*seen[arg % len(seen)])
        elif kind == "tamper" and seen:
            header, action, body = seen[-1]
            flipped = bytearray(header)
            flipped[arg] ^= 0x01
            check(bytes(flipped), action, body)
        elif kind == "move" and seen:
            header, action, body = seen[-1]
            check(header, action + b"/" + arg.hex().encode(), body)
        elif kind == "wait":
            clock.advance(arg)
        elif kind == "poll":
            ref.responder.poll(clock.now)
            twin.poll(clock.now)
    twin.close()


def _sent(sender: Session, payload: bytes, now: float) -> tuple[bytes, bytes, bytes]:
    header, body = sender.protect(TOPIC, payload, now)
    return header, TOPIC, body


def test_what_c_does_not_judge_gets_pythons_precise_refusal() -> None:
    ref, twin = _twins(SessionParams())
    header, body = ref.up(TOPIC, b"x")
    for bad in (header[:-1], header + b"\0", bytes([0x20]) + header[1:],
                bytes([0x11]) + header[1:], header[:1] + bytes(8) + header[9:]):
        assert _outcome(twin, bad, TOPIC, body, ref.clock.now) == _outcome(
            ref.responder, bad, TOPIC, body, ref.clock.now)
    long_action = b"a" * 70_000
    assert _outcome(twin, header, long_action, body, ref.clock.now) == _outcome(
        ref.responder, header, long_action, body, ref.clock.now) == ("MalformedMessage",
                                                                    pytest.approx(100))
    # none of that disturbed the genuine message
    assert _outcome(twin, header, TOPIC, body, ref.clock.now)[0] == "ok"


def test_sealed_or_closed_sessions_stay_in_python() -> None:
    sealed = SessionPair.direct(SessionParams(sealed=True), FakeClock())
    assert not accel.accelerate(sealed.responder) and not sealed.responder.accelerated
    h, b = sealed.up(TOPIC, b"secret")
    assert sealed.responder.verify(h, TOPIC, b, sealed.clock.now).payload == b"secret"
    closed = SessionPair.direct(SessionParams(), FakeClock())
    closed.responder.close()
    assert not accel.accelerate(closed.responder)
    twice = SessionPair.direct(SessionParams(), FakeClock())
    assert accel.accelerate(twice.responder) and not accel.accelerate(twice.responder)
    twice.responder.close()


def test_the_table_empties_on_close_and_on_collection() -> None:
    c = accel._c
    assert c is not None
    gc.collect()
    base = c.stats()["records"]
    pairs = [SessionPair.direct(SessionParams(), FakeClock()) for _ in range(50)]
    for p in pairs:
        assert accel.accelerate(p.responder)
    assert c.stats()["records"] == base + 50
    for p in pairs[:25]:
        p.responder.close()
    assert c.stats()["records"] == base + 25
    h, b = pairs[0].up(TOPIC, b"late")
    assert _outcome(pairs[0].responder, h, TOPIC, b, pairs[0].clock.now)[0] == (
        "SessionExpiredError")  # closed: refused as by Python, not by a stale C record
    del pairs, p
    gc.collect()
    assert c.stats()["records"] == base


def test_keys_age_on_the_timer_without_any_message() -> None:
    params = SessionParams(epoch_ms=1000, skew_epochs=1)
    pair = SessionPair.direct(params, FakeClock())
    session = pair.responder
    for _ in range(5):  # the receiver derives keys for a few epochs
        h, b = pair.up(TOPIC, b"x")
        session.verify(h, TOPIC, b, pair.clock.now)
        pair.clock.advance(1.0)
    c = accel._c
    assert c is not None and accel.accelerate(session)
    key = accel._key(session)
    pair.clock.advance(30.0)
    session.poll(pair.clock.now)  # no message: only the timer
    state = c.close(key)
    assert state is not None
    current = session.epoch_at(pair.clock.now)
    kept = [epoch for epoch, _ in state[5]]
    assert all(epoch >= current - params.skew_epochs for epoch in kept)

