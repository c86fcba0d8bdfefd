"""``tessera-sim``: start and stop the software stand-ins from a shell.

    tessera-sim swtpm start --state DIR     prints the TCTI; swtpm keeps running
    tessera-sim swtpm stop --state DIR
    tessera-sim softhsm init --dir DIR --label L     user PIN from $TESSERA_PKCS11_PIN
    tessera-sim softhsm delete --dir DIR --label L
    tessera-sim demo [--workdir DIR] [--protocol-only]  the whole story (simulator.story)
    tessera-sim fleet up [--brokers 3] [--workdir DIR]  PostgreSQL, the provisioning
                                            service, N brokers and HAProxy in front;
                                            runs until Ctrl-C (simulator.fleet)
    tessera-sim --version                   tessera-sim <installed version>

``softhsm init`` prints shell lines (``eval "$(tessera-sim softhsm init ...)"``): the
module path as a comment and the SOFTHSM2_CONF export. The SO PIN is taken from
$TESSERA_PKCS11_SO_PIN, or generated and stored in DIR/so.pin (mode 0600).
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path

from structauth.errors import ConfigurationError, TesseraError

USER_PIN_ENV = "TESSERA_PKCS11_PIN"
SO_PIN_ENV = "TESSERA_PKCS11_SO_PIN"


def version() -> str:
    """The installed distribution's version (importlib.metadata), e.g. ``0.2.0``."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("tessera")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _swtpm_start(args: argparse.Namespace) -> int:
    from simulator.swtpm import Swtpm

    tpm = Swtpm(args.state, ek_certs=not args.no_ek_certs)
    tpm.start()
    print(tpm.tcti)
    return 0


def _swtpm_stop(args: argparse.Namespace) -> int:
    from simulator.swtpm import Swtpm

    if not Path(args.state).is_dir():
        raise ConfigurationError(f"no swtpm state directory at {args.state}")
    tpm = Swtpm(args.state)
    was_running = tpm.running
    tpm.stop()
    print("stopped" if was_running else "not running", file=sys.stderr)
    return 0


def _softhsm_init(args: argparse.Namespace) -> int:
    from simulator.softhsm import SoftHsm, write_pin_file

    user_pin = os.environ.get(USER_PIN_ENV, "")
    if not user_pin:
        raise ConfigurationError(f"set the user PIN in the environment variable {USER_PIN_ENV}")
    hsm = SoftHsm(args.dir)
    so_pin = os.environ.get(SO_PIN_ENV, "")
    if not so_pin:
        so_pin = secrets.token_hex(16)
        path = write_pin_file(hsm.directory / "so.pin", so_pin)
        print(f"# SO PIN generated and stored in {path}")
    hsm.init_token(args.label, so_pin=so_pin, user_pin=user_pin)
    print(f"# token {args.label!r} ready; PKCS#11 module: {hsm.module}")
    print(f"export SOFTHSM2_CONF={hsm.conf_path}")
    return 0


def _softhsm_delete(args: argparse.Namespace) -> int:
    from simulator.softhsm import SoftHsm

    if not Path(args.dir).is_dir():
        raise ConfigurationError(f"no SoftHSM2 directory at {args.dir}")
    SoftHsm(args.dir).delete_token(args.label)
    return 0


def _demo(args: argparse.Namespace) -> int:
    if not args.protocol_only:
        from simulator.story import run_story  # imported only when asked for

        return int(run_story(Path(args.workdir) if args.workdir else None))
    from simulator.demo import run_demo

    return int(run_demo(Path(args.workdir) if args.workdir else None))


def _fleet_up(args: argparse.Namespace) -> int:
    import signal
    import tempfile
    import threading

    from simulator.fleet import BrokerFleet

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="fleet-"))
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    print(f"starting {args.brokers} brokers in {workdir} ...", file=sys.stderr, flush=True)
    with BrokerFleet(workdir, args.brokers) as fleet:
        print(fleet.describe(), flush=True)
        print("running; Ctrl-C stops everything", file=sys.stderr, flush=True)
        done.wait()
    print("stopped", file=sys.stderr)
    return 0


def _brokers(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 16:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of brokers 1 .. 16")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tessera-sim", description="Software stand-ins for Tessera: swtpm and SoftHSM2."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    tools = parser.add_subparsers(dest="tool", required=True,
                                  metavar="{swtpm,softhsm,demo,fleet}")

    swtpm = tools.add_parser("swtpm", help="a software TPM 2.0 on 127.0.0.1")
    swtpm_cmds = swtpm.add_subparsers(dest="command", required=True)
    start = swtpm_cmds.add_parser("start", help="start (manufacturing on first use); print TCTI")
    start.add_argument("--state", required=True, help="state directory (kept across restarts)")
    start.add_argument(
        "--no-ek-certs", action="store_true", help="skip swtpm_setup (no EK certificate)"
    )
    start.set_defaults(func=_swtpm_start)
    stop = swtpm_cmds.add_parser("stop", help="stop the swtpm serving --state")
    stop.add_argument("--state", required=True)
    stop.set_defaults(func=_swtpm_stop)

    softhsm = tools.add_parser("softhsm", help="SoftHSM2 tokens in a private directory")
    softhsm_cmds = softhsm.add_subparsers(dest="command", required=True)
    init = softhsm_cmds.add_parser("init", help=f"create a token (user PIN from ${USER_PIN_ENV})")
    init.add_argument("--dir", required=True, help="SoftHSM2 directory (conf + tokens)")
    init.add_argument("--label", required=True, help="token label")
    init.set_defaults(func=_softhsm_init)
    delete = softhsm_cmds.add_parser("delete", help="delete a token")
    delete.add_argument("--dir", required=True)
    delete.add_argument("--label", required=True)
    delete.set_defaults(func=_softhsm_delete)

    demo = tools.add_parser(
        "demo", help="the whole story: authority, TPM enrollment, broker, agents, attacks")
    demo.add_argument("--workdir", help="keep the demo's files here (default: a temp dir)")
    demo.add_argument("--protocol-only", action="store_true",
                      help="only the SA1 handshake and messages between two hardware keys")
    demo.set_defaults(func=_demo)

    fleet = tools.add_parser(
        "fleet", help="several brokers behind HAProxy on one PostgreSQL registry")
    fleet_cmds = fleet.add_subparsers(dest="command", required=True)
    up = fleet_cmds.add_parser("up", help="start it all on 127.0.0.1; Ctrl-C stops it")
    up.add_argument("--brokers", type=_brokers, default=3, help="Mosquitto replicas (1..16)")
    up.add_argument("--workdir", help="keep the fleet's files here (default: a temp dir)")
    up.set_defaults(func=_fleet_up)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except TesseraError as exc:
        print(f"tessera-sim: error: {exc.detail}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"tessera-sim: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
