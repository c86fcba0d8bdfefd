"""`tessera enroll`: one device (a local TPM or PKCS#11 key, or a device on the
network that shows a pairing code), or a CSV batch, in two phases so that nothing is
half-done: the service records the device, the credentials are written, and an
interrupted run is finished by the next one."""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from provisioning.cli_support import (
    CliError,
    Refused,
    _check_serial,
    _client,
    _crash_point,
    _emit,
    _one_line,
    _why,
    _write_atomic,
)
from provisioning.station_out import (
    JOURNAL,
    _agent_broker,
    _agent_files,
    _check_broker_domain,
    _delivery_fields,
    _OutPlan,
)
from structauth.errors import Reason, TesseraError

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
        device.deliver({**issued, "provisioner": args.provisioner,
                        **_delivery_fields(args.agent_broker)})
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
