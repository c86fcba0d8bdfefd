"""``tessera-agent ble-sa1-serve`` / ``ble-sa1-send``: SA1 over GATT from the command line.

* ``ble-sa1-serve``: this enrolled device answers SA1 as a GATT peripheral (bumble on
  the board's controller, ``--hci hci-socket:0`` on a Pi) and prints every proven
  message as one JSON line: ``{"peer", "topic", "payload"}``.
* ``ble-sa1-send``: this enrolled device opens a session to a peripheral as a GATT
  central (bleak: BlueZ on Linux), sends one proven message and, with
  ``--wait-reply``, prints the first proven message back.

Both use the device's key and credential from its state directory (the files
``tessera-agent enroll`` or ``ble-enroll`` wrote) and check the peer against the trust
bundle there and the last revocation list the device saw (``--crl``, no older than
``--max-crl-age-hours``: there is no default, as for ``LastSeenRevocations``).
``python -m device.ble_sa1_cli serve|send`` runs the same.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any

from device.ble_args import add_send_arguments, add_serve_arguments
from device.state import DeviceState
from structauth.credentials import Identity, TrustStore
from structauth.errors import ConfigurationError, TesseraError


def _revocations(args: argparse.Namespace, trust: TrustStore) -> Any:
    from device.ble_session import LastSeenRevocations

    try:
        data = args.crl.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read the revocation list {args.crl}: "
                                 f"{exc.strerror} (fetch it while online)") from None
    return LastSeenRevocations.load(data, trust,
                                    {"max_crl_age_hours": args.max_crl_age_hours})


def _close(signer: Any) -> None:
    close = getattr(signer, "close", None)
    if close is not None:
        close()


def serve_command(args: argparse.Namespace) -> None:
    """Answer SA1 over GATT until ``--count`` proven messages arrived (or forever)."""
    from bumble.device import Device
    from bumble.transport import open_transport

    from device.ble_enrollment import static_address
    from device.ble_session import PeerSession, Sa1Peripheral
    from structauth.gatt_session import Received
    from structauth.handshake import Responder
    from structauth.params import SessionParams

    if args.count < 0:
        raise ConfigurationError("--count must be 0 (serve until stopped) or more")
    state = DeviceState.load(args.state_dir)
    credential, trust = state.credential(), state.trust()
    revoked = _revocations(args, trust)
    name = args.name or credential.identity.uri.rsplit("/", 1)[-1]

    async def serve(signer: Any) -> bool:
        try:
            transport = await open_transport(args.hci)
        except Exception as exc:  # bumble raises a bare Exception for an unusable transport
            raise ConfigurationError(f"cannot open the Bluetooth controller {args.hci}: "
                                     f"{exc}") from None
        done = asyncio.Event()
        got = 0

        async def on_message(session: PeerSession, message: Received) -> None:
            nonlocal got
            got += 1
            print(json.dumps({"peer": session.peer.uri if session.peer else None,
                              "topic": message.topic,
                              "payload": message.payload.decode("utf-8", "backslashreplace")}),
                  flush=True)
            if args.count and got >= args.count:
                done.set()

        async with transport:
            device = Device.with_hci(name, static_address(name), transport.source,
                                     transport.sink)
            responder = Responder(signer=signer, credential=credential, trust=trust,
                                  params=SessionParams(sealed=args.sealed),
                                  peer_kind=None if args.peer_kind == "any" else args.peer_kind)
            await Sa1Peripheral(device, responder, revoked=revoked,
                                on_message=on_message).start(name)
            print(f"advertising SA1 as {name} ({credential.identity})", flush=True)
            try:
                await asyncio.wait_for(done.wait(), args.timeout)
            except TimeoutError:
                return False
            return True

    signer = state.signer()
    try:
        if not asyncio.run(serve(signer)):
            raise ConfigurationError(f"{args.count} proven message(s) did not arrive "
                                     f"within {args.timeout:g} s")
    finally:
        _close(signer)


async def send_once(args: argparse.Namespace, *, backends: Any = None) -> dict[str, Any]:
    """What ``ble-sa1-send`` does, in the caller's event loop: the result it prints.
    ``backends``: bleak's (scanner, client) classes; None is the platform's (BlueZ)."""
    from device.ble_central import scan
    from device.ble_session import Sa1Central, sa1_link
    from structauth import gatt
    from structauth.handshake import Initiator

    try:
        peer = Identity.parse(args.peer)
    except (TesseraError, ValueError):
        raise ConfigurationError(f"--peer {args.peer!r} is not a SPIFFE identity "
                                 "(spiffe://<trust domain>/<kind>/<name>)") from None
    state = DeviceState.load(args.state_dir)
    credential, trust = state.credential(), state.trust()
    revoked = _revocations(args, trust)
    signer = state.signer()
    try:
        target: Any = args.address
        if target is None:
            found = await scan(gatt.SA1_SERVICE, timeout=args.scan_time, stop_after=1,
                               backends=backends)
            if not found:
                raise ConfigurationError(f"no device advertising SA1 within "
                                         f"{args.scan_time:g} s (pass --address)")
            target = found[0][0]
        central = Sa1Central(sa1_link(target, backends=backends), Initiator(
            signer=signer, credential=credential, trust=trust, expected_peer=peer),
            revoked=revoked)
        try:
            await central.open()
            await central.send(args.topic, args.message.encode())
            result: dict[str, Any] = {"peer": str(peer), "sent": args.topic}
            if args.wait_reply > 0:
                reply = await central.receive(args.wait_reply)
                result["reply"] = {"topic": reply.topic, "payload": reply.payload.decode(
                    "utf-8", "backslashreplace")}
            return result
        finally:
            await central.close()
    finally:
        _close(signer)


def send_command(args: argparse.Namespace) -> None:
    """Open a session to ``--peer`` over GATT (BlueZ), send one proven message."""
    try:
        print(json.dumps(asyncio.run(send_once(args))))
    except TesseraError:
        raise
    except Exception as exc:  # bleak: no adapter, BlueZ not reachable over D-Bus, ...
        raise ConfigurationError(f"cannot use the Bluetooth adapter: {type(exc).__name__}: "
                                 f"{' '.join(str(exc).split()) or 'no detail'} (is BlueZ "
                                 "running with a powered adapter? bluetoothctl show)") from None


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m device.ble_sa1_cli serve|send ...``."""
    p = argparse.ArgumentParser(prog="python -m device.ble_sa1_cli", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    add_serve_arguments(sub.add_parser("serve"))
    add_send_arguments(sub.add_parser("send"))
    args = p.parse_args(argv)
    try:
        (serve_command if args.command == "serve" else send_command)(args)
    except TesseraError as exc:
        print(f"tessera-agent: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
