"""Fan-out proofs: TESLA-style delayed key disclosure (Perrig et al.), sans-IO.

A message to a topic with many subscribers cannot be re-proven per recipient (the broker
sees it once), and a key shared with every subscriber would let each forge to the
others. So the broker MACs it under the key of the current time interval from a one-way
chain, and discloses that key ``delay`` intervals later. A subscriber buffers the
message, accepts it only if it arrived while its key was still secret (a loose time
bound set up when it said hello), and verifies it once the key is disclosed. Whoever
learns K_i has learned it too late to forge for interval i.

Chain: K_N random; K_{i-1} = BLAKE2s(LABEL_CHAIN, key=K_i); K_0 is the anchor, sent to
each subscriber proven under its own SA1 session. Interval i (1..N) is broker time
[t0 + (i-1)P, t0 + iP); K_i is disclosed once the broker is in interval i + delay.

Trailer (31 bytes, appended like the SA1 header)::

    flags u8 = 0x12  chain id 8  zero u16  interval u32  tag 16

tag = BLAKE2s-128 keyed with BLAKE2s(LABEL_MAC, key=K_i) over the first 15 trailer
bytes, the 16-bit length of the topic, the topic and the payload.

Times are seconds on a monotonic clock the adapter passes in.
"""

from __future__ import annotations

import hmac
import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from hashlib import blake2s
from typing import Any

from .errors import MalformedMessage, Reason, VerificationFailed

TRAILER_SIZE = 31
FLAGS = 0x12  # version 1, fan-out
LABEL_CHAIN = b"SA1 fanout chain"
LABEL_MAC = b"SA1 fanout mac"
LABEL_ID = b"SA1 fanout id"
HELLO_TOPIC = "tessera/fanout/hello"
ANCHOR_TOPIC = "tessera/fanout/anchor"
KEY_TOPIC = "tessera/fanout/key"
_PREFIX = struct.Struct(">B8sHI")
_U32_MAX = 0xFFFFFFFF


def _h(label: bytes, key: bytes) -> bytes:
    return blake2s(label, key=key).digest()


def chain_id(anchor: bytes) -> bytes:
    return _h(LABEL_ID, anchor)[:8]


def _tag(key: bytes, prefix: bytes, topic: bytes, payload: bytes) -> bytes:
    mac = blake2s(key=_h(LABEL_MAC, key), digest_size=16)
    mac.update(prefix)
    mac.update(len(topic).to_bytes(2, "big"))
    mac.update(topic)
    mac.update(payload)
    return mac.digest()


class _Chain:
    def __init__(self, seed: bytes, length: int, t0: float) -> None:
        keys = [seed]
        for _ in range(length):
            keys.append(_h(LABEL_CHAIN, keys[-1]))
        keys.reverse()  # keys[i] = K_i, keys[0] the anchor
        self.keys = keys
        self.length = length
        self.t0 = t0
        self.id = chain_id(keys[0])
        self.disclosed = 0  # highest interval whose key went out


class FanoutSigner:
    """The broker side: seals fan-out messages and says what to disclose when."""

    def __init__(self, random_bytes: Callable[[int], bytes], now: float, *,
                 interval_s: float = 1.0, delay: int = 2, length: int = 3600) -> None:
        if not (0.05 <= interval_s <= 60 and 1 <= delay <= 16 and delay + 2 <= length):
            raise ValueError("fan-out: interval 0.05..60 s, delay 1..16, length > delay + 1")
        self.random_bytes = random_bytes
        self.interval_s = interval_s
        self.delay = delay
        self.length = length
        self.chain = _Chain(random_bytes(32), length, now)
        self.previous: _Chain | None = None
        # the keyed MAC of the current interval, so a seal costs one state copy
        self._mac: tuple[_Chain, int, Any] | None = None

    def _interval(self, chain: _Chain, now: float) -> int:
        return int((now - chain.t0) / self.interval_s) + 1

    def _roll(self, now: float) -> None:
        # a new chain starts where the old one ends, so the old one's last keys can
        # still be disclosed on time
        chain = self.chain
        if self._interval(chain, now) > chain.length:
            end = chain.t0 + chain.length * self.interval_s
            self.previous = chain
            self.chain = _Chain(self.random_bytes(32), self.length, end)

    def seal(self, topic: bytes, payload: bytes, now: float) -> bytes:
        self._roll(now)
        chain = self.chain
        i = self._interval(chain, now)
        prefix = _PREFIX.pack(FLAGS, chain.id, 0, i)
        cached = self._mac
        if cached is None or cached[0] is not chain or cached[1] != i:
            cached = self._mac = (chain, i, blake2s(key=_h(LABEL_MAC, chain.keys[i]),
                                                    digest_size=16))
        mac = cached[2].copy()
        mac.update(prefix)
        mac.update(len(topic).to_bytes(2, "big"))
        mac.update(topic)
        mac.update(payload)
        return payload + prefix + mac.digest()

    def anchor(self, now: float) -> bytes:
        """Body of the anchor message for a subscriber that said hello (or a new
        chain): the commitment and the broker's time relative to the chain."""
        self._roll(now)
        c = self.chain
        return json.dumps({
            "chain": c.id.hex(), "anchor": c.keys[0].hex(), "interval_ms":
            round(self.interval_s * 1000), "delay": self.delay, "length": c.length,
            "elapsed_ms": (now - c.t0) * 1000.0,
        }, separators=(",", ":")).encode()

    def due(self, now: float) -> list[tuple[str, bytes]]:
        """(topic, body) messages every registered subscriber should get now: keys
        whose time has come (and the anchor of a chain that just started)."""
        out: list[tuple[str, bytes]] = []
        before = self.chain
        self._roll(now)
        if self.chain is not before:
            out.append((ANCHOR_TOPIC, self.anchor(now)))
        for chain in (self.previous, self.chain):
            if chain is None:
                continue
            upto = min(self._interval(chain, now) - self.delay, chain.length)
            if upto > chain.disclosed:
                chain.disclosed = upto
                out.append((KEY_TOPIC, json.dumps(
                    {"chain": chain.id.hex(), "interval": upto, "key": chain.keys[upto].hex()},
                    separators=(",", ":")).encode()))
        return out


@dataclass
class _Known:
    interval_s: float
    delay: int
    length: int
    offset: float  # broker chain time at local time 0 is at most this (seconds)
    latest: tuple[int, bytes]  # (j, K_j) verified
    pending: dict[int, list[tuple[str, bytes, bytes, bytes]]] = field(default_factory=dict)


class FanoutVerifier:
    """The subscriber side. Feed it the anchor (with the local time the hello was
    sent), every fan-out message as it arrives, and every disclosed key; it returns
    messages once verified. At most ``max_pending`` messages wait for keys."""

    def __init__(self, max_pending: int = 10_000) -> None:
        self.chains: dict[bytes, _Known] = {}
        self.max_pending = max_pending
        self._pending = 0
        self._synced_at: float | None = None  # local time the hello went out
        self._sync_elapsed: float | None = None

    def on_anchor(self, body: bytes, hello_sent_at: float | None) -> None:
        """``hello_sent_at``: local time the hello this anchor answers was sent (None
        for the anchor of a later chain, which is placed with the first sync)."""
        try:
            a = json.loads(body)
            anchor = bytes.fromhex(a["anchor"])
            cid = bytes.fromhex(a["chain"])
            interval_s = a["interval_ms"] / 1000.0
            delay, length, elapsed = int(a["delay"]), int(a["length"]), float(a["elapsed_ms"])
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:
            raise MalformedMessage(f"fan-out anchor unreadable: {exc}", Reason.MALFORMED) from None
        # NaN or infinite times would make the time check below always pass; delay and
        # length beyond the u32 interval field would overflow float arithmetic later
        if (len(anchor) != 32 or chain_id(anchor) != cid or not math.isfinite(interval_s)
                or not math.isfinite(elapsed) or interval_s <= 0
                or not 1 <= delay <= _U32_MAX or not 1 <= length <= _U32_MAX):
            raise MalformedMessage("fan-out anchor inconsistent", Reason.MALFORMED)
        if hello_sent_at is not None:
            # the broker made this after our hello left: its time now is at most
            # elapsed + (local now - hello_sent_at)
            offset = elapsed / 1000.0 - hello_sent_at
        else:
            if not self.chains:
                raise MalformedMessage("fan-out anchor before any hello", Reason.MALFORMED)
            ref = next(reversed(self.chains.values()))  # the newest
            # a later chain starts where the previous ended: same bound, shifted
            offset = ref.offset - ref.length * ref.interval_s
        self.chains[cid] = _Known(interval_s, delay, length, offset, (0, anchor))
        while len(self.chains) > 2:
            old = next(iter(self.chains))
            self._pending -= sum(len(v) for v in self.chains[old].pending.values())
            del self.chains[old]

    def on_message(self, topic: str, data: bytes, now: float) -> None:
        """Buffer one fan-out message; raises (with a reason) if it cannot be good."""
        if len(data) < TRAILER_SIZE:
            raise MalformedMessage("shorter than the fan-out trailer", Reason.TRUNCATED)
        cut = len(data) - TRAILER_SIZE
        trailer = data[cut:]
        flags, cid, zero, i = _PREFIX.unpack_from(trailer)
        if flags != FLAGS or zero != 0:
            raise MalformedMessage("not a fan-out trailer", Reason.MALFORMED)
        known = self.chains.get(cid)
        if known is None:
            raise VerificationFailed("unknown fan-out chain", Reason.UNKNOWN_SESSION)
        if not 1 <= i <= known.length or i <= known.latest[0]:
            raise VerificationFailed(f"interval {i} already disclosed or out of the chain",
                                     Reason.REPLAYED)
        # safe only if K_i could not have been disclosed yet: the broker's time (at most
        # offset + now) is before the start of interval i + delay
        if known.offset + now >= (i + known.delay - 1) * known.interval_s:
            raise VerificationFailed(f"interval {i} arrived after its key may have been "
                                     "disclosed", Reason.EPOCH_OUT_OF_WINDOW)
        if self._pending >= self.max_pending:
            raise VerificationFailed("too many fan-out messages waiting for keys",
                                     Reason.REPLAYED)
        known.pending.setdefault(i, []).append((topic, data[:cut], trailer[:15], trailer[15:]))
        self._pending += 1

    def on_key(self, body: bytes) -> tuple[list[tuple[str, bytes]], list[tuple[str, Reason]]]:
        """A disclosed key: (verified messages, rejected (topic, reason))."""
        try:
            k = json.loads(body)
            cid, i, key = bytes.fromhex(k["chain"]), int(k["interval"]), bytes.fromhex(k["key"])
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:
            raise MalformedMessage(f"fan-out key unreadable: {exc}", Reason.MALFORMED) from None
        known = self.chains.get(cid)
        if known is None:
            raise VerificationFailed("key for an unknown fan-out chain", Reason.UNKNOWN_SESSION)
        j, kj = known.latest
        if len(key) != 32 or not j < i <= known.length:
            raise VerificationFailed(f"key for interval {i} out of order", Reason.MALFORMED)
        probe = key
        for _ in range(i - j):
            probe = _h(LABEL_CHAIN, probe)
        if not hmac.compare_digest(probe, kj):
            raise VerificationFailed("key does not hash to the chain", Reason.BAD_TAG)
        # every key from K_{j+1} to K_i follows from K_i
        keys = {i: key}
        for n in range(i - 1, j, -1):
            keys[n] = _h(LABEL_CHAIN, keys[n + 1])
        known.latest = (i, key)
        good: list[tuple[str, bytes]] = []
        bad: list[tuple[str, Reason]] = []
        for n in sorted(x for x in known.pending if x <= i):
            for topic, payload, prefix, tag in known.pending.pop(n):
                self._pending -= 1
                want = _tag(keys[n], prefix, topic.encode(), payload)
                if hmac.compare_digest(want, tag):
                    good.append((topic, payload))
                else:
                    bad.append((topic, Reason.BAD_TAG))
        return good, bad
