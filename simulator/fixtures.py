"""pytest plugin: real swtpm and SoftHSM2 instances for tests (``pytest_plugins``).

Fixtures
    swtpm_session   one manufactured swtpm (EK certificates) for the whole run
    swtpm           a fresh manufactured swtpm per test (about a second to set up)
    tpm_backend     a TpmBackend on ``swtpm_session`` with a per-test key directory
    softhsm         one SoftHSM2 directory for the run; sets SOFTHSM2_CONF
    pkcs11_token    a fresh token per test, user PIN in $TESSERA_PKCS11_PIN, yielding a
                    logged-in Pkcs11Backend; the token is deleted afterwards
    postgres_server one private PostgreSQL server on 127.0.0.1 for the run
    registry_url    a fresh empty registry, once on SQLite and once on PostgreSQL

Nothing is skipped: if swtpm or softhsm2-util is missing, the test fails and says how
to install them. Tests using these fixtures get the ``hardware`` marker.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from hw.pkcs11 import DEFAULT_PIN_ENV, Pkcs11Backend, rescan_tokens
from hw.tpm import TpmBackend
from simulator.postgres import PostgresServer
from simulator.softhsm import SoftHsm
from simulator.swtpm import Swtpm
from structauth.errors import ConfigurationError

_OURS = {"swtpm_session", "swtpm", "tpm_backend", "softhsm", "pkcs11_token",
         "postgres_server", "registry_url"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _OURS.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.hardware)


def _start_swtpm() -> Swtpm:
    try:
        return Swtpm().start()
    except ConfigurationError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def swtpm_session() -> Iterator[Swtpm]:
    """A manufactured swtpm shared by the whole test run (do not break its state)."""
    tpm = _start_swtpm()
    try:
        yield tpm
    finally:
        tpm.close()


@pytest.fixture
def swtpm() -> Iterator[Swtpm]:
    """A fresh manufactured swtpm (own EK and local CA) for one test."""
    tpm = _start_swtpm()
    try:
        yield tpm
    finally:
        tpm.close()


@pytest.fixture
def tpm_backend(swtpm_session: Swtpm, tmp_path: Path) -> Iterator[TpmBackend]:
    """A TpmBackend on the shared swtpm; keys go to a per-test directory."""
    backend = TpmBackend(swtpm_session.tcti, tmp_path / "tpm-keys")
    try:
        yield backend
    finally:
        backend.close()


@pytest.fixture(scope="session")
def softhsm() -> Iterator[SoftHsm]:
    """One SoftHSM2 directory for the run; SOFTHSM2_CONF points at it."""
    try:
        hsm = SoftHsm()
    except ConfigurationError as exc:
        pytest.fail(str(exc), pytrace=False)
    previous = os.environ.get("SOFTHSM2_CONF")
    hsm.activate()
    try:
        yield hsm
    finally:
        if previous is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = previous
        hsm.close()


@pytest.fixture
def pkcs11_token(softhsm: SoftHsm, monkeypatch: pytest.MonkeyPatch) -> Iterator[Pkcs11Backend]:
    """A new token with a random user PIN in $TESSERA_PKCS11_PIN, as a logged-in backend."""
    label = f"t-{secrets.token_hex(6)}"
    pin = secrets.token_hex(8)
    softhsm.init_token(label, so_pin=secrets.token_hex(8), user_pin=pin)
    monkeypatch.setenv(DEFAULT_PIN_ENV, pin)
    rescan_tokens(softhsm.module)  # make the new token visible in this process
    backend = Pkcs11Backend(softhsm.module, label)
    try:
        yield backend
    finally:
        backend.close()
        softhsm.delete_token(label)
        rescan_tokens(softhsm.module)  # forget the deleted token's slot


@contextlib.contextmanager
def private_postgres() -> Iterator[PostgresServer]:
    """A private PostgreSQL server (own data directory, free port on 127.0.0.1), stopped
    on leaving; a missing server is the test's failure with the setup hint."""
    try:
        server = PostgresServer().start()
    except ConfigurationError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The session's private PostgreSQL server."""
    with private_postgres() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL for a new, empty registry: the test runs once per backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.create_database()
