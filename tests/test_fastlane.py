"""The broker's C fast lane against structauth's reference verify, message by message.

The fast lane (broker_plugin/shim/fastlane.c) is built here as the Python extension
``tessera_fast`` (the broker has it built in); every test drives a real SA1 session
pair and checks that the C side accepts exactly what Session.verify accepts, with the
same reason for what it refuses. The end-to-end behaviour inside Mosquitto is in
tests/test_broker_mqtt.py.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker_plugin.fastlane import FastLane
from structauth.errors import TesseraError
from structauth.params import SessionParams
from structauth.session import Session
from tests.support import FakeClock, SessionPair

CID = "spiffe://fleet.test/device/pi-1"
TOPIC = b"devices/pi-1/telemetry/t"


def _pair(params: SessionParams | None = None) -> SessionPair:
    return SessionPair.direct(params or SessionParams(replay_window=64), FakeClock())


def _reference(session: Session, header: bytes, topic: bytes, body: bytes,
               now: float) -> tuple[str, bytes | str]:
    try:
        return "ok", session.verify(header, topic, body, now).payload
    except TesseraError as exc:
        return "rejected", exc.reason.name.lower()


def _fast(mod: ModuleType, topic: bytes, wire: bytes, now: float) -> tuple[str, bytes | str]:
    outcome, first, _ = mod.message(CID, topic.decode(), wire, now)
    if outcome in (mod.VERIFIED, mod.ROUTE):
        return "ok", first
    if outcome == mod.REJECT:
        return "rejected", first
    return "pass", ""


@pytest.mark.parametrize("keylen", [0, 1, 31, 32])
def test_blake2s_is_blake2s(fast: ModuleType, keylen: int) -> None:
    for n in (0, 1, 55, 63, 64, 65, 127, 128, 129, 1000):
        data = hashlib.sha256(n.to_bytes(2, "big")).digest() * (n // 32 + 1)
        key = bytes(range(keylen))
        for out in (16, 32):
            assert fast.blake2s(key, data[:n], out) == hashlib.blake2s(
                data[:n], key=key, digest_size=out).digest()


def test_a_handed_over_session_verifies_in_c_and_no_longer_in_python(fast: ModuleType) -> None:
    pair = _pair()
    lane = FastLane(fast)
    assert lane.adopt(CID, pair.responder)
    header, body = pair.up(TOPIC, b"21.5C")
    assert _fast(fast, TOPIC, body + header, pair.clock.now) == ("ok", b"21.5C")
    # the same message again, and the Python session now refuses its own messages
    assert _fast(fast, TOPIC, body + header, pair.clock.now) == ("rejected", "replayed")
    header2, body2 = pair.up(TOPIC, b"next")
    assert _reference(pair.responder, header2, TOPIC, body2, pair.clock.now) == (
        "rejected", "unknown_session")
    lane.release(CID)
    assert _fast(fast, TOPIC, body2 + header2, pair.clock.now)[0] == "pass"


def test_cached_topics_route_and_forgetting_them_asks_again(fast: ModuleType) -> None:
    pair = _pair()
    lane = FastLane(fast)
    lane.adopt(CID, pair.responder)
    fast.cache_topic(CID, TOPIC.decode())
    header, body = pair.up(TOPIC, b"x")
    assert fast.message(CID, TOPIC.decode(), body + header, pair.clock.now)[0] == fast.ROUTE
    assert lane.take_counts() == [(CID, 1)]
    assert lane.take_counts() == []
    lane.forget_topics(CID)
    header, body = pair.up(TOPIC, b"y")
    assert fast.message(CID, TOPIC.decode(), body + header, pair.clock.now)[0] == fast.VERIFIED
    lane.release(CID)


def test_taking_the_state_back_keeps_the_replay_window(fast: ModuleType) -> None:
    pair = _pair()
    lane = FastLane(fast)
    lane.adopt(CID, pair.responder)
    sent = [pair.up(TOPIC, bytes([i])) for i in range(5)]
    for header, body in sent[:3]:
        assert _fast(fast, TOPIC, body + header, pair.clock.now)[0] == "ok"
    pair.clock.advance(12)  # next epoch: C derived its keys
    later = pair.up(TOPIC, b"later")
    assert _fast(fast, TOPIC, later[1] + later[0], pair.clock.now)[0] == "ok"
    lane.take_back(CID, pair.responder)
    now = pair.clock.now
    for header, body in sent[:3]:  # accepted in C: replays in Python
        assert _reference(pair.responder, header, TOPIC, body, now) == ("rejected", "replayed")
    for header, body in sent[3:]:  # never seen, still in the window and epoch
        assert _reference(pair.responder, header, TOPIC, body, now)[0] == "ok"
    header, body = pair.up(TOPIC, b"new")
    assert _reference(pair.responder, header, TOPIC, body, now) == ("ok", b"new")


def test_a_sealed_or_closed_session_is_not_handed_over(fast: ModuleType) -> None:
    # (a responder session exists only once msg3 confirmed it: the enforcer hands it
    # over at login, so there is no unconfirmed session to refuse any more)
    sealed = _pair(SessionParams(sealed=True))
    assert not FastLane(fast).adopt(CID, sealed.responder)
    closed = _pair()
    closed.responder.close()
    assert not FastLane(fast).adopt(CID, closed.responder)
    assert fast.stats()["records"] == 0


_STEP = st.one_of(
    st.tuples(st.just("send"), st.binary(max_size=80)),
    st.tuples(st.just("replay"), st.integers(0, 1000)),
    st.tuples(st.just("held"), st.binary(max_size=8)),  # made now, delivered later
    st.tuples(st.just("deliver"), st.integers(0, 1000)),
    st.tuples(st.just("tamper"), st.integers(0, 30)),
    st.tuples(st.just("move"), st.binary(min_size=1, max_size=5)),
    st.tuples(st.just("wait"), st.floats(0, 25)),
    st.tuples(st.just("burst"), st.integers(1, 100)),
)


@given(st.lists(_STEP, min_size=1, max_size=40))
@settings(max_examples=150, deadline=None)
def test_c_accepts_exactly_what_python_accepts(fast: ModuleType, steps: list) -> None:
    # two responders with the same keys: one verifies in Python, the other is handed
    # to C; one initiator proves for both
    params = SessionParams(replay_window=64, lifetime_s=120)
    ref, twin = _pair(params), _pair(params)
    assert FastLane(fast).adopt(CID, twin.responder)
    clock = ref.clock
    seen: list[tuple[bytes, bytes, bytes]] = []
    held: list[tuple[bytes, bytes, bytes]] = []

    def check(header: bytes, topic: bytes, body: bytes) -> None:
        expected = _reference(ref.responder, header, topic, body, clock.now)
        got = _fast(fast, topic, body + header, clock.now)
        if got[0] == "pass":  # not for this session: Python decides, as it does here
            assert expected == ("rejected", "unknown_session") or header[0] != 0x10
        else:
            assert got == expected
        seen.append((header, topic, body))

    try:
        for kind, arg in steps:
            if kind == "send" and clock.now < ref.initiator.expires_at:
                header, body = ref.initiator.protect(TOPIC, arg, clock.now)
                check(header, TOPIC, body)
            elif kind == "burst" and clock.now < ref.initiator.expires_at:
                for _ in range(arg):
                    ref.initiator.protect(TOPIC, b"", clock.now)  # sequence numbers skipped
            elif kind == "held" and clock.now < ref.initiator.expires_at:
                header, body = ref.initiator.protect(TOPIC, arg, clock.now)
                held.append((header, TOPIC, body))
            elif kind == "deliver" and held:
                check(*held.pop(arg % len(held)))
            elif kind == "replay" and seen:
                check(*seen[arg % len(seen)])
            elif kind == "tamper" and seen:
                header, topic, body = seen[-1]
                flipped = bytearray(header)
                flipped[arg] ^= 0x01
                check(bytes(flipped), topic, body)
            elif kind == "move" and seen:
                header, topic, body = seen[-1]
                check(header, topic + b"/" + arg.hex().encode(), body)
            elif kind == "wait":
                clock.advance(arg)
    finally:
        fast.close(CID)


def test_open_refuses_malformed_state(fast: ModuleType) -> None:
    good = (CID, bytes(8), 0x10, 0.0, 10.0, 2, 3600.0, 362, 64, -1, bytes(8), bytes(32), 0,
            0, [])
    fast.open(*good)
    fast.close(CID)
    for i, bad in [(1, bytes(7)), (8, 16), (8, 70000), (11, bytes(31)), (14, [(5, bytes(32))]),
                   (14, [(0, bytes(31))]), (5, 40)]:
        args = list(good)
        args[i] = bad
        with pytest.raises((ValueError, TypeError)):
            fast.open(*args)
    assert fast.stats()["records"] == 0


def test_the_plugin_build_includes_the_fast_lane() -> None:
    from broker_plugin import build

    assert all(p.is_file() for p in build.FAST_SOURCES)
    assert Path(build.SOURCE).read_text().count("fl_message(") == 1


@pytest.mark.parametrize("behind", [62, 63, 64, 65, 200])
def test_the_window_edge_is_where_python_has_it(fast: ModuleType, behind: int) -> None:
    params = SessionParams(replay_window=64)
    ref, twin = _pair(params), _pair(params)
    FastLane(fast).adopt(CID, twin.responder)
    try:
        old = ref.up(TOPIC, b"old")
        for _ in range(behind - 1):
            ref.up(TOPIC, b"")
        newest = ref.up(TOPIC, b"newest")
        now = ref.clock.now
        for header, body in (newest, old):
            assert _fast(fast, TOPIC, body + header, now) == _reference(
                ref.responder, header, TOPIC, body, now)
        assert _reference(ref.responder, old[0], TOPIC, old[1], now)[0] == "rejected"
    finally:
        fast.close(CID)


def test_keys_older_than_the_skew_are_erased(fast: ModuleType) -> None:
    ref, twin = _pair(), _pair()
    FastLane(fast).adopt(CID, twin.responder)
    try:
        early = ref.up(TOPIC, b"early")  # epoch 0
        ref.clock.advance(25)  # epoch 2: epoch 0 is still inside 2±2
        header, body = ref.up(TOPIC, b"now")
        assert _fast(fast, TOPIC, body + header, ref.clock.now)[0] == "ok"
        ref.clock.advance(10)  # epoch 3: epoch 0 is out, its keys must be gone
        got = _fast(fast, TOPIC, early[1] + early[0], ref.clock.now)
        assert got == _reference(ref.responder, early[0], TOPIC, early[1], ref.clock.now)
        assert got == ("rejected", "epoch_out_of_window")
    finally:
        fast.close(CID)
