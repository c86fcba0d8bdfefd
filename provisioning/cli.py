"""`tessera`: the factory operator's command line.

    tessera init           create a fleet authority (key in a PKCS#11 token) and registry
    tessera serve          run the provisioning service (HTTP API)
    tessera enroll         enroll a device (local TPM or PKCS#11 key, a device on the
                           network with --device URL, or --batch CSV)
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
import csv
import datetime as dt
import json
import os
import sys
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from structauth.errors import TesseraError

DEFAULT_DIR = Path(os.environ.get("TESSERA_HOME", "tessera-authority"))
DEFAULT_URL = os.environ.get("TESSERA_PROVISIONER", "http://127.0.0.1:8443")


class CliError(Exception):
    """One line for the operator: what is wrong and how to fix it."""


# -- helpers -----------------------------------------------------------------------


def _token(args: argparse.Namespace) -> str | None:
    if getattr(args, "token_file", None):
        try:
            return Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise CliError(f"cannot read token file {args.token_file}: {exc.strerror}") from None
    return os.environ.get("TESSERA_OPERATOR_TOKEN")


def _client(args: argparse.Namespace, *, operator: bool = True) -> Any:
    from device.provisioner import ProvisionerClient

    token = _token(args) if operator else None
    if operator and not token:
        raise CliError(
            "operator token missing: set TESSERA_OPERATOR_TOKEN or pass --token-file "
            "(printed once by 'tessera init')"
        )
    return ProvisionerClient(args.provisioner, operator_token=token, cafile=args.cafile)


def _service_config(directory: Path) -> dict[str, Any]:
    path = directory / "service.toml"
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise CliError(
            f"{directory} holds no Tessera authority: run 'tessera init --dir {directory}' first"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise CliError(f"{path} is not valid TOML: {exc}") from None


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=1) if args.json else text)


def _table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*map(str, r)) for r in rows]
    return "\n".join(lines)


# -- commands ----------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> None:
    from provisioning.authority import FleetAuthority
    from provisioning.operators import Operators
    from provisioning.registry import open_registry

    directory: Path = args.dir
    if (directory / "service.toml").exists():
        raise CliError(f"{directory} already holds an authority; use another --dir")
    if not args.insecure_file_key and not (args.pkcs11_module and args.token):
        raise CliError(
            "the authority key belongs in a PKCS#11 token: pass --pkcs11-module and "
            "--token (PIN from TESSERA_PKCS11_PIN or --pin-file), or "
            "--insecure-file-key for development"
        )
    for root in args.tpm_maker_roots:
        if not Path(root).is_file():
            raise CliError(f"TPM maker root {root} does not exist")
    registry_url = args.registry or f"sqlite:///{(directory / 'registry.db').resolve()}"
    authority = FleetAuthority.init(
        directory,
        args.trust_domain,
        pkcs11_module=args.pkcs11_module,
        token_label=args.token,
        key_label=args.key_label,
        pin_file=args.pin_file,
        insecure_file_key=args.insecure_file_key,
        now=dt.datetime.now(dt.UTC),
    )
    try:
        open_registry(registry_url).close()
        token = Operators(directory / "operators.json").add(args.operator)
        roots = ", ".join(json.dumps(str(Path(p).resolve())) for p in args.tpm_maker_roots)
        (directory / "service.toml").write_text(
            f"registry = {json.dumps(registry_url)}\n"
            f"tpm_maker_roots = [{roots}]\n"
            f"operational_lifetime_minutes = {args.operational_lifetime}\n"
        )
    finally:
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


def build_service(directory: Path) -> Any:
    from provisioning.attestation import TpmMakerRoots
    from provisioning.authority import FleetAuthority
    from provisioning.enrollment import EnrollmentService
    from provisioning.registry import open_registry

    config = _service_config(directory)
    roots_paths = config.get("tpm_maker_roots", [])
    roots = TpmMakerRoots.from_pem_files(roots_paths) if roots_paths else None
    lifetime = dt.timedelta(minutes=int(config.get("operational_lifetime_minutes", 24 * 60)))
    return EnrollmentService(
        FleetAuthority.open(directory),
        open_registry(config["registry"]),
        roots,
        operational_lifetime=lifetime,
    )


def cmd_serve(args: argparse.Namespace) -> None:
    import logging

    import uvicorn

    from provisioning.operators import Operators
    from provisioning.service import build_app

    if bool(args.tls_cert) != bool(args.tls_key):
        raise CliError("TLS needs both --tls-cert and --tls-key")
    service = build_service(args.dir)
    app = build_app(service, Operators(args.dir / "operators.json"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    print(
        f"tessera: serving {service.authority.trust_domain} on "
        f"{'https' if args.tls_cert else 'http'}://{args.host}:{args.port}",
        flush=True,
    )
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        ssl_certfile=args.tls_cert,
        ssl_keyfile=args.tls_key,
        log_level="warning",
    )


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
    from device.provisioner import CredentialStore, enroll_tpm, enroll_witnessed
    from hw import open_signer

    if bool(tpm) == bool(pkcs11):
        raise CliError(f"{serial}: give exactly one of --tpm TCTI or --pkcs11 SPEC")
    if tpm:
        from hw.tpm import TpmBackend

        with TpmBackend(tpm, Path(key_dir or f"{serial}-keys")) as backend:
            issued = enroll_tpm(
                client,
                backend,
                serial,
                kind=args.kind,
                device_class=device_class,
                reenroll=args.reenroll,
            )
    else:
        signer = open_signer(f"pkcs11:{pkcs11}", create=True)
        try:
            issued = enroll_witnessed(
                client,
                signer,
                serial,
                kind=args.kind,
                device_class=device_class,
                reenroll=args.reenroll,
            )
        finally:
            close: Callable[[], None] | None = getattr(signer, "close", None)
            if close:
                close()
    if out is not None:
        CredentialStore(out).save(issued)
    return issued


def cmd_enroll(args: argparse.Namespace) -> None:
    client = _client(args)
    if args.batch:
        return _enroll_batch(args, client)
    if args.device:
        return _enroll_remote(args, client)
    if not args.serial:
        raise CliError("--serial is required (or --batch CSV)")
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


def _enroll_remote(args: argparse.Namespace, client: Any) -> None:
    """Enroll a device on the network through its agent's enrollment endpoint."""
    from device.enrollment_endpoint import RemoteDevice
    from device.provisioner import enroll_attested

    if args.tpm or args.pkcs11:
        raise CliError("--device enrolls a remote device: leave out --tpm/--pkcs11")
    code = args.device_code or os.environ.get("TESSERA_DEVICE_CODE", "")
    device = RemoteDevice(args.device, code)
    serial = device.info()["serial"]
    if args.serial and args.serial != serial:
        raise CliError(f"the device at {args.device} is {serial}, not {args.serial}")
    issued = enroll_attested(
        client, device, serial, kind=args.kind, device_class=args.device_class,
        reenroll=args.reenroll,
    )
    try:
        device.deliver({**issued, "provisioner": args.provisioner})
    except TesseraError as exc:
        raise CliError(
            f"{serial} is enrolled but did not take its credentials ({_one_line(exc)}); "
            "fix that and run again with --reenroll"
        ) from None
    if args.out:
        from device.provisioner import CredentialStore

        CredentialStore(args.out).save(issued)
    _emit(args, issued, f"enrolled {issued['identity']} ({issued['attestation']}) over the "
                        f"network; the device stored its credentials")


def _enroll_batch(args: argparse.Namespace, client: Any) -> None:
    try:
        with open(args.batch, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise CliError(f"cannot read {args.batch}: {exc.strerror}") from None
    if not rows or "serial" not in rows[0]:
        raise CliError(f"{args.batch} needs a header row with at least: serial, and tpm or pkcs11")
    results: list[dict[str, Any]] = []
    width = 30
    for i, row in enumerate(rows, 1):
        serial = (row.get("serial") or "").strip()
        out = Path(args.out) / serial if args.out else None
        try:
            issued = _enroll_one(
                args,
                client,
                serial,
                row.get("tpm") or None,
                row.get("pkcs11") or None,
                row.get("key_dir") or None,
                row.get("device_class") or args.device_class,
                out,
            )
            results.append({"serial": serial, "ok": True, "identity": issued["identity"]})
        except (TesseraError, CliError) as exc:
            results.append({"serial": serial, "ok": False, "error": _one_line(exc)})
        if not args.json:
            done = int(width * i / len(rows))
            print(
                f"\r[{'#' * done}{'.' * (width - done)}] {i}/{len(rows)}",
                end="",
                file=sys.stderr,
                flush=True,
            )
    if not args.json:
        print(file=sys.stderr)
    failed = [r for r in results if not r["ok"]]
    summary = f"enrolled {len(results) - len(failed)} of {len(results)} devices"
    lines = [summary] + [f"  {r['serial']}: {r['error']}" for r in failed]
    _emit(
        args,
        {"results": results, "enrolled": len(results) - len(failed), "failed": len(failed)},
        "\n".join(lines),
    )
    if failed:
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
    d = _client(args).call("GET", f"/v1/devices/{args.serial}")
    _emit(args, d, "\n".join(f"{k:<24} {v}" for k, v in d.items()))


def cmd_revoke(args: argparse.Namespace) -> None:
    e = _client(args).call("POST", f"/v1/devices/{args.serial}/revoke", {"reason": args.reason})
    _emit(
        args,
        e,
        f"revoked {e['identity']} (event {e['id']}; certificates {', '.join(e['cert_serials'])})",
    )


def cmd_renew(args: argparse.Namespace) -> None:
    from device.provisioner import CredentialStore, renew
    from hw import open_signer

    client = _client(args, operator=False)
    if bool(args.tpm) == bool(args.pkcs11):
        raise CliError("give exactly one of --tpm TCTI (with --key-dir) or --pkcs11 SPEC")
    spec = f"tpm:{args.tpm}#tessera-device" if args.tpm else f"pkcs11:{args.pkcs11}"
    options = {"key_dir": args.key_dir or f"{args.serial}-keys"} if args.tpm else {}
    signer = open_signer(spec, **options)
    try:
        issued = renew(client, signer, args.serial)
    finally:
        getattr(signer, "close", lambda: None)()
    if args.out:
        CredentialStore(args.out).save(issued)
    _emit(
        args, issued, f"renewed {issued['identity']}: valid until {issued['operational_not_after']}"
    )


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
    if args.output == "-":
        sys.stdout.write(pem.decode())
    else:
        Path(args.output).write_bytes(pem)
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
    options = {
        "python": sys.executable,
        "trust_domain": args.trust_domain,
        "bundle": args.bundle,
        "credential": args.credential,
        "key": args.key,
        "policy": args.policy,
    }
    for name in ("provisioner", "cafile", "audit_log", "pin_file", "key_dir"):
        value = getattr(args, name)
        if value:
            options[name] = value
    for name in ("bundle", "credential", "policy", "pin_file"):
        if name in options:
            options[name] = str(Path(options[name]).resolve())
    options.update(_step_up_options(args.plugin_opt or []))
    joined = _read_mosquitto_conf(Path(args.check)) if args.check else []
    try:
        plugin = ensure_built()
    except BuildError as exc:
        raise CliError(exc.detail) from None
    # the broker starts with these options: refuse here, in one line, what it would refuse
    enforcer, signer = build_enforcer(options)
    getattr(signer, "close", lambda: None)()
    if args.user:
        blocked = readable_by(args.user)
        if blocked:
            raise CliError(
                f"mosquitto drops to user {args.user} before it loads plugins, and that user "
                f"cannot read {blocked[0]}: install Tessera where {args.user} can read it, "
                "or pass --user with the account mosquitto runs as"
            )
    lines = [
        "# Tessera: written by 'tessera broker config'",
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
        lines += [f"certfile {Path(args.tls_cert).resolve()}",
                  f"keyfile {Path(args.tls_key).resolve()}"]
    lines.append(f"plugin {plugin}")
    lines += [f"plugin_opt_{k} {v}" for k, v in options.items()]
    # the broker runs with the conf it joins plus this snippet: check them together
    snippet = [(f"<snippet>:{n}", *_words(line)) for n, line in enumerate(lines, 1)
               if _words(line)]
    problems = _conf_problems(joined, snippet)
    if problems:
        raise CliError(problems[0])
    text = "\n".join(lines) + "\n"
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text)
        if not args.json:
            print(f"mosquitto configuration written to {args.output} "
                  f"(policy {enforcer.policy.digest.hex()[:12]})")


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


def _step_up_options(pairs: list[str]) -> dict[str, str]:
    """``NAME=VALUE`` step-up / quarantine knobs, checked by the plugin's own parser."""
    from broker_plugin.host import _SETTINGS, parse_settings

    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        name = name.strip().removeprefix("plugin_opt_")
        if not sep or name not in _SETTINGS:
            raise CliError(f"--plugin-opt {pair!r}: expected NAME=VALUE with NAME one of "
                           f"{', '.join(sorted(_SETTINGS))}")
        out[name] = value.strip()
    parse_settings(out)  # ConfigurationError: the plugin's own one-line refusal
    return out


def _words(line: str) -> tuple[str, ...]:
    return tuple(line.split("#", 1)[0].split())


def _read_mosquitto_conf(path: Path) -> list[tuple[str, str, list[str]]]:
    """(file:line, key, arguments) of every setting, in the order Mosquitto reads them
    (an ``include_dir``'s ``*.conf`` files in place, sorted)."""
    entries: list[tuple[str, str, list[str]]] = []
    seen: set[Path] = set()

    def read(conf: Path) -> None:
        if conf in seen:
            return
        seen.add(conf)
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tessera", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
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
    s.add_argument("--operational-lifetime", type=int, default=24 * 60, metavar="MINUTES")
    s.set_defaults(func=cmd_init)

    s = sub.add_parser("serve", help="run the provisioning service")
    s.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8443)
    s.add_argument("--tls-cert")
    s.add_argument("--tls-key")
    s.set_defaults(func=cmd_serve)

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
    s.add_argument("--out", type=Path, help="write the credentials here")
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
    b.add_argument("--trust-domain", required=True)
    b.add_argument("--bundle", required=True, help="trust bundle PEM (tessera export-bundle)")
    b.add_argument("--credential", required=True, help="this broker's credential PEM")
    b.add_argument("--key", required=True,
                   help="its key: pkcs11:<module>#<token>/<label> or tpm:<tcti>#<name>")
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
                   help="a step-up or quarantine knob (e.g. quarantine_failures=3), checked "
                        "as the plugin checks it; repeatable")
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "export-bundle":
        args.dir_given = args.dir is not None
    try:
        args.func(args)
    except (CliError, TesseraError) as exc:
        print(f"tessera: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
