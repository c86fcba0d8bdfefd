"""What an enrolled device writes into its state directory, by any path (network
enrollment, the enrollment endpoint, BLE): device.provisioner.save_device_state. The
credentials, agent.json, and the station's agent.toml and broker CA are installed all
or nothing; malformed station fields are refused before anything is written; an
operator's own agent.toml is kept. (The network path wrote agent.json, agent.toml and
broker-ca.pem one by one after the credentials: an error between them left a state
directory the agent could not start from.)"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest

from device import provisioner
from device.provisioner import save_device_state
from structauth.errors import MalformedMessage
from tests.support import a_ca_certificate

TOML = '[mqtt]\nhost = "127.0.0.1"\nport = 8883\ntls_cafile = "broker-ca.pem"\n'


def _issued(tag: str, **extra: Any) -> dict[str, Any]:
    return {"identity": "spiffe://factory.tessera.test/device/pi-1",
            "operational_credential": f"operational {tag}\n", "bundle": f"bundle {tag}\n",
            "enrollment_credential": f"enrollment {tag}\n", **extra}


def _files(d: Path) -> dict[str, bytes]:
    """Every file under ``d`` (hidden staging leftovers included)."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _old_state(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    save_device_state(state, {"backend": "tpm", "serial": "pi-1"}, _issued("old"))
    (state / "keys").mkdir()
    (state / "keys" / "tessera-device.key").write_bytes(b"the key blob\n")
    return state


def test_credentials_agent_json_and_the_stations_files_land_together(tmp_path: Path) -> None:
    state = tmp_path / "fresh"
    ca = a_ca_certificate(tmp_path).read_text()
    save_device_state(state, {"backend": "tpm", "serial": "pi-1"},
                      _issued("new", agent_toml=TOML, broker_ca=ca))
    assert sorted(_files(state)) == ["agent.json", "agent.toml", "broker-ca.pem",
                                     "bundle.pem", "enrollment.pem", "identity",
                                     "operational.pem"]
    assert (state / "agent.toml").read_text() == TOML
    assert (state / "broker-ca.pem").read_text() == ca


@pytest.mark.parametrize("field,value,why", [
    ("agent_toml", "[mqtt\nhost = ", "field 'agent_toml'"),          # not TOML
    ("agent_toml", '[device]\nstate_dir = "/x"\n', "field 'agent_toml'"),  # no [mqtt]
    ("agent_toml", "[mqtt]\nhost = 7\n", "field 'agent_toml'"),  # host not a string
    ("agent_toml", "[mqtt]\nhost = \"h\"\n" + "#" * 5000, "field 'agent_toml'"),  # too big
    ("broker_ca", "not a certificate", "field 'broker_ca'"),
])
def test_malformed_station_fields_are_refused_before_anything_is_written(
        tmp_path: Path, field: str, value: str, why: str) -> None:
    state = _old_state(tmp_path)
    before = _files(state)
    fields = {"agent_toml": TOML, "broker_ca": a_ca_certificate(tmp_path).read_text(), field: value}
    with pytest.raises(MalformedMessage) as refused:
        save_device_state(state, {"backend": "tpm", "serial": "pi-1", "new": True},
                          _issued("new", **fields))
    assert why in refused.value.detail and "\n" not in refused.value.detail
    assert _files(state) == before  # old credentials, agent.json and key untouched


def test_a_write_failing_midway_leaves_the_old_state_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills when agent.toml is written (simulated: any write of a file of
    that name fails with ENOSPC, a fault this test cannot make a real file system
    produce on demand): the error reaches the caller and the directory is byte for byte
    as it was (old credentials, old agent.json), with no staging directory left."""
    state = _old_state(tmp_path)
    before = _files(state)
    faults: list[str] = []

    def full(path: Path) -> None:
        if Path(path).name == "agent.toml":
            faults.append(str(path))
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

    real_synced, real_text = provisioner.write_synced, Path.write_text

    def synced(path: Path, data: bytes, mode: int = 0o644) -> None:
        full(path)
        real_synced(path, data, mode)

    def text(self: Path, data: str, *args: Any, **kwargs: Any) -> int:
        full(self)
        return real_text(self, data, *args, **kwargs)

    monkeypatch.setattr(provisioner, "write_synced", synced)
    monkeypatch.setattr(Path, "write_text", text)
    with pytest.raises(OSError, match="No space left"):
        save_device_state(state, {"backend": "tpm", "serial": "pi-1", "new": True},
                          _issued("new", agent_toml=TOML,
                                  broker_ca=a_ca_certificate(tmp_path).read_text()))
    assert len(faults) == 1
    monkeypatch.undo()
    assert _files(state) == before
    assert [p.name for p in state.iterdir() if p.name.startswith(".")] == []


def test_the_stations_template_is_written(tmp_path: Path) -> None:
    """A station that did not know the broker sends a template: [mqtt] with its keys
    commented out for the operator to fill in; the device keeps it (the agent then
    names the missing key)."""
    template = "# fill in\n[mqtt]\n# host = \"broker.example.com\"\n"
    state = tmp_path / "t"
    save_device_state(state, {"backend": "tpm"}, _issued("new", agent_toml=template))
    assert (state / "agent.toml").read_text() == template


def test_an_operators_agent_toml_is_kept(tmp_path: Path) -> None:
    state = _old_state(tmp_path)
    (state / "agent.toml").write_text("# the operator's own\n[mqtt]\nhost = \"b\"\n")
    ca = a_ca_certificate(tmp_path).read_text()
    save_device_state(state, {"backend": "tpm", "serial": "pi-1"},
                      _issued("new", agent_toml=TOML, broker_ca=ca))
    assert (state / "agent.toml").read_text().startswith("# the operator's own")
    assert not (state / "broker-ca.pem").exists()  # the station's CA goes with its toml
    assert (state / "operational.pem").read_text() == "operational new\n"
