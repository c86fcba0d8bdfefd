"""What a device enrolled over BLE keeps in its own state directory: the credentials,
agent.json and, when the station knows the broker (--broker/--broker-identity), the
agent.toml and broker CA the network path's --out holds, written with the credentials
all or nothing; an agent.toml already on the device is kept. The device's "stored"
answer tells the station how its agent.json names the key, which --out's agent.json
then says (--device-tcti/--device-key-dir only for a device that does not tell).

Over the virtual radio with a swtpm device and the real provisioning service."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from device.agent import AgentConfig
from device.state import DeviceState
from provisioning.ble_station import BleStation, DeviceRefused
from simulator.swtpm import Swtpm
from structauth.errors import ConfigurationError, Reason
from tests import test_ble_enrollment as ble
from tests.test_ble_enrollment import CODE, Factory, Unit, only_device, registered, run
from tests.test_ble_station_out import BROKER_ID, _station

second_tpm = ble.second_tpm
service = ble.service
factory = ble.factory

pytestmark = pytest.mark.hardware

#: station options that name the key wrongly: the device's answer must win over them
WRONG_KEY = ["--device-tcti", "device:/dev/not-this-tpm", "--device-key-dir", "/not/these"]


def _files(directory: Path) -> dict[str, bytes | None]:
    """What ``directory`` holds (None for a directory, hidden ones too) but its TPM key
    files (the evidence step makes them)."""
    return {p.name: p.read_bytes() if p.is_file() else None
            for p in sorted(directory.iterdir()) if p.name != "keys"}


def _cafile(factory: Factory, tmp: Path) -> Path:
    cafile = tmp / "broker-tls-ca.pem"
    factory.service.cli("export-bundle", "-o", str(cafile), check=True)  # any CA PEM
    return cafile


def test_device_keeps_agent_toml_and_tells_its_key(factory: Factory, swtpm_session: Swtpm,
                                                   tmp_path: Path) -> None:
    cafile = _cafile(factory, tmp_path)
    out = tmp_path / "station-copy"

    async def scenario() -> tuple[int, str, Unit]:
        unit = await factory.device(swtpm_session, "ble-state-1")
        status, text = await _station(
            factory, swtpm_session, unit, tmp_path, "--serial", "ble-state-1", "--code",
            CODE, "--out", str(out), "--broker", "mqtts://127.0.0.1:8883",
            "--broker-identity", BROKER_ID, "--broker-cafile", str(cafile), *WRONG_KEY)
        return status, text, unit

    status, text, unit = run(scenario())
    assert status == 0, text
    state_dir = unit.state
    for name in ("agent.json", "agent.toml", "broker-ca.pem", "operational.pem",
                 "bundle.pem", "identity"):
        assert (state_dir / name).is_file(), name
    assert not [p.name for p in state_dir.iterdir() if p.name.endswith(".tmp")]
    # the device's files are the station's --out copy, byte for byte
    for name in ("agent.toml", "broker-ca.pem", "agent.json"):
        assert (state_dir / name).read_bytes() == (out / name).read_bytes(), name
    assert (state_dir / "broker-ca.pem").read_bytes() == cafile.read_bytes()
    # --out's agent.json names the key as the device does, not as WRONG_KEY says
    settings = json.loads((out / "agent.json").read_text())
    assert (settings["tcti"], settings["key_dir"]) == (swtpm_session.tcti,
                                                       str(state_dir / "keys"))

    config = AgentConfig.load(state_dir / "agent.toml", state_dir=state_dir)
    assert (config.host, config.port, config.broker_identity) == ("127.0.0.1", 8883,
                                                                  BROKER_ID)
    assert config.tls_cafile == str(state_dir / "broker-ca.pem")
    state = config.check()  # what `tessera-agent run --state DIR` checks before connecting
    assert str(state.credential().identity) == json.loads(text)["identity"]
    assert DeviceState.load(state_dir).serial == "ble-state-1"


def test_no_broker_no_agent_toml(factory: Factory, swtpm_session: Swtpm,
                                 tmp_path: Path) -> None:
    async def scenario() -> tuple[int, str, Unit]:
        unit = await factory.device(swtpm_session, "ble-state-2")
        status, text = await _station(factory, swtpm_session, unit, tmp_path, "--serial",
                                      "ble-state-2", "--code", CODE)
        return status, text, unit

    status, text, unit = run(scenario())
    assert status == 0, text
    assert (unit.state / "agent.json").is_file()
    assert not (unit.state / "agent.toml").exists()
    assert not (unit.state / "broker-ca.pem").exists()
    DeviceState.load(unit.state).credential()


def test_operators_agent_toml_is_kept(factory: Factory, swtpm_session: Swtpm,
                                      tmp_path: Path) -> None:
    mine = b"# the operator's\n[mqtt]\nhost = \"broker.site\"\nport = 1883\n"

    async def scenario() -> tuple[int, str, Unit]:
        unit = await factory.device(swtpm_session, "ble-state-3")
        unit.state.mkdir(exist_ok=True)
        (unit.state / "agent.toml").write_bytes(mine)
        status, text = await _station(
            factory, swtpm_session, unit, tmp_path, "--serial", "ble-state-3", "--code",
            CODE, "--broker", "mqtts://127.0.0.1:8883", "--broker-identity", BROKER_ID,
            "--broker-cafile", str(_cafile(factory, tmp_path)))
        return status, text, unit

    status, text, unit = run(scenario())
    assert status == 0, text
    assert (unit.state / "agent.toml").read_bytes() == mine
    assert not (unit.state / "broker-ca.pem").exists()  # goes with the station's agent.toml
    assert (unit.state / "operational.pem").is_file()


def test_device_that_does_not_tell_gets_the_options(factory: Factory, swtpm_session: Swtpm,
                                                    tmp_path: Path) -> None:
    """An older device (no ``agent`` in its "stored" answer): the options name the key."""
    out = tmp_path / "older"

    async def scenario() -> tuple[int, str]:
        unit = await factory.device(swtpm_session, "ble-state-4")
        save = unit.enrollment.on_enrolled

        def older(issued: dict[str, Any]) -> None:
            save(issued)

        unit.enrollment.on_enrolled = older
        return await _station(factory, swtpm_session, unit, tmp_path, "--serial",
                              "ble-state-4", "--code", CODE, "--out", str(out), *WRONG_KEY)

    status, text = run(scenario())
    assert status == 0, text
    settings = json.loads((out / "agent.json").read_text())
    assert (settings["tcti"], settings["key_dir"]) == ("device:/dev/not-this-tpm",
                                                       "/not/these")


# -- refusals --------------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [
    ("agent_toml", "[mqtt\nhost = "),                 # not TOML
    ("agent_toml", "[device]\nstate_dir = \"/x\"\n"),  # no [mqtt] host
    ("broker_ca", "not a certificate"),
])
def test_device_refuses_malformed_agent_files(factory: Factory, swtpm_session: Swtpm,
                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              field: str, value: str) -> None:
    """A delivery (correctly bound) whose agent files are not what a station sends:
    refused malformed, before anything is stored; the device stays unprovisioned."""
    good = {"agent_toml": "[mqtt]\nhost = \"127.0.0.1\"\n"}
    monkeypatch.setattr(BleStation, "_agent_files", lambda self: {**good, field: value})

    async def scenario() -> tuple[DeviceRefused, Unit]:
        unit = await factory.device(swtpm_session, "ble-state-5")
        unit.state.mkdir(exist_ok=True)
        (unit.state / "notes.txt").write_text("the device's own\n")
        before = _files(unit.state)
        station = await factory.station(resume_dir=tmp_path / "resume", retries=0)
        with pytest.raises(DeviceRefused) as exc:
            await station.enroll(await only_device(station), serial="ble-state-5", code=CODE)
        assert _files(unit.state) == before
        return exc.value, unit

    refused, unit = run(scenario())
    assert refused.reason is Reason.MALFORMED
    assert f"field {field!r}" in refused.detail and "\n" not in refused.detail
    assert not unit.enrollment.enrolled.is_set()
    assert unit.enrollment.refusals[-1][0] is Reason.MALFORMED
    assert not (unit.state / "agent.json").exists()
    assert (tmp_path / "resume" / "ble-state-5.json").is_file()  # kept for the next run


def test_out_refused_for_a_device_naming_no_tpm(factory: Factory, swtpm_session: Swtpm,
                                                tmp_path: Path) -> None:
    """A "stored" answer whose key settings are not a TPM's: --out is not written (one
    line); the device is enrolled and holds its credentials."""
    out = tmp_path / "refused-out"

    async def scenario() -> tuple[str, Unit]:
        unit = await factory.device(swtpm_session, "ble-state-6")
        save = unit.enrollment.on_enrolled

        def odd(issued: dict[str, Any]) -> dict[str, Any]:
            save(issued)
            return {"backend": "pkcs11", "tcti": "", "key_dir": 7}

        unit.enrollment.on_enrolled = odd
        with pytest.raises(ConfigurationError) as exc:
            await _station(factory, swtpm_session, unit, tmp_path, "--serial", "ble-state-6",
                           "--code", CODE, "--out", str(out))
        return exc.value.detail, unit

    detail, unit = run(scenario())
    assert "not a TPM's TCTI and key directory" in detail and "\n" not in detail, detail
    assert f"--out {out} not written" in detail
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".refused-out")]
    assert unit.enrollment.enrolled.is_set()
    assert (unit.state / "operational.pem").is_file()


def test_broker_ca_too_large_for_ble_refused_first(factory: Factory, swtpm_session: Swtpm,
                                                   tmp_path: Path) -> None:
    """A --broker-cafile the delivery could not carry: refused before the device is
    enrolled (one line), nothing registered, the device unprovisioned."""
    big = tmp_path / "all-cas.pem"
    one = _cafile(factory, tmp_path).read_bytes()
    big.write_bytes(one * (8 * 1024 // len(one) + 1))

    async def scenario() -> tuple[str, Unit]:
        unit = await factory.device(swtpm_session, "ble-state-7")
        with pytest.raises(ConfigurationError) as exc:
            await _station(factory, swtpm_session, unit, tmp_path, "--serial", "ble-state-7",
                           "--code", CODE, "--broker", "mqtts://127.0.0.1:8883",
                           "--broker-identity", BROKER_ID, "--broker-cafile", str(big))
        return exc.value.detail, unit

    detail, unit = run(scenario())
    assert f"--broker-cafile {big} is" in detail and "at most 8192" in detail, detail
    assert "\n" not in detail
    assert registered(factory.service) == []
    assert not unit.enrollment.enrolled.is_set()
    assert not unit.state.exists() or not (unit.state / "agent.json").exists()
