"""The MQTT attack world: a real Mosquitto started from the configuration `tessera broker
config` writes, a live legitimate device publishing QoS 1 all along, and a back-end
subscriber counting what it is delivered.

The attacking side speaks raw MQTT 5 (tests/attacks/mqtt5.py). Legitimate devices are
built the same way, with structauth (the protocol core) producing their SA1 messages and
proofs, so the suite depends on nothing in device/ or broker_plugin/ to talk to the broker.

Ordering argument used instead of sleeps (``World.fence``): Mosquitto runs one thread and
handles each connection's packets in order, and it queues a subscriber's deliveries in
order. Once an attacker's packet is known to be processed (a reply came back, or a
PINGRESP behind it on the same connection, or the broker logged the disconnect), a live
message published after that point is delivered to the sink after anything the attack
could have routed. So "the sink saw the fence" means "nothing else is still coming".
"""

from __future__ import annotations

import datetime as dt
import json
import queue
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding

from hw.software import InsecureSoftwareSigner
from simulator.fleet import Fleet, Member
from simulator.mosquitto import Mosquitto, plugin_files
from simulator.provisioner import free_port
from structauth.credentials import Identity, TimePolicy
from structauth.handshake import Initiator
from structauth.session import Session
from tests.attacks import mqtt5 as m
from tests.support import wait_for

AUTH_METHOD = "tessera-sa1"
LIVE_TOPIC = "devices/pi-live/telemetry/live"
#: the live device publishes one QoS 1 message this often (below the plugin's default
#: rate-spike floor of 20/s, so the flow itself never triggers a step-up)
LIVE_PERIOD_S = 0.125

#: the fleet policy plus a retained state topic and a will topic per device, so that
#: the legitimate retain and Will paths exist and the attacks probe their edges
POLICY = """version = 1

[classes.default]
publish   = ["devices/{id}/telemetry/#", "devices/{id}/state", "devices/{id}/will"]
subscribe = ["devices/{id}/commands/#"]
retain    = ["devices/{id}/state", "devices/{id}/will"]
will      = ["devices/{id}/will"]

[brokers]
publish   = ["#"]
subscribe = ["#"]
"""


class Refused(AssertionError):
    """The broker refused a handshake (what a test usually expects)."""

    def __init__(self, how: str, packet: m.Packet | None) -> None:
        super().__init__(how)
        self.how = how
        self.packet = packet


def now_policy() -> TimePolicy:
    return TimePolicy.trusted(dt.datetime.now(dt.UTC))


def proven(session: Session, topic: str, payload: bytes) -> bytes:
    """``payload || SA1 header`` for ``topic`` (docs/MQTT.md wire format)."""
    header, body = session.protect(topic.encode(), payload, time.monotonic())
    return body + header


@dataclass
class Handshake:
    """What a finished (or attempted) handshake left: the connection, the session, the
    messages on the wire."""

    conn: m.Conn
    session: Session | None
    msg1: bytes
    msg2: bytes | None = None
    msg3: bytes | None = None
    connack: m.Connack | None = None


class World:
    """One broker (and what it needs). ``options``: extra plugin options;
    ``identity``: the broker's member name (another broker gets another identity)."""

    def __init__(self, directory: Path, fleet: Fleet, *, name: str = "mqtt-1",
                 options: dict[str, str] | None = None, metrics: bool = True,
                 policy: str = POLICY, raw_options: dict[str, str] | None = None) -> None:
        self.directory = directory
        self.fleet = fleet
        self.members: dict[tuple[str, str], Member] = {}
        signer = InsecureSoftwareSigner.generate()
        self.broker_member = fleet.member("broker", name, signer=signer)
        directory.mkdir(parents=True, exist_ok=True)
        key = signer.save(directory / "broker-key.pem")
        self.audit_path = directory / "audit.jsonl"
        files = plugin_files(
            directory, trust_domain=fleet.trust_domain,
            bundle_pem=fleet.root.public_bytes(Encoding.PEM),
            credential_pem=self.broker_member.credential.chain[0].public_bytes(Encoding.PEM),
            key=f"insecure-software:{key}", policy=policy)
        self.broker = Mosquitto(directory / "mosquitto", plugin_options=files)
        self.metrics_port = free_port() if metrics else None
        self.broker.conf_path.write_text(self._generated_conf(files, options or {},
                                                              raw_options or {}))
        self.broker.start()

    @property
    def identity(self) -> Identity:
        return self.broker_member.identity

    def _generated_conf(self, files: dict[str, str], options: dict[str, str],
                        raw_options: dict[str, str]) -> str:
        """The configuration an operator gets from `tessera broker config` (``options``
        through its --plugin-opt), plus what a test broker needs (log file, no
        persistence, the user to stay) and ``raw_options`` as plugin_opt lines the CLI
        does not offer (the plugin parses them itself)."""
        out = self.directory / "tessera.conf"
        args = [str(Path(sys.executable).parent / "tessera"), "broker", "config",
                "--trust-domain", files["trust_domain"], "--bundle", files["bundle"],
                "--credential", files["credential"], "--key", files["key"],
                "--policy", files["policy"], "--audit-log", str(self.audit_path),
                "--listener", f"127.0.0.1:{self.broker.port}", "--user", "root",
                "-o", str(out)]
        for name, value in options.items():
            args += ["--plugin-opt", f"{name}={value}"]
        done = subprocess.run(args, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"tessera broker config failed: {done.stderr.strip()}")
        conf = out.read_text()
        extra = [f"plugin_opt_python {sys.executable}"]
        if "plugin_opt_python" in conf:
            extra = []
        if self.metrics_port is not None:
            extra.append(f"plugin_opt_metrics_port {self.metrics_port}")
        extra += [f"plugin_opt_{k} {v}" for k, v in raw_options.items()]
        # the plugin_opt lines apply to the last `plugin` line: keep them after it
        conf += "\n".join(extra) + "\n"
        conf += (f"log_dest file {self.broker.log_path}\nlog_type all\n"
                 "log_timestamp_format %Y-%m-%dT%H:%M:%S\npersistence false\n")
        return conf

    def close(self) -> None:
        self.broker.stop()

    # -- members and handshakes --------------------------------------------------------
    def member(self, name: str, kind: str = "device") -> Member:
        key = (kind, name)
        if key not in self.members:
            self.members[key] = self.fleet.member(kind, name)
        return self.members[key]

    def share_members(self, other: World) -> None:
        """Use the same devices (keys and credentials) as ``other``."""
        self.members = other.members

    def initiator(self, member: Member, peer: Identity | None = None) -> Initiator:
        return Initiator(signer=member.signer, credential=member.credential,
                         trust=self.fleet.trust, expected_peer=peer or self.identity)

    def msg1(self, member: Member, *, context: bytes = b"",
             peer: Identity | None = None) -> tuple[Initiator, bytes]:
        """A genuine msg1 of ``member`` for this broker, never sent: what an attacker on
        the path captures (and withholds) before the broker ever sees it."""
        ini = self.initiator(member, peer)
        return ini, ini.start(context=context)

    def open(self, source: str | None = None) -> m.Conn:
        return m.Conn.open("127.0.0.1", self.broker.port, source=source)

    def handshake(self, member: Member, *, client_id: str | None = None,
                  will: m.Will | None = None, props: m.Props = (),
                  initiator: Initiator | None = None, msg1: bytes | None = None,
                  timeout: float = 10.0) -> Handshake:
        """CONNECT msg1 -> AUTH 0x18 msg2 -> AUTH 0x18 msg3 -> CONNACK (docs/MQTT.md).
        Raises :class:`Refused` with what the broker did instead."""
        if initiator is None:
            initiator, msg1 = self.msg1(member)
        assert msg1 is not None
        conn = self.open()
        conn.send(m.connect(client_id or member.identity.uri, auth_method=AUTH_METHOD,
                            auth_data=msg1, will=will, props=props))
        hs = Handshake(conn, None, msg1)
        p = conn.read(timeout)
        if p is None or p.type != m.AUTH:
            conn.close()
            raise Refused(_what(p, conn), p)
        got = m.parse_auth(p)
        if got.reason != m.CONTINUE_AUTHENTICATION or got.method != AUTH_METHOD or not got.data:
            conn.close()
            raise Refused(f"AUTH reason {got.reason:#x} method {got.method}", p)
        hs.msg2 = got.data
        done = initiator.receive(got.data, time.monotonic(), now_policy())
        hs.msg3 = done.reply
        conn.send(m.auth(m.CONTINUE_AUTHENTICATION, AUTH_METHOD, done.reply))
        p = conn.read(timeout)
        if p is None or p.type != m.CONNACK:
            conn.close()
            raise Refused(_what(p, conn), p)
        hs.connack = m.parse_connack(p)
        if hs.connack.reason != m.SUCCESS:
            conn.close()
            raise Refused(f"CONNACK {hs.connack.reason:#x}", p)
        hs.session = done.session
        return hs

    # -- what the broker recorded ----------------------------------------------------------
    def audit(self) -> list[dict[str, Any]]:
        if not self.audit_path.exists():
            return []
        records = []
        for line in self.audit_path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue  # a line being written
        return records

    def audit_size(self) -> int:
        return sum(p.stat().st_size for p in self.directory.glob("audit.jsonl*"))

    def wait_audit(self, predicate: Callable[[dict[str, Any]], bool], start: int = 0,
                   timeout: float = 5.0, what: str = "") -> list[dict[str, Any]]:
        """Audit records from index ``start`` on, once one matches ``predicate``."""
        found: list[list[dict[str, Any]]] = []

        def check() -> bool:
            records = self.audit()[start:]
            found[:] = [records]
            return any(predicate(r) for r in records)

        wait_for(check, timeout, what or "an audit record")
        return found[0]

    def audit_fence(self, start: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Audit records from index ``start`` on, complete up to now: a probe device
        connects and its ``handshake_ok`` record is awaited (the audit writer keeps the
        order records were submitted in, so everything before it is written too)."""
        probe = self.member("pi-probe")
        hs = self.handshake(probe)
        hs.conn.send(m.disconnect())
        hs.conn.close()
        assert hs.session is not None
        sid = hs.session.session_id.hex()
        return self.wait_audit(
            lambda r: r.get("event") == "handshake_ok" and sid in json.dumps(r), start,
            timeout, "the probe's handshake_ok record")

    def log_mark(self) -> int:
        return len(self.broker.log_text())

    def wait_log(self, pattern: str, start: int, timeout: float = 5.0) -> str:
        rx = re.compile(pattern)
        seen: list[str] = []

        def check() -> bool:
            text = self.broker.log_text()[start:]
            seen[:] = [text]
            return rx.search(text) is not None

        wait_for(check, timeout, f"broker log /{pattern}/")
        return seen[0]

    def rss_kib(self) -> int:
        pid = self.broker.pid
        assert pid is not None
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def metrics(self) -> dict[str, float]:
        """Prometheus series -> value (``name{labels}`` as written)."""
        assert self.metrics_port is not None
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                try:
                    out[name] = float(value)
                except ValueError:
                    continue
        return out


def _what(p: m.Packet | None, conn: m.Conn) -> str:
    if p is None:
        return "connection closed" if conn.closed else "no answer"
    if p.type == m.CONNACK:
        return f"CONNACK {m.parse_connack(p).reason:#x}"
    if p.type == m.DISCONNECT:
        return f"DISCONNECT {m.parse_disconnect(p):#x}"
    return repr(p)


# ------------------------------------------------------------------ live device and sink


@dataclass
class Sink:
    """A back-end subscriber (broker-kind identity) on ``#``: records every delivery."""

    world: World
    name: str = "backend"
    filters: tuple[str, ...] = ("#",)
    got: list[m.Publish] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def start(self) -> Sink:
        hs = self.world.handshake(self.world.member(self.name, "broker"))
        self.conn = hs.conn
        self.session = hs.session
        self.conn.send(m.subscribe(1, [(f, 1) for f in self.filters]))
        suback = m.parse_suback(self.conn.expect(m.SUBACK))
        assert all(r < 0x80 for r in suback.reasons), suback
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sink", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            p = self.conn.read(0.2)
            if p is None:
                if self.conn.closed:
                    self.errors.append("sink connection closed")
                    return
                continue
            if p.type == m.PUBLISH:
                pub = m.parse_publish(p)
                with self._lock:
                    self.got.append(pub)
                if pub.qos == 1:
                    self.conn.send(m.ack(m.PUBACK, pub.packet_id))
                elif pub.qos == 2:
                    self.conn.send(m.ack(m.PUBREC, pub.packet_id))
            elif p.type == m.PUBREL:
                self.conn.send(m.ack(m.PUBCOMP, m.parse_ack(p).packet_id))
            elif p.type != m.PINGRESP:
                self.errors.append(f"sink got {p!r}")

    def mark(self) -> int:
        with self._lock:
            return len(self.got)

    def since(self, mark: int) -> list[m.Publish]:
        with self._lock:
            return list(self.got[mark:])

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.conn.send(m.disconnect())
        self.conn.close()


class LiveDevice:
    """A legitimate device publishing a numbered QoS 1 message every LIVE_PERIOD_S on
    its telemetry topic, on a connection that must survive every attack."""

    def __init__(self, world: World, name: str = "pi-live") -> None:
        self.world = world
        self.member = world.member(name)
        self.topic = f"devices/{name}/telemetry/live"
        self.sent: dict[int, int] = {}  # packet id -> message number
        self.acked: dict[int, int] = {}  # message number -> PUBACK reason
        self.numbers: list[int] = []  # message numbers published, in order
        self.unexpected: list[str] = []
        self.hs = world.handshake(self.member)
        self._fence: queue.SimpleQueue[threading.Event] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._next = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="live-device", daemon=True)

    @property
    def client_id(self) -> str:
        return self.member.identity.uri

    def start(self) -> LiveDevice:
        self._thread.start()
        return self

    def _publish(self) -> int:
        with self._lock:
            n = self._next
            self._next += 1
            pid = n % 65535 + 1
            self.sent[pid] = n
            self.numbers.append(n)
        assert self.hs.session is not None
        self.hs.conn.send(m.publish(self.topic, proven(self.hs.session, self.topic,
                                                       f"live-{n}".encode()),
                                    qos=1, packet_id=pid))
        return n

    def _run(self) -> None:
        conn = self.hs.conn
        next_at = time.monotonic()
        waiting: list[tuple[int, threading.Event]] = []
        while not self._stop.is_set():
            try:
                while True:
                    event = self._fence.get_nowait()
                    waiting.append((self._publish(), event))
            except queue.Empty:
                pass
            if time.monotonic() >= next_at:
                self._publish()
                next_at += LIVE_PERIOD_S
            p = conn.read(min(0.02, max(0.0, next_at - time.monotonic())))
            if p is None:
                if conn.closed:
                    self.unexpected.append("live connection closed")
                    return
                continue
            if p.type == m.PUBACK:
                a = m.parse_ack(p)
                with self._lock:
                    n = self.sent.pop(a.packet_id, -1)
                    self.acked[n] = a.reason
                for pending in [w for w in waiting if w[0] == n]:
                    waiting.remove(pending)
                    pending[1].set()
            elif p.type != m.PINGRESP:
                self.unexpected.append(f"{p!r} {p.body[:60]!r}")

    def publish_now(self, timeout: float = 5.0) -> int:
        """Publish one message at once and wait for its PUBACK; its number."""
        event = threading.Event()
        self._fence.put(event)
        assert event.wait(timeout), "the live device's fence publish was not acknowledged"
        with self._lock:
            return max(n for n in self.acked if n >= 0)

    def alive(self) -> bool:
        return self._thread.is_alive() and not self.hs.conn.closed

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.hs.conn.send(m.disconnect())
        self.hs.conn.close()


class Bystanders:
    """The live device and the sink, and the checks every attack ends with."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.sink = Sink(world).start()
        self.live = LiveDevice(world).start()
        self.checked_upto = -1

    def fence(self, timeout: float = 5.0) -> None:
        """Publish a live message now and wait until the sink has it: everything the
        broker queued to the sink before is in ``sink.got`` by then."""
        n = self.live.publish_now(timeout)
        payload = f"live-{n}".encode()
        wait_for(lambda: any(p.payload == payload for p in self.sink.since(0)), timeout,
                 f"the fence message live-{n} at the sink")

    def undisturbed(self) -> None:
        """The live device is still connected, every message it published was
        acknowledged 0x00 and delivered exactly once, and it was asked nothing."""
        self.fence()
        live = self.live
        assert live.alive(), f"the live device was disconnected: {live.unexpected}"
        assert not live.unexpected, f"the live device got {live.unexpected}"
        bad = {n: rc for n, rc in live.acked.items() if rc != 0}
        assert not bad, f"live messages refused: {bad}"
        delivered = [int(p.payload[5:]) for p in self.sink.since(0)
                     if p.topic == live.topic]
        assert len(delivered) == len(set(delivered)), "a live message was delivered twice"
        acked = {n for n in live.acked if n >= 0}
        missing = acked - set(delivered)
        assert not missing, f"acknowledged live messages never delivered: {sorted(missing)[:10]}"
        assert not self.sink.errors, self.sink.errors

    def routed(self, mark: int, marker: bytes | None = None,
               topic_prefix: str | None = None) -> list[m.Publish]:
        """Deliveries since ``mark`` that are not the live device's (after a fence)."""
        self.fence()
        out = [p for p in self.sink.since(mark) if p.topic != self.live.topic]
        if marker is not None:
            out = [p for p in out if marker in p.payload]
        if topic_prefix is not None:
            out = [p for p in out if p.topic.startswith(topic_prefix)]
        return out

    def stop(self) -> None:
        self.live.stop()
        self.sink.stop()


def rss_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


__all__ = ["AUTH_METHOD", "Bystanders", "Handshake", "LiveDevice", "Refused", "Sink",
           "World", "now_policy", "proven", "rss_of"]
