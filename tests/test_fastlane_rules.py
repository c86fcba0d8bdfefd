"""SA1 v2 receive rules, checked in lock-step between structauth's Session.verify and
the broker's C fast lane: sequence jumps of any size cost O(1) on both sides and leave
the same window behind, and an action that does not fit the wire format is refused by
Python and never verified by C."""

from __future__ import annotations

from types import ModuleType

import pytest

from broker_plugin.fastlane import FastLane
from structauth.errors import MalformedMessage, Reason, TesseraError
from structauth.params import SessionParams
from structauth.session import MAX_SEQ, Session
from tests.support import FakeClock, SessionPair

CID = "spiffe://fleet.test/device/pi-9"
TOPIC = b"devices/pi-9/telemetry/t"


def _outcome_py(session: Session, header: bytes, body: bytes, now: float) -> str:
    try:
        session.verify(header, TOPIC, body, now)
        return "ok"
    except TesseraError as exc:
        return exc.reason.name.lower()


def _outcome_c(mod: ModuleType, header: bytes, body: bytes, now: float) -> str:
    outcome, first, _ = mod.message(CID, TOPIC.decode(), body + header, now)
    if outcome in (mod.VERIFIED, mod.ROUTE):
        return "ok"
    return str(first) if outcome == mod.REJECT else "pass"


@pytest.mark.parametrize("jump_to", [5000, 2**31, MAX_SEQ])
def test_a_huge_sequence_jump_is_o1_and_agrees(fast: ModuleType, jump_to: int) -> None:
    params = SessionParams(replay_window=64)
    py, c = SessionPair.direct(params, FakeClock()), SessionPair.direct(params, FakeClock())
    lane = FastLane(fast)
    assert lane.adopt(CID, c.responder)
    try:
        early = [py.up(TOPIC, bytes([i])) for i in range(3)]
        for h, b in early:
            assert _outcome_py(py.responder, h, b, py.clock.now) == "ok"
            assert _outcome_c(fast, h, b, c.clock.now) == "ok"
        py.initiator._next_seq = jump_to  # the sender jumps; both verifiers follow
        h, b = py.up(TOPIC, b"far")
        assert _outcome_py(py.responder, h, b, py.clock.now) == "ok"
        assert _outcome_c(fast, h, b, c.clock.now) == "ok"
        window = py.responder._window
        assert window.top == jump_to and window.mask == 1  # a fresh mask, not a shift
        assert window.mask.bit_length() <= params.replay_window
        for h, b in early:  # far behind the window now: replays on both sides
            assert _outcome_py(py.responder, h, b, py.clock.now) == "replayed"
            assert _outcome_c(fast, h, b, c.clock.now) == "replayed"
    finally:
        lane.release(CID)


def test_an_action_longer_than_the_wire_allows_is_refused_not_crashed(fast: ModuleType) -> None:
    pair = SessionPair.direct(SessionParams(), FakeClock())
    header, body = pair.up(TOPIC, b"x")
    with pytest.raises(MalformedMessage) as caught:
        pair.responder.verify(header, b"a" * 70_000, body, pair.clock.now)
    assert caught.value.reason is Reason.MALFORMED
    # the genuine message still verifies: the refusal changed nothing
    assert pair.responder.verify(header, TOPIC, body, pair.clock.now).payload == b"x"
    lane = FastLane(fast)
    other = SessionPair.direct(SessionParams(), FakeClock())
    assert lane.adopt(CID, other.responder)
    try:
        h, b = other.up(TOPIC, b"y")
        outcome, _, _ = fast.message(CID, "a" * 70_000, b + h, other.clock.now)
        assert outcome == fast.PASS  # not C's to judge: Python refuses it as above
        assert _outcome_c(fast, h, b, other.clock.now) == "ok"
    finally:
        lane.release(CID)
