"""`tessera-sim demo`: the whole story on one machine, every part real.

A fleet authority with its key in a SoftHSM2 token; three devices, each with its own
swtpm, enrolled with TPM attestation by `tessera-agent enroll`; a broker identity whose
key is in the HSM; Mosquitto with the Tessera plugin following the revocation feed;
the agents publishing telemetry; a subscriber seeing it. Then the attacks: a forged
message, a replayed one, a publish to another device's topic, and a revoked device, each
refused, and a summary table.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from cryptography import x509

from simulator.mosquitto import Mosquitto, plugin_files
from simulator.provisioner import ProvisioningServer
from simulator.softhsm import SoftHsm
from simulator.swtpm import Swtpm

DEVICES = ("pi-0001", "pi-0002", "pi-0003")
_BIN = Path(sys.executable).parent


def _say(text: str = "") -> None:
    print(text, flush=True)


class _Step:
    def __init__(self, label: str) -> None:
        self.label = label
        self.t0 = time.perf_counter()

    def done(self, detail: str = "") -> None:
        ms = (time.perf_counter() - self.t0) * 1000
        _say(f"  {self.label:<52} ok  {detail} ({ms:.0f} ms)")


def _agent_enroll(server: ProvisioningServer, serial: str, tpm: Swtpm, state: Path) -> None:
    env = {**server.env}
    done = subprocess.run(
        [str(_BIN / "tessera-agent"), "enroll", "--provisioner", server.url,
         "--serial", serial, "--tpm", tpm.tcti, "--state-dir", str(state)],
        env=env, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"enrollment of {serial} failed: {done.stderr.strip()}")


def _audit_reasons(path: Path, since: int) -> list[str]:
    time.sleep(0.3)  # the audit writer is a background thread
    out = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record["seq"] >= since and record["event"] == "message_rejected":
            out.append(str(record.get("reason")))
    return out


def _audit_len(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def run_story(workdir: Path | None = None) -> int:
    import logging

    # the agents log their refused reconnects; the summary table says it once
    logging.getLogger("tessera.agent").setLevel(logging.ERROR)
    from device.agent import Agent, AgentConfig
    from device.mqtt import TesseraMqttClient
    from device.provisioner import ProvisionerClient
    from hw import open_signer
    from structauth.credentials import Credential, TrustStore

    results: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="tessera-story-") as tmp:
        base = Path(workdir or tmp)
        base.mkdir(parents=True, exist_ok=True)
        _say("Tessera: factory to broker, on one machine\n")
        _say("[1] fleet authority and devices")
        step = _Step("3 swtpm devices manufactured (EK certificates)")
        tpms = [Swtpm(base / f"tpm-{s}").start() for s in DEVICES]
        step.done()
        try:
            with SoftHsm(base / "softhsm") as hsm:
                hsm.activate()
                step = _Step("fleet authority: key generated in SoftHSM2, service up")
                roots = [p for t in tpms for p in t.manufacturer_ca_paths]
                server = ProvisioningServer(base / "authority", hsm, maker_roots=roots)
                server.start()
                step.done(server.url)
                try:
                    for serial, tpm in zip(DEVICES, tpms, strict=True):
                        step = _Step(f"{serial} enrolled with TPM attestation")
                        _agent_enroll(server, serial, tpm, base / serial)
                        step.done()
                    # the broker's and the console's keys live in an HSM token
                    pin = secrets.token_hex(8)
                    hsm.init_token("broker", so_pin=secrets.token_hex(8), user_pin=pin)
                    (base / "broker.pin").write_text(pin)
                    (base / "broker.pin").chmod(0o600)
                    os.environ["TESSERA_PKCS11_PIN"] = pin
                    operator = ProvisionerClient(server.url,
                                                 operator_token=server.operator_token)
                    issued = {}
                    from device.provisioner import enroll_witnessed

                    for name in ("mqtt-1", "console"):
                        signer = open_signer(f"pkcs11:{hsm.module}#broker/{name}", create=True)
                        issued[name] = (enroll_witnessed(operator, signer, name, kind="broker"),
                                        signer)
                    step = _Step("broker and console identities (PKCS#11, witnessed)")
                    step.done()
                    broker_issued = issued["mqtt-1"][0]
                    audit = base / "audit.jsonl"
                    options = plugin_files(
                        base, trust_domain=server.trust_domain,
                        bundle_pem=broker_issued["bundle"],
                        credential_pem=broker_issued["operational_credential"],
                        key=f"pkcs11:{hsm.module}#broker/mqtt-1",
                        pin_file=str(base / "broker.pin"), provisioner=server.url,
                        audit_log=str(audit))
                    _say("\n[2] Mosquitto with the Tessera plugin, agents, a subscriber")
                    with Mosquitto(base / "mosquitto", plugin_options=options) as broker:
                        code = _broker_part(broker, base, server, issued, audit, results,
                                            Agent, AgentConfig, TesseraMqttClient,
                                            Credential, TrustStore)
                    for _, signer in issued.values():
                        getattr(signer, "close", lambda: None)()
                finally:
                    server.stop()
        finally:
            for t in tpms:
                t.stop()
    _say("\nSummary")
    _say(f"  {'what':<44} {'result':<10} reason")
    _say(f"  {'-' * 44} {'-' * 10} {'-' * 24}")
    for label, outcome, reason in results:
        _say(f"  {label:<44} {outcome:<10} {reason}")
    ok = all(outcome in ("verified", "refused", "delivered") for _, outcome, _ in results)
    _say("\nall as expected" if ok and code == 0 else "\nSOMETHING WENT WRONG")
    return 0 if ok and code == 0 else 1


def _broker_part(broker: Mosquitto, base: Path, server: ProvisioningServer,
                 issued: dict[str, Any], audit: Path, results: list[tuple[str, str, str]],
                 Agent: Any, AgentConfig: Any, TesseraMqttClient: Any, Credential: Any,
                 TrustStore: Any) -> int:
    console_issued, console_signer = issued["console"]
    trust = TrustStore(x509.load_pem_x509_certificates(console_issued["bundle"].encode()),
                       server.trust_domain)
    # every device names the broker it means to reach (msg1 is refused anywhere else)
    broker_id = Credential.from_pem(issued["mqtt-1"][0]["operational_credential"].encode()
                                    ).identity
    console = TesseraMqttClient(
        signer=console_signer,
        credential=Credential.from_pem(console_issued["operational_credential"].encode()),
        trust=trust, host="127.0.0.1", port=broker.port, broker=broker_id)
    console.connect()
    got: queue.Queue[tuple[str, bytes]] = queue.Queue()
    console.subscribe("devices/+/telemetry/#", lambda t, p: got.put((t, p)), proven=False)
    agents = {}
    for serial in DEVICES:
        config = AgentConfig.parse(
            f'[device]\nstate_dir = "{base / serial}"\n'
            f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\n'
            f'broker_identity = "{broker_id.uri}"\n'
            f'[renewal]\nenabled = false\n[reconnect]\ninitial_s = 0.5\nmax_s = 2.0\n')
        agents[serial] = Agent(config).start()
    try:
        for serial, agent in agents.items():
            if not agent.wait_connected(30):
                _say(f"  {serial} did not connect: {agent.stats.last_error}")
                return 1
        _say(f"  3 agents connected to 127.0.0.1:{broker.port} (SA1 handshake, TPM-signed)")
        for i, (serial, agent) in enumerate(agents.items()):
            agent.publish(f"devices/{serial}/telemetry/temp", f"{21 + i}.5".encode())
        seen: dict[str, bytes] = {}
        deadline = time.monotonic() + 10
        while len(seen) < 3 and time.monotonic() < deadline:
            try:
                topic, payload = got.get(timeout=1)
            except queue.Empty:
                continue
            seen[topic.split("/")[1]] = payload
        for serial in DEVICES:
            verified = serial in seen
            results.append((f"telemetry from {serial}", "verified" if verified else "LOST",
                            seen.get(serial, b"").decode()))
            _say(f"  console got devices/{serial}/telemetry/temp = "
                 f"{seen.get(serial, b'?').decode()} (proof checked by the broker)")

        _say("\n[3] attacks")
        first = agents[DEVICES[0]]
        client = first.client
        topic = f"devices/{DEVICES[0]}/telemetry/temp"

        def attempt(label: str, send: Any, expect: str) -> None:
            mark = _audit_len(audit)
            send()
            time.sleep(0.4)
            delivered = False
            while not got.empty():
                delivered = True
                got.get()
            reasons = _audit_reasons(audit, mark)
            refused = not delivered and expect in reasons
            results.append((label, "refused" if refused else "ACCEPTED",
                            ", ".join(reasons) or "-"))
            _say(f"  {label:<44} {'refused' if refused else 'ACCEPTED <- must never happen'}"
                 f"  ({', '.join(reasons) or 'no reason recorded'})")

        wire = client.proven(topic, b"99.9")
        forged = wire[:-1] + bytes([wire[-1] ^ 0x01])
        attempt("forged message (tag altered)",
                lambda: client.client.publish(topic, forged, qos=1).wait_for_publish(5),
                "bad_tag")
        client.client.publish(topic, wire, qos=1).wait_for_publish(5)  # genuine, once
        time.sleep(0.3)
        while not got.empty():
            got.get()
        attempt("replayed message",
                lambda: client.client.publish(topic, wire, qos=1).wait_for_publish(5),
                "replayed")
        attempt(f"{DEVICES[0]} publishing as {DEVICES[1]}",
                lambda: client.publish(f"devices/{DEVICES[1]}/telemetry/temp", b"-40",
                                       qos=1).wait_for_publish(5),
                "not_authorized")

        victim = agents[DEVICES[2]]
        gone = threading.Event()
        previous = victim.client.client.on_disconnect

        def on_gone(*args: Any) -> None:
            gone.set()
            if previous:
                previous(*args)

        victim.client.client.on_disconnect = on_gone
        t0 = time.perf_counter()
        server.cli("revoke", DEVICES[2], "--reason", "stolen", check=True)
        cut = gone.wait(10)
        ms = (time.perf_counter() - t0) * 1000
        results.append((f"revoked {DEVICES[2]}: live session", "refused" if cut else "KEPT",
                        f"disconnected after {ms:.0f} ms" if cut else "still connected"))
        _say(f"  {'revoked device: live session cut':<44} "
             f"{'refused' if cut else 'KEPT <- must never happen'}  ({ms:.0f} ms after revoke)")
        mark = _audit_len(audit)
        time.sleep(1.5)  # the agent tries again by itself, with backoff
        back = victim.connected.is_set()
        time.sleep(0.3)
        why = sorted({str(json.loads(line).get("reason"))
                      for line in audit.read_text().splitlines()[mark:]
                      if json.loads(line)["event"] == "handshake_refused"}) or ["-"]
        results.append((f"revoked {DEVICES[2]}: reconnect", "ACCEPTED" if back else "refused",
                        ", ".join(why)))
        _say(f"  {'revoked device: new handshake':<44} "
             f"{'ACCEPTED <- must never happen' if back else 'refused'}  ({', '.join(why)})")
        still = agents[DEVICES[1]].publish(f"devices/{DEVICES[1]}/telemetry/temp", b"22.0")
        ok = still and got.get(timeout=5)[1] == b"22.0"
        results.append(("genuine telemetry after the attacks", "delivered" if ok else "LOST",
                         "-"))
        from broker_plugin.audit import verify_chain

        verdict = verify_chain([audit])
        results.append(("audit log hash chain", "verified" if verdict.ok else "BROKEN",
                        f"{verdict.records} records"))
        _say(f"  audit log: {verdict.records} records, chain "
             f"{'intact' if verdict.ok else 'BROKEN'} ({audit.name})")
    finally:
        for agent in agents.values():
            agent.stop()
        console.close()
    return 0
