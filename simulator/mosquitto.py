"""A real Mosquitto 2 broker with the Tessera plugin, for tests, benchmarks and demos.

:class:`Mosquitto` owns one directory::

    <dir>/mosquitto.conf   generated configuration (listener on 127.0.0.1, free port)
    <dir>/mosquitto.log    the broker's log (log_type all by default)
    <dir>/mosquitto.out    its stdout and stderr (errors before the log opens, host prints)

The plugin is built on demand (:func:`broker_plugin.build.ensure_built`) and loaded with
``plugin_opt_python`` set to this interpreter, so the broker's host code runs in the same
venv as the tests.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from broker_plugin.build import ensure_built, readable_by, sanitizer_env, sanitizing
from broker_plugin.paths import ConfBounds
from simulator.provisioner import free_port
from structauth.errors import ConfigurationError

__all__ = ["Mosquitto", "find_mosquitto"]

SETUP_HINT = "run the README setup command './run setup' (Debian package mosquitto)"


#: the topic policy the simulators, tests and benchmarks run the plugin with
FLEET_POLICY = """version = 1

[classes.default]
publish   = ["devices/{id}/telemetry/#"]
subscribe = ["devices/{id}/commands/#"]

[brokers]
publish   = ["#"]
subscribe = ["#"]
"""


def plugin_files(
    directory: str | os.PathLike[str],
    *,
    trust_domain: str,
    bundle_pem: bytes | str,
    credential_pem: bytes | str,
    key: str,
    policy: str = FLEET_POLICY,
    **options: str,
) -> dict[str, str]:
    """Write what the Tessera plugin reads (``bundle.pem``, ``broker.pem``,
    ``policy.toml``) into ``directory`` and return the plugin options naming them,
    with ``key`` (a signer spec) and any further ``options``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for name, data in (("bundle.pem", bundle_pem), ("broker.pem", credential_pem),
                       ("policy.toml", policy)):
        (d / name).write_bytes(data.encode() if isinstance(data, str) else data)
    return {
        "trust_domain": trust_domain,
        "bundle": str(d / "bundle.pem"),
        "credential": str(d / "broker.pem"),
        "key": key,
        "policy": str(d / "policy.toml"),
        **options,
    }


def find_mosquitto() -> str:
    """Path of the mosquitto binary (often in /usr/sbin, off a user's PATH)."""
    path = shutil.which("mosquitto", path=os.pathsep.join(
        [os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"]))
    if path is None:
        raise ConfigurationError(f"mosquitto is not installed: {SETUP_HINT}")
    return path


def _run_as_line() -> str:
    """The `user` line. Debian's mosquitto, started as root, drops to user `mosquitto`
    *before* it loads plugins; that user usually cannot read a venv under /root or a
    home directory (nor write the test directory). Test brokers therefore stay the user
    running the tests; a production config must not (`tessera broker config` refuses
    instead, using the same readable_by check)."""
    me = pwd.getpwuid(os.geteuid()).pw_name
    if os.geteuid() != 0:
        return f"user {me}\n"  # not root: mosquitto cannot switch users anyway
    try:
        blocked = readable_by("mosquitto")
    except KeyError:
        blocked = ["(no user named mosquitto)"]
    why = "; ".join(blocked) if blocked else "the test directory is root's"
    return f"# test broker stays root: user mosquitto could not read {why}\nuser root\n"


class Mosquitto:
    """A mosquitto process on 127.0.0.1; a context manager (start ... stop).

    ``plugin_options``: extra ``plugin_opt_*`` values (key without the prefix).
    ``python``: the ``plugin_opt_python`` value (None leaves it out). ``with_plugin``:
    False runs a plain broker (anonymous allowed), e.g. as a baseline. ``bounds``: the
    pre-authentication bounds ``tessera broker config`` writes too (packet size,
    connections, in-flight and queued messages, TCP_NODELAY), for the plain broker as
    well so that both compare alike; ``extra_conf`` comes last and can override them.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        plugin_options: dict[str, str] | None = None,
        extra_conf: str = "",
        with_plugin: bool = True,
        python: str | None = sys.executable,
        log_type: str = "all",
        bounds: ConfBounds | None = None,
    ) -> None:
        self.directory = Path(directory).resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = free_port()
        self.conf_path = self.directory / "mosquitto.conf"
        self.log_path = self.directory / "mosquitto.log"
        self.out_path = self.directory / "mosquitto.out"
        self.binary = find_mosquitto()
        self.plugin = ensure_built() if with_plugin else None
        self.returncode: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self.bounds = bounds if bounds is not None else ConfBounds()

        lines = [
            f"# generated by simulator.mosquitto for {self.directory}\n",
            _run_as_line(),
            "per_listener_settings false\n",
            *(f"{line}\n" for line in self.bounds.global_lines()),
            f"listener {self.port} {self.host}\n",
            *(f"{line}\n" for line in self.bounds.listener_lines()),
            f"allow_anonymous {'false' if with_plugin else 'true'}\n",
            "persistence false\n",
            f"log_dest file {self.log_path}\n",
            *(f"log_type {t}\n" for t in log_type.split()),
            "log_timestamp_format %Y-%m-%dT%H:%M:%S\n",
        ]
        if self.plugin is not None:
            options = dict(plugin_options or {})
            if python is not None:
                options = {"python": python, **options}
            lines.append(f"plugin {self.plugin}\n")
            for key, value in options.items():
                # Mosquitto 2.0 rejects keys shorter than 3 characters and empty values
                if (len(key) < 3 or any(c.isspace() for c in key) or "\n" in value
                        or not value.strip()):
                    raise ValueError(
                        f"plugin option {key!r}={value!r} cannot be written to mosquitto.conf")
                lines.append(f"plugin_opt_{key} {value}\n")
        if extra_conf:
            lines.append(extra_conf if extra_conf.endswith("\n") else extra_conf + "\n")
        self.conf_path.write_text("".join(lines))
        for stale in (self.log_path, self.out_path):
            stale.unlink(missing_ok=True)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> Mosquitto:
        """Start and wait until the listener accepts connections. ConfigurationError with
        the log tail if mosquitto exits first (a plugin that refuses to start, say)."""
        if self.running():
            return self
        out = open(self.out_path, "ab")  # noqa: SIM115 - handed to the child
        env = None
        if self.plugin is not None and sanitizing():
            # the sanitizer variant of the plugin: runtimes preloaded, reports collected
            reports = os.environ.get("TESSERA_SANITIZER_REPORTS") or self.directory / "sanitizer"
            env = {**os.environ, **sanitizer_env(Path(reports))}
        self._proc = subprocess.Popen([self.binary, "-c", str(self.conf_path)],
                                      stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                      env=env)
        out.close()
        self.returncode = None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rc = self._proc.poll()
            if rc is not None:
                self.returncode = rc
                self._proc = None
                raise ConfigurationError(f"mosquitto exited with status {rc}: {self.tail()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.02)
        self.kill()
        raise ConfigurationError(f"mosquitto did not listen within {timeout} s: {self.tail()}")

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (plugin cleanup runs), SIGKILL after `timeout`; the exit status."""
        if self._proc is not None:
            self._proc.terminate()
            try:
                self.returncode = self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self.returncode = self._proc.wait()
            self._proc = None
        return self.returncode

    def kill(self) -> None:
        """SIGKILL: no cleanup, like a power cut."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGKILL)
            self.returncode = self._proc.wait()
            self._proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def reload(self) -> None:
        """SIGHUP: Mosquitto re-reads its configuration and sends MOSQ_EVT_RELOAD."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGHUP)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def output_text(self) -> str:
        return self.out_path.read_text(errors="replace") if self.out_path.exists() else ""

    def tail(self, lines: int = 15) -> str:
        text = (self.log_text() + self.output_text()).strip().splitlines()
        return " | ".join(text[-lines:]) or "(no output)"

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
