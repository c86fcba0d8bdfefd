"""The device registry: SQLite by default, PostgreSQL when given a URL.

Every enrollment, renewal and revocation is one transaction, so a crash at any point
leaves either no trace or a complete record. Writers are serialised (SQLite's
``BEGIN IMMEDIATE``, a transaction-scoped advisory lock on PostgreSQL): enrollment is
a factory-rate operation, and serial writers make the revocation feed's ids follow
commit order, so a broker reading "events after id N" can never miss one that
committed late with a smaller id.

A PostgreSQL connection that is lost (the server restarted) is replaced at the next
call; a transaction cut before its COMMIT was sent is run again on the new connection
(RECONNECT_ATTEMPTS times, backing off), one cut during its COMMIT is not (it may have
committed) and fails as registry_failure.

The schema lives in ``provisioning/migrations/NNNN_*.sql``; opening a registry applies
the ones it lacks and refuses a registry written by a newer Tessera.
"""

from __future__ import annotations

import base64
import builtins
import datetime as dt
import logging
import re
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar
from urllib.parse import unquote, urlsplit

from structauth.errors import ConfigurationError, EnrollmentError, Reason, RegistryError

log = logging.getLogger("tessera.registry")
MIGRATIONS = Path(__file__).with_name("migrations")
# Arbitrary constant naming "the Tessera registry writer" among advisory locks.
_PG_WRITER_LOCK = 0x7E55E4A
_TS = "%Y-%m-%dT%H:%M:%S.%fZ"

# Crash-injection point for tests (a SIGKILLed child proves all-or-nothing); None in use.
fault_hook: Callable[[str], None] | None = None


def _crash_point(name: str) -> None:
    if fault_hook is not None:
        fault_hook(name)


def _ts(t: dt.datetime) -> str:
    if t.tzinfo is None:
        raise ValueError("registry timestamps must be timezone-aware")
    return t.astimezone(dt.UTC).strftime(_TS)


def _dt(s: str | None) -> dt.datetime | None:
    return None if s is None else dt.datetime.strptime(s, _TS).replace(tzinfo=dt.UTC)


def _dt_required(s: str) -> dt.datetime:
    return dt.datetime.strptime(s, _TS).replace(tzinfo=dt.UTC)


@dataclass(frozen=True)
class DeviceRecord:
    serial: str
    identity: str
    kind: str
    public_key_der: bytes
    key_backend: str
    attestation: str  # "tpm-attested" or "factory-witnessed"
    ek_fingerprint: str | None
    device_class: str
    status: str  # "active" or "revoked"
    enrolled_at: dt.datetime
    updated_at: dt.datetime
    enrolled_by: str
    enrollment_cert_serial: str
    operational_cert_serial: str
    operational_not_after: dt.datetime | None
    enrollment_not_after: dt.datetime | None = None
    #: the attestation key's marshalled TPM2B_PUBLIC, proven by credential activation at
    #: enrollment (TPM-attested devices enrolled with schema version 2 or later)
    ak_public: bytes | None = None


@dataclass(frozen=True)
class RevocationEvent:
    id: int
    serial: str
    identity: str
    cert_serials: tuple[str, ...]
    reason: str
    revoked_at: dt.datetime
    revoked_by: str


_DEVICE_COLUMNS = (
    "serial, identity, kind, public_key, key_backend, attestation, ek_fingerprint, "
    "device_class, status, enrolled_at, updated_at, enrolled_by, enrollment_cert_serial, "
    "operational_cert_serial, operational_not_after, ak_public"
)
_EVENT_COLUMNS = "id, serial, identity, cert_serials, reason, revoked_at, revoked_by"


def _device(row: Sequence[Any]) -> DeviceRecord:
    return DeviceRecord(
        serial=row[0],
        identity=row[1],
        kind=row[2],
        public_key_der=base64.b64decode(row[3]),
        key_backend=row[4],
        attestation=row[5],
        ek_fingerprint=row[6],
        device_class=row[7],
        status=row[8],
        enrolled_at=_dt_required(row[9]),
        updated_at=_dt_required(row[10]),
        enrolled_by=row[11],
        enrollment_cert_serial=row[12],
        operational_cert_serial=row[13],
        operational_not_after=_dt(row[14]),
        ak_public=base64.b64decode(row[15]) if row[15] is not None else None,
    )


def _event(row: Sequence[Any]) -> RevocationEvent:
    return RevocationEvent(
        id=int(row[0]),
        serial=row[1],
        identity=row[2],
        cert_serials=tuple(s for s in row[3].split(",") if s),
        reason=row[4],
        revoked_at=_dt_required(row[5]),
        revoked_by=row[6],
    )


def migrations() -> list[tuple[int, list[str]]]:
    """(version, statements) for every migration file, in order."""
    out = []
    for path in sorted(MIGRATIONS.glob("[0-9][0-9][0-9][0-9]_*.sql")):
        text = "\n".join(
            line for line in path.read_text().splitlines() if not line.lstrip().startswith("--")
        )
        statements = [s.strip() for s in text.split(";") if s.strip()]
        out.append((int(path.name[:4]), statements))
    return out


class _Query:
    """Runs SQL written with ``?`` placeholders on either driver."""

    def __init__(self, conn: Any, postgres: bool) -> None:
        self._conn = conn
        self._postgres = postgres

    def run(self, sql: str, *params: Any) -> Any:
        if self._postgres:
            sql = sql.replace("?", "%s")
        return self._conn.execute(sql, params)

    def one(self, sql: str, *params: Any) -> Any:
        return self.run(sql, *params).fetchone()

    def all(self, sql: str, *params: Any) -> list[Any]:
        return list(self.run(sql, *params).fetchall())


class _ConnectionLost(RegistryError):
    """The PostgreSQL connection was lost; ``retry``: nothing of the transaction can
    have committed, so running it again on a new connection is safe."""

    def __init__(self, detail: str, *, retry: bool) -> None:
        super().__init__(detail, Reason.REGISTRY_FAILURE)
        self.retry = retry


#: a transaction whose connection was lost before it committed is run again on a new
#: connection this many times, RECONNECT_DELAY_S apart doubling (about 6 s in all:
#: long enough for a PostgreSQL restart, short of a client's 30 s timeout)
RECONNECT_ATTEMPTS = 6
RECONNECT_DELAY_S = 0.1

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _reconnecting(fn: Callable[Concatenate[Registry, _P], _R]
                  ) -> Callable[Concatenate[Registry, _P], _R]:
    """Run ``fn`` (one transaction) again after its PostgreSQL connection was lost
    before it could commit, on a new connection, a bounded number of times."""

    def run(self: Registry, /, *args: _P.args, **kw: _P.kwargs) -> _R:
        delay, started = RECONNECT_DELAY_S, time.monotonic()
        for attempt in range(RECONNECT_ATTEMPTS + 1):
            try:
                return fn(self, *args, **kw)
            except _ConnectionLost as exc:
                if not exc.retry:
                    raise
                if attempt == RECONNECT_ATTEMPTS:
                    raise RegistryError(
                        f"{exc.detail}; still failing after {attempt} retries over "
                        f"{time.monotonic() - started:.0f} s, nothing was recorded: check "
                        "that PostgreSQL is running and try again",
                        Reason.REGISTRY_FAILURE) from exc
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    run.__name__, run.__qualname__, run.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
    return run


class Registry:
    """Open with :func:`open_registry`. Not for concurrent use from several threads:
    the service serialises calls (one connection, one lock)."""

    def __init__(self, conn: Any, *, postgres: bool, where: str,
                 reconnect: Callable[[], Any] | None = None) -> None:
        self._conn = conn
        self._reconnect = reconnect
        self._postgres = postgres
        self.where = where
        self._driver_errors: tuple[type[BaseException], ...]
        if postgres:
            import psycopg

            self._driver_errors = (psycopg.Error,)
        else:
            self._driver_errors = (sqlite3.Error,)
        try:
            self._migrate()
        except BaseException:
            self.close()  # a refused or failed open must not leak its connection
            raise

    # -- transactions --------------------------------------------------------------
    def _connection(self) -> Any:
        """The connection, opened anew when the last one was lost (PostgreSQL
        restarted, a network cut): a lost connection is never used again."""
        if self._postgres and self._reconnect is not None and (
                self._conn.closed or self._conn.broken):
            try:
                self._conn = self._reconnect()
            except self._driver_errors as exc:
                first = (str(exc).strip().splitlines() or ["no answer"])[0]
                raise _ConnectionLost(
                    f"registry {self.where} failed: cannot reconnect: {first}",
                    retry=True) from exc
            log.warning("registry %s: reconnected", self.where)
        return self._conn

    @contextmanager
    def _tx(self, *, write: bool = True) -> Iterator[_Query]:
        conn = self._connection()
        q = _Query(conn, self._postgres)
        body_done = False
        try:
            if self._postgres:
                with conn.transaction():
                    if write:
                        q.run("SELECT pg_advisory_xact_lock(?)", _PG_WRITER_LOCK)
                    yield q
                    body_done = True
            else:
                self._conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    yield q
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
        except self._driver_errors as exc:
            detail = f"registry {self.where} failed: {exc}".strip()
            if self._postgres and (conn.closed or conn.broken):
                first = (str(exc).strip().splitlines() or ["connection lost"])[0]
                detail = f"registry {self.where} failed: {first}"
                # Lost before COMMIT was sent: the server rolled the transaction back,
                # so running it again is safe. Lost during COMMIT (a write whose body
                # was done): it may or may not have committed, so it is not run again
                # (the caller is told it failed; the next call reconnects).
                log.warning("registry connection lost (%s): %s", self.where, first)
                raise _ConnectionLost(detail, retry=not (write and body_done)) from exc
            raise RegistryError(detail, Reason.REGISTRY_FAILURE) from exc

    def _migrate(self) -> None:
        known = migrations()
        latest = known[-1][0] if known else 0
        with self._tx() as q:
            q.run(
                "CREATE TABLE IF NOT EXISTS schema_version "
                "(version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
            )
            current = q.one("SELECT COALESCE(MAX(version), 0) FROM schema_version")[0]
            if current > latest:
                raise RegistryError(
                    f"registry {self.where} has schema version {current}, newer than this "
                    f"Tessera understands ({latest}); upgrade Tessera",
                    Reason.REGISTRY_FAILURE,
                )
            now = _ts(dt.datetime.now(dt.UTC))
            for version, statements in known:
                if version <= current:
                    continue
                for statement in statements:
                    q.run(statement)
                q.run("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                      version, now)

    @_reconnecting
    def schema_version(self) -> int:
        with self._tx(write=False) as q:
            return int(q.one("SELECT MAX(version) FROM schema_version")[0])

    # -- devices ---------------------------------------------------------------
    @_reconnecting
    def get(self, serial: str) -> DeviceRecord | None:
        with self._tx(write=False) as q:
            row = q.one(f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE serial = ?", serial)
        return _device(row) if row else None

    @_reconnecting
    def get_by_identity(self, identity: str) -> DeviceRecord | None:
        with self._tx(write=False) as q:
            row = q.one(f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE identity = ?", identity)
        return _device(row) if row else None

    @_reconnecting
    def list(self, status: str | None = None) -> list[DeviceRecord]:
        with self._tx(write=False) as q:
            if status is None:
                rows = q.all(f"SELECT {_DEVICE_COLUMNS} FROM devices ORDER BY serial")
            else:
                rows = q.all(
                    f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE status = ? ORDER BY serial",
                    status,
                )
        return [_device(r) for r in rows]

    @_reconnecting
    def attestation_keys(self) -> dict[str, bytes]:
        """serial -> AK TPM2B_PUBLIC of every active device (kind ``device``) enrolled
        with one: what brokers check step-up quotes against, read in one snapshot."""
        with self._tx(write=False) as q:
            rows = q.all(
                "SELECT serial, ak_public FROM devices WHERE status = 'active' AND "
                "kind = 'device' AND ak_public IS NOT NULL ORDER BY serial"
            )
        return {r[0]: base64.b64decode(r[1]) for r in rows}

    @_reconnecting
    def enroll(
        self, record: DeviceRecord, *, reenroll: bool = False, revoked_by: str = ""
    ) -> RevocationEvent | None:
        """Record a new device and its two credentials. A device already holding this
        serial or this TPM (EK) is refused unless ``reenroll``, which revokes it in
        the same transaction and returns that revocation."""
        with self._tx() as q:
            same_serial = q.one("SELECT status FROM devices WHERE serial = ?", record.serial)
            same_ek = None
            if record.ek_fingerprint is not None:
                row = q.one(
                    "SELECT serial FROM devices WHERE ek_fingerprint = ? AND status = 'active'",
                    record.ek_fingerprint,
                )
                same_ek = row[0] if row else None
            if not reenroll:
                if same_serial is not None:
                    raise EnrollmentError(
                        f"device {record.serial} is already enrolled ({same_serial[0]}); use "
                        "--reenroll to replace it (this revokes its current credentials)",
                        Reason.ALREADY_ENROLLED,
                    )
                if same_ek is not None:
                    raise EnrollmentError(
                        f"this TPM (EK {(record.ek_fingerprint or '')[:16]}...) is already "
                        f"enrolled as device {same_ek}; use --reenroll to move it "
                        f"(this revokes {same_ek})",
                        Reason.ALREADY_ENROLLED,
                    )
            first: RevocationEvent | None = None
            for old in dict.fromkeys(
                s for s in (record.serial if same_serial else None, same_ek) if s
            ):
                event = self._revoke(q, old, "re-enrolled", revoked_by, record.enrolled_at)
                first = first or event
            _crash_point("enroll:revoked-previous")
            q.run("DELETE FROM devices WHERE serial = ?", record.serial)
            q.run(
                f"INSERT INTO devices ({_DEVICE_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                record.serial,
                record.identity,
                record.kind,
                base64.b64encode(record.public_key_der).decode(),
                record.key_backend,
                record.attestation,
                record.ek_fingerprint,
                record.device_class,
                record.status,
                _ts(record.enrolled_at),
                _ts(record.updated_at),
                record.enrolled_by,
                record.enrollment_cert_serial,
                record.operational_cert_serial,
                _ts(record.operational_not_after) if record.operational_not_after else None,
                base64.b64encode(record.ak_public).decode() if record.ak_public else None,
            )
            _crash_point("enroll:device-inserted")
            far = record.enrolled_at + dt.timedelta(days=365 * 30)
            self._credential(q, record.enrollment_cert_serial, record.serial, "enrollment",
                             record.enrolled_at, record.enrollment_not_after or far)
            self._credential(q, record.operational_cert_serial, record.serial, "operational",
                             record.enrolled_at, record.operational_not_after or far)
            _crash_point("enroll:before-commit")
        return first

    @staticmethod
    def _credential(
        q: _Query, cert_serial: str, device: str, profile: str, at: dt.datetime,
        not_after: dt.datetime,
    ) -> None:
        q.run(
            "INSERT INTO credentials (cert_serial, device_serial, profile, issued_at, "
            "not_after, revoked_at) VALUES (?, ?, ?, ?, ?, NULL)",
            cert_serial, device, profile, _ts(at), _ts(not_after),
        )

    @_reconnecting
    def record_renewal(
        self, serial: str, cert_serial: str, not_after: dt.datetime, at: dt.datetime
    ) -> None:
        """Record a fresh operational credential; refused for a device that is not
        (or no longer) active, so a renewal racing a revocation never wins."""
        with self._tx() as q:
            row = q.one("SELECT status FROM devices WHERE serial = ?", serial)
            if row is None:
                raise EnrollmentError(f"device {serial} is not enrolled", Reason.NOT_ENROLLED)
            if row[0] != "active":
                raise EnrollmentError(f"device {serial} is revoked", Reason.DEVICE_REVOKED)
            self._credential(q, cert_serial, serial, "operational", at, not_after)
            _crash_point("renew:credential-inserted")
            q.run(
                "UPDATE devices SET operational_cert_serial = ?, operational_not_after = ?, "
                "updated_at = ? WHERE serial = ?",
                cert_serial, _ts(not_after), _ts(at), serial,
            )

    # -- revocation ------------------------------------------------------------------
    @_reconnecting
    def revoke(self, serial: str, *, reason: str, by: str, at: dt.datetime) -> RevocationEvent:
        with self._tx() as q:
            event = self._revoke(q, serial, reason, by, at)
            if event is None:
                raise EnrollmentError(
                    f"device {serial} is already revoked", Reason.DEVICE_REVOKED
                )
            _crash_point("revoke:before-commit")
        return event

    def _revoke(
        self, q: _Query, serial: str, reason: str, by: str, at: dt.datetime
    ) -> RevocationEvent | None:
        row = q.one("SELECT identity, status FROM devices WHERE serial = ?", serial)
        if row is None:
            raise EnrollmentError(f"device {serial} is not enrolled", Reason.NOT_ENROLLED)
        identity, status = row
        if status != "active":
            return None
        certs = tuple(
            r[0]
            for r in q.all(
                "SELECT cert_serial FROM credentials WHERE device_serial = ? AND revoked_at "
                "IS NULL ORDER BY issued_at, cert_serial",
                serial,
            )
        )
        q.run(
            "UPDATE credentials SET revoked_at = ? WHERE device_serial = ? AND revoked_at IS NULL",
            _ts(at), serial,
        )
        _crash_point("revoke:credentials-marked")
        q.run("UPDATE devices SET status = 'revoked', updated_at = ? WHERE serial = ?",
              _ts(at), serial)
        event_id = int(q.one("SELECT COALESCE(MAX(id), 0) + 1 FROM revocations")[0])
        q.run(
            f"INSERT INTO revocations ({_EVENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
            event_id, serial, identity, ",".join(certs), reason, _ts(at), by,
        )
        return RevocationEvent(event_id, serial, identity, certs, reason, at, by)

    @_reconnecting
    def revocations(self, since_id: int = 0, limit: int = 1000) -> builtins.list[RevocationEvent]:
        """Events with an id above ``since_id``, oldest first."""
        with self._tx(write=False) as q:
            rows = q.all(
                f"SELECT {_EVENT_COLUMNS} FROM revocations WHERE id > ? ORDER BY id LIMIT ?",
                since_id, limit,
            )
        return [_event(r) for r in rows]

    @_reconnecting
    def revoked_cert_serials(
        self, still_valid_at: dt.datetime | None = None
    ) -> builtins.list[tuple[str, dt.datetime]]:
        """(certificate serial in hex, revocation time) of every revoked credential;
        with ``still_valid_at``, only those that have not expired by then (an expired
        credential needs no CRL entry)."""
        with self._tx(write=False) as q:
            if still_valid_at is None:
                rows = q.all(
                    "SELECT cert_serial, revoked_at FROM credentials WHERE revoked_at IS NOT "
                    "NULL ORDER BY revoked_at, cert_serial"
                )
            else:
                rows = q.all(
                    "SELECT cert_serial, revoked_at FROM credentials WHERE revoked_at IS NOT "
                    "NULL AND not_after > ? ORDER BY revoked_at, cert_serial",
                    _ts(still_valid_at),
                )
        return [(r[0], _dt_required(r[1])) for r in rows]

    @_reconnecting
    def next_crl_number(self) -> int:
        with self._tx() as q:
            q.run("UPDATE counters SET value = value + 1 WHERE name = 'crl_number'")
            return int(q.one("SELECT value FROM counters WHERE name = 'crl_number'")[0])

    # -- pending multi-step state ----------------------------------------------------
    @_reconnecting
    def put_pending(self, token: str, payload: bytes, expires_at: dt.datetime) -> None:
        with self._tx() as q:
            q.run("INSERT INTO pending (token, payload, expires_at) VALUES (?, ?, ?)",
                  token, base64.b64encode(payload).decode(), _ts(expires_at))

    @_reconnecting
    def take_pending(self, token: str, now: dt.datetime) -> bytes | None:
        """The payload stored under ``token`` if it has not expired; either way the
        token is gone afterwards (one use), and so is every expired one."""
        with self._tx() as q:
            row = q.one("SELECT payload, expires_at FROM pending WHERE token = ?", token)
            q.run("DELETE FROM pending WHERE token = ? OR expires_at <= ?", token, _ts(now))
        if row is None or _dt_required(row[1]) <= now:
            return None
        return base64.b64decode(row[0])

    @_reconnecting
    def purge_pending(self, now: dt.datetime) -> int:
        """Delete every expired pending row (the service calls this on a timer, so
        abandoned steps do not pile up until someone takes one); how many went."""
        with self._tx() as q:
            return int(q.run("DELETE FROM pending WHERE expires_at <= ?", _ts(now)).rowcount)

    @_reconnecting
    def count_pending(self) -> int:
        """Pending rows, expired or not (what the service caps)."""
        with self._tx(write=False) as q:
            return int(q.one("SELECT COUNT(*) FROM pending")[0])

    def close(self) -> None:
        with suppress(*self._driver_errors):
            self._conn.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def open_registry(url: str) -> Registry:
    """``sqlite:///abs/path.db`` (or a plain path) or ``postgresql://user@host/db``."""
    if url.startswith(("postgresql://", "postgres://")):
        return _open_postgres(url)
    if url.startswith("sqlite://"):
        parts = urlsplit(url)
        if parts.netloc:
            raise ConfigurationError(
                f"registry URL {url!r}: use sqlite:///absolute/path.db (three slashes)"
            )
        path = unquote(parts.path)
    elif _SCHEME.match(url):
        raise ConfigurationError(
            f"registry URL {url!r}: expected sqlite:///path.db or postgresql://..."
        )
    else:
        path = url
    return _open_sqlite(path)


def _open_sqlite(path: str) -> Registry:
    if path != ":memory:" and not Path(path).parent.is_dir():
        raise ConfigurationError(f"registry {path}: directory {Path(path).parent} does not exist")
    conn = None
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        # Switching a new file to WAL takes an exclusive lock, and SQLite reports another
        # opener's lock at once instead of waiting for it: retry, as the busy timeout would.
        deadline = time.monotonic() + 30
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        # FULL: a committed enrollment survives a power cut, not just a process crash.
        conn.execute("PRAGMA synchronous = FULL")
    except sqlite3.Error as exc:
        if conn is not None:
            conn.close()
        raise RegistryError(f"cannot open registry {path}: {exc}", Reason.REGISTRY_FAILURE) from exc
    return Registry(conn, postgres=False, where=path)


def _open_postgres(url: str) -> Registry:
    import psycopg

    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    where = f"postgresql://{parts.hostname or ''}{port}{parts.path}"  # no password in logs

    def connect() -> Any:
        return psycopg.connect(url, autocommit=True, connect_timeout=10)

    try:
        conn = connect()
    except psycopg.Error as exc:
        raise RegistryError(
            f"cannot connect to registry {where}: {str(exc).strip()}", Reason.REGISTRY_FAILURE
        ) from exc
    return Registry(conn, postgres=True, where=where, reconnect=connect)
