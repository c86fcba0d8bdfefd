"""``python -m bench drift``: a fleet of agents whose clocks drift and step, through a
real Mosquitto with the Tessera plugin (issue 11, item 11).

Each device runs the real agent (device/agent.py, MQTT client device/mqtt.py) with an
injected monotonic clock: some run 5 % fast or slow, some step by +/-10 epochs once or
twice, some both, one in seven is exact. Sessions are short (``session_epoch_ms`` 100,
``session_lifetime_s`` 10 by default) so a run covers several session lifetimes and
many epochs of drift in seconds. Every device publishes numbered QoS 1 messages at a
steady rate; one back-end subscriber counts what arrives. At the end (publishing
stopped, buffers and in-flight messages settled) the run reports, per fleet:

* lost: numbered messages published and never delivered;
* duplicated: delivered more than once;
* quarantines and lockouts: ``quarantined`` audit records, devices refused a handshake
  or not connected at the end;
* what the resynchronisation did: the broker's epoch refusals (none counted toward
  quarantine), its ``tessera/resync`` requests, the agents' re-handshakes, resends,
  reconnects.

The device keys are software keys (``InsecureSoftwareSigner``): a TPM signature per
resync would measure the TPM, not the protocol. tests/test_drift.py runs the same
fleet bounded (20 devices) in CI; this is the issue's 200-device version.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as dt
import json
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .report import Report

#: the broker refuses a message for its epoch past this many epochs of disagreement
SKEW_EPOCHS = 2


class DeviceClock:
    """A device's monotonic clock: real time scaled by ``rate`` plus steps
    (``(after_s, delta_s)``: ``after_s`` real seconds after :meth:`start_steps` the
    clock reads ``delta_s`` more). Starts at ``base`` so a step back never reads below
    0."""

    def __init__(self, rate: float = 1.0, steps: tuple[tuple[float, float], ...] = (),
                 base: float = 10_000.0, real: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.steps = steps
        self.base = base
        self.real = real
        self.t0 = real()
        self.steps_from: float | None = None

    def start_steps(self, at: float) -> None:
        self.steps_from = at

    def __call__(self) -> float:
        now = self.real()
        reading = self.base + (now - self.t0) * self.rate
        if self.steps_from is not None:
            since = now - self.steps_from
            reading += sum(delta for at, delta in self.steps if since >= at)
        return reading

    def describe(self) -> str:
        parts = [f"{(self.rate - 1) * 100:+.0f}%"] if self.rate != 1 else []
        parts += [f"{delta:+g}s@{at:g}s" for at, delta in self.steps]
        return " ".join(parts) or "exact"


def profile(index: int, seconds: float, drift: float, step_s: float) -> DeviceClock:
    """The clock of device ``index``: seven profiles in turn."""
    kind = index % 7
    rate = {0: 1 + drift, 1: 1 - drift, 4: 1 + drift, 5: 1 - drift}.get(kind, 1.0)
    steps: tuple[tuple[float, float], ...] = {
        2: ((0.25 * seconds, step_s), (0.6 * seconds, step_s)),
        3: ((0.25 * seconds, -step_s), (0.6 * seconds, -step_s)),
        4: ((0.4 * seconds, -step_s),),
        5: ((0.4 * seconds, step_s),),
    }.get(kind, ())
    return DeviceClock(rate, steps)


@dataclass
class DriftResult:
    devices: int
    seconds: float
    epoch_ms: int
    lifetime_s: int
    drift: float
    step_epochs: int
    sent: int = 0
    delivered: int = 0
    lost: int = 0
    duplicated: int = 0
    quarantined: int = 0
    #: quarantined, or not connected at the end
    lockouts: int = 0
    handshakes_refused: int = 0
    reconnects: int = 0
    resyncs: int = 0
    resent: int = 0
    requeued: int = 0
    refused_dropped: int = 0
    epoch_refusals: int = 0
    counted_rejections: int = 0
    uncounted_rejections: int = 0
    resync_requests: int = 0
    settle_s: float = 0.0
    per_device: dict[str, dict[str, Any]] = field(default_factory=dict)

    def ok(self) -> bool:
        return (self.lost == 0 and self.duplicated == 0 and self.quarantined == 0
                and self.lockouts == 0)


def run_fleet(directory: Path, *, devices: int = 20, seconds: float = 30.0,
              epoch_ms: int = 100, lifetime_s: int = 10, margin_s: float = 2.5,
              drift: float = 0.05, step_epochs: int = 10, rate_hz: float = 10.0,
              quarantine_rejections: int = 5, settle_timeout_s: float = 60.0,
              extra_options: dict[str, str] | None = None,
              progress: Callable[[str], None] = lambda text: None) -> DriftResult:
    """Run the fleet through a real Mosquitto in ``directory``; see the module doc."""
    from cryptography.hazmat.primitives.serialization import Encoding

    from device.agent import Agent, AgentConfig
    from device.mqtt import TesseraMqttClient
    from hw.software import InsecureSoftwareSigner
    from simulator.fleet import Fleet
    from simulator.mosquitto import Mosquitto, plugin_files

    fleet = Fleet(t0=dt.datetime.now(dt.UTC) - dt.timedelta(days=1))
    broker_key = InsecureSoftwareSigner.generate()
    broker = fleet.member("broker", "mqtt-1", signer=broker_key)
    options = plugin_files(
        directory / "broker", trust_domain=fleet.trust_domain,
        bundle_pem=fleet.root.public_bytes(Encoding.PEM),
        credential_pem=broker.credential.chain[0].public_bytes(Encoding.PEM),
        key=f"insecure-software:{broker_key.save(directory / 'broker-key.pem')}",
        audit_log=str(directory / "audit.jsonl"),
        session_epoch_ms=str(epoch_ms), session_lifetime_s=str(lifetime_s),
        session_skew_epochs=str(SKEW_EPOCHS),
        quarantine_rejections=str(quarantine_rejections), quarantine_window_s="300",
        resync_interval_s="0.5", step_up_rate_spike="off",
        # every simulated device connects from 127.0.0.1: the default bound of 16
        # pending handshakes per source would evict concurrent rotations of the fleet
        pending_per_source="4096", pending_max="4096", **(extra_options or {}))
    result = DriftResult(devices, seconds, epoch_ms, lifetime_s, drift, step_epochs)
    step_s = step_epochs * epoch_ms / 1000.0
    got: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)
    lock = threading.Lock()

    def on_message(topic: str, payload: bytes) -> None:
        name = topic.split("/")[1]
        with lock:
            got[name][int(payload)] += 1

    with Mosquitto(directory / "mosquitto", plugin_options=options) as mosquitto:
        archive = fleet.member("broker", "archive")
        subscriber = TesseraMqttClient(
            signer=archive.signer, credential=archive.credential, trust=fleet.trust,
            host="127.0.0.1", port=mosquitto.port, broker=broker.identity)
        subscriber.connect()
        subscriber.subscribe("devices/+/telemetry/#", on_message, qos=1, proven=False)
        stop = threading.Event()

        def keep_subscriber() -> None:  # an exact clock: re-handshake before each end
            while not stop.wait(max(0.5, lifetime_s - margin_s)):
                try:
                    subscriber.reauthenticate()
                except Exception as exc:  # counted: the subscriber would miss messages
                    progress(f"subscriber re-handshake failed: {exc}")

        keeper = threading.Thread(target=keep_subscriber, name="drift-subscriber",
                                  daemon=True)
        keeper.start()
        agents: list[tuple[str, Any, DeviceClock]] = []
        try:
            for i in range(devices):
                name = f"drift-{i:03d}"
                member = fleet.member("device", name)
                state = directory / "devices" / name
                state.mkdir(parents=True)
                (state / "operational.pem").write_bytes(
                    member.credential.chain[0].public_bytes(Encoding.PEM))
                (state / "bundle.pem").write_bytes(fleet.root.public_bytes(Encoding.PEM))
                # the key is injected (Agent(signer=...)); agent.json says what it is
                (state / "agent.json").write_text(json.dumps(
                    {"backend": "pkcs11", "pkcs11": "injected", "serial": name}))
                config = AgentConfig.parse(
                    f'[device]\nstate_dir = "{state}"\n'
                    f'[mqtt]\nhost = "127.0.0.1"\nport = {mosquitto.port}\n'
                    f'broker_identity = "{broker.identity.uri}"\n'
                    f"[session]\nrehandshake_margin_s = {margin_s}\n"
                    "resync_min_interval_s = 0.5\n"
                    "[reconnect]\ninitial_s = 0.2\nmax_s = 1.0\n"
                    "[renewal]\nenabled = false\n")
                clock = profile(i, seconds, drift, step_s)
                agents.append((name, Agent(config, signer=member.signer, clock=clock),
                               clock))
            for _, agent, _ in agents:
                agent.start()
            for name, agent, _ in agents:
                if not agent.wait_connected(60):
                    raise RuntimeError(f"{name} did not connect")
            # every profile's steps are relative to this
            start = time.monotonic()
            for _, _, clock in agents:
                clock.start_steps(start)
            progress(f"{devices} agents connected; publishing for {seconds:g} s")
            sent = dict.fromkeys((name for name, _, _ in agents), 0)
            period = 1.0 / rate_hz
            tick = start
            while time.monotonic() - start < seconds:
                for name, agent, _ in agents:
                    agent.publish(f"devices/{name}/telemetry/n", str(sent[name]).encode(),
                                  qos=1)
                    sent[name] += 1
                tick += period
                time.sleep(max(0.0, tick - time.monotonic()))
            progress("publishing stopped; waiting for what is in flight")
            stopped = time.monotonic()
            while time.monotonic() - stopped < settle_timeout_s:
                with lock:
                    done = all(len(got[name]) >= sent[name] for name in sent)
                if done:
                    break
                time.sleep(0.2)
            result.settle_s = round(time.monotonic() - stopped, 2)
            time.sleep(1.0)  # late duplicates, if any, would arrive now
            for name, agent, clock in agents:
                totals = agent.totals()
                client = agent.client
                connected = agent.connected.is_set()
                with lock:
                    counts = dict(got[name])
                delivered = len(counts)
                lost = sum(1 for n in range(sent[name]) if n not in counts)
                dup = sum(c - 1 for c in counts.values() if c > 1)
                result.sent += sent[name]
                result.delivered += delivered
                result.lost += lost
                result.duplicated += dup
                result.reconnects += totals.reconnects
                result.resyncs += totals.resyncs
                result.resent += totals.resent
                result.requeued += totals.requeued
                result.refused_dropped += totals.refused_dropped
                result.lockouts += 0 if connected else 1
                result.per_device[name] = {
                    "clock": clock.describe(), "sent": sent[name], "lost": lost,
                    "duplicated": dup, "resyncs": totals.resyncs,
                    "resent": totals.resent, "reconnects": totals.reconnects,
                    "requests": dict(getattr(client, "resync_requests", {})),
                    "connected": connected,
                }
        finally:
            stop.set()
            keeper.join(10)
            for _, agent, _ in agents:
                with contextlib.suppress(Exception):
                    agent.stop()
            subscriber.close()
    # the broker stopped: its audit log is complete
    audit = directory / "audit.jsonl"
    rows = [json.loads(line) for line in audit.read_text().splitlines()] \
        if audit.exists() else []
    quarantined_ids = set()
    for row in rows:
        event = row.get("event")
        if event == "quarantined":
            result.quarantined += 1
            quarantined_ids.add(row.get("identity"))
        elif event == "handshake_refused" and str(row.get("client_id", "")).startswith(
                f"spiffe://{fleet.trust_domain}/device/"):
            result.handshakes_refused += 1
        elif event == "message_rejected":
            if row.get("reason") == "epoch_out_of_window":
                result.epoch_refusals += 1
            if row.get("counted", True):
                result.counted_rejections += 1
            else:
                result.uncounted_rejections += 1
            if row.get("resync"):
                result.resync_requests += 1
    # locked out: quarantined, or not connected when the run ended (a refused handshake
    # that a reconnect got past is reported as handshakes_refused, not as a lockout)
    result.lockouts += sum(1 for name, row in result.per_device.items()
                           if row["connected"] and
                           f"spiffe://{fleet.trust_domain}/device/{name}" in quarantined_ids)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=120.0,
                        help="how long the fleet publishes (default 120)")
    parser.add_argument("--epoch-ms", type=int, default=100)
    parser.add_argument("--lifetime-s", type=int, default=10)
    parser.add_argument("--drift", type=float, default=0.05)
    parser.add_argument("--step-epochs", type=int, default=10)
    parser.add_argument("--rate-hz", type=float, default=2.0,
                        help="QoS 1 messages per device per second (default 2)")


def run(args: argparse.Namespace) -> int:
    devices, seconds = args.devices, args.seconds
    if args.quick:
        devices, seconds = min(devices, 10), min(seconds, 8.0)
    report = Report("drift", quick=args.quick)
    with tempfile.TemporaryDirectory(prefix="tessera-drift-") as tmp:
        t0 = time.monotonic()
        result = run_fleet(Path(tmp), devices=devices, seconds=seconds,
                           epoch_ms=args.epoch_ms, lifetime_s=args.lifetime_s,
                           drift=args.drift, step_epochs=args.step_epochs,
                           rate_hz=args.rate_hz, quarantine_rejections=500,
                           progress=lambda text: print(f"  {text}", flush=True))
        wall = time.monotonic() - t0
    detail = f"{devices} devices, {seconds:g} s"
    report.rate("sent", "QoS 1 messages published", result.sent, "msgs", detail)
    report.rate("delivered", "delivered (distinct)", result.delivered, "msgs")
    report.rate("resyncs", "re-handshakes to resynchronise", result.resyncs, "count")
    report.rate("epoch_refusals", "broker refusals for the epoch", result.epoch_refusals,
                "count")
    report.rate("resent", "refused messages resent", result.resent, "msgs")
    report.rate("reconnects", "reconnects", result.reconnects, "count")
    report.rate("settle_s", "time to settle after publishing stopped", result.settle_s, "s")
    report.target("lost", "QoS 1 messages lost", result.lost, "<=", 0, "msgs")
    report.target("duplicated", "QoS 1 messages duplicated", result.duplicated, "<=", 0,
                  "msgs")
    report.target("quarantined", "devices quarantined", result.quarantined, "<=", 0, "count")
    report.target("lockouts", "devices locked out", result.lockouts, "<=", 0, "count")
    report.target("handshakes_refused", "device handshakes refused", result.handshakes_refused,
                  "<=", 0, "count")
    report.target("counted_rejections", "rejections counted toward quarantine",
                  result.counted_rejections, "<=", 0, "count")
    report.note(f"session: epoch {args.epoch_ms} ms, window ±{SKEW_EPOCHS} epochs, "
                f"lifetime {args.lifetime_s} s (~{seconds / args.lifetime_s:.0f} lifetimes); "
                f"clocks ±{args.drift * 100:g} % and ±{args.step_epochs}-epoch steps "
                f"(bench/drift.py profile()); run took {wall:.0f} s")
    summary = {k: v for k, v in asdict(result).items() if k != "per_device"}
    report.info["drift"] = summary
    report.info["per_profile"] = _per_profile(result)
    print(report.table())
    if args.json:
        print(report.json_line())
    return 0


def _per_profile(result: DriftResult) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for row in result.per_device.values():
        entry = out.setdefault(row["clock"], collections.Counter())
        for key in ("sent", "lost", "duplicated", "resyncs", "resent", "reconnects"):
            entry[key] += row[key]
        entry["devices"] += 1
    return {k: dict(v) for k, v in out.items()}
