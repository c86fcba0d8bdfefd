"""Bounded tables for the CoAP gateway's state: every entry has an owner, a size and a
lifetime, and a table caps entries and bytes per owner and in total.

No aiocoap and no clock here: the caller passes ``now`` (the gateway's monotonic clock),
so the bounds are testable without waiting. What the gateway keeps in such tables (and
their limits, docs/COAP.md "Bounds"):

* before authentication, per **source** (:func:`source_of`: the IPv4 address, or the
  /64 of an IPv6 address): msg1 assemblies, pending handshakes with their msg2, and
  aiocoap's message-deduplication entries of unproven exchanges;
* after authentication, per **identity**: Block1 transfers (every block already
  proven) and proven responses kept for Block2.

Eviction is oldest first (least recently touched): first among the newcomer's owner
when the owner is at its cap (a source can only push out its own entries), otherwise
among all owners when the table is full. Expiry is lazy (checked on access and by
:meth:`BoundedTable.expire`), so an idle table costs no timers.
"""

from __future__ import annotations

import functools
import ipaddress
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@functools.lru_cache(maxsize=1024)
def source_of_host(host: str) -> str:
    """The budget key of a remote host: an IPv4 address as is (also when IPv4-mapped),
    an IPv6 address as its /64 (one subscriber usually holds a whole /64)."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def source_of(remote: Any) -> str:
    """The budget key of an aiocoap remote (an ``EndpointAddress``)."""
    sockaddr = getattr(remote, "sockaddr", None)
    if sockaddr:
        return source_of_host(str(sockaddr[0]))
    try:
        return source_of_host(str(remote.hostinfo).rsplit(":", 1)[0].strip("[]"))
    except Exception:
        return repr(remote)


@dataclass(frozen=True)
class Limits:
    """Caps of one table: entries and bytes per owner and in total, and how long an
    entry lives after it was last touched (``idle``) and after it was made (``max_age``,
    None: only ``idle``)."""

    per_owner: int
    per_owner_bytes: int
    total: int
    total_bytes: int
    idle: float
    max_age: float | None = None


class _Entry(Generic[V]):
    __slots__ = ("created", "deadline", "owner", "size", "value")

    def __init__(self, owner: str, value: V, size: int, created: float, deadline: float) -> None:
        self.owner = owner
        self.value = value
        self.size = size
        self.created = created
        self.deadline = deadline


class BoundedTable(Generic[K, V]):
    """A dict with per-owner and global caps on entries and bytes, and a lifetime.

    ``on_evict(key, value, why)`` is called for every entry that leaves other than by
    :meth:`pop` (``why``: ``expired``, ``owner_full``, ``table_full``), e.g. to discard
    a pending handshake's keys.
    """

    def __init__(
        self,
        limits: Limits,
        *,
        on_evict: Callable[[K, V, str], None] | None = None,
    ) -> None:
        self.limits = limits
        self._on_evict = on_evict
        #: key -> entry, least recently touched first
        self._entries: OrderedDict[K, _Entry[V]] = OrderedDict()
        #: owner -> its keys, least recently touched first
        self._owners: dict[str, OrderedDict[K, None]] = {}
        self._owner_bytes: dict[str, int] = {}
        self.bytes = 0
        #: how many entries left, by reason (``expired``, ``owner_full``, ``table_full``)
        self.evicted: dict[str, int] = {"expired": 0, "owner_full": 0, "table_full": 0}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def keys(self) -> Iterator[K]:
        return iter(list(self._entries))

    def owners(self) -> int:
        return len(self._owners)

    def owned_by(self, owner: str) -> int:
        keys = self._owners.get(owner)
        return len(keys) if keys else 0

    def owner_bytes(self, owner: str) -> int:
        return self._owner_bytes.get(owner, 0)

    def _deadline(self, entry: _Entry[V], now: float) -> float:
        deadline = now + self.limits.idle
        if self.limits.max_age is not None:
            deadline = min(deadline, entry.created + self.limits.max_age)
        return deadline

    # -- reading ----------------------------------------------------------------------
    def get(self, key: K, now: float, *, touch: bool = False) -> V | None:
        """The live value under ``key`` (None if absent or expired); ``touch`` renews its
        idle lifetime and makes it the newest."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if now >= entry.deadline:
            self._remove(key, "expired")
            return None
        if touch:
            entry.deadline = self._deadline(entry, now)
            self._entries.move_to_end(key)
            self._owners[entry.owner].move_to_end(key)
        return entry.value

    def owner_of(self, key: K) -> str | None:
        entry = self._entries.get(key)
        return None if entry is None else entry.owner

    # -- writing ----------------------------------------------------------------------
    def put(self, key: K, owner: str, value: V, size: int, now: float,
            *, deadline: float | None = None) -> bool:
        """Insert or replace ``key``; make room by evicting oldest entries (the owner's
        own first). False if ``size`` alone exceeds what one owner may hold (nothing is
        stored then). ``deadline`` overrides the table's lifetime for this entry.
        Expired entries are not swept here (:meth:`expire`, from the owner's timer):
        they count against the caps until then, and a full table evicts them first,
        being the oldest."""
        lim = self.limits
        if key in self._entries:
            self._remove(key, None)
        if size > lim.per_owner_bytes or size > lim.total_bytes:
            return False
        mine = self._owners.get(owner)
        while mine and (len(mine) >= lim.per_owner
                        or self._owner_bytes.get(owner, 0) + size > lim.per_owner_bytes):
            self._remove(next(iter(mine)), "owner_full")
            mine = self._owners.get(owner)
        while self._entries and (len(self._entries) >= lim.total
                                 or self.bytes + size > lim.total_bytes):
            self._remove(next(iter(self._entries)), "table_full")
        entry = _Entry(owner, value, size, now, now)
        entry.deadline = self._deadline(entry, now) if deadline is None else deadline
        self._entries[key] = entry
        self._owners.setdefault(owner, OrderedDict())[key] = None
        self._owner_bytes[owner] = self._owner_bytes.get(owner, 0) + size
        self.bytes += size
        return True

    def grow(self, key: K, extra: int, now: float) -> bool:
        """Account ``extra`` more bytes to ``key`` (its value grew); False, and the entry
        removed, if that breaks its owner's or the table's byte cap after evicting
        others (oldest of the same owner first, then oldest overall)."""
        entry = self._entries.get(key)
        if entry is None:
            return False
        lim = self.limits
        owner = entry.owner
        if entry.size + extra > lim.per_owner_bytes:
            self._remove(key, "owner_full")
            return False
        mine = self._owners[owner]
        for other in list(mine):
            if self._owner_bytes[owner] + extra <= lim.per_owner_bytes:
                break
            if other != key:
                self._remove(other, "owner_full")
        for other in list(self._entries):
            if self.bytes + extra <= lim.total_bytes:
                break
            if other != key:
                self._remove(other, "table_full")
        if self.bytes + extra > lim.total_bytes:
            self._remove(key, "table_full")
            return False
        entry.size += extra
        self._owner_bytes[owner] += extra
        self.bytes += extra
        entry.deadline = self._deadline(entry, now)
        self._entries.move_to_end(key)
        mine.move_to_end(key)
        return True

    def pop(self, key: K) -> V | None:
        """Remove ``key`` (no eviction callback); its value or None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._remove(key, None)
        return entry.value

    def expire(self, now: float) -> int:
        """Drop entries whose lifetime is over; how many. Entries are kept in order of
        last touch, so this stops at the first live one when every entry shares the
        table's lifetime (entries with their own ``deadline`` are caught on access)."""
        n = 0
        entries = self._entries
        while entries:
            key, entry = next(iter(entries.items()))
            if entry.deadline > now:
                break
            self._remove(key, "expired")
            n += 1
        return n

    def clear(self) -> None:
        for key in list(self._entries):
            self._remove(key, "expired")

    def _remove(self, key: K, why: str | None) -> None:
        entry = self._entries.pop(key)
        mine = self._owners[entry.owner]
        del mine[key]
        if not mine:
            del self._owners[entry.owner]
            del self._owner_bytes[entry.owner]
        else:
            self._owner_bytes[entry.owner] -= entry.size
        self.bytes -= entry.size
        if why is not None:
            self.evicted[why] += 1
            if self._on_evict is not None:
                self._on_evict(key, entry.value, why)


__all__ = ["BoundedTable", "Limits", "source_of", "source_of_host"]
