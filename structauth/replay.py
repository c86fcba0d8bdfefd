"""Sliding replay window over per-direction sequence numbers.

Safety: a sequence number is accepted at most once while it is within ``size`` of the
highest accepted one, and never once it falls behind that. The window lives only in
memory, which is safe because a session's keys live only in memory too: after a
restart there is a new handshake and new keys, so old sequence numbers cannot verify.
Callers must :meth:`check` before the MAC (cheap rejection) and :meth:`commit` only
after the MAC verified, so forged messages cannot move the window.
"""

from __future__ import annotations

from .errors import Reason, ReplayDetected


class ReplayWindow:
    """Bound: one Python int of ``size`` bits (128 bytes at the default 1024) and the
    top sequence number, whatever the peer sends."""

    __slots__ = ("full", "mask", "size", "top")

    def __init__(self, size: int) -> None:
        self.size = size
        self.top = -1  # highest accepted sequence number; -1 before the first
        self.mask = 0  # bit i set: sequence number top - i was accepted
        self.full = (1 << size) - 1

    def check(self, seq: int) -> None:
        top = self.top
        if seq > top:
            return
        behind = top - seq
        if behind >= self.size:
            raise ReplayDetected(
                f"sequence {seq} is {behind} behind the newest, outside the replay window",
                Reason.REPLAYED,
            )
        if (self.mask >> behind) & 1:
            raise ReplayDetected(f"sequence {seq} already seen", Reason.REPLAYED)

    def commit(self, seq: int) -> None:
        top = self.top
        if seq > top:
            jump = seq - top
            # a jump of at least the window leaves nothing of the old mask: O(1) time
            # and memory for any jump, even to 2**32 - 1
            self.mask = ((self.mask << jump) | 1) & self.full if jump < self.size else 1
            self.top = seq
        else:
            self.mask |= 1 << (top - seq)
