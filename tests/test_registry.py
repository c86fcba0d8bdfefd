"""provisioning.registry on both backends: a SQLite file and a fresh database on a real
private PostgreSQL server on 127.0.0.1 (the ``registry_url`` fixture runs each test once
per backend).

"Nothing changed" is checked on the raw tables (read with sqlite3 / psycopg directly),
not only through the registry's own API, so a half-written credential that no query of
the API would show still fails the test. Crash safety is proved with real SIGKILLed
child processes at every ``_crash_point`` of registry.py.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from provisioning.registry import DeviceRecord, Registry, RevocationEvent, open_registry
from simulator.postgres import PostgresServer
from simulator.provisioner import free_port
from structauth.errors import ConfigurationError, EnrollmentError, Reason, RegistryError

ROOT = Path(__file__).resolve().parents[1]
T0 = dt.datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)
TABLES = ("schema_version", "devices", "credentials", "revocations", "pending", "counters")


# -- helpers ------------------------------------------------------------------------------
def make_record(serial: str, **overrides: Any) -> DeviceRecord:
    """A TPM-attested device; every value is derived from the serial unless overridden."""
    fields: dict[str, Any] = {
        "serial": serial,
        "identity": f"spiffe://factory.test/device/{serial}",
        "kind": "device",
        # every byte value, so a lossy encoding cannot pass unnoticed
        "public_key_der": bytes(range(256)) + serial.encode(),
        "key_backend": "tpm",
        "attestation": "tpm-attested",
        "ek_fingerprint": hashlib.sha256(f"ek:{serial}".encode()).hexdigest(),
        "device_class": "sensor",
        "status": "active",
        "enrolled_at": T0,
        "updated_at": T0,
        "enrolled_by": "operator-1",
        "enrollment_cert_serial": f"E-{serial}-1",
        "operational_cert_serial": f"O-{serial}-1",
        "operational_not_after": T0 + 30 * DAY,
        "enrollment_not_after": T0 + 3650 * DAY,
    }
    fields.update(overrides)
    return DeviceRecord(**fields)


def second_generation(serial: str, **overrides: Any) -> DeviceRecord:
    """The record a re-enrollment of ``serial`` on the same TPM writes: new key, new certs."""
    values: dict[str, Any] = {
        "public_key_der": b"\x00new-key\xff" + serial.encode(),
        "enrolled_at": T0 + 5 * DAY,
        "updated_at": T0 + 5 * DAY,
        "enrolled_by": "operator-2",
        "enrollment_cert_serial": f"E-{serial}-2",
        "operational_cert_serial": f"O-{serial}-2",
        "operational_not_after": T0 + 35 * DAY,
    }
    values.update(overrides)
    return make_record(serial, **values)


def as_read(record: DeviceRecord) -> DeviceRecord:
    """What the registry gives back: the enrollment expiry lives only on the credential."""
    return dataclasses.replace(record, enrollment_not_after=None)


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite:")


@contextmanager
def raw(url: str) -> Iterator[Any]:
    """A plain driver connection in autocommit mode, bypassing the registry."""
    if is_sqlite(url):
        conn = sqlite3.connect(urlsplit(url).path, isolation_level=None)
        try:
            yield conn
        finally:
            conn.close()
    else:
        import psycopg

        with psycopg.connect(url, autocommit=True) as pg:
            yield pg


def table_names(url: str) -> set[str]:
    with raw(url) as conn:
        if is_sqlite(url):
            rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        else:
            rows = conn.execute(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = 'public'"
            )
        return {r[0] for r in rows.fetchall()}


def dump(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every registry table, as the driver sees it."""
    with raw(url) as conn:
        return {
            t: [tuple(r) for r in conn.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall()]
            for t in TABLES
        }


def state(reg: Registry) -> tuple[Any, ...]:
    """The registry as its API shows it."""
    return reg.list(), reg.revocations(), reg.revoked_cert_serials()


def other_connections(url: str) -> int:
    """PostgreSQL clients of this database other than the asking one."""
    with raw(url) as conn:
        return int(conn.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()[0])


def settle(url: str) -> None:
    """Wait until no other client is connected to a PostgreSQL registry (the backends of
    killed or closed clients have gone, and with them any advisory lock)."""
    if is_sqlite(url):
        return
    deadline = time.monotonic() + 10
    while (others := other_connections(url)) > 0:
        assert time.monotonic() < deadline, f"{others} stale backend(s) still connected"
        time.sleep(0.05)


def assert_no_other_connection(url: str) -> None:
    """No registry connection is left open: on SQLite the last close removes the WAL."""
    if is_sqlite(url):
        assert not Path(urlsplit(url).path + "-wal").exists()
    else:
        assert other_connections(url) == 0


def expect(exc_type: type[Exception], reason: Reason, *fragments: str) -> Callable[..., Any]:
    """Run ``call(*args, **kwargs)`` and check the error's type, reason and message."""

    def check(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Exception:
        with pytest.raises(exc_type) as info:
            call(*args, **kwargs)
        assert info.value.reason == reason  # type: ignore[attr-defined]
        for fragment in fragments:
            assert fragment in str(info.value)
        return info.value

    return check


@pytest.fixture
def reg(registry_url: str) -> Iterator[Registry]:
    with open_registry(registry_url) as registry:
        yield registry


# -- schema and migrations ------------------------------------------------------------------
def test_fresh_open_migrates_and_reopen_is_idempotent(registry_url: str) -> None:
    with open_registry(registry_url) as reg:
        assert reg.schema_version() == 2
        reg.enroll(make_record("pi-0001"))
        assert reg.next_crl_number() == 1
    before = dump(registry_url)
    assert [r[0] for r in before["schema_version"]] == [1, 2]
    assert before["counters"] == [("crl_number", 1)]
    for _ in range(2):
        with open_registry(registry_url) as reg:
            assert reg.schema_version() == 2
            assert reg.list() == [as_read(make_record("pi-0001"))]
        assert dump(registry_url) == before


def test_newer_schema_is_refused_and_left_alone(registry_url: str) -> None:
    with open_registry(registry_url) as reg:
        reg.enroll(make_record("pi-0001"))
    with raw(registry_url) as conn:
        conn.execute("INSERT INTO schema_version (version, applied_at) "
                     "VALUES (99, '2099-01-01T00:00:00.000000Z')")
    before = dump(registry_url)
    refused = expect(RegistryError, Reason.REGISTRY_FAILURE, "newer", "99")
    # keep the error (and so its traceback's frames) alive: the connection must have
    # been closed, not merely dropped for the garbage collector
    exc = refused(open_registry, registry_url)
    assert dump(registry_url) == before
    assert_no_other_connection(registry_url)
    assert exc.__traceback__ is not None


def test_newer_schema_refused_before_creating_any_table(registry_url: str) -> None:
    with raw(registry_url) as conn:
        conn.execute("CREATE TABLE schema_version "
                     "(version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)")
        conn.execute("INSERT INTO schema_version (version, applied_at) "
                     "VALUES (99, '2099-01-01T00:00:00.000000Z')")
    expect(RegistryError, Reason.REGISTRY_FAILURE, "newer")(open_registry, registry_url)
    assert table_names(registry_url) == {"schema_version"}


# -- open_registry URLs -------------------------------------------------------------------
def test_plain_path_and_sqlite_url(tmp_path: Path) -> None:
    plain = tmp_path / "plain.db"
    with open_registry(str(plain)) as reg:
        assert reg.schema_version() == 2
        assert reg.where == str(plain)
        reg.enroll(make_record("pi-0001"))
    assert plain.is_file()
    # the same file through a URL, percent-escapes decoded
    (tmp_path / "with space").mkdir()
    spaced = tmp_path / "with space" / "r.db"
    with open_registry(f"sqlite:///{plain}") as reg:
        assert reg.get("pi-0001") is not None
    with open_registry(f"sqlite:///{str(spaced).replace(' ', '%20')}") as reg:
        assert reg.schema_version() == 2
    assert spaced.is_file()


def test_bad_sqlite_urls_are_refused(tmp_path: Path) -> None:
    refused = expect(ConfigurationError, Reason.BAD_CONFIGURATION)
    exc = refused(open_registry, f"sqlite://localhost{tmp_path}/r.db")
    assert "three slashes" in str(exc)
    for url in ("mysql://user@db.example/tessera", "file:///tmp/r.db", "http://x/r.db"):
        exc = refused(open_registry, url)
        assert url in str(exc) and "postgresql://" in str(exc)
    missing = tmp_path / "no-such-dir" / "r.db"
    for url in (str(missing), f"sqlite:///{missing}"):
        exc = refused(open_registry, url)
        assert "does not exist" in str(exc) and str(missing.parent) in str(exc)
    assert list(tmp_path.iterdir()) == []


def test_unreachable_postgres_names_the_server_but_not_the_password() -> None:
    port = free_port()  # nothing listens there
    for scheme in ("postgresql", "postgres"):
        url = f"{scheme}://tessera:Sup3rSecretPw@127.0.0.1:{port}/registry"
        exc = expect(RegistryError, Reason.REGISTRY_FAILURE)(open_registry, url)
        assert f"postgresql://127.0.0.1:{port}/registry" in str(exc)
        assert "Sup3rSecretPw" not in str(exc)


def test_wrong_postgres_password_is_not_echoed(postgres_server: PostgresServer) -> None:
    url = postgres_server.url().replace(postgres_server.password, "WrongPassw0rd")
    exc = expect(RegistryError, Reason.REGISTRY_FAILURE)(open_registry, url)
    assert "WrongPassw0rd" not in str(exc)
    assert postgres_server.password not in str(exc)


# -- enrollment ----------------------------------------------------------------------------
def test_enroll_round_trips_every_field(reg: Registry) -> None:
    india = dt.timezone(dt.timedelta(hours=5, minutes=30))
    tpm = make_record(
        "pi-0002",
        enrolled_at=T0.astimezone(india),  # stored and read back as UTC
        updated_at=T0 + dt.timedelta(microseconds=1),
    )
    witnessed = make_record(
        "pi-0001", attestation="factory-witnessed", ek_fingerprint=None, key_backend="pkcs11",
        kind="gateway", device_class="gateway", enrolled_by="line-3",
        operational_not_after=None, enrollment_not_after=None,
    )
    assert reg.enroll(tpm) is None
    assert reg.enroll(witnessed) is None

    got = reg.get("pi-0002")
    assert got == as_read(tpm)
    assert got is not None
    assert got.public_key_der == bytes(range(256)) + b"pi-0002"
    for stamp in (got.enrolled_at, got.updated_at, got.operational_not_after):
        assert stamp is not None and stamp.tzinfo is dt.UTC
    assert got.enrolled_at.microsecond == 678901
    assert got.updated_at.microsecond == 678902
    assert reg.get("pi-0001") == as_read(witnessed)
    assert reg.get_by_identity(tpm.identity) == as_read(tpm)
    assert reg.get_by_identity(witnessed.identity) == as_read(witnessed)
    assert reg.get("pi-9999") is None
    assert reg.get_by_identity("spiffe://factory.test/device/pi-9999") is None

    assert reg.list() == [as_read(witnessed), as_read(tpm)]  # ordered by serial
    assert reg.list(status="active") == reg.list()
    assert reg.list(status="revoked") == []
    reg.revoke("pi-0001", reason="lost", by="op", at=T0 + DAY)
    assert [d.serial for d in reg.list(status="active")] == ["pi-0002"]
    assert [d.serial for d in reg.list(status="revoked")] == ["pi-0001"]


def test_duplicate_serial_is_refused_and_nothing_changes(reg: Registry,
                                                         registry_url: str) -> None:
    reg.enroll(make_record("pi-0001"))
    reg.enroll(make_record("pi-0002"))
    reg.revoke("pi-0002", reason="lost", by="op", at=T0 + DAY)
    before, raw_before = state(reg), dump(registry_url)
    refused = expect(EnrollmentError, Reason.ALREADY_ENROLLED, "--reenroll")
    exc = refused(reg.enroll, second_generation("pi-0001", ek_fingerprint="ab" * 32))
    assert "pi-0001" in str(exc)
    exc = refused(reg.enroll, second_generation("pi-0002"))  # revoked still holds the serial
    assert "revoked" in str(exc)
    assert state(reg) == before
    assert dump(registry_url) == raw_before


def test_same_tpm_under_another_serial_is_refused(reg: Registry, registry_url: str) -> None:
    first = make_record("pi-0001")
    reg.enroll(first)
    before, raw_before = state(reg), dump(registry_url)
    exc = expect(EnrollmentError, Reason.ALREADY_ENROLLED, "--reenroll", "pi-0001")(
        reg.enroll, make_record("pi-0002", ek_fingerprint=first.ek_fingerprint)
    )
    assert first.ek_fingerprint is not None and first.ek_fingerprint[:16] in str(exc)
    assert state(reg) == before
    assert dump(registry_url) == raw_before
    # a revoked device's TPM is free again
    reg.revoke("pi-0001", reason="decommissioned", by="op", at=T0 + DAY)
    assert reg.enroll(make_record("pi-0002", ek_fingerprint=first.ek_fingerprint)) is None


def test_reenroll_same_serial_revokes_old_credentials_in_the_same_call(reg: Registry) -> None:
    reg.enroll(make_record("pi-0001"))
    reg.record_renewal("pi-0001", "O-pi-0001-1b", T0 + 60 * DAY, T0 + DAY)
    new = second_generation("pi-0001")
    event = reg.enroll(new, reenroll=True, revoked_by="operator-2")

    assert isinstance(event, RevocationEvent)
    assert event.id == 1
    assert event.serial == "pi-0001"
    assert event.identity == new.identity
    assert set(event.cert_serials) == {"E-pi-0001-1", "O-pi-0001-1", "O-pi-0001-1b"}
    assert len(event.cert_serials) == 3
    assert event.reason == "re-enrolled"
    assert event.revoked_by == "operator-2"
    assert event.revoked_at == new.enrolled_at
    assert reg.revocations() == [event]
    revoked = dict(reg.revoked_cert_serials())
    assert revoked == dict.fromkeys(event.cert_serials, new.enrolled_at)
    assert "E-pi-0001-2" not in revoked and "O-pi-0001-2" not in revoked
    assert reg.get("pi-0001") == as_read(new)
    assert reg.list(status="active") == [as_read(new)]


def test_reenroll_moving_a_tpm_revokes_its_previous_serial(reg: Registry) -> None:
    old = make_record("pi-0001")
    reg.enroll(old)
    reg.enroll(make_record("pi-0003"))
    moved = second_generation("pi-0002", ek_fingerprint=old.ek_fingerprint)
    event = reg.enroll(moved, reenroll=True, revoked_by="op")
    assert event is not None
    assert (event.id, event.serial, event.identity) == (1, "pi-0001", old.identity)
    assert set(event.cert_serials) == {"E-pi-0001-1", "O-pi-0001-1"}
    old_now = reg.get("pi-0001")
    assert old_now is not None and old_now.status == "revoked"
    assert old_now.updated_at == moved.enrolled_at
    assert reg.get("pi-0002") == as_read(moved)
    assert [d.serial for d in reg.list(status="active")] == ["pi-0002", "pi-0003"]
    assert {s for s, _ in reg.revoked_cert_serials()} == {"E-pi-0001-1", "O-pi-0001-1"}
    # reenroll with nothing to replace is a plain enrollment
    assert reg.enroll(make_record("pi-0004"), reenroll=True) is None
    assert len(reg.revocations()) == 1


def test_reenroll_replacing_two_devices_revokes_both(reg: Registry) -> None:
    """A serial moving to a TPM that another serial holds: both old devices go."""
    reg.enroll(make_record("pi-0001"))
    holder = make_record("pi-0002")
    reg.enroll(holder)
    first = reg.enroll(second_generation("pi-0001", ek_fingerprint=holder.ek_fingerprint),
                       reenroll=True)
    assert first is not None and first.serial == "pi-0001"
    assert [(e.id, e.serial) for e in reg.revocations()] == [(1, "pi-0001"), (2, "pi-0002")]
    assert [d.serial for d in reg.list(status="active")] == ["pi-0001"]


def test_registry_errors_roll_back_and_leave_the_registry_usable(reg: Registry,
                                                                 registry_url: str) -> None:
    reg.enroll(make_record("pi-0001"))
    before = dump(registry_url)
    # a certificate serial used twice violates the credentials primary key
    refused = expect(RegistryError, Reason.REGISTRY_FAILURE)
    refused(reg.enroll, make_record("pi-0002", operational_cert_serial="O-pi-0001-1"))
    refused(reg.record_renewal, "pi-0001", "E-pi-0001-1", T0 + 9 * DAY, T0 + DAY)
    assert dump(registry_url) == before
    reg.enroll(make_record("pi-0002"))
    assert [d.serial for d in reg.list()] == ["pi-0001", "pi-0002"]


# -- renewal -------------------------------------------------------------------------------
def test_renewal_replaces_the_operational_credential_without_revoking(reg: Registry) -> None:
    record = make_record("pi-0001")
    reg.enroll(record)
    reg.record_renewal("pi-0001", "O-pi-0001-2", T0 + 60 * DAY, T0 + DAY)
    got = reg.get("pi-0001")
    assert got == dataclasses.replace(
        as_read(record), operational_cert_serial="O-pi-0001-2",
        operational_not_after=T0 + 60 * DAY, updated_at=T0 + DAY,
    )
    assert reg.revoked_cert_serials() == []
    assert reg.revocations() == []
    event = reg.revoke("pi-0001", reason="lost", by="op", at=T0 + 2 * DAY)
    assert set(event.cert_serials) == {"E-pi-0001-1", "O-pi-0001-1", "O-pi-0001-2"}


def test_renewal_of_unknown_or_revoked_device_records_nothing(reg: Registry,
                                                              registry_url: str) -> None:
    reg.enroll(make_record("pi-0001"))
    reg.revoke("pi-0001", reason="stolen", by="op", at=T0 + DAY)
    before, raw_before = state(reg), dump(registry_url)
    expect(EnrollmentError, Reason.NOT_ENROLLED, "pi-0404")(
        reg.record_renewal, "pi-0404", "O-x", T0 + 60 * DAY, T0 + 2 * DAY
    )
    expect(EnrollmentError, Reason.DEVICE_REVOKED, "pi-0001")(
        reg.record_renewal, "pi-0001", "O-refused", T0 + 60 * DAY, T0 + 2 * DAY
    )
    assert state(reg) == before
    assert dump(registry_url) == raw_before
    # had the refused credential been stored, revoking the serial again would list it
    reg.enroll(second_generation("pi-0001"), reenroll=True)
    event = reg.revoke("pi-0001", reason="stolen", by="op", at=T0 + 9 * DAY)
    assert set(event.cert_serials) == {"E-pi-0001-2", "O-pi-0001-2"}
    assert "O-refused" not in {s for s, _ in reg.revoked_cert_serials()}


# -- revocation ----------------------------------------------------------------------------
def test_revoke_records_events_in_order(reg: Registry, registry_url: str) -> None:
    for n in range(1, 5):
        reg.enroll(make_record(f"pi-000{n}"))
    events = [
        reg.revoke(f"pi-000{n}", reason=f"reason-{n}", by=f"op-{n}", at=T0 + n * DAY)
        for n in (3, 1, 4)
    ]
    assert [e.id for e in events] == [1, 2, 3]
    e = events[0]
    assert (e.serial, e.identity, e.reason, e.revoked_by, e.revoked_at) == (
        "pi-0003", make_record("pi-0003").identity, "reason-3", "op-3", T0 + 3 * DAY
    )
    assert set(e.cert_serials) == {"E-pi-0003-1", "O-pi-0003-1"}
    got = reg.get("pi-0003")
    assert got is not None and got.status == "revoked" and got.updated_at == T0 + 3 * DAY
    assert [d.serial for d in reg.list(status="active")] == ["pi-0002"]

    assert reg.revocations() == events
    assert reg.revocations(since_id=1) == events[1:]
    assert reg.revocations(since_id=0, limit=2) == events[:2]
    assert reg.revocations(since_id=2, limit=2) == events[2:]
    assert reg.revocations(since_id=3) == []
    assert all(ev.revoked_at.tzinfo is dt.UTC for ev in reg.revocations())

    before = dump(registry_url)
    expect(EnrollmentError, Reason.DEVICE_REVOKED, "already revoked")(
        reg.revoke, "pi-0003", reason="again", by="op", at=T0 + 9 * DAY
    )
    expect(EnrollmentError, Reason.NOT_ENROLLED, "pi-0404")(
        reg.revoke, "pi-0404", reason="x", by="op", at=T0 + 9 * DAY
    )
    assert dump(registry_url) == before
    assert reg.revoke("pi-0002", reason="r", by="op", at=T0 + 9 * DAY).id == 4


def test_revoked_cert_serials_leave_out_expired_credentials(reg: Registry) -> None:
    reg.enroll(make_record("pi-0001"))  # operational 30 days, enrollment 10 years
    reg.enroll(make_record("pi-0002", enrollment_not_after=None, operational_not_after=None))
    reg.revoke("pi-0001", reason="lost", by="op", at=T0 + DAY)
    reg.revoke("pi-0002", reason="lost", by="op", at=T0 + 2 * DAY)
    everything = reg.revoked_cert_serials()
    assert everything == [
        ("E-pi-0001-1", T0 + DAY), ("O-pi-0001-1", T0 + DAY),
        ("E-pi-0002-1", T0 + 2 * DAY), ("O-pi-0002-1", T0 + 2 * DAY),
    ]
    assert reg.revoked_cert_serials(still_valid_at=T0 + 29 * DAY) == everything
    # expiry is exclusive: a credential whose not_after has come is off the CRL
    assert [s for s, _ in reg.revoked_cert_serials(still_valid_at=T0 + 30 * DAY)] == [
        "E-pi-0001-1", "E-pi-0002-1", "O-pi-0002-1",
    ]
    # no recorded expiry counts as 30 years
    later = reg.revoked_cert_serials(still_valid_at=T0 + 3651 * DAY)
    assert [s for s, _ in later] == ["E-pi-0002-1", "O-pi-0002-1"]
    assert reg.revoked_cert_serials(still_valid_at=T0 + 365 * 31 * DAY) == []


def test_crl_numbers_increase_and_survive_reopen(registry_url: str) -> None:
    with open_registry(registry_url) as reg:
        assert [reg.next_crl_number() for _ in range(3)] == [1, 2, 3]
    with open_registry(registry_url) as reg, open_registry(registry_url) as other:
        assert [reg.next_crl_number(), other.next_crl_number(), reg.next_crl_number()] == [
            4, 5, 6,
        ]


# -- pending multi-step state --------------------------------------------------------------
def test_pending_tokens_are_one_shot_and_expire(reg: Registry) -> None:
    payload = bytes(range(256)) * 3
    reg.put_pending("t-once", payload, T0 + dt.timedelta(minutes=5))
    assert reg.take_pending("t-once", T0) == payload
    assert reg.take_pending("t-once", T0) is None
    assert reg.take_pending("t-unknown", T0) is None

    reg.put_pending("t-expired", b"late", T0 + dt.timedelta(minutes=1))
    assert reg.take_pending("t-expired", T0 + dt.timedelta(minutes=1)) is None  # expiry exact

    reg.put_pending("t-stale", b"stale", T0 + dt.timedelta(minutes=1))
    reg.put_pending("t-fresh", b"fresh", T0 + dt.timedelta(hours=1))
    assert reg.take_pending("t-other", T0 + dt.timedelta(minutes=2)) is None
    # the stale token was purged by that take, even asked about with an earlier clock
    assert reg.take_pending("t-stale", T0) is None
    assert reg.take_pending("t-fresh", T0 + dt.timedelta(minutes=2)) == b"fresh"


# -- naive timestamps -------------------------------------------------------------------------
def test_naive_datetimes_are_refused_and_nothing_is_written(reg: Registry,
                                                            registry_url: str) -> None:
    naive = dt.datetime(2030, 1, 2, 3, 4, 5)
    reg.enroll(make_record("pi-0001"))
    reg.put_pending("t-1", b"x", T0 + DAY)
    before = dump(registry_url)
    attempts: list[Callable[[], object]] = [
        lambda: reg.enroll(make_record("pi-0002", enrolled_at=naive)),
        lambda: reg.enroll(make_record("pi-0002", operational_not_after=naive)),
        lambda: reg.enroll(make_record("pi-0002", enrollment_not_after=naive)),
        # the old device is revoked first in this call; that must be undone too
        lambda: reg.enroll(second_generation("pi-0001", enrollment_not_after=naive),
                           reenroll=True),
        lambda: reg.record_renewal("pi-0001", "O-2", naive, T0),
        lambda: reg.record_renewal("pi-0001", "O-2", T0 + DAY, naive),
        lambda: reg.revoke("pi-0001", reason="r", by="op", at=naive),
        lambda: reg.put_pending("t-2", b"y", naive),
        lambda: reg.take_pending("t-1", naive),
        lambda: reg.revoked_cert_serials(still_valid_at=naive),
    ]
    for attempt in attempts:
        with pytest.raises(ValueError, match="timezone-aware"):
            attempt()
        assert dump(registry_url) == before
    reg.enroll(make_record("pi-0002"))
    assert reg.take_pending("t-1", T0) == b"x"


# -- crash safety ------------------------------------------------------------------------------
_CHILD = textwrap.dedent("""
    import base64, os, pickle, signal, sys
    import provisioning.registry as registry

    url, point, payload = sys.argv[1:]
    method, args, kwargs = pickle.loads(base64.b64decode(payload))
    reg = registry.open_registry(url)

    def crash(name):
        if name == point:
            os.kill(os.getpid(), signal.SIGKILL)

    registry.fault_hook = crash
    getattr(reg, method)(*args, **kwargs)
    print(f"{method} finished without reaching {point}")
""")


def seed(reg: Registry) -> None:
    """pi-0001 active with a renewed credential; pi-0009 revoked (revocation 1)."""
    reg.enroll(make_record("pi-0001"))
    reg.record_renewal("pi-0001", "O-pi-0001-1b", T0 + 60 * DAY, T0 + DAY)
    reg.enroll(make_record("pi-0009"))
    reg.revoke("pi-0009", reason="lost", by="op", at=T0 + 2 * DAY)


def check_reenrolled(reg: Registry) -> None:
    assert reg.get("pi-0001") == as_read(second_generation("pi-0001"))
    last = reg.revocations()[-1]
    assert (last.id, last.serial) == (2, "pi-0001")
    assert set(last.cert_serials) == {"E-pi-0001-1", "O-pi-0001-1", "O-pi-0001-1b"}


def check_moved(reg: Registry) -> None:
    assert reg.get("pi-0002") == as_read(MOVED)
    old = reg.get("pi-0001")
    assert old is not None and old.status == "revoked"
    assert [(e.id, e.serial) for e in reg.revocations()] == [(1, "pi-0009"), (2, "pi-0001")]


def check_enrolled(reg: Registry) -> None:
    assert reg.get("pi-0003") == as_read(make_record("pi-0003"))
    assert len(reg.revocations()) == 1


def check_renewed(reg: Registry) -> None:
    got = reg.get("pi-0001")
    assert got is not None
    assert (got.operational_cert_serial, got.operational_not_after) == (
        "O-pi-0001-2", T0 + 90 * DAY)
    assert len(reg.revoked_cert_serials()) == 2  # only pi-0009's


def check_revoked(reg: Registry) -> None:
    got = reg.get("pi-0001")
    assert got is not None and got.status == "revoked"
    last = reg.revocations()[-1]
    assert (last.id, last.serial, last.reason) == (2, "pi-0001", "stolen")
    assert {"E-pi-0001-1", "O-pi-0001-1", "O-pi-0001-1b"} <= dict(reg.revoked_cert_serials()).keys()


MOVED = second_generation("pi-0002", ek_fingerprint=make_record("pi-0001").ek_fingerprint)
_REENROLL = ("enroll", (second_generation("pi-0001"),), {"reenroll": True, "revoked_by": "op"})
_REVOKE = ("revoke", ("pi-0001",), {"reason": "stolen", "by": "op", "at": T0 + 3 * DAY})
CRASHES = [
    pytest.param("enroll:revoked-previous", _REENROLL, check_reenrolled,
                 id="enroll:revoked-previous"),
    pytest.param("enroll:device-inserted",
                 ("enroll", (MOVED,), {"reenroll": True, "revoked_by": "op"}), check_moved,
                 id="enroll:device-inserted"),
    pytest.param("enroll:before-commit", ("enroll", (make_record("pi-0003"),), {}),
                 check_enrolled, id="enroll:before-commit"),
    pytest.param("renew:credential-inserted",
                 ("record_renewal", ("pi-0001", "O-pi-0001-2", T0 + 90 * DAY, T0 + 3 * DAY),
                  {}),
                 check_renewed, id="renew:credential-inserted"),
    pytest.param("revoke:credentials-marked", _REVOKE, check_revoked,
                 id="revoke:credentials-marked"),
    pytest.param("revoke:before-commit", _REVOKE, check_revoked, id="revoke:before-commit"),
    pytest.param("revoke:credentials-marked", _REENROLL, check_reenrolled,
                 id="reenroll-at-revoke:credentials-marked"),
]


def test_every_crash_point_is_covered() -> None:
    import re

    source = (ROOT / "provisioning" / "registry.py").read_text()
    points = set(re.findall(r'_crash_point\("([^"]+)"\)', source))
    assert points == {p.values[0] for p in CRASHES}


@pytest.mark.parametrize(("point", "operation", "check"), CRASHES)
def test_sigkill_at_crash_point_leaves_no_trace(
    registry_url: str, point: str, operation: tuple[str, tuple[Any, ...], dict[str, Any]],
    check: Callable[[Registry], None],
) -> None:
    with open_registry(registry_url) as reg:
        seed(reg)
        before = state(reg)
    raw_before = dump(registry_url)

    child = subprocess.run(
        [sys.executable, "-c", _CHILD, registry_url, point,
         base64.b64encode(pickle.dumps(operation)).decode()],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=60,
    )
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr

    settle(registry_url)  # PostgreSQL: the killed client's backend has rolled back
    assert dump(registry_url) == raw_before
    with open_registry(registry_url) as reg:
        assert state(reg) == before
        method, args, kwargs = operation
        getattr(reg, method)(*args, **kwargs)
        check(reg)
    with open_registry(registry_url) as reg:  # and it was committed
        check(reg)


# -- concurrency -------------------------------------------------------------------------------
def test_two_connections_see_each_others_writes(registry_url: str) -> None:
    with open_registry(registry_url) as one, open_registry(registry_url) as two:
        for n, reg in enumerate([one, two, one, two], start=1):
            reg.enroll(make_record(f"pi-000{n}"))
        assert [d.serial for d in one.list()] == ["pi-0001", "pi-0002", "pi-0003", "pi-0004"]
        assert one.list() == two.list()
        expect(EnrollmentError, Reason.ALREADY_ENROLLED)(
            two.enroll, make_record("pi-0005", ek_fingerprint=make_record("pi-0001")
                                    .ek_fingerprint))
        assert one.revoke("pi-0002", reason="r", by="op", at=T0).id == 1
        assert two.revoke("pi-0001", reason="r", by="op", at=T0).id == 2
        expect(EnrollmentError, Reason.DEVICE_REVOKED)(
            one.revoke, "pi-0001", reason="r", by="op", at=T0)
        assert one.revocations() == two.revocations()


def test_concurrent_opens_of_a_fresh_registry(registry_url: str) -> None:
    barrier = threading.Barrier(4)
    opened: list[Registry] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        barrier.wait()
        try:
            opened.append(open_registry(registry_url))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert errors == []
        assert [r.schema_version() for r in opened] == [2] * 4
    finally:
        for r in opened:
            r.close()
    raw_now = dump(registry_url)
    assert [r[0] for r in raw_now["schema_version"]] == [1, 2]
    assert raw_now["counters"] == [("crl_number", 0)]


def test_first_sqlite_open_waits_for_another_writer(tmp_path: Path) -> None:
    """Switching a new file to WAL fails at once (no busy wait) while another connection
    writes; the open must wait for it like any other lock, not fail."""
    path = tmp_path / "registry.db"
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("CREATE TABLE unrelated (x)")
    writer.execute("BEGIN IMMEDIATE")
    outcome: list[object] = []

    def open_it() -> None:
        try:
            with open_registry(str(path)) as reg:
                outcome.append(reg.schema_version())
        except BaseException as exc:
            outcome.append(exc)

    opener = threading.Thread(target=open_it)
    opener.start()
    time.sleep(0.3)
    writer.execute("COMMIT")
    writer.close()
    opener.join(60)
    assert outcome == [2]


def test_concurrent_revocations_get_unique_contiguous_ids(registry_url: str) -> None:
    serials = [f"pi-{n:04d}" for n in range(20)]
    with open_registry(registry_url) as reg:
        for serial in serials:
            reg.enroll(make_record(serial))
    barrier = threading.Barrier(2)
    events: list[RevocationEvent] = []
    errors: list[BaseException] = []

    def revoke_all(mine: list[str]) -> None:
        with open_registry(registry_url) as own:
            barrier.wait()
            try:
                for serial in mine:
                    events.append(own.revoke(serial, reason="batch", by="op", at=T0))
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=revoke_all, args=(serials[i::2],)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert sorted(e.id for e in events) == list(range(1, 21))
    with open_registry(registry_url) as reg:
        feed = reg.revocations()
        assert [e.id for e in feed] == list(range(1, 21))
        assert sorted(e.serial for e in feed) == serials
        assert sorted(feed, key=lambda e: e.id) == sorted(events, key=lambda e: e.id)
        assert reg.list(status="active") == []
        assert len(reg.revoked_cert_serials()) == 40
