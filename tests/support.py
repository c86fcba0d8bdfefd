"""Test helpers shared by the suite: a fake clock and a pair of sessions."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from structauth.params import SessionParams
from structauth.session import Role, Session


@dataclass
class FakeClock:
    """A monotonic clock the test moves by hand."""

    now: float = 1000.0

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


@dataclass
class SessionPair:
    """Both ends of one session, sharing a fake clock.

    ``direct()`` builds them from fixed chain keys (for session-only tests); the
    handshake tests build them from a real SA1 handshake.
    """

    initiator: Session
    responder: Session
    clock: FakeClock = field(default_factory=FakeClock)

    @classmethod
    def direct(
        cls, params: SessionParams | None = None, clock: FakeClock | None = None
    ) -> SessionPair:
        params = params or SessionParams()
        clock = clock or FakeClock()
        sid = bytes(range(8))
        i2r, r2i = b"\x01" * 32, b"\x02" * 32
        ini = Session(
            role=Role.INITIATOR,
            session_id=sid,
            send_chain_key=i2r,
            receive_chain_key=r2i,
            params=params,
            start=clock.now,
        )
        res = Session(
            role=Role.RESPONDER,
            session_id=sid,
            send_chain_key=r2i,
            receive_chain_key=i2r,
            params=params,
            start=clock.now,
        )
        return cls(ini, res, clock)

    def up(self, action: bytes, payload: bytes) -> tuple[bytes, bytes]:
        """Initiator protects a message; returns (header, body)."""
        return self.initiator.protect(action, payload, self.clock.now)

    def down(self, action: bytes, payload: bytes) -> tuple[bytes, bytes]:
        return self.responder.protect(action, payload, self.clock.now)

    def confirm(self) -> None:
        h, b = self.up(b"sa1/confirm", b"")
        self.responder.verify(h, b"sa1/confirm", b, self.clock.now)


def wait_for(predicate: Callable[[], object], timeout: float = 5.0, what: str = "") -> None:
    """Poll ``predicate`` until it is true; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.01)
