"""`tessera enroll --ble`: enroll devices over Bluetooth LE from the factory station.

    tessera enroll --ble --serial S --code XXXXX-XXXXX     one device (its label)
    tessera enroll --ble --batch labels.csv                 every unprovisioned device in
                                                            range that is on the manifest
                                                            (CSV: serial,code[,device_class])

The provisioning service, operator token, --kind, --device-class, --reenroll, --out,
--broker/--broker-identity/--broker-cafile and --json are those of `tessera enroll`.
--out DIR (batch: DIR/<serial>) becomes the device's agent state directory as the
network path writes it (credentials, agent.json, agent.toml), checked before anything
is enrolled and written all or nothing; agent.json says how the device's agent reaches
its key as the device's own agent.json does (its "stored" answer tells), or, from a
device that does not tell, by --device-tcti and --device-key-dir. With --broker the
device also gets agent.toml (and the broker's CA) with its credentials. Batch mode
shows a progress bar on stderr (not with --json) and ends with one line per device that
was not enrolled; it exits 1 if any device on the manifest failed. The issued
credentials of a device whose delivery failed are kept in --resume-dir and delivered by
the next run.

Wiring (provisioning/cli.py): ``add_arguments(enroll_parser)`` in build_parser, and at
the top of cmd_enroll ``if getattr(args, "ble", False): return run(args, client)``.
Standalone: ``python -m provisioning.ble_cli ...`` takes the same options.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from structauth.errors import ConfigurationError, Reason, TesseraError
from structauth.gatt import normalize_code

if TYPE_CHECKING:  # bleak is imported only when --ble runs (the ble extra is optional)
    from device.ble_central import Backends
    from device.provisioner import ProvisionerClient
    from provisioning.ble_station import BleStation, Enrolled

CODE_ENV = "TESSERA_LABEL_CODE"
#: the device's TPM and key directory as docs/BLE.md starts its enrollment on a Pi
DEVICE_TCTI = "device:/dev/tpmrm0"
DEVICE_KEY_DIR = "/var/lib/tessera/keys"
#: the broker's CA the device gets with its credentials (both in one enrollment message
#: of at most structauth.gatt.MAX_ENROLL_MESSAGE, 24 KiB; the credentials take ~5 KiB)
MAX_BROKER_CA = 8 * 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The BLE options of `tessera enroll`."""
    g = parser.add_argument_group("Bluetooth LE (with --ble)")
    g.add_argument("--ble", action="store_true",
                   help="enroll over Bluetooth LE: --serial S --code C for one device, or "
                        "--batch LABELS.csv (serial,code[,device_class]) for every "
                        "unprovisioned device in range on that manifest")
    g.add_argument("--code", help=f"the code on the device's label (else ${CODE_ENV})")
    g.add_argument("--scan-time", type=float, default=5.0, metavar="SECONDS",
                   help="how long to look for devices (default %(default)s)")
    g.add_argument("--parallel", type=int, default=4, metavar="N",
                   help="devices enrolled at once in batch mode (default %(default)s)")
    g.add_argument("--step-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="longest wait for one device step (default %(default)s)")
    g.add_argument("--retries", type=int, default=3,
                   help="retries of a GATT write, and reconnections to deliver "
                        "(default %(default)s)")
    g.add_argument("--resume-dir", type=Path, default=Path("tessera-ble-resume"),
                   help="issued credentials not yet delivered (default %(default)s)")
    g.add_argument("--device-tcti", default=DEVICE_TCTI, metavar="TCTI",
                   help="--out's agent.json, for a device that does not tell: the TPM "
                        "its agent uses, its ble-enroll --tpm (default %(default)s)")
    g.add_argument("--device-key-dir", default=DEVICE_KEY_DIR, metavar="DIR",
                   help="--out's agent.json, for a device that does not tell: its key "
                        "directory, its ble-enroll --key-dir (default %(default)s, for "
                        "--state-dir /var/lib/tessera)")


def _manifest(path: str) -> dict[str, tuple[str, str | None]]:
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc.strerror}") from None
    if not rows or not {"serial", "code"} <= set(rows[0]):
        raise ConfigurationError(f"{path} needs a header row with at least: serial,code "
                                 "(the label of each device), optionally device_class")
    out: dict[str, tuple[str, str | None]] = {}
    for line, row in enumerate(rows, 2):
        serial = (row.get("serial") or "").strip()
        try:
            code = normalize_code(row.get("code") or "")
        except ValueError as exc:
            raise ConfigurationError(f"{path} line {line} ({serial or 'no serial'}): {exc}"
                                     ) from None
        if not serial or serial in out:
            raise ConfigurationError(f"{path} line {line}: missing or repeated serial")
        out[serial] = (code, (row.get("device_class") or "").strip() or None)
    return out


def _bar(done: int, total: int, note: str, err: TextIO, width: int = 30) -> None:
    filled = int(width * done / total) if total else width
    print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {note:<24.24}",
          end="", file=err, flush=True)


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _out_checked(out: Path, serial: str, reenroll: bool) -> None:
    """--out as the network path checks it (provisioning.station_out._OutPlan), before the
    device is enrolled: new, empty, or (--reenroll) holding credentials; writable."""
    from provisioning.cli_support import CliError
    from provisioning.station_out import _OutPlan

    plan = _OutPlan(out, serial, replace=reenroll)
    try:
        plan.preflight()
    except CliError as exc:
        raise ConfigurationError(one_line(exc)) from None
    plan.abort()


def _write_out(args: argparse.Namespace, out: Path, done: Enrolled) -> None:
    """The agent state directory the network path writes (provisioning.station_out._OutPlan:
    credentials, agent.json, agent.toml, the broker's CA), all or nothing."""
    from provisioning.cli_support import CliError, _why
    from provisioning.station_out import _OutPlan

    plan = _OutPlan(out, done.serial, replace=args.reenroll)
    plan.broker = args.agent_broker
    plan.settings = {**_key_settings(args, out, done), "serial": done.serial,
                     "provisioner": done.issued.get("provisioner")}
    try:
        plan.preflight()
        plan.save(done.issued)
    except (CliError, OSError) as exc:
        plan.abort()
        why = _why(exc) if isinstance(exc, OSError) else one_line(exc)
        raise ConfigurationError(
            f"{done.serial} is enrolled and its device holds its credentials, but --out "
            f"{out} could not be written ({why}); copy the device's state directory "
            "instead") from None


def _key_settings(args: argparse.Namespace, out: Path, done: Enrolled) -> dict[str, str]:
    """How --out's agent.json names the key: as the device's "stored" reply says (its
    own agent.json), else (a device that does not say) --device-tcti/--device-key-dir."""
    agent = done.device_agent
    if agent is None:
        return {"backend": "tpm", "tcti": args.device_tcti, "key_dir": args.device_key_dir}
    if (not isinstance(agent, dict) or agent.get("backend") != "tpm"
            or not all(isinstance(agent.get(k), str) and 0 < len(agent[k]) <= 512
                       for k in ("tcti", "key_dir"))):
        raise ConfigurationError(
            f"{done.serial} is enrolled and its device holds its credentials, but its "
            f"answer names its key as {json.dumps(agent)[:200]}, not a TPM's TCTI and key "
            f"directory: --out {out} not written; copy the device's state directory instead")
    return {"backend": "tpm", "tcti": agent["tcti"], "key_dir": agent["key_dir"]}


def _broker(args: argparse.Namespace, client: ProvisionerClient) -> None:
    """args.agent_broker, as `tessera enroll` checks it before anything is enrolled
    (cmd_enroll did when it handed over; here when run on its own)."""
    if not hasattr(args, "agent_broker"):
        from provisioning.cli_support import CliError
        from provisioning.station_out import _agent_broker, _check_broker_domain

        try:
            args.agent_broker = _agent_broker(args)
            _check_broker_domain(client, args.agent_broker)
        except CliError as exc:
            raise ConfigurationError(one_line(exc)) from None
    ca = (args.agent_broker or {}).get("cafile_pem", b"")
    if len(ca) > MAX_BROKER_CA:
        raise ConfigurationError(
            f"--broker-cafile {args.broker_cafile} is {len(ca)} bytes; the device takes at "
            f"most {MAX_BROKER_CA} over BLE (with its credentials, in one message): pass "
            "only the CA certificate that signed the broker's TLS certificate")


def _summary(done: Enrolled) -> dict[str, Any]:
    return {"serial": done.serial, "ok": True, "identity": done.issued["identity"],
            "address": done.address, "mtu": done.mtu, "resumed": done.resumed,
            "timing": done.timing.to_json()}


async def run_async(args: argparse.Namespace, client: ProvisionerClient, *,
                    backends: Backends = None, out: TextIO = sys.stdout,
                    err: TextIO = sys.stderr) -> int:
    """The command; returns the exit status. ``backends``: bleak backend classes (tests:
    the virtual radio's; None: the platform's)."""
    from provisioning.ble_station import BleStation
    if getattr(args, "tpm", None) or getattr(args, "pkcs11", None) or getattr(
            args, "device", None):
        raise ConfigurationError("--ble enrolls a device in radio range: leave out "
                                 "--tpm/--pkcs11/--device")
    if args.parallel < 1 or args.retries < 0 or args.step_timeout <= 0:
        raise ConfigurationError("--parallel must be >= 1, --retries >= 0, --step-timeout > 0")
    _broker(args, client)
    station = BleStation(client, backends=backends, step_timeout=args.step_timeout,
                         retries=args.retries, resume_dir=args.resume_dir,
                         provisioner_url=getattr(args, "provisioner", None),
                         agent_broker=args.agent_broker)
    if args.batch:
        return await _batch(args, station, out, err)
    if not args.serial:
        raise ConfigurationError("--ble needs --serial and --code (the device's label), or "
                                 "--batch LABELS.csv")
    code = args.code or os.environ.get(CODE_ENV, "")
    try:
        normalize_code(code)
    except ValueError as exc:
        raise ConfigurationError(f"--code: {exc}") from None
    if args.out:
        _out_checked(args.out, args.serial, args.reenroll)  # before the device is enrolled
    found = await station.scan(timeout=args.scan_time)
    if not found:
        raise ConfigurationError(f"no unprovisioned Tessera device in range after "
                                 f"{args.scan_time:g} s: is it powered and advertising?")
    named = [d for d in found if (d.name or "") and args.serial.startswith(d.name or "")]
    last: TesseraError | None = None
    for target in named + [d for d in found if d not in named]:
        try:
            done = await station.enroll(target, serial=args.serial, code=code, kind=args.kind,
                                        device_class=args.device_class,
                                        reenroll=args.reenroll)
        except TesseraError as exc:
            if exc.reason is not Reason.WRONG_IDENTITY or "not " + args.serial not in str(exc):
                raise
            last = exc  # another device in range: try the next one
            continue
        if args.out:
            _write_out(args, args.out, done)
        _emit(args, out, {**done.issued, "ble": _summary(done)},
              f"enrolled {done.issued['identity']} over BLE ({done.address}, ATT_MTU "
              f"{done.mtu}); the device stored its credentials")
        return 0
    raise ConfigurationError(f"{args.serial} is not among the {len(found)} devices in range"
                             + (f" ({one_line(last)})" if last else ""))


async def _batch(args: argparse.Namespace, station: BleStation, out: TextIO,
                 err: TextIO) -> int:
    from provisioning.ble_station import serial_of

    manifest = _manifest(args.batch)
    root = Path(args.out) if args.out else None
    if root is not None:
        if root.exists() and not root.is_dir():
            raise ConfigurationError(f"--out {root} is not a directory; with --batch it is "
                                     "the directory that gets one subdirectory per serial")
        root.mkdir(parents=True, exist_ok=True)
    found = await station.scan(timeout=args.scan_time)
    results: list[dict[str, Any]] = []
    gate = asyncio.Semaphore(args.parallel)
    progress = {"done": 0}
    show = not args.json

    async def one(target: Any) -> None:
        async with gate:
            def lookup(serial: str) -> str | None:
                entry = manifest.get(serial)
                if entry and root is not None:  # refused before this device is enrolled
                    _out_checked(root / serial, serial, args.reenroll)
                return entry[0] if entry else None

            def device_class(serial: str) -> str | None:
                entry = manifest.get(serial)
                return (entry[1] if entry else None) or args.device_class

            try:
                done = await station.enroll(
                    target, code=lookup, kind=args.kind, device_class=device_class,
                    reenroll=args.reenroll)
                if root is not None:
                    try:
                        _write_out(args, root / done.serial, done)
                    except TesseraError as exc:
                        exc.ble_serial = done.serial  # type: ignore[attr-defined]
                        raise
                results.append(_summary(done))
                note = f"{done.serial} enrolled"
            except TesseraError as exc:
                skipped = exc.reason is Reason.NOT_AUTHORIZED and "manifest" in exc.detail
                results.append({"address": str(getattr(target, "address", target)),
                                "serial": serial_of(exc), "ok": False, "skipped": skipped,
                                "error": one_line(exc)})
                note = "skipped" if skipped else "failed"
            progress["done"] += 1
            if show:
                _bar(progress["done"], len(found), note, err)

    if show:
        _bar(0, len(found), "scanning done", err)
    await asyncio.gather(*(one(t) for t in found))
    if show:
        print(file=err)
    enrolled = sorted(r["serial"] for r in results if r["ok"])
    failed = [r for r in results if not r["ok"] and not r["skipped"]]
    skipped = [r for r in results if not r["ok"] and r["skipped"]]
    missing = sorted(set(manifest) - set(enrolled) - {r["serial"] for r in failed})
    lines = [f"enrolled {len(enrolled)} of {len(manifest)} devices on the manifest "
             f"({len(found)} in range, {len(skipped)} not on the manifest)"]
    lines += [f"  {r['serial'] or r['address']}: {r['error']}" for r in failed]
    lines += [f"  {s}: not in range" for s in missing]
    _emit(args, out, {"results": sorted(results, key=lambda r: str(r.get("serial"))),
                      "enrolled": len(enrolled), "failed": len(failed),
                      "skipped": len(skipped), "missing": missing}, "\n".join(lines))
    return 1 if failed else 0


def _emit(args: argparse.Namespace, out: TextIO, data: Any, text: str) -> None:
    print(json.dumps(data, indent=1) if args.json else text, file=out, flush=True)


def run(args: argparse.Namespace, client: ProvisionerClient) -> None:
    """For provisioning/cli.py's cmd_enroll: runs the command with the platform's
    Bluetooth (bleak picks BlueZ on Linux); exits 1 if a batch had failures."""
    status = asyncio.run(run_async(args, client))
    if status:
        raise SystemExit(status)


def build_parser() -> argparse.ArgumentParser:
    """The options of ``tessera enroll --ble`` for running this module on its own."""
    p = argparse.ArgumentParser(prog="python -m provisioning.ble_cli", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--provisioner",
                   default=os.environ.get("TESSERA_PROVISIONER", "http://127.0.0.1:8443"))
    p.add_argument("--token-file", help="operator token file (else TESSERA_OPERATOR_TOKEN)")
    p.add_argument("--cafile", default=os.environ.get("TESSERA_CAFILE"))
    p.add_argument("--serial")
    p.add_argument("--kind", default="device", choices=("device", "broker"))
    p.add_argument("--device-class", default="default")
    p.add_argument("--reenroll", action="store_true")
    p.add_argument("--batch", metavar="CSV")
    p.add_argument("--out", type=Path)
    p.add_argument("--broker", metavar="URL", help="as for tessera enroll")
    p.add_argument("--broker-identity", metavar="SPIFFE_ID", help="as for tessera enroll")
    p.add_argument("--broker-cafile", metavar="PEM", help="as for tessera enroll")
    add_arguments(p)
    return p


def client_for(args: argparse.Namespace) -> ProvisionerClient:
    from device.provisioner import ProvisionerClient

    token = os.environ.get("TESSERA_OPERATOR_TOKEN")
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise ConfigurationError(f"cannot read {args.token_file}: {exc.strerror}") from None
    if not token:
        raise ConfigurationError("operator token missing: set TESSERA_OPERATOR_TOKEN or pass "
                                 "--token-file")
    return ProvisionerClient(args.provisioner, operator_token=token, cafile=args.cafile)


def main(argv: Sequence[str] | None = None, *, backends: Backends = None) -> int:
    args = build_parser().parse_args(argv)
    args.ble = True
    try:
        return asyncio.run(run_async(args, client_for(args), backends=backends))
    except TesseraError as exc:
        print(f"tessera: error: {one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
