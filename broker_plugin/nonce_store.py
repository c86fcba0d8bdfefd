"""The broker's msg1 nonce cache, kept across restarts and shared between replicas.

structauth's :class:`~structauth.handshake.NonceCache` is in memory and sans-IO: a msg1
replayed after a restart, or at a second broker with the same identity (a replica),
used to cost an ECDSA verification, a hardware signature and a pending handshake before
it was refused at msg3 (docs/PROTOCOL.md section 4.8). This module does the IO that
makes the cache outlive the process and span replicas, through the cache's two hooks:
``on_add`` tells us every nonce the responder records, :meth:`NonceCache.remember`
feeds in nonces recorded elsewhere.

Options (``plugin_opt_<name>``; either, both or neither; read once at start):

    nonce_file      a file of the nonces this broker knows (its own and, with
                    nonce_database, the other replicas'), loaded at start: a msg1
                    captured before a restart is refused at once after it
    nonce_database  postgresql:// URL of a database the replicas share (the registry's
                    is fine): each replica writes the nonces it records to the table
                    ``broker_msg1_nonces`` (created if missing) and reads the others'.
                    Needs psycopg (``pip install 'psycopg[binary]'``, part of tessera's
                    ``provisioning`` extra). The database must be reachable at start (a
                    wrong URL is one error line); later outages are logged and retried,
                    and meanwhile each replica still refuses what it saw itself.
    nonce_poll_s    the readers' fallback poll (default 1 s, 0.05 .. 60): a replica
                    normally learns new rows at once from NOTIFY; the poll is a backstop

Threads: Mosquitto's event-loop thread never waits on a disk or a database. ``on_add``
runs there (inside ``Responder.accept``) and only puts the entry into bounded queues
(2-5 us; full: dropped and counted). Writer threads append to the file and insert into
the table; a reader thread queues other replicas' rows. The broker thread hands those
to the cache right before it checks each msg1 (:meth:`NonceSync.feed`, at most
``FEED_BATCH``; an empty queue costs one truth test) and in every tick
(:meth:`NonceSync.tick`, at most ``TICK_BATCH``, at least every 100 ms).

The file: one 88-byte line per nonce, ``<nonce hex> <expiry, Unix ms, 13 digits>
<CRC-32 of both, 8 hex>`` written by one ``write()`` per batch on an ``O_APPEND``
descriptor and ``fsync``-ed after each batch, so a crash of the broker loses only the
records still queued (milliseconds' worth) and a power cut only the last unsynced batch.
Loading costs about 3 us a record (0.3 s for a full 100,000-entry file, before the
listener opens). Monotonic times do not survive a reboot, so expiries are stored as
wall-clock times and converted back at load (a wall clock stepped between runs shifts
them by the step; the cache never keeps one longer than its TTL). At start the file is
read (lines that are damaged, torn or fail their CRC are skipped and counted, never
fatal) and, if it had any or is due, rewritten with the live entries only (a new file, ``fsync``,
``rename``); while running it is compacted the same way when it holds twice as many
records as live nonces (at least 1,024). Bound: ``2 x max_entries`` records plus one
batch, 17.6 MB with the cache's default 100,000 entries. A ``<file>.lock`` (``flock``)
keeps a second broker off the same file. A write error (disk full) is logged and
counted; the cache keeps working in memory, the writer keeps what it could not write
(up to ``max_entries``) and catches up once writes succeed again; a failed write costs
at most the record it tore. A full disk at start only skips the compaction.

The table: ``(id bigserial, responder, origin, nonce, expires_at)``. ``responder`` is
the broker identity (replicas share it; other brokers' rows are ignored), ``origin`` a
random name of this broker process (its own rows are not read back). Expiry times are
the database server's clock (``clock_timestamp() + remaining``) and read back as the
remaining seconds, so the replicas' wall clocks do not matter. Writers insert under a
transaction-level advisory lock, so ids become visible in id order and a reader that
keeps the largest id it has seen never misses a row; each insert NOTIFYs channel
``broker_msg1_nonces``, on which the readers LISTEN. Writers delete expired rows every
minute; the table holds each replica's nonces of the last TTL (600 s) plus a minute.

Sync latency (a nonce recorded at replica A until replica B refuses it): A's writer
wakes at once, one INSERT ... NOTIFY transaction; B's reader wakes on the notification,
one SELECT; B checks the next msg1 against it. Measured on a loaded 2-core machine
(docs/PROTOCOL.md section 4.8): a replay sent to B 1-2 ms after A's CONNACK was refused
about half the time, 20 ms after 98%, 50 ms after 319 of 320 times, 100 ms after
always: the stated bound is 100 ms while the database is reachable. A lost
notification (there is none while connected; a reconnecting reader reads everything it
missed) would leave the fallback poll, ``nonce_poll_s``. A replay that reaches B
sooner, or while the database is unreachable, costs B what it cost before (a signature
check, a signature, a pending handshake that grants nothing) and B records the nonce
itself.

The CoAP gateway (broker_plugin/coap/site.py) keeps its own in-memory cache for now; it
can use :class:`NonceSync` the same way.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import secrets
import threading
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from broker_plugin.file_lock import lock_beside
from structauth.errors import ConfigurationError
from structauth.handshake import NONCE_SIZE, NonceCache

log = logging.getLogger("tessera.broker.nonces")

__all__ = [
    "RECORD_SIZE",
    "TABLE",
    "FileStore",
    "NonceFile",
    "NonceSync",
    "PostgresStore",
    "decode_record",
    "encode_record",
    "parse_poll",
]

#: one record: 64 hex digits, space, 13 digits of Unix ms, space, 8 hex digits, newline
RECORD_SIZE = 2 * NONCE_SIZE + 1 + 13 + 1 + 8 + 1
#: nonces handed to the cache per tick, and before a msg1 (about 0.5 us each)
TICK_BATCH = 10_000
FEED_BATCH = 1000
#: the table, the NOTIFY channel and the advisory lock key (b"tessnonc")
TABLE = "broker_msg1_nonces"
LOCK_KEY = int.from_bytes(b"tessnonc", "big") & 0x7FFF_FFFF_FFFF_FFFF
CLEANUP_S = 60.0
COMPACT_MIN = 1024


# -- records ---------------------------------------------------------------------------


def encode_record(nonce: bytes, wall_expiry: float) -> bytes:
    """One file record: nonce, expiry (wall clock, Unix seconds) and their CRC-32."""
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"a msg1 nonce is {NONCE_SIZE} bytes, not {len(nonce)}")
    ms = min(max(int(wall_expiry * 1000), 0), 10**13 - 1)
    body = b"%s %013d" % (nonce.hex().encode(), ms)
    return b"%s %08x\n" % (body, zlib.crc32(body))


def decode_record(line: bytes) -> tuple[bytes, float] | None:
    """(nonce, wall expiry) of a record (without its newline), or None if damaged."""
    if len(line) != RECORD_SIZE - 1:
        return None
    body, sep, crc = line.rpartition(b" ")
    try:
        if not sep or crc != b"%08x" % zlib.crc32(body):
            return None
        hex_nonce, ms = body.split(b" ")
        return bytes.fromhex(hex_nonce.decode()), int(ms) / 1000.0
    except (ValueError, UnicodeDecodeError):
        return None


# -- the file ----------------------------------------------------------------------------


class NonceFile:
    """The file's contents and the live nonces it holds; no threads and no clocks of
    its own (wall-clock ``now`` values come from the caller). Not thread-safe: one
    owner, the writer thread once :class:`FileStore` has started."""

    def __init__(self, path: Path, *, max_entries: int, fsync: bool = True) -> None:
        self.path = Path(path)
        self.max_entries = max_entries
        self.fsync = fsync
        #: live nonces -> wall expiry, in the file's order (a mirror of what it holds)
        self.live: OrderedDict[bytes, float] = OrderedDict()
        #: records in the file now (live or not)
        self.records = 0
        #: damaged lines skipped at the last load
        self.corrupt = 0
        self._fd: int | None = None
        #: a write failed: the file may end inside a record
        self._torn = False
        #: the last failed compaction (the owner logs and clears it)
        self.compact_error: OSError | None = None
        self._retry_compact = 0
        self._lock_fd: int | None = None

    # loading and compaction
    def lock(self) -> None:
        """Take ``<file>.lock``; ConfigurationError if another process holds it."""
        self._lock_fd = lock_beside(self.path, "nonce_file")

    def load(self, wall_now: float) -> list[tuple[bytes, float]]:
        """Read the file: its live entries (nonce, wall expiry), at most
        ``max_entries`` (the newest). Damaged lines are counted in ``corrupt``."""
        self.live.clear()
        self.records = 0
        self.corrupt = 0
        try:
            f = open(self.path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            return []
        with f:
            for raw in f:
                self.records += 1
                entry = decode_record(raw[:-1] if raw.endswith(b"\n") else raw)
                if entry is None:
                    self.corrupt += 1
                    continue
                nonce, expiry = entry
                if expiry > wall_now:
                    self._keep(nonce, expiry, wall_now)
        self._expire(wall_now)
        return list(self.live.items())

    def _keep(self, nonce: bytes, expiry: float, wall_now: float) -> None:
        live = self.live
        known = live.get(nonce)
        if known is None or known < expiry:
            live[nonce] = expiry
        while len(live) > self.max_entries:
            live.popitem(last=False)

    def _expire(self, wall_now: float) -> None:
        live = self.live
        while live:
            nonce, expiry = next(iter(live.items()))
            if expiry > wall_now:
                break
            del live[nonce]

    def compact(self, wall_now: float) -> None:
        """Rewrite the file with the live entries only: a new file next to it, fsync,
        rename over it, fsync the directory; then append to the new one."""
        self._expire(wall_now)
        tmp = self.path.with_name(self.path.name + ".tmp")
        data = b"".join(encode_record(n, e) for n, e in self.live.items())
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            error = _write_all(fd, data)[1]
            if error is not None:
                raise error
            if self.fsync:
                os.fsync(fd)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.close(fd)
        os.replace(tmp, self.path)
        if self.fsync:
            dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        self.records = len(self.live)
        self._torn = False
        if self._fd is not None:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)

    def open_append(self) -> None:
        """Append to the file as it is (creating it), after a record that may be torn."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                               0o600)
            size = os.fstat(self._fd).st_size
            self._torn = size > 0 and os.pread(self._fd, 1, size - 1) != b"\n"

    def append(self, entries: Iterable[tuple[bytes, float]], wall_now: float) -> int:
        """Append records (one write, then fsync); compact when due. The number
        appended; OSError (disk full, ...) leaves the file as it was, or with a torn
        last line that the next load skips."""
        if self._fd is None:
            raise ConfigurationError(f"{self.path} is not open")
        fresh = [(n, e) for n, e in entries if e > wall_now]
        if fresh:
            data = b"".join(encode_record(n, e) for n, e in fresh)
            lead = 1 if self._torn else 0
            if lead:  # end the record a failed write may have left half done
                data = b"\n" + data
            written, error = _write_all(self._fd, data)
            if error is not None:  # failed part-way: keep what is whole, retry the rest
                whole = max(written - lead, 0) // RECORD_SIZE
                # a record cut short, or the newline that would end one not written
                self._torn = (written - lead) % RECORD_SIZE != 0 if written > lead \
                    else self._torn and written == 0
                self.records += whole
                for nonce, expiry in fresh[:whole]:
                    self._keep(nonce, expiry, wall_now)
                raise WriteFailed(error, fresh[whole:])
            self._torn = False
            if self.fsync:
                os.fsync(self._fd)
            self.records += len(fresh)
            for nonce, expiry in fresh:
                self._keep(nonce, expiry, wall_now)
        self._expire(wall_now)
        if self.records >= max(COMPACT_MIN, 2 * len(self.live), self._retry_compact):
            try:
                self.compact(wall_now)
                self._retry_compact = 0
            except OSError as exc:  # the records are written; compact again later
                self.compact_error = exc
                self._retry_compact = self.records + COMPACT_MIN
        return len(fresh)

    def size_bound(self) -> int:
        """The most bytes the file holds between compactions, plus one batch."""
        return 2 * max(self.max_entries, COMPACT_MIN) * RECORD_SIZE

    def close(self) -> None:
        for fd in (self._fd, self._lock_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._lock_fd = None


def _batch(q: queue.Queue[tuple[bytes, float] | None], into: list[tuple[bytes, float]],
           limit: int, timeout: float | None) -> bool:
    """Move queued entries into ``into``: wait up to ``timeout`` (None: for ever) for
    the first, then take what is there, up to ``limit``. True once the stop marker
    (None) was taken."""
    try:
        item = q.get(timeout=timeout)
    except queue.Empty:
        return False
    while True:
        if item is None:
            return True
        into.append(item)
        if len(into) >= limit:
            return False
        try:
            item = q.get_nowait()
        except queue.Empty:
            return False


def _write_all(fd: int, data: bytes) -> tuple[int, OSError | None]:
    """Write ``data``: the number of bytes written, and the error that stopped it."""
    view = memoryview(data)
    done = 0
    while done < len(data):
        try:
            done += os.write(fd, view[done:])
        except OSError as exc:
            return done, exc
    return done, None


class WriteFailed(OSError):
    """A write to the nonce file failed part-way: ``remaining`` is what is not yet
    (wholly) in the file."""

    def __init__(self, error: OSError, remaining: list[tuple[bytes, float]]) -> None:
        super().__init__(error.errno, error.strerror)
        self.remaining = remaining


@dataclass
class Stats:
    """Counts kept by a store's threads (each field written by one thread)."""

    loaded: int = 0  # nonces fed into the cache at start
    remembered: int = 0  # nonces fed into the cache while running
    written: int = 0  # records written / rows inserted
    dropped: int = 0  # not queued: the queue was full (the broker thread counts)
    lost: int = 0  # queued but never written: given up after errors (the writer counts)
    errors: int = 0  # failed writes, inserts, reads, connections
    corrupt: int = 0  # damaged file lines skipped


class _Clocks:
    def __init__(self, mono: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.mono = mono
        self.wall = wall


class FileStore:
    """The nonce file: loaded into the cache at :meth:`start`, then appended to by a
    writer thread fed through :meth:`offer` (the broker thread, never blocking)."""

    name = "file"

    def __init__(self, path: Path, *, max_entries: int, fsync: bool = True,
                 mono: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.file = NonceFile(path, max_entries=max_entries, fsync=fsync)
        self.clocks = _Clocks(mono, wall)
        self.stats = Stats()
        self._queue: queue.Queue[tuple[bytes, float] | None] = queue.Queue(max_entries)
        self._thread: threading.Thread | None = None

    def start(self, cache: NonceCache) -> int:
        """Lock and load the file, feed the cache, compact, start the writer. Raises
        ConfigurationError (one line) if the file cannot be used."""
        f = self.file
        try:
            f.lock()
            wall_now, mono_now = self.clocks.wall(), self.clocks.mono()
            loaded = 0
            for nonce, wall_expiry in f.load(wall_now):
                if cache.remember(nonce, mono_now + (wall_expiry - wall_now), mono_now):
                    loaded += 1
            if f.corrupt or f.records >= max(COMPACT_MIN, 2 * len(f.live)):
                try:
                    f.compact(wall_now)
                except OSError as exc:  # a full disk must not keep the broker down
                    self.stats.errors += 1
                    log.warning("tessera: nonce file %s: not compacted at start (%s); "
                                "appending to it as it is", f.path, exc)
            f.open_append()  # (no-op after a compaction)
        except OSError as exc:
            f.close()
            raise ConfigurationError(
                f"plugin_opt_nonce_file: {f.path}: {exc.strerror or exc}") from None
        except ConfigurationError:
            f.close()
            raise
        self.stats.loaded = loaded
        self.stats.corrupt = f.corrupt
        if f.corrupt:
            log.warning("tessera: nonce file %s: %d damaged records skipped", f.path,
                        f.corrupt)
        self._thread = threading.Thread(target=self._run, name="tessera-nonce-file",
                                        daemon=True)
        self._thread.start()
        return loaded

    def offer(self, nonce: bytes, mono_expiry: float) -> None:
        """Queue a nonce (its expiry on the monotonic clock) for the file."""
        c = self.clocks
        try:
            self._queue.put_nowait((nonce, c.wall() + (mono_expiry - c.mono())))
        except queue.Full:
            self.stats.dropped += 1

    def _run(self) -> None:
        pending: list[tuple[bytes, float]] = []
        stop = False
        while not stop:
            # group commit: whatever is queued goes in one write and one fsync
            stop = _batch(self._queue, pending, 4096, None if not pending else 1.0)
            if not pending:
                continue
            try:
                self.stats.written += self.file.append(pending, self.clocks.wall())
                pending.clear()
                if self.file.compact_error is not None:
                    self.stats.errors += 1
                    log.warning("tessera: nonce file %s: compaction failed: %s",
                                self.file.path, self.file.compact_error)
                    self.file.compact_error = None
            except OSError as exc:
                if isinstance(exc, WriteFailed):
                    self.stats.written += len(pending) - len(exc.remaining)
                    pending[:] = exc.remaining
                self.stats.errors += 1
                if self.stats.errors == 1 or self.stats.errors % 1000 == 0:
                    log.warning("tessera: nonce file %s: %s (%d errors; the cache keeps "
                                "working in memory; retrying)", self.file.path, exc,
                                self.stats.errors)
                excess = len(pending) - self.file.max_entries
                if excess > 0:
                    self.stats.lost += excess
                    del pending[:excess]
                if stop:
                    self.stats.lost += len(pending)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, then stop."""
        if self._thread is not None:
            with contextlib.suppress(queue.Full):
                self._queue.put(None, timeout=timeout)
            self._thread.join(timeout)
            self._thread = None
        self.file.close()


# -- the shared table ------------------------------------------------------------------


def redact(url: str) -> str:
    """A database URL without its password, for error lines and logs."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rsplit("@", 1)[-1]
        user = parts.username or ""
        return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))
    except ValueError:
        return "(unparsable URL)"


_SCHEMA = (
    f"CREATE TABLE IF NOT EXISTS {TABLE} ("
    " id bigserial PRIMARY KEY,"
    " responder text NOT NULL,"
    " origin text NOT NULL,"
    " nonce bytea NOT NULL CHECK (octet_length(nonce) = 32),"
    " expires_at timestamptz NOT NULL)",
    f"CREATE INDEX IF NOT EXISTS {TABLE}_expires ON {TABLE} (expires_at)",
)
_INSERT = (
    f"INSERT INTO {TABLE} (responder, origin, nonce, expires_at) "
    "SELECT %s, %s, n, clock_timestamp() + make_interval(secs => s) "
    "FROM unnest(%s::bytea[], %s::float8[]) AS t(n, s)"
)
_SELECT = (
    f"SELECT id, origin = %s, nonce, "
    "extract(epoch FROM expires_at - clock_timestamp())::float8 "
    f"FROM {TABLE} WHERE responder = %s AND id > %s ORDER BY id LIMIT %s"
)


class PostgresStore:
    """The table the replicas share: a writer thread inserts what :meth:`offer`
    queues, a reader thread queues other replicas' rows for :meth:`take`."""

    name = "database"

    def __init__(self, url: str, responder: str, *, max_entries: int, poll_s: float = 1.0,
                 mono: Callable[[], float] = time.monotonic) -> None:
        self.url = url
        self.responder = responder
        self.origin = secrets.token_hex(8)
        self.max_entries = max_entries
        self.poll_s = poll_s
        self.mono = mono
        self.stats = Stats()
        self._out: queue.Queue[tuple[bytes, float] | None] = queue.Queue(max_entries)
        #: (nonce, monotonic expiry) of other replicas' rows, for the broker thread
        #: (a deque: appending and popping are atomic, and an empty one costs the broker
        #: thread one truth test per msg1)
        self._in: deque[tuple[bytes, float]] = deque()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        #: highest id read so far (rows become visible in id order)
        self.cursor = 0
        #: set once the reader has read every row there was when it started
        self.caught_up = threading.Event()

    def _open(self) -> Any:
        import psycopg

        return psycopg.connect(self.url, autocommit=True, connect_timeout=5,
                               application_name="tessera-broker-nonces")

    def prepare(self) -> None:
        """Connect once and create the table: ConfigurationError (one line, without
        the password) if the database is unusable. Runs at start, before the listener."""
        try:
            import psycopg
        except ImportError:
            raise ConfigurationError(
                "plugin_opt_nonce_database needs psycopg: pip install "
                "'psycopg[binary]' (tessera's provisioning extra)") from None
        try:
            conn = self._open()
            try:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
                    for statement in _SCHEMA:
                        conn.execute(statement)
            finally:
                conn.close()
        except psycopg.Error as exc:
            detail = " ".join(str(exc).split()) or type(exc).__name__
            raise ConfigurationError(
                f"plugin_opt_nonce_database {redact(self.url)}: {detail}") from None

    def start(self) -> None:
        for target, name in ((self._write_loop, "tessera-nonce-db-writer"),
                             (self._read_loop, "tessera-nonce-db-reader")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def offer(self, nonce: bytes, mono_expiry: float) -> None:
        try:
            self._out.put_nowait((nonce, mono_expiry))
        except queue.Full:
            self.stats.dropped += 1

    def take(self, limit: int) -> list[tuple[bytes, float]]:
        """Other replicas' nonces read so far (monotonic expiry), at most ``limit``."""
        out: list[tuple[bytes, float]] = []
        q = self._in
        while q and len(out) < limit:
            out.append(q.popleft())
        return out

    def _failed(self, what: str, exc: Exception, backoff: float) -> float:
        self.stats.errors += 1
        log.warning("tessera: nonce database %s: %s: %s", redact(self.url), what,
                    " ".join(str(exc).split()))
        self._stopping.wait(backoff)
        return min(backoff * 2, 30.0)

    def _write_loop(self) -> None:
        conn: Any = None
        backoff = 0.5
        pending: list[tuple[bytes, float]] = []
        next_cleanup = self.mono() + CLEANUP_S
        stop = False
        while not stop:
            stop = _batch(self._out, pending, 1000, 1.0 if pending else min(CLEANUP_S, 5.0))
            now = self.mono()
            pending = [(n, e) for n, e in pending if e > now]
            if not pending and now < next_cleanup:
                continue
            try:
                if conn is None:
                    conn = self._open()
                if pending:
                    nonces = [n for n, _ in pending]
                    now = self.mono()
                    remaining = [e - now for _, e in pending]
                    with conn.transaction():
                        # ids become visible in the order they were given out
                        conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
                        conn.execute(_INSERT, (self.responder, self.origin, nonces, remaining))
                        conn.execute("SELECT pg_notify(%s, '')", (TABLE,))
                    self.stats.written += len(pending)
                    pending = []
                if now >= next_cleanup:
                    conn.execute(f"DELETE FROM {TABLE} WHERE expires_at < clock_timestamp()")
                    next_cleanup = now + CLEANUP_S
                backoff = 0.5
            except Exception as exc:  # keep writing whatever happens; log it
                with contextlib.suppress(Exception):
                    conn.close()
                conn = None
                if stop:
                    self.stats.lost += len(pending)
                    break
                backoff = self._failed("insert", exc, backoff)
                excess = len(pending) - self.max_entries
                if excess > 0:
                    self.stats.lost += excess
                    del pending[:excess]
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _read_loop(self) -> None:
        conn: Any = None
        backoff = 0.5
        while not self._stopping.is_set():
            try:
                if conn is None:
                    conn = self._open()
                    conn.execute(f"LISTEN {TABLE}")
                    self._read_new(conn)  # whatever was written while not listening
                    self.caught_up.set()
                # wake on the first notification, or poll
                for _ in conn.notifies(timeout=self.poll_s, stop_after=1):
                    pass
                self._read_new(conn)
                backoff = 0.5
            except Exception as exc:  # keep following whatever happens; log it
                with contextlib.suppress(Exception):
                    conn.close()
                conn = None
                if self._stopping.is_set():
                    break
                backoff = self._failed("read", exc, backoff)
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _read_new(self, conn: Any) -> None:
        while not self._stopping.is_set():
            rows = conn.execute(_SELECT, (self.origin, self.responder, self.cursor,
                                          5000)).fetchall()
            read_at = self.mono()
            for row_id, mine, nonce, remaining in rows:
                self.cursor = max(self.cursor, int(row_id))
                if mine or not remaining > 0 or len(nonce) != NONCE_SIZE:
                    continue
                # the broker thread is behind: wait for it, never drop
                while len(self._in) >= self.max_entries and not self._stopping.wait(0.05):
                    pass
                self._in.append((bytes(nonce), read_at + min(float(remaining), 86400.0)))
            if len(rows) < 5000:
                return

    def close(self, timeout: float = 3.0) -> None:
        self._stopping.set()
        with contextlib.suppress(queue.Full):
            self._out.put(None, timeout=timeout)
        for thread in self._threads:
            thread.join(timeout)
        self._threads.clear()


# -- the broker's glue -------------------------------------------------------------------


def parse_poll(options: dict[str, str]) -> float:
    raw = options.get("nonce_poll_s")
    if raw is None:
        return 1.0
    try:
        value = float(raw)
        if not 0.05 <= value <= 60 or math.isnan(value):
            raise ValueError
    except ValueError:
        raise ConfigurationError(
            f"plugin_opt_nonce_poll_s: {raw!r} is not seconds in [0.05, 60]") from None
    return value


class NonceSync:
    """What the plugin holds: the cache's ``on_add`` goes to every store, and
    :meth:`tick` feeds the database's rows to the cache (and to the file)."""

    def __init__(self, cache: NonceCache, file: FileStore | None = None,
                 database: PostgresStore | None = None) -> None:
        self.cache = cache
        self.file = file
        self.database = database
        self._metrics: Any = None
        self._exported: dict[tuple[str, str], int] = {}
        if file is not None and database is not None:
            offer_file, offer_db = file.offer, database.offer

            def both(nonce: bytes, expiry: float) -> None:
                offer_file(nonce, expiry)
                offer_db(nonce, expiry)

            cache.on_add = both
        elif file is not None:
            cache.on_add = file.offer
        elif database is not None:
            cache.on_add = database.offer

    @classmethod
    def from_options(cls, options: dict[str, str], cache: NonceCache,
                     responder: str) -> NonceSync | None:
        """From ``plugin_opt_nonce_*``; None if neither store is configured.
        ConfigurationError with one line for a bad value or an unusable store."""
        path = options.get("nonce_file")
        url = options.get("nonce_database")
        poll = parse_poll(options)
        if not path and not url:
            return None
        file = database = None
        if url:
            scheme = urlsplit(url).scheme if "://" in url else ""
            if scheme not in ("postgresql", "postgres"):
                raise ConfigurationError(
                    f"plugin_opt_nonce_database: {redact(url)!r} is not a postgresql:// URL")
            database = PostgresStore(url, responder, max_entries=cache.max_entries,
                                     poll_s=poll)
            database.prepare()
        if path:
            p = Path(path)
            if not p.parent.is_dir():
                raise ConfigurationError(
                    f"plugin_opt_nonce_file: {p}: directory {p.parent} does not exist")
            if p.is_dir():
                raise ConfigurationError(f"plugin_opt_nonce_file: {p} is a directory")
            file = FileStore(p, max_entries=cache.max_entries)
            file.start(cache)
        sync = cls(cache, file, database)
        if database is not None:
            database.start()
        return sync

    def feed(self, now: float, limit: int = FEED_BATCH) -> int:
        """Broker thread, before each msg1: other replicas' nonces read since the last
        call into the cache (at most ``limit``), so that a replay is checked against
        everything the reader has, not what the last tick had. The number the cache did
        not know; an empty queue costs one truth test."""
        db = self.database
        if db is None or not db._in:
            return 0
        fed = 0
        cache, file = self.cache, self.file
        for nonce, expiry in db.take(limit):
            if cache.remember(nonce, expiry, now):
                fed += 1
                if file is not None:
                    file.offer(nonce, expiry)
        db.stats.remembered += fed
        return fed

    def tick(self, now: float) -> int:
        """Broker thread, every tick: :meth:`feed` (at most TICK_BATCH) and the
        metrics."""
        fed = self.feed(now, TICK_BATCH)
        if self._metrics is not None:
            self._export()
        return fed

    def bind_metrics(self, metrics: Any) -> None:
        """Count into ``tessera_nonce_store_total{store, event}`` (a BrokerMetrics)."""
        self._metrics = metrics.registry.counter(
            "tessera_nonce_store_total",
            "msg1 nonce stores: nonces loaded at start and remembered from other "
            "replicas, records written, dropped (queue full), errors, damaged records.",
            ["store", "event"])
        self._export()

    def _export(self) -> None:
        family = self._metrics
        for store in (self.file, self.database):
            if store is None:
                continue
            for event, value in vars(store.stats).items():
                key = (store.name, event)
                last = self._exported.get(key)
                if last is None or value != last:
                    family.labels(store.name, event).inc(value - (last or 0))
                    self._exported[key] = value

    def close(self) -> None:
        """Stop the threads; the file gets what is queued."""
        self.cache.on_add = None
        if self.database is not None:
            self.database.close()
        if self.file is not None:
            self.file.close()
