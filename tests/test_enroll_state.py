"""`tessera enroll --out DIR` writes a complete agent state directory (issue 14 point 2):
`tessera-agent run --state DIR` starts from it with no hand editing and its proven
heartbeat arrives through a real Mosquitto with the Tessera plugin. The station's
service is `tessera serve` (keys on SoftHSM2), the device key is in swtpm, the broker's
own credential is enrolled by `tessera enroll --kind broker`.

Negative: broker facts that cannot work are refused before anything is enrolled, and a
state directory missing a piece (or a template not filled in) is one line, exit 1."""

from __future__ import annotations

import json
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from simulator.mosquitto import Mosquitto, plugin_files
from simulator.provisioner import ProvisioningServer
from simulator.softhsm import SoftHsm
from simulator.swtpm import Swtpm
from tests.support import a_ca_certificate

pytestmark = [pytest.mark.broker, pytest.mark.hardware]

BIN = Path(sys.executable).parent
TD = "factory.tessera.test"


def run(service: ProvisioningServer, *args: str, pin: str | None = None,
        tool: str = "tessera", timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(service.env)
    if pin is not None:
        env["TESSERA_PKCS11_PIN"] = pin
    return subprocess.run([str(BIN / tool), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def registered(service: ProvisioningServer, serial: str) -> bool:
    done = run(service, "--json", "show", serial)
    return done.returncode == 0


class Station:
    def __init__(self, base: Path, softhsm: SoftHsm, tpm: Swtpm) -> None:
        self.base = base
        self.tpm = tpm
        self.service = ProvisioningServer(base / "authority", softhsm,
                                          maker_roots=tpm.manufacturer_ca_paths)
        self.token, self.pin = f"brk-{secrets.token_hex(3)}", secrets.token_hex(8)
        softhsm.init_token(self.token, so_pin=secrets.token_hex(8), user_pin=self.pin)
        self.softhsm = softhsm

    def key(self, label: str) -> str:
        return f"{self.softhsm.module}#{self.token}/{label}"

    def enroll_broker(self, serial: str) -> Path:
        out = self.base / serial
        done = run(self.service, "enroll", "--kind", "broker", "--serial", serial,
                   "--pkcs11", self.key(serial), "--out", str(out), pin=self.pin)
        assert done.returncode == 0, done.stderr
        return out


@pytest.fixture
def station(tmp_path: Path, softhsm: SoftHsm, swtpm_session: Swtpm) -> Iterator[Station]:
    st = Station(tmp_path, softhsm, swtpm_session)
    with st.service:
        yield st
    softhsm.delete_token(st.token)


def test_enrolled_directory_runs_the_agent(station: Station) -> None:
    from device.mqtt import TesseraMqttClient
    from hw import open_signer
    from structauth.credentials import Credential, Identity, TrustStore

    service = station.service
    creds = station.enroll_broker("mqtt-1")
    pin_file = station.softhsm.write_pin_file(station.pin, "broker.pin")
    options = plugin_files(
        station.base / "plugin", trust_domain=TD,
        bundle_pem=(creds / "bundle.pem").read_bytes(),
        credential_pem=(creds / "operational.pem").read_bytes(),
        key=f"pkcs11:{station.key('mqtt-1')}", pin_file=str(pin_file))
    broker = Mosquitto(station.base / "mosquitto", plugin_options=options)
    device_dir = station.base / "pi-1"
    done = run(service, "enroll", "--serial", "pi-1", "--tpm", station.tpm.tcti,
               "--key-dir", str(station.base / "keys"), "--out", str(device_dir),
               "--broker", f"mqtt://127.0.0.1:{broker.port}",
               "--broker-identity", f"spiffe://{TD}/broker/mqtt-1")
    assert done.returncode == 0, done.stderr
    # what the directory holds: credentials, how to reach the key, the agent's config
    for name in ("operational.pem", "bundle.pem", "identity", "agent.json", "agent.toml"):
        assert (device_dir / name).is_file(), name
    settings = json.loads((device_dir / "agent.json").read_text())
    assert settings["backend"] == "tpm" and settings["tcti"] == station.tpm.tcti
    assert Path(settings["key_dir"]).is_absolute()
    conf = tomllib.loads((device_dir / "agent.toml").read_text())
    assert conf["mqtt"] == {"host": "127.0.0.1", "port": broker.port,
                            "broker_identity": f"spiffe://{TD}/broker/mqtt-1"}

    backend_dir = station.enroll_broker("backend")
    signer = open_signer(f"pkcs11:{station.key('backend')}", pin_file=str(pin_file))
    bundle = x509.load_pem_x509_certificates((backend_dir / "bundle.pem").read_bytes())
    got: queue.Queue[tuple[str, bytes]] = queue.Queue()
    with broker:
        client = TesseraMqttClient(
            signer=signer, credential=Credential.from_pem(
                (backend_dir / "operational.pem").read_bytes()),
            trust=TrustStore(bundle, TD), host="127.0.0.1", port=broker.port,
            broker=Identity.parse(f"spiffe://{TD}/broker/mqtt-1"))
        client.connect()
        client.subscribe("devices/#", lambda t, p: got.put((t, p)), proven=False)
        agent = subprocess.Popen(
            [str(BIN / "tessera-agent"), "--json", "run", "--state", str(device_dir)],
            env=service.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert agent.stdout is not None
            first = json.loads(agent.stdout.readline())
            assert first["event"] == "running"
            assert first["identity"] == f"spiffe://{TD}/device/pi-1"
            # the heartbeat agent.toml names: proven by the TPM key, verified by the plugin
            topic, _ = got.get(timeout=30)
            assert topic == "devices/pi-1/telemetry/heartbeat"
        finally:
            agent.send_signal(signal.SIGTERM)
            _, err = agent.communicate(timeout=30)
            client.close()
            getattr(signer, "close", lambda: None)()
        assert agent.returncode == 0, err[-2000:]

    # negative: a copy of the directory missing one piece is one line, exit 1
    for piece, expect in (("bundle.pem", "bundle.pem"), ("agent.json", "agent.json"),
                          ("operational.pem", "operational.pem"),
                          ("agent.toml", "agent.toml")):
        broken = station.base / f"broken-{piece}"
        shutil.copytree(device_dir, broken)
        (broken / piece).unlink()
        done = run(service, "run", "--state", str(broken), tool="tessera-agent", timeout=60)
        assert done.returncode == 1, (piece, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and expect in lines[0], (piece, done.stderr)
        assert "Traceback" not in done.stderr


def test_without_broker_facts_the_template_says_what_to_fill_in(station: Station) -> None:
    out = station.base / "pi-t"
    done = run(station.service, "enroll", "--serial", "pi-t", "--tpm", station.tpm.tcti,
               "--key-dir", str(station.base / "keys-t"), "--out", str(out))
    assert done.returncode == 0, done.stderr
    text = (out / "agent.toml").read_text()
    assert "# host = " in text and "# broker_identity = " in text and "REQUIRED" in text
    done = run(station.service, "run", "--state", str(out), tool="tessera-agent", timeout=60)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "agent.toml" in lines[0] and "mqtt.host" in lines[0], done.stderr


@pytest.mark.parametrize(("extra", "expect"), [
    (["--broker", "mqtt://127.0.0.1:1883", "--broker-identity",
      "spiffe://elsewhere.test/broker/mqtt-1"], "trust domain 'elsewhere.test'"),
    (["--broker", "http://127.0.0.1:1883", "--broker-identity",
      f"spiffe://{TD}/broker/mqtt-1"], "--broker 'http://127.0.0.1:1883'"),
    (["--broker", "mqtt://127.0.0.1:1883", "--broker-identity",
      f"spiffe://{TD}/device/pi-9"], "is not a broker identity"),
    (["--broker", "mqtt://127.0.0.1:1883"], "go together"),
    (["--broker", "mqtts://127.0.0.1:8883", "--broker-identity",
      f"spiffe://{TD}/broker/mqtt-1"], "needs --broker-cafile"),
])
def test_broker_facts_refused_before_enrolling(station: Station, extra: list[str],
                                               expect: str) -> None:
    out = station.base / "pi-x"
    done = run(station.service, "enroll", "--serial", "pi-x", "--tpm", station.tpm.tcti,
               "--key-dir", str(station.base / "keys-x"), "--out", str(out), *extra)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], done.stderr
    # nothing changed: no record, no directory, no key files
    assert not registered(station.service, "pi-x")
    assert not out.exists() and not (station.base / "keys-x").exists()
    assert not list(station.base.glob(".pi-x*"))


@pytest.mark.parametrize("tls", [False, True], ids=["mqtt", "mqtts"])
def test_network_enrollment_gives_the_device_its_agent_toml(station: Station,
                                                            tls: bool) -> None:
    """--device URL: the device writes agent.json itself and receives agent.toml with
    its credentials (and, for an mqtts:// broker, the broker's CA that agent.toml names);
    the station's --out copy holds the credentials and the same files."""
    from device.agent import AgentConfig
    from simulator.provisioner import free_port
    from tests.support import wait_for

    state = station.base / "dev-state"
    code_file = station.base / "net.code"
    port = free_port()
    env = {k: v for k, v in station.service.env.items() if k != "TESSERA_OPERATOR_TOKEN"}
    proc = subprocess.Popen(
        [str(BIN / "tessera-agent"), "enrollment-endpoint", "--serial", "net-1", "--tpm",
         station.tpm.tcti, "--state-dir", str(state), "--listen", f"127.0.0.1:{port}",
         "--code-file", str(code_file), "--timeout", "120"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()  # the endpoint announces itself once listening
        wait_for(lambda: code_file.exists() and code_file.read_text().strip(), 20,
                 "the pairing code")
        copy = station.base / "net-copy"
        done = run(station.service, "enroll", "--device", f"http://127.0.0.1:{port}",
                   "--device-code", code_file.read_text().strip(), "--out", str(copy),
                   "--broker", "mqtts://127.0.0.1:8883" if tls else "mqtt://127.0.0.1:1883",
                   "--broker-identity", f"spiffe://{TD}/broker/mqtt-1",
                   *(["--broker-cafile", str(a_ca_certificate(station.base))] if tls else []))
        assert done.returncode == 0, done.stderr
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0
    for name in ("agent.json", "agent.toml", "operational.pem", "bundle.pem"):
        assert (state / name).is_file(), name
    config = AgentConfig.load(state / "agent.toml", state_dir=state)  # checks it all
    config.check()
    assert (config.host, config.port) == ("127.0.0.1", 8883 if tls else 1883)
    assert config.broker_identity == f"spiffe://{TD}/broker/mqtt-1"
    assert sorted(p.name for p in copy.iterdir()) == [
        "agent.toml", *(["broker-ca.pem"] if tls else []), "bundle.pem", "enrollment.pem",
        "identity", "operational.pem"]
    if tls:
        ca = a_ca_certificate(station.base)
        assert (state / "broker-ca.pem").read_bytes() == ca.read_bytes()
