"""The broker's decisions without Mosquitto: SA1 handshake in CONNECT, proof on every
PUBLISH, ACLs, revocation and expiry of live sessions (the Mosquitto tests in
test_broker_mqtt.py run the same logic through the real broker)."""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
import struct
import time

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from broker_plugin.enforcer import (
    MOSQ_ACL_SUBSCRIBE,
    MOSQ_ERR_ACL_DENIED,
    MOSQ_ERR_AUTH,
    MOSQ_ERR_AUTH_CONTINUE,
    MOSQ_ERR_SUCCESS,
    Enforcer,
)
from broker_plugin.policy import parse_policy
from broker_plugin.stepup import AK_REQUIRED, StepUpSettings
from simulator.fleet import Fleet, Member
from structauth.credentials import TimePolicy
from structauth.errors import TesseraError
from structauth.handshake import Initiator, Responder
from structauth.mqtt_binding import STEP_UP_TOPIC, encode_quote
from structauth.session import Session

POLICY = parse_policy("""
version = 1
[classes.default]
publish   = ["devices/{id}/telemetry/#"]
subscribe = ["devices/{id}/commands/#"]
""")
NOW = dt.datetime.now(dt.UTC)


@pytest.fixture
def fleet() -> Fleet:
    return Fleet(t0=NOW - dt.timedelta(days=1))


@pytest.fixture
def enforcer(fleet: Fleet) -> Enforcer:
    broker = fleet.member("broker", "b1")
    events: list[tuple[str, dict]] = []  # type: ignore[type-arg]
    e = Enforcer(Responder(signer=broker.signer, credential=broker.credential,
                           trust=fleet.trust, peer_kind=None),
                 POLICY, wall_clock=lambda: NOW,
                 audit=lambda event, **f: events.append((event, f)))
    e.events = events  # type: ignore[attr-defined]
    return e


def handshake(e: Enforcer, member: Member, trust: object, client_id: str, address: str,
              now: float, *, context: bytes = b"", quote: bytes = b"",
              reauth: bool = False) -> Session | int:
    """The three messages as Mosquitto relays them: msg1 -> (AUTH_CONTINUE, msg2),
    msg3 -> (0, None). The device's session, or the refusing return code."""
    init = Initiator(signer=member.signer, credential=member.credential,
                     trust=trust, expected_peer=e.responder.identity)  # type: ignore[arg-type]
    rc, msg2 = e.connect(client_id, address, "tessera-sa1",
                         init.start(context=context, quote=quote), now, reauth=reauth)
    if rc != MOSQ_ERR_AUTH_CONTINUE:
        assert msg2 is None
        return int(rc)
    assert msg2 is not None
    done = init.receive(msg2, now, TimePolicy.trusted(NOW))
    rc, out = e.confirm(client_id, address, "tessera-sa1", done.reply, now, reauth=reauth)
    assert out is None
    return done.session if rc == MOSQ_ERR_SUCCESS else int(rc)


def connect(e: Enforcer, fleet: Fleet, member: Member, client_id: str | None = None,
            now: float = 0.0) -> Session | int:
    return handshake(e, member, fleet.trust, client_id or member.identity.uri, "127.0.0.1",
                     now)


def send(e: Enforcer, s: Session, cid: str, topic: str, payload: bytes, now: float = 1.0,
         wire_topic: str | None = None):  # type: ignore[no-untyped-def]
    header, body = s.protect(topic.encode(), payload, now)
    return e.message(cid, wire_topic or topic, body + header, now)


def test_connect_publish_and_strip(enforcer: Enforcer, fleet: Fleet) -> None:
    pi = fleet.member("device", "pi-1")
    s = connect(enforcer, fleet, pi)
    assert isinstance(s, Session)
    answer = send(enforcer, s, pi.identity.uri, "devices/pi-1/telemetry/t", b"21.5")
    assert answer.rc == MOSQ_ERR_SUCCESS and answer.payload == b"21.5"
    assert enforcer.events[-1][0] == "handshake_ok"  # type: ignore[attr-defined]


def test_every_bad_publish_is_dropped_with_its_reason(enforcer: Enforcer, fleet: Fleet) -> None:
    pi = fleet.member("device", "pi-2")
    s = connect(enforcer, fleet, pi)
    assert isinstance(s, Session)
    cid = pi.identity.uri
    header, body = s.protect(b"devices/pi-2/telemetry/t", b"x", 1.0)
    wire = body + header
    forged = wire[:-1] + bytes([wire[-1] ^ 1])
    cases = [
        ("forged", lambda: enforcer.message(cid, "devices/pi-2/telemetry/t", forged, 1.0),
         "bad_tag"),
        ("moved", lambda: enforcer.message(cid, "devices/pi-2/telemetry/u", wire, 1.0),
         "bad_tag"),
        ("altered", lambda: enforcer.message(cid, "devices/pi-2/telemetry/t",
                                             b"y" + header, 1.0), "bad_tag"),
        ("truncated", lambda: enforcer.message(cid, "devices/pi-2/telemetry/t", b"abc", 1.0),
         "truncated"),
    ]
    for label, attempt, reason in cases:
        answer = attempt()
        assert answer.rc == MOSQ_ERR_ACL_DENIED and answer.reason_code != 0, label
        assert enforcer.events[-1][1]["reason"] == reason, label  # type: ignore[attr-defined]
    assert enforcer.message(cid, "devices/pi-2/telemetry/t", wire, 1.0).rc == MOSQ_ERR_SUCCESS
    replay = enforcer.message(cid, "devices/pi-2/telemetry/t", wire, 1.0)
    assert replay.rc == MOSQ_ERR_ACL_DENIED
    assert enforcer.events[-1][1]["reason"] == "replayed"  # type: ignore[attr-defined]
    other = send(enforcer, s, cid, "devices/pi-3/telemetry/t", b"x")
    assert other.rc == MOSQ_ERR_ACL_DENIED and other.reason_code == 0x87
    header, body = s.protect(b"devices/pi-2/telemetry/t", b"old", 1.0)
    late = enforcer.message(cid, "devices/pi-2/telemetry/t", body + header, 1000.0)
    assert late.rc == MOSQ_ERR_ACL_DENIED  # sent 1000 s ago: far outside the epoch window
    assert enforcer.events[-1][1]["reason"] == "epoch_out_of_window"  # type: ignore[attr-defined]
    assert enforcer.message("nobody", "devices/x", b"x" * 40, 1.0).rc == MOSQ_ERR_ACL_DENIED


def test_refused_connects(enforcer: Enforcer, fleet: Fleet) -> None:
    pi = fleet.member("device", "pi-4")
    assert connect(enforcer, fleet, pi, client_id="spiffe://fleet.test/device/pi-5") == \
        MOSQ_ERR_AUTH
    assert enforcer.connect("x", "a", "other-method", b"data", 0.0).rc == MOSQ_ERR_AUTH
    assert enforcer.connect("x", "a", "tessera-sa1", None, 0.0).rc == MOSQ_ERR_AUTH
    assert enforcer.connect("x", "a", "tessera-sa1", b"\x00" * 100, 0.0).rc == MOSQ_ERR_AUTH
    stranger = Fleet(t0=NOW - dt.timedelta(days=1)).member("device", "pi-6")
    assert connect(enforcer, fleet, stranger) == MOSQ_ERR_AUTH
    assert enforcer.basic_auth("plain", "a", 4) == MOSQ_ERR_AUTH
    assert enforcer.clients == {}


def test_subscribe_acl(enforcer: Enforcer, fleet: Fleet) -> None:
    pi = fleet.member("device", "pi-7")
    connect(enforcer, fleet, pi)
    cid = pi.identity.uri
    assert enforcer.acl(cid, MOSQ_ACL_SUBSCRIBE, "devices/pi-7/commands/#") == MOSQ_ERR_SUCCESS
    assert enforcer.acl(cid, MOSQ_ACL_SUBSCRIBE, "devices/+/commands/#") == MOSQ_ERR_ACL_DENIED
    assert enforcer.acl("nobody", MOSQ_ACL_SUBSCRIBE, "#") == MOSQ_ERR_ACL_DENIED


def test_revocation_kicks_the_live_session_and_refuses_the_next(
        enforcer: Enforcer, fleet: Fleet) -> None:
    pi = fleet.member("device", "pi-8")
    s = connect(enforcer, fleet, pi)
    assert isinstance(s, Session)
    serial = format(pi.credential.chain[0].serial_number, "x")
    assert enforcer.revoke([serial]) == [pi.identity.uri]
    assert ("kick", pi.identity.uri) in enforcer.tick(2.0)
    assert pi.identity.uri not in enforcer.clients
    assert connect(enforcer, fleet, pi) == MOSQ_ERR_AUTH
    assert enforcer.events[-1][1]["reason"] == "credential_revoked"  # type: ignore[attr-defined]


def test_expired_credential_is_kicked(fleet: Fleet, enforcer: Enforcer) -> None:
    pi = fleet.member("device", "pi-9", days=2)  # valid until NOW + 1 day
    connect(enforcer, fleet, pi)
    assert enforcer.tick(1.0) == []
    enforcer.wall_clock = lambda: NOW + dt.timedelta(days=1, seconds=1)
    assert ("kick", pi.identity.uri) in enforcer.tick(2.0)


# -- step-up, rotation and quarantine (sans-IO; test_step_up.py runs them through
# -- Mosquitto) ---------------------------------------------------------------------------

STEP_POLICY = parse_policy("""
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
""")


def stepper(fleet: Fleet, metrics: object = None, **settings: object) -> Enforcer:
    broker = fleet.member("broker", "b1")
    events: list[tuple[str, dict]] = []  # type: ignore[type-arg]
    e = Enforcer(Responder(signer=broker.signer, credential=broker.credential,
                           trust=fleet.trust, peer_kind=None),
                 STEP_POLICY, wall_clock=lambda: NOW,
                 audit=lambda event, **f: events.append((event, f)),
                 settings=StepUpSettings(**settings),  # type: ignore[arg-type]
                 metrics=metrics, timer=time.perf_counter if metrics else None)
    e.events = events  # type: ignore[attr-defined]
    return e


def events_named(e: Enforcer, name: str) -> list[dict]:  # type: ignore[type-arg]
    return [f for ev, f in e.events if ev == name]  # type: ignore[attr-defined]


class Dev:
    """A device driving the enforcer in-process: handshakes (CONNECT or AUTH),
    proven publishes, and opening what the broker proves to it."""

    def __init__(self, e: Enforcer, fleet: Fleet, name: str, address: str = "10.0.0.5",
                 kind: str = "device") -> None:
        self.e, self.fleet, self.address = e, fleet, address
        self.member = fleet.member(kind, name)
        self.uri = self.member.identity.uri
        self.session: Session | None = None
        self.previous: Session | None = None

    def handshake(self, now: float, *, context: bytes = b"", quote: bytes = b"",
                  reauth: bool = False, address: str | None = None) -> int:
        got = handshake(self.e, self.member, self.fleet.trust, self.uri,
                        address or self.address, now, context=context, quote=quote,
                        reauth=reauth)
        if isinstance(got, int):
            return got
        self.previous = self.session
        self.session = got
        return MOSQ_ERR_SUCCESS

    def send(self, topic: str, payload: bytes, now: float,
             session: Session | None = None):  # type: ignore[no-untyped-def]
        s = session or self.session
        assert s is not None
        header, body = s.protect(topic.encode(), payload, now)
        return self.e.message(self.uri, topic, body + header, now)

    def requests(self, actions: list[tuple], now: float) -> list[dict]:  # type: ignore[type-arg]
        found = []
        for action in actions:
            if action[0] == "publish" and action[1] == self.uri and action[2] == STEP_UP_TOPIC:
                assert action[4] == 1 and action[5] is False
                data = action[3]
                for s in (self.session, self.previous):
                    try:
                        assert s is not None
                        opened = s.verify(data[-31:], STEP_UP_TOPIC.encode(), data[:-31], now)
                    except (TesseraError, AssertionError):
                        continue
                    request = json.loads(opened.payload)
                    request["nonce"] = base64.b64decode(request["nonce"])
                    found.append(request)
                    break
                else:
                    raise AssertionError("a step-up request this device cannot open")
        return found


def _tpm2b(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


def fake_ak(key: ec.EllipticCurvePrivateKey, attributes: int = AK_REQUIRED | 0x40) -> bytes:
    """A marshalled TPM2B_PUBLIC describing ``key`` as an ECC P-256 attestation key."""
    numbers = key.public_key().public_numbers()
    area = (struct.pack(">HHI", 0x0023, 0x000B, attributes) + _tpm2b(b"")
            + struct.pack(">HHHHH", 0x0010, 0x0018, 0x000B, 0x0003, 0x0010)
            + _tpm2b(numbers.x.to_bytes(32, "big")) + _tpm2b(numbers.y.to_bytes(32, "big")))
    return _tpm2b(area)


def fake_quote(key: ec.EllipticCurvePrivateKey, nonce: bytes, *, magic: int = 0xFF544347,
               ak: bytes | None = None) -> bytes:
    """What a TPM2_Quote looks like, signed in software (the structure, not a TPM)."""
    attest = (struct.pack(">IH", magic, 0x8018) + _tpm2b(b"\x00\x0b" + bytes(32))
              + _tpm2b(nonce) + bytes(17) + bytes(8)
              + struct.pack(">IHB", 1, 0x000B, 3) + b"\xff\x00\x00" + _tpm2b(bytes(32)))
    signature = key.sign(attest, ec.ECDSA(hashes.SHA256()))
    return encode_quote(attest, signature, ak or fake_ak(key))


def test_sensitive_publish_is_held_until_a_fresh_step_up(fleet: Fleet) -> None:
    e = stepper(fleet, fresh_s=100.0)
    d = Dev(e, fleet, "pi-s1")
    assert d.handshake(0.0) == MOSQ_ERR_SUCCESS
    assert d.send("devices/pi-s1/telemetry/t", b"ok", 1.0).rc == MOSQ_ERR_SUCCESS
    held = d.send("devices/pi-s1/firmware/v2", b"fw", 1.0)
    assert (held.rc, held.reason_code, held.reason) == (
        MOSQ_ERR_ACL_DENIED, 0x87, "tessera: step_up_required")
    [asked] = events_named(e, "step_up_requested")
    assert asked["trigger"] == "sensitive_topic" and asked["quote"] is False
    assert asked["session"] == d.session.session_id.hex()  # type: ignore[union-attr]
    [request] = d.requests(e.tick(1.1), 1.1)
    assert request["reason"] == "sensitive_topic" and request["quote"] is False
    assert request["deadline_s"] == 30 and len(request["nonce"]) == 32
    assert request["nonce"].hex() == asked["nonce"]
    # asking again while one is outstanding: held, no second request
    assert d.send("devices/pi-s1/firmware/v2", b"fw", 2.0).rc == MOSQ_ERR_ACL_DENIED
    assert len(events_named(e, "step_up_requested")) == 1 and d.requests(e.tick(2), 2) == []
    old = d.session
    assert d.handshake(3.0, context=request["nonce"], reauth=True) == MOSQ_ERR_SUCCESS
    [ok] = events_named(e, "step_up_ok")
    assert ok["via"] == "auth" and ok["previous_session"] == old.session_id.hex()  # type: ignore[union-attr]
    assert ok["session"] == d.session.session_id.hex()  # type: ignore[union-attr]
    assert d.send("devices/pi-s1/firmware/v2", b"fw", 4.0).payload == b"fw"
    # ... but a message under the replaced session is never stepped up
    assert d.send("devices/pi-s1/firmware/v2", b"fw", 4.0, session=old).rc == \
        MOSQ_ERR_ACL_DENIED
    assert d.requests(e.tick(4.1), 4.1) != []  # that asked again
    e.challenges.clear()
    assert d.send("devices/pi-s1/firmware/v2", b"fw", 50.0).rc == MOSQ_ERR_SUCCESS
    # fresh_s later, the next sensitive publish needs a new step-up
    assert d.send("devices/pi-s1/firmware/v2", b"fw", 104.0).rc == MOSQ_ERR_ACL_DENIED
    assert events_named(e, "step_up_requested")[-1]["trigger"] == "sensitive_topic"
    # the session carries the policy's digest, so the device sees which policy holds
    assert d.session.params.policy_digest == STEP_POLICY.digest  # type: ignore[union-attr]


def test_rotation_keeps_the_previous_session_for_in_flight_messages(fleet: Fleet) -> None:
    e = stepper(fleet, rotation_grace_s=5.0)
    d = Dev(e, fleet, "pi-s2")
    backend = Dev(e, fleet, "backend", kind="broker")
    d.handshake(0.0)
    backend.handshake(0.0)
    old = d.session
    in_flight = [old.protect(b"devices/pi-s2/telemetry/t", b"%d" % i, 1.0)  # type: ignore[union-attr]
                 for i in range(3)]
    assert d.handshake(1.0, reauth=True) == MOSQ_ERR_SUCCESS  # no context: a rotation
    assert events_named(e, "step_up_requested") == []
    assert events_named(e, "handshake_ok")[-1]["reauth"] is True
    for i, (header, body) in enumerate(in_flight):  # proven before, arriving after
        answer = e.message(d.uri, "devices/pi-s2/telemetry/t", body + header, 2.0)
        assert answer.payload == b"%d" % i
    assert d.send("devices/pi-s2/telemetry/t", b"new", 2.0).payload == b"new"
    # a command to the device is proven under its new session
    answer = backend.send("devices/pi-s2/commands/x", b"cmd", 2.0)
    assert answer.rc == MOSQ_ERR_SUCCESS
    opened = d.session.verify(answer.payload[-31:], b"devices/pi-s2/commands/x",  # type: ignore[union-attr]
                              answer.payload[:-31], 2.0)
    assert opened.payload == b"cmd"
    # after the grace the old session is gone
    e.tick(6.5)
    header, body = old.protect(b"devices/pi-s2/telemetry/t", b"late", 6.5)  # type: ignore[union-attr]
    late = e.message(d.uri, "devices/pi-s2/telemetry/t", body + header, 6.5)
    assert late.rc == MOSQ_ERR_ACL_DENIED
    assert e.events[-1][1]["reason"] == "unknown_session"  # type: ignore[attr-defined]
    # a takeover by a new connection (not an AUTH) keeps no previous session
    d.handshake(7.0)
    assert len(e.clients[d.uri].previous) == 0


def test_wrong_nonce_fails_and_repeated_failures_quarantine(fleet: Fleet) -> None:
    e = stepper(fleet, quarantine_failures=2, quarantine_window_s=100.0, quarantine_s=50.0)
    d = Dev(e, fleet, "pi-s3")
    d.handshake(0.0)
    d.send("devices/pi-s3/firmware/x", b"fw", 1.0)
    [request] = d.requests(e.tick(1.0), 1.0)
    assert d.handshake(2.0, context=b"\x00" * 32, reauth=True) == MOSQ_ERR_AUTH
    failed = events_named(e, "step_up_failed")
    assert [(f["reason"], f["via"]) for f in failed] == [("wrong_nonce", "auth")]
    assert failed[0]["session"] == d.session.session_id.hex()  # type: ignore[union-attr]
    e.disconnect(d.uri)  # Mosquitto closes the connection after a refused re-auth
    # a fresh connection without the answer is asked again, with the same nonce
    assert d.handshake(3.0) == MOSQ_ERR_SUCCESS
    [again] = d.requests(e.tick(3.0), 3.0)
    assert again["nonce"] == request["nonce"]
    assert d.handshake(4.0, context=b"\x01" * 32, reauth=True) == MOSQ_ERR_AUTH
    [quarantined] = events_named(e, "quarantined")
    assert quarantined["cause"] == "step_up_failures" and quarantined["failures"] == 2
    assert ("kick", d.uri) in e.tick(4.1)
    assert d.handshake(10.0) == MOSQ_ERR_AUTH
    assert "quarantined" in events_named(e, "handshake_refused")[-1]["detail"]
    e.tick(54.5)
    assert events_named(e, "released")[-1]["by"] == "timeout"
    assert d.handshake(55.0) == MOSQ_ERR_SUCCESS
    assert d.uri not in e.challenges  # the quarantine dropped the old challenge


def test_rejected_messages_trip_the_breaker(fleet: Fleet) -> None:
    e = stepper(fleet, quarantine_rejections=5, quarantine_window_s=10.0, quarantine_s=30.0)
    d = Dev(e, fleet, "pi-s4")
    d.handshake(0.0)
    for _ in range(4):
        e.message(d.uri, "devices/pi-s4/telemetry/t", b"x" * 40, 1.0)
    assert events_named(e, "quarantined") == []
    e.message(d.uri, "devices/pi-s4/telemetry/t", b"x" * 40, 1.0)
    [q] = events_named(e, "quarantined")
    assert q["cause"] == "rejected_messages" and ("kick", d.uri) in e.tick(1.1)


def test_no_answer_kicks_and_a_connect_with_the_nonce_answers(fleet: Fleet) -> None:
    e = stepper(fleet, deadline_s=5.0, reconnect_window_s=10.0)
    d = Dev(e, fleet, "pi-s5")
    d.handshake(0.0)
    d.send("devices/pi-s5/firmware/x", b"fw", 1.0)
    [request] = d.requests(e.tick(1.0), 1.0)
    assert e.tick(5.9) == []
    assert ("kick", d.uri) in e.tick(6.1)
    assert events_named(e, "step_up_failed")[-1]["reason"] == "timeout"
    assert d.uri not in e.clients and d.uri in e.challenges
    assert d.handshake(8.0, context=request["nonce"]) == MOSQ_ERR_SUCCESS  # a CONNECT
    assert events_named(e, "step_up_ok")[-1]["via"] == "connect"
    assert d.send("devices/pi-s5/firmware/x", b"fw", 8.5).rc == MOSQ_ERR_SUCCESS
    # without the nonce: asked again with a new deadline; gone after the window
    d.send("devices/pi-s5/firmware/x", b"fw", 400.0)  # fresh_s passed: asked again
    [second] = d.requests(e.tick(400.0), 400.0)
    assert ("kick", d.uri) in e.tick(405.5)
    assert d.handshake(406.0) == MOSQ_ERR_SUCCESS
    [resent] = d.requests(e.tick(406.0), 406.0)
    assert resent["nonce"] == second["nonce"] and resent["deadline_s"] == 5
    e.disconnect(d.uri)
    e.tick(422.0)
    assert d.uri not in e.challenges


def test_a_new_network_holds_publishes_until_step_up(fleet: Fleet) -> None:
    e = stepper(fleet, networks_per_identity=2)
    d = Dev(e, fleet, "pi-s6", address="10.0.0.5")
    d.handshake(0.0)  # the first connect ever is learned
    assert events_named(e, "handshake_ok")[-1]["network"] == "10.0.0.0/24"
    d.handshake(1.0, address="10.0.0.77")  # same /24
    d.handshake(2.0, address="::ffff:10.0.0.9")  # IPv4-mapped: the same network
    assert events_named(e, "step_up_requested") == []
    d.handshake(3.0, address="192.168.7.1")
    [asked] = events_named(e, "step_up_requested")
    assert asked["trigger"] == "new_network" and asked["blocking"] is True
    assert d.send("devices/pi-s6/telemetry/t", b"x", 3.5).reason == "tessera: step_up_required"
    [request] = d.requests(e.tick(3.5), 3.5)
    assert d.handshake(4.0, context=request["nonce"], reauth=True,
                       address="192.168.7.1") == MOSQ_ERR_SUCCESS
    assert d.send("devices/pi-s6/telemetry/t", b"x", 4.5).rc == MOSQ_ERR_SUCCESS
    assert e.networks.networks(d.uri) == ["10.0.0.0/24", "192.168.7.0/24"]
    # IPv6 counts by /64; memory is bounded (2 per identity here): the oldest goes
    d.handshake(5.0, address="2001:db8:1:2::5")
    [request] = d.requests(e.tick(5.0), 5.0)
    d.handshake(5.5, context=request["nonce"], reauth=True, address="2001:db8:1:2::5")
    d.handshake(6.0, address="2001:db8:1:2:ffff::1")
    assert len(events_named(e, "step_up_requested")) == 2
    assert e.networks.networks(d.uri) == ["192.168.7.0/24", "2001:db8:1:2::/64"]
    d.handshake(7.0, address="10.0.0.5")  # forgotten: asked again
    assert len(events_named(e, "step_up_requested")) == 3


def test_a_rate_spike_against_the_baseline_asks_for_step_up(fleet: Fleet) -> None:
    e = stepper(fleet, rate_window_s=1.0, rate_factor=10.0, rate_min=5.0,
                rate_warmup_windows=3)
    fresh = Dev(e, fleet, "pi-s8")
    fresh.handshake(0.0)
    for _ in range(100):  # a burst before any baseline exists is not judged
        fresh.send("devices/pi-s8/telemetry/t", b"x", 0.5)
    d = Dev(e, fleet, "pi-s7")
    d.handshake(0.0)
    now = 0.0
    while now < 6.0:  # 2 messages per second
        now += 0.5
        assert d.send("devices/pi-s7/telemetry/t", b"x", now).rc == MOSQ_ERR_SUCCESS
    assert events_named(e, "step_up_requested") == []
    for i in range(30):  # 30 in 0.03 s against a baseline of about 2/s (limit 20)
        answer = d.send("devices/pi-s7/telemetry/t", b"x", now + 0.1 + i / 1000)
        assert answer.rc == MOSQ_ERR_SUCCESS  # asked, not blocked
    [asked] = events_named(e, "step_up_requested")
    assert asked["trigger"] == "rate_spike" and asked["blocking"] is False
    count, baseline = re.fullmatch(r"(\d+) messages in under 1 s against a baseline of "
                                   r"([\d.]+)/s", asked["detail"]).groups()  # type: ignore[union-attr]
    assert 1.5 < float(baseline) < 2.5 and int(count) == int(10 * float(baseline)) + 1


def test_a_policy_change_asks_every_live_session(fleet: Fleet) -> None:
    e = stepper(fleet, change_grace_s=20.0)
    devices = [Dev(e, fleet, f"pi-p{i}") for i in range(3)]
    for d in devices:
        d.handshake(0.0)
    assert sorted(e.require_step_up_all("policy_change", 1.0)) == sorted(d.uri for d in devices)
    actions = e.tick(1.0)
    requests = {d.uri: d.requests(actions, 1.0) for d in devices}
    assert all(r[0]["reason"] == "policy_change" and r[0]["deadline_s"] == 20
               for r in requests.values())
    first = devices[0]
    first.handshake(2.0, context=requests[first.uri][0]["nonce"], reauth=True)
    kicks = [a for a in e.tick(21.5) if a[0] == "kick"]
    assert sorted(k[1] for k in kicks) == sorted(d.uri for d in devices[1:])


def test_a_quote_is_checked_against_the_nonce_and_the_enrolled_ak(fleet: Fleet) -> None:
    e = stepper(fleet, quarantine_failures=0)
    d = Dev(e, fleet, "pi-q1")
    ak = ec.generate_private_key(ec.SECP256R1())
    enrolled: dict[str, bytes] = {}
    e.attestation_key_of = lambda identity: enrolled.get(identity.name)
    d.handshake(0.0)

    def ask(now: float) -> bytes:
        d.send("devices/pi-q1/keys/rotate", b"k", now)
        [request] = d.requests(e.tick(now), now)
        assert request["quote"] is True
        return request["nonce"]  # type: ignore[no-any-return]

    nonce = ask(1.0)
    cases = [
        (b"", "quote_missing"),
        (fake_quote(ak, b"\x07" * 32), "bad_quote"),  # made for another nonce
        (fake_quote(ak, nonce, magic=0x12345678), "bad_quote"),  # not TPM-generated
        (fake_quote(ak, nonce, ak=fake_ak(ak, attributes=0x40072)), "bad_quote"),  # decrypt
        (fake_quote(ak, nonce)[:-1], "bad_quote"),  # truncated
    ]
    forged = bytearray(fake_quote(ak, nonce))
    forged[40] ^= 1  # inside the attest: the signature no longer verifies
    cases.append((bytes(forged), "bad_quote"))
    for i, (quote, reason) in enumerate(cases):
        assert d.handshake(2.0 + i, context=nonce, quote=quote, reauth=True) == MOSQ_ERR_AUTH
        assert events_named(e, "step_up_failed")[-1]["reason"] == reason, i
    # the enrolled AK is another key: refused; the right one: accepted
    enrolled["pi-q1"] = fake_ak(ec.generate_private_key(ec.SECP256R1()))
    assert d.handshake(10.0, context=nonce, quote=fake_quote(ak, nonce),
                       reauth=True) == MOSQ_ERR_AUTH
    assert "enrolled" in events_named(e, "step_up_failed")[-1]["detail"]
    enrolled["pi-q1"] = fake_ak(ak)
    assert d.handshake(11.0, context=nonce, quote=fake_quote(ak, nonce),
                       reauth=True) == MOSQ_ERR_SUCCESS
    [ok] = events_named(e, "step_up_ok")
    assert ok["quote"] is True and ok["enrolled_ak"] is True
    assert ok["pcr_selection"] == [[0x000B, [0, 1, 2, 3, 4, 5, 6, 7]]]
    assert d.send("devices/pi-q1/keys/rotate", b"k", 12.0).rc == MOSQ_ERR_SUCCESS
    # a step-up without a quote does not open quote-only topics
    e.clients[d.uri].stepped_up_quote = False
    assert d.send("devices/pi-q1/keys/rotate", b"k", 13.0).rc == MOSQ_ERR_ACL_DENIED
    assert d.send("devices/pi-q1/firmware/x", b"k", 13.0).rc == MOSQ_ERR_SUCCESS


def test_metrics_count_what_the_enforcer_decides(fleet: Fleet) -> None:
    from broker_plugin.metrics import BrokerMetrics

    m = BrokerMetrics()
    e = stepper(fleet, metrics=m, quarantine_failures=1, quarantine_s=5.0)
    d = Dev(e, fleet, "pi-m1")
    d.handshake(0.0)
    header, _ = d.session.protect(b"devices/pi-m1/telemetry/t", b"x", 1.0)  # type: ignore[union-attr]
    e.message(d.uri, "devices/pi-m1/telemetry/t", b"y" + header, 1.0)  # altered
    d.send("devices/pi-m1/telemetry/t", b"x", 1.0)
    d.send("devices/pi-m1/firmware/x", b"fw", 1.0)
    e.tick(1.0)
    d.handshake(2.0, context=b"\x00" * 32, reauth=True)
    e.tick(2.0)
    text = m.render().decode()
    for line in ('tessera_handshakes_total{result="ok"} 1',
                 'tessera_handshakes_total{result="pending"} 2',  # msg2 sent, twice
                 'tessera_handshakes_total{result="refused"} 1',
                 'tessera_rejections_total{reason="bad_tag"} 1',
                 'tessera_rejections_total{reason="step_up_required"} 1',
                 'tessera_step_ups_total{result="requested"} 1',
                 'tessera_step_ups_total{result="failed"} 1',
                 "tessera_quarantined_devices 1", "tessera_active_sessions 0",
                 "tessera_verify_seconds_count 2"):  # the altered one fails first
        assert line in text, line


# -- nothing before key confirmation (SA1 v2) ------------------------------------------


def test_a_replayed_msg1_gets_msg2_at_most_and_disturbs_nothing(enforcer: Enforcer,
                                                                fleet: Fleet) -> None:
    """The device's msg1 replayed once the nonce cache has forgotten it (600 s): msg2
    comes back, but no Client record replaces the live one, nothing is audited as a
    login, and the pending handshake can only fail or expire."""
    pi, other = fleet.member("device", "pi-r1"), fleet.member("device", "pi-r2")
    uri = pi.identity.uri
    init = Initiator(signer=pi.signer, credential=pi.credential, trust=fleet.trust,
                     expected_peer=enforcer.responder.identity)
    msg1 = init.start()
    rc, msg2 = enforcer.connect(uri, "10.0.0.5", "tessera-sa1", msg1, 0.0)
    assert rc == MOSQ_ERR_AUTH_CONTINUE and msg2 is not None
    assert enforcer.clients == {} and events_named(enforcer, "handshake_ok") == []
    done = init.receive(msg2, 0.0, TimePolicy.trusted(NOW))
    assert enforcer.confirm(uri, "10.0.0.5", "tessera-sa1", done.reply, 0.0).rc == 0
    live = enforcer.clients[uri]
    bystander = connect(enforcer, fleet, other)
    assert isinstance(bystander, Session)
    logins = len(events_named(enforcer, "handshake_ok"))
    # within the nonce cache's memory: refused before any work
    assert enforcer.connect(uri, "192.0.2.9", "tessera-sa1", msg1, 5.0).rc == MOSQ_ERR_AUTH
    assert events_named(enforcer, "handshake_refused")[-1]["reason"] == "handshake_replayed"
    # later: answered, and held as a pending handshake only
    rc, replayed_msg2 = enforcer.connect(uri, "192.0.2.9", "tessera-sa1", msg1, 700.0)
    assert rc == MOSQ_ERR_AUTH_CONTINUE and replayed_msg2 is not None
    assert enforcer.clients[uri] is live and len(enforcer.pending) == 1
    # the replayer cannot make msg3: the device's old msg3, nothing, garbage
    for attempt, reason in [(done.reply, "unknown_session"), (None, "malformed"),
                            (b"SA1\x23" + bytes(42), "malformed")]:
        assert enforcer.confirm(uri, "192.0.2.9", "tessera-sa1", attempt, 700.5).rc == \
            MOSQ_ERR_AUTH
        assert enforcer.events[-1][1]["reason"] == reason, attempt  # type: ignore[attr-defined]
    assert len(enforcer.pending) == 1
    # a well-formed msg3 naming the pending session with a MAC it cannot compute:
    # bad_confirmation, and that pending handshake is used up (one try)
    sid = next(iter(enforcer.pending._all))[1]
    forged = done.reply[:6] + sid + bytes(32)
    assert enforcer.confirm(uri, "192.0.2.9", "tessera-sa1", forged, 700.6).rc == MOSQ_ERR_AUTH
    assert events_named(enforcer, "handshake_refused")[-1]["reason"] == "bad_confirmation"
    assert len(enforcer.pending) == 0
    # nothing of the live device was touched, nothing counted against it
    assert enforcer.clients[uri] is live and live.session.state.name == "ESTABLISHED"
    assert len(events_named(enforcer, "handshake_ok")) == logins
    assert events_named(enforcer, "quarantined") == [] and not enforcer._rejected
    assert live.rejections == 0 and uri not in enforcer.challenges
    # the live device and its neighbour still deliver
    assert send(enforcer, done.session, uri, "devices/pi-r1/telemetry/t", b"ok",
                701.0).payload == b"ok"
    assert send(enforcer, bystander, other.identity.uri, "devices/pi-r2/telemetry/t", b"ok",
                701.0).payload == b"ok"


def test_an_unconfirmed_pending_handshake_expires_having_granted_nothing(
        enforcer: Enforcer, fleet: Fleet) -> None:
    from broker_plugin.metrics import BrokerMetrics

    enforcer.metrics = BrokerMetrics()
    pi = fleet.member("device", "pi-x1")
    init = Initiator(signer=pi.signer, credential=pi.credential, trust=fleet.trust,
                     expected_peer=enforcer.responder.identity)
    rc, msg2 = enforcer.connect(pi.identity.uri, "10.0.0.5", "tessera-sa1", init.start(), 0.0)
    assert rc == MOSQ_ERR_AUTH_CONTINUE and len(enforcer.pending) == 1
    # publishing or subscribing under the client id gets nothing (Mosquitto would not
    # even let the connection try before CONNACK)
    assert enforcer.message(pi.identity.uri, "devices/pi-x1/telemetry/t", b"x" * 40,
                            1.0).rc == MOSQ_ERR_ACL_DENIED
    assert enforcer.acl(pi.identity.uri, MOSQ_ACL_SUBSCRIBE, "devices/pi-x1/commands/#") == \
        MOSQ_ERR_ACL_DENIED
    enforcer.tick(9.9)
    assert len(enforcer.pending) == 1
    enforcer.tick(10.0)  # the responder's pending_timeout (10 s)
    assert len(enforcer.pending) == 0 and enforcer.clients == {}
    done = init.receive(msg2, 10.0, TimePolicy.trusted(NOW))  # msg3, too late
    assert enforcer.confirm(pi.identity.uri, "10.0.0.5", "tessera-sa1", done.reply,
                            10.1).rc == MOSQ_ERR_AUTH
    assert events_named(enforcer, "handshake_refused")[-1]["reason"] == "unknown_session"
    assert events_named(enforcer, "handshake_ok") == []
    text = enforcer.metrics.render().decode()
    for line in ('tessera_handshakes_total{result="pending"} 1',
                 'tessera_handshakes_total{result="expired"} 1',
                 'tessera_handshakes_total{result="ok"} 0',
                 'tessera_rejections_total{reason="unknown_session"} 2'):
        assert line in text, line


def test_pending_handshakes_are_bounded_and_never_evict_a_session(fleet: Fleet) -> None:
    from broker_plugin.enforcer import PendingLimits

    broker = fleet.member("broker", "b1")
    e = Enforcer(Responder(signer=broker.signer, credential=broker.credential,
                           trust=fleet.trust, peer_kind=None),
                 POLICY, wall_clock=lambda: NOW,
                 pending=PendingLimits(per_client=2, per_source=3, total=5))
    live = fleet.member("device", "pi-b0")
    s = connect(e, fleet, live)
    assert isinstance(s, Session)

    def pending(member: Member, address: str, now: float) -> tuple[Initiator, bytes]:
        init = Initiator(signer=member.signer, credential=member.credential,
                         trust=fleet.trust, expected_peer=e.responder.identity)
        rc, msg2 = e.connect(member.identity.uri, address, "tessera-sa1", init.start(), now)
        assert rc == MOSQ_ERR_AUTH_CONTINUE and msg2 is not None
        return init, msg2

    # per client id: the third evicts the first
    a = fleet.member("device", "pi-b1")
    first = pending(a, "10.0.0.1", 1.0)
    pending(a, "10.0.1.1", 1.1)
    pending(a, "10.0.2.1", 1.2)
    assert len(e.pending) == 2
    done = first[0].receive(first[1], 1.3, TimePolicy.trusted(NOW))
    assert e.confirm(a.identity.uri, "10.0.0.1", "tessera-sa1", done.reply, 1.3).rc == \
        MOSQ_ERR_AUTH  # evicted
    # per source: the fourth from one address evicts that address's oldest
    for i in range(4):
        pending(fleet.member("device", f"pi-s{i}"), "192.0.2.7", 2.0 + i / 10)
    assert sorted(k[0].rsplit("/", 1)[1] for k in e.pending._all) == \
        ["pi-b1", "pi-b1", "pi-s1", "pi-s2", "pi-s3"]
    # IPv6 counts by /64
    assert e.pending._by_source.keys() >= {"10.0.1.1", "10.0.2.1", "192.0.2.7"}
    pending(fleet.member("device", "pi-v1"), "2001:db8::1", 3.0)
    assert "2001:db8::/64" in e.pending._by_source
    assert len(e.pending) == 5  # the total: the oldest of all went
    # the confirmed session was never at stake
    assert e.clients[live.identity.uri].session is not None
    assert send(e, s, live.identity.uri, "devices/pi-b0/telemetry/t", b"ok", 3.1).payload == b"ok"
    # a pending handshake's msg3 must come from where its msg1 came
    init, msg2 = pending(fleet.member("device", "pi-m1"), "10.9.9.9", 4.0)
    done = init.receive(msg2, 4.0, TimePolicy.trusted(NOW))
    assert e.confirm("spiffe://fleet.test/device/pi-m1", "10.9.9.8", "tessera-sa1",
                     done.reply, 4.1).rc == MOSQ_ERR_AUTH


def test_a_msg1_for_another_broker_or_client_id_is_refused_before_any_work(
        enforcer: Enforcer, fleet: Fleet) -> None:
    pi = fleet.member("device", "pi-w1")
    elsewhere = fleet.member("broker", "mqtt-2").identity
    init = Initiator(signer=pi.signer, credential=pi.credential, trust=fleet.trust,
                     expected_peer=elsewhere)
    assert enforcer.connect(pi.identity.uri, "10.0.0.5", "tessera-sa1", init.start(),
                            0.0).rc == MOSQ_ERR_AUTH
    refused = events_named(enforcer, "handshake_refused")[-1]
    assert refused["reason"] == "wrong_identity" and "mqtt-2" in refused["detail"]
    assert refused["stage"] == "msg1" and len(enforcer.pending) == 0
    # a client id that is not the credential's identity, or no identity at all
    for cid in ("spiffe://fleet.test/device/pi-w2", "plain-client"):
        assert handshake(enforcer, pi, fleet.trust, cid, "10.0.0.6", 0.0) == MOSQ_ERR_AUTH
        assert events_named(enforcer, "handshake_refused")[-1]["reason"] == "wrong_identity"
    assert enforcer.clients == {} and len(enforcer.pending) == 0


def test_a_step_up_answer_counts_only_once_confirmed(fleet: Fleet) -> None:
    """A msg1 carrying the outstanding nonce (say, the device's own, replayed) is no
    answer until its msg3 verifies: the challenge stays outstanding, no step-up credit,
    and a wrong nonce in an unconfirmed msg1 counts nothing toward quarantine."""
    e = stepper(fleet, quarantine_failures=1)
    d = Dev(e, fleet, "pi-u1")
    d.handshake(0.0)
    d.send("devices/pi-u1/firmware/x", b"fw", 1.0)
    [request] = d.requests(e.tick(1.0), 1.0)
    init = Initiator(signer=d.member.signer, credential=d.member.credential,
                     trust=fleet.trust, expected_peer=e.responder.identity)
    rc, _ = e.connect(d.uri, d.address, "tessera-sa1", init.start(context=request["nonce"]),
                      2.0, reauth=True)
    assert rc == MOSQ_ERR_AUTH_CONTINUE
    wrong = Initiator(signer=d.member.signer, credential=d.member.credential,
                      trust=fleet.trust, expected_peer=e.responder.identity)
    rc, _ = e.connect(d.uri, d.address, "tessera-sa1", wrong.start(context=b"\x00" * 32),
                      2.0, reauth=True)
    assert rc == MOSQ_ERR_AUTH_CONTINUE
    e.tick(13.0)  # both expire unconfirmed
    assert d.uri in e.challenges and e.clients[d.uri].stepped_up_at is None
    assert events_named(e, "step_up_ok") == [] and events_named(e, "step_up_failed") == []
    assert events_named(e, "quarantined") == []
    assert d.send("devices/pi-u1/firmware/x", b"fw", 13.5).rc == MOSQ_ERR_ACL_DENIED
    assert d.handshake(14.0, context=request["nonce"], reauth=True) == MOSQ_ERR_SUCCESS
    assert events_named(e, "step_up_ok")[-1]["via"] == "auth"
    assert d.send("devices/pi-u1/firmware/x", b"fw", 14.5).rc == MOSQ_ERR_SUCCESS


def test_refusals_before_authentication_are_summarised_not_logged_each(
        enforcer: Enforcer, fleet: Fleet, tmp_path: object) -> None:
    """500 bad msg1s from one source: every one counted in the metrics, one audit record
    in full and one summary (the broker's audit writer aggregates refusals without a
    session), so a flood cannot fill the disk."""
    import json
    from pathlib import Path

    from broker_plugin.audit import AsyncAuditWriter, AuditLog
    from broker_plugin.metrics import BrokerMetrics

    path = Path(str(tmp_path)) / "audit.jsonl"
    writer = AsyncAuditWriter(AuditLog(path))
    enforcer.audit = writer.submit
    enforcer.metrics = BrokerMetrics()
    for i in range(500):
        enforcer.connect("spiffe://fleet.test/device/x", "198.51.100.1", "tessera-sa1",
                         b"junk" * 10, i / 100)
    writer.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["event"] for r in records] == ["handshake_refused", "refusals_aggregated"]
    assert records[0]["reason"] == "bad_version" and records[0]["stage"] == "msg1"
    assert records[1]["count"] == 499 and records[1]["source"] == "198.51.100.1"
    text = enforcer.metrics.render().decode()
    assert 'tessera_handshakes_total{result="refused"} 500' in text
    assert 'tessera_rejections_total{reason="bad_version"} 500' in text


def test_the_tick_ends_a_session_at_its_lifetime_and_looks_only_at_what_is_due(
        fleet: Fleet) -> None:
    from structauth.params import SessionParams

    broker = fleet.member("broker", "b1")
    e = Enforcer(Responder(signer=broker.signer, credential=broker.credential,
                           trust=fleet.trust, peer_kind=None,
                           params=SessionParams(epoch_ms=1000, lifetime_s=30)),
                 POLICY, wall_clock=lambda: NOW,
                 audit=lambda event, **f: events.append((event, f)))
    events: list[tuple[str, dict]] = []  # type: ignore[type-arg]
    short = fleet.member("device", "pi-l1")
    assert isinstance(connect(e, fleet, short, now=0.0), Session)
    for i in range(300):  # a quiet fleet: nothing of it is due for a while
        assert isinstance(connect(e, fleet, fleet.member("device", f"pi-q{i}"), now=0.5),
                          Session)
    e.tick(0.9)
    assert len(e._timers) == 301  # one entry per session, each due at its next epoch
    e.tick(29.9)
    assert short.identity.uri in e.clients
    assert ("kick", short.identity.uri) in e.tick(30.0)
    assert events[-1][0] == "session_expired" and events[-1][1]["detail"] == "session ended"


def test_a_disconnected_session_is_not_kept_and_the_timer_heaps_stay_bounded(
        enforcer: Enforcer, fleet: Fleet) -> None:
    """A device that reconnects over and over: the broker keeps none of its ended
    sessions (the expiry heap held each one for its credential's whole life, about
    2 KiB per handshake) and its timer heaps stay O(live sessions)."""
    import gc
    import weakref

    from broker_plugin.enforcer import COMPACT_SLACK

    steady = fleet.member("device", "pi-steady")
    kept = connect(enforcer, fleet, steady, now=0.0)
    assert isinstance(kept, Session)
    flapping = fleet.member("device", "pi-flap")
    cid = flapping.identity.uri
    ended = []
    for i in range(COMPACT_SLACK + 100):
        now = 0.01 * (i + 1)
        assert isinstance(connect(enforcer, fleet, flapping, now=now), Session)
        ended.append(weakref.ref(enforcer.clients[cid].session))
        enforcer.disconnect(cid)
        enforcer.tick(now)
    gc.collect()
    assert [r for r in ended if r() is not None] == []
    bound = 2 * len(enforcer.clients) + COMPACT_SLACK
    assert len(enforcer.clients) == 1
    assert len(enforcer._expiries) <= bound and len(enforcer._timers) <= bound
    # the device still connected is untouched: its session keeps its timers and works
    assert any(entry[2] == steady.identity.uri for entry in enforcer._expiries)
    assert any(entry[2] == steady.identity.uri for entry in enforcer._timers)
    topic = "devices/pi-steady/telemetry/t"
    assert send(enforcer, kept, steady.identity.uri, topic, b"1", now=now).rc == MOSQ_ERR_SUCCESS
