"""Fan-out proofs: TESLA-style delayed key disclosure (Perrig et al.), sans-IO.

A message to a topic with many subscribers cannot be re-proven per recipient (the broker
sees it once), and a key shared with every subscriber would let each forge to the
others. So the broker MACs it under the key of the current time interval from a one-way
chain, and discloses that key ``delay`` intervals later. A subscriber buffers the
message, accepts it only if it arrived while its key was still secret, and verifies it
once the key is disclosed. Whoever learns K_i has learned it too late to forge for
interval i.

**The TESLA security condition.** A subscriber may buffer a message for interval i only
if, when it arrives, the broker cannot yet have disclosed K_i: an *upper bound* on the
broker's time must be before the start of interval i + delay. The bound comes from a
hello the subscriber sent at its local time h, answered by an anchor that the broker made
at some moment after h (its fan-out clock then read ``c``), and from a maximum drift rate
rho between the two clocks (``max_drift_ppm``, default 500 ppm, the largest frequency error
a kernel's NTP discipline corrects)::

    broker clock at local time t  <=  c + (t - h) * (1 + rho)

It holds only while the real drift stays within rho. The drift term rho * (t - h) grows
with the age of the anchor; the subscriber asks for a fresh anchor (a new hello) once it
reaches half of ``margin_s`` (default delay * interval / 4) and refuses every message
(SESSION_EXPIRED) once it exceeds the margin without one. A disclosed key, or an anchor,
that shows the broker ahead of the bound proves the drift assumption false: everything
buffered under the bound is dropped and messages are refused (BAD_CONFIGURATION) until a
fresh anchor answers a later hello.

Chain: K_N random; K_{i-1} = BLAKE2s(LABEL_CHAIN, key=K_i); K_0 is the anchor, sent to
each subscriber proven under its own SA1 session. Interval i (1..N) is broker time
[t0 + (i-1)P, t0 + iP); K_i is disclosed once the broker is in interval i + delay. A new
chain starts a whole number of chain lengths after the previous one (the next one at
once, further on after an idle gap).

Trailer (31 bytes, appended like the SA1 header)::

    flags u8 = 0x12  chain id 8  zero u16  interval u32  tag 16

tag = BLAKE2s-128 keyed with BLAKE2s(LABEL_MAC, key=K_i) over the first 15 trailer
bytes, the 16-bit length of the topic, the topic and the payload.

Times are seconds on monotonic clocks the adapters pass in (the broker's and the
subscriber's own).
"""

from __future__ import annotations

import hmac
import json
import math
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from hashlib import blake2s
from typing import Any

from .errors import MalformedMessage, Reason, StateError, VerificationFailed

TRAILER_SIZE = 31
FLAGS = 0x12  # version 1, fan-out
LABEL_CHAIN = b"SA1 fanout chain"
LABEL_MAC = b"SA1 fanout mac"
LABEL_ID = b"SA1 fanout id"
HELLO_TOPIC = "tessera/fanout/hello"
ANCHOR_TOPIC = "tessera/fanout/anchor"
KEY_TOPIC = "tessera/fanout/key"
#: the largest relative rate error assumed between the broker's clock and a subscriber's
DEFAULT_MAX_DRIFT_PPM = 500.0
#: hellos waiting for an answer at most (each one is a time and a nonce)
MAX_HELLOS = 64
#: bytes of a hello's nonce echoed in the anchor answering it
MAX_NONCE = 32
#: a hello not answered within this long may be followed by another
HELLO_RETRY_S = 5.0
_PREFIX = struct.Struct(">B8sHI")
_U32_MAX = 0xFFFFFFFF
_EPS = 1e-6  # seconds: rounding in the bound's arithmetic never counts as a violation


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
    """The broker side: seals fan-out messages and says what to disclose when.

    ``interval_s`` is kept to whole milliseconds (the anchor carries milliseconds, and
    both sides must compute the same interval boundaries)."""

    def __init__(self, random_bytes: Callable[[int], bytes], now: float, *,
                 interval_s: float = 1.0, delay: int = 2, length: int = 3600) -> None:
        if not (0.05 <= interval_s <= 60 and 1 <= delay <= 16 and delay + 2 <= length):
            raise ValueError("fan-out: interval 0.05..60 s, delay 1..16, length > delay + 1")
        self.random_bytes = random_bytes
        self.interval_s = round(interval_s * 1000) / 1000.0
        self.delay = delay
        self.length = length
        self.chain = _Chain(random_bytes(32), length, now)
        self.previous: _Chain | None = None
        #: this signer's fan-out clock: its identity (a restarted broker has another)
        #: and its zero; every chain's start is given on it
        self.origin = random_bytes(8)
        self.epoch = now
        self._announced = self.chain  # the first chain is learned from a hello answer
        # the keyed MAC of the current interval, so a seal costs one state copy
        self._mac: tuple[_Chain, int, Any] | None = None

    def _interval(self, chain: _Chain, now: float) -> int:
        # before the chain's start (a clock read before this object was made) counts as
        # interval 1: its key goes out later than needed, never earlier
        return int(max(now - chain.t0, 0.0) / self.interval_s) + 1

    def _roll(self, now: float) -> None:
        # a new chain starts a whole number of chains after the current one: where it
        # ends (so its last keys can still be disclosed on time), or, after an idle gap
        # longer than a chain, at the chain boundary just before now
        chain = self.chain
        if self._interval(chain, now) <= chain.length:
            return
        span = chain.length * self.interval_s
        t0 = chain.t0 + max(1, math.floor((now - chain.t0) / span)) * span
        while t0 > now and t0 - span > chain.t0:  # rounding: now must fall in the chain
            t0 -= span
        while now - t0 >= span:
            t0 += span
        self.previous = chain  # its remaining keys still go out
        self.chain = _Chain(self.random_bytes(32), self.length, t0)

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

    def interval_key(self, now: float) -> tuple[bytes, bytes, float, float]:
        """(trailer prefix, MAC key, valid_from, valid_until) of the interval ``now``
        falls in: what :meth:`seal` uses for every time in [valid_from, valid_until), so
        another sealer (the broker's C fast lane) makes the same trailer there. The range
        is kept a microsecond inside the interval's edges, where float rounding could put
        a time on either side."""
        self._roll(now)
        chain = self.chain
        i = self._interval(chain, now)
        start = chain.t0 + (i - 1) * self.interval_s
        return (_PREFIX.pack(FLAGS, chain.id, 0, i), _h(LABEL_MAC, chain.keys[i]),
                start + _EPS, start + self.interval_s - _EPS)

    def _body(self, now: float, answer: bool, nonce: bytes = b"") -> bytes:
        c = self.chain
        body: dict[str, object] = {
            "chain": c.id.hex(), "anchor": c.keys[0].hex(), "interval_ms":
            round(self.interval_s * 1000), "delay": self.delay, "length": c.length,
            "elapsed_ms": (now - c.t0) * 1000.0, "origin": self.origin.hex(),
            "start_ms": (c.t0 - self.epoch) * 1000.0, "hello": answer,
        }
        if nonce:
            body["nonce"] = nonce.hex()
        return json.dumps(body, separators=(",", ":")).encode()

    def anchor(self, now: float, hello: bytes = b"") -> bytes:
        """Body of the anchor answering a subscriber's hello (made now, after the hello
        arrived): the commitment, the chain's place on this signer's fan-out clock and
        that clock's reading now. ``hello``: the hello's payload, whose first
        MAX_NONCE bytes are echoed so the subscriber knows which hello this answers."""
        self._roll(now)
        return self._body(now, True, hello[:MAX_NONCE])

    def due(self, now: float) -> list[tuple[str, bytes]]:
        """(topic, body) messages every registered subscriber should get now: the
        announcement of a chain not announced yet (``"hello": false``), then keys whose
        time has come."""
        out: list[tuple[str, bytes]] = []
        self._roll(now)
        if self.chain is not self._announced:
            self._announced = self.chain
            out.append((ANCHOR_TOPIC, self._body(now, False)))
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
    start: float  # the chain's t0 on the broker's fan-out clock (seconds)
    latest: tuple[int, bytes]  # (j, K_j) verified
    # interval -> the (topic, message) waiting for its key, each once
    pending: dict[int, dict[tuple[str, bytes], None]] = field(default_factory=dict)


class FanoutVerifier:
    """The subscriber side. Record each hello with :meth:`hello` just before sending it,
    feed every anchor, every fan-out message as it arrives and every disclosed key, with
    the local time; messages come back once verified. Send a hello whenever
    :meth:`hello_due` says so. At most ``max_pending`` messages wait for keys.

    A message is buffered only under the TESLA security condition (module docstring):
    with the broker's clock bounded by ``c + (now - h)(1 + rho)``, the start of interval
    i + delay is still ahead. ``max_drift_ppm`` is rho; ``margin_s`` (default delay *
    interval / 4) is how much drift uncertainty, rho * (now - h), the bound may carry:
    a hello is due at half of it, and past it every message is refused
    (SESSION_EXPIRED) until a fresh anchor comes.

    An answer echoing a hello's nonce is matched with that hello (older unanswered
    hellos are forgotten: their answers, if they come, match nothing and are ignored).
    An answer without one (a broker that does not echo) is matched by count: the n-th
    answer to arrive with the n-th hello recorded. Either way an answer that reads the
    broker's clock no later than one already used is ignored (it was reordered). An
    answer is never matched with a hello sent later than the one it answers, so the
    bound stays an upper bound; without nonces a lost answer only makes later ones look
    older. Every hello sent on the subscriber's sessions must be recorded, and one
    verifier per client."""

    def __init__(self, max_pending: int = 10_000, *,
                 max_drift_ppm: float = DEFAULT_MAX_DRIFT_PPM, margin_s: float | None = None,
                 hello_retry_s: float = HELLO_RETRY_S) -> None:
        if not (0 <= max_drift_ppm <= 100_000 and (margin_s is None or margin_s > 0)
                and hello_retry_s > 0):
            raise ValueError("fan-out: max_drift_ppm 0..100000, margin_s > 0")
        self.chains: dict[bytes, _Known] = {}
        self.max_pending = max_pending
        self.max_drift_ppm = max_drift_ppm
        self.margin_s = margin_s
        self.hello_retry_s = hello_retry_s
        self._rho = max_drift_ppm * 1e-6
        self._pending = 0
        self._origin: bytes | None = None  # the broker's fan-out clock we are synced to
        self._retired: deque[bytes] = deque(maxlen=8)  # clocks of restarted brokers
        self._sync: tuple[float, float] | None = None  # (broker clock c, local hello time h)
        self._newest: float | None = None  # newest broker clock read in a hello answer
        self._hellos: deque[tuple[float, bytes]] = deque()  # (local time, nonce) unanswered
        self._last_hello: float | None = None
        self.hellos_sent = 0
        self.hellos_answered = 0
        #: why messages are refused after the bound was shown broken, until a fresh anchor
        self.violation: str | None = None
        self._violated_at = 0.0
        self.violations = 0

    # -- the time bound -----------------------------------------------------------------

    @property
    def synced(self) -> bool:
        """A time bound is in place (it may still have expired: see :meth:`hello_due`)."""
        return self._sync is not None

    def _margin(self, known: _Known | None) -> float:
        if self.margin_s is not None:
            return self.margin_s
        if known is None:
            return 0.0
        return known.delay * known.interval_s / 4.0

    def _newest_chain(self) -> _Known | None:
        return max(self.chains.values(), key=lambda k: k.start, default=None)

    def upper_bound(self, now: float) -> float | None:
        """The latest the broker's fan-out clock can read at local time ``now``."""
        if self._sync is None:
            return None
        c, h = self._sync
        return c + max(now - h, 0.0) * (1.0 + self._rho)

    def hello_due(self, now: float) -> bool:
        """Whether to send a hello now (record it with :meth:`hello`): no bound yet, a
        broken one, or its drift uncertainty at half the margin; not while a hello sent
        less than ``hello_retry_s`` ago is unanswered, nor with MAX_HELLOS unanswered."""
        if len(self._hellos) >= MAX_HELLOS:
            return False
        if self._hellos and self._last_hello is not None and (
                now - self._last_hello < self.hello_retry_s):
            return False
        if self._sync is None or self.violation is not None:
            return True
        return self._rho * (now - self._sync[1]) >= self._margin(self._newest_chain()) / 2

    def hello(self, now: float, nonce: bytes = b"") -> None:
        """A hello is being sent at local time ``now`` (record it before sending) with
        ``nonce`` (fresh random bytes, at most MAX_NONCE) as its payload."""
        if len(self._hellos) >= MAX_HELLOS:
            raise StateError(f"{MAX_HELLOS} fan-out hellos unanswered", Reason.INVALID_STATE)
        if len(nonce) > MAX_NONCE:
            raise StateError(f"a hello nonce is at most {MAX_NONCE} bytes",
                             Reason.BAD_PARAMETERS)
        self._hellos.append((now, nonce))
        self._last_hello = now
        self.hellos_sent += 1

    def _violate(self, detail: str, now: float) -> list[tuple[str, Reason]]:
        """The bound was shown broken: drop everything buffered under it."""
        self.violation = detail
        self._violated_at = now
        self.violations += 1
        dropped = [(topic, Reason.BAD_CONFIGURATION) for known in self.chains.values()
                   for bucket in known.pending.values() for topic, _ in bucket]
        for known in self.chains.values():
            known.pending.clear()
        self._pending = 0
        return dropped

    def _drop_chain(self, cid: bytes, reason: Reason) -> list[tuple[str, Reason]]:
        known = self.chains.pop(cid)
        dropped = [(topic, reason) for bucket in known.pending.values() for topic, _ in bucket]
        self._pending -= len(dropped)
        return dropped

    # -- input ----------------------------------------------------------------------------

    def on_anchor(self, body: bytes, hello_sent_at: float | None = None,
                  now: float | None = None) -> list[tuple[str, Reason]]:
        """An anchor arrived at local time ``now``. A hello answer (``"hello": true``) is
        matched with the recorded hello whose nonce it echoes, or without one with the
        oldest recorded hello not yet answered, unless ``hello_sent_at`` says which
        local time the hello it answers was sent at. An
        announcement (``"hello": false``) only places its chain. Returns the buffered
        messages dropped on the way ((topic, reason): a chain pushed out, a restarted
        broker's chains, the bound shown broken)."""
        try:
            a = json.loads(body)
            anchor = bytes.fromhex(a["anchor"])
            cid = bytes.fromhex(a["chain"])
            origin = bytes.fromhex(a["origin"])
            interval_s = a["interval_ms"] / 1000.0
            delay, length = int(a["delay"]), int(a["length"])
            elapsed, start = float(a["elapsed_ms"]) / 1000.0, float(a["start_ms"]) / 1000.0
            answer = a["hello"]
            echoed = bytes.fromhex(a.get("nonce", ""))
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:
            raise MalformedMessage(f"fan-out anchor unreadable: {exc}", Reason.MALFORMED) from None
        # NaN or infinite times would make the time check always pass; delay and
        # length beyond the u32 interval field would overflow float arithmetic later
        if (len(anchor) != 32 or chain_id(anchor) != cid or len(origin) != 8
                or not isinstance(answer, bool) or len(echoed) > MAX_NONCE
                or not math.isfinite(interval_s)
                or not math.isfinite(elapsed) or not math.isfinite(start) or interval_s <= 0
                or not 1 <= delay <= _U32_MAX or not 1 <= length <= _U32_MAX):
            raise MalformedMessage("fan-out anchor inconsistent", Reason.MALFORMED)
        known = self.chains.get(cid)
        if known is not None and (known.interval_s, known.delay, known.length, known.start) != (
                interval_s, delay, length, start):
            raise MalformedMessage("fan-out anchor contradicts the chain already known",
                                   Reason.MALFORMED)
        is_answer = answer or hello_sent_at is not None
        h: float | None = hello_sent_at
        if is_answer and h is None:  # consumed even if it turns out stale below
            if echoed:
                for n, (sent, nonce) in enumerate(self._hellos):
                    if hmac.compare_digest(nonce, echoed):
                        h = sent
                        for _ in range(n + 1):
                            self._hellos.popleft()
                        self.hellos_answered += 1
                        break
            elif self._hellos:
                h = self._hellos.popleft()[0]
                self.hellos_answered += 1
        if origin in self._retired:
            return []  # from a broker that has since restarted
        dropped: list[tuple[str, Reason]] = []
        if origin != self._origin:  # the broker restarted: its old chains are dead
            if self._origin is not None:
                self._retired.append(self._origin)
            for old in list(self.chains):
                dropped += self._drop_chain(old, Reason.UNKNOWN_SESSION)
            self._origin = origin
            self._sync = self._newest = None
            known = None
        if known is None:
            self.chains[cid] = _Known(interval_s, delay, length, start, (0, anchor))
            while len(self.chains) > 2:  # the chain that started first goes
                oldest = min(self.chains, key=lambda k: self.chains[k].start)
                dropped += self._drop_chain(oldest, Reason.EPOCH_OUT_OF_WINDOW)
        if h is None:
            return dropped
        clock = start + elapsed  # the broker's fan-out clock when it made this answer
        if self._newest is not None and clock <= self._newest:
            return dropped  # reordered: a newer answer is already in use
        self._newest = clock
        arrived = h if now is None else max(now, h)
        upper = self.upper_bound(arrived)
        if now is not None and upper is not None and clock > upper + _EPS:
            dropped += self._violate(
                f"an anchor read the broker's fan-out clock {clock - upper:.3f} s ahead of "
                f"our bound: the clocks drift more than max_drift_ppm = "
                f"{self.max_drift_ppm:g}", now)
        elif self.violation is not None and h >= self._violated_at:
            self.violation = None  # answers a hello sent after the bound broke
        self._sync = (clock, h)
        return dropped

    def on_message(self, topic: str, data: bytes, now: float) -> None:
        """Buffer one fan-out message that arrived at local time ``now``; raises (with a
        reason) if it cannot be good or is already waiting."""
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
        entry = (topic, bytes(data))
        bucket = known.pending.get(i)
        if bucket is not None and entry in bucket:
            raise VerificationFailed(f"a duplicate of a message of interval {i} already "
                                     "waiting for its key", Reason.REPLAYED)
        if self.violation is not None:
            raise VerificationFailed(f"{self.violation}; refused until a fresh anchor",
                                     Reason.BAD_CONFIGURATION)
        if self._sync is None:
            raise VerificationFailed("no fan-out time bound yet: no anchor has answered a "
                                     "hello", Reason.SESSION_EXPIRED)
        c, h = self._sync
        age = max(now - h, 0.0)
        drift = self._rho * age
        margin = self._margin(known)
        if drift > margin:
            raise VerificationFailed(
                f"fan-out time bound too old: {age:.0f} s since the hello it rests on, drift "
                f"uncertainty {drift * 1000:.0f} ms at {self.max_drift_ppm:g} ppm exceeds "
                f"the {margin * 1000:.0f} ms margin; waiting for a fresh anchor (hello)",
                Reason.SESSION_EXPIRED)
        # the TESLA condition: the broker (its clock at most c + age + drift) cannot
        # have reached interval i + delay, when K_i goes out
        if c + age + drift - known.start >= (i + known.delay - 1) * known.interval_s:
            raise VerificationFailed(f"interval {i} arrived after its key may have been "
                                     "disclosed", Reason.EPOCH_OUT_OF_WINDOW)
        if self._pending >= self.max_pending:
            raise VerificationFailed("too many fan-out messages waiting for keys",
                                     Reason.REPLAYED)
        if bucket is None:
            bucket = known.pending[i] = {}
        bucket[entry] = None
        self._pending += 1

    def on_key(self, body: bytes, now: float | None = None
               ) -> tuple[list[tuple[str, bytes]], list[tuple[str, Reason]]]:
        """A disclosed key that arrived at local time ``now``: (verified messages,
        rejected (topic, reason)). The broker had reached interval i + delay when it
        disclosed K_i; if our bound says it cannot have, the drift assumption is false
        (see the module docstring) and what waits is dropped, not verified."""
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
        known.latest = (i, key)
        bad: list[tuple[str, Reason]] = []
        upper = self.upper_bound(now) if now is not None else None
        if upper is not None and self.violation is None:
            disclosed_at = known.start + (i + known.delay - 1) * known.interval_s
            if disclosed_at > upper + _EPS:
                assert now is not None
                bad = self._violate(
                    f"K_{i} arrived {disclosed_at - upper:.3f} s before our bound let the "
                    f"broker disclose it: the clocks drift more than max_drift_ppm = "
                    f"{self.max_drift_ppm:g}", now)
        # every key from K_{j+1} to K_i follows from K_i
        keys = {i: key}
        for n in range(i - 1, j, -1):
            keys[n] = _h(LABEL_CHAIN, keys[n + 1])
        good: list[tuple[str, bytes]] = []
        for n in sorted(x for x in known.pending if x <= i):
            for topic, data in known.pending.pop(n):
                self._pending -= 1
                cut = len(data) - TRAILER_SIZE
                want = _tag(keys[n], data[cut:cut + 15], topic.encode(), data[:cut])
                if hmac.compare_digest(want, data[cut + 15:]):
                    good.append((topic, data[:cut]))
                else:
                    bad.append((topic, Reason.BAD_TAG))
        return good, bad
