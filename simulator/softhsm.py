"""SoftHSM2 lifecycle: a private token directory with its own ``softhsm2.conf``.

Important: SoftHSM2 reads ``SOFTHSM2_CONF`` (and scans its token directory) when the
PKCS#11 module is initialised, and python-pkcs11 loads a module only once per process.
So point ``SOFTHSM2_CONF`` at :attr:`SoftHsm.conf_path` *before* the module is first
loaded in a process (:meth:`SoftHsm.activate` does that), keep one SoftHsm directory
per process holding as many tokens as you need, and after creating a token from outside
the process call ``hw.pkcs11.rescan_tokens(module)`` so the process sees it.

PINs are handed to ``softhsm2-util`` through a pseudo-terminal, never as command-line
arguments (which any local user could read in ``ps``).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from structauth.errors import ConfigurationError, KeyBackendError, Reason

__all__ = ["SoftHsm", "check_pin", "find_softhsm_module", "read_pin_file", "write_pin_file"]

SETUP_HINT = "run the README setup command './run setup' (Debian package softhsm2)"


def find_softhsm_module() -> str:
    """Path of libsofthsm2.so (Debian keeps it in /usr/lib/softhsm/)."""
    arch = f"{platform.machine()}-linux-gnu"
    candidates = [
        Path("/usr/lib/softhsm/libsofthsm2.so"),
        Path(f"/usr/lib/{arch}/softhsm/libsofthsm2.so"),
        Path(f"/usr/lib/{arch}/libsofthsm2.so"),
        Path("/usr/local/lib/softhsm/libsofthsm2.so"),
    ]
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    raise ConfigurationError(f"libsofthsm2.so not found: {SETUP_HINT}")


def check_pin(what: str, pin: str) -> None:
    """ConfigurationError unless ``pin`` is a PIN SoftHSM2 takes (4-255 characters, one line)."""
    if not 4 <= len(pin) <= 255 or "\n" in pin or "\r" in pin:
        raise ConfigurationError(f"SoftHSM2 {what} PIN must be 4-255 characters, one line")


def write_pin_file(path: str | os.PathLike[str], pin: str, *, exclusive: bool = False) -> Path:
    """Write ``pin`` to ``path`` with mode 0600 (created that way, never world-readable).

    ``exclusive``: refuse (FileExistsError) rather than replace a file already there.
    """
    p = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(p, flags, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        os.fchmod(fh.fileno(), 0o600)
        fh.write(pin + "\n")
    return p


def read_pin_file(path: str | os.PathLike[str]) -> str:
    """The PIN :func:`write_pin_file` wrote to ``path`` (its one line, without the newline)."""
    text = Path(path).read_text(encoding="utf-8")
    return text[:-1] if text.endswith("\n") else text


class SoftHsm:
    """A SoftHSM2 token directory.

    As a context manager it sets SOFTHSM2_CONF for the block (restoring it afterwards)
    and deletes the directory at the end if it created it.
    """

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        util = shutil.which("softhsm2-util")
        if util is None:
            raise ConfigurationError(f"softhsm2-util is not installed: {SETUP_HINT}")
        self.util = util
        self.module = find_softhsm_module()
        self._owns_dir = directory is None
        self._previous_conf: str | None = None
        self.directory = Path(
            tempfile.mkdtemp(prefix="tessera-softhsm-") if directory is None else directory
        ).resolve()
        self.token_dir = self.directory / "tokens"
        self.conf_path = self.directory / "softhsm2.conf"
        self.token_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.conf_path.exists():
            self.conf_path.write_text(
                f"directories.tokendir = {self.token_dir}\n"
                "objectstore.backend = file\n"
                "log.level = ERROR\n"
                "slots.removable = false\n"
            )

    @property
    def env(self) -> dict[str, str]:
        """The environment variables a process needs to use these tokens."""
        return {"SOFTHSM2_CONF": str(self.conf_path)}

    def activate(self) -> None:
        """Set SOFTHSM2_CONF for this process (before the module is loaded!)."""
        os.environ["SOFTHSM2_CONF"] = str(self.conf_path)

    def _run(self, args: list[str], stdin_text: str | None = None) -> str:
        env = dict(os.environ, SOFTHSM2_CONF=str(self.conf_path))
        if stdin_text is None:
            result = subprocess.run(
                [self.util, *args], capture_output=True, text=True, env=env, timeout=60
            )
        else:
            # softhsm2-util reads PINs from a terminal only: give it a pseudo-terminal.
            leader, follower = os.openpty()
            try:
                proc = subprocess.Popen(
                    [self.util, *args], stdin=follower, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, env=env, text=True,
                )  # fmt: skip
                os.close(follower)
                follower = -1
                os.write(leader, stdin_text.encode())
                out, err = proc.communicate(timeout=60)
                result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
            finally:
                if follower >= 0:
                    os.close(follower)
                os.close(leader)
        if result.returncode != 0:
            message = (result.stderr or result.stdout).strip().splitlines()
            raise KeyBackendError(
                f"softhsm2-util {args[0]} failed: {message[-1] if message else result.returncode}",
                Reason.BACKEND_FAILURE,
            )
        return result.stdout

    def init_token(self, label: str, so_pin: str, user_pin: str) -> None:
        """Initialise a fresh token in the first free slot.

        If softhsm2-util fails, whatever it left in the token directory is removed again.
        """
        check_pin("SO", so_pin)
        check_pin("user", user_pin)
        if label in self.token_labels():
            raise KeyBackendError(
                f"a SoftHSM2 token labelled {label!r} already exists", Reason.BAD_PARAMETERS
            )
        before = set(self.token_dir.iterdir())
        try:
            self._run(
                ["--init-token", "--free", "--label", label],
                stdin_text=f"{so_pin}\n{so_pin}\n{user_pin}\n{user_pin}\n",
            )
        except BaseException:
            for leftover in set(self.token_dir.iterdir()) - before:
                if leftover.is_dir() and not leftover.is_symlink():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)
            raise

    def delete_token(self, label: str) -> None:
        """Delete the token labelled ``label`` (its keys are gone for good)."""
        if label not in self.token_labels():
            raise KeyBackendError(
                f"no SoftHSM2 token labelled {label!r} in {self.directory}", Reason.KEY_NOT_FOUND
            )
        self._run(["--delete-token", "--token", label])

    def token_labels(self) -> list[str]:
        labels = []
        for line in self._run(["--show-slots"]).splitlines():
            key, _, value = line.strip().partition(":")
            if key == "Label" and value.strip():
                labels.append(value.strip())
        return labels

    def write_pin_file(self, pin: str, name: str = "user.pin") -> Path:
        """A PIN file (mode 0600) inside this SoftHSM directory."""
        return write_pin_file(self.directory / name, pin)

    def close(self) -> None:
        """Delete the directory if this object created it."""
        if self._owns_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> SoftHsm:
        """Activate (set SOFTHSM2_CONF) for the duration of the ``with`` block."""
        self._previous_conf = os.environ.get("SOFTHSM2_CONF")
        self.activate()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._previous_conf is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = self._previous_conf
        self.close()

    def __repr__(self) -> str:
        return f"<SoftHsm {self.directory}>"
