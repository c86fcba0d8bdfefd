"""Events the core hands to adapters. Frozen dataclasses, named in the past tense."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from .errors import Reason

if TYPE_CHECKING:
    from .credentials import Credential, Identity
    from .session import Session


@dataclass(frozen=True, slots=True)
class HandshakeAnswered:
    """Responder side: msg1 was valid; send ``reply`` (msg2) and keep ``session``.

    The session stays unconfirmed until the initiator's first valid message.
    """

    reply: bytes
    session: Session
    peer: Identity
    credential: Credential
    context: bytes
    quote: bytes


@dataclass(frozen=True, slots=True)
class HandshakeCompleted:
    """Initiator side: msg2 was valid and confirmed; ``session`` is ready."""

    session: Session
    peer: Identity
    credential: Credential


class MessageVerified(NamedTuple):
    """A message's proof checked out; ``payload`` is the plaintext (opened if sealed).

    The one event on the per-message hot path, so it is an immutable NamedTuple rather
    than a frozen dataclass: same guarantees, a third of the construction cost
    (0.17 us against 0.36 us), which is a tenth of a whole verify.
    """

    payload: bytes
    epoch: int
    seq: int
    #: True for the first verified message of an unconfirmed responder session
    session_confirmed: bool


@dataclass(frozen=True, slots=True)
class SessionExpired:
    session_id: bytes
    reason: Reason
