"""The device agent against a real Mosquitto with the Tessera plugin, its key in swtpm:
heartbeat, SDK publish/subscribe, broker restart (it comes back by itself), the offline
buffer, and configuration errors."""

from __future__ import annotations

import datetime as dt
import json
import queue
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from device.agent import Agent, AgentConfig
from device.mqtt import TesseraMqttClient
from hw.software import InsecureSoftwareSigner
from hw.tpm import TpmBackend
from simulator.fleet import Fleet
from simulator.mosquitto import Mosquitto, plugin_files
from simulator.swtpm import Swtpm
from structauth.errors import ConfigurationError
from tests.support import wait_for

pytestmark = [pytest.mark.broker, pytest.mark.hardware]



class World:
    def __init__(self, base: Path, tpm: Swtpm) -> None:
        self.base = base
        self.fleet = Fleet(t0=dt.datetime.now(dt.UTC) - dt.timedelta(days=1))
        broker_key = InsecureSoftwareSigner.generate()
        member = self.fleet.member("broker", "mqtt-1", signer=broker_key)
        self.identity = member.identity
        self.options = plugin_files(
            base, trust_domain=self.fleet.trust_domain,
            bundle_pem=self.fleet.root.public_bytes(Encoding.PEM),
            credential_pem=member.credential.chain[0].public_bytes(Encoding.PEM),
            key=f"insecure-software:{broker_key.save(base / 'bk.pem')}",
            audit_log=str(base / "audit.jsonl"))
        self.broker = Mosquitto(base / "mosquitto", plugin_options=self.options)
        # the device: its key in the TPM, its state directory as enrollment leaves it
        self.state = base / "device"
        self.state.mkdir()
        with TpmBackend(tpm.tcti, self.state / "keys") as backend:
            key = backend.get_or_create_signing_key("tessera-device").public_key()
        cred = self.fleet.credential_for(key, "device", "pi-a")
        (self.state / "operational.pem").write_bytes(cred.chain[0].public_bytes(Encoding.PEM))
        (self.state / "bundle.pem").write_bytes(self.fleet.root.public_bytes(Encoding.PEM))
        (self.state / "agent.json").write_text(json.dumps(
            {"backend": "tpm", "tcti": tpm.tcti, "key_dir": str(self.state / "keys"),
             "serial": "pi-a"}))

    def config(self, **extra: str) -> AgentConfig:
        text = (f'[device]\nstate_dir = "{self.state}"\n'
                f'[mqtt]\nhost = "127.0.0.1"\nport = {self.broker.port}\n'
                f'broker_identity = "{self.identity.uri}"\n'
                '[renewal]\nenabled = false\n')
        if "reconnect" not in extra:
            text += "[reconnect]\ninitial_s = 0.2\nmax_s = 1.0\n"
        for section, body in extra.items():
            text += f"[{section}]\n{body}\n"
        return AgentConfig.parse(text)

    def backend_client(self) -> TesseraMqttClient:
        m = self.fleet.member("broker", "backend")
        c = TesseraMqttClient(signer=m.signer, credential=m.credential, trust=self.fleet.trust,
                              host="127.0.0.1", port=self.broker.port, broker=self.identity)
        c.connect()
        return c


@pytest.fixture
def world(tmp_path: Path, swtpm_session: Swtpm) -> Iterator[World]:
    w = World(tmp_path, swtpm_session)
    with w.broker:
        yield w


def _listen(client: TesseraMqttClient, topic: str) -> queue.Queue[tuple[str, bytes]]:
    got: queue.Queue[tuple[str, bytes]] = queue.Queue()
    client.subscribe(topic, lambda t, p: got.put((t, p)), proven=False)
    return got


def test_agent_heartbeat_sdk_and_commands(world: World) -> None:
    backend = world.backend_client()
    got = _listen(backend, "devices/pi-a/telemetry/#")
    config = world.config(heartbeat='topic = "devices/{id}/telemetry/heartbeat"\n'
                                    'interval_s = 0.5')
    commands: queue.Queue[tuple[str, bytes]] = queue.Queue()
    with Agent(config) as agent:
        assert agent.wait_connected(15)
        agent.subscribe(agent.topic("devices/{id}/commands/#"),
                        lambda t, p: commands.put((t, p)))
        topic, _ = got.get(timeout=10)
        assert topic == "devices/pi-a/telemetry/heartbeat"
        assert agent.publish(agent.topic("devices/{id}/telemetry/temp"), b"21.5")
        while (msg := got.get(timeout=10))[0].endswith("heartbeat"):
            pass
        assert msg == ("devices/pi-a/telemetry/temp", b"21.5")
        backend.publish("devices/pi-a/commands/led", b"on", qos=1).wait_for_publish(5)
        assert commands.get(timeout=10) == ("devices/pi-a/commands/led", b"on")
    backend.close()


def test_agent_survives_broker_restart_and_buffers_offline(world: World) -> None:
    # reconnect no sooner than 0.5 s: the test's subscriber is back on the broker first
    config = world.config(buffer="max_messages = 3",
                          reconnect="initial_s = 1.0\nmax_s = 1.0")
    with Agent(config) as agent:
        assert agent.wait_connected(15)
        world.broker.stop()
        wait_for(lambda: not agent.connected.is_set(), 10, "the agent to see the broker go")
        for i in range(5):  # offline: kept, oldest dropped beyond 3
            assert agent.publish(agent.topic("devices/{id}/telemetry/n"), str(i).encode()) \
                is False
        assert agent.buffered == 3 and agent.stats.buffered_dropped == 2
        world.broker.start()
        backend = world.backend_client()
        got = _listen(backend, "devices/pi-a/telemetry/#")
        assert agent.wait_connected(20), agent.stats.errors
        agent.publish(agent.topic("devices/{id}/telemetry/n"), b"after")
        seen = []
        while (msg := got.get(timeout=10))[1] != b"after":
            seen.append(msg[1])
        assert agent.stats.reconnects >= 1 and agent.buffered == 0
        audit = (world.base / "audit.jsonl").read_text()
        assert seen == [b"2", b"3", b"4"], audit  # the newest three, each proven anew
        backend.close()


BROKER = "broker_identity = 'spiffe://fleet.test/broker/mqtt-1'\n"


@pytest.mark.parametrize(("text", "expect"), [
    ("[mqtt]\nport = 1\n", "mqtt.host is required"),
    ("[mqtt]\nhost = 'x'\n", "mqtt.broker_identity is required"),
    ("[mqtt]\nhost = 'x'\nbroker_identity = 'mqtt-1'\n", "is not a broker identity"),
    ("[mqtt]\nhost = 'x'\nbroker_identity = 'spiffe://fleet.test/device/pi'\n",
     "is not a broker identity"),
    ("[mqtt]\nhost = 'x'\nport = 'a'\n", "mqtt.port has the wrong type"),
    ("[mqtt]\nhost = 'x'\n[wat]\n", "unknown section [wat]"),
    ("[mqtt]\nhost = 'x'\nhots = 1\n", "unknown key mqtt.hots"),
    ("[mqtt]\nhost = 'x'\n" + BROKER + "port = 99999\n", "mqtt.port must be"),
    ("[mqtt\n", "agent.toml"),
    ("[mqtt]\nhost = 'x'\n" + BROKER + "[reconnect]\ninitial_s = 5\nmax_s = 1\n",
     "initial_s"),
])
def test_config_errors_are_one_line(text: str, expect: str) -> None:
    with pytest.raises(ConfigurationError) as exc:
        AgentConfig.parse(text, "agent.toml")
    assert expect in str(exc.value) and "\n" not in str(exc.value)


def test_run_without_enrollment_fails_in_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[device]\nstate_dir = "{tmp_path / "none"}"\n[mqtt]\nhost = "127.0.0.1"\n'
                   + BROKER)
    done = subprocess.run([str(Path(sys.executable).parent / "tessera-agent"), "run",
                           "--config", str(cfg)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "enroll this device first" in done.stderr


def test_agent_renews_its_credential_even_without_a_broker(tmp_path: Path,
                                                           swtpm_session: Swtpm,
                                                           softhsm: object) -> None:
    """Renewal needs only the provisioning service and the TPM key: an agent whose broker
    is unreachable still renews (proof of possession), and keeps the new credential."""
    from simulator.provisioner import ProvisioningServer, free_port

    with ProvisioningServer(tmp_path / "authority", softhsm,  # type: ignore[arg-type]
                            maker_roots=swtpm_session.manufacturer_ca_paths,
                            operational_lifetime_minutes=1) as server:
        state = tmp_path / "device"
        done = subprocess.run(
            [str(Path(sys.executable).parent / "tessera-agent"), "enroll", "--provisioner",
             server.url, "--serial", "pi-r", "--tpm", swtpm_session.tcti,
             "--state-dir", str(state)], env=server.env, capture_output=True, text=True,
            timeout=120)
        assert done.returncode == 0, done.stderr
        before = (state / "operational.pem").read_bytes()
        config = AgentConfig.parse(
            f'[device]\nstate_dir = "{state}"\n'
            f'[mqtt]\nhost = "127.0.0.1"\nport = {free_port()}\n'  # nobody listens there
            + BROKER + '[renewal]\nat_fraction = 0.1\n')
        with Agent(config) as agent:
            wait_for(lambda: agent.stats.renewals >= 1, 20,
                     f"a renewal (errors: {agent.stats.errors})")
            assert not agent.connected.is_set()
        after = (state / "operational.pem").read_bytes()
        assert after != before
        renewed, old = (x509.load_pem_x509_certificate(pem) for pem in (after, before))
        assert renewed.serial_number != old.serial_number  # a new credential was issued
        assert renewed.not_valid_after_utc >= old.not_valid_after_utc
