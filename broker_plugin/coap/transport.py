"""Bounds on what aiocoap's own message layer keeps for the gateway, and clean refusals
of datagrams it cannot decode.

aiocoap 0.4.17's message layer remembers every request it receives, keyed by (remote,
message id), for EXCHANGE_LIFETIME (247 s) with one timer each, and the response to it,
so that a retransmitted confirmable request is answered byte for byte instead of run
twice (RFC 7252 section 4.5). That is per-message state for anyone who can send a
datagram: a 10 s flood of refused requests leaves tens of thousands of entries for four
minutes. :func:`harden` replaces that store on a gateway's context with two
:class:`~broker_plugin.coap.limits.BoundedTable` (owner: the source address):

* **proven** exchanges (the response carries the gateway's proof): kept for 247 s as
  the RFC asks, at most :attr:`DedupLimits.proven` per source and in all;
* everything else (requests in progress, 2.31 Continue, msg2 blocks): 10 s, a small
  budget per source and in all. An unproven refusal (4.xx/5.xx without a proof) is not
  kept at all: a retransmission of a refused request is simply judged again (the
  answer is the same, and it costs a parse and a table lookup).

Evicting an entry early costs only this: a retransmission of that request is processed
again (a proven request is then refused ``replayed``, never served twice).

It also catches what aiocoap lets escape from its UDP transport: a string option (Uri-
Path, Uri-Query, Uri-Host, ...) that is not UTF-8 raises UnicodeDecodeError out of
``Message.decode`` and a traceback into the event loop's log. Such a confirmable request
gets 4.02 Bad Option (RFC 7252 5.4.1: an invalid critical option is treated like an
unrecognized one) and one log line.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiocoap
from aiocoap.message import Direction
from aiocoap.numbers import codes
from aiocoap.numbers.types import Type

from .limits import BoundedTable, Limits, source_of

log = logging.getLogger("tessera.coap")

#: RFC 7252 EXCHANGE_LIFETIME
EXCHANGE_LIFETIME = 247.0
#: what an entry costs besides the stored response's bytes (its key with the remote
#: address object, the table's records), measured with tracemalloc
ENTRY_COST = 320


def _default_unproven() -> Limits:
    return Limits(per_owner=32, per_owner_bytes=48 * 1024, total=2048,
                  total_bytes=1024 * 1024, idle=10.0)


def _default_proven() -> Limits:
    return Limits(per_owner=4096, per_owner_bytes=4 * 1024 * 1024, total=65536,
                  total_bytes=32 * 1024 * 1024, idle=EXCHANGE_LIFETIME)


@dataclass(frozen=True)
class DedupLimits:
    """Bounds of the message-deduplication store (owner: the source address)."""

    unproven: Limits = field(default_factory=_default_unproven)
    proven: Limits = field(default_factory=_default_proven)


class TokenBucket:
    """``rate`` per second, up to ``burst`` at once; time comes from the caller."""

    __slots__ = ("burst", "level", "rate", "stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.level = burst
        self.stamp = now

    def take(self, now: float) -> bool:
        level = min(self.burst, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        if level < 1.0:
            self.level = level
            return False
        self.level = level - 1.0
        return True


class _Stored:
    """A response kept for duplicates: the datagram as sent (the Message object would
    cost ten times as much), turned back into a Message only when a duplicate comes."""

    __slots__ = ("datagram", "remote")

    def __init__(self, message: Any) -> None:
        self.datagram = bytes(message.encode())
        self.remote = message.remote

    def message(self) -> Any:
        message = aiocoap.Message.decode(self.datagram, self.remote)
        message.direction = Direction.OUTGOING
        return message


class BoundedDedup:
    """Stands in for aiocoap MessageManager's ``_recent_messages`` bookkeeping."""

    def __init__(
        self,
        manager: Any,
        limits: DedupLimits,
        is_proven: Callable[[Any], bool],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.manager = manager
        self.limits = limits
        self.is_proven = is_proven
        self.clock = clock
        self.unproven: BoundedTable[tuple[Any, int], Any] = BoundedTable(limits.unproven)
        self.proven: BoundedTable[tuple[Any, int], Any] = BoundedTable(limits.proven)

    def __len__(self) -> int:
        return len(self.unproven) + len(self.proven)

    @property
    def bytes(self) -> int:
        return self.unproven.bytes + self.proven.bytes

    def deduplicate(self, message: Any) -> bool:
        """aiocoap's ``_deduplicate_message``: True if ``message`` is a duplicate (and
        the stored response, if any, was sent again)."""
        key = (message.remote, message.mid)
        now = self.clock()
        for table in (self.proven, self.unproven):
            if key in table:
                stored = table.get(key, now)
                if key not in table:  # it had expired
                    break
                if message.mtype is aiocoap.CON and stored is not None:
                    self.manager._send_via_transport(stored.message())
                return True
        self.unproven.put(key, source_of(message.remote), None, ENTRY_COST, now)
        return False

    def store(self, message: Any) -> None:
        """aiocoap's ``_store_response_for_duplicates``."""
        key = (message.remote, message.mid)
        unproven = self.unproven
        owner = unproven.owner_of(key)
        if owner is None:
            return
        proven = self.is_proven(message)
        if not proven and message.code is not None and message.code.class_ in (4, 5):
            unproven.pop(key)
            return
        stored = _Stored(message)
        cost = ENTRY_COST + len(stored.datagram)
        now = self.clock()
        if proven:
            unproven.pop(key)
            self.proven.put(key, owner, stored, cost, now)
        else:
            unproven.put(key, owner, stored, cost, now)

    def expire(self, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        self.unproven.expire(now)
        self.proven.expire(now)


def _udp_interfaces(context: Any) -> list[tuple[Any, Any]]:
    """(MessageManager, UDP message interface) pairs of an aiocoap context."""
    out = []
    for interface in getattr(context, "request_interfaces", ()):
        manager = getattr(interface, "token_interface", None)
        transport = getattr(manager, "message_interface", None)
        if manager is not None and hasattr(manager, "_deduplicate_message") and transport:
            out.append((manager, transport))
    return out


def _bad_option_reply(data: bytes) -> bytes | None:
    """The 4.02 ACK for an undecodable confirmable request datagram, or None when the
    datagram is not one (then it is dropped, as RFC 7252 allows)."""
    if len(data) < 4:
        return None
    first = data[0]
    tkl = first & 0x0F
    if first >> 6 != 1 or tkl > 8 or len(data) < 4 + tkl:
        return None
    mtype = (first >> 4) & 0x03
    code = data[1]
    if mtype != Type.CON or not 1 <= code <= 31:
        return None
    return bytes((0x60 | tkl, int(codes.BAD_OPTION))) + data[2:4] + data[4 : 4 + tkl]


def _hostinfo(address: Any) -> str:
    if not isinstance(address, tuple) or len(address) < 2:
        return repr(address)
    host = str(address[0])
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"


def harden_interface(
    manager: Any,
    transport: Any,
    *,
    limits: DedupLimits | None = None,
    is_proven: Callable[[Any], bool],
    on_malformed: Callable[[str, str], None] | None = None,
    admit: Callable[[Any], bool] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> BoundedDedup | None:
    """Bound one aiocoap MessageManager's deduplication store and guard its UDP
    transport (module docstring); None if it was done before. ``admit(address)``, if
    given, is asked about every datagram before aiocoap decodes it; False drops it."""
    if getattr(manager, "_tessera_dedup", None) is not None:
        return None
    store = BoundedDedup(manager, limits or DedupLimits(), is_proven, clock)
    manager._deduplicate_message = store.deduplicate
    manager._store_response_for_duplicates = store.store
    manager._recent_messages = {}
    manager._tessera_dedup = store
    original = getattr(transport, "datagram_msg_received", None)
    if original is not None:

        def guarded(data: bytes, ancdata: Any, flags: int, address: Any) -> None:
            if admit is not None and not admit(address):
                return  # over the budget of sources without a session: not even decoded
            try:
                original(data, ancdata, flags, address)
            except UnicodeDecodeError as exc:
                where = _hostinfo(address)
                if on_malformed is not None:
                    on_malformed(where, f"option value is not UTF-8 ({exc.reason})")
                reply = _bad_option_reply(data)
                if reply is not None:
                    with contextlib.suppress(OSError):
                        transport.transport.sendmsg(reply, [], 0, address)

        transport.datagram_msg_received = guarded
    return store


def harden(context: Any, **options: Any) -> list[BoundedDedup]:
    """:func:`harden_interface` for every UDP interface of an aiocoap ``context``."""
    stores = []
    for manager, transport in _udp_interfaces(context):
        store = harden_interface(manager, transport, **options)
        if store is not None:
            stores.append(store)
    return stores


def interface_of(remote: Any) -> tuple[Any, Any] | None:
    """(MessageManager, UDP transport) a request's remote came through, or None (not
    UDP, or not aiocoap's UDP6 transport)."""
    transport = getattr(remote, "interface", None)
    manager = getattr(transport, "_ctx", None)
    if manager is None or not hasattr(manager, "_deduplicate_message"):
        return None
    return manager, transport


__all__ = [
    "EXCHANGE_LIFETIME",
    "BoundedDedup",
    "DedupLimits",
    "TokenBucket",
    "harden",
    "harden_interface",
    "interface_of",
]
