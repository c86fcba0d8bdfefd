"""Revocation survives restarts and feed outages (issue 17, point 4): a real provisioning
service (SoftHSM2 authority, its revocation feed), a real Mosquitto with the plugin,
devices on paho-mqtt. broker_plugin/revocation_store.py is what is tested."""

from __future__ import annotations

import json
import queue
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from broker_plugin import revocation_store as rs
from device.mqtt import MqttError, TesseraMqttClient
from device.provisioner import ProvisionerClient, enroll_witnessed
from hw.software import InsecureSoftwareSigner
from simulator.mosquitto import Mosquitto, plugin_files
from simulator.provisioner import ProvisioningServer, free_port
from structauth.credentials import Credential, Identity, TrustStore
from structauth.errors import ConfigurationError
from tests.support import wait_for

STALE = "tessera_revocation_feed_stale"
ERRORS = "tessera_revocation_feed_errors_total"
APPLIED = "tessera_revocation_events_total"


@dataclass
class World:
    service: ProvisioningServer
    broker: Mosquitto
    directory: Path
    metrics_port: int
    me: Identity
    trust: TrustStore
    operator: ProvisionerClient

    def metric(self, series: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                    timeout=5) as resp:
            for line in resp.read().decode().splitlines():
                name, _, value = line.rpartition(" ")
                if name == series:
                    return float(value)
        return 0.0

    def audit(self, event: str) -> list[dict[str, Any]]:
        path = self.directory / "audit.jsonl"
        rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        return [r for r in rows if r["event"] == event]

    def enroll(self, name: str) -> tuple[InsecureSoftwareSigner, Credential]:
        key = InsecureSoftwareSigner.generate()
        d = enroll_witnessed(self.operator, key, name)
        return key, Credential.from_pem(d["operational_credential"].encode())

    def device(self, member: tuple[InsecureSoftwareSigner, Credential]) -> TesseraMqttClient:
        return TesseraMqttClient(signer=member[0], credential=member[1], trust=self.trust,
                                 host="127.0.0.1", port=self.broker.port, broker=self.me)


@pytest.fixture
def world(tmp_path: Path, softhsm: Any, request: pytest.FixtureRequest) -> Iterator[World]:
    extra: dict[str, str] = getattr(request, "param", {})
    with ProvisioningServer(tmp_path / "authority", softhsm) as service:
        operator = ProvisionerClient(service.url, operator_token=service.operator_token)
        broker_key = InsecureSoftwareSigner.generate()
        b = enroll_witnessed(operator, broker_key, "mqtt-1", kind="broker")
        port = free_port()
        options = plugin_files(
            tmp_path, trust_domain=service.trust_domain, bundle_pem=b["bundle"],
            credential_pem=b["operational_credential"],
            key=f"insecure-software:{broker_key.save(tmp_path / 'bk.pem')}",
            provisioner=service.url, audit_log=str(tmp_path / "audit.jsonl"),
            metrics_port=str(port), revocation_file=str(tmp_path / "revocations.json"),
            **extra)
        trust = TrustStore(x509.load_pem_x509_certificates(b["bundle"].encode()),
                           service.trust_domain)
        me = Credential.from_pem(b["operational_credential"].encode()).identity
        try:
            with Mosquitto(tmp_path / "mosquitto", plugin_options=options) as broker:
                yield World(service, broker, tmp_path, port, me, trust, operator)
        finally:
            service.kill()  # its graceful stop waits 10 s


def _delivers(device: TesseraMqttClient, topic: str) -> None:
    codes: list[int] = []
    device.client.on_publish = lambda c, u, mid, rc, p: codes.append(rc.value)
    device.publish(topic, b"still here", qos=1).wait_for_publish(5)
    wait_for(lambda: codes, 5, "the PUBACK")
    assert codes[0] in (0x00, 0x10) and device.client.is_connected()


def _disconnected(device: TesseraMqttClient) -> threading.Event:
    gone = threading.Event()
    device.client.on_disconnect = lambda *a: gone.set()
    return gone


def test_a_revoked_device_stays_refused_after_a_restart_while_the_feed_is_down(
        world: World) -> None:
    """The revoked set and the feed position are in the file: a broker killed and
    restarted while the provisioning service is down still refuses the revoked device
    (credential_revoked), admits the others (within the grace), and when the feed
    comes back does not apply or audit the old event a second time."""
    revoked, other = world.enroll("pi-rv"), world.enroll("pi-ok")
    device = world.device(revoked)
    device.connect()
    gone = _disconnected(device)
    world.service.cli("revoke", "pi-rv", "--reason", "stolen", check=True)
    assert gone.wait(10), "the revoked device was not disconnected"
    device.client.loop_stop()
    wait_for(lambda: world.audit("revocation_applied"), 5, "the revocation in the audit log")

    world.service.kill()  # an outage (SIGKILL: a graceful stop waits 10 s here)
    world.broker.kill()  # a crash: nothing saved at exit
    world.broker.start()
    wait_for(lambda: len(world.audit("revocations_loaded")) == 2, 5, "the restart's record")
    first, loaded = world.audit("revocations_loaded")
    assert first["count"] == 0 and loaded["count"] == 1 and loaded["since"] == 1
    with pytest.raises(MqttError):
        world.device(revoked).connect(timeout=5)
    wait_for(lambda: [r for r in world.audit("handshake_refused")
                      if r["reason"] == "credential_revoked"], 5, "the refusal audited")
    assert world.metric('tessera_handshakes_total{result="ok"}') == 0
    fine = world.device(other)  # the feed is down, but within the grace
    fine.connect()
    _delivers(fine, "devices/pi-ok/telemetry/t")

    world.service.start()  # same port: the follower finds it again
    t0 = time.monotonic()
    world.service.cli("revoke", "pi-ok", "--reason", "lost", check=True)
    gone = _disconnected(fine)
    assert gone.wait(10), "the second revocation did not cut the session"
    print(f"\nrevocation after the feed's return cut the session in "
          f"{time.monotonic() - t0:.2f} s")
    applied = world.audit("revocation_applied")
    assert sorted(r["event_id"] for r in applied) == [1, 2], applied  # each once
    state = json.loads((world.directory / "revocations.json").read_text())
    assert state["since"] == 2 and len(state["events"]) == 2
    fine.close()


@pytest.mark.parametrize("world", [{"revocation_grace_s": "1"}], indirect=True)
def test_a_stale_feed_refuses_new_handshakes_after_the_grace_with_an_alarm(
        world: World) -> None:
    """Feed down longer than revocation_grace_s: the alarm metric goes to 1 and one
    revocation_feed_stale record is written; a new handshake is refused
    (revocation_feed_stale), the live session carries on. The follower retries at
    least twice a second, so a revocation made as the feed returns cuts the session
    at once; then the alarm ends with a revocation_feed_restored record."""
    live = world.device(world.enroll("pi-live"))
    newcomer = world.enroll("pi-new")
    live.connect()
    assert world.metric(STALE) == 0
    world.service.kill()  # an outage (SIGKILL: a graceful stop waits 10 s here)
    wait_for(lambda: world.metric(STALE) == 1, 10, "the staleness alarm")
    [alarm] = world.audit("revocation_feed_stale")
    assert alarm["grace_s"] == 1 and alarm["policy"] == "refuse"
    with pytest.raises(MqttError):
        world.device(newcomer).connect(timeout=5)
    wait_for(lambda: [r for r in world.audit("handshake_refused")
                      if r["reason"] == "revocation_feed_stale"], 5, "the refusal audited")
    assert world.metric('tessera_rejections_total{reason="revocation_feed_stale"}') == 1
    _delivers(live, "devices/pi-live/telemetry/t")  # not cut for staleness
    # retries are capped at 0.5 s apart (the old follower's grew to 30 s: 5 in 10 s)
    errors = world.metric(ERRORS)
    wait_for(lambda: world.metric(ERRORS) >= errors + 10, 8, "ten more retries")

    world.service.start()
    t0 = time.monotonic()
    gone = _disconnected(live)
    world.service.cli("revoke", "pi-live", check=True)
    assert gone.wait(5), "the revocation did not cut the session"
    elapsed = time.monotonic() - t0
    wait_for(lambda: world.metric(STALE) == 0, 5, "the alarm to end")
    [restored] = world.audit("revocation_feed_restored")
    assert restored["stale_s"] > 0
    assert len(world.audit("revocation_feed_stale")) == 1
    again = world.device(newcomer)
    again.connect()
    _delivers(again, "devices/pi-new/telemetry/t")
    again.close()
    live.client.loop_stop()
    print(f"\nfeed back -> revoked session cut: {elapsed:.2f} s (incl. the revoke CLI)")


@pytest.mark.parametrize("world", [{"revocation_grace_s": "0.5", "revocation_stale": "allow"}],
                         indirect=True)
def test_policy_allow_admits_new_handshakes_but_still_raises_the_alarm(world: World) -> None:
    newcomer = world.enroll("pi-new")
    world.service.kill()  # an outage (SIGKILL: a graceful stop waits 10 s here)
    wait_for(lambda: world.metric(STALE) == 1, 10, "the staleness alarm")
    device = world.device(newcomer)
    device.connect()
    _delivers(device, "devices/pi-new/telemetry/t")
    [alarm] = world.audit("revocation_feed_stale")
    assert alarm["policy"] == "allow"
    device.close()


# -- the store on its own -----------------------------------------------------------------


def _event(i: int, serial: str) -> dict[str, Any]:
    return {"id": i, "serial": f"d{i}", "identity": f"spiffe://x/device/d{i}",
            "cert_serials": [serial], "reason": "stolen"}


def test_a_batch_delivered_twice_yields_each_event_once(tmp_path: Path) -> None:
    store = rs.RevocationStore(tmp_path / "r.json")
    first = store.accept([_event(1, "AA"), _event(2, "bb")], 0.0, 1000.0)
    assert [e.id for e in first] == [1, 2] and first[0].cert_serials == ("aa",)
    assert store.accept([_event(1, "AA"), _event(2, "bb")], 1.0, 1001.0) == []
    assert [e.id for e in store.accept([_event(2, "bb"), _event(3, "cc")], 2.0, 1002.0)] == [3]
    again = rs.RevocationStore(tmp_path / "r.json")
    assert [e.id for e in again.load()] == [1, 2, 3] and again.since == 3
    assert again.synced_at == 1002.0
    assert again.accept([_event(3, "cc")], 3.0, 1003.0) == []


def test_a_damaged_file_is_set_aside_and_the_broker_counts_as_never_synced(
        tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text('{"version": 1, "since": 4, "events": [{"id": "x"')
    store = rs.RevocationStore(path)
    assert store.load() == [] and store.since == 0 and store.synced_at is None
    assert store.damaged and (tmp_path / "r.json.damaged").exists()
    health = rs.FeedHealth(grace_s=300)
    assert health.stale(0.0) and health.refuses(0.0)  # never answered: stale at once


def test_a_second_broker_on_the_same_file_is_refused(tmp_path: Path) -> None:
    a = rs.RevocationStore(tmp_path / "r.json")
    a.lock()
    with pytest.raises(ConfigurationError, match="in use by another process"):
        rs.RevocationStore(tmp_path / "r.json").lock()
    a.close()


@pytest.mark.parametrize(("options", "expect"), [
    ({"revocation_grace_s": "-1", "provisioner": "http://x"}, "plugin_opt_revocation_grace_s"),
    ({"revocation_stale": "maybe", "provisioner": "http://x"}, "'refuse' or 'allow'"),
    ({"revocation_file": "/nonexistent/dir/r.json", "provisioner": "http://x"},
     "does not exist"),
    ({"revocation_grace_s": "5"}, "need plugin_opt_provisioner"),
])
def test_bad_feed_options_are_one_line(options: dict[str, str], expect: str) -> None:
    with pytest.raises(ConfigurationError, match=expect):
        rs.parse_feed_options(options)


def test_the_follower_retries_within_the_cap(tmp_path: Path) -> None:
    """Nothing listens on the port: every poll fails at once; the follower retries no
    more than BACKOFF_MAX_S apart (counted, not timed: ten failures)."""
    health = rs.FeedHealth(grace_s=0)
    follower = rs.FeedFollower(f"http://127.0.0.1:{free_port()}", rs.RevocationStore(None),
                               health, queue.SimpleQueue())
    follower.start()
    try:
        wait_for(lambda: health.errors >= 10, 5 + 10 * rs.BACKOFF_MAX_S, "ten retries")
        assert health.failing and health.stale(time.monotonic())
    finally:
        follower.stop()
