"""What every `tessera` command shares: the one error type (one line for the
operator), the test-only crash hook, and the checks and writes that refuse with it."""

from __future__ import annotations

import argparse
import json
import os
import signal
import ssl
import tempfile
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from structauth.errors import TesseraError


class CliError(Exception):
    """One line for the operator: what is wrong and how to fix it."""


class Refused(CliError):
    """The service (or our check of what it holds) refused the request: nothing was
    recorded. A batch reports the row as refused rather than failed."""


_CRASH_ENV = "TESSERA_TEST_CRASH_AT"


def _crash_point(name: str) -> None:
    """Tests only: ``TESSERA_TEST_CRASH_AT=<point>[:kill|int|term|stop]`` sends this
    process the signal at the named point (default SIGKILL, no cleanup: a power cut),
    so a test can prove that every point leaves a state the next run completes."""
    spec = os.environ.get(_CRASH_ENV)
    if not spec:
        return
    actions = {"kill": signal.SIGKILL, "int": signal.SIGINT, "term": signal.SIGTERM,
               "stop": signal.SIGSTOP}
    point, _, action = spec.rpartition(":")
    if action not in actions:
        point, action = spec, "kill"
    if point != name:
        return
    sig = actions[action]
    os.kill(os.getpid(), sig)


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _check_pem(path: str, flag: str, what: str) -> None:
    from cryptography import x509

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CliError(f"{flag} {path}: cannot read it ({_why(exc)}); pass {what}") from None
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise CliError(f"{flag} {path} holds no PEM certificate; pass {what}")


def _write_atomic(path: Path, data: bytes, flag: str) -> None:
    """Write ``path`` all or nothing: a synced temporary file in the same directory,
    renamed over it; on any error the temporary file is removed and the old file stays."""
    from device.provisioner import fsync_dir

    if path.is_dir():
        raise CliError(f"{flag} {path} is a directory; name a file")
    tmp: Path | None = None
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp",
                                    dir=path.parent if str(path.parent) else ".")
        tmp = Path(name)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.chmod(0o644)
        os.replace(tmp, path)
        tmp = None
        fsync_dir(path.parent)
    except OSError as exc:
        raise CliError(f"{flag} {path}: cannot write it ({_why(exc)}); nothing was written, "
                       "free space or choose a writable place") from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


DEFAULT_DIR = Path(os.environ.get("TESSERA_HOME", "tessera-authority"))
DEFAULT_URL = os.environ.get("TESSERA_PROVISIONER", "http://127.0.0.1:8443")


SERVICE_FILE = "service.toml"
#: bounds of --operational-lifetime (minutes): the service needs at least one; more than
#: a year defeats the point of a short-lived credential (and overflows nothing)
MIN_LIFETIME, MAX_LIFETIME = 1, 366 * 24 * 60


# -- test hook -----------------------------------------------------------------------


# -- helpers -----------------------------------------------------------------------


def _token(args: argparse.Namespace) -> str | None:
    if getattr(args, "token_file", None):
        try:
            return Path(args.token_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            why = getattr(exc, "strerror", None) or "not text"
            raise CliError(f"--token-file {args.token_file}: cannot read it ({why})") from None
    return os.environ.get("TESSERA_OPERATOR_TOKEN")


def _client(args: argparse.Namespace, *, operator: bool = True) -> Any:
    from device.provisioner import ProvisionerClient

    token = _token(args) if operator else None
    if operator and not token:
        raise CliError(
            "operator token missing: set TESSERA_OPERATOR_TOKEN or pass --token-file "
            "(printed once by 'tessera init')"
        )
    if args.cafile and not Path(args.cafile).is_file():
        raise CliError(f"--cafile {args.cafile} does not exist; pass the CA bundle (PEM) "
                       "that signed the service's TLS certificate")
    try:
        return ProvisionerClient(args.provisioner, operator_token=token, cafile=args.cafile)
    except ssl.SSLError as exc:
        raise CliError(f"--cafile {args.cafile}: not a PEM CA bundle ({exc.reason})") from None


def _check_serial(serial: str, flag: str) -> str:
    from provisioning.enrollment import check_serial

    try:
        return check_serial(serial)
    except TesseraError:
        raise CliError(f"{flag} {serial!r}: a serial is 1-64 letters, digits, '.', '_' or "
                       "'-' (no spaces or newlines)") from None


def _lifetime(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of minutes") from None
    if not MIN_LIFETIME <= value <= MAX_LIFETIME:
        raise argparse.ArgumentTypeError(
            f"{value} is out of range: use {MIN_LIFETIME}..{MAX_LIFETIME} minutes (a year)")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port: use 1..65535")
    return value


def _service_config(directory: Path) -> dict[str, Any]:
    """service.toml, checked: every value ``serve`` uses has the right type and range,
    so a hand-edited file is refused here in one line, not deep inside the service."""
    path = directory / SERVICE_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if (directory / "authority.toml").exists():
            raise CliError(_half_made(directory)) from None
        raise CliError(
            f"{directory} holds no Tessera authority: run 'tessera init --dir {directory}' first"
        ) from None
    except OSError as exc:
        raise CliError(f"cannot read {path} ({exc.strerror}); check that it is a file this "
                       "user can read") from None
    try:
        config = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise CliError(f"{path} is not UTF-8 text; restore it from 'tessera init'") from None
    except tomllib.TOMLDecodeError as exc:
        raise CliError(f"{path} is not valid TOML ({exc}); fix that line") from None
    registry = config.get("registry")
    if not isinstance(registry, str) or not registry:
        raise CliError(f"{path}: registry must be a string such as \"sqlite:///path.db\" or "
                       "\"postgresql://user@host/db\"")
    roots = config.setdefault("tpm_maker_roots", [])
    if not isinstance(roots, list) or not all(isinstance(r, str) and r for r in roots):
        raise CliError(f"{path}: tpm_maker_roots must be a list of PEM file paths, "
                       "e.g. [\"/etc/tessera/maker-root.pem\"]")
    lifetime = config.setdefault("operational_lifetime_minutes", 24 * 60)
    if (not isinstance(lifetime, int) or isinstance(lifetime, bool)
            or not MIN_LIFETIME <= lifetime <= MAX_LIFETIME):
        raise CliError(f"{path}: operational_lifetime_minutes must be a whole number in "
                       f"{MIN_LIFETIME}..{MAX_LIFETIME}, not {lifetime!r}")
    return config


def _half_made(directory: Path) -> str:
    return (f"{directory} holds authority.toml but no {SERVICE_FILE}: an init that was "
            "interrupted by an older Tessera; move the directory away (and remove its key "
            "from the token if it is not used elsewhere), then run 'tessera init' again")


def _maker_roots(paths: Sequence[str], where: str) -> Any:
    """The TPM maker roots, loaded as serve loads them: init refuses what serve would."""
    from provisioning.attestation import TpmMakerRoots

    if not paths:
        return None
    try:
        return TpmMakerRoots.from_pem_files(paths)
    except TesseraError as exc:
        raise CliError(f"{where}: {exc.detail}; pass the TPM maker's CA certificates as "
                       "complete PEM files (root and intermediates)") from None


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=1) if args.json else text)


def _table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*map(str, r)) for r in rows]
    return "\n".join(lines)
