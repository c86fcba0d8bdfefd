"""Pending handshakes at the broker: msg2 sent, msg3 not yet verified.

Nothing is granted on a pending handshake (no session, no identity); what it costs is
bounded here (:class:`PendingLimits`: per client id, per source, in total), and a new
one evicts the oldest pending one of its client id, source or the whole table, never a
confirmed session. Used by :class:`broker_plugin.enforcer.Enforcer`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from structauth.handshake import PendingHandshake


@dataclass(frozen=True)
class PendingLimits:
    """Bounds on pending handshakes (msg2 sent, msg3 not yet verified).

    A pending handshake costs the broker one signature and about 1.3 KB of memory
    (docs/MQTT.md has the measured figure) until it is confirmed, fails, expires (the
    responder's ``pending_timeout``) or is evicted. A new one evicts the oldest pending
    one of the same client id beyond ``per_client``, of the same source beyond
    ``per_source`` and of the whole table beyond ``total``; confirmed sessions are in
    another table and are never evicted by a pending one. Evicting rather than refusing
    means an outsider cannot keep a device out by holding its client id's slots: it
    has to replace the device's own pending handshake inside the device's round trip,
    and each try costs it a full msg1 the broker verifies first.
    """

    per_client: int = 2
    per_source: int = 16
    total: int = 1024

    def problem(self) -> str | None:
        if not 1 <= self.per_client <= 64:
            return f"per client id {self.per_client} outside 1..64"
        if not 1 <= self.per_source <= 100_000:
            return f"per source {self.per_source} outside 1..100000"
        if not 1 <= self.total <= 1_000_000:
            return f"total {self.total} outside 1..1000000"
        return None


def source_of(address: str) -> str:
    """What a pending handshake is charged to: an IPv4 address (IPv4-mapped IPv6 too),
    or the /64 of an IPv6 address (one host can have a whole /64)."""
    if ":" not in address:
        return address
    try:
        ip = ipaddress.IPv6Address(address.strip("[]").split("%", 1)[0])
    except ValueError:
        return address
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))


class Pending:
    """One handshake between msg2 and msg3: the core's PendingHandshake (no identity,
    no session) and where it came from."""

    __slots__ = ("address", "client_id", "handshake", "key", "reauth", "source")

    def __init__(self, handshake: PendingHandshake, client_id: str, address: str,
                 reauth: bool) -> None:
        self.handshake = handshake
        self.client_id = client_id
        self.address = address
        self.source = source_of(address)
        self.reauth = reauth
        self.key = (client_id, handshake.session_id)


class PendingHandshakes:
    """Pending handshakes by (client id, session id), bounded by :class:`PendingLimits`.
    Insertion order is deadline order (one timeout for all), so expiry stops at the
    first live entry."""

    def __init__(self, limits: PendingLimits | None = None) -> None:
        self.limits = limits or PendingLimits()
        self._all: dict[tuple[str, bytes], Pending] = {}
        self._by_client: dict[str, list[tuple[str, bytes]]] = {}
        self._by_source: dict[str, list[tuple[str, bytes]]] = {}

    def __len__(self) -> int:
        return len(self._all)

    def add(self, entry: Pending) -> list[Pending]:
        """Keep ``entry``; the pending handshakes it evicted (already discarded)."""
        evicted = []
        limits = self.limits
        if entry.key in self._all:
            evicted.append(self._drop(entry.key))
        keys = self._by_client.get(entry.client_id)
        if keys is not None and len(keys) >= limits.per_client:
            evicted.append(self._drop(keys[0]))
        keys = self._by_source.get(entry.source)
        if keys is not None and len(keys) >= limits.per_source:
            evicted.append(self._drop(keys[0]))
        if len(self._all) >= limits.total:
            evicted.append(self._drop(next(iter(self._all))))
        self._all[entry.key] = entry
        self._by_client.setdefault(entry.client_id, []).append(entry.key)
        self._by_source.setdefault(entry.source, []).append(entry.key)
        return evicted

    def take(self, client_id: str, session_id: bytes) -> Pending | None:
        """Remove and return the pending handshake msg3 names (not discarded: the
        caller confirms it, which uses it up either way)."""
        entry = self._all.get((client_id, session_id))
        if entry is not None:
            self._unlink(entry)
        return entry

    def expire(self, now: float) -> list[Pending]:
        """Drop (and discard) every pending handshake past its deadline."""
        gone = []
        for key, entry in self._all.items():
            if now < entry.handshake.deadline:
                break
            gone.append(key)
        return [self._drop(key) for key in gone]

    def _drop(self, key: tuple[str, bytes]) -> Pending:
        entry = self._all[key]
        self._unlink(entry)
        entry.handshake.discard()
        return entry

    def _unlink(self, entry: Pending) -> None:
        del self._all[entry.key]
        for index, name in ((self._by_client, entry.client_id),
                            (self._by_source, entry.source)):
            keys = index[name]
            keys.remove(entry.key)
            if not keys:
                del index[name]
