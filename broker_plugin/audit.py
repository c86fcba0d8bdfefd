"""Tamper-evident audit log of the broker plugin: hash-chained JSON lines.

One JSON object per line, fields in this order::

    {"seq": 7, "time": "2025-01-31T12:00:00.000123Z", "event": "message_rejected",
     "session": "<hex session id>" | null, "identity": "spiffe://..." | null,
     ...event fields..., "prev": "<hex hash of record 6>", "hash": "<hex>"}

``hash`` is SHA-256 -- or HMAC-SHA256 under ``key`` -- of the record's canonical JSON
without ``hash``: sorted keys, no spaces, UTF-8 (``json.dumps(sort_keys=True,
separators=(",", ":"), ensure_ascii=False)``).  The first record's ``prev`` is
:data:`GENESIS`.  ``seq`` counts up by one across restarts and rotated files.

What the chain proves, and what it does not:

* An edited, deleted, reordered, duplicated or inserted record is detected by
  :func:`verify_chain`, naming the file and line.
* Without a key, anyone who can write the file can also recompute every hash after an
  edit: the plain chain only catches partial or careless tampering and disk damage.
  With ``key`` (kept away from whoever can write the log) the chain cannot be recomputed
  and a forged or appended record fails its HMAC.
* Deleting the *newest* records leaves a valid, shorter chain.  Anchor the head
  elsewhere (:attr:`AuditLog.head`, e.g. into syslog or the metrics) and check it with
  ``verify_chain(..., expect_head=...)``.
* Records are never rewritten.  A log whose last line is damaged (a crash mid-write, or
  an edit) is not continued silently: the writer terminates the damaged line and starts a
  new segment with a ``chain_break`` record (``prev`` = :data:`GENESIS`) that names the
  problem.  :func:`verify_chain` reports every chain break, so such a log never verifies
  as clean again -- by design, since what was lost cannot be known.

Durability: each record is handed to the kernel in a single ``write()`` on an
``O_APPEND`` descriptor, so it survives a crash of the broker process.  ``fsync=True``
also makes it survive a power cut or kernel crash, at the price of one ``fdatasync`` per
record (0.2 ms measured on an ext4 virtio disk against 18 us without; tens of ms on SD
cards and spinning disks), which caps the record rate; behind :class:`AsyncAuditWriter`
that cost never reaches the broker thread, but a log that cannot keep up overflows the
queue (counted, see below).  Without fsync (the default) a power cut can lose the last
few seconds of records: a shorter tail (caught only by an anchored head) or a torn last
line, which the next start records as a ``chain_break``.

Never block the broker thread: Mosquitto calls plugins on its single event-loop thread,
so the broker submits to an :class:`AsyncAuditWriter` (an O(1) append to a bounded
queue) and a background thread formats, hashes and writes.  When the queue is full the
record is dropped and counted, and an ``audit_overflow`` record carrying the count is
written as soon as the writer catches up: records can be lost under a flood, the fact
that they were cannot.

Refusals of unauthenticated sources (``handshake_refused``: a CONNECT without the
method, a bad msg1, a bad msg3; ``will_refused`` of a connection that never confirmed)
cost an attacker one packet each, so :class:`AsyncAuditWriter` aggregates them per
(event, reason, source address) per interval (:class:`RefusalAggregation`: 10 s): the
first of each in an interval is written in full, the rest become one
``refusals_aggregated`` record with a count, the first and last time.  The table is
bounded per source and in total, and so is the number written in full, so a flood of
refused CONNECTs writes a few records per interval instead of one per CONNECT (35,000
refused CONNECTs in 10 s wrote 14.3 MB before).  Every refusal is still counted in the
broker's metrics, which the enforcer updates one by one.  Events of confirmed sessions
are never aggregated: one record each.

Verify from a shell (exit status 0 when clean, 1 otherwise, one line of output)::

    python -m broker_plugin.audit verify audit.log.2 audit.log.1 audit.log --key-file K

The key file holds the key in hex (at least 16 bytes), as read by :func:`load_key`.
"""

from __future__ import annotations

import argparse
import atexit
import fcntl
import json
import os
import sys
import threading
import time as _time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TypeAlias

from broker_plugin.audit_chain import (  # the record format and chain check (re-exported)
    _MIN_KEY_BYTES,
    CHAIN_BREAK,
    GENESIS,
    Record,
    VerifyResult,
    _digest,
    _hash_ok,
    _iso,
    _parse,
    _plain,
    _scrub,
    _session_hex,
    canonical,
    load_key,
    verify_chain,
)
from structauth.errors import ConfigurationError, Reason, StateError

__all__ = [
    "EVENTS",
    "GENESIS",
    "AsyncAuditWriter",
    "AuditLog",
    "RefusalAggregation",
    "VerifyResult",
    "canonical",
    "load_key",
    "main",
    "verify_chain",
]

# -- event names the broker plugin records -------------------------------------------------
#: SA1 handshake accepted; fields: client_id, peer (address), suite.
HANDSHAKE_OK: Final = "handshake_ok"
#: handshake refused; fields: reason (Reason name), detail, client_id, peer.
HANDSHAKE_REFUSED: Final = "handshake_refused"
#: a PUBLISH failed verification and was dropped; fields: reason, topic, detail.
MESSAGE_REJECTED: Final = "message_rejected"
#: a verified message or subscription was outside the identity's ACL; fields: topic, access.
ACL_DENIED: Final = "acl_denied"
#: the broker asked for re-authentication; fields: trigger (sensitive_topic, new_network,
#: rate_spike, policy_change, key_change), quote (bool), nonce (hex).
STEP_UP_REQUESTED: Final = "step_up_requested"
#: re-authentication succeeded; the new session replaced the old; fields: new_session.
STEP_UP_OK: Final = "step_up_ok"
#: re-authentication failed or timed out; fields: reason, detail.
STEP_UP_FAILED: Final = "step_up_failed"
#: repeated failures tripped the circuit breaker; fields: failures, window_s, until.
QUARANTINED: Final = "quarantined"
#: a quarantined device was let back in; fields: by (operator or "timeout").
RELEASED: Final = "released"
#: an active session of a revoked device was kicked; fields: serial, latency_ms.
REVOKED_DISCONNECT: Final = "revoked_disconnect"
#: a session reached its lifetime or message limit; fields: reason.
SESSION_EXPIRED: Final = "session_expired"
#: ACL / step-up policy reloaded; fields: version, digest.
POLICY_RELOADED: Final = "policy_reloaded"
#: written by the log itself: the previous tail was damaged and a new segment starts;
#: fields: problem, file, offset, after_seq, after_hash (last good record, or null).
#: written by the async writer: records were lost; fields: dropped, failed, events, since.
AUDIT_OVERFLOW: Final = "audit_overflow"
#: the broker let a Will through (a confirmed connection's, on a will topic); fields:
#: client_id, topic, retain, delayed, detail (the policy template).
WILL_PUBLISHED: Final = "will_published"
#: the broker refused a Will; fields: client_id, topic, reason (unconfirmed,
#: not_authorized, quarantined, wrong_identity), detail, retain, delayed, confirmed.
WILL_REFUSED: Final = "will_refused"
#: written by the async writer: refusals of one (event, reason, source) not written one
#: by one within an interval; fields: refused_event, reason, source, count, first, last,
#: interval_s, client_id and detail (of the first one counted).
REFUSALS_AGGREGATED: Final = "refusals_aggregated"
#: refusals of sources that never completed a handshake: aggregated, see
#: :class:`RefusalAggregation` (a ``handshake_refused`` with ``reauth`` true, or a
#: ``will_refused`` with ``confirmed`` true, belongs to a confirmed session and is not)
AGGREGATED_EVENTS: Final[frozenset[str]] = frozenset({HANDSHAKE_REFUSED, WILL_REFUSED})

EVENTS: Final[frozenset[str]] = frozenset(
    {
        HANDSHAKE_OK,
        HANDSHAKE_REFUSED,
        MESSAGE_REJECTED,
        ACL_DENIED,
        STEP_UP_REQUESTED,
        STEP_UP_OK,
        STEP_UP_FAILED,
        QUARANTINED,
        RELEASED,
        REVOKED_DISCONNECT,
        SESSION_EXPIRED,
        POLICY_RELOADED,
        CHAIN_BREAK,
        AUDIT_OVERFLOW,
        WILL_PUBLISHED,
        WILL_REFUSED,
        REFUSALS_AGGREGATED,
    }
)

#: field names the log sets itself; ``record(**fields)`` may not use them.
RESERVED: Final[frozenset[str]] = frozenset(
    {"seq", "time", "event", "session", "identity", "prev", "hash"}
)
#: how much of a file's end is read on reopen to find the last record
_TAIL_BYTES: Final = 1 << 20

Clock: TypeAlias = Callable[[], float]


# -- the writer ---------------------------------------------------------------------------
class AuditLog:
    """Append-only, hash-chained JSON-lines file.  Thread-safe; one writer per file.

    ``key``: HMAC-SHA256 key (>= 16 bytes); without it records are chained with plain
    SHA-256.  ``clock``: Unix time in seconds.  ``fsync``: flush every record to stable
    storage (see the module docstring for the trade-off).  ``max_bytes``: rotate before
    a record would take the file past this size: ``path`` becomes ``path.1``, older ones
    shift up to ``path.<keep>`` and the oldest is deleted; the chain (``seq``, ``prev``)
    carries on into the new file.

    Opening takes an exclusive ``flock`` on the file: a second writer (another broker
    on the same path) is refused with :class:`ConfigurationError` instead of
    interleaving two chains.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        key: bytes | None = None,
        clock: Clock = _time.time,
        fsync: bool = False,
        max_bytes: int | None = None,
        keep: int = 5,
    ) -> None:
        if key is not None and len(key) < _MIN_KEY_BYTES:
            raise ConfigurationError(f"audit key must be at least {_MIN_KEY_BYTES} bytes")
        if max_bytes is not None and max_bytes <= 0:
            raise ConfigurationError("audit max_bytes must be positive")
        if keep < 1:
            raise ConfigurationError("audit log must keep at least one rotated file")
        self.path = Path(path)
        self._key = key
        self._clock = clock
        self._fsync = fsync
        self._max_bytes = max_bytes
        self._keep = keep
        self._lock = threading.Lock()
        self._fd = -1
        self._size = 0
        self._seq = 0
        self._prev = GENESIS
        self._damaged = False
        #: chain_break records this instance wrote (0 after a clean reopen)
        self.chain_breaks = 0
        self._open()
        try:
            self._recover()
        except BaseException:
            self._close_fd()
            raise

    # -- public ---------------------------------------------------------------------------
    @property
    def clock(self) -> Clock:
        return self._clock

    @property
    def head(self) -> tuple[int, str]:
        """(seq, hash) of the last record written: anchor it elsewhere to catch a cut tail.

        ``(-1, GENESIS)`` for an empty log.
        """
        with self._lock:
            return self._seq - 1, self._prev

    def record(
        self,
        event: str,
        /,
        *,
        session: bytes | bytearray | str | None = None,
        identity: object = None,
        time: float | None = None,
        **fields: object,
    ) -> Record:
        """Append one record and return it as written (JSON values, with seq/prev/hash).

        ``session`` is the session id (bytes, written as hex); ``identity`` is usually
        the peer's SPIFFE ID; ``time`` is the event's Unix time (default: now).  Field
        values are made JSON: bytes as hex, enums by lowercase name (``reason=
        Reason.BAD_TAG`` gives ``"bad_tag"``), other objects by ``str()``.  Strings are
        JSON-escaped, so device-controlled text cannot forge a line.
        """
        clash = RESERVED.intersection(fields)
        if clash:
            raise StateError(f"audit fields {sorted(clash)} are reserved", Reason.BAD_PARAMETERS)
        with self._lock:
            if self._fd < 0:
                raise StateError("audit log is closed")
            if self._damaged:
                self._reopen()
            rec: Record = {
                "seq": self._seq,
                "time": _iso(self._clock() if time is None else time),
                "event": str(event),
                "session": _session_hex(session),
                "identity": _plain(identity),
            }
            for name, value in fields.items():
                rec[name] = _plain(value)
            rec["prev"] = self._prev
            return self._append(rec)

    def rotate(self) -> None:
        """Rotate now (e.g. on SIGHUP); the chain carries on into the new file."""
        with self._lock:
            if self._fd < 0:
                raise StateError("audit log is closed")
            if self._size > 0:
                self._rotate()

    def close(self) -> None:
        with self._lock:
            self._close_fd()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------
    def rotated_path(self, n: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{n}")

    def _open(self) -> None:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags, 0o640)
        except OSError as exc:
            raise ConfigurationError(f"cannot open audit log {self.path}: {exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ConfigurationError(f"audit log {self.path} is held by another writer") from None
        self._fd = fd
        self._size = os.fstat(fd).st_size

    def _close_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _reopen(self) -> None:
        """After a failed write: the file may end in a partial line; recover as on start."""
        self._close_fd()
        self._open()
        self._damaged = False
        self._recover()

    def _recover(self) -> None:
        """Continue the chain from the last record on disk, or record why it cannot."""
        source = self.path
        if self._size == 0:
            older = self.rotated_path(1)
            if not (older.is_file() and older.stat().st_size > 0):
                return  # a fresh chain
            source = older
        try:
            with open(source, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                start = max(0, size - _TAIL_BYTES)
                f.seek(start)
                data = f.read()
        except OSError as exc:
            raise ConfigurationError(f"cannot read audit log {source}: {exc}") from None

        complete = data.endswith(b"\n")
        body = data[:-1] if complete else data
        cut = body.rfind(b"\n")
        last = body[cut + 1 :]
        offset = start + cut + 1
        rec = _parse(last) if (cut >= 0 or start == 0) else None
        problem: str | None = None
        if rec is None:
            if cut < 0 and start > 0:
                problem = f"last line is longer than {_TAIL_BYTES} bytes"
            elif not complete:
                problem = f"last line truncated ({len(last)} bytes, no newline)"
            else:
                problem = "last line is not an audit record"
        elif not _hash_ok(rec, self._key):
            problem = (
                f"last record (seq {rec['seq']}) fails its hash check: "
                "edited, or written with another key"
            )
        if not complete and source == self.path:
            self._write(b"\n")  # terminate the partial line; never rewrite it
        if problem is None and rec is not None:
            self._seq = rec["seq"] + 1
            self._prev = rec["hash"]
            return

        # Find the last record that still verifies, to name where the chain stopped.
        after: Record | None = None
        for raw in reversed(body[:cut].split(b"\n") if cut > 0 else []):
            candidate = _parse(raw)
            if candidate is not None and _hash_ok(candidate, self._key):
                after = candidate
                break
        self._seq = after["seq"] + 1 if after is not None else 0
        self._prev = GENESIS
        self.chain_breaks += 1
        brk: Record = {
            "seq": self._seq,
            "time": _iso(self._clock()),
            "event": CHAIN_BREAK,
            "session": None,
            "identity": None,
            "problem": problem,
            "file": source.name,
            "offset": offset,
            "after_seq": after["seq"] if after is not None else None,
            "after_hash": after["hash"] if after is not None else None,
            "prev": GENESIS,
        }
        self._append(brk)

    def _append(self, rec: Record) -> Record:
        try:
            rec["hash"] = _digest(canonical(rec), self._key)
        except UnicodeEncodeError:  # a lone surrogate somewhere in a field
            rec = _scrub(rec)
            rec["hash"] = _digest(canonical(rec), self._key)
        line = (
            json.dumps(rec, ensure_ascii=False, separators=(",", ":"), allow_nan=False) + "\n"
        ).encode("utf-8")
        if self._max_bytes is not None and self._size and self._size + len(line) > self._max_bytes:
            self._rotate()
        self._write(line)
        self._seq = rec["seq"] + 1
        self._prev = rec["hash"]
        return rec

    def _write(self, data: bytes) -> None:
        try:
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
            if self._fsync:
                os.fdatasync(self._fd)
        except OSError:
            self._damaged = True  # the next record reopens and recovers the tail
            raise
        self._size += len(data)

    def _rotate(self) -> None:
        self._close_fd()
        for n in range(self._keep - 1, 0, -1):
            older = self.rotated_path(n)
            if older.exists():
                os.replace(older, self.rotated_path(n + 1))
        os.replace(self.path, self.rotated_path(1))
        if self._fsync:
            dirfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dirfd)
            finally:
                os.close(dirfd)
        self._open()


# -- aggregation of unauthenticated refusals ---------------------------------------------
def source_of(value: object) -> str:
    """The source a refusal is charged to: an IPv4 address (IPv4-mapped too), the /64 of
    an IPv6 address (one host can hold a whole /64), a port dropped; anything else as
    given (at most 64 characters)."""
    import ipaddress

    text = str(value) if value is not None else "?"
    host = text
    if host.startswith("[") and "]" in host:  # [v6]:port
        host = host[1 : host.index("]")]
    elif host.count(":") == 1:  # v4:port
        host = host.split(":", 1)[0]
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return text[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


@dataclass
class _Tally:
    count: int = 0  # counted, not written one by one
    first: float = 0.0
    last: float = 0.0
    sample: dict[str, object] = field(default_factory=dict)


class RefusalAggregation:
    """Per-interval counts of refusals by (event, reason, source), bounded.

    ``interval_s``: the window; ``per_source``: distinct (event, reason) pairs one source
    can have in a window (more fold into its reason ``other``); ``sources``: entries in
    the whole table (more fold into the source ``*``, one per (event, reason), itself
    at most ``sources`` more); ``immediate``: refusals written in full per window (the
    first of each entry while this lasts; every other one is counted). So one window
    writes at most ``immediate`` + 2 x ``sources`` + 1 records, whatever the flood:
    with the defaults 545 records in 10 s in the worst case (refusals from more than
    256 sources, each with several reasons), about 2 for a flood from one source with
    one reason. Memory: at most 2 x ``sources`` + 1 entries of a few hundred bytes.

    Not thread-safe: :class:`AsyncAuditWriter` calls it under its lock.
    """

    SAMPLE_CHARS = 200

    def __init__(self, *, interval_s: float = 10.0, per_source: int = 8, sources: int = 256,
                 immediate: int = 32) -> None:
        if not interval_s > 0 or per_source < 1 or sources < 1 or immediate < 0:
            raise ConfigurationError("refusal aggregation: interval_s > 0, per_source >= 1, "
                                     "sources >= 1 and immediate >= 0")
        self.interval_s = float(interval_s)
        self.per_source = per_source
        self.sources = sources
        self.immediate = immediate
        self._tallies: dict[tuple[str, str, str], _Tally] = {}
        self._per_source: dict[str, int] = {}
        self._overflow = 0  # entries under the source "*"
        self._written = 0  # written in full this window
        #: when the current window ends (None: no window open)
        self.deadline: float | None = None
        #: totals since start: refusals offered, and written in full
        self.offered_total = 0
        self.written_total = 0

    def __len__(self) -> int:
        return len(self._tallies)

    def offer(self, event: str, fields: Mapping[str, object], when: float) -> bool:
        """Count one refusal; True if it is to be written in full now."""
        self.offered_total += 1
        if self.deadline is None:
            self.deadline = when + self.interval_s
        reason = str(fields.get("reason") or "unknown")[:64]
        source = source_of(fields.get("address", fields.get("peer")))
        key = (event, reason, source)
        tally = self._tallies.get(key)
        if tally is None:
            seen = self._per_source.get(source, 0)
            if seen >= self.per_source:
                key = (event, "other", source)
            elif len(self._tallies) - self._overflow >= self.sources:
                key = (event, reason, "*")
                if key not in self._tallies and self._overflow >= self.sources:
                    key = (event, "other", "*")
            tally = self._tallies.get(key)
            if tally is None:
                tally = self._tallies[key] = _Tally()
                if key[2] == "*":
                    self._overflow += 1
                else:
                    self._per_source[source] = seen + 1
                if self._written < self.immediate:
                    self._written += 1
                    self.written_total += 1
                    return True
        if tally.count == 0:
            tally.first = when
            for name in ("client_id", "detail"):
                value = fields.get(name)
                if value is not None:
                    text = value if isinstance(value, str) else str(value)
                    tally.sample[name] = text[: self.SAMPLE_CHARS]
        tally.count += 1
        tally.last = when
        return False

    def take(self) -> list[tuple[dict[str, object], float]]:
        """End the window: one ``refusals_aggregated`` record's fields (and time) per
        entry that counted refusals it did not write; the table starts empty."""
        out: list[tuple[dict[str, object], float]] = []
        for (event, reason, source), tally in self._tallies.items():
            if tally.count:
                out.append(({"refused_event": event, "reason": reason, "source": source,
                             "count": tally.count, "first": _iso(tally.first),
                             "last": _iso(tally.last), "interval_s": self.interval_s,
                             **tally.sample}, tally.last))
        self._tallies.clear()
        self._per_source.clear()
        self._overflow = self._written = 0
        self.deadline = None
        return out


# -- asynchronous front end for the broker thread -----------------------------------------
_Item: TypeAlias = tuple[str, bytes | bytearray | str | None, object, dict[str, object], float]


class AsyncAuditWriter:
    """Queue audit records on the broker thread; write them on a background thread.

    :meth:`submit` reads the clock, takes a lock, checks the length and appends a tuple
    to a deque (0.6-0.9 us measured, call included): no formatting, hashing or I/O on the
    caller's thread.  The writer thread then spends about 18 us per record (JSON twice,
    HMAC, one ``write()``), some 50,000 records a second, plus the flush with ``fsync``.
    Field values are serialised on the writer thread: pass values the caller will not
    mutate afterwards.  The queue holds
    at most ``maxsize`` records; beyond that :meth:`submit` drops the record, counts it
    (per event name) and returns False.  The writer thread takes the whole queue at once,
    so every drop happened after every record it took; it writes those records, then one
    ``audit_overflow`` record with the counts.  A record the log fails to write (disk
    full) is counted as ``failed`` the same way.  ``start=False`` leaves the writer
    thread unstarted until :meth:`start` (tests use it to fill the queue).

    ``aggregate``: refusals of unauthenticated sources (:data:`AGGREGATED_EVENTS`) go
    through this :class:`RefusalAggregation` (the default one unless None is given):
    the writer thread writes its ``refusals_aggregated`` records when each window ends
    (and on :meth:`flush_refusals` and :meth:`close`).
    """

    def __init__(self, log: AuditLog, *, maxsize: int = 10_000, start: bool = True,
                 aggregate: RefusalAggregation | bool = True) -> None:
        if maxsize < 1:
            raise ConfigurationError("audit queue size must be at least 1")
        self.aggregate: RefusalAggregation | None = (
            RefusalAggregation() if aggregate is True
            else aggregate if isinstance(aggregate, RefusalAggregation) else None)
        self._flush_now = False
        self.log = log
        self._clock = log.clock
        self._maxsize = maxsize
        self._queue: deque[_Item] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._idle_cv = threading.Condition(self._lock)
        self._idle = True  # writer is waiting (needs a notify)
        self._busy = False  # writer holds a batch that is not yet written
        self._closing = False
        self._dropped = 0  # not yet reported
        self._failed = 0  # not yet reported
        self._drop_events: dict[str, int] = {}
        self._drop_since: float | None = None
        #: totals since start
        self.dropped_total = 0
        self.failed_total = 0
        self.written_total = 0
        self.last_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="tessera-audit", daemon=True)
        self._started = False
        atexit.register(self.close)
        if start:
            self.start()

    def start(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
        self._thread.start()

    def submit(
        self,
        event: str,
        /,
        *,
        session: bytes | bytearray | str | None = None,
        identity: object = None,
        **fields: object,
    ) -> bool:
        """Queue one record; False if it was dropped (queue full, or writer closed).
        A refusal the aggregation counts instead of writing returns True."""
        when = self._clock()
        with self._lock:
            aggregate = self.aggregate
            if (aggregate is not None and event in AGGREGATED_EVENTS and session is None
                    and not fields.get("reauth") and not fields.get("confirmed")
                    and not self._closing):
                opened = aggregate.deadline is None
                if not aggregate.offer(event, fields, when):
                    return True
                if opened and self._idle:  # the writer must wake when the window ends
                    self._idle = False
                    self._wake.notify()
            if self._closing or len(self._queue) >= self._maxsize:
                self._dropped += 1
                self.dropped_total += 1
                self._drop_events[event] = self._drop_events.get(event, 0) + 1
                if self._drop_since is None:
                    self._drop_since = when
                return False
            self._queue.append((event, session, identity, fields, when))
            if self._idle:
                self._idle = False
                self._wake.notify()
        return True

    @property
    def pending(self) -> int:
        return len(self._queue)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted so far is written; False on timeout."""
        deadline = None if timeout is None else _time.monotonic() + timeout
        with self._lock:
            while self._queue or self._busy or self._dropped or self._failed:
                if not self._thread.is_alive():
                    return False
                left = None if deadline is None else deadline - _time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._idle_cv.wait(left)
        return True

    def close(self, timeout: float | None = 10.0, *, close_log: bool = True) -> None:
        """Stop accepting records, write what is queued, stop the thread, close the log."""
        atexit.unregister(self.close)
        with self._lock:
            self._closing = True
            self._flush_now = True
            self._wake.notify()
            started = self._started
        if started:
            self._thread.join(timeout)
        else:
            self._drain_inline()
        if close_log:
            self.log.close()

    def flush_refusals(self, timeout: float | None = 5.0) -> bool:
        """End the aggregation window now and wait until its records are written."""
        with self._lock:
            self._flush_now = True
            self._idle = False
            self._wake.notify()
        return self.drain(timeout)

    def __enter__(self) -> AsyncAuditWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _due(self) -> bool:
        """An aggregation window to write (lock held)."""
        a = self.aggregate
        return a is not None and a.deadline is not None and (
            self._flush_now or self._clock() >= a.deadline)

    # -- writer thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._lock:
                while not (self._queue or self._dropped or self._failed or self._closing
                           or self._due()):
                    self._idle = True
                    self._idle_cv.notify_all()
                    self._flush_now = False
                    a = self.aggregate
                    if a is not None and a.deadline is not None:
                        self._wake.wait(max(0.0, a.deadline - self._clock()) + 0.001)
                    else:
                        self._wake.wait()
                self._idle = False
                closing = self._closing
                self._busy = True
            settled = self._write_pending()
            if closing:
                with self._lock:
                    owed = self._dropped or self._failed
                    if not self._queue and (not owed or not settled):
                        self._idle_cv.notify_all()
                        return
            elif not settled:
                _time.sleep(0.1)  # the log cannot write (disk full?): retry, do not spin

    def _drain_inline(self) -> None:
        with self._lock:
            self._busy = True
        self._write_pending()

    def _write_pending(self) -> bool:
        """Write the queued batch, then the overflow record owed for drops after it.

        True when nothing is left owed.  The batch and the drop count are taken together:
        a drop happens only while the queue is full, and nothing is queued again until
        the queue is taken, so every drop counted here came after every record taken.
        """
        with self._lock:
            batch = list(self._queue)
            self._queue.clear()
            if self._due() and self.aggregate is not None:
                batch.extend((REFUSALS_AGGREGATED, None, None, fields, when)
                             for fields, when in self.aggregate.take())
            self._flush_now = False
            dropped = self._dropped
            events, since = dict(self._drop_events), self._drop_since
        try:
            for event, session, identity, fields, when in batch:
                try:
                    self.log.record(event, session=session, identity=identity, time=when, **fields)
                    self.written_total += 1
                except Exception as exc:  # the writer thread must survive anything
                    self.last_error = exc
                    with self._lock:
                        self._failed += 1
                        self.failed_total += 1
            failed = self._failed  # only this thread adds failures
            if not (dropped or failed):
                return True
            try:
                self.log.record(
                    AUDIT_OVERFLOW,
                    dropped=dropped,
                    failed=failed,
                    events=events,
                    since=_iso(since) if since is not None else None,
                )
            except Exception as exc:
                self.last_error = exc  # the counts stay owed; retried with the next pass
                return False
            self.written_total += 1
            with self._lock:
                self._dropped -= dropped
                self._failed -= failed
                for name, count in events.items():
                    left = self._drop_events.get(name, 0) - count
                    if left > 0:
                        self._drop_events[name] = left
                    else:
                        self._drop_events.pop(name, None)
                if not self._dropped:
                    self._drop_since = None
            return True
        finally:
            with self._lock:
                self._busy = False
                if not self._queue:
                    self._idle_cv.notify_all()


# -- command line -------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """``verify FILE... [--key-file F]``: print one verdict line; 0 if clean, 1 if not.

    2 for a usage error or an unreadable key file.
    """
    parser = argparse.ArgumentParser(
        prog="python -m broker_plugin.audit", description="Tessera audit log tools."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    verify = sub.add_parser("verify", help="check the hash chain of audit log files")
    verify.add_argument(
        "files",
        nargs="+",
        type=Path,
        metavar="FILE",
        help="log files, oldest first: audit.log.2 audit.log.1 audit.log",
    )
    verify.add_argument("--key-file", type=Path, help="HMAC key, one line of hex")
    verify.add_argument(
        "--partial",
        action="store_true",
        help="accept a chain whose first records were rotated away",
    )
    verify.add_argument("--expect-head", metavar="HASH", help="an anchored head hash")
    args = parser.parse_args(argv)

    key = None
    if args.key_file is not None:
        try:
            key = load_key(args.key_file)
        except ConfigurationError as exc:
            print(f"ERROR: {exc}")
            return 2
    result = verify_chain(
        args.files, key=key, from_genesis=not args.partial, expect_head=args.expect_head
    )
    print(result.verdict())
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
