"""MQTT end to end: a real Mosquitto with the Tessera plugin, devices on paho-mqtt with
the three-message SA1 handshake (CONNECT msg1, AUTH msg2, AUTH msg3, CONNACK) and a
proof on every PUBLISH; raw MQTT 5 connections (bench.broker's) for what an attacker
sends."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bench.mqtt_wire import (
    Conn,
    auth_data_of,
    connect_packet,
    publish_packet,
    subscribe_packet,
)
from device.mqtt import MqttError, TesseraMqttClient
from hw.software import InsecureSoftwareSigner
from simulator.fleet import Fleet, Member
from simulator.mosquitto import Mosquitto, find_mosquitto, plugin_files
from structauth.credentials import Identity
from structauth.errors import ConfigurationError, Reason, TesseraError
from structauth.handshake import Initiator
from structauth.mqtt_binding import encode_auth
from tests.support import capture_msg1, wait_for

pytestmark = pytest.mark.broker



@dataclass
class Setup:
    fleet: Fleet
    broker: Mosquitto
    directory: Path
    identity: Identity  # the broker's, which every device names in msg1

    def device(self, name: str, kind: str = "device", **kw: object) -> TesseraMqttClient:
        member = self.fleet.member(kind, name)
        return self.client(member, **kw)

    def client(self, member: Member, **kw: object) -> TesseraMqttClient:
        kw.setdefault("broker", self.identity)
        return TesseraMqttClient(signer=member.signer, credential=member.credential,
                                 trust=self.fleet.trust, host="127.0.0.1",
                                 port=self.broker.port, **kw)  # type: ignore[arg-type]

    def audit(self, event: str | None = None) -> list[dict[str, object]]:
        import json

        path = self.directory / "audit.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()] \
            if path.exists() else []
        return [r for r in rows if event is None or r["event"] == event]


def _broker_options(directory: Path, fleet: Fleet, name: str, **extra: str
                    ) -> tuple[dict[str, str], Identity]:
    signer = InsecureSoftwareSigner.generate()
    member = fleet.member("broker", name, signer=signer)
    key = signer.save(directory / "broker-key.pem")
    options = plugin_files(
        directory, trust_domain=fleet.trust_domain,
        bundle_pem=fleet.root.public_bytes(Encoding.PEM),
        credential_pem=member.credential.chain[0].public_bytes(Encoding.PEM),
        key=f"insecure-software:{key}", audit_log=str(directory / "audit.jsonl"), **extra)
    return options, member.identity


@contextlib.contextmanager
def _world(directory: Path, **extra: str) -> Iterator[Setup]:
    fleet = Fleet(t0=dt.datetime.now(dt.UTC) - dt.timedelta(days=1))
    options, identity = _broker_options(directory, fleet, "mqtt-1", **extra)
    with Mosquitto(directory / "mosquitto", plugin_options=options) as broker:
        yield Setup(fleet, broker, directory, identity)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    with _world(tmp_path) as world:
        yield world


def _collector(client: TesseraMqttClient, topic: str,
               proven: bool = False) -> queue.Queue[tuple[str, bytes]]:
    got: queue.Queue[tuple[str, bytes]] = queue.Queue()
    client.subscribe(topic, lambda t, p: got.put((t, p)), proven=proven)
    return got


def _nothing(got: queue.Queue[tuple[str, bytes]], sender: TesseraMqttClient,
             topic: str) -> bool:
    """Nothing was delivered of what ``sender`` published before: a genuine marker it
    publishes now (same connection, so the broker handles it after everything before
    it, and the subscriber gets it in that order) is the next thing that arrives."""
    marker = os.urandom(8).hex().encode()
    sender.publish(topic, marker, qos=1).wait_for_publish(5)
    return got.get(timeout=5) == (topic, marker)


def test_proven_telemetry_reaches_the_subscriber_stripped(setup: Setup) -> None:
    backend = setup.device("backend", kind="broker")
    backend.connect()
    got = _collector(backend, "devices/+/telemetry/#")
    device = setup.device("pi-1")
    device.connect()
    for qos in (0, 1, 2):
        device.publish("devices/pi-1/telemetry/temp", f"21.{qos}".encode(), qos=qos)
        assert got.get(timeout=5) == ("devices/pi-1/telemetry/temp", f"21.{qos}".encode())
    device.close()
    backend.close()


def test_forged_replayed_moved_and_cross_topic_are_dropped(setup: Setup) -> None:
    backend = setup.device("backend", kind="broker")
    backend.connect()
    got = _collector(backend, "devices/#")
    device = setup.device("pi-2")
    device.connect()
    raw = device.client
    acks: dict[int, int] = {}  # mid -> PUBACK reason code
    tracked = raw.on_publish  # the client's own tracking still sees every answer

    def on_publish(c: Any, u: Any, mid: int, rc: Any, props: Any) -> None:
        acks[mid] = rc.value
        tracked(c, u, mid, rc, props)

    raw.on_publish = on_publish
    wire = device.proven("devices/pi-2/telemetry/t", b"genuine")
    forged = wire[:-1] + bytes([wire[-1] ^ 1])
    info = raw.publish("devices/pi-2/telemetry/t", forged, qos=1)
    info.wait_for_publish(5)
    assert _nothing(got, device, "devices/pi-2/telemetry/t")
    assert acks[info.mid] == 0x87  # the QoS 1 publisher learns it was refused
    info = raw.publish("devices/pi-2/telemetry/t", wire, qos=1)
    info.wait_for_publish(5)
    assert got.get(timeout=5)[1] == b"genuine"
    assert acks[info.mid] == 0
    raw.publish("devices/pi-2/telemetry/t", wire, qos=1).wait_for_publish(5)  # replay
    assert _nothing(got, device, "devices/pi-2/telemetry/t")
    moved = device.proven("devices/pi-2/telemetry/a", b"x")
    raw.publish("devices/pi-2/telemetry/b", moved, qos=0)
    assert _nothing(got, device, "devices/pi-2/telemetry/t")
    # a topic the policy denies: publish() reports the refusal (Mosquitto 2.0.x passes
    # only the bare reason code on, not the plugin's reason string)
    denied = device.publish("devices/pi-9/telemetry/t", b"not mine", qos=1)
    assert denied.accepted(5) is False
    assert denied.refused in ("0x87", "tessera: not_authorized")
    assert _nothing(got, device, "devices/pi-2/telemetry/t")
    raw.publish("devices/pi-2/telemetry/t", b"no proof at all", qos=0)
    assert _nothing(got, device, "devices/pi-2/telemetry/t")
    # the session survives all of that: genuine messages still pass
    fine = device.publish("devices/pi-2/telemetry/t", b"still fine", qos=1)
    assert fine.accepted(5) is True and fine.refused is None
    assert got.get(timeout=5)[1] == b"still fine"
    device.close()
    backend.close()

    from broker_plugin.audit import verify_chain

    def reasons() -> list[object]:
        return [r.get("reason") for r in setup.audit("message_rejected")]

    # the audit writer is a thread: wait for the five refusals to be written
    wait_for(lambda: len(reasons()) >= 5, 10, "five message_rejected records")
    reasons = reasons()
    assert reasons.count("bad_tag") == 2, reasons  # forged, moved
    assert "replayed" in reasons and "not_authorized" in reasons and "truncated" in reasons
    assert verify_chain([setup.directory / "audit.jsonl"]).ok


def _raw_client(protocol: int, client_id: str) -> mqtt.Client:
    return mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)


def _connack(client: mqtt.Client, port: int, properties: Properties | None = None) -> object:
    result: queue.Queue[object] = queue.Queue()
    client.on_connect = lambda c, u, f, rc, p: result.put(rc)
    kw = {"properties": properties} if properties is not None else {}
    client.connect("127.0.0.1", port, **kw)  # type: ignore[arg-type]
    client.loop_start()
    try:
        return result.get(timeout=5)
    finally:
        client.disconnect()
        client.loop_stop()


def test_clients_without_tessera_are_refused(setup: Setup) -> None:
    rc = _connack(_raw_client(mqtt.MQTTv5, "plain"), setup.broker.port)
    assert getattr(rc, "value", rc) == 0x87  # not authorized
    rc = _connack(_raw_client(mqtt.MQTTv311, "old"), setup.broker.port)
    assert getattr(rc, "value", rc) in (5, 0x87)  # 3.1.1 return code 5: not authorized
    props = Properties(PacketTypes.CONNECT)
    props.AuthenticationMethod = "tessera-sa1"
    props.AuthenticationData = b"\x00" * 40
    rc = _connack(_raw_client(mqtt.MQTTv5, "junk"), setup.broker.port, props)
    assert getattr(rc, "is_failure", True)


def test_client_id_must_be_the_identity(setup: Setup) -> None:
    member = setup.fleet.member("device", "pi-3")
    impostor = setup.client(member, client_id="spiffe://fleet.test/device/pi-4")
    with pytest.raises(MqttError) as exc:
        impostor.connect(timeout=5)
    assert exc.value.reason is Reason.NOT_AUTHORIZED


def test_subscription_outside_the_policy_is_refused(setup: Setup) -> None:
    device = setup.device("pi-5")
    device.connect()
    device.subscribe("devices/pi-5/commands/#", lambda t, p: None)
    with pytest.raises(MqttError):
        device.subscribe("devices/+/commands/#", lambda t, p: None)
    with pytest.raises(MqttError):
        device.subscribe("devices/pi-5/telemetry/#", lambda t, p: None)
    device.close()


def _tessera(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).parent / "tessera"), *args],
                          capture_output=True, text=True, timeout=60)


def test_broker_config_writes_a_working_snippet(setup: Setup, tmp_path: Path) -> None:
    from simulator.provisioner import free_port

    d = setup.directory
    common = ["broker", "config", "--trust-domain", setup.fleet.trust_domain,
              "--bundle", str(d / "bundle.pem"), "--credential", str(d / "broker.pem"),
              "--key", f"insecure-software:{d / 'broker-key.pem'}", "--policy",
              str(d / "policy.toml")]
    port = free_port()
    done = _tessera(*common, "--listener", f"127.0.0.1:{port}", "--user", "root",
                    "--plugin-opt", "quarantine_failures=4", "-o", str(tmp_path / "tessera.conf"))
    assert done.returncode == 0, done.stderr
    conf = (tmp_path / "tessera.conf").read_text()
    assert "allow_anonymous false" in conf and "plugin_opt_policy" in conf
    lines = conf.splitlines()
    # the real broker below accepts every line, set_tcp_nodelay included
    assert "set_tcp_nodelay true" in lines and "plugin_opt_quarantine_failures 4" in lines
    assert not any(ln.startswith("memory_limit") for ln in lines)
    conf += f"log_dest file {tmp_path / 'm.log'}\npersistence false\n"
    (tmp_path / "tessera.conf").write_text(conf)
    proc = subprocess.Popen([find_mosquitto(), "-c", str(tmp_path / "tessera.conf")])
    try:
        def listening() -> bool:
            assert proc.poll() is None, "the broker exited"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            except OSError:
                return False
            return True

        wait_for(listening, 10, "the broker to listen")
        member = setup.fleet.member("device", "pi-cfg")
        device = TesseraMqttClient(signer=member.signer, credential=member.credential,
                                   trust=setup.fleet.trust, host="127.0.0.1", port=port,
                                   broker=setup.identity)
        device.connect()
        device.close()
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize(("change", "expect"), [
    (["--policy", "/nonexistent.toml"], "plugin_opt_policy"),
    (["--bundle", "/nonexistent.pem"], "--bundle /nonexistent.pem: cannot read it"),
    (["--listener", "nonsense"], "HOST:PORT"),
    (["--user", "mosquitto"], "cannot read"),
    (["--plugin-opt", "quarantine_failures=-1"], "plugin_opt_quarantine_failures"),
    (["--plugin-opt", "no_such_knob=1"], "NAME=VALUE"),
    (["--check", "memory_limit 1000000\n"], ":1: remove memory_limit"),
    (["--check", "# ok\nper_listener_settings true\n"], ":2: per_listener_settings true"),
    (["--check", "include_dir conf.d\n"], "already loaded"),
])
def test_broker_config_refuses_what_the_broker_would(setup: Setup, tmp_path: Path,
                                                     change: list[str], expect: str) -> None:
    d = setup.directory
    args = {"--trust-domain": setup.fleet.trust_domain, "--bundle": str(d / "bundle.pem"),
            "--credential": str(d / "broker.pem"),
            "--key": f"insecure-software:{d / 'broker-key.pem'}",
            "--policy": str(d / "policy.toml"), "--user": "root"}
    args[change[0]] = change[1]
    if change[0] == "--check":  # a mosquitto.conf the snippet would join
        (tmp_path / "conf.d").mkdir()
        (tmp_path / "conf.d" / "old.conf").write_text("plugin /opt/x/tessera_mosquitto.so\n")
        (tmp_path / "mosquitto.conf").write_text(change[1])
        args["--check"] = str(tmp_path / "mosquitto.conf")
    if change[0] == "--user" and os.geteuid() != 0:
        pytest.skip("only root's files are hidden from the mosquitto user here")
    out = tmp_path / "x.conf"
    done = _tessera("broker", "config", *[x for kv in args.items() for x in kv], "-o", str(out))
    # one error line (an insecure-software key adds its own warning before it)
    errors = [ln for ln in done.stderr.splitlines() if not ln.startswith("insecure-software")]
    assert done.returncode == 1 and len(errors) == 1, done.stderr
    assert errors[0].startswith("tessera: error:") and expect in errors[0], errors
    assert not out.exists()


def test_revocation_cuts_the_live_session(tmp_path: Path, softhsm: object) -> None:
    """`tessera revoke` -> provisioning feed -> plugin -> the device is disconnected, and
    its next handshake is refused."""
    from device.provisioner import ProvisionerClient, enroll_witnessed
    from simulator.provisioner import ProvisioningServer
    from structauth.credentials import Credential, TrustStore

    with ProvisioningServer(tmp_path / "authority", softhsm) as service:  # type: ignore[arg-type]
        operator = ProvisionerClient(service.url, operator_token=service.operator_token)
        broker_key, device_key = (InsecureSoftwareSigner.generate() for _ in range(2))
        b = enroll_witnessed(operator, broker_key, "mqtt-1", kind="broker",)
        d = enroll_witnessed(operator, device_key, "pi-rv")
        options = plugin_files(
            tmp_path, trust_domain=service.trust_domain, bundle_pem=b["bundle"],
            credential_pem=b["operational_credential"],
            key=f"insecure-software:{broker_key.save(tmp_path / 'bk.pem')}",
            provisioner=service.url)
        trust = TrustStore(x509.load_pem_x509_certificates(d["bundle"].encode()),
                           service.trust_domain)
        credential = Credential.from_pem(d["operational_credential"].encode())
        me = Credential.from_pem(b["operational_credential"].encode()).identity
        with Mosquitto(tmp_path / "mosquitto", plugin_options=options) as broker:
            device = TesseraMqttClient(signer=device_key, credential=credential, trust=trust,
                                       host="127.0.0.1", port=broker.port, broker=me)
            device.connect()
            gone = threading.Event()
            device.client.on_disconnect = lambda *a: gone.set()
            service.cli("revoke", "pi-rv", "--reason", "stolen", check=True)
            # how fast is the benchmark's business (bench broker: revocation_ms < 1 s)
            assert gone.wait(10), "the revoked device was not disconnected"
            device.client.loop_stop()
            again = TesseraMqttClient(signer=device_key, credential=credential, trust=trust,
                                      host="127.0.0.1", port=broker.port, broker=me)
            with pytest.raises(MqttError):
                again.connect(timeout=5)


def test_commands_are_proven_to_their_one_recipient(setup: Setup) -> None:
    """A command to devices/pi-6/commands/... is re-proven by the broker under pi-6's own
    session: pi-6 accepts it; a forged or replayed delivery is dropped on the device."""
    backend = setup.device("backend", kind="broker")
    backend.connect()
    device = setup.device("pi-6")
    device.connect()
    got = _collector(device, "devices/pi-6/commands/#", proven=True)
    backend.publish("devices/pi-6/commands/reboot", b"now", qos=1).wait_for_publish(5)
    assert got.get(timeout=5) == ("devices/pi-6/commands/reboot", b"now")
    # what the broker delivered, captured on the device's side of the connection
    seen: list[bytes] = []
    device.client.message_callback_add("devices/pi-6/commands/x",
                                       lambda c, u, m: seen.append(bytes(m.payload)))
    backend.publish("devices/pi-6/commands/x", b"later", qos=1).wait_for_publish(5)
    wait_for(lambda: seen, 5, "the delivery")
    [delivered] = seen
    assert delivered[:-31] == b"later"  # payload || the broker's proof for pi-6
    assert got.get(timeout=5) == ("devices/pi-6/commands/x", b"later")  # verified once
    with pytest.raises(TesseraError) as exc:  # the same delivery again: replayed
        device.open_delivery("devices/pi-6/commands/x", delivered)
    assert exc.value.reason is Reason.REPLAYED
    # a fresh delivery the device has not opened yet: moved or altered copies fail
    device.client.message_callback_remove("devices/pi-6/commands/#")
    backend.publish("devices/pi-6/commands/x", b"fresh", qos=1).wait_for_publish(5)
    wait_for(lambda: len(seen) >= 2, 5, "the second delivery")
    fresh = seen[1]
    for topic, data, reason in [
        ("devices/pi-6/commands/y", fresh, Reason.BAD_TAG),  # moved to another topic
        ("devices/pi-6/commands/x", b"evil" + fresh[5:], Reason.BAD_TAG),  # altered
        ("devices/pi-6/commands/x", b"no proof", Reason.TRUNCATED),
    ]:
        with pytest.raises(TesseraError) as exc:
            device.open_delivery(topic, data)
        assert exc.value.reason is reason
    assert device.open_delivery("devices/pi-6/commands/x", fresh) == b"fresh"
    # backend's own session cannot prove a message to pi-6 (an impostor broker)
    with pytest.raises(TesseraError):
        device.open_delivery("devices/pi-6/commands/x", backend.proven(
            "devices/pi-6/commands/x", b"fake"))
    # a command to a device that is not connected is refused to its sender
    info = backend.publish("devices/pi-404/commands/x", b"?", qos=1)
    info.wait_for_publish(5)
    assert list(device.rejected) == [] and device.rejected_count == 0
    device.close()
    backend.close()


def test_a_device_flooding_garbage_disturbs_nobody(setup: Setup) -> None:
    """2,000 junk publishes (random bytes, wrong proofs, empty, huge) from one device:
    none is delivered, the broker stays up, another device's messages still flow."""
    import random

    backend = setup.device("backend", kind="broker")
    backend.connect()
    got = _collector(backend, "devices/#")
    flooder, honest = setup.device("pi-flood"), setup.device("pi-ok")
    flooder.connect()
    honest.connect()
    rng = random.Random(7)
    topic = "devices/pi-flood/telemetry/t"
    for i in range(2000):
        size = rng.choice([0, 1, 30, 31, 32, 200, 5000])
        flooder.client.publish(topic, rng.randbytes(size), qos=i % 2)
    honest.publish("devices/pi-ok/telemetry/t", b"still here", qos=1).wait_for_publish(10)
    deadline = time.monotonic() + 10
    received = []
    while time.monotonic() < deadline:
        try:
            received.append(got.get(timeout=0.5))
        except queue.Empty:
            break
    assert ("devices/pi-ok/telemetry/t", b"still here") in received
    assert all(t != topic for t, _ in received)  # nothing of the flood got through
    assert setup.broker.running()  # the broker is up
    honest.close()
    backend.close()
    flooder.client.loop_stop()


def test_a_will_message_cannot_carry_unproven_data(setup: Setup) -> None:
    """Wills never reach the plugin's message check (Mosquitto 2.0 only asks the ACL),
    so they must not be published at all: even on the device's own topic."""
    backend = setup.device("backend", kind="broker")
    backend.connect()
    got = _collector(backend, "#")
    device = setup.device("pi-w")
    device.client.will_set("devices/pi-w/telemetry/last", b"UNPROVEN WILL", qos=1)
    device.connect()
    device.client.socket().close()  # an ungraceful end: the broker would send the will
    # the broker decided (the refusal is audited after Mosquitto asked, when a will it
    # allowed would already be queued to the subscriber); then a marker from a live
    # client must be the next delivery
    wait_for(lambda: setup.audit("will_refused"), 10, "the will's refusal in the audit")
    other = setup.device("pi-wm")
    other.connect()
    other.publish("devices/pi-wm/telemetry/marker", b"marker", qos=1).wait_for_publish(5)
    assert got.get(timeout=5) == ("devices/pi-wm/telemetry/marker", b"marker")
    other.close()
    backend.close()


# -- nothing before key confirmation (SA1 v2): replayed, misaddressed msg1 ---------------



def _raw_replay(port: int, client_id: str, msg1: bytes) -> tuple[Conn, int, bytes]:
    """An attacker's raw MQTT 5 CONNECT carrying a captured msg1: the connection, the
    first packet type back (0xF: AUTH, 0x2: CONNACK) and its body."""
    conn = Conn(port, timeout=5)
    conn.sock.sendall(connect_packet(client_id, msg1, keepalive=60))
    first, body = conn.read_packet()
    return conn, first >> 4, body


def _closed(conn: Conn, timeout: float = 5.0) -> bool:
    """True once the broker has closed ``conn`` (whatever it sent first)."""
    conn.sock.settimeout(timeout)
    try:
        while conn.sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except OSError:
        pass
    return True


class Acks:
    """PUBACK reason codes of one client's QoS 1 publishes."""

    def __init__(self, client: TesseraMqttClient) -> None:
        self.codes: dict[int, int] = {}
        client.client.on_publish = lambda c, u, mid, rc, p: self.codes.__setitem__(mid, rc.value)

    def publish(self, client: TesseraMqttClient, topic: str, payloads: list[bytes]) -> list[int]:
        infos = [client.publish(topic, p, qos=1) for p in payloads]
        wait_for(lambda: all(i.mid in self.codes for i in infos), 10, "every PUBACK")
        return [self.codes[i.mid] for i in infos]


def _disconnects(client: TesseraMqttClient) -> list[float]:
    seen: list[float] = []
    previous = client.client.on_disconnect

    def gone(*args: Any) -> None:
        seen.append(time.monotonic())
        if previous is not None:
            previous(*args)

    client.client.on_disconnect = gone
    return seen


def _delivered(got: queue.Queue[tuple[str, bytes]], topic: str, n: int) -> list[bytes]:
    out: list[bytes] = []
    while len(out) < n:
        t, p = got.get(timeout=10)
        if t == topic:
            out.append(p)
    return out


def test_a_replayed_msg1_takes_nothing_over_and_cannot_lock_the_device_out(
        tmp_path: Path) -> None:
    """msg1s the device sent but the broker never saw (an on-path attacker captured
    and dropped them): replayed, each gets msg2 in an AUTH packet and nothing else. The
    live device keeps its connection (no client-id takeover), the replaying connection
    can neither subscribe nor publish (500 junk publishes, with the breaker set to trip
    at 5 rejections), nothing is audited as a login or counted against the device, and
    the device and its neighbours deliver every QoS 1 message."""
    with _world(tmp_path, quarantine_rejections="5") as w:
        backend = w.device("backend", kind="broker")
        backend.connect()
        got = _collector(backend, "devices/#")
        member = w.fleet.member("device", "pi-rp")
        captured = [Initiator(signer=member.signer, credential=member.credential,
                              trust=w.fleet.trust, expected_peer=w.identity).start()
                    for _ in range(2)]  # signed by the device, never delivered
        device, neighbour = w.client(member), w.device("pi-nb")
        device.connect()
        neighbour.connect()
        gone = _disconnects(device)
        uri = member.identity.uri
        wait_for(lambda: len(w.audit("handshake_ok")) == 3, what="three logins")

        # 1. replayed CONNECT, then publishing junk before any msg3
        conn, kind, body = _raw_replay(w.broker.port, uri, captured[0])
        reason, msg2 = auth_data_of(body)
        assert (kind, reason) == (0xF, 0x18) and msg2  # AUTH, continue: msg2, no CONNACK
        junk = b"".join(publish_packet(b"devices/pi-rp/telemetry/t", bytes([i % 256]) * 40)
                        for i in range(500))
        with contextlib.suppress(OSError):
            conn.sock.sendall(junk)
        assert _closed(conn)  # Mosquitto: a PUBLISH before CONNACK is a protocol error
        conn.sock.close()
        # 2. another captured msg1, then a SUBSCRIBE before any msg3
        conn, kind, body = _raw_replay(w.broker.port, uri, captured[1])
        assert kind == 0xF and auth_data_of(body)[0] == 0x18
        with contextlib.suppress(OSError):
            conn.sock.sendall(subscribe_packet("devices/#"))
        assert _closed(conn)
        conn.sock.close()

        # the device was never disturbed, and still delivers every QoS 1 message
        acks = Acks(device)
        sent = [b"m%03d" % i for i in range(20)]
        assert acks.publish(device, "devices/pi-rp/telemetry/t", sent) == [0] * 20
        assert _delivered(got, "devices/pi-rp/telemetry/t", 20) == sent
        assert Acks(neighbour).publish(neighbour, "devices/pi-nb/telemetry/t", [b"n"]) == [0]
        assert _delivered(got, "devices/pi-nb/telemetry/t", 1) == [b"n"]
        assert gone == [] and device.client.is_connected()
        assert [r["identity"] for r in w.audit("handshake_ok")].count(uri) == 1
        assert not w.audit("quarantined")
        assert not [r for r in w.audit("message_rejected") if r.get("identity") == uri]
        assert not any("devices/pi-rp" in t and p[:1] != b"m" for t, p in list(got.queue))
        for c in (device, neighbour, backend):
            c.close()


def test_a_msg1_replayed_after_a_broker_restart_never_completes(tmp_path: Path) -> None:
    """The restart empties the broker's nonce cache, so the device's msg1 from before
    it gets msg2 again; without the device's ephemeral keys the replayer cannot make
    msg3: whatever it sends (a msg3 it made up, or nothing until the pending handshake
    expires) ends in a refusal, and the device, reconnected, is undisturbed."""
    from simulator.provisioner import free_port

    port = free_port()
    with _world(tmp_path, pending_timeout_s="1", metrics_port=str(port)) as w:
        member = w.fleet.member("device", "pi-rs")
        uri = member.identity.uri
        first = w.client(member)
        captured = capture_msg1(first)
        first.connect()
        first.close()
        [msg1] = captured
        w.broker.restart()  # same port; the plugin starts with an empty nonce cache
        backend = w.device("backend", kind="broker")
        backend.connect()
        got = _collector(backend, "devices/#")
        device = w.client(member)
        device.connect()
        gone = _disconnects(device)
        # replay 1: answered with msg2, then a made-up msg3 -> refused
        conn, kind, body = _raw_replay(w.broker.port, uri, msg1)
        assert kind == 0xF and auth_data_of(body)[0] == 0x18
        made_up = b"SA1\x23\x00\x01" + bytes(8) + bytes(32)
        conn.sock.sendall(encode_auth(0x18, made_up))
        first_byte, body = conn.read_packet()
        assert (first_byte >> 4, body[1]) == (2, 0x87)  # CONNACK, not authorized
        assert _closed(conn)
        conn.sock.close()
        wait_for(lambda: any(r.get("stage") == "msg3" for r in w.audit("handshake_refused")),
                 what="the refused msg3 in the audit log")
        [refused] = [r for r in w.audit("handshake_refused") if r.get("stage") == "msg3"]
        assert refused["reason"] == "unknown_session" and refused["client_id"] == uri
        # replay 2: the same msg1 again is now a known nonce
        conn, kind, body = _raw_replay(w.broker.port, uri, msg1)
        assert (kind, body[1]) == (2, 0x87)
        conn.sock.close()
        # replay 3 after yet another restart: held until the pending timeout (1 s)
        device.close()
        w.broker.restart()
        device = w.client(member)
        device.connect()
        gone = _disconnects(device)
        backend = w.device("backend", kind="broker")
        backend.connect()
        got = _collector(backend, "devices/#")
        conn, kind, body = _raw_replay(w.broker.port, uri, msg1)
        assert kind == 0xF

        def metric(line: str) -> bool:
            import urllib.request

            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                return line in r.read().decode()

        wait_for(lambda: metric('tessera_handshakes_total{result="expired"} 1'), 5,
                 "the pending handshake to expire")
        conn.sock.close()
        assert metric('tessera_handshakes_total{result="ok"} 2')  # device, backend
        # nothing was taken from the device
        acks = Acks(device)
        sent = [b"r%02d" % i for i in range(10)]
        assert acks.publish(device, "devices/pi-rs/telemetry/t", sent) == [0] * 10
        assert _delivered(got, "devices/pi-rs/telemetry/t", 10) == sent
        assert gone == [] and device.client.is_connected()
        assert not w.audit("quarantined")
        device.close()
        backend.close()


def test_a_msg1_captured_at_one_broker_is_refused_at_another(tmp_path: Path) -> None:
    with _world(tmp_path / "one") as one:
        other_options, other_id = _broker_options(tmp_path / "two", one.fleet, "mqtt-2")
        with Mosquitto(tmp_path / "two" / "mosquitto", plugin_options=other_options) as two:
            there = Setup(one.fleet, two, tmp_path / "two", other_id)
            member = one.fleet.member("device", "pi-2b")
            device = one.client(member)
            captured = capture_msg1(device)
            device.connect()
            [msg1] = captured
            conn, kind, body = _raw_replay(two.port, member.identity.uri, msg1)
            assert (kind, body[1]) == (2, 0x87)  # CONNACK: refused at msg1, no msg2
            assert _closed(conn)
            conn.sock.close()
            wait_for(lambda: there.audit("handshake_refused"), what="the refusal at mqtt-2")
            [refused] = there.audit("handshake_refused")
            assert refused["reason"] == "wrong_identity" and refused["stage"] == "msg1"
            assert "mqtt-1" in refused["detail"] and not there.audit("handshake_ok")
            # the device's own connection at mqtt-1 is untouched; at mqtt-2 it needs a
            # msg1 addressed to mqtt-2, which works
            # (PUBACK 0x10: accepted, no subscriber)
            assert Acks(device).publish(device, "devices/pi-2b/telemetry/t", [b"x"]) == [0x10]
            elsewhere = there.client(member)
            elsewhere.connect()
            assert Acks(elsewhere).publish(elsewhere, "devices/pi-2b/telemetry/t",
                                           [b"y"]) == [0x10]
            # and a device that names mqtt-1 is refused by mqtt-2 before any crypto
            lost = there.client(member, broker=one.identity)
            with pytest.raises(MqttError) as exc:
                lost.connect(timeout=5)
            assert exc.value.reason is Reason.NOT_AUTHORIZED
            for c in (device, elsewhere):
                c.close()


def test_session_parameters_are_plugin_options(tmp_path: Path) -> None:
    with _world(tmp_path / "ok", session_epoch_ms="5000", session_skew_epochs="3",
                session_lifetime_s="600", session_replay_window="256",
                pending_max="64") as w:
        device = w.device("pi-sp")
        session = device.connect()
        p = session.params
        assert (p.epoch_ms, p.skew_epochs, p.lifetime_s, p.replay_window) == (5000, 3, 600, 256)
        device.close()
    for option, value, expect in [
        ("session_epoch_ms", "50", "plugin_opt_session_epoch_ms 50: epoch_ms 50 outside"),
        ("session_replay_window", "lots", "plugin_opt_session_replay_window: 'lots' is not"),
        ("pending_timeout_s", "90", "plugin_opt_pending_timeout_s: '90' is not seconds"),
        ("pending_per_client", "0", "plugin_opt_pending_per_client 0: pending handshakes"),
    ]:
        with pytest.raises(ConfigurationError) as exc, \
                _world(tmp_path / option, **{option: value}):
            pass
        errors = [ln for ln in str(exc.value).split(" | ") if "tessera:" in ln and
                  "refused to start" in ln]
        assert len(errors) == 1 and expect in errors[0], str(exc.value)


def test_the_device_refuses_a_broker_that_skips_key_confirmation(setup: Setup) -> None:
    """A CONNACK that carries msg2 (an SA1 v1 broker) or comes without the AUTH
    exchange is refused by the device, whatever the broker says; and the device will
    not be configured without the broker it means to reach."""
    from paho.mqtt.reasoncodes import ReasonCode

    device = setup.device("pi-v1")
    ok = ReasonCode(PacketTypes.CONNACK, identifier=0)
    v1 = Properties(PacketTypes.CONNACK)
    v1.AuthenticationMethod = "tessera-sa1"
    v1.AuthenticationData = b"SA1\x22" + bytes(100)
    for props, reason in [(v1, Reason.BAD_VERSION),
                          (Properties(PacketTypes.CONNACK), Reason.MALFORMED)]:
        device._failure = None
        device._connected.clear()
        device._on_connect(device.client, None, None, ok, props)
        assert device._connected.is_set() and device._failure is not None
        assert device._failure.reason is reason and device.session is None
    member = setup.fleet.member("device", "pi-v2")
    for broker in (None, setup.fleet.member("device", "pi-x").identity):
        with pytest.raises(MqttError) as exc:
            TesseraMqttClient(signer=member.signer, credential=member.credential,
                              trust=setup.fleet.trust, host="127.0.0.1",
                              port=setup.broker.port, broker=broker)  # type: ignore[arg-type]
        assert exc.value.reason is Reason.BAD_CONFIGURATION


def test_a_device_that_booted_in_1970_still_reaches_its_broker(setup: Setup) -> None:
    # no RTC: the wall clock is decades behind the device's own credential, which it
    # knows was issued in the past; trusting the clock would refuse the broker's
    # credential as "not yet valid" and lock the device out
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    backend = setup.device("backend", kind="broker")
    backend.connect()
    got = _collector(backend, "devices/+/telemetry/#")
    device = setup.device("pi-rtcless", wall_clock=lambda: epoch)
    device.connect()
    device.publish("devices/pi-rtcless/telemetry/t", b"1", qos=1)
    assert got.get(timeout=5) == ("devices/pi-rtcless/telemetry/t", b"1")
    device.close()
    backend.close()
