"""Clock drift and clock steps never lock a genuine device out, and nothing is lost
(issue 11, item 11), with the revocation bits of item 7.

* The broker: a refusal for the epoch, a replay of an accepted sequence number (a QoS 2
  DUP before PUBREL) and a message under the device's own older session never count
  toward quarantine; a forgery, a foreign session id and garbage still do. An epoch
  refusal on the current session asks the device to re-handshake (``tessera/resync``,
  proven, rate-limited per session). Revoking an intermediate revokes everything under it.
* Through a real Mosquitto: what 2.0.11 gives a QoS 1/2 publisher whose message is
  refused for its epoch (a bare 0x87), the resync request, and a fleet of agents with
  clocks 5 % fast or slow and stepped by +/-10 epochs over several session lifetimes:
  zero lost, zero duplicated QoS 1 messages (counted at a subscriber), zero quarantines,
  zero lockouts. ``python -m bench drift`` is the 200-device version.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from bench.drift import run_fleet
from broker_plugin.enforcer import (
    MOSQ_ERR_ACL_DENIED,
    MOSQ_ERR_AUTH,
    MOSQ_ERR_AUTH_CONTINUE,
    MOSQ_ERR_SUCCESS,
    Enforcer,
)
from broker_plugin.policy import parse_policy
from broker_plugin.stepup import StepUpSettings
from device.mqtt import MqttError, TesseraMqttClient
from hw.software import InsecureSoftwareSigner
from provisioning.certificates import issue_credential
from simulator.fleet import Fleet, Member
from structauth.credentials import Credential, Identity, TimePolicy, TrustStore
from structauth.errors import Reason, TesseraError
from structauth.handshake import Initiator, Responder
from structauth.mqtt_binding import RESYNC_TOPIC
from structauth.session import Session
from tests.support import wait_for

POLICY = parse_policy("""
version = 1
[classes.default]
publish   = ["devices/{id}/telemetry/#"]
subscribe = ["devices/{id}/commands/#"]
""")
NOW = dt.datetime.now(dt.UTC)
EPOCH_S = 10.0  # the default session parameters' epoch


# -- the enforcer alone ------------------------------------------------------------------


@pytest.fixture
def fleet() -> Fleet:
    return Fleet(t0=NOW - dt.timedelta(days=1))


def enforcer(fleet: Fleet, broker: Member | None = None, trust: TrustStore | None = None,
             **settings: Any) -> Enforcer:
    broker = broker or fleet.member("broker", "b1")
    events: list[tuple[str, dict[str, Any]]] = []
    e = Enforcer(Responder(signer=broker.signer, credential=broker.credential,
                           trust=trust or fleet.trust, peer_kind=None),
                 POLICY, wall_clock=lambda: NOW,
                 audit=lambda event, **f: events.append((event, f)),
                 settings=StepUpSettings(new_network=False, rate_spike=False, **settings))
    e.events = events  # type: ignore[attr-defined]
    return e


def events(e: Enforcer, name: str) -> list[dict[str, Any]]:
    return [f for event, f in e.events if event == name]  # type: ignore[attr-defined]


def connect(e: Enforcer, fleet: Fleet, member: Member, now: float, *,
            reauth: bool = False, trust: TrustStore | None = None) -> Session | int:
    init = Initiator(signer=member.signer, credential=member.credential,
                     trust=trust or fleet.trust, expected_peer=e.responder.identity)
    cid = member.identity.uri
    rc, msg2 = e.connect(cid, "127.0.0.1", "tessera-sa1", init.start(), now, reauth=reauth)
    if rc != MOSQ_ERR_AUTH_CONTINUE:
        return int(rc)
    assert msg2 is not None
    done = init.receive(msg2, now, TimePolicy.trusted(NOW))
    rc, _ = e.confirm(cid, "127.0.0.1", "tessera-sa1", done.reply, now, reauth=reauth)
    return done.session if rc == MOSQ_ERR_SUCCESS else int(rc)


def wire(session: Session, topic: str, payload: bytes, now: float) -> bytes:
    header, body = session.protect(topic.encode(), payload, now)
    return body + header


def test_epoch_refusals_and_replays_do_not_count_forgeries_do(fleet: Fleet) -> None:
    """A device whose clock is 10 epochs ahead, and one retransmitting an accepted
    message, are refused but never quarantined (far more refusals than the breaker's
    limit); the epoch refusal asks for one resync per session per interval; five
    forgeries quarantine."""
    e = enforcer(fleet, quarantine_rejections=5, quarantine_window_s=300.0)
    pi = fleet.member("device", "pi-d")
    cid, topic = pi.identity.uri, "devices/pi-d/telemetry/t"
    s = connect(e, fleet, pi, 0.0)
    assert isinstance(s, Session)
    accepted = wire(s, topic, b"once", 1.0)
    assert e.message(cid, topic, accepted, 1.0).rc == MOSQ_ERR_SUCCESS
    for _ in range(12):  # a retransmission (QoS 2 DUP before PUBREL, QoS 1 DUP)
        answer = e.message(cid, topic, accepted, 1.0)
        assert answer.rc == MOSQ_ERR_ACL_DENIED and answer.reason == "tessera: replayed"
    drifted = [wire(s, topic, b"late %d" % i, 1.0 + 10 * EPOCH_S) for i in range(12)]
    for data in drifted:
        answer = e.message(cid, topic, data, 1.0)
        assert answer.rc == MOSQ_ERR_ACL_DENIED
        assert answer.reason == "tessera: epoch_out_of_window" and answer.reason_code == 0x87
    assert events(e, "quarantined") == []
    rejected = events(e, "message_rejected")
    assert len(rejected) == 24 and not any(r["counted"] for r in rejected)
    # one resync request for the session however many refusals (resync_interval_s)
    asks = [a for a in e.tick(1.0) if a[0] == "publish" and a[2] == RESYNC_TOPIC]
    assert len(asks) == 1
    _, to, _, body, qos, _ = asks[0]
    assert to == cid and qos == 0
    assert json.loads(body[:-31]) == {"reason": "epoch_out_of_window",
                                      "session": s.session_id.hex()}
    # the device cannot verify it (its clock is the problem, and it erased the keys of
    # the broker's epoch): that refusal is its own reason to re-handshake (device/mqtt.py)
    with pytest.raises(TesseraError) as stale:
        s.verify(body[-31:], RESYNC_TOPIC.encode(), body[:-31], 1.0 + 10 * EPOCH_S)
    assert stale.value.reason is Reason.EPOCH_OUT_OF_WINDOW
    e.message(cid, topic, wire(s, topic, b"later", 2.5 + 10 * EPOCH_S), 2.5)
    assert [a for a in e.tick(2.5) if a[0] == "publish" and a[2] == RESYNC_TOPIC]
    # forgeries still count: headers moved into the broker's epoch, tags that fail
    for i in range(5):
        data = wire(s, topic, b"forged %d" % i, 2.5 + 10 * EPOCH_S)
        header = data[-31:]
        forged = data[:-31] + header[:9] + b"\x00\x00" + header[11:]
        assert e.message(cid, topic, forged, 2.5).reason == "tessera: bad_tag"
    [q] = events(e, "quarantined")
    assert q["cause"] == "rejected_messages" and ("kick", cid) in e.tick(2.6)


def test_own_older_sessions_do_not_count_a_foreign_session_does(fleet: Fleet) -> None:
    """After a rotation and its grace, messages under the device's previous session
    (in flight across the re-handshake, or a DUP after a reconnect) are refused as
    unknown_session without counting; a session id the device never had counts."""
    e = enforcer(fleet, quarantine_rejections=5, rotation_grace_s=1.0)
    pi, other = fleet.member("device", "pi-r"), fleet.member("device", "pi-o")
    cid, topic = pi.identity.uri, "devices/pi-r/telemetry/t"
    old = connect(e, fleet, pi, 0.0)
    theirs = connect(e, fleet, other, 0.0)
    assert isinstance(old, Session) and isinstance(theirs, Session)
    new = connect(e, fleet, pi, 1.0, reauth=True)
    assert isinstance(new, Session)
    for i in range(10):  # past the grace: the old session no longer verifies
        answer = e.message(cid, topic, wire(old, topic, b"old %d" % i, 3.0), 3.0)
        assert answer.rc == MOSQ_ERR_ACL_DENIED and answer.reason == "tessera: unknown_session"
    assert events(e, "quarantined") == []
    for i in range(5):
        e.message(cid, topic, wire(theirs, topic, b"foreign %d" % i, 3.0), 3.0)
    [q] = events(e, "quarantined")
    assert q["identity"] == cid


def _ca(name: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None,
        issuer_key: ec.EllipticCurvePrivateKey, path_length: int) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer or subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - dt.timedelta(days=1))
            .not_valid_after(NOW + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length),
                           critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(issuer_key, hashes.SHA256()))


def _issue(issuer: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
           chain: list[x509.Certificate], kind: str, name: str) -> Member:
    signer = InsecureSoftwareSigner.generate()
    leaf = issue_credential(issuer[1], issuer[0], signer.public_key(),  # type: ignore[arg-type]
                            Identity.parse(f"spiffe://fleet.test/{kind}/{name}"),
                            not_before=NOW - dt.timedelta(days=1),
                            not_after=NOW + dt.timedelta(days=10))
    return Member(signer, Credential.from_der_chain(
        [c.public_bytes(Encoding.DER) for c in [leaf, *chain]]))


def test_revoking_an_intermediate_revokes_everything_under_it(fleet: Fleet) -> None:
    """Enforcer._revoked looks at every certificate of the chain (Credential.serials):
    revoking an intermediate CA cuts every live session under it and refuses their next
    handshakes; a device issued beside it is untouched."""
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _ca("tessera test root", root_key, None, root_key, 1)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _ca("tessera test intermediate", ca_key, root.subject, root_key, 0)
    trust = TrustStore([root], "fleet.test")
    e = enforcer(fleet, _issue((root_key, root), [], "broker", "b1"), trust)
    under = [_issue((ca_key, ca), [ca], "device", f"pi-i{i}") for i in range(2)]
    beside = _issue((root_key, root), [], "device", "pi-root")
    for member in [*under, beside]:
        assert isinstance(connect(e, fleet, member, 0.0, trust=trust), Session)
    doomed = e.revoke([format(ca.serial_number, "x")])
    assert sorted(doomed) == sorted(m.identity.uri for m in under)
    kicks = [a for a in e.tick(0.1) if a[0] == "kick"]
    assert sorted(k[1] for k in kicks) == sorted(doomed)
    for member in under:  # and no new handshake under it
        assert connect(e, fleet, member, 1.0, trust=trust) == MOSQ_ERR_AUTH
    assert isinstance(connect(e, fleet, beside, 1.0, reauth=True, trust=trust), Session)


# -- through a real Mosquitto ------------------------------------------------------------


@pytest.mark.broker
def test_what_a_publisher_refused_for_its_epoch_gets_from_mosquitto(tmp_path: Path) -> None:
    """Mosquitto 2.0.11 answers a plugin's refusal with a bare PUBACK/PUBREC 0x87: the
    plugin's reason string is dropped (handle_publish.c sends no properties). So the
    broker also sends a proven ``tessera/resync`` (QoS 0, rate-limited per session),
    which tells QoS 0 publishers too. Twelve drifted messages do not quarantine (limit
    5); a retransmitted QoS 2 message gets PUBREC 0x87 and does not count either;
    five forged ones quarantine."""
    from tests.attacks import mqtt5 as m
    from tests.attacks.world import World

    world = World(tmp_path, Fleet(t0=NOW - dt.timedelta(days=1)), raw_options={
        "session_epoch_ms": "100", "quarantine_rejections": "5",
        "step_up_rate_spike": "off"})
    try:
        member = world.member("pi-e")
        hs = world.handshake(member)
        s = hs.session
        assert s is not None
        topic = "devices/pi-e/telemetry/t"
        packets: list[m.Packet] = []
        for i in range(12):  # proven 10 epochs (1 s) ahead of the broker
            data = wire(s, topic, b"ahead %d" % i, time.monotonic() + 1.0)
            assert hs.conn.send(m.publish(topic, data, qos=1 + i % 2, packet_id=i + 1))
            packets += hs.conn.sync()
        refusals = [m.parse_ack(p) for p in packets if p.type in (m.PUBACK, m.PUBREC)]
        assert [a.reason for a in refusals] == [m.NOT_AUTHORIZED] * 12
        assert all(a.props == {} for a in refusals)  # no reason string from 2.0.11
        asks = [m.parse_publish(p) for p in packets if p.type == m.PUBLISH]
        assert asks and all(a.topic == RESYNC_TOPIC and a.qos == 0 for a in asks)
        assert len(asks) <= 3  # at most one per resync_interval_s (1 s)
        body = asks[0].payload
        assert json.loads(body[:-31])["session"] == s.session_id.hex()
        with pytest.raises(TesseraError) as stale:  # the device's own reason to resync
            s.verify(body[-31:], RESYNC_TOPIC.encode(), body[:-31], time.monotonic() + 1.0)
        assert stale.value.reason is Reason.EPOCH_OUT_OF_WINDOW
        # QoS 2 (another device, clock right): routed once; its retransmission (DUP,
        # same packet id, before PUBREL) is refused by the replay window, uncounted
        fresh = world.handshake(world.member("pi-q"))
        assert fresh.session is not None
        qtopic = "devices/pi-q/telemetry/t"
        qos2 = wire(fresh.session, qtopic, b"qos2 once", time.monotonic())
        fresh.conn.send(m.publish(qtopic, qos2, qos=2, packet_id=7))
        assert [m.parse_ack(p).reason for p in fresh.conn.sync() if p.type == m.PUBREC] == [0]
        fresh.conn.send(m.publish(qtopic, qos2, qos=2, packet_id=7, dup=True))
        assert [m.parse_ack(p).reason for p in fresh.conn.sync()
                if p.type == m.PUBREC] == [m.NOT_AUTHORIZED]
        fresh.conn.send(m.ack(m.PUBREL, 7))
        assert [m.parse_ack(p).reason for p in fresh.conn.sync() if p.type == m.PUBCOMP] == [0]
        # forgeries count: headers in the broker's epoch, tags that fail; five
        # quarantine the device and cut it off
        for i in range(5):
            data = wire(s, topic, b"forged %d" % i, time.monotonic() + 1.0)
            epoch = s.epoch_at(time.monotonic()).to_bytes(2, "big")
            forged = data[:-31] + data[-31:-22] + epoch + data[-20:]
            hs.conn.send(m.publish(topic, forged, qos=0))
        rows: list[dict[str, Any]] = []

        def quarantined_yet() -> bool:
            rows[:] = [json.loads(line) for line in world.audit_path.read_text().splitlines()]
            return any(r["event"] == "quarantined" for r in rows)

        wait_for(quarantined_yet, 10, "the forger's quarantine in the audit log")
    finally:
        world.close()
    quarantined = [r for r in rows if r["event"] == "quarantined"]
    assert [q["identity"] for q in quarantined] == [member.identity.uri]
    rejected = [r for r in rows if r["event"] == "message_rejected"]
    epoch = [r for r in rejected if r["reason"] == "epoch_out_of_window"]
    assert len(epoch) >= 12 and not any(r["counted"] for r in epoch)
    assert sum(1 for r in epoch if r["resync"]) == len(asks)
    replayed = [r for r in rejected if r["reason"] == "replayed"]
    assert len(replayed) == 1 and not replayed[0]["counted"]
    assert [r["counted"] for r in rejected if r["reason"] == "bad_tag"] == [True] * 5


@pytest.mark.broker
def test_the_device_refuses_a_broker_whose_chain_is_revoked(tmp_path: Path) -> None:
    """TesseraMqttClient(revoked=...) checks the broker's credential, every certificate
    of its chain (the agent itself has no revocation source yet: docs/AGENT.md)."""
    from tests.attacks.world import World

    world = World(tmp_path, Fleet(t0=NOW - dt.timedelta(days=1)))
    try:
        member = world.member("pi-v")
        broker_serial = format(world.broker_member.credential.chain[0].serial_number, "x")

        def client(revoked: set[str]) -> TesseraMqttClient:
            return TesseraMqttClient(
                signer=member.signer, credential=member.credential, trust=world.fleet.trust,
                host="127.0.0.1", port=world.broker.port, broker=world.identity,
                revoked=lambda c: any(s in revoked for s in c.serials))

        with pytest.raises(MqttError) as refused:
            client({broker_serial}).connect()
        assert refused.value.reason is Reason.CREDENTIAL_REVOKED
        ok = client({"1234"})
        ok.connect()
        ok.close()
    finally:
        world.close()


@pytest.mark.broker
def test_a_fleet_with_drifting_and_stepping_clocks_loses_nothing(tmp_path: Path) -> None:
    """20 agents (bench/drift.py profiles: +5 %, -5 %, +/-10 epochs once or twice,
    drift plus a step, exact), sessions of 100 ms epochs (window +/-2) and 10 s
    lifetimes, 30 s of numbered QoS 1 messages at 10/s each (5 % drift passes the window
    after 6 s, before the agent's own re-handshake 1.5 s before the end of the
    lifetime, so drift alone resyncs too): every message arrives exactly once at the
    subscriber, nobody is quarantined (the breaker trips at 5 counted rejections),
    nobody is locked out, and the resynchronisation did the work (epoch refusals at the
    broker, none counted; re-handshakes; resends)."""
    result = run_fleet(tmp_path, devices=20, seconds=30.0, epoch_ms=100, lifetime_s=10,
                       margin_s=1.5, drift=0.05, step_epochs=10, rate_hz=10.0,
                       quarantine_rejections=5)
    summary = {k: v for k, v in vars(result).items() if k != "per_device"}
    trouble = {n: d for n, d in result.per_device.items()
               if d["lost"] or d["duplicated"] or not d["connected"]}
    assert result.sent >= 20 * 250, summary
    assert (result.lost, result.duplicated) == (0, 0), (summary, trouble)
    assert (result.quarantined, result.lockouts, result.handshakes_refused) == (0, 0, 0), (
        summary, trouble)
    assert result.counted_rejections == 0, summary
    assert result.epoch_refusals > 0 and result.resyncs > 0, summary
    causes: set[str] = set()
    for device in result.per_device.values():
        causes.update(device["requests"])
    # the clocks that stepped back could not prove; the others were told or saw it
    assert "protect_epoch_out_of_window" in causes, causes
    assert causes & {"broker", "receive_epoch"}, causes
    drifting = [d for d in result.per_device.values() if d["clock"] in ("+5%", "-5%")]
    assert drifting and all(d["resyncs"] >= 1 for d in drifting), drifting
