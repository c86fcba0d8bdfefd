"""The device agent answers step-ups with its TPM: a real Mosquitto with the Tessera
plugin, which knows the device's enrolled attestation key (``plugin_opt_attestation_keys``),
and an agent whose device key and AK are in swtpm, laid out as enrollment leaves them."""

from __future__ import annotations

import datetime as dt
import json
import queue
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from device.agent import Agent, AgentConfig
from device.attestation import DEFAULT_AK_NAME
from device.mqtt import TesseraMqttClient
from device.state import DEVICE_KEY_NAME
from hw.software import InsecureSoftwareSigner
from hw.tpm import TpmBackend
from simulator.fleet import Fleet
from simulator.mosquitto import Mosquitto, plugin_files
from simulator.swtpm import Swtpm
from tests.support import wait_for

pytestmark = [pytest.mark.broker, pytest.mark.hardware]

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


class World:
    def __init__(self, base: Path, tpm: Swtpm, **options: str) -> None:
        self.base = base
        self.fleet = Fleet(t0=dt.datetime.now(dt.UTC) - dt.timedelta(days=1))
        # the device as TPM enrollment leaves it: device key and AK in the key directory
        self.state = base / "device"
        self.state.mkdir()
        with TpmBackend(tpm.tcti, self.state / "keys") as backend:
            key = backend.get_or_create_signing_key(DEVICE_KEY_NAME).public_key()
            ak = backend.get_or_create_attestation_key(DEFAULT_AK_NAME).public_area_bytes()
        cred = self.fleet.credential_for(key, "device", "pi-a")
        (self.state / "operational.pem").write_bytes(cred.chain[0].public_bytes(Encoding.PEM))
        (self.state / "bundle.pem").write_bytes(self.fleet.root.public_bytes(Encoding.PEM))
        (self.state / "agent.json").write_text(json.dumps(
            {"backend": "tpm", "tcti": tpm.tcti, "key_dir": str(self.state / "keys"),
             "serial": "pi-a"}))
        # the broker knows the enrolled AK (what `tessera export-attestation-keys` writes)
        aks = base / "aks"
        aks.mkdir()
        (aks / "pi-a.akpub").write_bytes(ak)
        broker_key = InsecureSoftwareSigner.generate()
        member = self.fleet.member("broker", "mqtt-1", signer=broker_key)
        self.identity = member.identity  # every device names it in msg1
        self.audit_log = base / "audit.jsonl"
        opts = plugin_files(
            base, trust_domain=self.fleet.trust_domain,
            bundle_pem=self.fleet.root.public_bytes(Encoding.PEM),
            credential_pem=member.credential.chain[0].public_bytes(Encoding.PEM),
            key=f"insecure-software:{broker_key.save(base / 'bk.pem')}", policy=POLICY,
            attestation_keys=str(aks), audit_log=str(self.audit_log), **options)
        self.broker = Mosquitto(base / "mosquitto", plugin_options=opts)

    def config(self) -> AgentConfig:
        return AgentConfig.parse(
            f'[device]\nstate_dir = "{self.state}"\n'
            f'[mqtt]\nhost = "127.0.0.1"\nport = {self.broker.port}\n'
            f'broker_identity = "{self.identity.uri}"\n'
            '[renewal]\nenabled = false\n[reconnect]\ninitial_s = 0.2\nmax_s = 1.0\n')

    def listen(self, topic: str) -> tuple[TesseraMqttClient, queue.Queue[tuple[str, bytes]]]:
        m = self.fleet.member("broker", "backend")
        c = TesseraMqttClient(signer=m.signer, credential=m.credential, trust=self.fleet.trust,
                              host="127.0.0.1", port=self.broker.port, broker=self.identity)
        c.connect()
        got: queue.Queue[tuple[str, bytes]] = queue.Queue()
        c.subscribe(topic, lambda t, p: got.put((t, p)), proven=False)
        return c, got

    def events(self, name: str, timeout: float = 10.0) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []

        def seen() -> bool:
            lines = self.audit_log.read_text().splitlines() if self.audit_log.exists() else []
            found[:] = [r for r in map(json.loads, lines) if r["event"] == name]
            return bool(found)

        wait_for(seen, timeout, f"audit record {name}")
        return found


@pytest.fixture
def world(tmp_path: Path, swtpm_session: Swtpm) -> Iterator[Callable[..., World]]:
    worlds: list[World] = []

    def start(**options: str) -> World:
        w = World(tmp_path, swtpm_session, **options)
        w.broker.start()
        worlds.append(w)
        return w

    try:
        yield start
    finally:
        for w in worlds:
            w.broker.stop()


def test_agent_answers_a_quote_step_up_with_its_tpm(world: Callable[..., World]) -> None:
    w = world()
    backend, got = w.listen("devices/pi-a/keys/#")
    with Agent(w.config()) as agent:
        assert agent.wait_connected(15), agent.stats.errors
        topic = agent.topic("devices/{id}/keys/rotate")
        agent.publish(topic, b"refused")  # refused until stepped up: the broker asks
        [asked] = w.events("step_up_requested")
        assert asked["quote"] is True
        [ok] = w.events("step_up_ok")
        assert ok["via"] == "auth" and ok["quote"] is True and ok["enrolled_ak"] is True
        assert ok["pcr_selection"] == [[0x000B, list(range(8))]]
        assert agent.publish(topic, b"k1")
        assert got.get(timeout=5) == ("devices/pi-a/keys/rotate", b"k1")
        assert agent.stats.reconnects == 0 and agent.stats.step_ups_on_connect == 0
    backend.close()
    assert got.empty()


def test_agent_kicked_before_answering_reconnects_with_the_nonce_and_a_quote(
        world: Callable[..., World]) -> None:
    w = world(step_up_deadline_s="1", step_up_reconnect_window_s="10")
    backend, got = w.listen("devices/pi-a/keys/#")
    with Agent(w.config()) as agent:
        assert agent.wait_connected(15), agent.stats.errors
        first = agent.client
        first.on_step_up = None  # this connection hears the request but never answers it
        topic = agent.topic("devices/{id}/keys/rotate")
        agent.publish(topic, b"refused")
        [asked] = w.events("step_up_requested")
        wait_for(lambda: first.pending_step_up is not None, 5, "the request on the device")
        [timeout] = w.events("step_up_failed")  # kicked at the deadline ...
        assert timeout["reason"] == "timeout"
        [ok] = w.events("step_up_ok")  # ... and answered by the reconnect
        assert ok["via"] == "connect" and ok["trigger"] == asked["trigger"]
        assert ok["quote"] is True and ok["enrolled_ak"] is True
        wait_for(lambda: agent.connected.is_set() and agent.client is not first, 5,
                 "the new connection")
        assert agent.stats.step_ups_on_connect == 1 and agent.stats.reconnects == 1
        assert agent.publish(topic, b"k1")  # stepped up on the new connection
        # the first publish was refused and never acknowledged: the agent sends
        # unacknowledged QoS 1 messages again on its next connection (at least once), so
        # it arrives now that the device has stepped up, once, before k1
        first_seen = got.get(timeout=5)
        if first_seen[1] == b"refused":
            first_seen = got.get(timeout=5)
        assert first_seen == ("devices/pi-a/keys/rotate", b"k1")
        assert len(w.events("step_up_requested")) == 1  # not asked again
    backend.close()
