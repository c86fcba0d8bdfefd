"""The arguments of `tessera-agent ble-enroll` (and `python -m device.ble_enrollment`).

Apart from device/ble_enrollment.py, which imports bumble and the TPM stack: the agent's
CLI lists the command on a device installed without the ble extra.
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
