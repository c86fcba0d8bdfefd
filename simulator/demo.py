"""`tessera-sim demo`: two endpoints with hardware keys, one handshake, proven messages.

The device's key lives in swtpm, the broker's in a SoftHSM2 token. Both are enrolled by
a throwaway fleet authority (its key is in memory here; the provisioning service keeps
it in a PKCS#11 token). The demo then shows what SA1 accepts and what it refuses.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from hw.pkcs11 import Pkcs11Backend
from hw.tpm import TpmBackend
from simulator.fleet import Fleet
from simulator.softhsm import SoftHsm
from simulator.swtpm import Swtpm
from structauth.credentials import TimePolicy
from structauth.errors import TesseraError
from structauth.handshake import Initiator, Responder

TRUST_DOMAIN = "demo.tessera.test"
PIN_ENV = "TESSERA_DEMO_PIN"


def _say(text: str = "") -> None:
    print(text, flush=True)


def run_demo(workdir: Path | None = None) -> int:
    results: list[tuple[str, str, str]] = []

    def expect_rejected(label: str, attempt: Callable[[], object]) -> None:
        try:
            attempt()
        except TesseraError as exc:
            results.append((label, "rejected", exc.reason.name.lower()))
            _say(f"  {label:<38} REJECTED  reason={exc.reason.name.lower()} ({exc.detail})")
            return
        results.append((label, "ACCEPTED", "-"))
        _say(f"  {label:<38} ACCEPTED  <- this must never happen")

    with tempfile.TemporaryDirectory(prefix="tessera-demo-") as tmp:
        base = Path(workdir or tmp)
        _say("Tessera demo: SA1 between a swtpm device and a SoftHSM2 broker\n")
        t = time.perf_counter()
        with Swtpm(base / "swtpm") as tpm, SoftHsm(base / "softhsm") as hsm:
            _say(
                f"[1] swtpm running at {tpm.tcti} with an EK certificate "
                f"({time.perf_counter() - t:.1f} s)"
            )
            os.environ[PIN_ENV] = secrets.token_hex(8)
            hsm.init_token(
                "tessera-broker", so_pin=secrets.token_hex(8), user_pin=os.environ[PIN_ENV]
            )
            _say(f"    SoftHSM2 token 'tessera-broker' in {hsm.conf_path.parent}")

            with (
                TpmBackend(tpm.tcti, base / "device-keys") as tpm_backend,
                Pkcs11Backend(hsm.module, "tessera-broker", pin_env=PIN_ENV) as hsm_backend,
            ):
                device_key = tpm_backend.get_or_create_signing_key("device")
                broker_key = hsm_backend.get_or_create_signing_key("broker")
                _say(
                    "[2] device key: ECC P-256 in the TPM (fixedTPM, fixedParent, "
                    "sensitiveDataOrigin)"
                )
                _say("    broker key: ECC P-256 on the token (sensitive, not extractable)")

                now = dt.datetime.now(dt.UTC)
                fleet = Fleet(trust_domain=TRUST_DOMAIN, t0=now - dt.timedelta(minutes=5))
                trust = fleet.trust
                device_cred = fleet.member("device", "pi-0001", signer=device_key).credential
                broker_cred = fleet.member("broker", "edge-1", signer=broker_key).credential
                _say(f"[3] credentials: {device_cred.identity.uri}, {broker_cred.identity.uri}")

                clock = time.monotonic
                initiator = Initiator(
                    signer=device_key,
                    credential=device_cred,
                    trust=trust,
                    expected_peer=broker_cred.identity,
                )
                responder = Responder(signer=broker_key, credential=broker_cred, trust=trust)
                _say("[4] handshake: three messages (SA1 v2)")
                t = time.perf_counter()
                msg1 = initiator.start()
                t1 = time.perf_counter()
                _say(
                    f"    msg1 device -> broker {len(msg1):>5} B  X25519 + ML-KEM-768 shares, "
                    f"credential, names {broker_cred.identity.uri} "
                    f"(TPM sign {1000 * (t1 - t):.1f} ms)"
                )
                answered = responder.accept(msg1, clock(), TimePolicy.trusted(now))
                t2 = time.perf_counter()
                _say(
                    f"    msg2 broker -> device {len(answered.reply):>5} B  shares, parameters, "
                    f"credential, signature, MAC (HSM sign + checks {1000 * (t2 - t1):.1f} ms)"
                )
                _say(
                    "         the broker now holds only a pending handshake: no session, no "
                    f"identity, dropped after {responder.pending_timeout:.0f} s"
                )
                done = initiator.receive(answered.reply, clock(), TimePolicy.unknown())
                t3 = time.perf_counter()
                msg3 = done.reply
                _say(
                    f"    msg3 device -> broker {len(msg3):>5} B  session id + key confirmation "
                    f"over the whole transcript (device checks + MAC {1000 * (t3 - t2):.1f} ms)"
                )
                t4 = time.perf_counter()
                confirmed = responder.confirm(answered.pending, msg3, clock())
                t5 = time.perf_counter()
                device, broker = done.session, confirmed.session
                results.append(("handshake (3 messages)", "verified",
                                f"{1000 * (t3 - t + t5 - t4):.1f} ms"))
                _say(
                    f"    confirmed in {1e6 * (t5 - t4):.0f} us: only now does the broker "
                    f"know {confirmed.peer.uri}"
                )
                _say(
                    f"    session {device.session_id.hex()}; X25519 + ML-KEM-768 keys, P-256 "
                    "hardware signatures"
                )

                _say("[5] proven messages")
                topic = b"devices/pi-0001/telemetry/temp"
                sent = []
                for i in range(3):
                    payload = b'{"celsius": %.1f}' % (21.0 + i / 10)
                    header, body = device.protect(topic, payload, clock())
                    t = time.perf_counter_ns()
                    ok = broker.verify(header, topic, body, clock())
                    us = (time.perf_counter_ns() - t) / 1000
                    sent.append((header, body))
                    results.append((f"telemetry #{i + 1}", "verified", f"{us:.1f} us"))
                    _say(
                        f"  device -> broker {topic.decode()} {ok.payload.decode():<18} "
                        f"header {header[:9].hex()}... verified in {us:.1f} us"
                    )
                cmd_topic = b"devices/pi-0001/commands/reboot"
                header, body = broker.protect(cmd_topic, b"at 03:00", clock())
                ok = device.verify(header, cmd_topic, body, clock())
                results.append(("command to device", "verified", "-"))
                _say(f"  broker -> device {cmd_topic.decode()} {ok.payload.decode()!r} verified")

                _say("[6] attacks (an attacker on the path holds fresh, undelivered messages)")
                fresh = [
                    device.protect(topic, b'{"celsius": 22.%d}' % i, clock()) for i in range(3)
                ]
                (h0, b0), (h1, _b1), (h2, b2) = fresh
                expect_rejected(
                    "forged tag", lambda: broker.verify(h0[:15] + bytes(16), topic, b0, clock())
                )
                expect_rejected(
                    "altered payload",
                    lambda: broker.verify(h1, topic, b'{"celsius": 99.9}', clock()),
                )
                expect_rejected(
                    "moved to another topic",
                    lambda: broker.verify(h2, b"devices/pi-0002/telemetry/temp", b2, clock()),
                )
                expect_rejected(
                    "replayed message",
                    lambda: broker.verify(sent[0][0], topic, sent[0][1], clock()),
                )
                expect_rejected(
                    "replayed handshake",
                    lambda: responder.accept(msg1, clock(), TimePolicy.trusted(now)),
                )
                other_cred = fleet.member("broker", "edge-2", signer=broker_key).credential
                other = Responder(signer=broker_key, credential=other_cred, trust=trust)
                expect_rejected(
                    "handshake replayed at edge-2",
                    lambda: other.accept(msg1, clock(), TimePolicy.trusted(now)),
                )
                # a restarted broker has an empty nonce cache: the replayed msg1 gets a
                # msg2, but without the device's ephemeral keys no msg3 confirms it
                for label, bad_msg3 in (
                    ("replay at restart + captured msg3", lambda sid: msg3),
                    ("replay at restart + forged msg3", lambda sid: msg3[:6] + sid + bytes(32)),
                ):
                    restarted = Responder(signer=broker_key, credential=broker_cred, trust=trust)
                    pending = restarted.accept(msg1, clock(), TimePolicy.trusted(now)).pending
                    expect_rejected(
                        label,
                        lambda r=restarted, p=pending, m=bad_msg3: r.confirm(  # type: ignore[misc]
                            p, m(p.session_id), clock()),
                    )
                delivered = [broker.verify(h, topic, b, clock()).payload.decode() for h, b in fresh]
                results.append(("genuine after attacks", "verified", f"{len(delivered)} of 3"))
                _say(
                    f"  the genuine messages still verify after the attacks: {', '.join(delivered)}"
                )

                for s in (device_key, broker_key):
                    close = getattr(s, "close", None)
                    if close:
                        close()
        _say("\nSummary")
        _say(f"  {'case':<34} {'result':<10} detail")
        for label, outcome, detail in results:
            _say(f"  {label:<34} {outcome:<10} {detail}")
    bad = [r for r in results if r[1] == "ACCEPTED"]
    return 1 if bad else 0
