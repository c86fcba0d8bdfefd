"""The device's BLE enrollment command (``python -m device.ble_enrollment``, which
``tessera-agent ble-enroll`` runs) in its own process, talking HCI over a socket to a
virtual controller on the test's radio, as it talks to a Pi's controller over
``hci-socket:0``; the station enrolls it with the real provisioning service."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from device.ble_enrollment import load_or_create_code
from simulator.ble import VirtualRadio
from simulator.provisioner import ProvisioningServer, free_port
from simulator.swtpm import Swtpm
from tests import test_ble_enrollment as ble
from tests.test_ble_enrollment import registered, run

pytestmark = pytest.mark.hardware

second_tpm = ble.second_tpm
service = ble.service


def test_device_process_over_an_hci_socket(service: ProvisioningServer, swtpm_session: Swtpm,
                                           tmp_path: Path) -> None:
    from device.provisioner import ProvisionerClient
    from provisioning.ble_station import BleStation

    state = tmp_path / "device"
    code = load_or_create_code(state)  # what the label printer printed
    assert (state / "ble-code").stat().st_mode & 0o777 == 0o600

    async def scenario() -> tuple[int, str, str]:
        radio = VirtualRadio()
        port = free_port()
        transport = await radio.serve_controller(f"tcp-server:127.0.0.1:{port}")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "device.ble_enrollment", "--serial", "agent-01",
            "--tpm", swtpm_session.tcti, "--state-dir", str(state),
            "--hci", f"tcp-client:127.0.0.1:{port}", "--timeout", "40",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 20)
            assert b"advertising" in line, line
            central = radio.add_device("station")
            await central.power_on()
            station = BleStation(ProvisionerClient(service.url,
                                                   operator_token=service.operator_token),
                                 backends=radio.bleak_backends(central))
            found = await station.scan(timeout=5, stop_after=1)
            done = await station.enroll(found[0], serial="agent-01", code=code)
            assert done.issued["identity"].endswith("/device/agent-01")
            out, err = await asyncio.wait_for(proc.communicate(), 20)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await transport.close()
        return proc.returncode or 0, out.decode(), err.decode()

    status, out, err = run(scenario())
    assert status == 0, err
    assert "enrolled; credentials in" in out
    agent = json.loads((state / "agent.json").read_text())
    assert agent["serial"] == "agent-01" and agent["tcti"] == swtpm_session.tcti
    assert (state / "operational.pem").exists() and (state / "bundle.pem").exists()
    assert registered(service) == ["agent-01"]


def test_an_unusable_controller_is_one_line(tmp_path: Path) -> None:
    import subprocess

    done = subprocess.run(
        [sys.executable, "-m", "device.ble_enrollment", "--serial", "x", "--tpm", "swtpm:",
         "--state-dir", str(tmp_path), "--hci", "no-such-transport:0"],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "cannot open the Bluetooth controller" in done.stderr
