"""`tessera init`, `tessera serve` and `tessera roots`: the factory station's fleet
authority (key in a PKCS#11 token, created all or nothing), the provisioning service
it runs, and the TPM maker roots that service trusts."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import ssl
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from provisioning.cli_support import (
    SERVICE_FILE,
    CliError,
    _crash_point,
    _emit,
    _half_made,
    _maker_roots,
    _one_line,
    _service_config,
    _table,
    _why,
    _write_atomic,
)
from structauth.errors import TesseraError

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
