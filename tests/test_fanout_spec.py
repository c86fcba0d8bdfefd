"""Our fan-out subscriber (structauth.fanout.FanoutVerifier) against the one written
from PROTOCOL.md §8 alone (tests/independent): the same inputs, on random timelines
with drift, lost and reordered anchors, duplicates, forgeries, idle gaps and a broker
restart, must give the same verdicts (reason names, deliveries, drops)."""

from __future__ import annotations

import os
import random
from collections.abc import Callable

import pytest

from structauth.errors import TesseraError
from structauth.fanout import KEY_TOPIC, FanoutSigner, FanoutVerifier
from tests.independent import sa1_reference as sa1

T = "devices/pi-9/telemetry/t"


def _both(ours: Callable[[], object], theirs: Callable[[], object]) -> tuple[object, object]:
    def run(f: Callable[[], object], mine: bool) -> object:
        try:
            out = f()
        except TesseraError as exc:
            return ("refused", exc.reason.name)
        except sa1.Refused as exc:
            return ("refused", exc.reason)
        if isinstance(out, tuple):  # on_key: (good, bad)
            good, bad = out
            return ("key", good, sorted((t, getattr(r, "name", r)) for t, r in bad))
        if isinstance(out, list):  # on_anchor: dropped
            return ("anchor", sorted((t, getattr(r, "name", r)) for t, r in out))
        return ("ok",)

    return run(ours, True), run(theirs, False)


@pytest.mark.parametrize("seed", range(24))
def test_our_subscriber_and_the_specs_agree(seed: int) -> None:
    rnd = random.Random(seed)
    ppm = rnd.choice([-3000, -500, -100, 0, 100, 500, 3000])
    echo = rnd.random() < 0.5  # does the broker echo the hello's nonce
    b0 = 1000.0

    def local(b: float) -> float:
        return 7.0 + (b - b0) * (1 + ppm * 1e-6)

    signer = FanoutSigner(os.urandom, b0, interval_s=1.0, delay=2, length=30)
    ours = FanoutVerifier(max_pending=40)
    theirs = sa1.FanoutSubscriber(max_pending=40)
    inbox: list[tuple[float, str, bytes]] = []  # (broker time it arrives, kind, body)
    sent: list[bytes] = []
    b = b0
    verdicts = 0

    def check(a: Callable[[], object], c: Callable[[], object]) -> None:
        nonlocal verdicts
        mine, spec = _both(a, c)
        assert mine == spec, (seed, ppm, b)
        verdicts += 1

    for step in range(500):
        gap = rnd.choice([0.05, 0.3, 0.7, 1.0, 2.5]) if rnd.random() > 0.01 else 75.0
        b += gap
        if step == 300 and rnd.random() < 0.5:  # the broker restarts: a new clock
            signer = FanoutSigner(os.urandom, b, interval_s=1.0, delay=2, length=30)
        for topic, body in signer.due(b):
            inbox.append((b + rnd.uniform(0.0, 0.3), topic, body))
        if ours.hello_due(local(b)):
            nonce = os.urandom(rnd.choice([0, 16]))
            ours.hello(local(b), nonce)
            theirs.hello(local(b), nonce)
            if rnd.random() > 0.15:  # else the answer is lost
                made = b + rnd.uniform(0.01, 0.2)
                arrives = made + (rnd.uniform(0.0, 0.2) if rnd.random() > 0.1 else 20.0)
                inbox.append((arrives, "answer", signer.anchor(made, nonce if echo else b"")))
        inbox.sort(key=lambda x: x[0])
        while inbox and inbox[0][0] <= b:
            at, kind, body = inbox.pop(0)
            now = local(at)
            if kind == KEY_TOPIC:
                check(lambda: ours.on_key(body, now),  # noqa: B023
                      lambda: theirs.on_key(body, now))  # noqa: B023
            else:
                check(lambda: ours.on_anchor(body, None, now),  # noqa: B023
                      lambda: theirs.on_anchor(body, None, now))  # noqa: B023
        roll = rnd.random()
        if roll < 0.5:
            data = signer.seal(T.encode(), b"%d" % step, b)
            sent.append(data)
        elif roll < 0.65 and sent:
            data = rnd.choice(sent[-5:])  # a duplicate, maybe late
        elif roll < 0.8:
            i = signer.chain.disclosed
            forger = FanoutSigner(os.urandom, b0, interval_s=1.0, delay=2, length=4)
            forger.chain = signer.chain
            data = forger.seal(T.encode(), b"forged",
                               signer.chain.t0 + (max(i, 1) - 0.5) * 1.0)
        else:
            flipped = bytearray(signer.seal(T.encode(), b"%d" % step, b))
            flipped[rnd.randrange(len(flipped))] ^= 1 << rnd.randrange(8)
            data = bytes(flipped)
        now = local(b + rnd.uniform(0.0, 0.1))
        check(lambda: ours.on_message(T, data, now),  # noqa: B023
              lambda: theirs.on_message(T, data, now))  # noqa: B023
    assert verdicts > 500
