"""`tessera enroll --ble --out DIR` writes the agent state directory the network path
writes (provisioning.cli's _OutPlan: credentials, agent.json, agent.toml, the broker's
CA), over the virtual radio with a swtpm device and the real provisioning service.

What "complete" means is what the agent reads: device.state.DeviceState.load opens it
(the device key it names is the one the credential certifies) and
``AgentConfig.load(DIR/agent.toml, state_dir=DIR)`` accepts it as ``tessera-agent run
--state DIR`` does. Refusals come before the device is enrolled and leave the service,
the device and the directory as they were."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from device.agent import AgentConfig
from device.state import DeviceState
from provisioning import ble_cli
from simulator.swtpm import Swtpm
from structauth.errors import ConfigurationError
from tests import test_ble_enrollment as ble
from tests.test_ble_cli import args
from tests.test_ble_enrollment import CODE, Factory, Unit, registered, run

second_tpm = ble.second_tpm
service = ble.service
factory = ble.factory

pytestmark = pytest.mark.hardware

BROKER_ID = "spiffe://factory.tessera.test/broker/mqtt-1"
STATE_FILES = ["agent.json", "agent.toml", "bundle.pem", "enrollment.pem", "identity",
               "operational.pem"]


def _spki(key: Any) -> bytes:
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)  # type: ignore[no-any-return]


async def _station(factory: Factory, tpm: Swtpm, unit: Unit, tmp: Path, *argv: str
                   ) -> tuple[int, str]:
    """`tessera enroll --ble --json ...` with the device's key where ``unit`` keeps it."""
    central = factory.radio.add_device("station")
    await central.power_on()
    out = io.StringIO()
    status = await ble_cli.run_async(
        args(factory.service, "--json", "--scan-time", "1", "--resume-dir",
             str(tmp / "resume"), "--device-tcti", tpm.tcti, "--device-key-dir",
             str(unit.state / "keys"), *argv),  # type: ignore[arg-type]
        factory.client, backends=factory.radio.bleak_backends(central), out=out,
        err=io.StringIO())
    return status, out.getvalue()


async def _enroll(factory: Factory, tpm: Swtpm, serial: str, tmp: Path, *argv: str
                  ) -> tuple[int, str, Unit]:
    unit = await factory.device(tpm, serial)
    if "--batch" in argv:
        return (*await _station(factory, tpm, unit, tmp, *argv), unit)
    return (*await _station(factory, tpm, unit, tmp, "--serial", serial, "--code", CODE,
                            *argv), unit)


def _check_state_dir(out: Path, unit: Unit, identity: str, service_url: str) -> DeviceState:
    """What the agent's loaders make of it, and that it says what the device itself
    wrote after the BLE enrollment."""
    state = DeviceState.load(out)
    assert state.serial == unit.enrollment.serial
    assert state.provisioner == service_url
    credential = state.credential()
    assert str(credential.identity) == identity
    state.trust()
    signer = state.signer()  # the device's key, from the key directory agent.json names
    try:
        assert _spki(signer.public_key()) == _spki(credential.chain[0].public_key())
    finally:
        getattr(signer, "close", lambda: None)()
    device_own = json.loads((unit.state / "agent.json").read_text())
    assert json.loads((out / "agent.json").read_text()) == device_own
    for name in ("operational.pem", "bundle.pem"):
        assert (out / name).read_bytes() == (unit.state / name).read_bytes()
    return state


def test_out_is_a_complete_agent_state_dir(factory: Factory, swtpm_session: Swtpm,
                                           tmp_path: Path) -> None:
    cafile = tmp_path / "broker-tls-ca.pem"
    factory.service.cli("export-bundle", "-o", str(cafile), check=True)  # any CA PEM
    out = tmp_path / "pi-ble-out"
    status, text, unit = run(_enroll(
        factory, swtpm_session, "ble-out-1", tmp_path, "--out", str(out),
        "--broker", "mqtts://127.0.0.1:8883", "--broker-identity", BROKER_ID,
        "--broker-cafile", str(cafile)))
    assert status == 0
    identity = json.loads(text)["identity"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*STATE_FILES, "broker-ca.pem"])
    assert not any(p.name.startswith(".pi-ble-out") for p in tmp_path.iterdir())  # staging
    _check_state_dir(out, unit, identity, factory.service.url)
    assert (out / "broker-ca.pem").read_bytes() == cafile.read_bytes()
    config = AgentConfig.load(out / "agent.toml", state_dir=out)  # run --state DIR
    assert (config.host, config.port, config.broker_identity) == ("127.0.0.1", 8883,
                                                                  BROKER_ID)
    assert config.tls_cafile == str(out / "broker-ca.pem")
    assert config.state_dir == out


def test_out_without_broker_is_a_template(factory: Factory, swtpm_session: Swtpm,
                                          tmp_path: Path) -> None:
    out = tmp_path / "pi-ble-tpl"
    status, text, unit = run(_enroll(factory, swtpm_session, "ble-out-2", tmp_path,
                                     "--out", str(out)))
    assert status == 0
    assert sorted(p.name for p in out.iterdir()) == STATE_FILES
    _check_state_dir(out, unit, json.loads(text)["identity"], factory.service.url)
    with pytest.raises(ConfigurationError) as exc:  # as on the network path: fill it in
        AgentConfig.load(out / "agent.toml", state_dir=out)
    assert "mqtt.host is required" in exc.value.detail


def test_batch_out_gets_one_state_dir_per_device(factory: Factory, swtpm_session: Swtpm,
                                                 tmp_path: Path) -> None:
    manifest = tmp_path / "labels.csv"
    manifest.write_text(f"serial,code\nble-out-3,{CODE}\n")
    root = tmp_path / "creds"

    status, text, unit = run(_enroll(
        factory, swtpm_session, "ble-out-3", tmp_path, "--batch", str(manifest), "--out",
        str(root), "--broker", "mqtt://127.0.0.1:1883", "--broker-identity", BROKER_ID))
    assert status == 0, text
    (result,) = json.loads(text)["results"]
    out = root / "ble-out-3"
    assert sorted(p.name for p in out.iterdir()) == STATE_FILES
    _check_state_dir(out, unit, result["identity"], factory.service.url)
    config = AgentConfig.load(out / "agent.toml", state_dir=out)
    assert (config.host, config.port, config.tls_cafile) == ("127.0.0.1", 1883, None)


# -- refusals: before the device is enrolled, nothing changed ---------------------------


@pytest.mark.parametrize("case", ["out-not-empty", "broker-alone", "foreign-domain"])
def test_refused_before_enrollment(factory: Factory, swtpm_session: Swtpm, tmp_path: Path,
                                   case: str) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("someone else's\n")
    extra = {
        "out-not-empty": [],
        "broker-alone": ["--broker", "mqtt://127.0.0.1:1883"],
        "foreign-domain": ["--broker", "mqtt://127.0.0.1:1883", "--broker-identity",
                           "spiffe://other.example/broker/mqtt-1"],
    }[case]
    target = out if case == "out-not-empty" else tmp_path / "fresh"
    expected = {"out-not-empty": "is a directory that is not empty",
                "broker-alone": "--broker and --broker-identity go together",
                "foreign-domain": "is in trust domain 'other.example'"}[case]
    before = sorted(p.name for p in tmp_path.iterdir())

    async def scenario() -> tuple[str, Unit]:
        unit = await factory.device(swtpm_session, "ble-out-9")
        with pytest.raises(ConfigurationError) as exc:
            await _station(factory, swtpm_session, unit, tmp_path, "--serial", "ble-out-9",
                           "--code", CODE, "--out", str(target), *extra)
        return exc.value.detail, unit

    detail, unit = run(scenario())
    assert expected in detail and "\n" not in detail, detail
    assert registered(factory.service) == []
    assert not unit.enrollment.enrolled.is_set()
    assert not (unit.state / "operational.pem").exists()
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    after = sorted(p.name for p in tmp_path.iterdir())
    assert [n for n in after if n not in before and not n.startswith("ble-out-9")] == []


def test_refused_out_in_a_batch_spares_the_device(factory: Factory, swtpm_session: Swtpm,
                                                  tmp_path: Path) -> None:
    manifest = tmp_path / "labels.csv"
    manifest.write_text(f"serial,code\nble-out-8,{CODE}\n")
    root = tmp_path / "creds"
    (root / "ble-out-8").mkdir(parents=True)
    (root / "ble-out-8" / "notes.txt").write_text("someone else's\n")

    status, text, unit = run(_enroll(factory, swtpm_session, "ble-out-8", tmp_path,
                                     "--batch", str(manifest), "--out", str(root)))
    assert status == 1
    (result,) = json.loads(text)["results"]
    assert result["serial"] == "ble-out-8" and not result["ok"]
    assert "is a directory that is not empty" in result["error"]
    assert registered(factory.service) == []
    assert not unit.enrollment.enrolled.is_set()
    assert sorted(p.name for p in (root / "ble-out-8").iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in root.iterdir()) == ["ble-out-8"]

