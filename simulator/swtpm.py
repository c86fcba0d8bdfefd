"""swtpm lifecycle: a software TPM 2.0 with EK certificates from a private local CA.

:class:`Swtpm` owns one directory::

    <dir>/tpm/          TPM state (NV, seeds, persistent objects)
    <dir>/ca/           the local "TPM manufacturer" CA of swtpm_localca
    <dir>/ca.conf       swtpm_localca configuration
    <dir>/setup.conf    swtpm_setup configuration
    <dir>/swtpm.pid     pid of the running swtpm
    <dir>/swtpm.port    its TCP server port (the control port is the next one), kept
                        after a stop: the next start takes the same port if it is free
    <dir>/swtpm.log     swtpm's log

The first start "manufactures" the TPM with ``swtpm_setup`` (EK key pairs, an EK
certificate for the RSA and the ECC P-384 EK, a platform certificate, NV locked),
which takes about a second; later starts reuse the state, so keys wrapped by this TPM
survive a restart. ``ek_certs=False`` skips manufacturing: swtpm then starts from an
empty state in milliseconds (no EK certificate), which suits tests that only need a
TPM.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from structauth.errors import ConfigurationError, KeyBackendError, Reason

__all__ = ["Swtpm", "find_swtpm_tools", "port_pair_free"]

SETUP_HINT = "run the README setup command './run setup' (Debian packages swtpm, swtpm-tools)"
_LOCALCA_OPTIONS = Path("/etc/swtpm-localca.options")
_START_ATTEMPTS = 10
_WAIT_SECONDS = 10.0


def find_swtpm_tools() -> dict[str, str]:
    """Paths of swtpm, swtpm_setup and swtpm_localca; ConfigurationError if missing."""
    tools = {}
    for name in ("swtpm", "swtpm_setup", "swtpm_localca"):
        path = shutil.which(name)
        if path is None:
            raise ConfigurationError(f"{name} is not installed: {SETUP_HINT}")
        tools[name] = path
    return tools


def _port_pair(host: str) -> int:
    """A port P such that P and P+1 were both free a moment ago."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as first:
            first.bind((host, 0))
            port = first.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as second:
                try:
                    second.bind((host, port + 1))
                except OSError:
                    continue
            return int(port)
    raise KeyBackendError(f"found no free pair of TCP ports on {host}", Reason.BACKEND_UNAVAILABLE)


def port_pair_free(host: str, port: int) -> bool:
    """Whether swtpm could listen on ``port`` and its control port ``port + 1`` now.

    SO_REUSEADDR as swtpm sets it: connections of an earlier swtpm in TIME_WAIT do not
    count, a socket listening on either port does.
    """
    if not 1 <= port <= 65534:
        return False
    for candidate in (port, port + 1):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, candidate))
            except OSError:
                return False
    return True


def _process_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    # a zombie (state Z) has exited; its parent (init, after --daemon) has not reaped it yet
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _is_our_swtpm(pid: int, state: Path) -> bool:
    """True only for a swtpm process serving ``state``: never signal a recycled pid."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return (
        bool(argv)
        and os.path.basename(argv[0]) == b"swtpm"
        and any(str(state).encode() in arg for arg in argv)
    )


class Swtpm:
    """A swtpm TPM 2.0 listening on 127.0.0.1; a context manager (start ... stop).

    ``directory``: where state lives (default: a new temporary directory, deleted by
    :meth:`close`). ``ek_certs``: manufacture with EK certificates (default).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        ek_certs: bool = True,
        host: str = "127.0.0.1",
    ) -> None:
        self.tools = find_swtpm_tools()
        self._owns_dir = directory is None
        self.directory = Path(
            tempfile.mkdtemp(prefix="tessera-swtpm-") if directory is None else directory
        ).resolve()
        self.ek_certs = ek_certs
        self.host = host
        self.state_dir = self.directory / "tpm"
        self.ca_dir = self.directory / "ca"
        self.pid_file = self.directory / "swtpm.pid"
        self.port_file = self.directory / "swtpm.port"
        self.log_file = self.directory / "swtpm.log"
        self.port: int | None = None
        self.pid: int | None = None
        self._attach()

    # -- properties -----------------------------------------------------------------

    @property
    def tcti(self) -> str:
        if self.port is None:
            raise KeyBackendError("swtpm is not running; call start()", Reason.BACKEND_UNAVAILABLE)
        return f"swtpm:host={self.host},port={self.port}"

    @property
    def ctrl_port(self) -> int | None:
        return None if self.port is None else self.port + 1

    @property
    def manufacturer_ca_paths(self) -> tuple[Path, Path]:
        """(root CA certificate, intermediate "issuer" certificate) that sign the EK cert."""
        paths = (self.ca_dir / "swtpm-localca-rootca-cert.pem", self.ca_dir / "issuercert.pem")
        if not all(p.exists() for p in paths):
            raise ConfigurationError(
                f"swtpm in {self.directory} has no local CA (manufactured with ek_certs=False "
                "or not yet started)"
            )
        return paths

    @property
    def recorded_port(self) -> int | None:
        """The server port of the last start on this directory (``swtpm.port``), if any."""
        try:
            port = int(self.port_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return port if 1 <= port <= 65534 else None

    @property
    def manufactured(self) -> bool:
        return (self.state_dir / "tpm2-00.permall").exists()

    @property
    def running(self) -> bool:
        return self.pid is not None and _process_alive(self.pid)

    # -- lifecycle ------------------------------------------------------------------

    def _attach(self) -> None:
        """Pick up a swtpm that an earlier process started on this directory."""
        try:
            pid = int(self.pid_file.read_text().strip())
            port = int(self.port_file.read_text().strip())
        except (OSError, ValueError):
            return
        if _process_alive(pid) and _is_our_swtpm(pid, self.state_dir):
            self.pid, self.port = pid, port

    def _write_configs(self) -> Path:
        self.ca_dir.mkdir(parents=True, exist_ok=True)
        ca_conf = self.directory / "ca.conf"
        ca_conf.write_text(
            f"statedir = {self.ca_dir}\n"
            f"signingkey = {self.ca_dir / 'signkey.pem'}\n"
            f"issuercert = {self.ca_dir / 'issuercert.pem'}\n"
            f"certserial = {self.ca_dir / 'certserial'}\n"
        )
        setup_conf = self.directory / "setup.conf"
        lines = [
            f"create_certs_tool= {self.tools['swtpm_localca']}",
            f"create_certs_tool_config = {ca_conf}",
        ]
        if _LOCALCA_OPTIONS.exists():
            lines.append(f"create_certs_tool_options = {_LOCALCA_OPTIONS}")
        lines.append("active_pcr_banks = sha256")
        setup_conf.write_text("\n".join(lines) + "\n")
        return setup_conf

    def manufacture(self) -> None:
        """Create EKs, EK/platform certificates and lock NV (swtpm_setup), once."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if not self.ek_certs or self.manufactured:
            return
        setup_conf = self._write_configs()
        cmd = [
            self.tools["swtpm_setup"],
            "--tpm2",
            "--tpmstate", str(self.state_dir),
            "--createek", "--ecc",
            "--create-ek-cert", "--create-platform-cert",
            "--lock-nvram",
            "--config", str(setup_conf),
            "--overwrite",
        ]  # fmt: skip
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            raise KeyBackendError(
                "swtpm_setup did not finish within 120 s", Reason.BACKEND_FAILURE
            ) from None
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise KeyBackendError(
                f"swtpm_setup failed (exit {result.returncode}): {' | '.join(tail)}",
                Reason.BACKEND_FAILURE,
            )

    def start(self, port: int | None = None) -> Swtpm:
        """Manufacture if needed, then run swtpm in the background; returns self.

        ``port``: serve on exactly this port (control on ``port + 1``); if either is in
        use, KeyBackendError (BACKEND_UNAVAILABLE) before anything in the directory
        changes. Without it: the port of the last start (:attr:`recorded_port`) if it is
        still free, else a free pair.
        """
        if port is not None and not 1 <= port <= 65534:
            raise ConfigurationError(
                f"swtpm port must be 1-65534 (the control port is the next one), not {port}"
            )
        if self.running:
            if port is not None and port != self.port:
                raise ConfigurationError(
                    f"swtpm in {self.directory} is already running on port {self.port}; "
                    f"stop it first to move it to port {port}"
                )
            return self
        if port is not None:
            if not port_pair_free(self.host, port):
                raise KeyBackendError(
                    f"port {port} or its control port {port + 1} on {self.host} is in use; "
                    "free it or choose another port",
                    Reason.BACKEND_UNAVAILABLE,
                )
            self.manufacture()
            error = self._launch(port)
            if error is not None:
                raise KeyBackendError(
                    f"swtpm did not start on {self.host}:{port}: {error}",
                    Reason.BACKEND_UNAVAILABLE,
                )
            return self
        self.manufacture()
        previous = self.port if self.port is not None else self.recorded_port
        # the previous port is tried by launching, not by a probe: after a power cut
        # (SIGKILL) the dead swtpm's accepted connections linger on it until the client
        # closes them, which a probe's bind counts as taken while swtpm's own bind succeeds
        ports = [previous] if previous is not None else []
        last_error = ""
        for attempt in range(_START_ATTEMPTS):
            port = ports[attempt] if attempt < len(ports) else _port_pair(self.host)
            error = self._launch(port)
            if error is None:
                return self
            last_error = error
            if "in use" not in error:
                break
        raise KeyBackendError(f"swtpm did not start: {last_error}", Reason.BACKEND_UNAVAILABLE)

    def _launch(self, port: int) -> str | None:
        self.pid_file.unlink(missing_ok=True)
        cmd = [
            self.tools["swtpm"], "socket", "--tpm2",
            "--tpmstate", f"dir={self.state_dir}",
            "--server", f"type=tcp,port={port},bindaddr={self.host}",
            "--ctrl", f"type=tcp,port={port + 1},bindaddr={self.host}",
            "--flags", "not-need-init,startup-clear",
            "--log", f"file={self.log_file}",
            "--pid", f"file={self.pid_file}",
            "--daemon",
        ]  # fmt: skip
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:
            return "swtpm --daemon did not return within 30 s"
        if result.returncode != 0:
            return (result.stderr or result.stdout).strip() or f"exit {result.returncode}"
        deadline = time.monotonic() + _WAIT_SECONDS
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                pid = int(self.pid_file.read_text().strip())
                with socket.create_connection((self.host, port), timeout=0.5):
                    self.pid, self.port = pid, port
                    self.port_file.write_text(f"{port}\n")
                    return None
            time.sleep(0.01)
        return f"swtpm did not answer on {self.host}:{port} within {_WAIT_SECONDS:.0f} s"

    def stop(self) -> None:
        """Terminate swtpm (state is kept). Safe to call when it is not running."""
        pid, self.pid = self.pid, None
        if pid is None or not _process_alive(pid) or not _is_our_swtpm(pid, self.state_dir):
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        while _process_alive(pid):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.01)
        self.pid_file.unlink(missing_ok=True)

    def restart(self) -> Swtpm:
        """Stop and start again on the same port, keeping the TPM state."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop, and delete the directory if this object created it."""
        self.stop()
        if self._owns_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> Swtpm:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"port {self.port}" if self.running else "stopped"
        return f"<Swtpm {self.directory} {state}>"
