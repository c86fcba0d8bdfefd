"""The optional C accelerator behind :meth:`Session.verify`.

The broker's fast lane (broker_plugin/shim/fastlane.c: the same receive rules as
:meth:`structauth.session.Session.verify`, in C) is also built, where a compiler is
available, as the extension ``structauth._accel`` (setup.py; optional, so an install
without a compiler simply has none). :func:`accelerate` hands an established, tagged
session's receive direction to it; from then on ``session.verify`` checks each message
in C and returns the same :class:`~structauth.events.MessageVerified` or raises the same
error as the Python path, which stays in place for everything C does not judge (another
session, a malformed header, an action too long for the wire) and for sealed sessions.
tests/test_accel.py checks the two paths against each other message by message.

The accelerator keeps a table of the sessions it holds: each entry goes when its session
is closed or garbage-collected, so the table is bounded by the live sessions.
"""

from __future__ import annotations

import weakref
from types import ModuleType

from .errors import (
    Reason,
    ReplayDetected,
    SessionExpiredError,
    StaleMessage,
    TesseraError,
    VerificationFailed,
)
from .session import MessageVerified, Session

try:
    from . import _accel as _c  # type: ignore[attr-defined]
except ImportError:  # no compiler at install time: pure Python it is
    _c = None

__all__ = ["accelerate", "available"]

_ERRORS: dict[str, type[TesseraError]] = {
    "session_expired": SessionExpiredError,
    "epoch_out_of_window": StaleMessage,
    "replayed": ReplayDetected,
    "bad_tag": VerificationFailed,
}
_new_verified = tuple.__new__


def _key(session: Session) -> str:
    """The accelerator's name for a session's entry (unique among live sessions)."""
    return f"sa1:{id(session):x}:{session.session_id.hex()}"


def available() -> bool:
    """True when the C accelerator was built with this installation."""
    return _c is not None


def accelerate(session: Session, module: ModuleType | None = None) -> bool:
    """Verify ``session``'s incoming messages in C from now on. False (and nothing
    changed) when there is no accelerator or the session cannot be handed over (sealed,
    closed, already accelerated)."""
    c = module if module is not None else _c
    if c is None or session.accelerated:
        return False
    try:
        h = session.export_receive()
    except TesseraError:
        return False
    st = h.state
    key = _key(session)
    mask = st.mask.to_bytes((h.replay_window + 7) // 8, "little")
    try:
        c.open(key, h.session_id, h.flags, h.start, h.epoch_seconds, h.skew_epochs,
               h.expires_at, h.last_epoch, h.replay_window, st.top, mask, st.chain_key,
               st.next_epoch, st.floor, list(st.keys))
    except (ValueError, TypeError, MemoryError):
        session.import_receive(st)
        return False
    python_verify = session.verify  # (bound before the swap) the refusals C leaves
    verify_parts, erase = c.verify_parts, c.erase
    verified_rc, reject_rc = c.VERIFIED, c.REJECT

    def verify(header: bytes, action: bytes, body: bytes, now: float) -> MessageVerified:
        rc, first, second = verify_parts(key, header, action, body, now)
        if rc == verified_rc:
            return _new_verified(MessageVerified, (body, first, second))
        if rc == reject_rc:
            raise _ERRORS.get(first, VerificationFailed)(second, Reason[first.upper()])
        return python_verify(header, action, body, now)

    finalizer = weakref.finalize(session, c.close, key)
    session.attach_accelerator(verify, lambda now: erase(key, now), finalizer)
    return True
