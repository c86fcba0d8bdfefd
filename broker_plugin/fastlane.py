"""The enforcer's handle on the broker's C fast lane (``broker_plugin/shim/fastlane.c``).

Inside Mosquitto the shim provides the built-in module ``tessera_fast``; elsewhere
(unit tests of the enforcer, the bench's in-process host) there is none and the
enforcer does everything in Python. The C side verifies proofs for sessions handed to
it and routes messages on topics the enforcer judged plain; this class keeps the rules
of that hand-over in one place:

* a session's receive direction is in exactly one place: :meth:`adopt` moves it to C,
  :meth:`take_back` moves it back (a session replaced by a re-authentication keeps
  verifying in-flight messages in Python), :meth:`release` drops it (disconnect,
  revocation: later messages under it fail);
* cached decisions (topics routed without asking, READ grants) are dropped whenever
  what they depend on changes: :meth:`forget_topics`.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any

from structauth.errors import TesseraError
from structauth.session import ReceiveState, Session

__all__ = ["FastLane"]


class FastLane:
    def __init__(self, module: ModuleType | Any) -> None:
        self._m = module

    @classmethod
    def load(cls) -> FastLane | None:
        """The broker's fast lane when running inside the plugin, else None."""
        try:
            import tessera_fast  # type: ignore[import-not-found]
        except ImportError:
            return None
        return cls(tessera_fast)

    def adopt(self, client_id: str, session: Session) -> bool:
        """Hand the session's receive direction to C. False (and nothing moved) when
        the session cannot be (sealed, not established)."""
        try:
            h = session.export_receive()
        except TesseraError:
            return False
        st = h.state
        mask = st.mask.to_bytes((h.replay_window + 7) // 8, "little")
        try:
            self._m.open(client_id, h.session_id, h.flags, h.start, h.epoch_seconds,
                         h.skew_epochs, h.expires_at, h.last_epoch, h.replay_window, st.top,
                         mask, st.chain_key, st.next_epoch, st.floor, list(st.keys))
        except (ValueError, TypeError, MemoryError):
            session.import_receive(st)
            return False
        return True

    def take_back(self, client_id: str, session: Session) -> None:
        """Return the receive direction C holds for ``client_id`` to ``session``."""
        state = self._m.close(client_id)
        if state is not None:
            top, mask, chain_key, next_epoch, floor, keys = state
            session.import_receive(ReceiveState(
                top, int.from_bytes(mask, "little"), chain_key, next_epoch, floor,
                tuple((e, k) for e, k in keys)))

    def release(self, client_id: str) -> None:
        """Forget ``client_id``'s record; its session's keys are gone with it."""
        self._m.close(client_id)

    def forget_topics(self, client_id: str | None = None) -> None:
        self._m.forget_topics(client_id)

    def tick_soon(self) -> None:
        """Actions are waiting: have the broker call on_tick on its next loop pass
        (it otherwise does so at most every 5 ms under load)."""
        self._m.tick_soon()

    def seal_interval(self, key: tuple[bytes, bytes, float, float] | None) -> None:
        """Seal routed messages in C under this fan-out interval
        (:meth:`structauth.fanout.FanoutSigner.interval_key`); None stops sealing."""
        if key is None:
            self._m.seal_interval(None)
        else:
            self._m.seal_interval(*key)

    def take_counts(self) -> list[tuple[str, int]]:
        """Messages each client routed through the fast lane since the last call."""
        return list(self._m.take_counts())

    def set_timing(self, buckets: Sequence[float] | None) -> None:
        self._m.set_timing(None if buckets is None else tuple(buckets))

    def take_timing(self) -> tuple[list[int], float, int] | None:
        out = self._m.take_timing()
        return None if out is None else (list(out[0]), float(out[1]), int(out[2]))
