"""``python -m bench fleet``: a soak of many devices against three brokers behind HAProxy
(simulator.fleet.BrokerFleet: PostgreSQL registry and nonce table, the provisioning
service and its revocation feed, Mosquitto replicas with the plugin), then the scaling
figures.

Soak (issue 17, point 2): ``--devices`` devices, each with a real SA1 session through
the front, publish one QoS 1 message a second (``--rate``) for ``--seconds`` (a run
shorter than 3 minutes does the minute's events three times, evenly spread). A few
devices (``--tpm-devices``) are real ``tessera-agent run`` processes with their keys in
swtpm (each its own swtpm: TPM enrollment, EK certificate and activation), sending a
heartbeat at the same rate; the rest are driven by the load generator with software
keys; the output says how many of each. Every minute 1% of the devices reconnect (a new
handshake), 1% renew their credential at the provisioning service (then reconnect with
it), and one device is revoked (its session must be cut; revocation -> disconnect is
timed). A backend subscribed at every broker (the replicas share no subscriptions)
counts every message by device and sequence number: a message the broker acknowledged
(PUBACK < 0x80) and the backend never got is lost, one it got twice is duplicated. A
refused handshake or message of a device that was not revoked is a false reject. Before
the clock starts every device handshakes once at every broker directly, so that each
broker has seen each device (its per-device memory is bounded by the fleet's size and
would otherwise fill as devices move between replicas). Memory: the RSS of each broker,
of each agent process and of this process (the load generator and the backend, whose
duplicate bookkeeping grows by one byte per message by design) sampled every 10 s after
the first minute, with the least-squares slope in KiB per minute over the whole run and
over its second half (the target: brokers and agents flat).

The devices are raw MQTT 5 connections (bench.mqtt_wire) driven by a few threads,
because a paho client per device would cost the two shared cores more than the
brokers do. The load generator, the backend and the three brokers share this machine:
per-broker figures are lower bounds.

Scaling: handshakes/s and verified messages/s through one HAProxy front over 1, 2 and
3 of the brokers (the same fleet), with per-broker CPU per message; revocation ->
disconnect over ``--revocations`` devices spread over the brokers (median and max).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import random
import selectors
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .report import Report

TOPIC = "devices/{serial}/telemetry/soak"
#: the agent processes' heartbeat ({id}: the agent fills in its own name)
HEARTBEAT = "devices/{id}/telemetry/heartbeat"
#: targets from issue 17
TARGET_REVOCATION_MS = 1000.0
#: "memory flat": the RSS slope over the second half of the soak, per broker and per
#: agent process. Not zero: a broker's msg1 nonce table fills for its 600 s TTL
#: (about 350 B per handshake) and allocator noise is a few KiB a minute.
TARGET_FLAT_KIB_PER_MIN = 16.0
#: the flatness targets apply to soaks at least this long (the CI variants report the
#: slopes only)
MIN_FLAT_SECONDS = 300.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=600.0,
                        help="soak duration (default 600; 0: no soak)")
    parser.add_argument("--rate", type=float, default=1.0,
                        help="QoS 1 messages per device per second (default 1)")
    parser.add_argument("--tpm-devices", type=int, default=4,
                        help="devices whose key is in swtpm, one swtpm each (default 4)")
    parser.add_argument("--brokers", type=int, default=3)
    parser.add_argument("--drivers", type=int, default=4,
                        help="threads driving the devices (default 4)")
    parser.add_argument("--revocations", type=int, default=20,
                        help="devices revoked one by one for the latency figure")
    parser.add_argument("--no-scaling", action="store_true",
                        help="skip the 1/2/3-broker handshake and message figures")


def _progress(text: str) -> None:
    print(f"  {time.strftime('%H:%M:%S')} {text}", flush=True)


# -- processes -------------------------------------------------------------------------


def _rss_kib(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return float(line.split()[1])
    except OSError:
        pass
    return 0.0


def _cpu_s(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


def _slope_kib_per_min(samples: list[tuple[float, float]]) -> float:
    if len(samples) < 3:
        return 0.0
    xs = [t / 60.0 for t, _ in samples]
    ys = [v for _, v in samples]
    return float(statistics.linear_regression(xs, ys).slope)


# -- devices ---------------------------------------------------------------------------


@dataclass
class Device:
    serial: str
    enrolled: Any  # simulator.fleet.Enrolled
    conn: Any = None
    session: Any = None
    seq: int = 0
    packet_id: int = 0
    inflight: dict[int, int] = field(default_factory=dict)  # packet id -> seq
    #: one byte per sequence number: acknowledged (so that the bookkeeping does not
    #: grow the RSS whose slope is measured: 600 bytes per device for 10 minutes)
    acked: bytearray = field(default_factory=bytearray)
    rejected: int = 0
    next_at: float = 0.0
    revoking_at: float | None = None  # set by the revoker just before the call
    revoked: bool = False
    cut_ms: float | None = None
    work: str = ""  # "reconnect" | "renew": done by its driver when nothing is in flight


@dataclass
class Tally:
    handshakes: int = 0
    handshake_refusals: list[str] = field(default_factory=list)
    unexpected_disconnects: int = 0
    other_packets: int = 0
    reconnects: int = 0
    renewals: int = 0
    renew_errors: list[str] = field(default_factory=list)
    sent: int = 0


class Driver(threading.Thread):
    """Publishes for its devices on schedule and reads their PUBACKs."""

    def __init__(self, name: str, devices: list[Device], fleet: Any, rate: float,
                 tally: Tally, lock: threading.Lock) -> None:
        super().__init__(name=name, daemon=True)
        self.devices = devices
        self.fleet = fleet
        self.interval = 1.0 / rate
        self.tally = tally
        self.lock = lock
        self.stop = threading.Event()
        self.sel = selectors.DefaultSelector()
        self.publishing = threading.Event()
        self.publishing.set()

    def connect(self, d: Device) -> bool:
        from bench.mqtt_wire import sa1_connect
        from simulator.fleet import Member

        e = d.enrolled
        try:
            conn, session = sa1_connect(self.fleet.front_port, Member(e.signer, e.credential),
                                        self.fleet.trust, self.fleet.identity)
        except (ConnectionError, OSError) as exc:
            if d.revoking_at is None:
                with self.lock:
                    self.tally.handshake_refusals.append(f"{d.serial}: {exc}")
            return False
        conn.sock.setblocking(False)
        d.conn, d.session = conn, session
        self.sel.register(conn.sock, selectors.EVENT_READ, d)
        with self.lock:
            self.tally.handshakes += 1
        return True

    def drop(self, d: Device) -> None:
        if d.conn is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(d.conn.sock)
            with contextlib.suppress(OSError):
                d.conn.sock.setblocking(True)
                d.conn.sock.sendall(b"\xe0\x00")
            d.conn.sock.close()
        d.conn = d.session = None

    def publish(self, d: Device, now: float) -> None:
        from structauth.mqtt_binding import packet, seal
        from structauth.wire import var16

        topic = TOPIC.format(serial=d.serial)
        d.seq += 1
        d.packet_id = d.packet_id % 65535 + 1
        body = seal(d.session, topic, b"%d" % d.seq, now)
        data = packet(0x32, var16(topic.encode()) + d.packet_id.to_bytes(2, "big") + b"\x00"
                      + body)
        d.inflight[d.packet_id] = d.seq
        try:
            d.conn.sock.sendall(data)
        except (BlockingIOError, OSError):
            # a full socket buffer on loopback: retry blocking (rare); a dead one: EOF next
            with contextlib.suppress(OSError):
                d.conn.sock.setblocking(True)
                d.conn.sock.sendall(data)
                d.conn.sock.setblocking(False)
        with self.lock:
            self.tally.sent += 1

    def read(self, d: Device) -> None:
        from bench.mqtt_wire import _split

        conn = d.conn
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.lost(d)
            return
        conn.buf += data
        while True:
            got = _split(conn.buf)
            if got is None:
                return
            first, at, end = got
            body = bytes(conn.buf[at:end])
            del conn.buf[:end]
            if first >> 4 == 4:  # PUBACK
                pid = int.from_bytes(body[:2], "big")
                rc = body[2] if len(body) > 2 else 0
                seq = d.inflight.pop(pid, None)
                if seq is not None:
                    if rc < 0x80:
                        _mark(d.acked, seq)
                    else:
                        d.rejected += 1
            else:
                with self.lock:
                    self.tally.other_packets += 1

    def lost(self, d: Device) -> None:
        self.drop(d)
        if d.revoking_at is not None:
            d.revoked = True
            d.cut_ms = (time.monotonic() - d.revoking_at) * 1000
            d.inflight.clear()  # not acknowledged: neither counted nor expected
            return
        with self.lock:
            self.tally.unexpected_disconnects += 1
        d.inflight.clear()
        self.connect(d)

    def do_work(self, d: Device) -> None:
        from device.provisioner import ProvisionerClient, renew

        work, d.work = d.work, ""
        if work == "renew":
            try:
                issued = renew(ProvisionerClient(self.fleet.service.url), d.enrolled.signer,
                               d.serial)
                from structauth.credentials import Credential

                pem = issued["operational_credential"].encode()
                d.enrolled.credential = Credential.from_pem(pem)
                d.enrolled.credential_pem = pem
                with self.lock:
                    self.tally.renewals += 1
            except Exception as exc:
                with self.lock:
                    self.tally.renew_errors.append(f"{d.serial}: {exc}")
        self.drop(d)
        if self.connect(d):
            with self.lock:
                self.tally.reconnects += 1

    def run(self) -> None:
        start = time.monotonic()
        for i, d in enumerate(self.devices):  # spread over the second
            d.next_at = start + self.interval * i / max(1, len(self.devices))
        while not self.stop.is_set():
            now = time.monotonic()
            wake = now + self.interval
            for d in self.devices:
                if d.revoked or d.conn is None:
                    continue
                if d.work and not d.inflight and d.revoking_at is None:
                    self.do_work(d)
                    continue
                if self.publishing.is_set() and now >= d.next_at and d.revoking_at is None:
                    self.publish(d, now)
                    d.next_at += self.interval
                    if d.next_at < now:  # fell behind (a slow handshake): no burst
                        d.next_at = now + self.interval
                wake = min(wake, d.next_at)
            timeout = max(0.0, min(wake - time.monotonic(), 0.05))
            for key, _ in self.sel.select(timeout):
                d = key.data
                if d.conn is not None and key.fileobj is d.conn.sock:
                    self.read(d)

    def settle(self, timeout: float) -> None:
        """Wait (from another thread) until no message is in flight."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not any(d.inflight for d in self.devices if not d.revoked):
                return
            time.sleep(0.05)


# -- the soak ----------------------------------------------------------------------------


def _mark(counts: bytearray, i: int) -> None:
    """counts[i] += 1 (at most 255), growing the array as needed."""
    if i >= len(counts):
        counts.extend(bytes(max(1024, i + 1 - len(counts))))
    if counts[i] < 255:
        counts[i] += 1


def _backend(fleet: Any, name: str, beats: dict[str, set[bytes]] | None = None
             ) -> tuple[list[Any], dict[str, bytearray], threading.Lock]:
    """Subscribers at every broker counting the soak's numbered messages by device
    (and, into ``beats``, the agents' heartbeats, by payload: each is a timestamp)."""
    got: dict[str, bytearray] = collections.defaultdict(bytearray)
    lock = threading.Lock()

    def on_message(topic: str, payload: bytes) -> None:
        serial = topic.split("/")[1]
        with lock:
            if topic.endswith("/heartbeat"):
                if beats is not None:
                    beats.setdefault(serial, set()).add(payload)
            else:
                _mark(got[serial], int(payload))

    backend = fleet.enroll(name, kind="broker")
    subs = []
    for port in fleet.broker_ports:
        c = fleet.client(backend, port=port)
        c.connect()
        c.subscribe("devices/+/telemetry/soak", on_message, qos=1, proven=False)
        if beats is not None:
            c.subscribe("devices/+/telemetry/heartbeat", on_message, qos=1, proven=False)
        subs.append(c)
    return subs, got, lock


def soak(report: Report, fleet: Any, *, devices: int, seconds: float, rate: float,
         tpms: list[Any], drivers: int, workdir: Path) -> None:
    tpm_devices = len(tpms)
    agents: list[subprocess.Popen[bytes]] = []
    beats: dict[str, set[bytes]] = {}
    try:
        _progress(f"enrolling {devices - tpm_devices} devices with software keys and "
                  f"{tpm_devices} with keys in swtpm (TPM enrollment), those run as "
                  "tessera-agent processes")
        agent_states = [_tpm_agent(fleet, tpm, i, rate, workdir) for i, tpm in enumerate(tpms)]
        fleet_devices: list[Device] = []
        with ThreadPoolExecutor(4) as pool:
            soft = list(pool.map(lambda i: fleet.enroll(f"soak-{i:04d}"),
                                 range(devices - tpm_devices)))
        fleet_devices += [Device(e.serial, e) for e in soft]
        subs, got, got_lock = _backend(fleet, "soak-backend", beats)
        agent_bin = str(Path(sys.executable).with_name("tessera-agent"))
        agents_t0 = time.monotonic()
        for state in agent_states:
            with open(state / "agent.log", "ab") as log:
                agents.append(subprocess.Popen(
                    [agent_bin, "run", "--config", str(state / "agent.toml"),
                     "--log-level", "warning"], stdout=log, stderr=log,
                    stdin=subprocess.DEVNULL))
        tally, lock = Tally(), threading.Lock()
        groups = [fleet_devices[i::drivers] for i in range(drivers)]
        workers = [Driver(f"soak-driver-{i}", g, fleet, rate, tally, lock)
                   for i, g in enumerate(groups)]
        # before the front connections: a visit to a device's home broker would take
        # its client id over and cut its session
        visits = _visit_every_broker(fleet, fleet_devices)
        _progress(f"every device handshook once at every broker directly ({visits} "
                  "handshakes): the steady state of per-device memory")
        _progress(f"connecting {devices} devices through the front")
        t0 = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda wd: wd[0].connect(wd[1]),
                          [(w, d) for w in workers for d in w.devices]))
        connect_s = time.monotonic() - t0
        homes = collections.Counter(
            i for i in range(fleet.count) for _ in range(int(fleet.metric(
                i, "tessera_active_sessions"))))
        _progress(f"connected in {connect_s:.1f} s; sessions per broker (with the backend) "
                  f"{[homes[i] for i in range(fleet.count)]}; publishing for {seconds:g} s")
        cpu0 = [_cpu_s(b.pid) for b in fleet.brokers]
        verified0 = sum(fleet.metric(i, 'tessera_messages_total{direction="in"}')
                        for i in range(fleet.count))
        for w in workers:
            w.start()
        rng = random.Random(2026)
        memory: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
        start = time.monotonic()
        # every minute (a bounded run: three times in all), and memory every 10 s after
        # the first minute (a bounded run: after the first quarter)
        period = 60.0 if seconds >= 180 else seconds / 3
        sample_every = 10.0 if seconds >= 180 else seconds / 12
        next_minute = start + period
        next_sample = start + min(60.0, seconds / 4)
        revoked: list[Device] = []
        while time.monotonic() - start < seconds:
            now = time.monotonic()
            if now >= next_sample:
                next_sample += sample_every
                for i, b in enumerate(fleet.brokers):
                    memory[f"broker-{i}"].append((now - start, _rss_kib(b.pid)))
                for i, a in enumerate(agents):
                    memory[f"agent-{i}"].append((now - start, _rss_kib(a.pid)))
                memory["load generator"].append((now - start, _rss_kib(os.getpid())))
            if now >= next_minute:
                next_minute += period
                live = [d for d in fleet_devices
                        if not d.revoked and d.revoking_at is None and not d.work]
                picks = rng.sample(live, min(len(live), max(1, devices // 100) * 2 + 1))
                for d in picks[: max(1, devices // 100)]:
                    d.work = "reconnect"
                for d in picks[max(1, devices // 100): -1]:
                    d.work = "renew"
                victim = picks[-1]
                if len(picks) > 2:
                    victim.revoking_at = time.monotonic()
                    fleet.revoke(victim.serial, "soak")
                    revoked.append(victim)
                done = int(now - start)
                _progress(f"{done} s: sent {tally.sent:,}, handshakes {tally.handshakes}, "
                          f"renewals {tally.renewals}, revoked {len(revoked)}")
            time.sleep(0.2)
        for w in workers:
            w.publishing.clear()
        for w in workers:
            w.settle(15.0)
        elapsed = time.monotonic() - start
        cpu1 = [_cpu_s(b.pid) for b in fleet.brokers]
        verified1 = sum(fleet.metric(i, 'tessera_messages_total{direction="in"}')
                        for i in range(fleet.count))
        time.sleep(2.0)  # the backend's last deliveries
        for w in workers:
            w.stop.set()
        for w in workers:
            w.join(10)
        with got_lock:
            received = {s: bytes(c) for s, c in got.items()}
        lost = dup = acked = 0
        for d in fleet_devices:
            counts = received.get(d.serial, b"")
            acked_seqs = [i for i, n in enumerate(d.acked) if n]
            acked += len(acked_seqs)
            lost += sum(1 for i in acked_seqs if i >= len(counts) or counts[i] == 0)
            dup += sum(n - 1 for n in counts if n > 1)
        false_rejects = len(tally.handshake_refusals) + sum(
            d.rejected for d in fleet_devices if d.revoking_at is None)
        cut = [d.cut_ms for d in revoked if d.cut_ms is not None]
        agent_exits = _stop_agents(agents)
        agents_s = time.monotonic() - agents_t0
        agent_handshakes = collections.Counter(  # the brokers' audit: connects + re-auths
            str(r.get("identity", "")).rsplit("/", 1)[-1]
            for i in range(fleet.count) for r in fleet.audit(i, "handshake_ok"))
        with got_lock:
            heartbeats = {serial: len(p) for serial, p in beats.items()}
        for c in subs:
            c.close()
        for w in workers:
            for d in w.devices:
                w.drop(d)
    finally:
        _stop_agents(agents)
    detail = (f"{devices} devices ({tpm_devices} tessera-agent processes with keys in "
              f"swtpm, {devices - tpm_devices} load-generator devices with software keys), "
              f"{rate:g} msg/s each, {elapsed:.0f} s")
    report.rate("soak_sent", "soak: QoS 1 messages sent", tally.sent, "msgs", detail)
    report.rate("soak_acked", "soak: acknowledged by a broker", acked, "msgs")
    report.rate("soak_msgs_per_s", "soak: verified messages/s (3 brokers)",
                (verified1 - verified0) / elapsed, "/s",
                "tessera_messages_total{direction=in} summed over the brokers")
    report.rate("soak_lost", "soak: acknowledged but never at the backend", lost, "msgs")
    report.rate("soak_duplicated", "soak: duplicated at the backend", dup, "msgs")
    report.rate("soak_false_rejects", "soak: false rejects (handshakes + messages)",
                false_rejects, "count")
    report.rate("soak_handshakes", "soak: handshakes (connect, reconnect, renewal)",
                tally.handshakes, "count", f"{tally.reconnects} reconnects, "
                f"{tally.renewals} renewals")
    report.rate("soak_unexpected_disconnects", "soak: unexpected disconnects",
                tally.unexpected_disconnects, "count")
    if cut:
        report.rate("soak_revocation_cut_max_ms", "soak: revocation -> session cut, max",
                    max(cut), "ms", f"{len(cut)} of {len(revoked)} revoked devices cut")
    for i, (c0, c1) in enumerate(zip(cpu0, cpu1, strict=True)):
        report.rate(f"soak_broker{i}_cpu_pct", f"soak: broker-{i} CPU",
                    100 * (c1 - c0) / elapsed, "%", "of one core")
    halves = {}
    for name, samples in sorted(memory.items()):
        first = samples[0][1] if samples else 0.0
        last = samples[-1][1] if samples else 0.0
        key = name.replace(" ", "_")
        report.rate(f"soak_rss_slope_{key}", f"soak: RSS slope {name}",
                    _slope_kib_per_min(samples), "KiB/min",
                    f"{first / 1024:.1f} -> {last / 1024:.1f} MiB over {len(samples)} samples")
        halves[name] = _slope_kib_per_min(samples[len(samples) // 2:])
        report.rate(f"soak_rss_slope2_{key}", f"soak: RSS slope {name}, second half",
                    halves[name], "KiB/min")
    for name, slope in halves.items():  # a slope over a few minutes says nothing
        if name.startswith(("broker-", "agent-")) and elapsed >= MIN_FLAT_SECONDS:
            report.target(f"soak_flat_{name}", f"{name} memory flat (second-half RSS slope)",
                          slope, "<=", TARGET_FLAT_KIB_PER_MIN, "KiB/min")
    for i, state in enumerate(agent_states):
        serial = state.name.removeprefix("agent-")
        report.rate(f"soak_agent{i}_heartbeats", f"soak: {serial} heartbeats at the backend",
                    heartbeats.get(serial, 0), "msgs",
                    f"one every {1 / rate:g} s over the agent's {agents_s:.0f} s; "
                    f"{agent_handshakes[serial]} handshakes; exit status {agent_exits[i]}")
    report.target("soak_lost", "lost QoS 1 messages", lost, "<=", 0, "msgs")
    report.target("soak_duplicated", "duplicated QoS 1 messages", dup, "<=", 0, "msgs")
    report.target("soak_false_rejects", "false rejects", false_rejects, "<=", 0, "count")
    if tally.handshake_refusals or tally.renew_errors:
        report.note("refused handshakes / renewal errors: "
                    f"{(tally.handshake_refusals + tally.renew_errors)[:5]}")
    report.info["soak"] = {
        "devices": devices, "tpm_devices": tpm_devices, "software_devices": devices - tpm_devices,
        "rate_per_device": rate, "seconds": round(elapsed, 1), "sent": tally.sent,
        "acked": acked, "lost": lost, "duplicated": dup, "false_rejects": false_rejects,
        "handshakes": tally.handshakes, "reconnects": tally.reconnects,
        "renewals": tally.renewals, "revoked": len(revoked),
        "revocation_cut_ms": [round(x, 1) for x in cut],
        "unexpected_disconnects": tally.unexpected_disconnects,
        "other_packets": tally.other_packets,
        "rss_kib": {k: [round(v) for _, v in s] for k, s in memory.items()},
        "rss_slope_kib_per_min": {k: round(_slope_kib_per_min(s), 1)
                                  for k, s in memory.items()},
        "rss_slope_second_half_kib_per_min": {k: round(v, 1) for k, v in halves.items()},
        "agents": {"processes": len(agents), "heartbeats": heartbeats,
                   "handshakes": {s.name.removeprefix("agent-"):
                                  agent_handshakes[s.name.removeprefix("agent-")]
                                  for s in agent_states},
                   "exit_status": agent_exits},
    }


def _visit_every_broker(fleet: Any, devices: list[Device]) -> int:
    """One handshake (and DISCONNECT) of every device at every broker, straight to its
    port. A broker keeps some state per device it has seen (the verified chain, rate
    and network memory: docs/SCALING.md), bounded by the fleet's size; through the
    front, a reconnecting device lands on a broker that may not have seen it yet, so
    without this the soak would measure the fleet's slow spread over the replicas
    rather than whether anything grows once every broker knows every device."""
    from bench.mqtt_wire import sa1_connect
    from simulator.fleet import Member

    def visit(job: tuple[Device, int]) -> None:
        d, port = job
        e = d.enrolled
        conn, _ = sa1_connect(port, Member(e.signer, e.credential), fleet.trust,
                              fleet.identity)
        with contextlib.suppress(OSError):
            conn.sock.sendall(b"\xe0\x00")
        conn.sock.close()

    jobs = [(d, port) for d in devices for port in fleet.broker_ports]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(visit, jobs))
    return len(jobs)


def _tpm_agent(fleet: Any, tpm: Any, i: int, rate: float, workdir: Path) -> Path:
    """Enroll a device whose key is in ``tpm`` (EK certificate, activation) and write
    the state directory a ``tessera-agent run`` process uses: ``<workdir>/agent-<serial>``
    with agent.toml (the front, a heartbeat at ``rate``, a re-handshake a minute)."""
    from hw.tpm import TpmBackend

    serial = f"tpm-{i:03d}"
    key_dir = workdir / f"tpm-keys-{i}"
    with TpmBackend(tpm.tcti, key_dir) as backend:  # closed: the agent opens the TPM
        enrolled = fleet.enroll_tpm(serial, backend)
    state = workdir / f"agent-{serial}"
    fleet.agent_config(enrolled, state,
                       key={"backend": "tpm", "tcti": tpm.tcti, "key_dir": str(key_dir)},
                       heartbeat=f'topic = "{HEARTBEAT}"\ninterval_s = {1.0 / rate:g}',
                       # a re-handshake in the live connection a minute into each
                       # (one-hour) session: the agent's memory is measured across them
                       session="rehandshake_margin_s = 3540")
    return state


def _stop_agents(agents: list[subprocess.Popen[bytes]]) -> list[int | None]:
    """SIGTERM each agent process (SIGKILL after 15 s); their exit statuses."""
    for a in agents:
        if a.poll() is None:
            a.terminate()
    statuses: list[int | None] = []
    for a in agents:
        try:
            statuses.append(a.wait(15))
        except subprocess.TimeoutExpired:
            a.kill()
            statuses.append(a.wait())
    return statuses


# -- scaling and revocation latency -------------------------------------------------------


def scaling(report: Report, fleet: Any, workdir: Path, quick: bool) -> None:
    """Handshakes/s and verified messages/s through a front over 1, 2, 3 brokers."""
    from bench.mqtt_wire import sa1_connect
    from simulator.fleet import HAProxy, Member
    from structauth.mqtt_binding import packet, seal
    from structauth.wire import var16

    n_hs = 60 if quick else 300
    blast_s = 3.0 if quick else 8.0
    members = [fleet.enroll(f"scale-{i:03d}") for i in range(12)]
    figures: dict[int, Any] = {}
    for k in range(1, fleet.count + 1):
        front = HAProxy(workdir / f"haproxy-{k}", fleet.broker_ports[:k]).start()
        try:
            # handshakes: 8 connectors, every connection closed after its CONNACK
            def one(i: int, port: int = front.port) -> None:
                m = members[i % len(members)]
                conn, _ = sa1_connect(port, Member(m.signer, m.credential), fleet.trust,
                                      fleet.identity)
                conn.close()

            cpu0 = [_cpu_s(b.pid) for b in fleet.brokers[:k]]
            t0 = time.monotonic()
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(one, range(n_hs)))
            hs_rate = n_hs / (time.monotonic() - t0)
            hs_cpu = sum(_cpu_s(b.pid) for b in fleet.brokers[:k]) - sum(cpu0)
            # messages: one connection per device (12, spread by the front), QoS 0 as
            # fast as 3 threads can prove them
            conns = []
            for m in members:
                conn, session = sa1_connect(front.port, Member(m.signer, m.credential),
                                            fleet.trust, fleet.identity)
                conns.append((m, conn, session))
            v0 = [fleet.metric(i, 'tessera_messages_total{direction="in"}') for i in range(k)]
            cpu0 = [_cpu_s(b.pid) for b in fleet.brokers[:k]]
            stop = time.monotonic() + blast_s

            def blast(part: list[tuple[Any, Any, Any]], stop: float = stop) -> None:
                while time.monotonic() < stop:
                    for m, conn, session in part:
                        topic = f"devices/{m.serial}/telemetry/blast"
                        body = seal(session, topic, b"x" * 64, time.monotonic())
                        conn.sock.sendall(packet(0x30, var16(topic.encode()) + b"\x00" + body))

            t0 = time.monotonic()
            threads = [threading.Thread(target=blast, args=(conns[i::3],)) for i in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            time.sleep(0.5)  # the brokers drain their sockets
            wall = time.monotonic() - t0
            verified = [fleet.metric(i, 'tessera_messages_total{direction="in"}') - v0[i]
                        for i in range(k)]
            cpu = [_cpu_s(b.pid) - c for b, c in zip(fleet.brokers[:k], cpu0, strict=True)]
            for _, conn, _ in conns:
                conn.close()
        finally:
            front.stop()
        total = sum(verified)
        figures[k] = {"handshakes_per_s": round(hs_rate, 1),
                      "broker_cpu_ms_per_handshake": round(1000 * hs_cpu / n_hs, 2),
                      "verified_per_s": round(total / wall, 1),
                      "per_broker_verified": [int(v) for v in verified],
                      "broker_cpu_us_per_msg": round(1e6 * sum(cpu) / total, 1) if total else 0}
        report.rate(f"handshakes_per_s_{k}", f"handshakes/s through the front, {k} broker(s)",
                    hs_rate, "/s", f"{n_hs} handshakes, 8 connectors; broker CPU "
                    f"{1000 * hs_cpu / n_hs:.2f} ms each")
        report.rate(f"verified_per_s_{k}", f"verified msgs/s, {k} broker(s)", total / wall,
                    "/s", f"QoS 0, 64 B, 12 devices, 3 sender threads; broker CPU "
                    f"{figures[k]['broker_cpu_us_per_msg']} µs/msg")
    base = figures[1]
    for k in range(2, fleet.count + 1):
        for key in ("handshakes_per_s", "verified_per_s"):
            ratio = figures[k][key] / base[key] if base[key] else 0.0
            report.ratios[f"{key}_{k}_over_1"] = ratio
    report.info["scaling"] = figures


def renewals(report: Report, fleet: Any, quick: bool) -> None:
    """Credential renewals/s at the provisioning service on PostgreSQL (challenge,
    proof, a new credential signed by the SoftHSM2 authority, the registry rows), 8
    clients at once. The service limits anonymous renewal challenges per source address
    (a bucket of 10 refilled at 0.5/s) and every client here is 127.0.0.1: only the
    bucket's 10 are timed, so the figure is rough."""
    from device.provisioner import ProvisionerClient, renew

    devices = [fleet.enroll(f"renew-{i:03d}") for i in range(10)]
    client = ProvisionerClient(fleet.service.url)
    limited = 0

    def one(i: int) -> None:
        nonlocal limited
        d = devices[i]
        for _ in range(10):
            try:
                renew(client, d.signer, d.serial)
                return
            except Exception as exc:
                if "too many renewal challenges" not in str(exc):
                    raise
                limited += 1
                time.sleep(2.0)

    t0 = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(len(devices))))
    wall = time.monotonic() - t0
    report.rate("renewals_per_s", "renewals/s (provisioning service on PostgreSQL)",
                len(devices) / wall, "/s", f"{len(devices)} renewals, 8 clients, one source "
                f"address (the service's per-source limit: burst 10, then 0.5/s; "
                f"{limited} waits)")


def revocation_latency(report: Report, fleet: Any, count: int) -> None:
    """``count`` devices, spread over the brokers directly, revoked one by one: revoke
    call -> EOF on the device's socket."""
    from bench.mqtt_wire import sa1_connect
    from simulator.fleet import Member

    enrolled = [fleet.enroll(f"rvl-{i:03d}") for i in range(count)]
    latencies: list[float] = []
    missed = 0
    gaps = random.Random(17).uniform
    for i, e in enumerate(enrolled):
        port = fleet.broker_ports[i % fleet.count]
        conn, _ = sa1_connect(port, Member(e.signer, e.credential), fleet.trust,
                              fleet.identity)
        conn.sock.settimeout(5.0)
        t0 = time.monotonic()
        fleet.revoke(e.serial, "bench")
        try:
            while conn.sock.recv(65536):
                pass
            latencies.append((time.monotonic() - t0) * 1000)
        except TimeoutError:
            missed += 1
        except OSError:
            latencies.append((time.monotonic() - t0) * 1000)
        conn.sock.close()
        time.sleep(gaps(0.05, 0.3))  # land anywhere in the brokers' ticks
    worst = max(latencies) if not missed else 5000.0
    report.rate("revocation_median_ms", "revocation -> disconnect, median (3 brokers)",
                statistics.median(latencies) if latencies else 0.0, "ms",
                f"{count} devices, round-robin over the brokers; includes the revoke call")
    report.rate("revocation_max_ms", "revocation -> disconnect, max", worst, "ms",
                f"{missed} not cut within 5 s" if missed else "")
    report.target("revocation_max", "revocation -> disconnect at any broker, worst", worst,
                  "<=", TARGET_REVOCATION_MS, "ms")
    report.info["revocation_ms"] = [round(x, 1) for x in latencies]


def run(args: argparse.Namespace) -> int:
    from simulator.fleet import BrokerFleet

    devices, seconds, tpm_devices, revocations = (args.devices, args.seconds,
                                                  args.tpm_devices, args.revocations)
    if args.quick:
        devices, seconds = min(devices, 30), min(seconds, 20.0)
        tpm_devices, revocations = min(tpm_devices, 1), min(revocations, 5)
    if not 0 <= tpm_devices <= devices or devices < 2:
        print("bench fleet: --devices must be >= 2 and --tpm-devices 0 .. --devices")
        return 2
    report = Report("fleet", quick=args.quick)
    report.note("load generator, backend and brokers share this 2-core machine with other "
                "work: the figures are lower bounds, noisy")
    with tempfile.TemporaryDirectory(prefix="tessera-fleet-") as tmp:
        work = Path(tmp)
        from simulator.swtpm import Swtpm

        # one swtpm per TPM device (an EK is enrolled once), each with its own maker CA
        tpms = [Swtpm(work / f"swtpm-{i}").start() for i in range(tpm_devices)]
        roots = tuple(path for t in tpms for path in t.manufacturer_ca_paths)
        _progress(f"starting the fleet: PostgreSQL, provisioning service, {args.brokers} "
                  "brokers, HAProxy")
        try:
            with BrokerFleet(work / "fleet", args.brokers, maker_roots=roots,
                             broker_options={"pending_max": str(max(4096, 2 * devices))}
                             ) as fleet:
                if not args.no_scaling:
                    _progress("scaling: handshakes and messages through 1, 2, 3 brokers")
                    scaling(report, fleet, work, args.quick)
                _progress("renewals on PostgreSQL")
                renewals(report, fleet, args.quick)
                _progress(f"revocation latency over {revocations} devices")
                revocation_latency(report, fleet, revocations)
                if seconds > 0:
                    soak(report, fleet, devices=devices, seconds=seconds, rate=args.rate,
                         tpms=tpms, drivers=args.drivers, workdir=work)
        finally:
            for t in tpms:
                t.close()
    print(report.table())
    if args.json:
        print(report.json_line())
    return 0
