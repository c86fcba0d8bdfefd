"""The registry keeps each TPM-attested device's attestation key (AK), and `tessera
export-attestation-keys` fills a broker's ``plugin_opt_attestation_keys`` directory
from it: a real provisioning service on 127.0.0.1 (authority key in SoftHSM2), devices
enrolled from swtpm by `tessera-agent enroll`, a real Mosquitto with the Tessera plugin
checking step-up quotes against the exported AKs."""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from broker_plugin.host import load_attestation_keys
from device.mqtt import TesseraMqttClient, tpm_quote_fn
from device.provisioner import ProvisionerClient, enroll_witnessed
from device.state import DeviceState
from hw.software import InsecureSoftwareSigner
from hw.tpm import TpmBackend
from provisioning.registry import DeviceRecord, migrations, open_registry
from simulator.mosquitto import Mosquitto, plugin_files
from simulator.provisioner import ProvisioningServer
from simulator.softhsm import SoftHsm
from simulator.swtpm import Swtpm
from structauth.credentials import Credential
from tests.support import wait_for

pytestmark = pytest.mark.hardware

BIN = Path(sys.executable).parent
POLICY = """
version = 1

[classes.default]
publish   = ["devices/{id}/telemetry/#", "devices/{id}/keys/#"]
subscribe = ["devices/{id}/commands/#"]

[[classes.default.step_up]]
publish   = ["devices/{id}/keys/#"]
quote     = true

[brokers]
publish   = ["#"]
subscribe = ["#"]
"""


@dataclass
class Factory:
    """A provisioning service with one TPM-attested device (``pi-k``, its state and
    TPM key blobs in ``state``) and one factory-witnessed device without an AK."""

    server: ProvisioningServer
    base: Path
    tpm: Swtpm
    state: Path

    def agent_enroll(self, serial: str, state: Path, *extra: str) -> None:
        done = subprocess.run(
            [str(BIN / "tessera-agent"), "enroll", "--provisioner", self.server.url,
             "--serial", serial, "--tpm", self.tpm.tcti, "--state-dir", str(state), *extra],
            env=self.server.env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr

    def operator(self) -> ProvisionerClient:
        return ProvisionerClient(self.server.url, operator_token=self.server.operator_token)

    def show(self, serial: str) -> dict[str, Any]:
        done = self.server.cli("--json", "show", serial)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)  # type: ignore[no-any-return]

    def export(self, directory: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        return self.server.cli("--json", "export-attestation-keys", str(directory), *extra)

    def ak_public(self, state: Path) -> bytes:
        with TpmBackend(self.tpm.tcti, state / "keys") as tpm:
            return tpm.load_attestation_key("tessera-ak").public_area_bytes()

    def registry_dump(self) -> list[str]:
        """Every row of the registry, read past the registry's own API."""
        conn = sqlite3.connect(self.server.directory / "registry.db")
        try:
            return list(conn.iterdump())
        finally:
            conn.close()


@pytest.fixture
def factory(tmp_path: Path, softhsm: SoftHsm, swtpm_session: Swtpm) -> Iterator[Factory]:
    with ProvisioningServer(tmp_path / "authority", softhsm,
                            maker_roots=swtpm_session.manufacturer_ca_paths) as server:
        f = Factory(server, tmp_path, swtpm_session, tmp_path / "pi-k")
        f.agent_enroll("pi-k", f.state)
        enroll_witnessed(f.operator(), InsecureSoftwareSigner.generate(), "pi-w")
        yield f


@dataclass
class Device:
    """A TesseraMqttClient of an enrolled device and the PUBACK codes it got."""

    client: TesseraMqttClient
    acks: dict[int, int] = field(default_factory=dict)
    disconnects: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        raw = self.client.client
        raw.on_publish = lambda c, u, mid, rc, props: self.acks.__setitem__(mid, rc.value)
        previous = raw.on_disconnect

        def gone(*args: Any) -> None:
            self.disconnects.append(args[2:])
            if previous is not None:
                previous(*args)

        raw.on_disconnect = gone

    def publish(self, topic: str, payload: bytes) -> int:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(5)
        wait_for(lambda: info.mid in self.acks, what="PUBACK")
        return self.acks[info.mid]


def audit(path: Path, event: str, count: int = 1) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []

    def enough() -> bool:
        lines = path.read_text().splitlines() if path.exists() else []
        found[:] = [r for r in map(json.loads, lines) if r["event"] == event]
        return len(found) >= count

    wait_for(enough, 5, f"{count} audit record(s) {event}")
    return found


def test_enrolled_ak_is_exported_and_the_broker_checks_quotes_against_it(
        factory: Factory, swtpm: Swtpm) -> None:
    f = factory
    ak = f.ak_public(f.state)
    shown = f.show("pi-k")
    assert shown["attestation"] == "tpm-attested"
    assert base64.b64decode(shown["ak_public"]) == ak
    assert f.show("pi-w")["ak_public"] is None  # factory-witnessed: no AK

    aks = f.base / "aks"
    done = f.export(aks)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary == {"directory": str(aks), "source": f.server.url, "written": ["pi-k"],
                       "removed": []}
    assert load_attestation_keys(str(aks)) == {"pi-k": ak}
    assert sorted(p.name for p in aks.iterdir()) == ["pi-k.akpub"]  # no temporary left

    # a broker of this fleet (witnessed software key), its AK directory as exported
    broker_key = InsecureSoftwareSigner.generate()
    issued = enroll_witnessed(f.operator(), broker_key, "mqtt-1", kind="broker")
    log = f.base / "audit.jsonl"
    options = plugin_files(
        f.base / "plugin", trust_domain=f.server.trust_domain, bundle_pem=issued["bundle"],
        credential_pem=issued["operational_credential"],
        key=f"insecure-software:{broker_key.save(f.base / 'broker-key.pem')}",
        policy=POLICY, attestation_keys=str(aks), audit_log=str(log))
    state = DeviceState.load(f.state)
    with (Mosquitto(f.base / "mosquitto", plugin_options=options) as broker,
          TpmBackend(f.tpm.tcti, f.state / "keys") as tpm,
          TpmBackend(swtpm.tcti, f.base / "other-tpm-keys") as other):
        def device(quote: Callable[[bytes], bytes]) -> Device:
            client = TesseraMqttClient(
                signer=tpm.load_signing_key("tessera-device"), credential=state.credential(),
                trust=state.trust(), host="127.0.0.1", port=broker.port,
                broker=Credential.from_pem(issued["operational_credential"].encode()).identity)
            client.connect()
            client.answer_step_ups(quote)
            return Device(client)

        # the device's own TPM quote: accepted as coming from its enrolled AK
        genuine = device(tpm_quote_fn(tpm, "tessera-ak"))
        assert genuine.publish("devices/pi-k/keys/rotate", b"k1") == 0x87
        wait_for(lambda: genuine.client.step_ups_answered == 1, 10, "the quoted step-up")
        assert genuine.publish("devices/pi-k/keys/rotate", b"k2") == 0x10  # no subscribers
        [ok] = audit(log, "step_up_ok")
        assert ok["quote"] is True and ok["enrolled_ak"] is True
        genuine.client.close()

        # the same device key, but a quote by another TPM's AK: refused
        other.create_attestation_key("ak")
        forged = device(tpm_quote_fn(other, "ak"))
        assert forged.publish("devices/pi-k/keys/rotate", b"k3") == 0x87
        [failed] = audit(log, "step_up_failed")
        assert failed["reason"] == "bad_quote"
        assert "enrolled" in failed["detail"]
        wait_for(lambda: forged.disconnects, 5, "the refused device's disconnect")
        assert forged.client.step_ups_answered == 0
        forged.client.close()
        assert len(audit(log, "step_up_ok")) == 1


def test_reenrollment_records_the_new_ak_and_export_replaces_the_old_file(
        factory: Factory) -> None:
    f = factory
    first = f.ak_public(f.state)
    aks = f.base / "aks"
    aks.mkdir()
    (aks / "README").write_text("not ours\n")
    (aks / "gone.akpub").write_bytes(first)  # a device that is no longer enrolled
    (aks / "pi-k.akpub").write_bytes(first)

    # the same TPM re-enrolled under the same serial with a new key directory: a new
    # device key and a new AK, recorded in the re-enrollment's transaction
    keys = f.base / "pi-k-again"
    done = f.server.cli("--json", "enroll", "--serial", "pi-k", "--tpm", f.tpm.tcti,
                        "--key-dir", str(keys), "--reenroll")
    assert done.returncode == 0, done.stderr
    with TpmBackend(f.tpm.tcti, keys) as tpm:
        second = tpm.load_attestation_key("tessera-ak").public_area_bytes()
    assert second != first
    assert base64.b64decode(f.show("pi-k")["ak_public"]) == second

    # straight from the authority's registry this time (--dir), into the existing directory
    done = f.export(aks, "--dir", str(f.server.directory))
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["written"] == ["pi-k"] and summary["removed"] == ["gone"]
    assert summary["source"] == str(f.server.directory)
    assert load_attestation_keys(str(aks)) == {"pi-k": second}
    assert sorted(p.name for p in aks.iterdir()) == ["README", "pi-k.akpub"]

    # revoked: nothing to export any more, and its file goes
    assert f.server.cli("revoke", "pi-k").returncode == 0
    done = f.export(aks)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["removed"] == ["pi-k"]
    assert load_attestation_keys(str(aks)) == {}


def test_unwritable_export_directory_fails_in_one_line_and_changes_nothing(
        factory: Factory) -> None:
    f = factory
    before = f.registry_dump()
    assert any("ak_public" in line for line in before)

    def refused(directory: Path, *extra: str) -> str:
        done = f.export(directory, *extra)
        assert done.returncode == 1, done.stdout
        assert done.stdout == ""
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        error = json.loads(lines[0])  # --json: the error is one JSON object too
        assert error["exit"] == 1 and error["error"], error
        return str(error["error"])

    # a new directory whose parent cannot hold one (a regular file is in the way)
    blocker = f.base / "blocker"
    blocker.write_text("a file\n")
    assert str(blocker / "aks") in refused(blocker / "aks")
    assert blocker.read_text() == "a file\n"
    assert sorted(p.name for p in f.base.iterdir() if p.name.startswith(".")) == []

    # an existing directory where pi-k.akpub cannot be written (a directory holds the
    # name): the stale file stays, and no temporary file is left behind
    aks = f.base / "aks"
    aks.mkdir()
    (aks / "pi-k.akpub").mkdir()
    (aks / "gone.akpub").write_bytes(f.ak_public(f.state))
    listing = sorted(p.name for p in aks.iterdir())
    assert "pi-k.akpub" in refused(aks, "--dir", str(f.server.directory))
    assert sorted(p.name for p in aks.iterdir()) == listing
    assert (aks / "gone.akpub").read_bytes() == f.ak_public(f.state)

    # a directory the exporting user may not write to (root may write anywhere)
    if os.geteuid() != 0:
        locked = f.base / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        try:
            assert str(locked) in refused(locked)
            assert list(locked.iterdir()) == []
        finally:
            locked.chmod(0o755)

    assert f.registry_dump() == before


def _raw(url: str) -> Any:
    if url.startswith("sqlite:"):
        return sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
    import psycopg

    return psycopg.connect(url, autocommit=True)


def test_a_version_1_registry_upgrades_and_its_devices_have_no_ak(registry_url: str) -> None:
    """Devices enrolled before migration 0002 simply have no AK; new enrollments do."""
    conn = _raw(registry_url)
    try:
        conn.execute("CREATE TABLE schema_version "
                     "(version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)")
        [statements] = [s for v, s in migrations() if v == 1]
        for statement in statements:
            conn.execute(statement)
        conn.execute("INSERT INTO schema_version (version, applied_at) "
                     "VALUES (1, '2030-01-01T00:00:00.000000Z')")
        conn.execute(
            "INSERT INTO devices (serial, identity, kind, public_key, key_backend, "
            "attestation, ek_fingerprint, device_class, status, enrolled_at, updated_at, "
            "enrolled_by, enrollment_cert_serial, operational_cert_serial, "
            "operational_not_after) VALUES ('pi-old', 'spiffe://f.test/device/pi-old', "
            "'device', 'AAEC', 'tpm', 'tpm-attested', 'ee', 'default', 'active', "
            "'2030-01-01T00:00:00.000000Z', '2030-01-01T00:00:00.000000Z', 'op', 'E1', "
            "'O1', NULL)")
    finally:
        conn.close()
    with open_registry(registry_url) as reg:
        assert reg.schema_version() == max(v for v, _ in migrations()) >= 2
        old = reg.get("pi-old")
        assert old is not None and old.ak_public is None and old.ek_fingerprint == "ee"
        assert reg.attestation_keys() == {}
        at = old.enrolled_at
        ak = bytes(range(256))  # every byte value survives the round trip

        def record(serial: str, kind: str = "device", ak_public: bytes | None = ak,
                   ek: str | None = None) -> DeviceRecord:
            return DeviceRecord(
                serial=serial, identity=f"spiffe://f.test/{kind}/{serial}", kind=kind,
                public_key_der=b"\x01" + serial.encode(), key_backend="tpm",
                attestation="tpm-attested", ek_fingerprint=ek or serial, device_class="d",
                status="active", enrolled_at=at, updated_at=at, enrolled_by="op",
                enrollment_cert_serial=f"E-{serial}", operational_cert_serial=f"O-{serial}",
                operational_not_after=None, ak_public=ak_public)

        reg.enroll(record("pi-new"))
        reg.enroll(record("mqtt-1", kind="broker", ak_public=b"broker-ak"))
        reg.enroll(record("pi-gone", ak_public=b"gone-ak"))
        reg.revoke("pi-gone", reason="lost", by="op", at=at)
        assert reg.get("pi-new") == record("pi-new")
        assert reg.attestation_keys() == {"pi-new": ak}  # active devices only
        # re-enrollment (here: the old device moved onto pi-new's TPM) records the new AK
        reg.enroll(record("pi-old", ak_public=b"new-ak", ek="pi-new"), reenroll=True)
        assert reg.attestation_keys() == {"pi-old": b"new-ak"}
