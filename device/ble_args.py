"""The arguments of `tessera-agent ble-enroll` (and `python -m device.ble_enrollment`),
`ble-sa1-serve` and `ble-sa1-send` (and `python -m device.ble_sa1_cli`).

Apart from device/ble_enrollment.py and device/ble_sa1_cli.py, which import bumble,
bleak and the TPM stack: the agent's CLI lists the commands on a device installed
without the ble extra.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--serial", required=True)
    p.add_argument("--tpm", required=True, metavar="TCTI")
    p.add_argument("--state-dir", type=Path, required=True)
    p.add_argument("--key-dir")
    p.add_argument("--hci", default="hci-socket:0",
                   help="bumble transport of the Bluetooth controller (default %(default)s)")
    p.add_argument("--show-code", action="store_true", help="print the label code and exit")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS")


# -- SA1 over GATT: tessera-agent ble-sa1-serve / ble-sa1-send ------------------------------


def _sa1_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", type=Path, required=True,
                   help="the enrolled device's state directory (agent.json, "
                        "operational.pem, bundle.pem)")
    p.add_argument("--crl", type=Path, required=True, metavar="FILE",
                   help="the last revocation list this device fetched (PEM or DER)")
    p.add_argument("--max-crl-age-hours", type=float, required=True, metavar="HOURS",
                   help="how old a revocation list this device still trusts")


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    _sa1_common(p)
    p.add_argument("--hci", default="hci-socket:0",
                   help="bumble transport of the Bluetooth controller (default %(default)s)")
    p.add_argument("--name", help="advertised name (default: the device's serial)")
    p.add_argument("--sealed", action="store_true", help="encrypt payloads, not only prove")
    p.add_argument("--peer-kind", default="device", choices=["device", "broker", "any"],
                   help="who may connect (default %(default)s)")
    p.add_argument("--count", type=int, default=0, metavar="N",
                   help="exit 0 after N proven messages (default: serve until stopped)")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="exit 1 if the N messages did not arrive within SECONDS")


def add_send_arguments(p: argparse.ArgumentParser) -> None:
    _sa1_common(p)
    p.add_argument("--peer", required=True, metavar="SPIFFE_ID",
                   help="the identity of the peripheral to reach (named in msg1)")
    p.add_argument("--address", help="its Bluetooth address (else: the first in range "
                                     "advertising the SA1 service)")
    p.add_argument("--topic", required=True)
    p.add_argument("--message", required=True, help="the payload (UTF-8 text)")
    p.add_argument("--scan-time", type=float, default=10.0, metavar="SECONDS")
    p.add_argument("--wait-reply", type=float, default=0.0, metavar="SECONDS",
                   help="print the first proven message back within SECONDS")
