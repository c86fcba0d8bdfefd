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
import json
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from provisioning.ble_cli import add_arguments as add_ble_arguments
from provisioning.broker_conf import cmd_broker_config
from provisioning.cli_authority import (
    cmd_init,
    cmd_roots_add,
    cmd_roots_list,
    cmd_roots_remove,
    cmd_serve,
)
from provisioning.cli_enroll import _DEFERRED, _SignalsHeld, cmd_enroll
from provisioning.cli_support import (
    DEFAULT_DIR,
    DEFAULT_URL,
    MAX_LIFETIME,
    MIN_LIFETIME,
    CliError,
    _check_serial,
    _client,
    _crash_point,
    _emit,
    _lifetime,
    _one_line,
    _port,
    _service_config,
    _table,
    _why,
    _write_atomic,
)
from provisioning.station_out import (
    _SPACE_PROBE,
    _OutPlan,
)
from structauth.errors import TesseraError


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
