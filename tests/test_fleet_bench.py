"""``python -m bench fleet`` (issue 17, point 2) as a test: the soak's counts, not its
speed. The quick run (30 devices, one key in swtpm, 20 s, reconnections, renewals and
revocations three times) runs by default; the bounded 60 s run with 200 devices is
``slow``. The full 1,000-device, 10-minute soak is run by hand (docs/SCALING.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.broker

REPO = Path(__file__).resolve().parents[1]


def _bench(*args: str) -> dict[str, object]:
    done = subprocess.run([sys.executable, "-m", "bench", "fleet", "--json", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    out: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def _counts_hold(out: dict[str, object], devices: int) -> None:
    soak = out["soak"]
    assert isinstance(soak, dict)
    assert soak["devices"] == devices and soak["tpm_devices"] >= 1
    assert soak["acked"] > 0 and soak["lost"] == 0 and soak["duplicated"] == 0
    assert soak["false_rejects"] == 0 and soak["unexpected_disconnects"] == 0
    assert soak["revoked"] >= 2 and len(soak["revocation_cut_ms"]) == soak["revoked"]
    assert soak["renewals"] >= 1 and soak["reconnects"] >= 1
    # the TPM devices are real tessera-agent processes: each sent heartbeats that
    # arrived, and stopped cleanly on SIGTERM
    agents = soak["agents"]
    assert agents["processes"] == soak["tpm_devices"]
    assert len(agents["heartbeats"]) == agents["processes"]
    assert all(n > 0 for n in agents["heartbeats"].values())
    assert agents["exit_status"] == [0] * agents["processes"]
    assert out["revocation_ms"]  # every revoked device was cut


def test_bench_fleet_quick() -> None:
    _counts_hold(_bench("--quick", "--no-scaling"), 30)


@pytest.mark.slow
def test_bench_fleet_bounded_60_s() -> None:
    _counts_hold(_bench("--devices", "200", "--seconds", "60", "--tpm-devices", "2",
                        "--revocations", "5", "--no-scaling"), 200)
