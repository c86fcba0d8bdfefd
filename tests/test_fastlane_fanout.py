"""Fan-out sealing in the broker's C fast lane against structauth.fanout's reference.

On a broker that seals fan-out topics, a message on a topic the host judged plain is
routed by C with the current interval's trailer; the host hands the interval's prefix
and MAC key over once per interval (FanoutSigner.interval_key). The trailer C makes must
be byte for byte what FanoutSigner.seal makes at the same time, and outside the handed-
over interval C must not route at all (the host seals, and hands over the next one).
"""

from __future__ import annotations

import os
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker_plugin.fastlane import FastLane
from structauth.fanout import FanoutSigner
from structauth.params import SessionParams
from tests.support import FakeClock, SessionPair

CID = "spiffe://fleet.test/device/pi-1"
TOPIC = "fleet/pi-1/alerts"


@pytest.fixture
def lane(fast: ModuleType):  # type: ignore[no-untyped-def]
    pair = SessionPair.direct(SessionParams(replay_window=64), FakeClock())
    lane = FastLane(fast)
    assert lane.adopt(CID, pair.responder)
    yield lane, pair
    lane.release(CID)
    lane.seal_interval(None)


def _route(fast: ModuleType, pair: SessionPair, topic: str, body: bytes) -> tuple[int, bytes]:
    header, wire_body = pair.up(topic.encode(), body)
    outcome, out, _ = fast.message(CID, topic, wire_body + header, pair.clock.now)
    return outcome, out


@settings(max_examples=int(os.environ.get("TESSERA_FUZZ_EXAMPLES", "150")), deadline=None)
@given(topic=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0+#"),
                     min_size=1, max_size=300),
       body=st.binary(max_size=2000), offset=st.floats(0.001, 0.998))
def test_c_seals_exactly_as_the_signer_does(fast: ModuleType, topic: str, body: bytes,
                                           offset: float) -> None:
    pair = SessionPair.direct(SessionParams(replay_window=64), FakeClock())
    lane = FastLane(fast)
    assert lane.adopt(CID, pair.responder)
    try:
        signer = FanoutSigner(os.urandom, pair.clock.now, interval_s=1.0)
        pair.clock.advance(3.0 + offset)  # somewhere inside interval 4
        fast.cache_topic(CID, topic)
        lane.seal_interval(signer.interval_key(pair.clock.now))
        outcome, out = _route(fast, pair, topic, body)
        assert outcome == fast.ROUTE
        assert out == signer.seal(topic.encode(), body, pair.clock.now)
    finally:
        lane.release(CID)
        lane.seal_interval(None)


def test_outside_the_handed_over_interval_c_routes_nothing(fast: ModuleType, lane) -> None:  # type: ignore[no-untyped-def]
    lane_, pair = lane
    signer = FanoutSigner(os.urandom, pair.clock.now, interval_s=1.0)
    fast.cache_topic(CID, TOPIC)
    pair.clock.advance(0.5)
    lane_.seal_interval(signer.interval_key(pair.clock.now))
    assert _route(fast, pair, TOPIC, b"in")[0] == fast.ROUTE
    # the next interval: the key handed over is stale, so the host must seal this one
    pair.clock.advance(1.0)
    outcome, out = _route(fast, pair, TOPIC, b"next interval")
    assert outcome == fast.VERIFIED and out == b"next interval"  # unsealed, to the host
    assert lane_.take_counts() == [(CID, 1)]  # only the first was routed in C
    # once the host hands the new interval over, C routes again, under interval 2
    lane_.seal_interval(signer.interval_key(pair.clock.now))
    outcome, out = _route(fast, pair, TOPIC, b"again")
    assert outcome == fast.ROUTE
    assert out == signer.seal(TOPIC.encode(), b"again", pair.clock.now)


def test_a_time_before_the_interval_is_not_sealed_in_c(fast: ModuleType, lane) -> None:  # type: ignore[no-untyped-def]
    lane_, pair = lane
    signer = FanoutSigner(os.urandom, pair.clock.now, interval_s=1.0)
    fast.cache_topic(CID, TOPIC)
    lane_.seal_interval(signer.interval_key(pair.clock.now + 5.2))  # a later interval
    assert _route(fast, pair, TOPIC, b"early")[0] == fast.VERIFIED


def test_a_broker_that_does_not_seal_routes_the_bare_body(fast: ModuleType, lane) -> None:  # type: ignore[no-untyped-def]
    lane_, pair = lane
    fast.cache_topic(CID, TOPIC)
    assert _route(fast, pair, TOPIC, b"plain") == (fast.ROUTE, b"plain")
    signer = FanoutSigner(os.urandom, pair.clock.now, interval_s=1.0)
    pair.clock.advance(0.5)
    lane_.seal_interval(signer.interval_key(pair.clock.now))
    assert _route(fast, pair, TOPIC, b"sealed") == (
        fast.ROUTE, signer.seal(TOPIC.encode(), b"sealed", pair.clock.now))
    lane_.seal_interval(None)
    assert _route(fast, pair, TOPIC, b"plain again") == (fast.ROUTE, b"plain again")


@pytest.mark.parametrize("bad", [(b"\0" * 14, b"k" * 32, 1.0, 2.0),
                                 (b"\0" * 15, b"k" * 31, 1.0, 2.0),
                                 (b"\0" * 15, b"k" * 32, 2.0, 2.0)])
def test_seal_interval_refuses_malformed_keys(fast: ModuleType, bad: tuple) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError, match="seal_interval"):
        fast.seal_interval(*bad)
