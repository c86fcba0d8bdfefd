"""`tessera`: the factory operator's command line.

    tessera init           create a fleet authority (key in a PKCS#11 token) and registry
    tessera serve          run the provisioning service (HTTP API)
    tessera enroll         enroll a device (local TPM or PKCS#11 key, a device on the
                           network with --device URL, or --batch CSV)
    tessera roots add|list|remove
                           the TPM maker CA certificates enrollment accepts
    tessera list | show    what the registry holds
    tessera revoke         revoke a device (its live sessions are cut by brokers)
    tessera renew          renew a local device's operational credential
    tessera export-bundle  write the trust bundle devices and brokers need
    tessera export-attestation-keys
                           write enrolled attestation keys for the broker plugin
    tessera broker config  write mosquitto.conf lines that load the Tessera plugin
    tessera audit verify   check the hash chain of a broker audit log

Every error is one line on stderr and a non-zero exit; nothing is half-written.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import json
import os
import shutil
import signal
import ssl
import sys
import tempfile
import threading
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from provisioning.ble_cli import add_arguments as add_ble_arguments
from provisioning.station_out import (
    _SPACE_PROBE,
    JOURNAL,
    CliError,
    Refused,
    _agent_broker,
    _agent_files,
    _agent_toml,
    _check_broker_domain,
    _check_pem,
    _crash_point,
    _OutPlan,
    _why,
)
from structauth.errors import Reason, TesseraError

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


# -- init ----------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _InitStaging:
    """The new authority directory, built under a temporary name beside its final place
    and renamed there as the last step (rename(2) is atomic and may replace an empty
    directory). Undo removes it and any parent directory it created."""

    PREFIX = ".tessera-init-"

    def __init__(self, target: Path) -> None:
        self.target = target
        self.parent = target.absolute().parent
        self.created: list[Path] = []
        self.path: Path | None = None

    def _stale(self) -> None:
        """Remove what an init killed without cleanup (SIGKILL, power cut) left."""
        for old in self.parent.glob(f".{self.target.name}{self.PREFIX}*"):
            pid = old.name.rsplit("-", 2)[-2]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(old, ignore_errors=True)

    def begin(self) -> Path:
        missing = []
        p = self.parent
        while not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            d.mkdir(mode=0o755)
            self.created.append(d)
        self._stale()
        self.path = Path(tempfile.mkdtemp(
            prefix=f".{self.target.name}{self.PREFIX}{os.getpid()}-", dir=self.parent))
        return self.path

    def commit(self) -> None:
        from device.provisioner import fsync_dir

        assert self.path is not None
        fsync_dir(self.path)
        os.rename(self.path, self.target)
        self.path = None
        fsync_dir(self.parent)

    def abort(self) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = None
        for d in reversed(self.created):
            with contextlib.suppress(OSError):
                d.rmdir()


class _StagingNames:
    """While init builds the authority under its staging name, what is logged (the
    insecure-key warning names the authority's directory) and what is refused name the
    --dir the user gave instead: the staging directory is gone when they read it."""

    def __init__(self, directory: Path) -> None:
        import logging

        self.directory = str(directory)
        self.stage: Path | None = None
        self.loggers = [logging.getLogger("provisioning")]
        self.loggers += [logging.getLogger(n) for n in logging.root.manager.loggerDict
                         if n.startswith("provisioning.")]
        for logger in self.loggers:
            logger.addFilter(self)

    def name(self, text: str) -> str:
        if self.stage is None:
            return text
        for form in (str(self.stage), str(self.stage.resolve())):
            text = text.replace(form, self.directory)
        return text

    def filter(self, record: Any) -> bool:  # a logging.LogRecord
        if self.stage is not None:
            message = self.name(record.getMessage())
            if message != record.getMessage():
                record.msg, record.args = message, ()
        return True

    def close(self) -> None:
        for logger in self.loggers:
            logger.removeFilter(self)


def _refuse_init_target(directory: Path) -> None:
    if (directory / SERVICE_FILE).exists():
        raise CliError(f"{directory} already holds a Tessera authority; nothing was changed. "
                       "Use it, or choose another --dir")
    if (directory / "authority.toml").exists():
        raise CliError(_half_made(directory))
    if directory.exists() or directory.is_symlink():
        if not directory.is_dir():
            raise CliError(f"--dir {directory} exists and is not a directory; choose a new one")
        if any(directory.iterdir()):
            raise CliError(f"--dir {directory} is not empty; choose a new or empty directory")


def cmd_init(args: argparse.Namespace) -> None:
    from provisioning.authority import FleetAuthority
    from provisioning.operators import Operators, check_operator_name
    from provisioning.registry import open_registry

    directory: Path = args.dir
    # everything that can be checked without side effects first
    _refuse_init_target(directory)
    if not args.insecure_file_key and not (args.pkcs11_module and args.token):
        raise CliError(
            "the authority key belongs in a PKCS#11 token: pass --pkcs11-module and "
            "--token (PIN from TESSERA_PKCS11_PIN or --pin-file), or "
            "--insecure-file-key for development"
        )
    try:
        check_operator_name(args.operator)
    except TesseraError as exc:
        raise CliError(f"--operator {args.operator!r}: {exc.detail}") from None
    _maker_roots(args.tpm_maker_roots, "--tpm-maker-roots")
    roots = [str(Path(p).resolve()) for p in args.tpm_maker_roots]
    final_db = (directory / "registry.db").absolute()
    registry_url = args.registry or f"sqlite:///{final_db}"
    external_db: Path | None = None  # an SQLite file outside --dir that this init creates
    if args.registry and not args.registry.startswith(("postgres://", "postgresql://")):
        from urllib.parse import unquote, urlsplit

        db = Path(unquote(urlsplit(args.registry).path) if "://" in args.registry
                  else args.registry)
        external_db = None if db.exists() else db

    staging = _InitStaging(directory)
    authority = None
    renamer = _StagingNames(directory)
    try:
        stage = renamer.stage = staging.begin()
        # the registry before the key: an unreachable PostgreSQL or a bad URL is
        # refused before anything is created on the token
        open_registry(args.registry or str(stage / "registry.db")).close()
        authority = FleetAuthority.init(
            stage,
            args.trust_domain,
            pkcs11_module=args.pkcs11_module,
            token_label=args.token,
            key_label=args.key_label,
            pin_file=args.pin_file,
            insecure_file_key=args.insecure_file_key,
            now=dt.datetime.now(dt.UTC),
            remove_new_key_on_failure=True,
        )
        _crash_point("init:authority-created")
        token = Operators(stage / "operators.json").add(args.operator)
        import tomli_w

        from device.provisioner import write_synced

        write_synced(stage / SERVICE_FILE, (_SERVICE_HEADER + tomli_w.dumps({
            "registry": registry_url,
            "tpm_maker_roots": roots,
            "operational_lifetime_minutes": args.operational_lifetime,
        })).encode())
        _crash_point("init:staged")
        staging.commit()
    except BaseException as exc:
        if authority is not None:
            authority.discard()  # the token key too, if this init generated it
        staging.abort()
        renamer.close()
        if external_db is not None:
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(f"{external_db}{suffix}").unlink(missing_ok=True)
        if isinstance(exc, OSError):
            where = f" ({renamer.name(str(exc.filename))})" if exc.filename else ""
            raise CliError(f"cannot create the authority in {directory}: {_why(exc)}{where}; "
                           "nothing was created, free space or choose a writable --dir "
                           "and run init again") from None
        if isinstance(exc, TesseraError):
            raise CliError(f"{renamer.name(_one_line(exc))}; nothing was created: fix that "
                           "and run init again") from None
        raise
    renamer.close()
    authority.close()
    _emit(
        args,
        {
            "trust_domain": args.trust_domain,
            "directory": str(directory),
            "operator": args.operator,
            "operator_token": token,
        },
        f"fleet authority for {args.trust_domain} created in {directory}\n"
        f"operator token for {args.operator} (shown once; keep it secret):\n{token}",
    )


# -- serve ---------------------------------------------------------------------------


def build_service(directory: Path) -> Any:
    from provisioning.authority import FleetAuthority
    from provisioning.enrollment import EnrollmentService
    from provisioning.registry import open_registry

    config = _service_config(directory)
    roots = _maker_roots(config["tpm_maker_roots"], f"{directory / SERVICE_FILE}: "
                         "tpm_maker_roots")
    lifetime = dt.timedelta(minutes=config["operational_lifetime_minutes"])
    authority = FleetAuthority.open(directory)
    try:
        registry = open_registry(config["registry"])
    except BaseException:
        authority.close()
        raise
    return EnrollmentService(authority, registry, roots, operational_lifetime=lifetime)


def _check_tls(cert: str | None, key: str | None) -> None:
    if bool(cert) != bool(key):
        raise CliError("TLS needs both --tls-cert and --tls-key")
    if not cert or not key:
        return
    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        if not Path(path).is_file():
            raise CliError(f"{flag} {path} does not exist; pass a PEM file")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        why = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
        raise CliError(f"--tls-cert {cert} / --tls-key {key}: not a PEM certificate and its "
                       f"private key ({why}); pass the pair your CA issued") from None


def cmd_serve(args: argparse.Namespace) -> None:
    # one logging set-up for every long-running Tessera process (tessera-agent's): text
    # or one JSON object per line on stderr, at --log-level; first, so that what loading
    # the authority logs (an insecure key's warning) has that form too
    from device.cli import setup_logging

    setup_logging(args.log_level, args.log_format)
    _check_tls(args.tls_cert, args.tls_key)
    service = build_service(args.dir)  # every configuration problem refused first

    import logging

    from provisioning.operators import Operators
    from provisioning.service import Limits, build_app

    table = _service_config(args.dir).get("limits", {})  # service.toml [limits], optional
    if not isinstance(table, dict):
        raise CliError(f"{args.dir / SERVICE_FILE}: limits must be a table ([limits])")
    limits = Limits.from_mapping(table, f"{args.dir / SERVICE_FILE} [limits]")
    app = build_app(service, Operators(args.dir / "operators.json"), limits)
    from provisioning.server import run_service

    def ready(url: str) -> None:
        # uvicorn's Config installed its own handlers on its loggers: hand them to ours
        # so that --log-format json covers them too
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            logger.propagate = True
        logging.getLogger("tessera.provisioning").info(
            "serving %s on %s", service.authority.trust_domain, url)
        if args.json:
            print(json.dumps({"event": "serving", "trust_domain":
                              service.authority.trust_domain, "url": url}), flush=True)
        else:
            print(f"tessera: serving {service.authority.trust_domain} on {url}", flush=True)

    def reload_roots(signum: int, frame: Any) -> None:
        # SIGHUP: the maker roots again from service.toml ('tessera roots add|remove'),
        # checked as at start; a set that would not load keeps the current one. The
        # attribute is replaced whole, so an enrollment sees the old set or the new one
        log = logging.getLogger("tessera.provisioning")
        try:
            config = _service_config(args.dir)
            roots = _maker_roots(config["tpm_maker_roots"],
                                 f"{args.dir / SERVICE_FILE}: tpm_maker_roots")
        except CliError as exc:
            log.error("maker roots reload refused, keeping the current ones: %s", exc)
            return
        service.maker_roots = roots
        log.info("maker roots reloaded: %d file(s)", len(config["tpm_maker_roots"]))

    signal.signal(signal.SIGHUP, reload_roots)
    # run_service loads the TLS files and binds before on_ready: "serving" means it is
    run_service(
        app, host=args.host, port=args.port, ssl_certfile=args.tls_cert,
        ssl_keyfile=args.tls_key, on_ready=ready,
        log_level="info" if args.log_level == "debug" else "warning",
    )


# -- maker roots ---------------------------------------------------------------------

_SERVICE_HEADER = "# Tessera provisioning service (written by 'tessera init' / 'tessera roots')\n"


def _write_service_config(directory: Path, config: dict[str, Any]) -> None:
    """service.toml rewritten all or nothing (tomli_w, then a synced rename): an error
    leaves the old file as it was. Comments other than the header are not kept."""
    import tomli_w

    _write_atomic(directory / SERVICE_FILE,
                  (_SERVICE_HEADER + tomli_w.dumps(config)).encode(), "--dir")


@contextlib.contextmanager
def _service_config_locked(directory: Path) -> Any:
    """Two 'tessera roots' edits at once must not lose one: the second waits."""
    import fcntl

    _service_config(directory)  # refuses a directory without an authority first
    try:
        fd = os.open(directory / ".service.toml.lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise CliError(f"--dir {directory}: cannot lock {SERVICE_FILE} ({_why(exc)}); "
                       "run as the user that owns the authority directory") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield _service_config(directory)  # read again under the lock
    finally:
        os.close(fd)


def _fingerprint(cert: Any) -> str:
    from cryptography.hazmat.primitives import hashes

    return str(cert.fingerprint(hashes.SHA256()).hex())


def _root_rows(paths: Sequence[str]) -> list[dict[str, Any]]:
    """Every certificate of the configured files: what it is, what it chains to."""
    from cryptography import x509

    from provisioning.attestation import _self_signed

    rows: list[dict[str, Any]] = []
    certs: list[tuple[str, Any]] = []
    for path in paths:
        try:
            found = x509.load_pem_x509_certificates(Path(path).read_bytes())
        except (OSError, ValueError):
            rows.append({"file": path, "role": "unreadable", "subject": "", "issuer": "",
                         "fingerprint": "", "not_after": "", "chain": []})
            continue
        certs += [(path, c) for c in found]
    by_subject = {c.subject: c for _, c in certs}
    for path, cert in certs:
        chain, seen, here = [cert.subject.rfc4514_string()], {cert.subject}, cert
        while not _self_signed(here) and here.issuer in by_subject and here.issuer not in seen:
            here = by_subject[here.issuer]
            seen.add(here.subject)
            chain.append(here.subject.rfc4514_string())
        rows.append({
            "file": path,
            "role": "root" if _self_signed(cert) else "intermediate",
            "subject": cert.subject.rfc4514_string(),
            "issuer": cert.issuer.rfc4514_string(),
            "fingerprint": _fingerprint(cert),
            "not_after": cert.not_valid_after_utc.isoformat(),
            "chain": chain,
            "complete": _self_signed(here),
        })
    return rows


#: the service loads the roots at start (build_service) and again on SIGHUP
_RESTART = ("send 'tessera serve' SIGHUP (or restart it) so the running service uses the "
            "new set")


def cmd_roots_add(args: argparse.Namespace) -> None:
    from cryptography import x509

    with _service_config_locked(args.dir) as config:
        where = args.dir / SERVICE_FILE
        current: list[str] = list(config["tpm_maker_roots"])
        added: list[str] = []
        for given in args.pem:
            path = Path(given)
            try:
                certs = x509.load_pem_x509_certificates(path.read_bytes())
            except OSError as exc:
                raise CliError(f"{given}: cannot read it ({_why(exc)}); nothing was changed"
                               ) from None
            except ValueError:
                certs = []
            if not certs:
                raise CliError(f"{given} holds no PEM certificate; pass the TPM maker's CA "
                               "certificate files (root and intermediates); nothing was changed")
            resolved = str(path.resolve())
            if resolved not in current and resolved not in added:
                added.append(resolved)
        # the new set as serve loads it: no root at all, or a broken file, is refused
        _maker_roots(current + added, f"{where}: tpm_maker_roots with {', '.join(args.pem)}")
        if added:
            config["tpm_maker_roots"] = current + added
            _write_service_config(args.dir, config)
        rows = _root_rows(added)
    _emit(args, {"added": added, "certificates": rows, "restart_needed": bool(added)},
          (f"added {len(added)} file(s), {len(rows)} certificate(s) to {where}; {_RESTART}"
           if added else f"already in {where}; nothing changed"))


def cmd_roots_list(args: argparse.Namespace) -> None:
    config = _service_config(args.dir)
    rows = _root_rows(config["tpm_maker_roots"])
    text = _table(
        [(r["fingerprint"][:16], r["role"], r["subject"], r["issuer"], r["not_after"][:10],
          r["file"]) for r in rows],
        ("SHA256", "ROLE", "SUBJECT", "ISSUER", "EXPIRES", "FILE"),
    ) if rows else f"no TPM maker roots in {args.dir / SERVICE_FILE} ('tessera roots add PEM')"
    chains = [f"  chain: {' -> '.join(r['chain'])}" + ("" if r["complete"] else " (no root!)")
              for r in rows if r["role"] == "intermediate"]
    _emit(args, {"roots": rows}, "\n".join([text, *chains]))


def cmd_roots_remove(args: argparse.Namespace) -> None:
    want = args.which.strip()
    hexed = want.replace(":", "").lower()
    with _service_config_locked(args.dir) as config:
        where = args.dir / SERVICE_FILE
        rows = _root_rows(config["tpm_maker_roots"])
        if len(hexed) >= 8 and all(c in "0123456789abcdef" for c in hexed):
            hits = [r for r in rows if r["fingerprint"].startswith(hexed)]
        else:
            hits = [r for r in rows if want in (r["subject"], r["file"])]
        if not hits:
            raise CliError(f"no maker certificate in {where} has fingerprint, subject or file "
                           f"{want!r}; 'tessera roots list' shows them; nothing was changed")
        files = {r["file"] for r in hits}
        keep = [p for p in config["tpm_maker_roots"] if p not in files]
        _maker_roots(keep, f"{where}: without {', '.join(sorted(files))}")
        gone = [r for r in rows if r["file"] in files]
        config["tpm_maker_roots"] = keep
        _write_service_config(args.dir, config)
    _emit(args, {"removed": sorted(files), "certificates": gone, "restart_needed": True},
          f"removed {len(files)} file(s) ({len(gone)} certificate(s): "
          f"{'; '.join(r['subject'] for r in gone)}) from {where}; {_RESTART}")


# -- enrollment, two-phase -----------------------------------------------------------
#
# The service records a device in the step that hands out its credentials, so there is
# a window in which the registry says "issued" and the credentials exist only in this
# process. --out closes it with a journal: a staging directory beside --out holds
# .tessera-enroll.json from before the first request until the credentials are synced
# and renamed into place. A run that finds the journal of an interrupted run, and the
# device active in the registry with this very key, finishes the job: it re-enrolls
# the device (the lost credentials are revoked, fresh ones saved). Without the journal
# an enrolled serial is refused as before. SIGINT/SIGTERM are held from the recording
# step until the save is done; SIGKILL and power cuts are what the journal is for.


class _SignalsHeld:
    """SIGINT and SIGTERM wait while the service records the device and its credentials
    are saved: an operator's Ctrl-C lands after the save, not inside the window.
    :meth:`hold` starts the window (idempotent); leaving the ``with`` block ends it."""

    HELD = frozenset({signal.SIGINT, signal.SIGTERM})

    def __init__(self) -> None:
        self._old: set[int] | None = None

    def hold(self) -> None:
        if self._old is None and threading.current_thread() is threading.main_thread():
            self._old = set(signal.pthread_sigmask(signal.SIG_BLOCK, self.HELD))

    def __enter__(self) -> _SignalsHeld:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._old is None:
            return
        # a signal that arrived meanwhile is taken here and remembered, not raised: the
        # work it waited for is done, so the command reports it and then stops (exit 130)
        while self.HELD & signal.sigpending():
            taken = signal.sigtimedwait(self.HELD, 0)
            if taken is None:
                break
            _DEFERRED.append(taken.si_signo)
        signal.pthread_sigmask(signal.SIG_SETMASK, self._old)
        self._old = None


_DEFERRED: list[int] = []  # SIGINT/SIGTERM taken while held; the command stops after


def _registered(client: Any, serial: str) -> dict[str, Any] | None:
    from device.provisioner import ServiceError

    try:
        found: dict[str, Any] = client.call("GET", f"/v1/devices/{serial}")
    except ServiceError as exc:
        if exc.reason is Reason.NOT_ENROLLED and exc.answered:
            return None
        raise
    return found


def _spki_b64(key: Any) -> str:
    import base64

    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return base64.b64encode(
        key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)).decode()


def _already(serial: str) -> Refused:
    return Refused(f"device {serial} is already enrolled; use --reenroll to replace it "
                   "(this revokes its current credentials) [already_enrolled]")


def _enroll_one(
    args: argparse.Namespace,
    client: Any,
    serial: str,
    tpm: str | None,
    pkcs11: str | None,
    key_dir: str | None,
    device_class: str,
    out: Path | None,
) -> dict[str, Any]:
    from device.provisioner import LocalTpm, ServiceError, enroll_tpm, enroll_witnessed

    if bool(tpm) == bool(pkcs11):
        raise CliError(f"{serial}: give exactly one of --tpm TCTI or --pkcs11 SPEC")
    _check_serial(serial, "--serial")
    reenroll = bool(args.reenroll)
    plan = _OutPlan(out, serial, replace=reenroll) if out is not None else None
    if plan is not None:
        plan.broker = getattr(args, "agent_broker", None)
        plan.settings = (
            {"backend": "tpm", "tcti": tpm, "key_dir": str(Path(key_dir or f"{serial}-keys")
                                                          .absolute())}
            if tpm else {"backend": "pkcs11", "pkcs11": pkcs11})
        plan.settings.update(serial=serial, provisioner=args.provisioner)
        plan.preflight()
    created_key: tuple[Any, str] | None = None  # (PKCS#11 backend, label) made by this run
    recording = False  # the step that records the device was sent
    backend: Any = None
    signer: Any = None
    try:
        existing = _registered(client, serial)
        resumable = plan is not None and plan.resumable
        if existing is not None and not reenroll and not resumable:
            raise _already(serial)  # before any key is created anywhere
        if tpm:
            from hw.tpm import TpmBackend

            backend = TpmBackend(tpm, Path(key_dir or f"{serial}-keys"))
            key = LocalTpm(backend).public_key()
        else:
            assert pkcs11 is not None
            backend, signer, made = _open_pkcs11_key(pkcs11)
            if made:
                created_key = (backend, pkcs11.rpartition("/")[2])
            key = signer.public_key()
        _crash_point("enroll:key-created")
        spki = _spki_b64(key)
        if existing is not None and not reenroll:
            if existing.get("status") == "active" and existing.get("public_key") == spki:
                reenroll = True  # finishing the interrupted run: its credentials were lost
            else:
                raise _already(serial)

        def progress(step: str) -> None:
            nonlocal recording
            if step == "accepted" and plan is not None:
                plan.mark("accepted", key=spki)
                _crash_point("enroll:accepted")
            elif step == "finishing":
                window.hold()
                recording = True

        with _SignalsHeld() as window:
            if tpm:
                issued = enroll_tpm(client, backend, serial, kind=args.kind,
                                    device_class=device_class, reenroll=reenroll,
                                    progress=progress)
            else:
                issued = enroll_witnessed(client, signer, serial, kind=args.kind,
                                          device_class=device_class, reenroll=reenroll,
                                          progress=progress)
            _crash_point("enroll:issued")
            if plan is not None:
                try:
                    plan.save(issued)
                except OSError as exc:
                    raise CliError(
                        f"{serial} is enrolled but its credentials could not be written to "
                        f"{out} ({_why(exc)}); fix that and run the same command again to "
                        "finish (the unsaved credentials are then revoked and replaced)"
                    ) from None
    except BaseException as exc:
        maybe_recorded = recording and not (isinstance(exc, ServiceError) and exc.answered)
        if not maybe_recorded:
            if created_key is not None:
                with contextlib.suppress(Exception):
                    created_key[0].delete_signing_key(created_key[1])
            if plan is not None:
                plan.abort()
        elif plan is not None:
            plan.drop_staged()  # the journal stays: the next run finishes the job
        if maybe_recorded and isinstance(exc, TesseraError):
            again = ("run the same command again to finish" if plan is not None else
                     "run it again (with --reenroll if it says already enrolled)")
            raise CliError(f"{serial}: {_one_line(exc)}; the service may have enrolled it: "
                           f"{again}") from None
        raise
    finally:
        for thing in (signer, backend):
            close: Callable[[], None] | None = getattr(thing, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    close()
    return issued


def _open_pkcs11_key(spec: str) -> tuple[Any, Any, bool]:
    """(backend, signer, generated here) for ``<module>#<token>/<label>``."""
    from hw.pkcs11 import Pkcs11Backend

    module, sep, labels = spec.rpartition("#")
    token, sep2, label = labels.partition("/")
    if not sep or not sep2 or not module or not token or not label:
        raise CliError(f"--pkcs11 {spec!r}: expected <module>#<token>/<key label>")
    backend = Pkcs11Backend(module, token)
    try:
        signer, made = backend.get_or_create_signing_key_ex(label)
    except BaseException:
        backend.close()
        raise
    return backend, signer, made


def cmd_enroll(args: argparse.Namespace) -> None:
    args.agent_broker = _agent_broker(args)  # refused before the service is asked
    client = _client(args)
    _check_broker_domain(client, args.agent_broker)
    if args.ble:
        from provisioning.ble_cli import run as run_ble  # bleak: the ble extra

        return run_ble(args, client)
    if args.batch:
        return _enroll_batch(args, client)
    if args.device:
        return _enroll_remote(args, client)
    if not args.serial:
        raise CliError("--serial is required (or --batch CSV)")
    if args.out is not None and not args.reenroll:
        identity = _finished_before(client, args.out, args.serial)
        if identity is not None:
            _emit(args, {"serial": args.serial, "identity": identity, "status": "done"},
                  f"{identity} is enrolled and its credentials are in {args.out} (done "
                  "before; nothing changed)")
            return None
    issued = _enroll_one(
        args, client, args.serial, args.tpm, args.pkcs11, args.key_dir, args.device_class, args.out
    )
    _emit(
        args,
        issued,
        f"enrolled {issued['identity']} ({issued['attestation']}); "
        f"operational credential valid until {issued['operational_not_after']}"
        + (f"; credentials in {args.out}" if args.out else ""),
    )
    if _DEFERRED:
        raise KeyboardInterrupt


def _finished_before(client: Any, out: Path, serial: str) -> str | None:
    """The identity, if --out already holds this serial's credentials for the key the
    registry holds for it (a finished run, perhaps killed before it could say so): the
    same command run again is then done, not refused."""
    from cryptography import x509

    identity = _OutPlan(out, serial, replace=False).done_before()
    if identity is None:
        return None
    try:
        cert = x509.load_pem_x509_certificate((out / "operational.pem").read_bytes())
    except (OSError, ValueError):
        return None
    record = _registered(client, serial)
    if (record is None or record.get("status") != "active"
            or record.get("public_key") != _spki_b64(cert.public_key())):
        return None
    (out / JOURNAL).unlink(missing_ok=True)
    return identity


def _enroll_remote(args: argparse.Namespace, client: Any) -> None:
    """Enroll a device on the network through its agent's enrollment endpoint."""
    from device.enrollment_endpoint import RemoteDevice
    from device.provisioner import CredentialStore, enroll_attested

    if args.tpm or args.pkcs11:
        raise CliError("--device enrolls a remote device: leave out --tpm/--pkcs11")
    code = args.device_code or os.environ.get("TESSERA_DEVICE_CODE", "")
    device = RemoteDevice(args.device, code)
    serial = device.info()["serial"]
    if args.serial and args.serial != serial:
        raise CliError(f"the device at {args.device} is {serial}, not {args.serial}")
    if args.out is not None:  # refused before the device is enrolled, not after
        plan = _OutPlan(args.out, serial, replace=args.reenroll)
        plan.preflight()
        plan.abort()
    issued = enroll_attested(
        client, device, serial, kind=args.kind, device_class=args.device_class,
        reenroll=args.reenroll,
    )
    try:
        # the device writes agent.toml from it (tessera-agent enrollment-endpoint)
        extra = {"provisioner": args.provisioner,
                 "agent_toml": _agent_toml(args.agent_broker).decode()}
        if args.agent_broker is not None and "cafile_pem" in args.agent_broker:
            # the agent.toml of an mqtts:// broker names this file beside it
            extra["broker_ca"] = args.agent_broker["cafile_pem"].decode()
        device.deliver({**issued, **extra})
    except TesseraError as exc:
        raise CliError(
            f"{serial} is enrolled but did not take its credentials ({_one_line(exc)}); "
            "fix that and run again with --reenroll"
        ) from None
    if args.out:
        try:
            CredentialStore(args.out).save(issued)
            for name, data in _agent_files(None, args.agent_broker, issued).items():
                _write_atomic(args.out / name, data, "--out")
        except OSError as exc:
            raise CliError(f"{serial} is enrolled and holds its credentials, but the copy "
                           f"for --out {args.out} could not be written ({_why(exc)})") from None
    _emit(args, issued, f"enrolled {issued['identity']} ({issued['attestation']}) over the "
                        f"network; the device stored its credentials")


def _read_batch(path: str) -> list[dict[str, str]]:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CliError(f"--batch {path}: cannot read it ({_why(exc)})") from None
    try:
        text = data.decode("utf-8-sig")
        if "\0" in text:
            raise UnicodeDecodeError("utf-8", data, text.index("\0"), text.index("\0") + 1,
                                     "NUL byte")
    except UnicodeDecodeError as exc:
        raise CliError(f"--batch {path}: not a text CSV file (byte {exc.start} is not UTF-8 "
                       "text); pass a CSV with a header row serial,tpm|pkcs11,...") from None
    try:
        rows = list(csv.DictReader(text.splitlines()))
    except csv.Error as exc:
        raise CliError(f"--batch {path}: not valid CSV ({exc})") from None
    if not rows or "serial" not in rows[0]:
        raise CliError(f"--batch {path} needs a header row with at least: serial, and tpm or "
                       "pkcs11")
    return rows


def _enroll_batch(args: argparse.Namespace, client: Any) -> None:
    """Every row gets a verdict (done, skipped as done before, refused by the service,
    failed here) and the run goes on past bad rows; with --out a re-run skips the rows
    whose credentials are in place and finishes interrupted ones."""
    from device.provisioner import ServiceError

    rows = _read_batch(args.batch)
    root = Path(args.out) if args.out else None
    if root is not None:
        if root.exists() and not root.is_dir():
            raise CliError(f"--out {root} is not a directory; with --batch it is the "
                           "directory that gets one subdirectory per serial")
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CliError(f"--out {root}: cannot create it ({_why(exc)})") from None
    results: list[dict[str, Any]] = []
    width = 30
    interrupted = False
    for i, row in enumerate(rows, 1):
        serial = (row.get("serial") or "").strip()
        out = root / serial if root is not None and serial and "/" not in serial else None
        result: dict[str, Any] = {"serial": serial, "row": i}
        try:
            identity = _OutPlan(out, serial, replace=False).done_before() if out else None
            if identity is not None:
                result.update(status="skipped", ok=True, identity=identity)
            else:
                issued = _enroll_one(
                    args, client, serial, row.get("tpm") or None, row.get("pkcs11") or None,
                    row.get("key_dir") or None, row.get("device_class") or args.device_class,
                    out,
                )
                result.update(status="done", ok=True, identity=issued["identity"])
        except KeyboardInterrupt:
            interrupted = True
        except Refused as exc:
            result.update(status="refused", ok=False, error=_one_line(exc))
        except ServiceError as exc:
            status = "refused" if exc.answered else "failed"
            result.update(status=status, ok=False, error=_one_line(exc))
        except (TesseraError, CliError) as exc:
            result.update(status="failed", ok=False, error=_one_line(exc))
        except OSError as exc:
            result.update(status="failed", ok=False,
                          error=f"{_why(exc)}" + (f" ({exc.filename})" if exc.filename else ""))
        except Exception as exc:  # one bad row must not end the batch
            result.update(status="failed", ok=False, error=f"{type(exc).__name__}: "
                                                           f"{_one_line(exc)}")
        if interrupted:
            break
        results.append(result)
        interrupted = bool(_DEFERRED)  # Ctrl-C during a row: that row finished first
        if not args.json:
            line = f"{serial or '(row ' + str(i) + ')'}: {result['status']}"
            line += f": {result['error']}" if "error" in result else ""
            print(line, flush=True)
            done = int(width * i / len(rows))
            print(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{len(rows)}", end="",
                  file=sys.stderr, flush=True)
        if interrupted:
            break
    if not args.json:
        print(file=sys.stderr)
    counts = {s: sum(r["status"] == s for r in results)
              for s in ("done", "skipped", "refused", "failed")}
    ok = counts["done"] + counts["skipped"]
    summary = (f"enrolled {ok} of {len(rows)} devices ({counts['done']} now, "
               f"{counts['skipped']} before; {counts['refused']} refused, "
               f"{counts['failed']} failed)")
    if interrupted:
        summary += f"; interrupted after {len(results)} rows: run it again to resume"
    elif ok < len(rows) and root is not None:
        summary += "; fix the rows above and run it again: rows done are skipped"
    _emit(args, {"results": results, "enrolled": ok, **counts, "interrupted": interrupted},
          summary)
    if interrupted:
        raise KeyboardInterrupt
    if ok < len(rows):
        raise SystemExit(1)


def cmd_list(args: argparse.Namespace) -> None:
    query = f"?status={args.status}" if args.status else ""
    devices = _client(args).call("GET", "/v1/devices" + query)["devices"]
    rows = [
        (
            d["serial"],
            d["identity"],
            d["status"],
            d["attestation"],
            d["key_backend"],
            d["device_class"],
            d["enrolled_at"][:19],
            d["enrolled_by"],
        )
        for d in devices
    ]
    _emit(
        args,
        devices,
        _table(
            rows,
            ("serial", "identity", "status", "attestation", "key", "class", "enrolled (UTC)", "by"),
        )
        if rows
        else "no devices enrolled",
    )


def cmd_show(args: argparse.Namespace) -> None:
    serial = _check_serial(args.serial, "serial")
    d = _client(args).call("GET", f"/v1/devices/{serial}")
    _emit(args, d, "\n".join(f"{k:<24} {v}" for k, v in d.items()))


def cmd_revoke(args: argparse.Namespace) -> None:
    serial = _check_serial(args.serial, "serial")
    e = _client(args).call("POST", f"/v1/devices/{serial}/revoke", {"reason": args.reason})
    _emit(
        args,
        e,
        f"revoked {e['identity']} (event {e['id']}; certificates {', '.join(e['cert_serials'])})",
    )


def cmd_renew(args: argparse.Namespace) -> None:
    """Renewal records a new operational credential and leaves the old one valid, so
    it needs no journal: --out is checked before the service is asked, the new files
    replace the old ones all or nothing, and a run that fails to save simply runs again."""
    from device.provisioner import CredentialStore, renew, write_synced
    from hw import open_signer

    serial = _check_serial(args.serial, "--serial")
    if bool(args.tpm) == bool(args.pkcs11):
        raise CliError("give exactly one of --tpm TCTI (with --key-dir) or --pkcs11 SPEC")
    out: Path | None = args.out
    if out is not None:
        if out.is_symlink() or (out.exists() and not out.is_dir()):
            raise CliError(f"--out {out} exists and is not a directory; pass the device's "
                           "credentials directory")
        held = _OutPlan(out, serial, replace=True).done_before()
        if out.is_dir() and (out / "identity").exists() and held is None:
            raise CliError(f"--out {out} holds another device's credentials; pass {serial}'s")
        probe_dir = out if out.is_dir() else out.absolute().parent
        probe = probe_dir / f".renew-probe-{os.getpid()}"
        try:
            write_synced(probe, b"\0" * _SPACE_PROBE)
        except OSError as exc:
            raise CliError(f"--out {out}: cannot write there ({_why(exc)}); nothing was "
                           "renewed. Free space or choose a writable directory") from None
        finally:
            probe.unlink(missing_ok=True)
    client = _client(args, operator=False)
    spec = f"tpm:{args.tpm}#tessera-device" if args.tpm else f"pkcs11:{args.pkcs11}"
    options = {"key_dir": args.key_dir or f"{serial}-keys"} if args.tpm else {}
    signer = open_signer(spec, **options)
    try:
        with _SignalsHeld() as window:
            window.hold()  # renewal records in its last step: hold from the start
            issued = renew(client, signer, serial)
            _crash_point("renew:issued")
            if out is not None:
                try:
                    CredentialStore(out).save(issued)
                except OSError as exc:
                    raise CliError(
                        f"{serial} was renewed but the new credential could not be written to "
                        f"{out} ({_why(exc)}); the old one there is untouched and still valid. "
                        "Fix that and run the same command again") from None
    finally:
        getattr(signer, "close", lambda: None)()
    _emit(
        args, issued, f"renewed {issued['identity']}: valid until {issued['operational_not_after']}"
    )
    if _DEFERRED:
        raise KeyboardInterrupt


def cmd_export_bundle(args: argparse.Namespace) -> None:
    if args.dir_given:
        from provisioning.authority import FleetAuthority

        _service_config(args.dir)
        authority = FleetAuthority.open(args.dir)
        try:
            pem = authority.bundle_pem()
        finally:
            authority.close()
    else:
        pem = _client(args, operator=False).call("GET", "/v1/bundle", raw=True)
        from cryptography import x509

        try:
            x509.load_pem_x509_certificates(pem)
        except ValueError:
            raise CliError(f"{args.provisioner} sent no PEM certificate for /v1/bundle: is "
                           "--provisioner the Tessera service? Nothing was written") from None
    if args.output == "-":
        sys.stdout.write(pem.decode())
    else:
        _write_atomic(Path(args.output), pem, "-o")
        if not args.json:
            print(f"trust bundle written to {args.output}")


def cmd_export_attestation_keys(args: argparse.Namespace) -> None:
    """Fill a broker's ``plugin_opt_attestation_keys`` directory from the registry: one
    ``<serial>.akpub`` (the attestation key's marshalled TPM2B_PUBLIC, as enrollment
    proved it) per active device enrolled with a TPM, the layout
    ``broker_plugin.host.load_attestation_keys`` reads. ``*.akpub`` files of devices no
    longer active are removed; other files are left alone."""
    import base64
    import binascii

    from broker_plugin.stepup import parse_ak_public
    from provisioning.enrollment import check_serial

    if args.dir is not None:
        from provisioning.registry import open_registry

        with open_registry(_service_config(args.dir)["registry"]) as registry:
            keys = registry.attestation_keys()
        source = str(args.dir)
    else:
        devices = _client(args).call("GET", "/v1/devices?status=active")["devices"]
        if any("ak_public" not in d for d in devices):
            raise CliError(f"the provisioning service at {args.provisioner} does not report "
                           "attestation keys: upgrade it, or use --dir on its host")
        try:
            keys = {d["serial"]: base64.b64decode(d["ak_public"], validate=True)
                    for d in devices if d["kind"] == "device" and d["ak_public"]}
        except (binascii.Error, TypeError) as exc:
            raise CliError(f"the provisioning service sent a malformed ak_public: {exc}") from None
        source = args.provisioner
    for serial, ak_public in keys.items():
        try:
            check_serial(serial)  # it becomes a file name: no path separators
            parse_ak_public(ak_public)
        except TesseraError as exc:
            raise CliError(f"device {serial!r}: not exported, the broker plugin would refuse "
                           f"its attestation key ({exc.detail}); nothing written") from None
    target = Path(args.directory)
    removed = _write_akpub_files(target, keys)
    _emit(
        args,
        {"directory": str(target), "source": source, "written": sorted(keys),
         "removed": removed},
        f"{len(keys)} attestation key(s) written to {target}"
        + (f", removed {', '.join(removed)}" if removed else "")
        + "; SIGHUP the broker to load them",
    )


def _write_akpub_files(target: Path, keys: dict[str, bytes]) -> list[str]:
    """Make ``target`` hold exactly ``keys`` as ``<serial>.akpub`` files; the serials
    whose stale files were removed. Atomic where it matters: a new directory is filled
    under a temporary name and renamed into place; in an existing one every file is
    written (and synced) under a temporary name first, and only when all are written
    are they renamed over the old ones, so an error leaves the directory as it was and
    the broker never reads a half-written file."""
    import shutil
    import tempfile

    def write(path: Path, data: bytes) -> None:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        path.chmod(0o644)  # the broker reads it as its own user

    def sync_dir(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    if not target.exists():
        try:
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        except OSError as exc:
            raise CliError(f"cannot create {target}: {exc.strerror or exc}") from None
        try:
            for serial, data in keys.items():
                write(staging / f"{serial}.akpub", data)
            staging.chmod(0o755)
            staging.rename(target)
            sync_dir(target.parent)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise CliError(f"cannot create {target}: {exc.strerror or exc}; "
                           "nothing written") from None
        return []
    if not target.is_dir():
        raise CliError(f"{target} exists and is not a directory")
    staged: list[tuple[Path, Path]] = []
    renaming = False
    try:
        for serial, data in keys.items():
            final = target / f"{serial}.akpub"
            if final.is_dir():
                raise CliError(f"{final} is a directory; nothing changed in {target}")
            fd, name = tempfile.mkstemp(prefix=f".{serial}.", suffix=".tmp", dir=target)
            os.close(fd)
            staged.append((Path(name), final))
            write(Path(name), data)
        stale = sorted(p for p in target.glob("*.akpub")
                       if p.name[: -len(".akpub")] not in keys and not p.is_dir())
        renaming = True
        for tmp, final in staged:
            os.replace(tmp, final)
        staged = []
        for path in stale:
            path.unlink()
        sync_dir(target)
    except OSError as exc:
        done = "some files were replaced; run it again" if renaming else "nothing changed"
        raise CliError(f"cannot write attestation keys to {target}: "
                       f"{exc.strerror or exc}; {done}") from None
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    return [p.name[: -len(".akpub")] for p in stale]


def cmd_broker_config(args: argparse.Namespace) -> None:
    """Write a mosquitto.conf snippet that loads the Tessera plugin, after checking
    that the broker will be able to start with it."""
    from broker_plugin.build import BuildError, ensure_built, readable_by
    from broker_plugin.host import build_enforcer
    from broker_plugin.paths import ConfBounds

    try:
        bounds = ConfBounds(max_packet_size=args.max_packet_size,
                            max_connections=args.max_connections)
    except TesseraError as exc:
        raise CliError(f"--max-packet-size / --max-connections: {exc.detail}") from None
    host, _, port = args.listener.rpartition(":")
    if not host or not port.isdigit():
        raise CliError(f"--listener {args.listener!r}: expected HOST:PORT, e.g. 0.0.0.0:8883")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise CliError("TLS needs both --tls-cert and --tls-key")
    _check_pem(args.bundle, "--bundle", "the trust bundle 'tessera export-bundle' wrote")
    _check_pem(args.credential, "--credential", "this broker's credential PEM "
               "('tessera enroll --kind broker --out DIR' writes DIR/operational.pem)")
    options = {
        "python": sys.executable,
        "trust_domain": _broker_trust_domain(args),
        "bundle": args.bundle,
        "credential": args.credential,
        "key": _broker_key(args.key),
        "policy": args.policy,
    }
    for name in ("provisioner", "cafile", "audit_log", "pin_file", "key_dir"):
        value = getattr(args, name)
        if value:
            options[name] = value
    options.update(_step_up_options(args.plugin_opt or []))
    # Mosquitto resolves a relative path against its own working directory (/ under
    # systemd): every path goes into the conf absolute, as this shell meant it
    for name in _PATH_OPTIONS:
        if options.get(name):
            options[name] = _absolute(options[name])
    options["key"] = _absolute_key(options["key"])
    if not args.user or any(c.isspace() or c == "#" for c in args.user):
        raise CliError(f"--user {args.user!r}: not an account name; pass the account "
                       "mosquitto runs as (default mosquitto)")
    output = _own_output_or_refuse(args.output, args.check)
    joined = _read_mosquitto_conf(Path(args.check), skip=output) if args.check else []
    # started as root, Mosquitto drops to the account its 'user' line names (to
    # 'mosquitto' without one) before it loads the plugin, and refuses a second 'user'
    # line: the snippet carries it unless the conf it joins already names that account
    for where, key, rest in joined:
        if key == "user" and rest[:1] != [args.user]:
            raise CliError(f"{where}: user {' '.join(rest) or '(none)'}, but --user is "
                           f"{args.user} (the account checked for read access): pass --user "
                           f"{' '.join(rest)} or change this line")
    user_line = [] if any(key == "user" for _, key, _ in joined) else [f"user {args.user}"]
    # --state-dir: the plugin is built into DIR/plugin (as 'python -m broker_plugin.build
    # --state-dir DIR'), so the conf never points into a source checkout or site-packages
    plugin_dir = Path(_absolute(args.state_dir)) / "plugin" if args.state_dir else None
    try:
        plugin = ensure_built(plugin_dir)
    except BuildError as exc:
        raise CliError(exc.detail) from None
    # the broker starts with these options: refuse here, in one line, what it would refuse
    try:
        enforcer, signer = build_enforcer(options)
    except (ValueError, OSError) as exc:
        raise CliError(f"the plugin would refuse these options: {_one_line(exc)}") from None
    getattr(signer, "close", lambda: None)()
    if args.user:
        read, write = _broker_files(options)
        try:
            blocked = readable_by(args.user, plugin_dir, read=read, write=write)
        except KeyError:
            raise CliError(f"--user {args.user}: no such user; pass the account mosquitto "
                           "runs as") from None
        if blocked:  # all of them in the one line: fixed together, not one per run
            unread = [b for b in blocked if "cannot write" not in b]
            unwritten = [b.replace("cannot write: ", "") for b in blocked if b not in unread]
            what = "; ".join(
                [*([f"cannot read {', '.join(unread)}"] if unread else []),
                 *([f"cannot write {', '.join(unwritten)}"] if unwritten else [])])
            raise CliError(
                f"mosquitto drops to user {args.user} before it loads plugins, and that user "
                f"{what}: give {args.user} access (chown or chmod, or install Tessera where "
                f"{args.user} can read it), or pass --user with the account mosquitto runs as"
            )
    lines = [
        _CONF_HEADER,
        *user_line,
        "per_listener_settings false",
        "allow_anonymous false  # clients without the tessera-sa1 method are refused too",
        # step-up requests and AUTH answers are small packets: without this, Nagle and
        # delayed ACKs add ~40 ms to every step-up round trip (52 ms vs 7 ms measured)
        "# pre-authentication bounds (docs/MQTT.md): Mosquitto refuses a packet whose",
        "# declared length exceeds max_packet_size before buffering it; 2.0.11 has no",
        "# CONNECT timeout, so max_connections is what bounds idle and half-open sockets",
        *bounds.global_lines(),
        "# never set memory_limit: 2.0.x's memory count underflows with extended auth",
        f"listener {port} {host}",
        *bounds.listener_lines(),
    ]
    if args.tls_cert:
        lines += [f"certfile {_absolute(args.tls_cert)}",
                  f"keyfile {_absolute(args.tls_key)}"]
    lines.append(f"plugin {plugin}")
    lines += [f"plugin_opt_{k} {v}" for k, v in options.items()]
    # the broker runs with the conf it joins plus this snippet: check them together
    snippet = [(f"<snippet>:{n}", *_words(line)) for n, line in enumerate(lines, 1)
               if _words(line)]
    problems = _conf_problems(joined, snippet)
    if problems:
        raise CliError(problems[0])
    text = "\n".join(lines) + "\n"
    if output is None:
        sys.stdout.write(text)
    else:  # a new file, or this command's own earlier output: replaced atomically
        _write_atomic(output, text.encode(), "-o")
        if not args.json:
            print(f"mosquitto configuration written to {args.output} "
                  f"(policy {enforcer.policy.digest.hex()[:12]}; started as root, mosquitto "
                  f"runs as user {args.user})")


def _broker_files(options: dict[str, str]) -> tuple[tuple[Path, ...], tuple[Path, ...]]:
    """What the plugin reads (its identity files, policy, PIN, CA, a software key, the
    attestation keys; SoftHSM2's configuration and token directory for a SoftHSM2 key)
    and writes (the audit log, the nonce and revocation files) as the broker's user."""
    read = [Path(options[k]) for k in ("bundle", "credential", "policy", "pin_file",
                                       "cafile", "attestation_keys", "key_dir")
            if options.get(k)]
    key = options["key"]
    if key.startswith("insecure-software:"):
        read.append(Path(key.removeprefix("insecure-software:")))
    elif key.startswith("pkcs11:") and "softhsm" in key.split("#", 1)[0].lower():
        conf = os.environ.get("SOFTHSM2_CONF")
        if conf:  # the broker needs the same SOFTHSM2_CONF (docs/MQTT.md)
            read.append(Path(conf))
            tokens = _softhsm_token_dir(Path(conf))
            if tokens is not None:  # and its tokens
                read.append(tokens)
    write = [Path(options[k]) for k in ("audit_log", "nonce_file", "revocation_file")
             if options.get(k)]
    return tuple(read), tuple(write)


def _softhsm_token_dir(conf: Path) -> Path | None:
    try:
        for line in conf.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip() == "directories.tokendir":
                return Path(value.strip())
    except (OSError, UnicodeDecodeError):
        pass
    return None


#: the first line of every file 'broker config' writes: how it knows its own output,
#: which a later run replaces (and --check does not count as joined configuration)
_CONF_HEADER = "# Tessera: written by 'tessera broker config'"
#: plugin options that name a file or directory (written absolute)
_PATH_OPTIONS = ("bundle", "credential", "policy", "pin_file", "key_dir", "cafile",
                 "audit_log", "attestation_keys", "nonce_file", "revocation_file")


def _absolute(path: str | Path) -> str:
    """``path`` made absolute against this process's working directory; symlinks are
    kept (a 'current' link stays a link)."""
    return os.path.abspath(path)


def _absolute_key(spec: str) -> str:
    """--key with its file made absolute: the PEM of ``insecure-software:``, the module
    of ``pkcs11:`` when given as a relative path (a bare library name is left to the
    loader's search path); a ``tpm:`` TCTI is not a path."""
    if spec.startswith("insecure-software:"):
        return "insecure-software:" + _absolute(spec.removeprefix("insecure-software:"))
    if spec.startswith("pkcs11:"):
        module, sep, rest = spec.removeprefix("pkcs11:").rpartition("#")
        if sep and "/" in module and not module.startswith("/"):
            return f"pkcs11:{_absolute(module)}#{rest}"
    return spec


def _is_own_output(path: Path) -> bool:
    """Whether ``path`` is a file 'broker config' wrote: its first line is the header."""
    try:
        with open(path, "rb") as f:
            first = f.readline(len(_CONF_HEADER) + 2)
    except OSError:
        return False
    return first.rstrip(b"\r\n") == _CONF_HEADER.encode()


def _own_output_or_refuse(output: str, check: str | None) -> Path | None:
    """The -o file (None: stdout). An existing one must be this command's earlier
    output (it is replaced); anything else is refused before anything is built."""
    if output == "-":
        return None
    path = Path(output)
    if path.is_dir():
        raise CliError(f"-o {path} is a directory; name a file")
    if (path.exists() or path.is_symlink()) and not _is_own_output(path):
        raise CliError(f"-o {path} exists and was not written by 'tessera broker config'; "
                       "nothing was changed: pass a different -o or remove that file")
    if check and path.exists() and Path(check).exists() and path.samefile(check):
        raise CliError(f"--check {check} is the -o file; pass the mosquitto.conf that "
                       "includes it (its include_dir)")
    return path


def cmd_audit_verify(args: argparse.Namespace) -> None:
    """The broker audit log's hash chain, checked by broker_plugin.audit."""
    from broker_plugin.audit import load_key, verify_chain

    key = load_key(args.key_file) if args.key_file is not None else None
    result = verify_chain(args.files, key=key, from_genesis=not args.partial,
                          expect_head=args.expect_head)
    if not result.ok:
        raise CliError(result.verdict().removeprefix("FAIL: "))
    _emit(args, {"ok": True, "records": result.records, "first_seq": result.first_seq,
                 "last_seq": result.last_seq, "head": result.head}, result.verdict())


#: plugin options 'broker config' sets from its own flags (--plugin-opt refers to them)
_FLAG_OPTIONS = {"python": None, "trust_domain": "--trust-domain", "bundle": "--bundle",
                 "credential": "--credential", "key": "--key", "pin_file": "--pin-file",
                 "key_dir": "--key-dir", "policy": "--policy", "provisioner": "--provisioner",
                 "cafile": "--cafile", "audit_log": "--audit-log"}
#: the other options the plugin reads (broker_plugin/host.py's module doc; the step-up
#: and quarantine knobs come from broker_plugin.stepup, fan-out from broker_plugin.host):
#: listed here because the plugin has no registry of them; test_cli_broker_config's
#: check against the host's documentation keeps the two in step
_PLAIN_OPTIONS = ("direct", "metrics_port", "attestation_keys", "nonce_file",
                  "nonce_database", "nonce_poll_s", "quarantine_database", "revocation_file",
                  "revocation_grace_s", "revocation_stale", "session_epoch_ms",
                  "session_skew_epochs", "session_lifetime_s", "session_replay_window",
                  "pending_timeout_s", "pending_max", "pending_per_source",
                  "pending_per_client")


def _known_plugin_options() -> list[str]:
    from broker_plugin.host import FANOUT_OPTIONS
    from broker_plugin.stepup import STEP_UP_OPTIONS

    return sorted({*_PLAIN_OPTIONS, *FANOUT_OPTIONS, *STEP_UP_OPTIONS})


def _step_up_options(pairs: list[str]) -> dict[str, str]:
    """``NAME=VALUE`` plugin options: known names only (each flag's own option through
    its flag), the step-up / quarantine knobs checked by the plugin's own parser, the
    others by build_enforcer (or here, for what only the running plugin reads)."""
    from broker_plugin.stepup import STEP_UP_OPTIONS, parse_settings

    known = _known_plugin_options()
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        name = name.strip().removeprefix("plugin_opt_")
        if sep and name in _FLAG_OPTIONS:
            flag = _FLAG_OPTIONS[name]
            raise CliError(f"--plugin-opt {pair!r}: {name} is set by "
                           f"{flag or 'this command (the running Python)'}; use that")
        if not sep or name not in known or not value.strip():
            raise CliError(f"--plugin-opt {pair!r}: expected NAME=VALUE with NAME one of "
                           f"{', '.join(known)}")
        out[name] = value.strip()
    port = out.get("metrics_port")
    if port is not None and not (port.isdigit() and 0 <= int(port) <= 65535):
        raise CliError(f"--plugin-opt metrics_port={port}: a TCP port 1..65535, or 0 for a "
                       "free one")
    parse_settings({k: v for k, v in out.items() if k in STEP_UP_OPTIONS})
    return out


def _broker_key(spec: str) -> str:
    """--key as other commands take a key: ``pkcs11:<module>#<token>/<label>`` or
    without the prefix (as --pkcs11 takes it), ``tpm:<tcti>#<name>``, and for
    development ``insecure-software:<pem>``."""
    if spec.startswith(("pkcs11:", "tpm:", "insecure-software:")):
        return spec
    module, sep, rest = spec.rpartition("#")
    if sep and module and "/" in rest:
        return f"pkcs11:{spec}"
    raise CliError(f"--key {spec!r}: expected [pkcs11:]<module>#<token>/<label> (as "
                   "'tessera enroll --pkcs11' takes it) or tpm:<tcti>#<name>")


def _broker_trust_domain(args: argparse.Namespace) -> str:
    """The credential's trust domain; --trust-domain, when given, must be that one (a
    broker in another domain would refuse every device of this fleet)."""
    from structauth.credentials import Credential

    try:
        cred = Credential.from_pem(Path(args.credential).read_bytes())
    except (TesseraError, ValueError) as exc:
        raise CliError(f"--credential {args.credential}: not a Tessera credential "
                       f"({_one_line(exc)}); pass the broker's operational.pem") from None
    identity = cred.identity
    if identity.kind != "broker":
        raise CliError(f"--credential {args.credential} is {identity}, not a broker; enroll "
                       "the broker with 'tessera enroll --kind broker' and pass its "
                       "operational.pem")
    domain = str(identity.trust_domain)
    if args.trust_domain and args.trust_domain != domain:
        raise CliError(f"--trust-domain {args.trust_domain} is not the trust domain of "
                       f"--credential {args.credential} ({identity}); pass "
                       f"--trust-domain {domain} or leave it out")
    return domain


def _words(line: str) -> tuple[str, ...]:
    return tuple(line.split("#", 1)[0].split())


def _read_mosquitto_conf(path: Path, skip: Path | None = None
                         ) -> list[tuple[str, str, list[str]]]:
    """(file:line, key, arguments) of every setting, in the order Mosquitto reads them
    (an ``include_dir``'s ``*.conf`` files in place, sorted). ``skip``, the file being
    replaced (this command's earlier output), is left out: the new snippet takes its
    place."""
    entries: list[tuple[str, str, list[str]]] = []
    seen: set[Path] = set()
    replaced = skip if skip is not None and skip.exists() else None

    def read(conf: Path) -> None:
        if conf in seen:
            return
        seen.add(conf)
        if replaced is not None and conf != path and conf.exists() and conf.samefile(replaced):
            return
        try:
            lines = conf.read_text(errors="replace").splitlines()
        except OSError as exc:
            raise CliError(f"--check {conf}: cannot read it ({exc.strerror})") from None
        for number, raw in enumerate(lines, 1):
            words = _words(raw)
            if not words:
                continue
            entries.append((f"{conf}:{number}", words[0], list(words[1:])))
            if words[0] == "include_dir" and len(words) > 1:
                directory = Path(words[1])
                if not directory.is_absolute():
                    directory = conf.parent / directory
                for included in sorted(directory.glob("*.conf")):
                    read(included)

    read(path)
    return entries


def _conf_problems(joined: list[tuple[str, str, list[str]]],
                   snippet: list[tuple[str, ...]]) -> list[str]:
    """What would make the broker unsafe with the mosquitto.conf it joins (``joined``,
    possibly empty) plus the snippet: settings that break the plugin, and missing or
    unlimited pre-authentication bounds (broker_plugin.paths.CONF_LIMITS), each as
    "file:line: what; the fix"."""
    from broker_plugin.paths import CONF_LIMITS

    problems: list[str] = []
    entries: list[tuple[str, str, list[str]]] = [(w, k, list(a)) for w, k, a in joined]
    entries += [(e[0], e[1], list(e[2:])) for e in snippet]
    # listener sections: the settings before the first "listener" belong to the default
    # listener ("port"); max_connections applies to the listener it follows
    sections: list[tuple[str, bool]] = []  # (where the listener is declared, bounded)
    default: str | None = None
    default_bounded = False
    seen: set[str] = set()
    for index, (where, key, rest) in enumerate(entries):
        ours = index >= len(joined)
        seen.add(key)
        value = rest[0] if rest else ""
        if key == "memory_limit":
            problems.append(f"{where}: remove memory_limit: Mosquitto 2.0.x's memory "
                            "accounting underflows with extended auth and then refuses "
                            "every allocation")
        elif key == "per_listener_settings" and value == "true":
            problems.append(f"{where}: per_listener_settings true stops Mosquitto 2.0.x "
                            "from ticking the plugin (revocation and step-up stall); set "
                            "it to false")
        elif key == "plugin" and value.endswith("tessera_mosquitto.so") and not ours:
            problems.append(f"{where}: the Tessera plugin is already loaded here; "
                            "remove this line or do not include the new snippet")
        elif key == "check_retain_source" and value == "true":
            problems.append(f"{where}: remove check_retain_source true: it re-checks a "
                            "retained message's publisher through a fake connection, which "
                            "the plugin refuses as a Will (retained messages would never "
                            "be delivered)")
        elif key == "set_tcp_nodelay" and value != "true":
            problems.append(f"{where}: set_tcp_nodelay must stay true (step-up and AUTH "
                            "round trips wait for delayed ACKs without it)")
        elif key == "allow_anonymous" and value != "false":
            problems.append(f"{where}: allow_anonymous must be false (clients without "
                            "the tessera-sa1 method must never be let in)")
        elif key in CONF_LIMITS:
            low, high = CONF_LIMITS[key]
            try:
                number = int(value)
            except ValueError:
                number = None
            if number is None or not low <= number <= high:
                what = "unlimited" if number is not None and number <= 0 else "out of bounds"
                problems.append(f"{where}: {key} {value or '(none)'} is {what}; use "
                                f"{low}..{high} (it bounds what an unauthenticated client "
                                "can cost the broker)")
            elif key == "max_connections":
                if sections:
                    sections[-1] = (sections[-1][0], True)
                else:
                    default_bounded = True
        if key == "listener":
            sections.append((where, False))
        elif key == "port" and not sections:
            default = where
    for where, bounded in sections + ([(default, default_bounded)] if default else []):
        if not bounded:
            problems.append(f"{where}: this listener has no max_connections; add "
                            "'max_connections N' after it (2.0.11 has no CONNECT timeout, "
                            "so nothing else bounds idle or half-open connections)")
    for key in ("max_packet_size", "max_inflight_messages", "max_queued_messages",
                "max_queued_bytes", "set_tcp_nodelay"):
        if key not in seen:
            problems.append(f"<snippet>: {key} is missing (a pre-authentication bound)")
    return problems


# -- parser ------------------------------------------------------------------------


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tessera")
    except PackageNotFoundError:  # a source checkout that was never installed
        return "unknown"


class _Parser(argparse.ArgumentParser):
    """Usage errors follow the CLI's rule: one line on stderr, exit 1 (argparse's own
    is the usage block and exit 2)."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


class _UsageError(CliError):
    """A command line argparse refused (reason "usage" in a JSON error)."""


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="tessera", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--json", action="store_true",
                   help="machine-readable output, errors included (anywhere on the line)")
    p.add_argument("--version", action="version", version=f"tessera {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def remote(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--provisioner",
            default=DEFAULT_URL,
            help="service URL (env TESSERA_PROVISIONER; default %(default)s)",
        )
        sp.add_argument("--token-file", help="operator token file (else TESSERA_OPERATOR_TOKEN)")
        sp.add_argument(
            "--cafile",
            default=os.environ.get("TESSERA_CAFILE"),
            help="CA bundle to verify the service's TLS certificate (env TESSERA_CAFILE)",
        )

    s = sub.add_parser("init", help="create a fleet authority and registry")
    s.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="authority directory")
    s.add_argument("--trust-domain", required=True, help="e.g. factory.example.com")
    s.add_argument("--pkcs11-module", help="PKCS#11 module holding the authority key")
    s.add_argument("--token", help="PKCS#11 token label")
    s.add_argument("--key-label", default="tessera-authority")
    s.add_argument("--pin-file", help="file with the token PIN (else TESSERA_PKCS11_PIN)")
    s.add_argument(
        "--insecure-file-key",
        action="store_true",
        help="DEVELOPMENT ONLY: keep the authority key in a file",
    )
    s.add_argument("--registry", help="registry URL (default: SQLite in --dir; or postgresql://)")
    s.add_argument(
        "--tpm-maker-roots",
        nargs="*",
        default=[],
        metavar="PEM",
        help="CA certificates of TPM makers whose EK certificates are accepted",
    )
    s.add_argument("--operator", default="admin", help="name of the first operator")
    s.add_argument("--operational-lifetime", type=_lifetime, default=24 * 60,
                   metavar="MINUTES",
                   help=f"operational credential lifetime, {MIN_LIFETIME}..{MAX_LIFETIME} "
                        "(default %(default)s)")
    s.set_defaults(func=cmd_init)

    s = sub.add_parser("serve", help="run the provisioning service")
    s.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=_port, default=8443)
    s.add_argument("--tls-cert")
    s.add_argument("--tls-key")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="default %(default)s")
    s.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="text (default) or one JSON object per line (ts, level, logger, "
                        "message), on stderr")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("roots", help="the TPM maker CA certificates the service accepts")
    rsub = s.add_subparsers(dest="roots_command", required=True, metavar="ACTION")
    r = rsub.add_parser("add", help="accept EK certificates chaining to these CA files")
    r.add_argument("pem", nargs="+", metavar="PEM",
                   help="PEM files: the maker's root and its intermediates")
    r.set_defaults(func=cmd_roots_add)
    r2 = rsub.add_parser("list", help="each maker certificate and its chain")
    r2.set_defaults(func=cmd_roots_list)
    r3 = rsub.add_parser("remove", help="stop accepting a maker CA file")
    r3.add_argument("which", metavar="FINGERPRINT|SUBJECT|FILE",
                    help="SHA-256 fingerprint (8+ hex digits), subject (as listed) or file")
    r3.set_defaults(func=cmd_roots_remove)
    for sp in (r, r2, r3):
        sp.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="authority directory")

    s = sub.add_parser("enroll", help="enroll a device")
    remote(s)
    s.add_argument("--serial")
    s.add_argument("--tpm", metavar="TCTI", help="device TPM, e.g. device:/dev/tpmrm0")
    s.add_argument("--key-dir", help="where the TPM-wrapped key blobs live")
    s.add_argument("--pkcs11", metavar="SPEC", help="<module>#<token>/<key> (factory-witnessed)")
    s.add_argument("--device", metavar="URL",
                   help="a device on the network running 'tessera-agent enrollment-endpoint'")
    s.add_argument("--device-code", help="its pairing code (else TESSERA_DEVICE_CODE)")
    s.add_argument("--kind", default="device", choices=("device", "broker"))
    s.add_argument("--device-class", default="default")
    s.add_argument(
        "--reenroll",
        action="store_true",
        help="replace an existing enrollment (revokes the old credentials)",
    )
    s.add_argument(
        "--batch", metavar="CSV", help="enroll every row: serial,tpm|pkcs11,key_dir,device_class"
    )
    s.add_argument("--out", type=Path,
                   help="write the device's agent state directory here: credentials, "
                        "agent.json, agent.toml ('tessera-agent run --state DIR')")
    s.add_argument("--broker", metavar="URL",
                   help="the MQTT broker the agent connects to, mqtt://HOST[:PORT] or "
                        "mqtts://HOST[:PORT], written to --out's agent.toml")
    s.add_argument("--broker-identity", metavar="SPIFFE_ID",
                   help="that broker's identity, spiffe://<trust domain>/broker/<name>")
    s.add_argument("--broker-cafile", metavar="PEM",
                   help="mqtts: the CA certificate of the broker's TLS certificate (copied "
                        "into --out as broker-ca.pem)")
    add_ble_arguments(s)
    s.set_defaults(func=cmd_enroll)

    s = sub.add_parser("list", help="list devices")
    remote(s)
    s.add_argument("--status", choices=("active", "revoked"))
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("show", help="show one device")
    remote(s)
    s.add_argument("serial")
    s.set_defaults(func=cmd_show)

    s = sub.add_parser("revoke", help="revoke a device")
    remote(s)
    s.add_argument("serial")
    s.add_argument("--reason", default="unspecified")
    s.set_defaults(func=cmd_revoke)

    s = sub.add_parser("renew", help="renew a local device's operational credential")
    remote(s)
    s.add_argument("--serial", required=True)
    s.add_argument("--tpm", metavar="TCTI")
    s.add_argument("--key-dir")
    s.add_argument("--pkcs11", metavar="SPEC")
    s.add_argument("--out", type=Path)
    s.set_defaults(func=cmd_renew)

    s = sub.add_parser("broker", help="broker plugin helpers")
    bsub = s.add_subparsers(dest="broker_command", required=True, metavar="COMMAND")
    b = bsub.add_parser("config", help="write a mosquitto.conf snippet for the Tessera plugin")
    b.add_argument("--trust-domain",
                   help="the fleet's trust domain (default: the --credential's; another one "
                        "is refused)")
    b.add_argument("--bundle", required=True, help="trust bundle PEM (tessera export-bundle)")
    b.add_argument("--credential", required=True, help="this broker's credential PEM")
    b.add_argument("--key", required=True,
                   help="its key: [pkcs11:]<module>#<token>/<label> (the prefix is optional, "
                        "as with 'tessera enroll --pkcs11') or tpm:<tcti>#<name>")
    b.add_argument("--state-dir", type=Path, metavar="DIR",
                   help="build the plugin into DIR/plugin and point the conf there (default: "
                        "$TESSERA_PLUGIN_DIR, else ~/.local/state/tessera/plugin when "
                        "installed)")
    b.add_argument("--pin-file", help="PKCS#11 PIN file for the broker's key")
    b.add_argument("--key-dir", help="TPM key blob directory (tpm: keys)")
    b.add_argument("--policy", required=True, help="TOML topic policy")
    b.add_argument("--provisioner", help="provisioning service URL (revocation feed)")
    b.add_argument("--cafile", help="CA bundle for the provisioner's TLS certificate")
    b.add_argument("--audit-log", help="hash-chained JSON-lines audit log path")
    b.add_argument("--listener", default="0.0.0.0:8883", metavar="HOST:PORT")
    b.add_argument("--tls-cert")
    b.add_argument("--tls-key")
    b.add_argument("--user", default="mosquitto",
                   help="account mosquitto runs plugins as (checked for read access)")
    b.add_argument("-o", "--output", default="-", help="file (default: stdout)")
    b.add_argument("--plugin-opt", action="append", metavar="NAME=VALUE",
                   help="another plugin option (e.g. quarantine_failures=3, metrics_port="
                        "9101), checked as the plugin checks it; unknown names are refused "
                        "with the list; repeatable")
    b.add_argument("--max-packet-size", type=int, default=262_144, metavar="BYTES",
                   help="largest MQTT packet the broker reads, checked before it buffers "
                        "one: msg1 (~2 KB) and the largest proven message (default 256 KiB)")
    b.add_argument("--max-connections", type=int, default=1000, metavar="N",
                   help="connections on the listener (Mosquitto 2.0.11 has no CONNECT "
                        "timeout: this bounds idle and half-open sockets; default 1000)")
    b.add_argument("--check", metavar="MOSQUITTO_CONF",
                   help="the mosquitto.conf this snippet joins (include_dir followed): "
                        "refuse memory_limit, per_listener_settings true, a second Tessera "
                        "plugin line, check_retain_source true, set_tcp_nodelay false, "
                        "allow_anonymous true, a listener without max_connections and "
                        "unlimited or oversized packet, connection and queue bounds")
    b.set_defaults(func=cmd_broker_config)

    s = sub.add_parser("audit", help="broker audit log tools")
    asub = s.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    a = asub.add_parser("verify", help="check the hash chain of broker audit log files")
    a.add_argument("files", nargs="+", type=Path, metavar="FILE",
                   help="log files, oldest first: audit.jsonl.2 audit.jsonl.1 audit.jsonl")
    a.add_argument("--key-file", type=Path, help="HMAC key of the log, one line of hex")
    a.add_argument("--partial", action="store_true",
                   help="accept a chain whose first records were rotated away")
    a.add_argument("--expect-head", metavar="HASH", help="an anchored head hash")
    a.set_defaults(func=cmd_audit_verify)

    s = sub.add_parser("export-bundle", help="write the trust bundle")
    remote(s)
    s.add_argument("--dir", type=Path, help="read it from an authority directory instead")
    s.add_argument("-o", "--output", default="-", help="file (default: stdout)")
    s.set_defaults(func=cmd_export_bundle)

    s = sub.add_parser("export-attestation-keys",
                       help="write enrolled attestation keys for the broker plugin")
    remote(s)
    s.add_argument("directory", type=Path,
                   help="the broker's plugin_opt_attestation_keys directory")
    s.add_argument("--dir", type=Path,
                   help="read the registry of this authority directory instead of the service")
    s.set_defaults(func=cmd_export_attestation_keys)
    return p


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


class _Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so that undo code runs as for Ctrl-C."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated


_JSON_ERRORS = False  # --json anywhere on the line: errors are one JSON object too


def _fail(message: str, reason: str | None = None, code: int = 1) -> int:
    if _JSON_ERRORS:  # the shape tessera-agent's errors have too (docs/ENROLLMENT.md)
        print(json.dumps({"error": message, "reason": reason, "exit": code}), file=sys.stderr)
    else:
        print(f"tessera: error: {message}" if code == 1 else f"tessera: {message}",
              file=sys.stderr)
    return code


def _json_anywhere(argv: Sequence[str]) -> tuple[list[str], bool]:
    """``--json`` may come anywhere (``tessera list --json``, as scripts write it), not
    only before the command; it is taken out and applied to the whole line. After
    ``--`` everything is an argument."""
    args = list(argv)
    cut = args.index("--") if "--" in args else len(args)
    head = [a for a in args[:cut] if a != "--json"]
    return head + args[cut:], len(head) != cut


def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes: 0 done; 1 an error (one line on stderr: what, where, the fix; usage
    errors included); 130 interrupted by SIGINT or SIGTERM (what was left is finished by
    running the same command again)."""
    global _JSON_ERRORS
    words, as_json = _json_anywhere(sys.argv[1:] if argv is None else argv)
    _JSON_ERRORS = as_json
    try:
        args = build_parser().parse_args(words)
        args.json = as_json
        if args.command == "export-bundle":
            args.dir_given = args.dir is not None
        if args.command != "serve":  # uvicorn handles SIGTERM for serve
            signal.signal(signal.SIGTERM, _on_sigterm)
        args.func(args)
    except TesseraError as exc:
        return _fail(_one_line(exc), exc.reason.name.lower())
    except CliError as exc:
        return _fail(_one_line(exc), "usage" if isinstance(exc, _UsageError) else None)
    except KeyboardInterrupt:
        return _fail("interrupted; nothing is half-done: run the same command again to "
                     "finish", "interrupted", 130)
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        return _fail(f"{_why(exc)}{where}")
    except Exception as exc:
        if os.environ.get("TESSERA_DEBUG"):
            raise
        return _fail(f"unexpected {type(exc).__name__}: {_one_line(exc)} (a bug: please report "
                     "it; TESSERA_DEBUG=1 shows where)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
