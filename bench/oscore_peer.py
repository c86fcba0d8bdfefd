"""aiocoap's OSCORE (RFC 8613) as a per-message baseline.

aiocoap ships only file-backed security contexts (``FilesystemSecurityContext``, which
fsyncs sequence numbers) and group/EDHOC contexts. For a CPU measurement we want the
plain RFC 8613 context with no I/O, so :class:`MemoryContext` composes the library's
own mixins (``CanProtect``, ``CanUnprotect``, ``SecurityContextUtils``) with a
master secret held in memory, a sender sequence number that is never persisted and
the library's ``ReplayWindow`` initialised empty. All protection and unprotection code
that runs is aiocoap's; only where the state lives differs.

Algorithms are aiocoap's defaults: AES-CCM-16-64-128 (RFC 8613's mandatory AEAD) and
HKDF-SHA-256; replay window 32 (its default).

Replay windows: each receiver accepts a sequence number once, so the benchmark
pre-generates requests with increasing sequence numbers from one sender context and
unprotects them in order on one receiver context; the window slides forward as it
would in a real exchange and is never reset.
"""

from __future__ import annotations

from aiocoap import oscore
from aiocoap.message import Direction, Message
from aiocoap.numbers import CON, POST


# aiocoap has no type information: its classes are Any to mypy
class MemoryContext(oscore.CanProtect, oscore.CanUnprotect,  # type: ignore[misc]
                    oscore.SecurityContextUtils):  # type: ignore[misc]
    """An RFC 8613 security context whose state lives in memory only (benchmark use)."""

    def __init__(
        self,
        *,
        sender_id: bytes,
        recipient_id: bytes,
        master_secret: bytes,
        master_salt: bytes = b"",
        id_context: bytes | None = None,
        algorithm: str = oscore.DEFAULT_ALGORITHM,
        window: int = oscore.DEFAULT_WINDOWSIZE,
    ) -> None:
        self.alg_aead = oscore.algorithms[algorithm]
        self.hashfun = oscore.hashfunctions[oscore.DEFAULT_HASHFUNCTION]
        self.sender_id = sender_id
        self.recipient_id = recipient_id
        self.id_context = id_context
        self.derive_keys(master_salt, master_secret)
        self.sender_sequence_number = 0
        self.recipient_replay_window = oscore.ReplayWindow(window, _nothing)
        self.recipient_replay_window.initialize_empty()
        # no Echo recovery: the window is initialised, as after a fresh key exchange
        self.echo_recovery = None

    def post_seqnoincrease(self) -> None:
        """Nothing to persist: this context lives only as long as the process."""


def _nothing() -> None:
    return None


def context_pair(master_secret: bytes = bytes(range(16))) -> tuple[MemoryContext, MemoryContext]:
    """(client, server) contexts sharing one master secret, ids 0x01 and 0x02."""
    salt = bytes.fromhex("9e7ca92223786340")
    client = MemoryContext(
        sender_id=b"\x01", recipient_id=b"\x02", master_secret=master_secret, master_salt=salt
    )
    server = MemoryContext(
        sender_id=b"\x02", recipient_id=b"\x01", master_secret=master_secret, master_salt=salt
    )
    return client, server


def plain_request(path: str, payload: bytes) -> Message:
    """An outgoing confirmable POST with ``path`` (split into Uri-Path options)."""
    msg = Message(code=POST, payload=payload, uri_path=tuple(path.strip("/").split("/")))
    msg.mtype = CON
    msg.mid = 0x1234
    msg.token = b"\x7a\x10"
    msg.direction = Direction.OUTGOING
    return msg


def protect_wire(ctx: MemoryContext, plain: Message) -> bytes:
    """Protect ``plain`` and encode the outer message as it goes on the wire."""
    outer, _request_id = ctx.protect(plain)
    outer.mid = plain.mid
    outer.token = plain.token
    outer.mtype = plain.mtype
    return bytes(outer.encode())


def received(wire: bytes) -> Message:
    """What a server's transport hands the OSCORE layer: a decoded incoming message."""
    return Message.decode(wire)
