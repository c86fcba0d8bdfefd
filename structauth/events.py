"""Events the core hands to adapters. Frozen dataclasses (one NamedTuple on the hot
path), named in the past tense.

Each is defined beside the code that produces it (handshake events in
:mod:`structauth.handshake`, session events in :mod:`structauth.session`), so the
import graph has no cycle; this module gathers them for adapters.
"""

from __future__ import annotations

from .handshake import HandshakeAnswered, HandshakeCompleted, HandshakeConfirmed
from .session import MessageVerified, SessionExpired

__all__ = [
    "HandshakeAnswered",
    "HandshakeCompleted",
    "HandshakeConfirmed",
    "MessageVerified",
    "SessionExpired",
]
