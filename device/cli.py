"""`tessera-agent`: the device side.

    tessera-agent enroll --provisioner URL --serial S (--tpm TCTI | --pkcs11 SPEC)
    tessera-agent enrollment-endpoint --serial S --tpm TCTI [--listen HOST:PORT]
    tessera-agent renew  --provisioner URL [--watch]
    tessera-agent run    --config /etc/tessera/agent.toml

Enrollment runs at the factory: either on the device with the operator's token
(TESSERA_OPERATOR_TOKEN), or from the station (`tessera enroll --device URL`) while the
device runs its enrollment endpoint, which needs no token, only the pairing code it
shows. Renewal needs only the device's own hardware key.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509

from structauth.errors import ConfigurationError, TesseraError

STATE_DIR = Path(os.environ.get("TESSERA_STATE_DIR", "/var/lib/tessera"))


def cmd_enroll(args: argparse.Namespace) -> None:
    from device.provisioner import (
        ProvisionerClient,
        enroll_tpm,
        enroll_witnessed,
    )
    from hw import open_signer

    if bool(args.tpm) == bool(args.pkcs11):
        raise ConfigurationError("give exactly one of --tpm TCTI or --pkcs11 SPEC")
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
            issued = enroll_tpm(client, backend, args.serial, device_class=args.device_class)
        state = {"backend": "tpm", "tcti": args.tpm, "key_dir": key_dir}
    else:
        signer = open_signer(f"pkcs11:{args.pkcs11}", create=True)
        try:
            issued = enroll_witnessed(client, signer, args.serial, device_class=args.device_class)
        finally:
            getattr(signer, "close", lambda: None)()
        state = {"backend": "pkcs11", "pkcs11": args.pkcs11}
    _save(args.state_dir, state, args.serial, args.provisioner, issued)
    print(f"enrolled as {issued['identity']} ({issued['attestation']})")


def _save(
    state_dir: Path, state: dict[str, Any], serial: str, provisioner: str | None,
    issued: dict[str, Any],
) -> None:
    from device.provisioner import CredentialStore

    state.update({"serial": serial, "provisioner": provisioner, "identity": issued["identity"]})
    CredentialStore(state_dir).save(issued)
    (state_dir / "agent.json").write_text(json.dumps(state, indent=1))


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
        print(f"enrollment endpoint for {args.serial} on {endpoint.url}", flush=True)
        print(f"pairing code: {endpoint.code}", flush=True)
        if not endpoint.serve_until_enrolled(args.timeout):
            raise ConfigurationError(f"not enrolled within {args.timeout:.0f} s; nothing stored")
    assert endpoint.issued is not None
    print(f"enrolled as {endpoint.issued['identity']} ({endpoint.issued['attestation']})")


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
        raise ConfigurationError("no provisioner URL: pass --provisioner")
    client = ProvisionerClient(url, cafile=args.cafile)
    signer = state.signer()
    try:
        issued = renew(client, signer, state.serial)
    finally:
        getattr(signer, "close", lambda: None)()
    CredentialStore(args.state_dir).save(issued)
    return dt.datetime.fromisoformat(issued["operational_not_after"])


def cmd_renew(args: argparse.Namespace) -> None:
    if not args.watch:
        print(f"renewed; valid until {renew_once(args).isoformat()}")
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
            print(f"renewed; valid until {renew_once(args).isoformat()}", flush=True)
            backoff = 5.0
        except TesseraError as exc:
            print(f"tessera-agent: renewal failed: {exc}", file=sys.stderr, flush=True)
            time.sleep(backoff * random.uniform(0.5, 1.5))
            backoff = min(backoff * 2, 300)


def cmd_run(args: argparse.Namespace) -> None:
    import logging
    import signal

    from device.agent import Agent, AgentConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = AgentConfig.load(args.config)
    agent = Agent(config).start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"tessera-agent: running as {agent.identity} against "
          f"{config.host}:{config.port}", flush=True)
    stop.wait()
    agent.stop()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tessera-agent",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("enroll", help="enroll this device with the provisioning service")
    s.add_argument("--provisioner", required=True)
    s.add_argument("--serial", required=True)
    s.add_argument("--tpm", metavar="TCTI", help="e.g. device:/dev/tpmrm0")
    s.add_argument("--key-dir")
    s.add_argument("--pkcs11", metavar="SPEC")
    s.add_argument("--device-class", default="default")
    for sp in (s, r := sub.add_parser("renew", help="renew the operational credential")):
        sp.add_argument("--state-dir", type=Path, default=STATE_DIR)
        sp.add_argument("--cafile", default=os.environ.get("TESSERA_CAFILE"),
                        help="CA bundle for the service's TLS certificate")
    r.add_argument("--provisioner")
    r.add_argument("--watch", action="store_true", help="keep renewing before expiry")
    s.set_defaults(func=cmd_enroll)
    r.set_defaults(func=cmd_renew)
    e = sub.add_parser(
        "enrollment-endpoint",
        help="let a factory station enroll this device over the network (one enrollment)",
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
    run = sub.add_parser("run", help="keep this device connected to its MQTT broker")
    run.add_argument("--config", type=Path, default=Path("/etc/tessera/agent.toml"),
                     help="agent configuration (docs/AGENT.md)")
    run.set_defaults(func=cmd_run)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except TesseraError as exc:
        print(f"tessera-agent: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
