"""Step-up end to end: a real Mosquitto 2.0.11 with the Tessera plugin, devices on
TesseraMqttClient (paho-mqtt with our MQTT 5 AUTH support).

The broker asks with a proven ``tessera/step-up`` message; the device answers with an
AUTH packet (reason 0x19) carrying a new SA1 msg1 whose context is the nonce; the new
session replaces the old one inside the live connection. The enforcer-level tests in
test_enforcer.py cover what needs a fake clock or other addresses than 127.0.0.1 (new
networks, rate spikes)."""

from __future__ import annotations

import datetime as dt
import json
import queue
import statistics
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from broker_plugin.audit import verify_chain
from broker_plugin.policy import parse_policy
from device.mqtt import STEP_UP_TOPIC, MqttError, StepUpRequest, TesseraMqttClient, tpm_quote_fn
from hw.software import InsecureSoftwareSigner
from simulator.fleet import Fleet, Member
from simulator.mosquitto import Mosquitto, plugin_files
from simulator.provisioner import free_port
from tests.support import wait_for

pytestmark = pytest.mark.broker

POLICY = """
version = 1

[classes.default]
publish   = ["devices/{id}/telemetry/#", "devices/{id}/firmware/#", "devices/{id}/keys/#"]
subscribe = ["devices/{id}/commands/#"]

[[classes.default.step_up]]
publish   = ["devices/{id}/firmware/#"]

[[classes.default.step_up]]
publish   = ["devices/{id}/keys/#"]
quote     = true

[brokers]
publish   = ["#"]
subscribe = ["#"]
"""


@dataclass
class Watch:
    """What happens on one client's paho connection: disconnects and PUBACK codes."""

    client: TesseraMqttClient
    disconnects: list[Any] = field(default_factory=list)
    acks: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        raw = self.client.client
        previous = raw.on_disconnect

        def gone(*args: Any) -> None:
            self.disconnects.append(args[2:])
            if previous is not None:
                previous(*args)

        raw.on_disconnect = gone
        tracked = raw.on_publish  # the client's own tracking still sees every answer

        def acked(c: Any, u: Any, mid: int, rc: Any, props: Any) -> None:
            self.acks[mid] = rc.value
            tracked(c, u, mid, rc, props)

        raw.on_publish = acked

    def ack(self, info: Any) -> int:
        info.wait_for_publish(5)
        wait_for(lambda: info.mid in self.acks, what="PUBACK")
        return self.acks[info.mid]


@dataclass
class World:
    fleet: Fleet
    broker: Mosquitto
    directory: Path
    clients: list[TesseraMqttClient]
    identity: Any = None  # the broker's: every device names it in msg1

    def client(self, name: str, kind: str = "device",
               member: Member | None = None) -> TesseraMqttClient:
        member = member or self.fleet.member(kind, name)
        client = TesseraMqttClient(signer=member.signer, credential=member.credential,
                                   trust=self.fleet.trust, host="127.0.0.1",
                                   port=self.broker.port, broker=self.identity)
        client.member = member  # type: ignore[attr-defined]
        self.clients.append(client)
        return client

    def collect(self, client: TesseraMqttClient, topic: str, *, proven: bool = False,
                qos: int = 1) -> queue.Queue[tuple[str, bytes]]:
        got: queue.Queue[tuple[str, bytes]] = queue.Queue()
        client.subscribe(topic, lambda t, p: got.put((t, p)), qos, proven=proven)
        return got

    def records(self) -> list[dict[str, Any]]:
        path = self.directory / "audit.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] \
            if path.exists() else []

    def events(self, name: str, timeout: float = 5.0, count: int = 1) -> list[dict[str, Any]]:
        """The audit records of one event, waiting for at least ``count`` of them (the
        audit writer is a thread in the broker)."""
        found: list[dict[str, Any]] = []

        def enough() -> bool:
            found[:] = [r for r in self.records() if r["event"] == name]
            return len(found) >= count

        wait_for(enough, timeout, f"{count} audit record(s) {name}")
        return found

    def chain_ok(self) -> None:
        """The audit chain verifies (waiting for the writer thread to finish a record
        it may be in the middle of; a broken chain fails after the timeout)."""
        results = []

        def ok() -> bool:
            results[:] = [verify_chain([self.directory / "audit.jsonl"])]
            return results[0].ok

        try:
            wait_for(ok, 5, "a verifying audit chain")
        except AssertionError:
            raise AssertionError(results[0].verdict()) from None


@pytest.fixture
def world(tmp_path: Path) -> Iterator[Callable[..., World]]:
    with ExitStack() as stack:
        clients: list[TesseraMqttClient] = []

        def start(policy: str = POLICY, **options: str) -> World:
            fleet = Fleet(t0=dt.datetime.now(dt.UTC) - dt.timedelta(days=1))
            key = InsecureSoftwareSigner.generate()
            member = fleet.member("broker", "mqtt-1", signer=key)
            opts = plugin_files(
                tmp_path, trust_domain=fleet.trust_domain,
                bundle_pem=fleet.root.public_bytes(Encoding.PEM),
                credential_pem=member.credential.chain[0].public_bytes(Encoding.PEM),
                key=f"insecure-software:{key.save(tmp_path / 'broker-key.pem')}",
                policy=policy, audit_log=str(tmp_path / "audit.jsonl"), **options)
            broker = stack.enter_context(Mosquitto(tmp_path / "mosquitto", plugin_options=opts))
            return World(fleet, broker, tmp_path, clients, member.identity)

        try:
            yield start
        finally:
            for client in clients:
                client.close()


def test_sensitive_publish_steps_up_inside_the_live_connection(
        world: Callable[..., World]) -> None:
    port = free_port()
    w = world(metrics_port=str(port))
    backend = w.client("backend", kind="broker")
    backend.connect()
    got = w.collect(backend, "devices/pi-1/#")
    device = w.client("pi-1")
    device.connect()
    device.answer_step_ups()
    watch = Watch(device)
    sock, first = device.client.socket(), device.session
    assert first is not None

    refused = device.publish("devices/pi-1/firmware/v2", b"image-1", qos=1)
    assert watch.ack(refused) == 0x87  # held until the device steps up
    wait_for(lambda: device.step_ups_answered == 1, what="the step-up answer")
    assert device.session is not first and device.pending_step_up is None
    passed = device.publish("devices/pi-1/firmware/v2", b"image-2", qos=1)
    assert watch.ack(passed) == 0
    assert got.get(timeout=5) == ("devices/pi-1/firmware/v2", b"image-2")  # not image-1
    device.publish("devices/pi-1/telemetry/t", b"21.5", qos=1).wait_for_publish(5)
    assert got.get(timeout=5) == ("devices/pi-1/telemetry/t", b"21.5")
    # the same paho connection all along
    assert watch.disconnects == [] and device.client.socket() is sock
    assert device.client.is_connected()

    [asked] = w.events("step_up_requested")
    assert asked["trigger"] == "sensitive_topic" and asked["quote"] is False
    assert asked["session"] == first.session_id.hex()
    assert asked["topic"] == "devices/pi-1/firmware/v2"
    [ok] = w.events("step_up_ok")
    assert ok["via"] == "auth" and ok["previous_session"] == first.session_id.hex()
    assert ok["session"] == device.session.session_id.hex()  # type: ignore[union-attr]
    assert ok["identity"] == device.client_id
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        metrics = resp.read().decode()
    for line in ('tessera_step_ups_total{result="ok"} 1',
                 'tessera_step_ups_total{result="requested"} 1',
                 'tessera_handshakes_total{result="ok"} 3',
                 'tessera_rejections_total{reason="step_up_required"} 1',
                 "tessera_active_sessions 2"):
        assert line in metrics, line
    assert "tessera_verify_seconds_bucket" in metrics
    w.chain_ok()


def test_rotation_without_a_challenge_keeps_the_connection(world: Callable[..., World]) -> None:
    w = world()
    backend = w.client("backend", kind="broker")
    backend.connect()
    telemetry = w.collect(backend, "devices/pi-2/telemetry/#")
    device = w.client("pi-2")
    device.connect()
    commands = w.collect(device, "devices/pi-2/commands/#", proven=True)
    watch = Watch(device)
    sock = device.client.socket()
    sessions = {device.session.session_id}  # type: ignore[union-attr]
    rtts = []
    for i in range(5):
        t0 = time.perf_counter()
        session = device.reauthenticate()
        rtts.append(time.perf_counter() - t0)
        sessions.add(session.session_id)
        device.publish("devices/pi-2/telemetry/t", b"t%d" % i, qos=1)
        assert telemetry.get(timeout=5) == ("devices/pi-2/telemetry/t", b"t%d" % i)
        backend.publish("devices/pi-2/commands/x", b"c%d" % i, qos=1)
        assert commands.get(timeout=5) == ("devices/pi-2/commands/x", b"c%d" % i)
    assert len(sessions) == 6 and device.reauthentications == 5
    assert watch.disconnects == [] and device.client.socket() is sock
    assert not device.rejected
    rotations = w.events("handshake_ok", count=7)
    assert sum(1 for r in rotations if r["reauth"]) == 5
    assert not any(r["event"] == "step_up_requested" for r in w.records())
    print(f"\nre-authentication round trip (software keys): median "
          f"{statistics.median(rtts) * 1000:.2f} ms, max {max(rtts) * 1000:.2f} ms")
    assert statistics.median(rtts) < 0.5
    w.chain_ok()


def test_qos1_streams_across_rotations_arrive_exactly_once(world: Callable[..., World]) -> None:
    """Messages proven under the old session and still queued (paho sends at most 20
    unacknowledged QoS 1 messages) cross the swap in both directions."""
    w = world()
    backend = w.client("backend", kind="broker")
    backend.connect()
    up: list[bytes] = []
    backend.subscribe("devices/pi-3/telemetry/#", lambda t, p: up.append(p), 1, proven=False)
    device = w.client("pi-3")
    device.connect()
    down: list[bytes] = []
    device.subscribe("devices/pi-3/commands/#", lambda t, p: down.append(p), 1)
    watch = Watch(device)
    n = 600
    sent = threading.Event()

    def publish_up() -> None:
        for i in range(n):
            device.publish("devices/pi-3/telemetry/seq", b"%05d" % i, qos=1)
        sent.set()

    def publish_down() -> None:
        for i in range(n):
            backend.publish("devices/pi-3/commands/seq", b"%05d" % i, qos=1)

    threads = [threading.Thread(target=publish_up), threading.Thread(target=publish_down)]
    for t in threads:
        t.start()
    for _ in range(3):
        wait_for(lambda: len(up) > 20 or sent.is_set(), what="traffic")
        device.reauthenticate()
        time.sleep(0.05)
    for t in threads:
        t.join(30)
    wait_for(lambda: len(up) >= n and len(down) >= n, timeout=20, what="every message")
    # every message acknowledged: nothing is left to resend. A marker each way on the
    # same connections then arrives after any duplicate sent before it.
    wait_for(lambda: device.acked >= n and backend.acked >= n, 20, "every PUBACK")
    device.publish("devices/pi-3/telemetry/seq", b"marker", qos=1)
    backend.publish("devices/pi-3/commands/seq", b"marker", qos=1)
    wait_for(lambda: b"marker" in up and b"marker" in down, 10, "the markers")
    assert up[-1] == down[-1] == b"marker"
    up.pop(), down.pop()
    assert sorted(up) == [b"%05d" % i for i in range(n)], "telemetry lost or duplicated"
    assert sorted(down) == [b"%05d" % i for i in range(n)], "commands lost or duplicated"
    assert device.reauthentications == 3 and not device.rejected
    assert watch.disconnects == []
    assert not any(r["event"] == "message_rejected" for r in w.records())
    w.chain_ok()


def test_a_wrong_nonce_is_refused_and_audited(world: Callable[..., World]) -> None:
    w = world()
    device = w.client("pi-4")
    device.connect()
    requests: queue.Queue[StepUpRequest] = queue.Queue()
    device.on_step_up = requests.put
    watch = Watch(device)
    session = device.session
    assert watch.ack(device.publish("devices/pi-4/firmware/x", b"fw", qos=1)) == 0x87
    request = requests.get(timeout=5)
    assert request.reason == "sensitive_topic" and len(request.nonce) == 32
    with pytest.raises(MqttError) as exc:
        device.reauthenticate(context=bytes(32))
    assert "refused" in exc.value.detail
    wait_for(lambda: watch.disconnects, what="the broker closing the connection")
    [failed] = w.events("step_up_failed")
    assert failed["reason"] == "wrong_nonce" and failed["via"] == "auth"
    assert failed["session"] == session.session_id.hex()  # type: ignore[union-attr]
    assert not any(r["event"] == "step_up_ok" for r in w.records())
    device.close()
    w.chain_ok()


def test_a_forged_step_up_request_is_ignored(world: Callable[..., World]) -> None:
    policy = POLICY.replace('subscribe = ["devices/{id}/commands/#"]',
                            'subscribe = ["devices/{id}/commands/#", "tessera/step-up"]')
    w = world(policy=policy)
    backend = w.client("backend", kind="broker")
    backend.connect()
    device = w.client("pi-5")
    device.connect()
    device.answer_step_ups()
    subscribed = threading.Event()
    device.client.on_subscribe = lambda *a: subscribed.set()
    device.client.subscribe(STEP_UP_TOPIC, qos=1)  # so that a fan-out reaches it
    assert subscribed.wait(5)
    session = device.session
    forged = json.dumps({"nonce": "A" * 44, "quote": False, "reason": "policy_change",
                         "deadline_s": 30}).encode()
    for payload in (
        forged,  # no proof at all
        forged + bytes(31),  # a made-up proof
        backend.proven(STEP_UP_TOPIC, forged),  # proven, but not under pi-5's session
    ):
        backend.publish(STEP_UP_TOPIC, payload, qos=1).wait_for_publish(5)
    wait_for(lambda: device.step_ups_ignored == 3, what="three ignored requests")
    assert device.reauthentications == 0 and device.step_ups_answered == 0
    assert device.pending_step_up is None and device.session is session
    assert len(device.rejected) == 3
    # the broker's own request still gets through and is answered; a forged request
    # answered late would show as a second answer here
    device.publish("devices/pi-5/firmware/x", b"fw", qos=1).wait_for_publish(5)
    wait_for(lambda: device.step_ups_answered == 1, what="the genuine step-up")
    assert device.reauthentications == 1 and device.step_ups_ignored == 3
    w.chain_ok()


def test_no_answer_means_a_kick_and_a_connect_with_the_nonce_answers(
        world: Callable[..., World]) -> None:
    w = world(step_up_deadline_s="1", step_up_reconnect_window_s="10")
    backend = w.client("backend", kind="broker")
    backend.connect()
    got = w.collect(backend, "devices/pi-6/#")
    device = w.client("pi-6")
    device.connect()
    requests: queue.Queue[StepUpRequest] = queue.Queue()
    device.on_step_up = requests.put  # hears the request, never answers it
    watch = Watch(device)
    assert watch.ack(device.publish("devices/pi-6/firmware/x", b"fw", qos=1)) == 0x87
    request = requests.get(timeout=5)
    assert request.deadline_s == 1
    t0 = time.monotonic()
    wait_for(lambda: watch.disconnects, timeout=5, what="the kick")
    assert 0.5 < time.monotonic() - t0 < 3
    device.close()  # (paho would retry its spent CONNECT on its own)
    assert device.pending_step_up == request
    again = w.client("pi-6", member=device.member)  # type: ignore[attr-defined]
    again.connect(context=request.nonce)
    assert again.pending_step_up is None
    again.publish("devices/pi-6/firmware/x", b"fw-after", qos=1).wait_for_publish(5)
    assert got.get(timeout=5) == ("devices/pi-6/firmware/x", b"fw-after")
    [failed] = w.events("step_up_failed")
    assert failed["reason"] == "timeout"
    [ok] = w.events("step_up_ok")
    assert ok["via"] == "connect" and ok["trigger"] == "sensitive_topic"
    w.chain_ok()


def test_the_first_connect_teaches_the_network(world: Callable[..., World]) -> None:
    w = world()
    member = w.fleet.member("device", "pi-7")
    for _ in range(2):
        device = w.client("pi-7", member=member)
        device.connect()
        device.publish("devices/pi-7/telemetry/t", b"x", qos=1).wait_for_publish(5)
        device.close()
    records = w.events("handshake_ok", count=2)
    assert [(r["network"], r["new_network"]) for r in records] == [("127.0.0.0/24", False)] * 2
    assert not any(r["event"] == "step_up_requested" for r in w.records())
    w.chain_ok()


def test_a_policy_change_asks_every_live_session(world: Callable[..., World]) -> None:
    w = world()
    clients = [w.client("backend", kind="broker"), w.client("pi-8"), w.client("pi-9")]
    watches = []
    for c in clients:
        c.connect()
        c.answer_step_ups()
        watches.append(Watch(c))
    got = w.collect(clients[0], "devices/#")
    new_policy = POLICY.replace('"devices/{id}/keys/#"]', '"devices/{id}/keys/#", '
                                '"devices/{id}/events/+"]', 1)
    (w.directory / "policy.toml").write_text(new_policy)
    w.broker.reload()
    wait_for(lambda: all(c.step_ups_answered == 1 for c in clients), timeout=10,
             what="every session stepping up")
    asked = w.events("step_up_requested", count=3)
    assert sorted(r["identity"] for r in asked) == sorted(c.client_id for c in clients)
    assert {r["trigger"] for r in asked} == {"policy_change"}
    w.events("step_up_ok", count=3)
    [reloaded] = w.events("policy_reloaded")
    digest = parse_policy(new_policy).digest
    assert reloaded["changed"] is True and reloaded["digest"] == digest.hex()
    for c, watch in zip(clients, watches, strict=True):
        assert c.session.params.policy_digest == digest  # type: ignore[union-attr]
        assert watch.disconnects == []
    clients[1].publish("devices/pi-8/events/boot", b"new topic", qos=1).wait_for_publish(5)
    assert got.get(timeout=5) == ("devices/pi-8/events/boot", b"new topic")
    w.chain_ok()


def test_a_policy_that_takes_a_topic_away_stops_cached_routes(
        world: Callable[..., World]) -> None:
    # The broker's C fast lane routes a topic without asking Python once Python has
    # judged it plain, and grants READs it has granted before; a policy reload must end
    # both at once, not when the cache happens to fill.
    w = world()
    backend, device = w.client("backend", kind="broker"), w.client("pi-6")
    for c in (backend, device):
        c.connect()  # not answering step-ups: a re-authentication would reset the caches
    got = w.collect(backend, "devices/#")
    for i in range(20):  # the first verifies in Python, the rest take the fast lane
        device.publish("devices/pi-6/telemetry/t", str(i).encode(), qos=1).wait_for_publish(5)
    assert [got.get(timeout=5)[1] for _ in range(20)] == [str(i).encode() for i in range(20)]
    # 1. the backend loses its subscribe right: its cached READ grant must go
    (w.directory / "policy.toml").write_text(
        POLICY.replace('subscribe = ["#"]', 'subscribe = ["devices/+/firmware/#"]', 1))
    w.broker.reload()
    w.events("policy_reloaded")
    device.publish("devices/pi-6/telemetry/t", b"unseen", qos=1).wait_for_publish(5)
    denied = w.events("acl_denied")
    assert denied[-1]["identity"] == backend.client_id
    assert denied[-1]["topic"] == "devices/pi-6/telemetry/t"
    assert got.empty()
    # 2. the device loses its publish right: its cached route must go
    (w.directory / "policy.toml").write_text(
        POLICY.replace('"devices/{id}/telemetry/#", ', "", 1))
    w.broker.reload()
    w.events("policy_reloaded", count=2)
    device.publish("devices/pi-6/telemetry/t", b"refused", qos=1).wait_for_publish(5)
    rejected = w.events("message_rejected")
    assert rejected[-1]["reason"] == "not_authorized"
    assert rejected[-1]["topic"] == "devices/pi-6/telemetry/t"
    assert got.empty()
    w.chain_ok()


def test_a_new_broker_credential_asks_every_live_session(world: Callable[..., World]) -> None:
    w = world()
    device = w.client("pi-11")
    device.connect()
    device.answer_step_ups()
    watch = Watch(device)
    # the operator installs a new key and credential for the broker, then sends SIGHUP
    key = InsecureSoftwareSigner.generate()
    member = w.fleet.member("broker", "mqtt-1", signer=key)
    (w.directory / "broker.pem").write_bytes(member.credential.chain[0].public_bytes(
        Encoding.PEM))
    key.save(w.directory / "broker-key.pem", overwrite=True)
    w.broker.reload()
    wait_for(lambda: device.step_ups_answered == 1, timeout=10, what="the step-up")
    [asked] = w.events("step_up_requested")
    assert asked["trigger"] == "key_change"
    [ok] = w.events("step_up_ok")
    assert ok["trigger"] == "key_change" and ok["via"] == "auth"
    # msg2 of the step-up was signed with the new key (the device checked it)
    device.publish("devices/pi-11/telemetry/t", b"x", qos=1).wait_for_publish(5)
    assert watch.disconnects == []
    assert not any(r["event"] == "message_rejected" for r in w.records())
    w.chain_ok()


def test_plugin_options_are_checked() -> None:
    from broker_plugin.host import parse_settings
    from structauth.errors import ConfigurationError

    s = parse_settings({"step_up_deadline_s": "2.5", "step_up_new_network": "off",
                        "quarantine_failures": "0", "rate_factor": "4"})
    assert (s.deadline_s, s.new_network, s.quarantine_failures, s.rate_factor) == (
        2.5, False, 0, 4.0)
    assert parse_settings({}) == type(s)()
    for option, value in [("step_up_deadline_s", "soon"), ("step_up_new_network", "maybe"),
                          ("network_memory", "0"), ("rate_factor", "0.5"),
                          ("quarantine_s", "-1"), ("rate_window_s", "inf")]:
        with pytest.raises(ConfigurationError) as exc:
            parse_settings({option: value})
        assert f"plugin_opt_{option}" in exc.value.detail


def test_repeated_failures_quarantine_until_the_time_passes(
        world: Callable[..., World]) -> None:
    w = world(quarantine_failures="2", quarantine_s="2")
    member = w.fleet.member("device", "pi-10")
    for _ in range(2):  # two wrong answers
        device = w.client("pi-10", member=member)
        device.connect()
        if device.pending_step_up is None:
            device.publish("devices/pi-10/firmware/x", b"fw", qos=1).wait_for_publish(5)
        wait_for(lambda d=device: d.pending_step_up is not None, what="a step-up request")
        with pytest.raises(MqttError):
            device.reauthenticate(context=b"\x55" * 32)
        device.close()
    [quarantined] = w.events("quarantined")
    assert quarantined["cause"] == "step_up_failures" and quarantined["failures"] == 2
    t0 = time.monotonic()
    with pytest.raises(MqttError):
        w.client("pi-10", member=member).connect(timeout=5)
    refused = w.events("handshake_refused")
    assert "quarantined" in refused[-1]["detail"]
    time.sleep(max(0.0, 2.1 - (time.monotonic() - t0)))
    w.client("pi-10", member=member).connect()
    [released] = w.events("released")
    assert released["by"] == "timeout" and released["identity"] == member.identity.uri
    assert [r["reason"] for r in w.events("step_up_failed", count=2)] == ["wrong_nonce"] * 2
    w.chain_ok()


def test_a_step_up_with_a_tpm_quote(world: Callable[..., World], swtpm_session: Any,
                                   tmp_path: Path) -> None:
    """The device key and its attestation key in swtpm; the broker knows the enrolled AK
    and checks the quote over its nonce."""
    from hw.tpm import TpmBackend

    with TpmBackend(swtpm_session.tcti, tmp_path / "tpm-keys") as tpm:
        signer = tpm.create_signing_key("device")
        ak = tpm.create_attestation_key("ak")
        aks = tmp_path / "aks"
        aks.mkdir()
        (aks / "pi-t.akpub").write_bytes(ak.public_area_bytes())
        w = world(attestation_keys=str(aks))
        backend = w.client("backend", kind="broker")
        backend.connect()
        got = w.collect(backend, "devices/pi-t/#")
        member = Member(signer, w.fleet.credential_for(signer.public_key(), "device", "pi-t"))
        device = w.client("pi-t", member=member)
        device.connect()
        device.answer_step_ups(tpm_quote_fn(tpm, "ak"))
        watch = Watch(device)
        assert watch.ack(device.publish("devices/pi-t/keys/rotate", b"k1", qos=1)) == 0x87
        wait_for(lambda: device.step_ups_answered == 1, timeout=10, what="the quoted step-up")
        assert watch.ack(device.publish("devices/pi-t/keys/rotate", b"k2", qos=1)) == 0
        assert got.get(timeout=5) == ("devices/pi-t/keys/rotate", b"k2")
        assert watch.disconnects == []
        [asked] = w.events("step_up_requested")
        assert asked["quote"] is True
        [ok] = w.events("step_up_ok")
        assert ok["quote"] is True and ok["enrolled_ak"] is True
        assert ok["pcr_selection"] == [[0x000B, list(range(8))]]
        assert len(ok["pcr_digest"]) == 64 and ok["ak_name"].startswith("000b")
        device.close()
    w.chain_ok()


def test_a_command_queued_during_a_re_authentication_is_delivered_after_it(
        world: Callable[..., World]) -> None:
    """Mosquitto 2.0.11 does not send a client anything between its AUTH 0x19 and its
    msg3 and, once the re-authentication succeeds, sends what it queued meanwhile only
    when something new is queued for it. The broker therefore sends the device a small
    proven message right after confirming a re-authentication, which flushes the queue:
    a command published inside that window arrives without any later traffic."""
    w = world()
    backend = w.client("backend", kind="broker")
    backend.connect()
    device = w.client("pi-12")
    device.connect()
    commands = w.collect(device, "devices/pi-12/commands/#", proven=True)
    in_window, published = threading.Event(), threading.Event()
    send_auth = device.client.send_auth

    def msg3_when_the_command_is_queued(reason: int, data: bytes | None, **kw: bool) -> Any:
        if kw.get("release"):  # msg3: hold it until the broker has taken the command
            in_window.set()
            assert published.wait(5)
        return send_auth(reason, data, **kw)

    device.client.send_auth = msg3_when_the_command_is_queued  # type: ignore[method-assign]
    rotation = threading.Thread(target=device.reauthenticate)
    rotation.start()
    assert in_window.wait(5)
    backend.publish("devices/pi-12/commands/x", b"during", qos=1).wait_for_publish(5)
    published.set()
    rotation.join(10)
    assert device.reauthentications == 1
    assert commands.get(timeout=3) == ("devices/pi-12/commands/x", b"during")
    assert not device.rejected
    w.chain_ok()
