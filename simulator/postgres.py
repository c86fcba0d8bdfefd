"""A private PostgreSQL server on 127.0.0.1 for tests and benchmarks.

It uses the Debian ``postgresql`` package's binaries but none of its clusters: a data
directory of its own, a free port, password authentication, a Unix socket inside the
data directory. PostgreSQL refuses to run as root, so under root it runs as the
``postgres`` system user the package creates.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from simulator.provisioner import free_port
from structauth.errors import ConfigurationError

_USER = "tessera"


def _bindir() -> Path:
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2])
    )
    if not found:
        raise ConfigurationError(
            "PostgreSQL is not installed: run ./run setup (apt package postgresql)"
        )
    return Path(found[-1])


class PostgresServer:
    def __init__(self) -> None:
        self.bindir = _bindir()
        # Not under pytest's tmp_path: that is private to root, and the server may be
        # the postgres user.
        self.directory = Path(tempfile.mkdtemp(prefix="tessera-pg-"))
        self.data = self.directory / "data"
        self.port = free_port()
        self.password = secrets.token_hex(12)
        self._as_postgres = os.geteuid() == 0
        self._running = False

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = list(args)
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise ConfigurationError(
                f"{Path(args[0]).name} failed: {(done.stderr or done.stdout).strip()[-400:]}"
            )
        return done

    def start(self) -> PostgresServer:
        if self._as_postgres:
            shutil.chown(self.directory, "postgres", "postgres")
        pwfile = self.directory / "pw"
        pwfile.write_text(self.password + "\n")
        if self._as_postgres:
            shutil.chown(pwfile, "postgres", "postgres")
        pwfile.chmod(0o600)
        self._run(
            str(self.bindir / "initdb"), "-D", str(self.data), "-U", _USER,
            "--auth=scram-sha-256", f"--pwfile={pwfile}", "--encoding=UTF8",
            "--locale=C.UTF-8", "--no-sync",
        )
        pwfile.unlink()
        self._pg_ctl_start()
        return self

    def _pg_ctl_start(self) -> None:
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} "
            f"-c unix_socket_directories={self.data} -c max_connections=50"
        )
        self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l",
            str(self.directory / "server.log"), "-o", options, "-w", "-t", "60", "start",
        )
        self._running = True

    def restart(self, while_down: Callable[[], None] | None = None) -> None:
        """A fast stop (open connections are cut, open transactions rolled back) and a
        start of the same data directory on the same port, like an operator's
        ``pg_ctl restart -m fast``; ``while_down`` is called between the two."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w",
                  "stop")
        self._running = False
        try:
            if while_down is not None:
                while_down()
        finally:  # a failing hook must not leave the server down for the rest
            self._pg_ctl_start()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{_USER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its URL."""
        import psycopg

        name = name or f"t_{secrets.token_hex(6)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self._running:
            self._running = False
            with contextlib.suppress(ConfigurationError):
                self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast",
                          "-w", "stop")
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
