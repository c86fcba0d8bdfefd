"""Per-message proofs: every property has a negative test that asserts the refusal, its
Reason, and that the refused message changed nothing."""

from __future__ import annotations

import enum
import hashlib
import types
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st

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
from structauth.replay import ReplayWindow
from structauth.session import HEADER_SIZE, MAX_SEQ, SessionState
from tests.support import FakeClock, SessionPair

TOPIC = b"devices/d1/telemetry/temp"
PAYLOAD = b'{"t": 21.5}' * 10


@pytest.fixture(params=[False, True], ids=["tagged", "sealed"])
def pair(request: pytest.FixtureRequest) -> SessionPair:
    return SessionPair.direct(SessionParams(sealed=request.param))


def test_round_trip_both_directions(pair: SessionPair) -> None:
    h, body = pair.up(TOPIC, PAYLOAD)
    assert len(h) == HEADER_SIZE == 31
    ev = pair.responder.verify(h, TOPIC, body, pair.clock.now)
    assert ev.payload == PAYLOAD and ev.seq == 0 and ev.epoch == 0
    assert ev._fields == ("payload", "epoch", "seq")  # no session_confirmed any more
    h, body = pair.down(b"devices/d1/commands/reboot", b"now")
    ev = pair.initiator.verify(h, b"devices/d1/commands/reboot", body, pair.clock.now)
    assert ev.payload == b"now"


def test_responder_sends_at_once(pair: SessionPair) -> None:
    """A responder session exists only after msg3, so it is established and may send."""
    assert pair.responder.state is SessionState.ESTABLISHED
    h, body = pair.down(TOPIC, b"x")
    assert pair.initiator.verify(h, TOPIC, body, pair.clock.now).payload == b"x"


def test_sealed_mode_hides_payload() -> None:
    p = SessionPair.direct(SessionParams(sealed=True))
    h, body = p.up(TOPIC, PAYLOAD)
    assert body != PAYLOAD and len(body) == len(PAYLOAD)
    assert p.responder.verify(h, TOPIC, body, p.clock.now).payload == PAYLOAD


def test_poll_reports_lifetime_once() -> None:
    q = SessionPair.direct(SessionParams(lifetime_s=30))
    assert q.responder.poll(q.clock.now) is None
    assert q.initiator.next_deadline == q.clock.now + 30
    ev = q.initiator.poll(q.clock.now + 30)
    assert ev is not None and ev.reason is Reason.SESSION_EXPIRED
    assert q.initiator.state is SessionState.CLOSED
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
        with pytest.raises(ReplayDetected) as exc:
            pair.responder.verify(h, TOPIC, body, pair.clock.now)
        assert exc.value.reason is Reason.REPLAYED
    for i in (1, 2, 4, 6, 7, 8):  # the refusals did not mark the others
        h, body = msgs[i]
        assert pair.responder.verify(h, TOPIC, body, pair.clock.now).seq == i


def test_too_old_sequence_rejected() -> None:
    p = SessionPair.direct(SessionParams(replay_window=32))
    old = p.up(TOPIC, b"old")
    for _ in range(40):
        h, body = p.up(TOPIC, b"x")
    p.responder.verify(h, TOPIC, body, p.clock.now)
    with pytest.raises(ReplayDetected, match="outside the replay window") as exc:
        p.responder.verify(old[0], TOPIC, old[1], p.clock.now)
    assert exc.value.reason is Reason.REPLAYED


# -- the replay window under jumps --------------------------------------------------


def message_with_seq(p: SessionPair, seq: int, payload: bytes = b"j") -> tuple[bytes, bytes]:
    p.initiator._next_seq = seq
    return p.up(TOPIC, payload)


@pytest.mark.parametrize("sealed", [False, True], ids=["tagged", "sealed"])
def test_jump_to_the_last_sequence_number_is_o1(sealed: bool) -> None:
    """A jump to 2**32-1 resets the mask instead of shifting it by 2**32 bits (which
    cost 3.2 s and 1.1 GB): asserted on the window's integer, not on time."""
    p = SessionPair.direct(SessionParams(sealed=sealed, replay_window=1024))
    early = [p.up(TOPIC, b"%d" % i) for i in range(5)]
    for h, b in early[:3]:
        p.responder.verify(h, TOPIC, b, p.clock.now)
    last = message_with_seq(p, MAX_SEQ)
    assert p.responder.verify(last[0], TOPIC, last[1], p.clock.now).seq == 2**32 - 1
    window = p.responder._window
    assert window.top == 2**32 - 1
    assert window.mask.bit_length() <= window.size == 1024
    assert window.mask == 1
    # after it, old numbers are refused, seen or not (they are far behind the window)
    for h, b in early:
        with pytest.raises(ReplayDetected) as exc:
            p.responder.verify(h, TOPIC, b, p.clock.now)
        assert exc.value.reason is Reason.REPLAYED
    # the last number itself is not accepted twice
    with pytest.raises(ReplayDetected):
        p.responder.verify(last[0], TOPIC, last[1], p.clock.now)
    # numbers just behind it, inside the window, are accepted once
    h, b = message_with_seq(p, MAX_SEQ - 1023)
    p.responder.verify(h, TOPIC, b, p.clock.now)
    h2, b2 = message_with_seq(p, MAX_SEQ - 1024)
    with pytest.raises(ReplayDetected):
        p.responder.verify(h2, TOPIC, b2, p.clock.now)
    assert window.mask.bit_length() <= window.size


def test_replay_window_class_jump_is_o1() -> None:
    w = ReplayWindow(65535)
    w.commit(0)
    w.commit(2**32 - 1)
    assert w.mask.bit_length() <= 65535 and w.top == 2**32 - 1
    with pytest.raises(ReplayDetected):
        w.check(0)
    with pytest.raises(ReplayDetected):
        w.check(2**32 - 1)
    w.check(2**32 - 2)


class ReferenceWindow:
    """The replay rule written the slow, obvious way: every number ever accepted."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.top = -1
        self.seen: set[int] = set()

    def accepts(self, seq: int) -> bool:
        if seq > self.top:
            return True
        return self.top - seq < self.size and seq not in self.seen

    def commit(self, seq: int) -> None:
        self.seen.add(seq)
        self.top = max(self.top, seq)


sequences = st.lists(
    st.one_of(
        st.integers(0, 2**32 - 1),
        st.integers(0, 200),
        st.integers(2**32 - 200, 2**32 - 1),
    ),
    max_size=40,
)


@given(sequences)
@settings(max_examples=200, deadline=None)
def test_replay_window_matches_reference(seqs: list[int]) -> None:
    size = 64
    w, ref = ReplayWindow(size), ReferenceWindow(size)
    for seq in seqs:
        try:
            w.check(seq)
            got = True
        except ReplayDetected:
            got = False
        assert got == ref.accepts(seq), seq
        if got:
            w.commit(seq)
            ref.commit(seq)
        assert w.mask.bit_length() <= size


@given(st.lists(st.one_of(st.integers(0, 2**32 - 1), st.integers(0, 100)), max_size=12))
@settings(max_examples=60, deadline=None)
def test_session_verify_window_matches_reference(seqs: list[int]) -> None:
    """The same rule through Session.verify's inlined window code."""
    p = SessionPair.direct(SessionParams(replay_window=32))
    ref = ReferenceWindow(32)
    for seq in seqs:
        h, b = message_with_seq(p, seq)
        try:
            p.responder.verify(h, TOPIC, b, p.clock.now)
            got = True
        except ReplayDetected:
            got = False
        assert got == ref.accepts(seq), seq
        if got:
            ref.commit(seq)
        assert p.responder._window.mask.bit_length() <= 32


# -- what the tag binds ---------------------------------------------------------------


def test_tag_moved_to_another_topic_or_payload(pair: SessionPair) -> None:
    h, body = pair.up(TOPIC, PAYLOAD)
    with pytest.raises(VerificationFailed) as exc:
        pair.responder.verify(h, b"devices/d2/telemetry/temp", body, pair.clock.now)
    assert exc.value.reason is Reason.BAD_TAG
    altered = bytes([body[0] ^ 1]) + body[1:]
    with pytest.raises(VerificationFailed) as exc:
        pair.responder.verify(h, TOPIC, altered, pair.clock.now)
    assert exc.value.reason is Reason.BAD_TAG
    # the failures did not consume the sequence number: the genuine message still passes
    assert pair.responder.verify(h, TOPIC, body, pair.clock.now).payload == PAYLOAD


def test_action_payload_boundary_is_bound(pair: SessionPair) -> None:
    h, body = pair.up(b"a/b", b"cd")
    with pytest.raises(VerificationFailed) as exc:
        pair.responder.verify(h, b"a/b" + body[:1], body[1:], pair.clock.now)
    assert exc.value.reason is Reason.BAD_TAG


def test_reflected_message_rejected(pair: SessionPair) -> None:
    """A message sent back to its own sender fails: each direction has its own keys."""
    h, body = pair.up(TOPIC, PAYLOAD)
    with pytest.raises(VerificationFailed) as exc:
        pair.initiator.verify(h, TOPIC, body, pair.clock.now)
    assert exc.value.reason is Reason.BAD_TAG


def header_reason(offset: int, sealed: bool) -> Reason:
    """Reason for flipping bit 0 of header byte ``offset``."""
    if offset == 0:
        return Reason.MALFORMED  # the sealed flag no longer matches the session
    if offset < 9:
        return Reason.UNKNOWN_SESSION
    if offset < 11:
        # epoch 0 -> 256 is outside the window; epoch 0 -> 1 is inside, so the tag fails
        return Reason.EPOCH_OUT_OF_WINDOW if offset == 9 else Reason.BAD_TAG
    return Reason.BAD_TAG  # sequence number or tag: the tag no longer matches


@pytest.mark.parametrize("offset", range(HEADER_SIZE))
def test_every_header_byte_is_protected(pair: SessionPair, offset: int) -> None:
    h, body = pair.up(TOPIC, PAYLOAD)
    bad = bytearray(h)
    bad[offset] ^= 0x01
    with pytest.raises(ProtocolError) as exc:
        pair.responder.verify(bytes(bad), TOPIC, body, pair.clock.now)
    assert exc.value.reason is header_reason(offset, pair.responder.params.sealed)
    assert pair.responder._window.top == -1  # nothing committed
    assert pair.responder.verify(h, TOPIC, body, pair.clock.now).payload == PAYLOAD


@pytest.mark.parametrize("length", [0, 1, 15, 30, 32, 62])
def test_truncated_or_extended_header(pair: SessionPair, length: int) -> None:
    h, body = pair.up(TOPIC, PAYLOAD)
    bad = (h * 3)[:length]
    with pytest.raises(MalformedMessage) as exc:
        pair.responder.verify(bad, TOPIC, body, pair.clock.now)
    assert exc.value.reason is Reason.MALFORMED
    assert pair.responder.verify(h, TOPIC, body, pair.clock.now).payload == PAYLOAD


def test_unknown_version_rejected(pair: SessionPair) -> None:
    h, body = pair.up(TOPIC, PAYLOAD)
    bad = bytes([0x20 | (h[0] & 0x0F)]) + h[1:]
    with pytest.raises(MalformedMessage) as exc:
        pair.responder.verify(bad, TOPIC, body, pair.clock.now)
    assert exc.value.reason is Reason.BAD_VERSION


def test_oversized_action() -> None:
    """An action that does not fit the u16 length prefix is a protocol error on receive
    (not an OverflowError) and a local misuse on send; neither changes the session."""
    for sealed in (False, True):
        p = SessionPair.direct(SessionParams(sealed=sealed))
        huge = b"a" * 65536
        with pytest.raises(StateError) as exc:
            p.up(huge, PAYLOAD)
        assert exc.value.reason is Reason.BAD_PARAMETERS
        assert p.initiator._next_seq == 0  # no sequence number spent
        p.up(b"a" * 65535, b"")  # the largest action that fits
        h, body = p.up(TOPIC, PAYLOAD)
        with pytest.raises(MalformedMessage) as exc2:
            p.responder.verify(h, huge, body, p.clock.now)
        assert exc2.value.reason is Reason.MALFORMED
        assert p.responder._window.top == -1
        assert p.responder.verify(h, TOPIC, body, p.clock.now).seq == 1


# -- epochs, lifetime ---------------------------------------------------------------


def test_epoch_skew_inside_window_accepted() -> None:
    p = SessionPair.direct(SessionParams(epoch_ms=10_000, skew_epochs=2))
    p.clock.advance(25)  # receiver at epoch 2
    h, body = p.up(TOPIC, b"a")
    # the same message arriving when the receiver is two epochs later still verifies
    p.responder.verify(h, TOPIC, body, p.clock.now + 20)
    # and a sender whose clock runs two epochs ahead is accepted too
    ahead = p.initiator.protect(TOPIC, b"b", p.clock.now + 20)
    p.responder.verify(*ahead[:1], TOPIC, ahead[1], p.clock.now + 20)


def test_epoch_outside_window_rejected() -> None:
    p = SessionPair.direct(SessionParams(epoch_ms=10_000, skew_epochs=2))
    h, body = p.up(TOPIC, b"a")  # epoch 0
    with pytest.raises(StaleMessage) as exc:
        p.responder.verify(h, TOPIC, body, p.clock.now + 30)  # receiver at epoch 3
    assert exc.value.reason is Reason.EPOCH_OUT_OF_WINDOW
    q = SessionPair.direct(SessionParams(epoch_ms=10_000, skew_epochs=2))
    future = q.initiator.protect(TOPIC, b"b", q.clock.now + 30)
    with pytest.raises(StaleMessage) as exc:
        q.responder.verify(future[0], TOPIC, future[1], q.clock.now)
    assert exc.value.reason is Reason.EPOCH_OUT_OF_WINDOW
    assert q.responder._window.top == -1


def test_old_keys_are_erased() -> None:
    p = SessionPair.direct(SessionParams(epoch_ms=1000, skew_epochs=1))
    h, body = p.up(TOPIC, b"a")
    p.responder.poll(p.clock.now + 10)  # epochs 0..8 fall out of the window
    assert min(p.responder._recv.keys, default=9) >= 9
    assert p.responder._recv.next_epoch >= 9
    with pytest.raises(StaleMessage) as exc:
        p.responder.verify(h, TOPIC, body, p.clock.now + 10)
    assert exc.value.reason is Reason.EPOCH_OUT_OF_WINDOW


def test_lifetime_exceeded() -> None:
    p = SessionPair.direct(SessionParams(lifetime_s=60))
    p.clock.advance(59)
    h, body = p.up(TOPIC, b"a")
    p.responder.verify(h, TOPIC, body, p.clock.now)
    p.clock.advance(1)
    with pytest.raises(SessionExpiredError) as exc:
        p.up(TOPIC, b"late")
    assert exc.value.reason is Reason.SESSION_EXPIRED
    with pytest.raises(SessionExpiredError) as exc:
        p.responder.verify(h, TOPIC, body, p.clock.now)
    assert exc.value.reason is Reason.SESSION_EXPIRED
    assert p.responder.state is SessionState.CLOSED and not p.responder._recv.keys
    assert p.responder._send.chain_key is None and p.responder._recv.chain_key is None


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
    with pytest.raises(MalformedMessage, match="sealed flag") as exc:
        sealed.responder.verify(h, TOPIC, body, sealed.clock.now)
    assert exc.value.reason is Reason.MALFORMED
    h, body = sealed.up(TOPIC, PAYLOAD)
    with pytest.raises(MalformedMessage, match="sealed flag"):
        tagged.responder.verify(h, TOPIC, body, tagged.clock.now)


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


# -- timers ---------------------------------------------------------------------------


def test_next_deadline_at() -> None:
    p = SessionPair.direct(SessionParams(epoch_ms=10_000, lifetime_s=35))
    s, t0 = p.initiator, p.clock.now
    assert s.next_deadline_at(t0) == t0 + 10
    assert s.next_deadline_at(t0 + 9.5) == t0 + 10
    assert s.next_deadline_at(t0 + 10) == t0 + 20
    assert s.next_deadline_at(t0 + 31) == t0 + 35  # the end of the lifetime comes first
    s.close()
    assert s.next_deadline_at(t0) == float("inf")


@pytest.mark.parametrize("epoch_ms", [100, 300, 700, 1000, 1100, 10_000])
@pytest.mark.parametrize("start", [0.0, 0.1, 1000.0, 12345.678, 1e6 + 0.3])
def test_next_deadline_always_moves_to_a_later_epoch(epoch_ms: int, start: float) -> None:
    """An adapter that re-arms its timer to next_deadline_at() and polls then must
    land in the next epoch every time; a float rounding that returned a boundary still
    inside the current epoch would make it spin on the same deadline."""
    p = SessionPair.direct(SessionParams(epoch_ms=epoch_ms, lifetime_s=3600), FakeClock(start))
    s = p.initiator
    t, epoch = start, 0
    for _ in range(500):
        t2 = s.next_deadline_at(t)
        assert t2 > t
        if t2 >= s.expires_at:
            break
        assert s.epoch_at(t2) == epoch + 1, (t, t2)
        t, epoch = t2, epoch + 1


# -- forward secrecy --------------------------------------------------------------------


@dataclass
class Captured:
    """Everything a memory capture of one Session object yields."""

    raw: set[bytes] = field(default_factory=set)  # every bytes value (candidate keys)
    macs: list[Any] = field(default_factory=list)  # keyed BLAKE2s states
    aeads: list[ChaCha20Poly1305] = field(default_factory=list)


_LEAVES = (int, float, str, bool, type(None), enum.Enum, types.FunctionType, type)


def capture(session: object) -> Captured:
    """Walk the session's whole object graph (attributes, slots, containers) and keep
    every bytes value, MAC state and AEAD object; anything else unknown fails the test,
    so a key hidden in a new kind of object cannot slip past."""
    out = Captured()
    seen: set[int] = set()
    stack: list[Any] = [session]
    while stack:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, bytes | bytearray | memoryview):
            out.raw.add(bytes(o))
        elif isinstance(o, _LEAVES):
            continue
        elif isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, list | tuple | set | frozenset):
            stack.extend(o)
        elif isinstance(o, hashlib.blake2s):
            out.macs.append(o)
        elif isinstance(o, ChaCha20Poly1305):
            out.aeads.append(o)
        else:
            attrs = dict(getattr(o, "__dict__", {}))
            for cls in type(o).__mro__:
                for slot in cls.__dict__.get("__slots__", ()):
                    if hasattr(o, slot):
                        attrs[slot] = getattr(o, slot)
            assert attrs, f"unknown object in session state: {type(o)!r}"
            stack.extend(attrs.values())
    return out


def ratchet(ck: bytes) -> bytes:
    return hashlib.blake2s(b"SA1 chain key", key=ck).digest()


def message_key(ck: bytes) -> bytes:
    return hashlib.blake2s(b"SA1 message key", key=ck).digest()


def seal_key(ck: bytes) -> bytes:
    return hashlib.blake2s(b"SA1 seal key", key=ck).digest()


@dataclass
class Sent:
    """One genuine message seen on the wire (what an attacker would have recorded)."""

    direction: str  # "i2r" or "r2i"
    epoch: int
    header: bytes
    action: bytes
    body: bytes
    payload: bytes

    @property
    def mac_input(self) -> bytes:
        return self.header[:15] + len(self.action).to_bytes(2, "big") + self.action + self.body

    @property
    def aad(self) -> bytes:
        return self.header[:15] + len(self.action).to_bytes(2, "big") + self.action


def breakable(c: Captured, m: Sent, sealed: bool, steps: int) -> bool:
    """Can the captured material forge (reproduce the tag of) or open ``m``? Every
    bytes value is tried as a message/seal key and as a chain key ratcheted forward."""
    tag = m.header[15:]
    if sealed:
        nonce = m.header[9:15] + bytes(6)
        boxes = list(c.aeads)
        for v in c.raw:
            if len(v) != 32:
                continue
            ck = v
            boxes.append(ChaCha20Poly1305(v))
            for _ in range(steps):
                boxes.append(ChaCha20Poly1305(seal_key(ck)))
                ck = ratchet(ck)
        for box in boxes:
            try:
                box.decrypt(nonce, m.body + tag, m.aad)
            except InvalidTag:
                continue
            return True
        return False
    for mac in c.macs:
        h = mac.copy()
        h.update(m.mac_input)
        if h.digest() == tag:
            return True
    for v in c.raw:
        if not 16 <= len(v) <= 64:
            continue
        candidates = [v]
        ck = v
        for _ in range(steps):
            candidates.append(message_key(ck))
            ck = ratchet(ck)
        for key in candidates:
            if hashlib.blake2s(m.mac_input, key=key, digest_size=16).digest() == tag:
                return True
    return False


def old_keys(ck0: bytes, upto: int) -> set[bytes]:
    """Chain, message and seal keys of epochs 0..upto-1 of one direction."""
    out, ck = set(), ck0
    for _ in range(upto):
        out |= {ck, message_key(ck), seal_key(ck)}
        ck = ratchet(ck)
    return out


W = 2


def fs_params(sealed: bool) -> SessionParams:
    return SessionParams(epoch_ms=1000, skew_epochs=W, lifetime_s=3600, sealed=sealed)


def traffic(p: SessionPair, epochs: range) -> list[Sent]:
    """Both directions send one message in the middle of each epoch."""
    sent = []
    for e in epochs:
        now = p.clock.now + e + 0.5
        for direction, tx, rx in (("i2r", p.initiator, p.responder),
                                  ("r2i", p.responder, p.initiator)):
            payload = b"%s epoch %d" % (direction.encode(), e)
            h, body = tx.protect(TOPIC, payload, now)
            assert rx.verify(h, TOPIC, body, now).payload == payload
            sent.append(Sent(direction, e, h, TOPIC, body, payload))
    return sent


def assert_forward_secret(
    p: SessionPair, side: str, sent: list[Sent], current: int, sealed: bool
) -> None:
    """At epoch ``current``, the ``side`` session keeps nothing that forges or opens a
    message of an epoch before current - w, in either direction; it keeps nothing for
    what it *sent* before the current epoch at all."""
    session = p.initiator if side == "initiator" else p.responder
    c = capture(session)
    own = "i2r" if side == "initiator" else "r2i"
    steps = current + W + 3
    # no old key is in memory, byte for byte
    gone_recv = old_keys(p.DIRECT_R2I if own == "i2r" else p.DIRECT_I2R, current - W)
    gone_send = old_keys(p.DIRECT_I2R if own == "i2r" else p.DIRECT_R2I, current)
    assert not (c.raw & gone_recv), f"{side}: a receive key older than current-w remains"
    assert not (c.raw & gone_send), f"{side}: a send key older than the current epoch remains"
    # and nothing in memory forges or opens an old message
    for m in sent:
        limit = current if m.direction == own else current - W
        if m.epoch < limit:
            assert not breakable(c, m, sealed, steps), (side, m.direction, m.epoch)


@pytest.mark.parametrize("sealed", [False, True], ids=["tagged", "sealed"])
@pytest.mark.parametrize("k", [3, 7])
def test_forward_secrecy_with_protect_only(sealed: bool, k: int) -> None:
    """Without poll(): a side that only sends at time t (epoch k) has dropped every old
    key of both directions."""
    p = SessionPair.direct(fs_params(sealed))
    sent = traffic(p, range(k))
    t = p.clock.now + k + 0.5
    p.initiator.protect(TOPIC, b"now", t)
    p.responder.protect(TOPIC, b"now", t)
    for side in ("initiator", "responder"):
        assert_forward_secret(p, side, sent, k, sealed)


@pytest.mark.parametrize("sealed", [False, True], ids=["tagged", "sealed"])
@pytest.mark.parametrize("side", ["initiator", "responder"])
def test_forward_secrecy_with_verify_only(sealed: bool, side: str) -> None:
    """Without poll(): a side that only receives (an idle gap, then one message) has
    dropped its old send keys too, not only its receive keys."""
    k = 9
    p = SessionPair.direct(fs_params(sealed))
    sent = traffic(p, range(3))  # then silence until epoch k
    t = p.clock.now + k + 0.5
    rx = p.initiator if side == "initiator" else p.responder
    tx = p.responder if side == "initiator" else p.initiator
    h, body = tx.protect(TOPIC, b"now", t)
    rx.verify(h, TOPIC, body, t)
    assert_forward_secret(p, side, sent, k, sealed)


@pytest.mark.parametrize("sealed", [False, True], ids=["tagged", "sealed"])
def test_forward_secrecy_with_poll_only(sealed: bool) -> None:
    """Only poll(), at the times next_deadline_at() asks for: after k epochs both sides
    hold nothing that forges or opens older traffic."""
    k = 8
    p = SessionPair.direct(fs_params(sealed))
    sent = traffic(p, range(2))
    for session in (p.initiator, p.responder):
        t = p.clock.now
        while session.epoch_at(t) < k:
            t = session.next_deadline_at(t)
            assert session.poll(t) is None
        assert session.epoch_at(t) == k
    for side in ("initiator", "responder"):
        assert_forward_secret(p, side, sent, k, sealed)


@pytest.mark.parametrize("sealed", [False, True], ids=["tagged", "sealed"])
def test_forward_secrecy_harness_finds_keys_that_are_still_there(sealed: bool) -> None:
    """The attack in the tests above is real: with the window still covering the
    messages, the same capture does forge or open them."""
    p = SessionPair.direct(fs_params(sealed))
    sent = traffic(p, range(3))
    c = capture(p.responder)
    received = [m for m in sent if m.direction == "i2r"]
    assert all(breakable(c, m, sealed, 6) for m in received)
    # and later epochs follow from the chain key it keeps (that is what a ratchet gives)
    later = traffic(p, range(3, 5))
    assert all(breakable(c, m, sealed, 6) for m in later if m.direction == "i2r")
