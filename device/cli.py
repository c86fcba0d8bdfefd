"""`tessera-agent`: the device side.

    tessera-agent enroll [--provisioner URL] --serial S (--tpm TCTI | --pkcs11 SPEC)
    tessera-agent enrollment-endpoint --serial S --tpm TCTI [--listen HOST:PORT]
    tessera-agent renew  [--provisioner URL] [--watch]
    tessera-agent run    --config /etc/tessera/agent.toml  (or --state DIR)
    tessera-agent persist-key --handle 0x81000010   (TPM: the key at a persistent handle)
    tessera-agent install-service [--root DIR] [--dry-run] [--force]   (the systemd files)

Enrollment runs at the factory: either on the device with the operator's token
(TESSERA_OPERATOR_TOKEN), or from the station (`tessera enroll --device URL`) while the
device runs its enrollment endpoint, which needs no token, only the pairing code it
shows. Renewal needs only the device's own hardware key. The provisioning service is
--provisioner URL, else $TESSERA_PROVISIONER (renew: else the URL enrollment recorded).

Everywhere: --json (anywhere on the line) for machine-readable output, errors included;
--log-level and --log-format text|json; --version. With --json an error is
{"error": "<one line>", "reason": "<reason name>" or null, "exit": N} on stderr, as
`tessera --json` prints it.
Exit codes: 0 done; 1 an error (one line on stderr: what, where, the fix; usage and
configuration errors included); 3 revoked (the broker refused this device as revoked:
re-enroll it; systemd does not restart the agent then); 130 interrupted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import random
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from cryptography import x509

from device.ble_args import add_arguments as add_ble_arguments
from device.ble_args import add_send_arguments, add_serve_arguments
from structauth.errors import ConfigurationError, TesseraError

STATE_DIR = Path(os.environ.get("TESSERA_STATE_DIR", "/var/lib/tessera"))
PROVISIONER_ENV = "TESSERA_PROVISIONER"
DEFAULT_CONFIG = Path("/etc/tessera/agent.toml")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_REVOKED = 3  # device.agent.EXIT_REVOKED (not imported here: paho is an extra)
EXIT_INTERRUPTED = 130

#: Python packages of the extras, and the extra that brings each
_EXTRAS = {
    "paho": ("paho-mqtt", "device-tpm"),
    "tpm2_pytss": ("tpm2-pytss", "device-tpm"),
    "pkcs11": ("python-pkcs11", "device-pkcs11"),
    "cryptography": ("cryptography", "device-tpm"),
    "bumble": ("bumble", "ble"),
    "bleak": ("bleak", "ble"),
}


def version() -> str:
    """The installed distribution's version (importlib.metadata), e.g. ``0.2.0``."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("tessera")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _emit(args: argparse.Namespace, text: str, **data: Any) -> None:
    """One result: a line of text, or with --json one JSON object."""
    if getattr(args, "json", False):
        print(json.dumps(data, default=str), flush=True)
    else:
        print(text, flush=True)


class _JsonFormatter(logging.Formatter):
    """One JSON object per log record: time, level, logger, message (and the error)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and record.exc_info[1] is not None:
            out["error"] = f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
        return json.dumps(out)


def setup_logging(level: str, fmt: str) -> None:
    """Logging to stderr (journald takes it from there) at ``level``, as text or JSON."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


def cmd_enroll(args: argparse.Namespace) -> None:
    from device.provisioner import (
        ProvisionerClient,
        enroll_tpm,
        enroll_witnessed,
    )
    from hw import open_signer

    if bool(args.tpm) == bool(args.pkcs11):
        raise ConfigurationError("give exactly one of --tpm TCTI or --pkcs11 SPEC")
    if not args.provisioner:
        raise ConfigurationError(f"no provisioning service: pass --provisioner URL or set "
                                 f"{PROVISIONER_ENV}")
    token = os.environ.get("TESSERA_OPERATOR_TOKEN")
    if not token:
        raise ConfigurationError(
            "enrollment needs the factory operator's token in TESSERA_OPERATOR_TOKEN"
        )
    client = ProvisionerClient(args.provisioner, operator_token=token, cafile=args.cafile)
    key_dir = args.key_dir or str(args.state_dir / "keys")
    if args.tpm:
        from hw.tpm import TpmBackend

        with TpmBackend(args.tpm, Path(key_dir)) as backend:
            issued = enroll_tpm(client, backend, args.serial, device_class=args.device_class,
                                reenroll=args.reenroll)
        state = {"backend": "tpm", "tcti": args.tpm, "key_dir": key_dir}
    else:
        signer = open_signer(f"pkcs11:{args.pkcs11}", create=True)
        try:
            issued = enroll_witnessed(client, signer, args.serial,
                                      device_class=args.device_class, reenroll=args.reenroll)
        finally:
            getattr(signer, "close", lambda: None)()
        state = {"backend": "pkcs11", "pkcs11": args.pkcs11}
    _save(args.state_dir, state, args.serial, args.provisioner, issued)
    _enrolled(args, issued)


def _enrolled(args: argparse.Namespace, issued: dict[str, Any]) -> None:
    # 'attestation' is absent from what some services send (a witnessed enrollment)
    how = issued.get("attestation")
    _emit(args, f"enrolled as {issued['identity']}" + (f" ({how})" if how else ""),
          identity=issued["identity"], attestation=how, state_dir=str(args.state_dir))


def _save(
    state_dir: Path, state: dict[str, Any], serial: str, provisioner: str | None,
    issued: dict[str, Any],
) -> None:
    from device.provisioner import save_device_state

    # the station's agent.toml (run --state DIR) and broker CA with the credentials and
    # agent.json, all or nothing; an operator's agent.toml already here is kept
    state.update({"serial": serial, "provisioner": provisioner, "identity": issued["identity"]})
    save_device_state(state_dir, state, issued)


def cmd_enrollment_endpoint(args: argparse.Namespace) -> None:
    from device.enrollment_endpoint import EnrollmentEndpoint
    from device.provisioner import LocalTpm
    from hw.tpm import TpmBackend

    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigurationError(f"--listen {args.listen!r}: expected HOST:PORT")
    code = None
    if args.code_file and args.code_file.exists():
        code = args.code_file.read_text().strip() or None
    key_dir = args.key_dir or str(args.state_dir / "keys")
    state = {"backend": "tpm", "tcti": args.tpm, "key_dir": key_dir}
    with TpmBackend(args.tpm, Path(key_dir)) as backend:
        endpoint = EnrollmentEndpoint(
            LocalTpm(backend),
            args.serial,
            lambda issued: _save(args.state_dir, state, args.serial,
                                 issued.get("provisioner"), issued),
            host=host.strip("[]"),
            port=int(port),
            code=code,
        )
        if args.code_file and code is None:
            args.code_file.write_text(endpoint.code + "\n")
            args.code_file.chmod(0o600)
        _emit(args, f"enrollment endpoint for {args.serial} on {endpoint.url}\n"
              f"pairing code: {endpoint.code}", serial=args.serial, url=endpoint.url,
              pairing_code=endpoint.code)
        if not endpoint.serve_until_enrolled(args.timeout):
            raise ConfigurationError(f"not enrolled within {args.timeout:.0f} s; nothing stored")
    assert endpoint.issued is not None
    _enrolled(args, endpoint.issued)


def cmd_ble_sa1_serve(args: argparse.Namespace) -> None:
    from device.ble_sa1_cli import serve_command  # bumble: the ble extra

    serve_command(args)


def cmd_ble_sa1_send(args: argparse.Namespace) -> None:
    from device.ble_sa1_cli import send_command  # bleak: the ble extra

    send_command(args)


def cmd_ble_enroll(args: argparse.Namespace) -> None:
    from device.ble_enrollment import command  # bumble: the ble extra

    command(args)


def cmd_persist_key(args: argparse.Namespace) -> None:
    from device.state import DEVICE_KEY_NAME, DeviceState
    from hw.tpm import TpmBackend

    try:
        handle = int(args.handle, 16)
    except ValueError:
        raise ConfigurationError(f"--handle {args.handle!r}: expected a hex handle such as "
                                 "0x81000010") from None
    state = DeviceState.load(args.state_dir)
    if state.settings["backend"] != "tpm":
        raise ConfigurationError(f"{args.state_dir / 'agent.json'}: the device key is not in "
                                 "a TPM (backend 'pkcs11'); persist-key is for TPM keys")
    with TpmBackend(state.settings["tcti"], state.settings["key_dir"]) as backend:
        backend.persist_key(DEVICE_KEY_NAME, handle)
    _emit(args, f"device key at persistent handle 0x{handle:08x} (tpm2_sign -c "
          f"0x{handle:08x}); the agent uses it from its next start",
          handle=f"0x{handle:08x}", key=DEVICE_KEY_NAME)


def cmd_install_service(args: argparse.Namespace) -> None:
    from device import install_service as svc

    planned = svc.plan(args.root, version(), svc.agent_script(), args.force)
    if not args.dry_run:
        svc.write(planned)
    verbs = {"unchanged": "unchanged", "new": "written", "updated": "updated (unedited, "
             "from an earlier version)", "replaced": "replaced (--force)"}
    lines = [f"{p.path}: {'would be ' if args.dry_run and p.status != 'unchanged' else ''}"
             f"{verbs[p.status]}" for p in planned]
    steps = svc.next_commands(args.root)
    _emit(args, "\n".join([*lines, "next, as root:", *(f"  {c}" for c in steps)]),
          dry_run=args.dry_run, files={str(p.path): p.status for p in planned}, next=steps)


def renew_due(args: argparse.Namespace) -> dt.datetime:
    """When the current operational credential should be renewed: once two thirds of
    its lifetime have passed."""
    from device.provisioner import CredentialStore

    cert = x509.load_pem_x509_certificate(CredentialStore(args.state_dir).load())
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return start + (end - start) * 2 / 3


def renew_once(args: argparse.Namespace) -> dt.datetime:
    from device.provisioner import CredentialStore, ProvisionerClient, renew
    from device.state import DeviceState

    state = DeviceState.load(args.state_dir)
    url = args.provisioner or state.provisioner
    if not url:
        raise ConfigurationError(f"no provisioning service: pass --provisioner URL or set "
                                 f"{PROVISIONER_ENV} ({args.state_dir / 'agent.json'} "
                                 "records none)")
    client = ProvisionerClient(url, cafile=args.cafile)
    signer = state.signer()
    try:
        issued = renew(client, signer, state.serial)
    finally:
        getattr(signer, "close", lambda: None)()
    CredentialStore(args.state_dir).save(issued)
    return dt.datetime.fromisoformat(issued["operational_not_after"])


def cmd_renew(args: argparse.Namespace) -> None:
    log = logging.getLogger("tessera.agent.renew")
    if not args.watch:
        until = renew_once(args).isoformat()
        _emit(args, f"renewed; valid until {until}", renewed=True, valid_until=until)
        return
    # On failure retry with jittered backoff; if the credential expires meanwhile the
    # device stops exactly as if revoked, and keeps trying.
    backoff = 5.0
    while True:
        wait = (renew_due(args) - dt.datetime.now(dt.UTC)).total_seconds()
        if wait > 0:
            time.sleep(min(wait, 3600))
            continue
        try:
            until = renew_once(args).isoformat()
            _emit(args, f"renewed; valid until {until}", renewed=True, valid_until=until)
            backoff = 5.0
        except TesseraError as exc:
            log.warning("renewal failed: %s", " ".join(str(exc).split()))
            time.sleep(backoff * random.uniform(0.5, 1.5))
            backoff = min(backoff * 2, 300)


def cmd_run(args: argparse.Namespace) -> int:
    import signal

    from device.agent import Agent, AgentConfig

    # every config problem: one line, before anything; --state DIR: DIR/agent.toml with
    # DIR as the state directory (what 'tessera enroll --out DIR' writes)
    path = args.config or (args.state / "agent.toml" if args.state else DEFAULT_CONFIG)
    config = AgentConfig.load(path, state_dir=args.state)
    agent = Agent(config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    agent.start()
    _emit(args, f"tessera-agent {version()}: running as {agent.identity} against "
          f"{config.host}:{config.port}", event="running", version=version(),
          identity=str(agent.identity), broker=f"{config.host}:{config.port}")
    while not stop.is_set() and not agent.finished.is_set():
        stop.wait(0.5)
    agent.stop()
    if agent.revoked is not None:
        raise _Revoked(agent.revoked)
    return EXIT_OK


class _Revoked(Exception):
    """The broker refused this device as revoked (exit status 3)."""


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """Usage errors as exceptions, so --json can report them as JSON too."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{message} (see {self.prog} --help)")


def _common() -> _Parser:
    """--json and the logging options, accepted before and after the subcommand (the
    subcommand's copy must not reset what was given before it: SUPPRESS defaults)."""
    c = _Parser(add_help=False)
    c.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="machine-readable output: one JSON object per result or error")
    c.add_argument("--log-level", default=argparse.SUPPRESS,
                   choices=["debug", "info", "warning", "error"], help="default info")
    c.add_argument("--log-format", default=argparse.SUPPRESS, choices=["text", "json"],
                   help="text (default) or one JSON object per line, on stderr")
    return c


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    p = _Parser(
        prog="tessera-agent",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    p.add_argument("--version", action="version", version=f"tessera-agent {version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           parser_class=_Parser)
    s = sub.add_parser("enroll", help="enroll this device with the provisioning service",
                       parents=[common])
    s.add_argument("--provisioner", metavar="URL", default=os.environ.get(PROVISIONER_ENV),
                   help=f"provisioning service URL (default ${PROVISIONER_ENV})")
    s.add_argument("--serial", required=True)
    s.add_argument("--tpm", metavar="TCTI", help="e.g. device:/dev/tpmrm0")
    s.add_argument("--key-dir")
    s.add_argument("--pkcs11", metavar="SPEC")
    s.add_argument("--device-class", default="default")
    s.add_argument("--reenroll", action="store_true",
                   help="replace this serial's existing enrollment (after a revocation or "
                        "a new TPM)")
    for sp in (s, r := sub.add_parser("renew", help="renew the operational credential",
                                      parents=[common])):
        sp.add_argument("--state-dir", type=Path, default=STATE_DIR)
        sp.add_argument("--cafile", default=os.environ.get("TESSERA_CAFILE"),
                        help="CA bundle for the service's TLS certificate")
    r.add_argument("--provisioner", metavar="URL", default=os.environ.get(PROVISIONER_ENV),
                   help=f"provisioning service URL (default ${PROVISIONER_ENV}, else the one "
                        "enrollment recorded in agent.json)")
    r.add_argument("--watch", action="store_true", help="keep renewing before expiry")
    s.set_defaults(func=cmd_enroll)
    r.set_defaults(func=cmd_renew)
    e = sub.add_parser(
        "enrollment-endpoint",
        help="let a factory station enroll this device over the network (one enrollment)",
        parents=[common],
    )
    e.add_argument("--serial", required=True)
    e.add_argument("--tpm", metavar="TCTI", required=True)
    e.add_argument("--key-dir")
    e.add_argument("--state-dir", type=Path, default=STATE_DIR)
    e.add_argument("--listen", default="127.0.0.1:8790", metavar="HOST:PORT")
    e.add_argument("--code-file", type=Path,
                   help="read the pairing code from here, or write a new one here")
    e.add_argument("--timeout", type=float, default=None, help="give up after SECONDS")
    e.set_defaults(func=cmd_enrollment_endpoint)
    k = sub.add_parser("persist-key", parents=[common],
                       help="make the TPM device key a persistent object at a handle you "
                            "choose (for tpm2-tools / OpenSSL on the device)")
    k.add_argument("--handle", required=True, help="owner range 0x81000000-0x817fffff")
    k.add_argument("--state-dir", type=Path, default=STATE_DIR)
    k.set_defaults(func=cmd_persist_key)
    i = sub.add_parser("install-service", parents=[common],
                       help="write the agent's systemd unit and its sysusers.d / tmpfiles.d "
                            "files (shipped in the package) under --root")
    i.add_argument("--root", type=Path, default=Path("/"), metavar="DIR",
                   help="write under DIR (default /: this system)")
    i.add_argument("--dry-run", action="store_true",
                   help="check and say what would be written, write nothing")
    i.add_argument("--force", action="store_true",
                   help="replace files edited since (or not written by) install-service")
    i.set_defaults(func=cmd_install_service)
    b = sub.add_parser("ble-enroll", parents=[common],
                       help="let a factory station enroll this device over Bluetooth LE "
                            "(bound to the code on its label; needs the ble extra)")
    add_ble_arguments(b)
    b.set_defaults(func=cmd_ble_enroll)
    serve = sub.add_parser("ble-sa1-serve", parents=[common],
                           help="answer SA1 over Bluetooth LE as a peripheral, e.g. for "
                                "another device with no network (needs the ble extra)")
    add_serve_arguments(serve)
    serve.set_defaults(func=cmd_ble_sa1_serve)
    send = sub.add_parser("ble-sa1-send", parents=[common],
                          help="open an SA1 session over Bluetooth LE to a peripheral "
                               "(BlueZ) and send one proven message (needs the ble extra)")
    add_send_arguments(send)
    send.set_defaults(func=cmd_ble_sa1_send)
    run = sub.add_parser("run", help="keep this device connected to its MQTT broker",
                         parents=[common])
    run.add_argument("--config", type=Path,
                     help=f"agent configuration (docs/AGENT.md; default {DEFAULT_CONFIG}, "
                          "or DIR/agent.toml with --state)")
    run.add_argument("--state", type=Path, metavar="DIR",
                     help="the state directory enrollment wrote ('tessera enroll --out "
                          "DIR'): its agent.toml, with DIR as device.state_dir")
    run.set_defaults(func=cmd_run)
    return p


def _fail(json_mode: bool, message: str, code: int, reason: str | None = None) -> int:
    message = " ".join(message.split())
    if json_mode:  # the shape of `tessera --json` errors (docs/ENROLLMENT.md)
        print(json.dumps({"error": message, "reason": reason, "exit": code}),
              file=sys.stderr, flush=True)
    else:
        print(f"tessera-agent: error: {message}", file=sys.stderr, flush=True)
    return code


def _missing_extra(exc: ModuleNotFoundError) -> str:
    top = (exc.name or "").split(".")[0]
    package, extra = _EXTRAS.get(top, (top, "device-tpm"))
    return (f"this command needs the Python package {package}, which is not installed: "
            f"pip install 'tessera[{extra}]'")


def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes: see the module doc (0 done, 1 error, 3 revoked, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    json_mode = "--json" in argv  # known before parsing, so usage errors are JSON too
    try:
        args = build_parser().parse_args(argv)
        setup_logging(getattr(args, "log_level", "info"), getattr(args, "log_format", "text"))
        result = args.func(args)
    except _UsageError as exc:
        return _fail(json_mode, str(exc), EXIT_ERROR, "usage")
    except _Revoked as exc:
        return _fail(json_mode, f"revoked: {exc}; re-enroll this device "
                     "(tessera-agent enroll --reenroll)", EXIT_REVOKED, "revoked")
    except TesseraError as exc:  # JSON carries the reason as its own field
        return _fail(json_mode, exc.detail if json_mode else str(exc), EXIT_ERROR,
                     exc.reason.name.lower())
    except ModuleNotFoundError as exc:
        return _fail(json_mode, _missing_extra(exc), EXIT_ERROR, "missing_extra")
    except KeyboardInterrupt:
        return _fail(json_mode, "interrupted", EXIT_INTERRUPTED, "interrupted")
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        return _fail(json_mode, f"{exc.strerror or exc}{where}", EXIT_ERROR)
    return result if isinstance(result, int) else EXIT_OK
