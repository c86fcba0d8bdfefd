"""`tessera enroll --ble` (provisioning.ble_cli) on the virtual radio: one device,
batch mode with a manifest (progress bar, --json, devices not on the manifest, devices
not in range), and bad input as one line."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import pytest

from provisioning import ble_cli, cli
from simulator.provisioner import ProvisioningServer
from simulator.swtpm import Swtpm
from structauth.errors import ConfigurationError
from tests import test_ble_enrollment as ble
from tests.test_ble_enrollment import CODE, OTHER_CODE, Factory, registered, run

# the enrollment tests' fixtures: a second swtpm, the provisioning service, the factory
second_tpm = ble.second_tpm
service = ble.service
factory = ble.factory

pytestmark = pytest.mark.hardware


def args(service: ProvisioningServer, *argv: str) -> object:
    """Parsed by the real `tessera enroll` parser (the options cmd_enroll hands to
    ble_cli.run when --ble is given)."""
    json_mode = ["--json"] if "--json" in argv else []  # main() takes it from anywhere
    parsed = cli.build_parser().parse_args(
        [*json_mode, "enroll", "--ble", "--provisioner", service.url,
         *(a for a in argv if a != "--json")])
    assert parsed.func is cli.cmd_enroll and parsed.ble
    return parsed


def test_one_device_json(factory: Factory, swtpm_session: Swtpm, tmp_path: Path) -> None:
    async def scenario() -> tuple[int, str]:
        await factory.device(swtpm_session, "cli-0001")
        central = factory.radio.add_device("station")
        await central.power_on()
        out = io.StringIO()
        status = await ble_cli.run_async(
            args(factory.service, "--json", "--serial", "cli-0001", "--code", CODE.lower(),
                 "--scan-time", "1", "--resume-dir", str(tmp_path / "resume"),
                 "--out", str(tmp_path / "creds")),  # type: ignore[arg-type]
            factory.client, backends=factory.radio.bleak_backends(central), out=out)
        return status, out.getvalue()

    status, text = run(scenario())
    assert status == 0
    issued = json.loads(text)
    assert issued["identity"].endswith("/device/cli-0001")
    assert issued["ble"]["mtu"] == 247 and issued["ble"]["timing"]["device_tpm"] > 0
    assert (tmp_path / "creds" / "operational.pem").exists()
    assert registered(factory.service) == ["cli-0001"]


def test_batch_with_manifest(factory: Factory, swtpm_session: Swtpm, second_tpm: Swtpm,
                             tmp_path: Path) -> None:
    manifest = tmp_path / "labels.csv"
    manifest.write_text("serial,code,device_class\n"
                        f"cli-0101,{CODE},sensor\n"
                        f"cli-0102,{OTHER_CODE},\n"
                        f"cli-0199,{CODE},\n")

    async def scenario() -> tuple[int, str, str, int, str]:
        await factory.device(swtpm_session, "cli-0101")
        await factory.device(second_tpm, "cli-0102", code=OTHER_CODE)
        await factory.device(swtpm_session, "cli-0150")  # in range, not on the manifest
        central = factory.radio.add_device("station")
        await central.power_on()
        backends = factory.radio.bleak_backends(central)
        out, err = io.StringIO(), io.StringIO()
        status = await ble_cli.run_async(
            args(factory.service, "--json", "--batch", str(manifest), "--scan-time", "1",
                 "--resume-dir", str(tmp_path / "resume")),  # type: ignore[arg-type]
            factory.client, backends=backends, out=out, err=err)
        # a second run finds nothing left to enroll; the text form has a progress bar
        out2, err2 = io.StringIO(), io.StringIO()
        status2 = await ble_cli.run_async(
            args(factory.service, "--batch", str(manifest), "--scan-time", "1",
                 "--resume-dir", str(tmp_path / "resume")),  # type: ignore[arg-type]
            factory.client, backends=backends, out=out2, err=err2)
        assert err.getvalue() == ""  # --json: no progress bar
        return status, out.getvalue(), out2.getvalue(), status2, err2.getvalue()

    status, text, text2, status2, bar = run(scenario())
    assert status == 0
    report = json.loads(text)
    assert report["enrolled"] == 2 and report["failed"] == 0 and report["skipped"] == 1
    assert report["missing"] == ["cli-0199"]
    ok = {r["serial"]: r for r in report["results"] if r["ok"]}
    assert set(ok) == {"cli-0101", "cli-0102"}
    skipped = [r for r in report["results"] if r.get("skipped")]
    assert skipped[0]["serial"] == "cli-0150" and "not on the manifest" in skipped[0]["error"]
    assert sorted(registered(factory.service)) == ["cli-0101", "cli-0102"]
    listing = json.loads(factory.service.cli("--json", "show", "cli-0101", check=True).stdout)
    assert listing["device_class"] == "sensor"
    assert status2 == 0 and "enrolled 0 of 3" in text2 and "cli-0199: not in range" in text2
    assert "[" in bar and "1/1" in bar  # cli-0150 is the only one still advertising


@pytest.mark.parametrize("argv,message", [
    (["--serial", "x", "--code", "TOO-SHORT"], "--code: the label code must be 10"),
    (["--code", CODE], "--ble needs --serial and --code"),
    (["--serial", "x", "--code", CODE, "--parallel", "0"], "--parallel must be >= 1"),
])
def test_bad_input_is_one_line(service: ProvisioningServer, argv: list[str],
                               message: str) -> None:
    from device.provisioner import ProvisionerClient

    client = ProvisionerClient(service.url, operator_token=service.operator_token)
    with pytest.raises(ConfigurationError) as exc:
        asyncio.run(ble_cli.run_async(args(service, *argv), client))  # type: ignore[arg-type]
    assert message in exc.value.detail and "\n" not in str(exc.value)


def test_bad_manifest_names_the_line(service: ProvisioningServer, tmp_path: Path) -> None:
    from device.provisioner import ProvisionerClient

    manifest = tmp_path / "labels.csv"
    manifest.write_text(f"serial,code\nok-1,{CODE}\nbad-2,0000\n")
    client = ProvisionerClient(service.url, operator_token=service.operator_token)
    with pytest.raises(ConfigurationError) as exc:
        asyncio.run(ble_cli.run_async(args(service, "--batch", str(manifest)),  # type: ignore[arg-type]
                                      client))
    assert "line 3 (bad-2)" in exc.value.detail
    assert registered(service) == []
