"""Fan-out (TESLA) over a subscriber's and a broker's life: duplicates, a second
``start()``, idle gaps longer than a chain, on injected clocks."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from device.fanout import FanoutSubscriber
from structauth.errors import Reason, TesseraError
from structauth.fanout import (
    ANCHOR_TOPIC,
    HELLO_TOPIC,
    KEY_TOPIC,
    FanoutSigner,
    FanoutVerifier,
)

T = "devices/pi-1/telemetry/t"
B0 = 1000.0
SKEW = -995.0  # the subscriber's clock reads broker time + SKEW


def _reason(fn: Callable[..., object], *args: object) -> Reason:
    with pytest.raises(TesseraError) as exc:
        fn(*args)
    return exc.value.reason


def _synced(delay: int = 2, length: int = 100) -> tuple[FanoutSigner, FanoutVerifier]:
    signer = FanoutSigner(os.urandom, B0, interval_s=1.0, delay=delay, length=length)
    verifier = FanoutVerifier(max_pending=50)
    verifier.on_anchor(signer.anchor(B0 + 0.01), B0 + SKEW)
    return signer, verifier


def _keys(signer: FanoutSigner, b: float) -> list[bytes]:
    return [body for topic, body in signer.due(b) if topic == KEY_TOPIC]


# -- duplicates ---------------------------------------------------------------------------


def test_a_duplicate_inside_one_interval_is_delivered_once() -> None:
    signer, verifier = _synced()
    data = signer.seal(T.encode(), b"21.5", B0 + 0.2)
    verifier.on_message(T, data, B0 + SKEW + 0.3)
    # the same bytes again (a QoS 1 redelivery, or someone replaying it in time)
    assert _reason(verifier.on_message, T, data, B0 + SKEW + 0.4) is Reason.REPLAYED
    other = signer.seal(T.encode(), b"21.6", B0 + 0.5)  # same interval, other payload
    verifier.on_message(T, other, B0 + SKEW + 0.6)
    [key] = _keys(signer, B0 + 2.0)
    good, bad = verifier.on_key(key)
    assert good == [(T, b"21.5"), (T, b"21.6")] and bad == []
    # and after the key, the interval is closed
    assert _reason(verifier.on_message, T, data, B0 + SKEW + 2.1) is Reason.REPLAYED


def test_a_duplicate_that_differs_in_its_tag_is_not_a_duplicate() -> None:
    # the forged copy must not shadow the genuine one (nor the other way round)
    signer, verifier = _synced()
    data = signer.seal(T.encode(), b"x", B0 + 0.2)
    forged = data[:-1] + bytes([data[-1] ^ 1])
    verifier.on_message(T, forged, B0 + SKEW + 0.3)
    verifier.on_message(T, data, B0 + SKEW + 0.3)
    [key] = _keys(signer, B0 + 2.0)
    assert verifier.on_key(key) == ([(T, b"x")], [(T, Reason.BAD_TAG)])


def test_duplicates_count_once_against_the_buffer() -> None:
    signer, verifier = _synced()
    data = signer.seal(T.encode(), b"x", B0 + 0.2)
    verifier.on_message(T, data, B0 + SKEW + 0.3)
    for _ in range(100):
        assert _reason(verifier.on_message, T, data, B0 + SKEW + 0.3) is Reason.REPLAYED
    for n in range(49):  # 50 in all still fit
        verifier.on_message(T, signer.seal(T.encode(), b"%d" % n, B0 + 0.2), B0 + SKEW + 0.3)


# -- a second start() ---------------------------------------------------------------------


class FakeClient:
    """What FanoutSubscriber uses of a TesseraMqttClient, with the broker's side played
    by a FanoutSigner on broker time ``self.b``. Proofs under the session are taken as
    given (they are tested with the real client)."""

    def __init__(self, signer: FanoutSigner) -> None:
        self.client = self  # stands for paho's client too
        self.signer = signer
        self.b = B0
        self.hellos = 0
        self.answer = True  # answer each hello at once
        self.control: Callable[[Any, Any, Any], None] | None = None
        self.data: Callable[[str, bytes], None] | None = None

    def message_callback_add(self, sub: str, callback: Callable[[Any, Any, Any], None]) -> None:
        self.control = callback

    def publish(self, topic: str, payload: bytes, qos: int = 0) -> None:
        assert topic == HELLO_TOPIC
        self.hellos += 1
        if self.answer:
            self.deliver(ANCHOR_TOPIC, self.signer.anchor(self.b))

    def subscribe(self, topic: str, callback: Callable[[str, bytes], None], qos: int = 0,
                  *, proven: bool = True) -> None:
        self.data = callback

    def open_delivery(self, topic: str, data: bytes) -> bytes:
        return data

    def deliver(self, topic: str, body: bytes) -> None:
        assert self.control is not None
        self.control(self, None, SimpleNamespace(topic=topic, payload=body))

    def tick(self, b: float) -> None:
        self.b = b
        for topic, body in self.signer.due(b):
            self.deliver(topic, body)


def _subscriber() -> tuple[FakeClient, FanoutSubscriber, list[tuple[str, bytes]]]:
    signer = FanoutSigner(os.urandom, B0, interval_s=1.0, delay=2, length=100)
    fake = FakeClient(signer)
    got: list[tuple[str, bytes]] = []
    sub = FanoutSubscriber(fake, lambda t, p: got.append((t, p)),
                           clock=lambda: fake.b + SKEW)
    return fake, sub, got


def _forged(signer: FanoutSigner, i: int, payload: bytes) -> bytes:
    stolen = FanoutSigner(os.urandom, B0, interval_s=1.0, delay=2, length=4)
    stolen.chain = signer.chain
    return stolen.seal(T.encode(), payload, signer.chain.t0 + i - 0.5)


def test_a_second_start_keeps_the_chain_its_keys_and_what_waits() -> None:
    fake, sub, got = _subscriber()
    sub.start(timeout=1)
    sub.subscribe("devices/#")
    assert fake.data is not None
    for n in range(1, 6):
        fake.tick(B0 + n)
    fake.data(T, fake.signer.seal(T.encode(), b"waiting", B0 + 5.5))  # interval 6
    sub.start(timeout=1)  # again: a resynchronisation, nothing more
    assert fake.hellos == 2
    # K_3 is public by now: a message for interval 3 made with it must not get through
    fake.data(T, _forged(fake.signer, 3, b"forged"))
    for n in range(6, 10):
        fake.tick(B0 + n)
    assert got == [(T, b"waiting")]
    assert (T, Reason.REPLAYED) in sub.rejected


def test_a_second_start_before_the_first_anchor_came() -> None:
    fake, sub, got = _subscriber()
    fake.answer = False
    with pytest.raises(TimeoutError):
        sub.start(timeout=0.05)
    fake.answer = True
    sub.start(timeout=1)
    sub.subscribe("devices/#")
    assert fake.data is not None
    # the late answer to the first hello arrives after the second's: it moves nothing
    fake.deliver(ANCHOR_TOPIC, fake.signer.anchor(B0 - 0.5))
    fake.data(T, fake.signer.seal(T.encode(), b"ok", B0 + 0.5))
    fake.tick(B0 + 2.0)
    assert got == [(T, b"ok")] and not sub.rejected


def test_the_subscriber_resynchronises_on_its_own() -> None:
    fake, sub, got = _subscriber()
    sub.start(timeout=1)
    sub.subscribe("devices/#")
    assert fake.data is not None
    b = B0
    for _ in range(3 * 1000 + 10):  # an hour at one key a second
        b += 1.0
        fake.tick(b)
    # margin 0.5 s at 500 ppm: a hello every ~500 s
    assert 6 <= fake.hellos <= 9
    fake.data(T, fake.signer.seal(T.encode(), b"late in the run", b + 0.2))
    fake.tick(b + 2.0)
    assert got == [(T, b"late in the run")] and not sub.rejected


# -- idle gaps ----------------------------------------------------------------------------


@pytest.mark.parametrize("chains", [0.5, 1.5, 2.5, 10.3])
def test_an_idle_broker_seals_after_a_gap_of_any_length(chains: float) -> None:
    length = 5
    signer, verifier = _synced(delay=1, length=length)
    first = signer.chain
    b = B0 + chains * length  # nothing at all happened in between: no seal, no due()
    data = signer.seal(T.encode(), b"after the gap", b)  # used to raise IndexError
    i = int.from_bytes(data[-20:-16], "big")
    assert 1 <= i <= length
    # the announcement of the chain now in use places it, and its key verifies it
    for topic, body in signer.due(b + 0.001):
        if topic == ANCHOR_TOPIC:
            verifier.on_anchor(body, None)
        else:
            verifier.on_key(body)
    verifier.on_message(T, data, b + SKEW + 0.01)
    out: list[tuple[str, bytes]] = []
    for topic, body in signer.due(b + 1.0):
        assert topic == KEY_TOPIC
        out += verifier.on_key(body)[0]
    assert out == [(T, b"after the gap")]
    assert (signer.chain is first) == (chains < 1)


def test_after_a_long_gap_the_old_chain_is_finished_and_the_new_one_placed() -> None:
    length = 5
    signer, verifier = _synced(delay=1, length=length)
    old = signer.chain
    pending = signer.seal(T.encode(), b"old", B0 + 4.5)  # the old chain's last interval
    verifier.on_message(T, pending, B0 + SKEW + 4.5)
    b = B0 + 3.5 * length
    out = signer.due(b)
    anchors = [json.loads(body) for topic, body in out if topic == ANCHOR_TOPIC]
    keys = [json.loads(body) for topic, body in out if topic == KEY_TOPIC]
    # the old chain's last key goes out, then the new chain's first ones (it is 2.5 s in)
    assert [(k["chain"], k["interval"]) for k in keys] == [
        (old.id.hex(), length), (signer.chain.id.hex(), 2)]
    [a] = anchors
    assert a["chain"] == signer.chain.id.hex() != old.id.hex()
    assert a["start_ms"] == pytest.approx(3 * length * 1000.0)  # a whole number of chains on
    for topic, body in out:
        if topic == ANCHOR_TOPIC:
            verifier.on_anchor(body, None)
        elif json.loads(body)["chain"] == old.id.hex():
            assert verifier.on_key(body)[0] == [(T, b"old")]
        else:
            assert verifier.on_key(body) == ([], [])
    # the new chain is placed where it really starts: in time is in, late is out
    msg = signer.seal(T.encode(), b"new", b + 0.1)
    verifier.on_message(T, msg, b + SKEW + 0.2)
    late = signer.seal(T.encode(), b"late", b + 0.1)
    assert _reason(verifier.on_message, T, late, b + SKEW + 1.0) is Reason.EPOCH_OUT_OF_WINDOW


def test_seal_before_the_chain_starts_does_not_crash() -> None:
    signer = FanoutSigner(os.urandom, B0, interval_s=1.0, delay=2, length=10)
    data = signer.seal(T.encode(), b"x", B0 - 100.0)  # a clock read before construction
    assert int.from_bytes(data[-20:-16], "big") == 1


# -- which hello an anchor answers ---------------------------------------------------------


def _answer(signer: FanoutSigner, b: float, nonce: bytes = b"") -> bytes:
    return signer.anchor(b, nonce)


def test_an_echoed_nonce_says_which_hello_an_anchor_answers() -> None:
    signer = FanoutSigner(os.urandom, B0, interval_s=1.0, delay=2, length=100)
    v = FanoutVerifier()
    v.hello(B0 + SKEW + 1.0, b"one")  # its answer is lost
    v.hello(B0 + SKEW + 9.0, b"two")
    assert v.on_anchor(_answer(signer, B0 + 9.1, b"two"), None, B0 + SKEW + 9.2) == []
    assert v.upper_bound(B0 + SKEW + 9.0) == pytest.approx(9.1)  # from hello two, not one
    assert v.hellos_answered == 1 and not v.hello_due(B0 + SKEW + 9.3)
    # the lost answer turns up late: it matches nothing left and moves nothing
    v.on_anchor(_answer(signer, B0 + 1.1, b"one"), None, B0 + SKEW + 9.5)
    assert v.upper_bound(B0 + SKEW + 9.0) == pytest.approx(9.1)
    # nor does an answer to a hello that was never ours
    v.on_anchor(_answer(signer, B0 + 20.0, b"nobody's"), None, B0 + SKEW + 9.6)
    assert v.upper_bound(B0 + SKEW + 9.0) == pytest.approx(9.1)


def test_without_an_echo_a_lost_answer_only_makes_the_next_look_older() -> None:
    signer = FanoutSigner(os.urandom, B0, interval_s=1.0, delay=2, length=100)
    v = FanoutVerifier()
    v.hello(B0 + SKEW + 1.0, b"one")  # lost
    v.hello(B0 + SKEW + 9.0, b"two")
    v.on_anchor(_answer(signer, B0 + 9.1), None, B0 + SKEW + 9.2)  # no echo
    # matched with hello one (sent 8 s earlier): a looser bound, never a tighter one
    assert v.upper_bound(B0 + SKEW + 9.0) == pytest.approx(9.1 + 8.0 * (1 + 500e-6))


def test_reordered_answers_never_tighten_the_bound() -> None:
    # two hellos; the answers arrive the wrong way round (an attacker holding one back)
    signer = FanoutSigner(os.urandom, B0, interval_s=1.0, delay=2, length=100)
    v = FanoutVerifier()
    v.hello(B0 + SKEW + 1.0)
    first = _answer(signer, B0 + 1.1)  # answers hello one
    v.hello(B0 + SKEW + 9.0)
    second = _answer(signer, B0 + 9.1)  # answers hello two
    v.on_anchor(second, None, B0 + SKEW + 9.2)  # matched with hello one: safe
    bound = v.upper_bound(B0 + SKEW + 10.0)
    v.on_anchor(first, None, B0 + SKEW + 9.3)  # would be matched with hello two: stale
    assert v.upper_bound(B0 + SKEW + 10.0) == bound
    # matched with hello two, ``first`` would have put the bound 8 s too early
    assert bound is not None and bound > 10.0 + 1.1 - 1.0


def test_hellos_are_bounded() -> None:
    v = FanoutVerifier()
    for n in range(64):
        assert v.hello_due(100.0 * n)
        v.hello(100.0 * n)
    assert not v.hello_due(1e6)
    assert _reason(v.hello, 1e6) is Reason.INVALID_STATE


def test_an_anchor_of_a_restarted_broker_replaces_the_old_chains() -> None:
    signer, verifier = _synced()
    waiting = signer.seal(T.encode(), b"lost with the broker", B0 + 0.5)
    verifier.on_message(T, waiting, B0 + SKEW + 0.6)
    again = FanoutSigner(os.urandom, B0 + 30.0, interval_s=1.0, delay=2, length=100)
    verifier.hello(B0 + SKEW + 31.0)
    dropped = verifier.on_anchor(again.anchor(B0 + 31.1), None, B0 + SKEW + 31.2)
    assert dropped == [(T, Reason.UNKNOWN_SESSION)]
    assert list(verifier.chains) == [again.chain.id]
    verifier.on_message(T, again.seal(T.encode(), b"new", B0 + 31.5), B0 + SKEW + 31.6)
    # the old broker's late messages find no chain; its anchors move nothing
    assert _reason(verifier.on_message, T, signer.seal(T.encode(), b"x", B0 + 31.0),
                   B0 + SKEW + 31.6) is Reason.UNKNOWN_SESSION
    assert verifier.on_anchor(signer.anchor(B0 + 32.0), B0 + SKEW + 31.9) == []
    assert list(verifier.chains) == [again.chain.id]
    [key] = [body for t, body in again.due(B0 + 33.0) if t == KEY_TOPIC]
    assert verifier.on_key(key)[0] == [(T, b"new")]


def test_the_subscriber_sends_a_nonce_and_uses_the_echo() -> None:
    fake, sub, _got = _subscriber()
    sent: list[bytes] = []

    def publish(topic: str, payload: bytes, qos: int = 0) -> None:
        sent.append(payload)
        if len(sent) > 1:  # the first hello's answer is lost
            fake.deliver(ANCHOR_TOPIC, fake.signer.anchor(fake.b, payload))

    fake.publish = publish  # type: ignore[method-assign]
    with pytest.raises(TimeoutError):
        sub.start(timeout=0.05)
    fake.b = B0 + 9.0
    sub.start(timeout=1)
    assert len(sent) == 2 and len(set(sent)) == 2 and all(len(n) == 16 for n in sent)
    # matched with the second hello by its nonce, not with the first by count
    assert sub.verifier.upper_bound(B0 + 9.0 + SKEW) == pytest.approx(9.0)


def test_hellos_go_out_at_qos_0() -> None:
    # the broker consumes a hello and refuses it to the publisher: at QoS 1 the client
    # would park and resend it after a resync, and each resend would get an answer
    fake, sub, _got = _subscriber()
    seen: list[int] = []
    publish = fake.publish

    def record(topic: str, payload: bytes, qos: int = 0) -> None:
        seen.append(qos)
        publish(topic, payload, qos)

    fake.publish = record  # type: ignore[method-assign]
    sub.start(timeout=1)
    sub.start(timeout=1)
    assert seen == [0, 0]
