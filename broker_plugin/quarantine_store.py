"""Quarantines shared by the replicas of one broker identity (a fleet behind one name).

The enforcer quarantines an identity for ``quarantine_s`` after repeated failed step-ups
or a flood of rejected messages (broker_plugin/enforcer.py); that lived in one broker's
memory, so a device quarantined at one replica could log in at another behind the same
proxy, and a restart forgot it. With ``plugin_opt_quarantine_database`` (a
``postgresql://`` URL, the one the nonces use is fine) each replica:

- writes every quarantine it decides into the table ``broker_quarantine`` (created if
  missing): identity, the broker identity, a random name of this process (``origin``)
  and the end as the database server's ``clock_timestamp() + remaining`` (replicas'
  wall clocks do not matter);
- reads the other replicas' rows every ``QUARANTINE_POLL_S`` (0.25 s) and at start (a
  restarted broker gets the live quarantines back), and enters each into its own
  enforcer with the remaining time: a new handshake of that identity is then refused
  (``not_authorized``, "quarantined") at every replica, and an audit record
  ``quarantined`` with ``cause`` ``replica`` names where it came from.

Outstanding step-up challenges travel the same way: when a device leaves a replica
with a step-up request unanswered (it was asked, then disconnected or was kicked at the
deadline), that replica writes a row with ``cause`` ``step_up:<trigger>:<quote>:
<blocking>`` lasting as long as the challenge would (its reconnect window); a replica
that then sees the identity log in asks it to step up at once (audit
``step_up_requested``, detail "outstanding at another replica"), as the first replica
would have on a reconnection without the answer. Without this a device could shed a
challenge by reconnecting through the proxy to another replica.

A live session of the identity at another replica is not cut by a remote quarantine
(the device would have to hold two connections at once); an operator's early release
(``enforcer.release``) is local. Threads: the broker thread only compares the enforcer's
quarantine table with what it has seen (at most every 100 ms, a dict of the quarantined
identities) and hands over entries through queues; two host threads do the database
IO and survive outages (logged at most once a minute, retried; meanwhile each replica
keeps its own quarantines).
"""

from __future__ import annotations

import logging
import math
import queue
import secrets
import threading
import time
from typing import Any

from structauth.errors import ConfigurationError

log = logging.getLogger("tessera.broker.quarantine")

TABLE = "broker_quarantine"
QUARANTINE_POLL_S = 0.25
CHECK_S = 0.1


def _redact(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


class QuarantineShare:
    def __init__(self, url: str, responder: str, *, poll_s: float = QUARANTINE_POLL_S) -> None:
        self.url = url
        self.responder = responder
        self.origin = secrets.token_hex(8)
        self.poll_s = poll_s
        self._out: queue.SimpleQueue[tuple[str, float, str] | None] = queue.SimpleQueue()
        self._in: queue.SimpleQueue[tuple[str, float, str]] = queue.SimpleQueue()
        self._known: dict[str, float] = {}  # identity -> monotonic end, as last seen
        #: identity -> (monotonic end, trigger, quote, blocking): challenges owed elsewhere
        self.owed: dict[str, tuple[float, str, bool, bool]] = {}
        self._offered: set[bytes] = set()  # nonces of challenges written already
        self.asked = 0  # challenges owed elsewhere asked here
        self._next_check = 0.0
        self._stop = threading.Event()
        self._last_id = 0
        self._logged_at = -math.inf
        self.errors = 0
        self.shared = 0  # written
        self.received = 0  # entered from other replicas
        self._threads: list[threading.Thread] = []

    @classmethod
    def from_options(cls, options: dict[str, str], responder: str) -> QuarantineShare | None:
        url = options.get("quarantine_database")
        if not url:
            return None
        if not url.startswith(("postgresql://", "postgres://")):
            raise ConfigurationError(
                f"plugin_opt_quarantine_database: {_redact(url)!r} is not a postgresql:// URL")
        share = cls(url, responder)
        share.prepare()
        return share

    def _connect(self) -> Any:
        import psycopg

        return psycopg.connect(self.url, autocommit=True, connect_timeout=5)

    def prepare(self) -> None:
        """Create the table (serialised between replicas starting together); one error
        line if the database cannot be reached at start."""
        try:
            with self._connect() as conn:
                conn.execute("SELECT pg_advisory_lock(7460251)")
                try:
                    conn.execute(
                        f"CREATE TABLE IF NOT EXISTS {TABLE} (id bigserial PRIMARY KEY, "
                        "responder text NOT NULL, origin text NOT NULL, identity text NOT "
                        "NULL, until timestamptz NOT NULL, cause text NOT NULL)")
                finally:
                    conn.execute("SELECT pg_advisory_unlock(7460251)")
        except Exception as exc:
            raise ConfigurationError(
                f"plugin_opt_quarantine_database {_redact(self.url)}: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc}") from None

    def start(self) -> None:
        for target, name in ((self._writer, "tessera-quarantine-w"),
                             (self._reader, "tessera-quarantine-r")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def close(self) -> None:
        self._stop.set()
        self._out.put(None)

    def _failed(self, exc: BaseException) -> None:
        self.errors += 1
        now = time.monotonic()
        if now - self._logged_at >= 60:
            self._logged_at = now
            log.warning("quarantine database %s: %s (retrying)", _redact(self.url), exc)

    # -- host threads ------------------------------------------------------------------
    def _writer(self) -> None:
        conn: Any = None
        while not self._stop.is_set():
            item = self._out.get()
            if item is None:
                break
            while not self._stop.is_set():
                try:
                    if conn is None:
                        conn = self._connect()
                    identity, remaining, cause = item
                    conn.execute(
                        f"INSERT INTO {TABLE} (responder, origin, identity, until, cause) "
                        "VALUES (%s, %s, %s, clock_timestamp() + %s * interval '1 second', %s)",
                        (self.responder, self.origin, identity, remaining, cause))
                    conn.execute(f"DELETE FROM {TABLE} WHERE until < clock_timestamp() "
                                 "- interval '1 minute'")
                    self.shared += 1
                    break
                except Exception as exc:
                    self._failed(exc)
                    conn = None
                    self._stop.wait(1.0)
        if conn is not None:
            conn.close()

    def _reader(self) -> None:
        conn: Any = None
        while not self._stop.is_set():
            try:
                if conn is None:
                    conn = self._connect()
                rows = conn.execute(
                    f"SELECT id, identity, origin, EXTRACT(EPOCH FROM until - "
                    f"clock_timestamp()), cause FROM {TABLE} WHERE id > %s AND responder = %s "
                    "ORDER BY id", (self._last_id, self.responder)).fetchall()
                for row_id, identity, origin, remaining, cause in rows:
                    self._last_id = max(self._last_id, int(row_id))
                    if origin != self.origin and float(remaining) > 0:
                        self._in.put((identity, float(remaining), f"{origin} {cause}"))
            except Exception as exc:
                self._failed(exc)
                conn = None
            self._stop.wait(self.poll_s)
        if conn is not None:
            conn.close()

    # -- the broker thread -------------------------------------------------------------
    def tick(self, enforcer: Any, now: float) -> None:
        """Enter the other replicas' quarantines; offer the ones decided here."""
        if now < self._next_check:
            return
        self._next_check = now + CHECK_S
        table: dict[str, float] = enforcer.quarantined
        while True:
            try:
                identity, remaining, origin = self._in.get_nowait()
            except queue.Empty:
                break
            until = now + remaining
            origin, _, cause = origin.partition(" ")
            if cause.startswith("step_up:"):
                _, trigger, quote, blocking = [*cause.split(":"), "", "", ""][:4]
                self.owed[identity] = (until, trigger, quote == "1", blocking == "1")
                continue
            if table.get(identity, -math.inf) >= until:
                continue
            table[identity] = until
            self._known[identity] = until
            self.received += 1
            enforcer.audit("quarantined", client_id=identity, identity=identity,
                           cause="replica", origin=origin, quarantine_s=round(remaining, 1))
            if enforcer.metrics is not None:
                enforcer.metrics.quarantined_devices.set(len(table))
        for identity, until in table.items():
            if self._known.get(identity) != until:
                self._known[identity] = until
                if until > now:
                    self._out.put((identity, until - now, "quarantined"))
        self._challenges(enforcer, now)
        if len(self._known) > len(table):  # released here: forget them
            for identity in [i for i in self._known if i not in table]:
                del self._known[identity]

    def _challenges(self, enforcer: Any, now: float) -> None:
        """Offer the challenges devices left unanswered here; ask the ones owed
        elsewhere of devices that logged in here."""
        clients = enforcer.clients
        for uri, challenge in enforcer.challenges.items():
            if uri in clients or challenge.nonce in self._offered or challenge.expires <= now:
                continue
            self._offered.add(challenge.nonce)
            self._out.put((uri, challenge.expires - now,
                           f"step_up:{challenge.trigger}:{int(challenge.quote)}:"
                           f"{int(challenge.blocking)}"))
        if len(self._offered) > 10_000:  # old nonces: their challenges are long gone
            self._offered.clear()
        for uri in list(self.owed):
            until, trigger, quote, blocking = self.owed[uri]
            if until <= now:
                del self.owed[uri]
                continue
            client = clients.get(uri)
            if client is None:
                continue
            del self.owed[uri]
            if uri in enforcer.challenges:  # asked here already
                continue
            # the enforcer's own way to ask (broker_plugin/enforcer.py), as it does for
            # a reconnection that comes without the answer
            enforcer._request(client, trigger, quote, now, blocking=blocking,
                              detail="outstanding at another replica")
            self.asked += 1
