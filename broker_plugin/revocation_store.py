"""The broker's revoked set and revocation-feed position, kept across restarts, and the
feed's health (how stale the broker's knowledge of revocations is).

Without this module a broker knew revocations only from memory: restarted while the
provisioning service was down, it let a revoked device reconnect; a feed outage went on
for ever without a limit, a metric or an audit record; the follower's backoff grew to
30 s, so a revocation made as the feed came back took up to that long to cut a session;
and a batch the feed sent twice was audited twice.

Options (``plugin_opt_<name>``; read once at start, with ``provisioner``):

    revocation_file     keep the revoked set and the feed position in this file (JSON,
                        replaced atomically: a new file, ``fsync``, ``rename``, ``fsync``
                        of the directory). Loaded at start, before the listener opens:
                        a revoked device is refused at once after a restart even if the
                        feed is down, and the follower resumes after the last event it
                        had. Put it next to ``nonce_file``.
    revocation_grace_s  how long the feed may be unreachable before the broker's
                        knowledge counts as stale (default 300; 0 .. 604800). The outage
                        is counted from the last answer the feed gave (persisted, so a
                        restart does not reset it); a broker that has never had an
                        answer and has no file is stale from the start.
    revocation_stale    what a stale feed means for a NEW handshake (a CONNECT, or an
                        AUTH re-authentication on a live connection): ``refuse``
                        (default; refused with reason ``revocation_feed_stale``) or
                        ``allow`` (accepted; the alarm is still raised). Live sessions
                        are never cut for staleness: they end at their lifetime
                        (``session_lifetime_s``), and under ``refuse`` cannot renew.

Staleness raises ``tessera_revocation_feed_stale`` to 1 and writes one audit record
``revocation_feed_stale`` when it starts and one ``revocation_feed_restored`` when the
feed answers again (with how long it was stale). ``tessera_revocation_feed_age_seconds``
is the time since the last answer (0 while a long poll is healthy),
``tessera_revocation_feed_errors_total`` counts failed polls, and
``tessera_revocation_events_total`` the events applied.

The follower (:class:`FeedFollower`, a host thread) long-polls ``/v1/revocations``.
After a failure it retries after 0.1 s, doubling to at most :data:`BACKOFF_MAX_S`
(0.5 s; a refused connection to a local service costs microseconds), so that a
revocation made while or as the feed returns reaches the broker within about 0.5 s of
its return, and the broker's next tick cuts the session. Each new event is written to
the file *before* it is handed to the broker thread (a crash in between re-applies it
from the file at the next start); events at or below the feed position are dropped, so
a batch delivered twice applies and audits each event once (``revocation_applied``
carries the event id). The position is the largest event id seen: the feed's ids only
grow (provisioning/registry.py), and a registry rebuilt from scratch needs the file
removed.

Threads: the broker thread never waits on the file or the network. The follower thread
does the IO; :class:`FeedHealth` is a few attributes written by the follower and read
by the broker thread (each read or write of one attribute is atomic under the GIL).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import queue
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker_plugin.file_lock import lock_beside
from structauth.errors import ConfigurationError

log = logging.getLogger("tessera.broker.revocations")

__all__ = [
    "BACKOFF_MAX_S",
    "FeedFollower",
    "FeedHealth",
    "RevocationEvent",
    "RevocationStore",
    "parse_feed_options",
]

#: the follower's retry delay after a failed poll: from BACKOFF_MIN_S, doubling, capped
BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 0.5
#: seconds a long poll waits for new events at the service; the HTTP timeout is longer
LONG_POLL_S = 20.0
#: the first poll at start: answered at once, and the broker waits at most this long
INITIAL_SYNC_TIMEOUT_S = 2.0
#: rewrite the file for the sync time alone at most this often (events: at once)
SYNC_SAVE_S = 30.0
DEFAULT_GRACE_S = 300.0
POLICIES = ("refuse", "allow")
FILE_VERSION = 1


@dataclass(frozen=True)
class RevocationEvent:
    """One event of the feed, as the broker keeps it."""

    id: int
    cert_serials: tuple[str, ...]
    identity: str = ""
    reason: str = "revoked"

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RevocationEvent:
        """From a feed or file entry; ValueError/KeyError/TypeError if malformed."""
        serials = data.get("cert_serials", [])
        if not isinstance(serials, list) or not all(isinstance(s, str) for s in serials):
            raise ValueError("cert_serials is not a list of strings")
        event_id = data["id"]
        if not isinstance(event_id, int) or isinstance(event_id, bool) or event_id < 1:
            raise ValueError(f"event id {event_id!r} is not a positive integer")
        return cls(event_id, tuple(s.lower() for s in serials),
                   str(data.get("identity", "")), str(data.get("reason", "revoked")))

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "cert_serials": list(self.cert_serials),
                "identity": self.identity, "reason": self.reason}


class RevocationStore:
    """The revoked set and feed position; with a path, kept in that file.

    One owner at a time: :meth:`load` at start (the broker thread, before the follower
    starts), then :meth:`accept` and :meth:`synced` on the follower thread only."""

    def __init__(self, path: Path | None, *, fsync: bool = True) -> None:
        self.path = path
        self.fsync = fsync
        self.events: dict[int, RevocationEvent] = {}
        self.since = 0
        #: wall-clock time of the feed's last answer (None: never, as far as we know)
        self.synced_at: float | None = None
        self._saved_at = -math.inf  # monotonic
        self._dirty = False
        #: the last write error (disk full...), for the owner to log; None when saved
        self.write_error: OSError | None = None
        self.damaged: str | None = None
        self._lock_fd: int | None = None

    # -- the file ------------------------------------------------------------------
    def lock(self) -> None:
        """Take ``<file>.lock``; ConfigurationError if another broker holds it."""
        if self.path is None:
            return
        self._lock_fd = lock_beside(self.path, "revocation_file")

    def load(self) -> list[RevocationEvent]:
        """Read the file (if any): the events it holds, oldest first. A damaged file
        is set aside as ``<file>.damaged`` and the store starts empty and never synced
        (``damaged`` says why): the broker then relies on the feed, and counts as stale
        until it answers."""
        if self.path is None:
            return []
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or data.get("version") != FILE_VERSION:
                raise ValueError(f"not a version {FILE_VERSION} revocation file")
            events = [RevocationEvent.from_json(e) for e in data["events"]]
            since = int(data["since"])
            synced = data.get("synced_at")
            synced_at = float(synced) if synced is not None else None
        except (ValueError, KeyError, TypeError) as exc:
            self.damaged = f"{self.path}: {exc}"
            with contextlib.suppress(OSError):
                os.replace(self.path, self.path.with_name(self.path.name + ".damaged"))
            return []
        self.events = {e.id: e for e in events}
        self.since = max([since, *self.events])
        self.synced_at = synced_at
        return sorted(self.events.values(), key=lambda e: e.id)

    def _save(self, now: float) -> None:
        """Write the whole state to a new file, fsync, rename over the old one."""
        if self.path is None:
            self._dirty = False
            return
        body = json.dumps({
            "version": FILE_VERSION, "since": self.since, "synced_at": self.synced_at,
            "events": [e.to_json() for e in sorted(self.events.values(), key=lambda e: e.id)],
        }, separators=(",", ":")).encode()
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(body)
                while view:
                    view = view[os.write(fd, view):]
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            if self.fsync:
                dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        except OSError as exc:  # disk full...: the set is kept in memory, saved later
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            self.write_error = exc
            self._dirty = True
            return
        self.write_error = None
        self._dirty = False
        self._saved_at = now

    # -- the follower's side -------------------------------------------------------
    def accept(self, batch: list[dict[str, Any]], now: float,
               wall_now: float) -> list[RevocationEvent]:
        """A batch from the feed: the events not seen before (id above the position),
        written to the file before they are returned. Malformed entries are skipped
        (logged); the position moves past them all the same."""
        new: list[RevocationEvent] = []
        for item in batch:
            try:
                event = RevocationEvent.from_json(item)
            except (ValueError, KeyError, TypeError) as exc:
                log.error("revocation feed: skipped a malformed event %r: %s", item, exc)
                with contextlib.suppress(TypeError, ValueError, KeyError):
                    self.since = max(self.since, int(item["id"]))
                continue
            if event.id <= self.since or event.id in self.events:
                continue  # delivered before: applied and audited once already
            self.events[event.id] = event
            self.since = event.id
            new.append(event)
        self.synced_at = wall_now
        if new or self._dirty or now - self._saved_at >= SYNC_SAVE_S:
            self._save(now)
        return new

    def close(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = None


@dataclass
class FeedHealth:
    """How current the broker's knowledge of revocations is. The follower thread sets
    ``last_ok``/``failing``/``errors``; the broker thread reads them and owns
    ``alarm``/``alarm_since``."""

    grace_s: float = DEFAULT_GRACE_S
    policy: str = "refuse"
    #: monotonic time of the feed's last answer (None: never)
    last_ok: float | None = None
    #: the last poll failed (or none has succeeded yet)
    failing: bool = True
    errors: int = 0
    last_error: str = ""
    alarm: bool = False
    alarm_since: float = 0.0
    events_applied: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def age(self, now: float) -> float:
        """Seconds the broker has gone without an answer: 0 while healthy (a long poll
        in flight after a good answer), inf if it never had one."""
        if not self.failing:
            return 0.0
        if self.last_ok is None:
            return math.inf
        return max(0.0, now - self.last_ok)

    def stale(self, now: float) -> bool:
        return self.age(now) > self.grace_s

    def refuses(self, now: float) -> bool:
        """A new handshake is refused now (stale under policy ``refuse``)."""
        return self.policy == "refuse" and self.stale(now)


def parse_feed_options(options: dict[str, str]) -> tuple[Path | None, float, str]:
    """(revocation_file, revocation_grace_s, revocation_stale) from ``plugin_opt_*``;
    ConfigurationError with one line naming the option for a bad one."""
    path: Path | None = None
    raw_path = options.get("revocation_file")
    if raw_path:
        path = Path(raw_path)
        if not path.parent.is_dir():
            raise ConfigurationError(
                f"plugin_opt_revocation_file: {path}: directory {path.parent} does not exist")
        if path.is_dir():
            raise ConfigurationError(f"plugin_opt_revocation_file: {path} is a directory")
    grace = DEFAULT_GRACE_S
    raw = options.get("revocation_grace_s")
    if raw is not None:
        try:
            grace = float(raw)
            if not 0 <= grace <= 604800:
                raise ValueError
        except ValueError:
            raise ConfigurationError(
                f"plugin_opt_revocation_grace_s: {raw!r} is not seconds in 0 .. 604800"
            ) from None
    policy = options.get("revocation_stale", "refuse").strip().lower()
    if policy not in POLICIES:
        raise ConfigurationError(
            f"plugin_opt_revocation_stale: {options['revocation_stale']!r} is not "
            "'refuse' or 'allow'")
    if (raw_path or raw is not None or "revocation_stale" in options) \
            and not options.get("provisioner"):
        raise ConfigurationError(
            "plugin_opt_revocation_file/_grace_s/_stale need plugin_opt_provisioner "
            "(the revocation feed to follow)")
    return path, grace, policy


class FeedFollower(threading.Thread):
    """Long-polls the provisioning service's revocation feed from the store's position;
    new events go to the store (file) first, then to ``events`` for the broker thread."""

    def __init__(self, url: str, store: RevocationStore, health: FeedHealth,
                 events: queue.SimpleQueue[RevocationEvent], cafile: str | None = None,
                 *, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        super().__init__(name="tessera-revocations", daemon=True)
        self.url = url.rstrip("/")
        self.store = store
        self.health = health
        self.events = events
        self.stopping = threading.Event()
        self.clock = clock
        self.wall_clock = wall_clock
        self._ctx = ssl.create_default_context(cafile=cafile) if url.startswith("https") \
            else None
        self._logged_at = -math.inf

    @property
    def since(self) -> int:
        return self.store.since

    def poll(self, wait: float, timeout: float) -> int:
        """One request; the number of new events queued. Raises on any failure."""
        with urllib.request.urlopen(
            f"{self.url}/v1/revocations?since={self.store.since}&wait={wait:g}",
            timeout=timeout, context=self._ctx,
        ) as resp:
            batch = json.loads(resp.read())["events"]
        if not isinstance(batch, list):
            raise ValueError("the feed's events are not a list")
        now = self.clock()
        new = self.store.accept(batch, now, self.wall_clock())
        if self.store.write_error is not None:
            log.error("revocation file %s not written (kept in memory, retried): %s",
                      self.store.path, self.store.write_error)
        for event in new:
            self.events.put(event)
        h = self.health
        h.last_ok = now
        if h.failing:
            if h.errors:
                log.warning("revocation feed %s: answering again", self.url)
            h.failing = False
        return len(new)

    def failed(self, exc: BaseException) -> None:
        h = self.health
        h.failing = True
        h.errors += 1
        h.last_error = f"{type(exc).__name__}: {exc}"
        now = self.clock()
        if now - self._logged_at >= 60.0:  # not once per retry (up to 2 a second)
            self._logged_at = now
            log.warning("revocation feed %s: %s (retrying every %.1f s at most)",
                        self.url, h.last_error, BACKOFF_MAX_S)

    def initial_sync(self) -> bool:
        """One immediate poll before the broker opens its listener (at most
        INITIAL_SYNC_TIMEOUT_S): True if the feed answered."""
        try:
            self.poll(0, INITIAL_SYNC_TIMEOUT_S)
            return True
        except Exception as exc:
            self.failed(exc)
            return False

    def run(self) -> None:
        backoff = BACKOFF_MIN_S
        while not self.stopping.is_set():
            try:
                self.poll(LONG_POLL_S, LONG_POLL_S + 10.0)
                backoff = BACKOFF_MIN_S
            except Exception as exc:  # keep following whatever happens
                self.failed(exc)
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)

    def stop(self) -> None:
        self.stopping.set()
