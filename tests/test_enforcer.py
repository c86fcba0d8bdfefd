"""The broker's decisions without Mosquitto: SA1 handshake in CONNECT, proof on every
PUBLISH, ACLs, revocation and expiry of live sessions (the Mosquitto tests in
test_broker_mqtt.py run the same logic through the real broker)."""

from __future__ import annotations

import datetime as dt

import pytest

from broker_plugin.enforcer import (
    MOSQ_ACL_SUBSCRIBE,
    MOSQ_ERR_ACL_DENIED,
    MOSQ_ERR_AUTH,
    MOSQ_ERR_SUCCESS,
    Enforcer,
)
from broker_plugin.policy import parse_policy
from simulator.fleet import Fleet, Member
from structauth.credentials import TimePolicy
from structauth.handshake import Initiator, Responder
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


def connect(e: Enforcer, fleet: Fleet, member: Member, client_id: str | None = None,
            now: float = 0.0) -> Session | int:
    init = Initiator(signer=member.signer, credential=member.credential, trust=fleet.trust)
    rc, msg2 = e.connect(client_id or member.identity.uri, "127.0.0.1", "tessera-sa1",
                         init.start(), now)
    if rc != MOSQ_ERR_SUCCESS:
        return rc
    assert msg2 is not None
    return init.receive(msg2, now, TimePolicy.trusted(NOW)).session


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
