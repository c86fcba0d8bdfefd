"""Fan-out (TESLA) under clock drift between a subscriber and the broker, on injected
clocks (no real waiting).

The broker's clock is the reference: broker time ``b``. The subscriber's clock reads
``local(b) = L0 + (b - B0) * (1 + ppm / 1e6)``: a negative ppm is a subscriber clock
slower than the broker's (it under-estimates how far the broker has got, the dangerous
direction), a positive one is faster (it over-estimates, and refuses genuine messages
sooner). The broker answers a hello ``DELTA`` seconds after it was sent.

A forger is another subscriber: it holds every disclosed key the moment the broker
discloses it, and sends a message for that interval at once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import pytest

from structauth.errors import Reason, TesseraError
from structauth.fanout import ANCHOR_TOPIC, KEY_TOPIC, FanoutSigner, FanoutVerifier

T = "devices/pi-1/telemetry/t"
P, D = 1.0, 2
B0, L0 = 1000.0, 5.0
DELTA = 0.2  # the hello's one-way trip: the anchor is made this long after the hello left
KEY_LATENCY = 0.1  # from the broker's disclosure to the subscriber
LONG = 20_000  # intervals: one chain covers the whole run (chain changes are tested apart)


def clock(ppm: float) -> Callable[[float], float]:
    return lambda b: L0 + (b - B0) * (1.0 + ppm * 1e-6)


def forged_for(signer: FanoutSigner, i: int) -> bytes:
    """A message for interval i made with K_i, as whoever has learned K_i could."""
    stolen = FanoutSigner(os.urandom, B0, interval_s=P, delay=D, length=4)
    stolen.chain = signer.chain
    stolen.interval_s = signer.interval_s
    return stolen.seal(T.encode(), b"forged", signer.chain.t0 + (i - 0.5) * P)


def key_body(signer: FanoutSigner, i: int) -> bytes:
    c = signer.chain
    return json.dumps({"chain": c.id.hex(), "interval": i, "key": c.keys[i].hex()}).encode()


def first_forgery(ppm: float, hours: float = 3.0, step_s: float = 60.0) -> float | None:
    """Sync once (the hello at broker time B0 + 10) and never again; every ``step_s`` a
    forger uses the key disclosed that instant. Seconds after the hello at which the
    first forgery was delivered, or None."""
    signer = FanoutSigner(os.urandom, B0, interval_s=P, delay=D, length=LONG)
    verifier = FanoutVerifier()
    local = clock(ppm)
    hello_b = B0 + 10.0
    verifier.on_anchor(signer.anchor(hello_b + DELTA), local(hello_b))
    b = hello_b
    while b < hello_b + hours * 3600:
        b += step_s
        # b is the start of interval i + D, so K_i goes out now
        i = round((b - signer.chain.t0) / P) + 1 - D
        try:
            verifier.on_message(T, forged_for(signer, i), local(b))
        except TesseraError:
            continue
        good, _ = verifier.on_key(key_body(signer, i))
        if (T, b"forged") in good:
            return b - hello_b
    return None


@pytest.mark.parametrize("ppm", [-100, -500, -50])
def test_a_slow_subscriber_clock_never_lets_a_forgery_through(ppm: float) -> None:
    # Before the drift bound: at -100 ppm the first forgery was delivered 2,040 s
    # (34 minutes) after the hello, at -500 ppm after 420 s, at -50 ppm after 4,020 s:
    # the DELTA of slack in the anchor is used up by drift (DELTA / 100e-6 = 2,000 s).
    assert first_forgery(ppm) is None


# -- with resynchronisation ---------------------------------------------------------------


class Run:
    """Broker and subscriber on one simulated timeline; the subscriber says hello when
    its verifier asks for one, and the broker answers after ``DELTA``."""

    def __init__(self, ppm: float, **kwargs: float) -> None:
        self.signer = FanoutSigner(os.urandom, B0, interval_s=P, delay=D, length=LONG)
        self.verifier = FanoutVerifier(**kwargs)  # type: ignore[arg-type]
        self.local = clock(ppm)
        self.hellos: list[float] = []  # broker times at which an anchor is due
        self.hellos_sent = 0
        self.inbox: list[tuple[float, str, bytes]] = []  # (broker time due, topic, body)
        self.delivered: list[bytes] = []
        self.refused: list[Reason] = []
        self.b = B0

    def hello(self) -> None:
        self.verifier.hello(self.local(self.b))
        self.hellos_sent += 1
        self.hellos.append(self.b + DELTA)

    def advance(self, to: float, *, resync: bool = True) -> None:
        """Run the broker up to ``to``: what it discloses reaches the subscriber
        KEY_LATENCY later (the forger has it at once), an anchor DELTA after the hello."""
        while self.b < to:
            nxt = min([to, self.b + P / 4, *self.hellos, *(t for t, _, _ in self.inbox)])
            self.b = nxt
            if self.hellos and self.hellos[0] <= self.b:
                self.hellos.pop(0)
                self.verifier.on_anchor(self.signer.anchor(self.b), None,
                                        self.local(self.b + DELTA))
            self.inbox += [(self.b + KEY_LATENCY, t, body) for t, body in self.signer.due(self.b)]
            while self.inbox and self.inbox[0][0] <= self.b:
                _, topic, body = self.inbox.pop(0)
                now = self.local(self.b)
                if topic == KEY_TOPIC:
                    good, bad = self.verifier.on_key(body, now)
                    self.delivered += [p for _, p in good]
                    self.refused += [r for _, r in bad]
                else:
                    assert topic == ANCHOR_TOPIC
                    self.refused += [r for _, r in self.verifier.on_anchor(body, None, now)]
            if resync and self.verifier.hello_due(self.local(self.b)):
                self.hello()

    def send(self, payload: bytes, latency: float = 0.05) -> Reason | None:
        """A genuine message sealed now, arriving ``latency`` later."""
        data = self.signer.seal(T.encode(), payload, self.b)
        try:
            self.verifier.on_message(T, data, self.local(self.b + latency))
        except TesseraError as exc:
            self.refused.append(exc.reason)
            return exc.reason
        return None

    def forge(self) -> Reason | None:
        """The forger's try at this instant with the newest disclosed key (call it at an
        interval boundary: the key went out this instant and has not reached us)."""
        i = int((self.b - self.signer.chain.t0) / P) + 1 - D
        if i < 1:
            return Reason.REPLAYED
        try:
            self.verifier.on_message(T, forged_for(self.signer, i), self.local(self.b))
        except TesseraError as exc:
            return exc.reason
        return None


def start(run: Run) -> None:
    run.advance(B0 + 10.0)
    run.hello()
    run.advance(B0 + 11.0)
    assert run.verifier.synced


@pytest.mark.parametrize("ppm", [-500, -100, 0, 100, 500])
def test_drift_within_the_bound_resyncs_and_delivers_everything(ppm: float) -> None:
    run = Run(ppm)
    start(run)
    sent = 0
    for minute in range(180):  # three hours
        for k in range(4):
            run.advance(B0 + 11.0 + minute * 60 + k * 15 + 0.5)  # mid-interval
            assert run.send(f"{minute}.{k}".encode()) is None, (minute, k, run.refused)
            sent += 1
            # the forger right at a disclosure, when a slow clock helps it most
            run.advance(B0 + 11.0 + minute * 60 + k * 15 + 1.0)
            assert run.forge() is not None
    run.advance(run.b + 5)
    assert len(run.delivered) == sent and b"forged" not in run.delivered
    assert run.refused == []
    # resynchronised about every margin / (2 rho) = 0.5 s / 1e-3 = 500 s: ~22 in 3 h
    assert 15 <= run.hellos_sent <= 30


def test_without_a_fresh_anchor_the_bound_expires_with_a_reason() -> None:
    run = Run(-100)
    start(run)
    run.advance(B0 + 11.0 + 900, resync=False)
    assert run.send(b"in time") is None
    # margin 0.5 s (delay * interval / 4) at 500 ppm: 1,000 s after the hello
    run.advance(B0 + 10.0 + 1001.0, resync=False)
    assert run.send(b"too old") is Reason.SESSION_EXPIRED
    assert run.forge() is Reason.SESSION_EXPIRED
    with pytest.raises(TesseraError) as exc:
        run.verifier.on_message(T, run.signer.seal(T.encode(), b"x", run.b),
                                run.local(run.b))
    assert "drift" in str(exc.value) and "hello" in str(exc.value)
    # one hello later everything flows again
    run.advance(run.b + 1.0)
    assert run.send(b"after the resync") is None
    run.advance(run.b + 4.0)
    assert run.delivered[-1] == b"after the resync"


def test_resync_is_asked_for_at_half_the_margin_and_retried() -> None:
    run = Run(0, max_drift_ppm=100.0, margin_s=0.2, hello_retry_s=5.0)
    start(run)
    h = run.local(B0 + 10.0)
    v = run.verifier
    assert not v.hello_due(h + 999.0)  # 100e-6 * 999 s < 0.1 s
    assert v.hello_due(h + 1001.0)
    v.hello(h + 1001.0)  # sent, no answer yet: not again before the retry time
    assert not v.hello_due(h + 1004.0)
    assert v.hello_due(h + 1006.5)


def test_a_broker_clock_beyond_the_configured_drift_is_caught_and_refused() -> None:
    # The TESLA condition needs the real drift within max_drift_ppm. A subscriber clock
    # 3,000 ppm slow breaks it; the disclosed keys arriving "early" against our upper
    # bound prove it, and the subscriber refuses (BAD_CONFIGURATION) until a fresh
    # anchor, dropping what it buffered under the broken bound.
    run = Run(-3000, max_drift_ppm=100.0, margin_s=0.5)
    start(run)
    caught = None
    for s in range(1, 2000):
        run.advance(B0 + 11.0 + s * 0.5, resync=False)
        reason = run.send(b"g%d" % s)
        if reason is not None:
            caught = (s * 0.5, reason)
            break
    assert caught is not None and caught[1] is Reason.BAD_CONFIGURATION, caught
    # The bound breaks once drift eats the anchor's 0.2 s of slack: 0.2 / (3000 - 100)
    # ppm = 69 s. A key proves it only once it is off by more than the key's own 0.1 s
    # latency: 0.3 / 2900 ppm = 103 s. Between the two a forger racing the key could
    # have got through: detection is a tripwire, the guarantee is rho itself.
    assert 100 <= caught[0] <= 110
    assert run.verifier.violation is not None and "ppm" in run.verifier.violation
    assert Reason.BAD_CONFIGURATION in run.refused
    assert run.verifier.hello_due(run.local(run.b))
    run.hello()
    run.advance(run.b + 1.0, resync=False)
    assert run.verifier.violation is None
    assert run.send(b"after") is None


def test_an_anchor_that_shows_the_broker_ahead_of_our_bound_is_a_violation() -> None:
    run = Run(-3000, max_drift_ppm=100.0, margin_s=100.0)
    start(run)
    # no keys looked at: the second anchor alone shows it
    signer, v = run.signer, run.verifier
    b = B0 + 10.0 + 200.0
    v.hello(run.local(b))
    rejected = v.on_anchor(signer.anchor(b + DELTA), None, run.local(b + DELTA))
    assert rejected == []
    assert v.violation is not None and "ahead" in v.violation
    b2 = b + 5.0
    v.hello(run.local(b2))
    v.on_anchor(signer.anchor(b2 + DELTA), None, run.local(b2 + DELTA))
    assert v.violation is None  # measured within the bound over those 5 s
