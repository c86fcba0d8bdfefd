"""Attacks on the MQTT side: a raw MQTT 5 client (tests/attacks/mqtt5.py) against a real
Mosquitto 2 with the Tessera plugin, configured as `tessera broker config` writes it.

Every case asserts the refusal, that nothing was routed (the back-end sink on ``#`` saw
nothing of it, checked behind a fence), retained or audited as a success (behind an
audit fence), and that the live device beside it was not disturbed (connected, every
QoS 1 message acknowledged 0x00 and delivered exactly once).
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from simulator.fleet import Fleet
from structauth.session import HEADER_SIZE
from tests.attacks import mqtt5 as m
from tests.attacks.world import (
    AUTH_METHOD,
    Bystanders,
    Handshake,
    Refused,
    World,
    proven,
)
from tests.support import wait_for

pytestmark = pytest.mark.broker

SUCCESS_EVENTS = {"handshake_ok", "step_up_ok", "session_confirmed"}


# ------------------------------------------------------------------ helpers


def refused_connect(conn: m.Conn, *, v5: bool = True, timeout: float = 5.0) -> str:
    """The broker's answer to a CONNECT it must refuse: a failure CONNACK, a DISCONNECT
    or a closed socket, and the socket closed after it. Returns what happened."""
    p = conn.read(timeout)
    if p is None:
        assert conn.closed, "the broker neither answered nor closed the connection"
        return "closed"
    if p.type == m.CONNACK:
        rc = m.parse_connack(p, v5=v5).reason
        assert rc != m.SUCCESS, "CONNACK 0x00: the connection was accepted"
        how = f"CONNACK {rc:#x}"
    elif p.type == m.DISCONNECT:
        how = f"DISCONNECT {m.parse_disconnect(p):#x}"
    else:
        raise AssertionError(f"the handshake went on: {p!r} {p.body[:30]!r}")
    assert conn.wait_closed(timeout), f"{how} but the connection stayed open"
    return how


def no_success(records: list[dict[str, Any]], *client_ids: str,
               allow: tuple[Handshake, ...] = ()) -> None:
    """No success record (handshake_ok, step-up, confirmation) for these client ids or
    identities among ``records``, except the sessions of the genuine handshakes in
    ``allow`` (the audit writer is asynchronous: their records may land late)."""
    mine = {hs.session.session_id.hex() for hs in allow if hs.session is not None}
    bad = [r for r in records if r.get("event") in SUCCESS_EVENTS
           and r.get("session") not in mine
           and (r.get("client_id") in client_ids or r.get("identity") in client_ids)]
    assert not bad, f"audited as a success: {bad}"


def refused_count(world: World) -> float:
    return world.metrics().get('tessera_handshakes_total{result="refused"}', 0.0)


def attacker(world: World, name: str = "pi-evil", **kw: Any) -> Handshake:
    """An enrolled device turned attacker: a genuine session of its own."""
    return world.handshake(world.member(name), **kw)


def send_and_settle(conn: m.Conn, data: bytes) -> list[m.Packet]:
    """Send, then PINGREQ/PINGRESP: the broker has handled ``data`` when this returns."""
    assert conn.send(data)
    return conn.sync()


def puback(seen: list[m.Packet]) -> int:
    """The reason code of the first PUBACK among ``seen``."""
    codes = [m.parse_ack(p).reason for p in seen if p.type == m.PUBACK]
    assert codes, f"no PUBACK in {seen}"
    return codes[0]


def uri(world: World, name: str) -> str:
    return world.member(name).identity.uri


# ------------------------------------------------------------------ CONNECT without SA1


def _plain_connect_cases(live: str) -> list[tuple[str, bytes, bool]]:
    will = m.Will("devices/pi-live/telemetry/live", b"ANON-WILL", qos=1, retain=True)
    return [
        ("anonymous-v5", m.connect("anon-1"), True),
        ("anonymous-v5-live-client-id", m.connect(live), True),
        ("anonymous-v5-with-will", m.connect("anon-2", will=will), True),
        ("mqtt-3.1.1", m.connect("old-1", level=4), False),
        ("mqtt-3.1.1-live-client-id", m.connect(live, level=4, will=will), False),
        ("mqtt-3.1", m.connect("older-1", level=3), False),
        ("username-password-v5", m.connect("user-1", username="admin",
                                           password=b"admin"), True),
        ("username-password-live-id", m.connect(live, username=live, password=b"x"), True),
        ("username-password-3.1.1", m.connect("user-2", level=4, username="admin",
                                              password=b"admin"), False),
        ("bad-auth-method", m.connect("scram-1", auth_method="SCRAM-SHA-256",
                                      auth_data=b"n,,n=user,r=abc"), True),
        ("auth-method-no-data", m.connect(live, auth_method=AUTH_METHOD), True),
        ("auth-data-no-method", m.connect("nomethod-1", props=[
            (m.AUTHENTICATION_DATA, b"SA1\x21" + bytes(40))]), True),
        ("junk-msg1", m.connect(live, auth_method=AUTH_METHOD, auth_data=os.urandom(300)),
         True),
        ("v1-msg1-type", m.connect(live, auth_method=AUTH_METHOD,
                                   auth_data=b"SA1\x01\x00\x01" + bytes(200)), True),
        ("method-wrong-case", m.connect("case-1", auth_method="Tessera-SA1",
                                        auth_data=b"x"), True),
    ]


@pytest.mark.parametrize("case", range(15), ids=[c[0] for c in _plain_connect_cases("x")])
def test_connect_without_sa1_is_refused(world: World, by: Bystanders, case: int) -> None:
    _, data, v5 = _plain_connect_cases(by.live.client_id)[case]
    start, mark = len(world.audit()), by.sink.mark()
    conn = world.open()
    conn.send(data)
    refused_connect(conn, v5=v5)
    assert not by.routed(mark), "something was routed"
    no_success(world.audit_fence(start), by.live.client_id, "anon-1", "anon-2", "old-1",
               "user-1", "user-2", "scram-1", "nomethod-1", "older-1", "case-1")
    by.undisturbed()


# ------------------------------------------------------------------ msg1 replay


def test_msg1_replayed_now_is_refused(world: World, by: Bystanders) -> None:
    """A msg1 the broker has just answered, replayed: refused by the nonce cache
    before any signature work, and no session."""
    victim = world.member("pi-replay")
    hs = world.handshake(victim)
    hs.conn.send(m.disconnect())
    hs.conn.close()
    start, before = len(world.audit()), refused_count(world)
    for client_id in (victim.identity.uri, by.live.client_id):
        conn = world.open()
        conn.send(m.connect(client_id, auth_method=AUTH_METHOD, auth_data=hs.msg1))
        refused_connect(conn)
    assert refused_count(world) >= before + 2
    records = world.audit_fence(start)
    no_success(records, victim.identity.uri, by.live.client_id, allow=(hs,))
    by.undisturbed()


def _takeover_with_captured_msg1(world: World, by: Bystanders, msg3: bytes | None,
                                 publish_junk: int = 0) -> str:
    """An on-path attacker withheld the live device's msg1 (so no nonce cache has it,
    as after the TTL, a restart or at a replica) and plays it with the live device's
    client id. It gets msg2 at best and cannot answer it."""
    _, msg1 = world.msg1(by.live.member)
    start, mark = len(world.audit()), by.sink.mark()
    conn = world.open()
    conn.send(m.connect(by.live.client_id, auth_method=AUTH_METHOD, auth_data=msg1,
                        will=m.Will(by.live.topic, b"TAKEOVER-WILL", 1, True)))
    p = conn.read(5)
    how = "closed"
    if p is not None and p.type == m.AUTH:
        got = m.parse_auth(p)
        assert got.reason == m.CONTINUE_AUTHENTICATION and got.data
        # the broker holds a pending handshake: the live device must still be there
        by.fence()
        assert by.live.alive(), "the pending handshake took the client id over"
        for i in range(publish_junk):
            if not conn.send(m.publish(by.live.topic, b"JUNK" + os.urandom(40), qos=i % 2,
                                       packet_id=i + 1)):
                break
        if msg3 is not None and not conn.closed:
            conn.send(m.auth(m.CONTINUE_AUTHENTICATION, AUTH_METHOD, msg3))
        how = refused_connect(conn, timeout=15)
    elif p is not None:
        conn.sock.settimeout(5)
        how = refused_connect_packet(conn, p)
    assert not by.routed(mark, b"TAKEOVER-WILL") and not by.routed(mark, b"JUNK")
    no_success(world.audit_fence(start), by.live.client_id)
    by.undisturbed()
    return how


def refused_connect_packet(conn: m.Conn, p: m.Packet) -> str:
    if p.type == m.CONNACK:
        rc = m.parse_connack(p).reason
        assert rc != m.SUCCESS
        conn.wait_closed()
        return f"CONNACK {rc:#x}"
    assert p.type == m.DISCONNECT, p
    return f"DISCONNECT {m.parse_disconnect(p):#x}"


def test_takeover_with_captured_msg1_and_forged_msg3(world: World, by: Bystanders) -> None:
    sid = bytes(8)
    _takeover_with_captured_msg1(world, by, b"SA1\x23\x00\x01" + sid + os.urandom(32))


def test_takeover_with_captured_msg1_and_empty_msg3(world: World, by: Bystanders) -> None:
    _takeover_with_captured_msg1(world, by, b"")


def test_takeover_with_captured_msg1_and_msg2_echoed(world: World, by: Bystanders) -> None:
    """msg3 replaced by the msg2 the broker sent (a reflection)."""
    _, msg1 = world.msg1(by.live.member)
    conn = world.open()
    conn.send(m.connect(by.live.client_id, auth_method=AUTH_METHOD, auth_data=msg1))
    p = conn.expect(m.AUTH)
    conn.send(m.auth(m.CONTINUE_AUTHENTICATION, AUTH_METHOD, m.parse_auth(p).data))
    refused_connect(conn)
    by.undisturbed()


def test_captured_msg1_then_publish_flood_locks_nobody_out(world: World,
                                                          by: Bystanders) -> None:
    """The issue's lock-out: 600 junk publishes on a replayed, unconfirmed handshake
    must not be charged to the device (quarantine_rejections is 500): the victim's
    live session keeps working and its next handshake succeeds."""
    victim = world.member("pi-victim")
    hs = world.handshake(victim)
    assert hs.session is not None
    _, msg1 = world.msg1(victim)
    conn = world.open()
    conn.send(m.connect(victim.identity.uri, auth_method=AUTH_METHOD, auth_data=msg1))
    conn.read(5)  # msg2 (or a refusal)
    for i in range(600):
        if not conn.send(m.publish(f"devices/pi-victim/telemetry/{i % 7}",
                                   b"JUNK" + os.urandom(40), qos=i % 2, packet_id=i + 1)):
            break
    conn.wait_closed(12)
    topic = "devices/pi-victim/telemetry/t"
    mark = by.sink.mark()
    send_and_settle(hs.conn, m.publish(topic, proven(hs.session, topic, b"still-me"), qos=1))
    assert [p.payload for p in by.routed(mark, topic_prefix="devices/pi-victim/")] == [
        b"still-me"]
    again = world.handshake(victim)  # not quarantined
    again.conn.close()
    assert world.metrics().get("tessera_quarantined_devices", 0) == 0
    by.undisturbed()


def test_msg1_for_another_broker_is_refused(world: World, by: Bystanders) -> None:
    """A msg1 that names another broker (captured there) is refused before any
    cryptography: WRONG_IDENTITY."""
    other = world.fleet.member("broker", "mqtt-other").identity
    _, msg1 = world.msg1(world.member("pi-far"), peer=other)
    start = len(world.audit())
    conn = world.open()
    conn.send(m.connect(uri(world, "pi-far"), auth_method=AUTH_METHOD, auth_data=msg1))
    refused_connect(conn)
    no_success(world.audit_fence(start), uri(world, "pi-far"))
    by.undisturbed()


def test_msg1_replayed_at_another_broker(world: World, fleet: Fleet,
                                         tmp_path_factory: pytest.TempPathFactory,
                                         by: Bystanders) -> None:
    """A msg1 captured at this broker, played at a second broker (its own identity):
    refused there, and the genuine device's session here is untouched."""
    hs = world.handshake(world.member("pi-roam"))
    other = World(tmp_path_factory.mktemp("broker-b"), fleet, name="mqtt-2", metrics=False)
    try:
        other.share_members(world)
        start = len(other.audit())
        conn = other.open()
        conn.send(m.connect(uri(world, "pi-roam"), auth_method=AUTH_METHOD,
                            auth_data=hs.msg1))
        refused_connect(conn)
        no_success(other.audit_fence(start), uri(world, "pi-roam"))
    finally:
        other.close()
    # the original session still proves messages at the first broker
    assert hs.session is not None
    topic = "devices/pi-roam/telemetry/t"
    mark = by.sink.mark()
    send_and_settle(hs.conn, m.publish(topic, proven(hs.session, topic, b"roam-ok"), qos=1))
    assert [p.payload for p in by.routed(mark, topic_prefix=topic)] == [b"roam-ok"]
    by.undisturbed()


def test_msg1_replayed_after_a_broker_restart(fleet: Fleet,
                                              tmp_path_factory: pytest.TempPathFactory) -> None:
    """The nonce cache does not survive a restart: the replay gets msg2 at most, never
    a session, and the genuine device reconnects afterwards."""
    w = World(tmp_path_factory.mktemp("broker-restart"), fleet, metrics=False)
    try:
        victim = w.member("pi-boot")
        hs = w.handshake(victim)
        hs.conn.close()
        w.broker.restart()
        start = len(w.audit())
        conn = w.open()
        conn.send(m.connect(victim.identity.uri, auth_method=AUTH_METHOD, auth_data=hs.msg1))
        p = conn.read(5)
        if p is not None and p.type == m.AUTH:
            conn.send(m.auth(m.CONTINUE_AUTHENTICATION, AUTH_METHOD,
                             b"SA1\x23\x00\x01" + os.urandom(40)))
            refused_connect(conn)
        elif p is not None:
            refused_connect_packet(conn, p)
        no_success(w.audit_fence(start), victim.identity.uri, allow=(hs,))
        again = w.handshake(victim)  # the real device is not locked out
        again.conn.close()
    finally:
        w.close()


def test_msg1_replayed_after_the_nonce_ttl(fleet: Fleet,
                                           tmp_path_factory: pytest.TempPathFactory) -> None:
    """With a short nonce TTL, a replay after it reaches the responder again: msg2 at
    most, never a session."""
    import broker_plugin.host

    if "nonce_ttl" not in Path(broker_plugin.host.__file__).read_text():
        pytest.skip("no plugin option shortens the nonce TTL (600 s); a msg1 the cache "
                    "no longer holds is what the captured-msg1 cases replay")
    w = World(tmp_path_factory.mktemp("broker-ttl"), fleet, metrics=False,
              raw_options={"nonce_ttl_s": "0.5"})
    try:
        victim = w.member("pi-ttl")
        hs = w.handshake(victim)
        t_sent = time.monotonic()
        hs.conn.close()
        wait_for(lambda: time.monotonic() > t_sent + 0.6, 2, "the nonce TTL to pass")
        start = len(w.audit())
        conn = w.open()
        conn.send(m.connect(victim.identity.uri, auth_method=AUTH_METHOD, auth_data=hs.msg1))
        p = conn.read(5)
        if p is not None and p.type == m.AUTH:
            conn.send(m.auth(m.CONTINUE_AUTHENTICATION, AUTH_METHOD, hs.msg2 or b""))
            refused_connect(conn)
        elif p is not None:
            refused_connect_packet(conn, p)
        no_success(w.audit_fence(start), victim.identity.uri, allow=(hs,))
    finally:
        w.close()


# ------------------------------------------------------------------ client id


def test_client_id_mismatch_is_refused(world: World, by: Bystanders) -> None:
    """A genuine device's own msg1 under the live device's client id: refused, and the
    live device stays connected (no takeover)."""
    start = len(world.audit())
    with pytest.raises(Refused):
        world.handshake(world.member("pi-mallory"), client_id=by.live.client_id)
    with pytest.raises(Refused):
        world.handshake(world.member("pi-mallory"), client_id="pi-live")
    no_success(world.audit_fence(start), by.live.client_id, "pi-live")
    by.undisturbed()


def test_takeover_of_a_pending_handshake_by_a_second_pending(world: World,
                                                             by: Bystanders) -> None:
    """Two captured msg1s of the live device at once, neither answered: neither takes
    over, each is refused."""
    conns = []
    for _ in range(2):
        _, msg1 = world.msg1(by.live.member)
        conn = world.open()
        conn.send(m.connect(by.live.client_id, auth_method=AUTH_METHOD, auth_data=msg1))
        conns.append(conn)
    for conn in conns:
        p = conn.read(5)
        assert p is not None
        if p.type == m.AUTH:
            conn.send(m.auth(m.CONTINUE_AUTHENTICATION, AUTH_METHOD, b"\x00" * 46))
            refused_connect(conn)
        else:
            refused_connect_packet(conn, p)
    by.undisturbed()


# ------------------------------------------------------------------ msg3


def _pending(world: World, name: str) -> tuple[m.Conn, Any, bytes]:
    """A genuine device's CONNECT answered with msg2: (conn, initiator, msg2)."""
    ini, msg1 = world.msg1(world.member(name))
    conn = world.open()
    conn.send(m.connect(uri(world, name), auth_method=AUTH_METHOD, auth_data=msg1))
    got = m.parse_auth(conn.expect(m.AUTH))
    assert got.reason == m.CONTINUE_AUTHENTICATION and got.data
    return conn, ini, got.data


@pytest.mark.parametrize("how", ["forged-mac", "other-session-id", "truncated", "missing",
                                 "v1-type", "msg1-again", "trailing-byte"])
def test_msg3_forged_or_missing_is_refused(world: World, by: Bystanders, how: str) -> None:
    conn, ini, msg2 = _pending(world, "pi-m3")
    from structauth.credentials import TimePolicy  # noqa: F401 - for the reader
    from tests.attacks.world import now_policy

    good = ini.receive(msg2, time.monotonic(), now_policy()).reply
    bad = {
        "forged-mac": good[:-1] + bytes([good[-1] ^ 1]),
        "other-session-id": good[:6] + os.urandom(8) + good[14:],
        "truncated": good[:-5],
        "missing": None,
        "v1-type": b"SA1\x02" + good[4:],
        "msg1-again": None,
        "trailing-byte": good + b"\x00",
    }[how]
    start = len(world.audit())
    if how == "msg1-again":
        _, again = world.msg1(world.member("pi-m3"))
        conn.send(m.auth(m.CONTINUE_AUTHENTICATION, AUTH_METHOD, again))
    elif bad is None:
        conn.send(m.auth(m.CONTINUE_AUTHENTICATION, AUTH_METHOD))
    else:
        conn.send(m.auth(m.CONTINUE_AUTHENTICATION, AUTH_METHOD, bad))
    refused_connect(conn)
    no_success(world.audit_fence(start), uri(world, "pi-m3"))
    by.undisturbed()


def test_msg3_of_another_connection_is_refused(world: World, by: Bystanders) -> None:
    """Two devices pending; A's genuine msg3 sent on B's connection is refused, and A
    can still finish (a pending handshake is only spent by its own connection)."""
    from tests.attacks.world import now_policy

    conn_a, ini_a, msg2_a = _pending(world, "pi-ma")
    conn_b, _, _ = _pending(world, "pi-mb")
    msg3_a = ini_a.receive(msg2_a, time.monotonic(), now_policy()).reply
    conn_b.send(m.auth(m.CONTINUE_AUTHENTICATION, AUTH_METHOD, msg3_a))
    refused_connect(conn_b)
    conn_a.send(m.auth(m.CONTINUE_AUTHENTICATION, AUTH_METHOD, msg3_a))
    ack = m.parse_connack(conn_a.expect(m.CONNACK))
    assert ack.reason == m.SUCCESS
    conn_a.close()
    by.undisturbed()


@pytest.fixture(scope="module")
def short(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bystanders]:
    """A second broker whose pending handshakes last 1 s (plugin_opt_pending_timeout_s),
    with its own live device and sink."""
    w = World(tmp_path_factory.mktemp("broker-short"), fleet,
              raw_options={"pending_timeout_s": "1"})
    bystanders = Bystanders(w)
    try:
        yield bystanders
    finally:
        bystanders.stop()
        w.close()


def test_msg3_never_sent_the_pending_handshake_ends(short: Bystanders) -> None:
    """A CONNECT left pending: the broker drops the pending handshake at its deadline
    (counted ``expired``), having granted nothing; whatever the client sends after
    that is refused. The TCP connection itself stays open until the client or
    max_connections ends it: Mosquitto 2.0.11 has no CONNECT timeout and no way for a
    plugin to drop a client that is still authenticating (docs/MQTT.md, limits)."""
    world = short.world
    start = len(world.audit())
    expired0 = world.metrics().get('tessera_handshakes_total{result="expired"}', 0.0)
    conn, _, _ = _pending(world, "pi-silent")
    t0 = time.monotonic()
    wait_for(lambda: world.metrics().get('tessera_handshakes_total{result="expired"}', 0.0)
             > expired0, 5, "the pending handshake to expire")
    print(f"pending handshake expired after {time.monotonic() - t0:.2f} s; connection "
          f"{'closed' if conn.closed else 'still open'}")
    conn.send(m.auth(m.CONTINUE_AUTHENTICATION, AUTH_METHOD, bytes(46)))
    refused_connect(conn)
    no_success(world.audit_fence(start), uri(world, "pi-silent"))
    short.undisturbed()


def test_msg3_late_is_refused(short: Bystanders) -> None:
    """The genuine msg3, sent after the pending deadline: refused (if the broker has not
    closed the connection already)."""
    from tests.attacks.world import now_policy

    world = short.world
    start = len(world.audit())
    conn, ini, msg2 = _pending(world, "pi-late3")
    msg3 = ini.receive(msg2, time.monotonic(), now_policy()).reply
    t0 = time.monotonic()
    wait_for(lambda: time.monotonic() > t0 + 1.3, 3, "the pending deadline")
    conn.send(m.auth(m.CONTINUE_AUTHENTICATION, AUTH_METHOD, msg3))
    refused_connect(conn)
    no_success(world.audit_fence(start), uri(world, "pi-late3"))
    short.undisturbed()


# ------------------------------------------------------------------ AUTH out of order


def test_auth_before_connect_is_a_protocol_error(world: World, by: Bystanders) -> None:
    _, msg1 = world.msg1(world.member("pi-auth0"))
    for reason in (m.CONTINUE_AUTHENTICATION, m.REAUTHENTICATE, m.SUCCESS):
        conn = world.open()
        conn.send(m.auth(reason, AUTH_METHOD, msg1))
        assert conn.wait_closed(5), f"AUTH {reason:#x} before CONNECT was not refused"
    by.undisturbed()


@pytest.mark.parametrize("how", ["reauthenticate", "success", "other-method", "no-method",
                                 "second-connect", "publish", "subscribe"])
def test_out_of_order_packets_during_the_handshake(world: World, by: Bystanders,
                                                   how: str) -> None:
    conn, _, _ = _pending(world, "pi-ooo")
    mark = by.sink.mark()
    _, msg1 = world.msg1(world.member("pi-ooo"))
    data = {
        "reauthenticate": m.auth(m.REAUTHENTICATE, AUTH_METHOD, msg1),
        "success": m.auth(m.SUCCESS, AUTH_METHOD, b""),
        "other-method": m.auth(m.CONTINUE_AUTHENTICATION, "SCRAM-SHA-1", b"x"),
        "no-method": m.auth(m.CONTINUE_AUTHENTICATION, None, b"x" * 46),
        "second-connect": m.connect(uri(world, "pi-ooo"), auth_method=AUTH_METHOD,
                                    auth_data=msg1),
        "publish": m.publish("devices/pi-ooo/telemetry/t", b"PRE-AUTH" + bytes(31), qos=1,
                             packet_id=1),
        "subscribe": m.subscribe(1, [("#", 1)]),
    }[how]
    conn.send(data)
    refused_connect(conn)
    assert not by.routed(mark, b"PRE-AUTH")
    by.undisturbed()


@pytest.mark.parametrize("how", ["continue-unasked", "success-unasked", "other-method",
                                 "second-connect"])
def test_out_of_order_auth_on_a_live_connection(world: World, by: Bystanders,
                                                how: str) -> None:
    hs = attacker(world, "pi-late")
    data = {
        "continue-unasked": m.auth(m.CONTINUE_AUTHENTICATION, AUTH_METHOD, hs.msg3),
        "success-unasked": m.auth(m.SUCCESS, AUTH_METHOD, b""),
        "other-method": m.auth(m.REAUTHENTICATE, "SCRAM-SHA-1", b"x"),
        "second-connect": m.connect(uri(world, "pi-late"), auth_method=AUTH_METHOD,
                                    auth_data=hs.msg1),
    }[how]
    hs.conn.send(data)
    assert hs.conn.wait_closed(5), "the broker kept the connection after a protocol error"
    by.undisturbed()


def test_reauth_with_another_devices_msg1_is_refused(world: World, by: Bystanders) -> None:
    """An enrolled attacker re-authenticates its own connection with the live device's
    (captured, unused) msg1: it must not become the live device."""
    hs = attacker(world, "pi-switch")
    _, msg1 = world.msg1(by.live.member)
    start = len(world.audit())
    hs.conn.send(m.auth(m.REAUTHENTICATE, AUTH_METHOD, msg1))
    p = hs.conn.read(5)
    if p is not None and p.type == m.AUTH:
        hs.conn.send(m.auth(m.CONTINUE_AUTHENTICATION, AUTH_METHOD, bytes(46)))
        p = hs.conn.read(5)
    assert p is None or p.type in (m.CONNACK, m.DISCONNECT), p
    assert hs.conn.wait_closed(5)
    no_success(world.audit_fence(start), by.live.client_id, uri(world, "pi-switch"),
               allow=(hs,))
    by.undisturbed()


@pytest.mark.parametrize("how", ["replayed-msg1", "forged-msg3", "no-msg3"])
def test_reauth_without_keys_does_not_replace_the_session(world: World, by: Bystanders,
                                                          how: str) -> None:
    """Re-authentication (AUTH 0x19 -> 0x18 msg2 -> 0x18 msg3 -> AUTH 0x00) with a
    replayed msg1 or a bad msg3: refused; the old session does not survive as another."""
    hs = attacker(world, "pi-reauth")
    assert hs.session is not None
    start = len(world.audit())
    ini, msg1 = world.msg1(world.member("pi-reauth"))
    hs.conn.send(m.auth(m.REAUTHENTICATE, AUTH_METHOD, hs.msg1 if how == "replayed-msg1"
                        else msg1))
    p = hs.conn.read(5)
    if p is not None and p.type == m.AUTH and how != "replayed-msg1":
        got = m.parse_auth(p)
        assert got.reason == m.CONTINUE_AUTHENTICATION and got.data
        if how == "forged-msg3":
            from tests.attacks.world import now_policy

            good = ini.receive(got.data, time.monotonic(), now_policy()).reply
            hs.conn.send(m.auth(m.CONTINUE_AUTHENTICATION, AUTH_METHOD,
                                good[:-1] + bytes([good[-1] ^ 1])))
            p = hs.conn.read(5)
        else:
            hs.conn.send(m.auth(m.CONTINUE_AUTHENTICATION, AUTH_METHOD))
            p = hs.conn.read(5)
    assert p is None or p.type in (m.CONNACK, m.DISCONNECT), p
    assert hs.conn.wait_closed(5)
    no_success(world.audit_fence(start), uri(world, "pi-reauth"), allow=(hs,))
    by.undisturbed()


# ------------------------------------------------------------------ publishes


def _bad_publishes(world: World, hs: Handshake, live_wire: bytes, live_topic: str,
                   ) -> dict[str, tuple[str, bytes, str]]:
    """name -> (topic, payload on the wire, reason the audit must give)."""
    assert hs.session is not None
    own = "devices/pi-evil/telemetry/t"
    good = proven(hs.session, own, b"ATTACK genuine")
    moved = proven(hs.session, "devices/pi-evil/telemetry/a", b"ATTACK moved")
    altered = bytearray(proven(hs.session, own, b"ATTACK altered"))
    altered[0] ^= 0x20
    return {
        "forged": (own, good[:-1] + bytes([good[-1] ^ 1]), "bad_tag"),
        "replayed": (own, good, "replayed"),  # sent once genuinely first, below
        "moved": ("devices/pi-evil/telemetry/b", moved, "bad_tag"),
        "altered": (own, bytes(altered), "bad_tag"),
        "truncated": (own, b"ATTACK" + good[-HEADER_SIZE + 12:], "truncated"),
        "header-cut": (own, good[:-1], ""),
        "unproven": (own, b"ATTACK no proof at all, long enough to hold a header.", ""),
        "empty": (own, b"", "truncated"),
        "other-devices-topic": (live_topic, proven(hs.session, live_topic, b"ATTACK other"),
                                "not_authorized"),
        "live-wire-on-its-topic": (live_topic, live_wire, ""),
        "live-wire-moved": (own, live_wire, ""),
        "step-up-topic": ("tessera/step-up", proven(hs.session, "tessera/step-up",
                                                    b'ATTACK {"nonce":"AAAA"}'), ""),
        "fanout-anchor-topic": ("tessera/fanout/anchor",
                                proven(hs.session, "tessera/fanout/anchor", b"ATTACK k0"), ""),
        "fanout-key-topic": ("tessera/fanout/key",
                             proven(hs.session, "tessera/fanout/key", b"ATTACK key"), ""),
        "own-will-topic": ("devices/pi-evil/will",
                           proven(hs.session, "devices/pi-evil/will", b"ATTACK will"),
                           "not_authorized"),
        "commands-topic": ("devices/pi-live/commands/reboot",
                           proven(hs.session, "devices/pi-live/commands/reboot",
                                  b"ATTACK cmd"), "not_authorized"),
    }


PUBLISH_CASES = ["forged", "replayed", "moved", "altered", "truncated", "header-cut",
                 "unproven", "empty", "other-devices-topic", "live-wire-on-its-topic",
                 "live-wire-moved", "commands-topic", "own-will-topic", "step-up-topic",
                 "fanout-anchor-topic", "fanout-key-topic"]


@pytest.mark.parametrize("qos", [0, 1, 2])
@pytest.mark.parametrize("case", PUBLISH_CASES)
def test_bad_publish_is_dropped(world: World, by: Bystanders, case: str, qos: int) -> None:
    hs = attacker(world)
    assert hs.session is not None
    # a message the live device really sent (as captured on its link): its proof is
    # under the live device's session
    live_wire = proven(world.handshake(world.member("pi-captured")).session,  # type: ignore[arg-type]
                       by.live.topic, b"ATTACK captured")
    topic, payload, reason = _bad_publishes(world, hs, live_wire, by.live.topic)[case]
    mark, start = by.sink.mark(), len(world.audit())
    if case == "replayed":  # the genuine first copy goes through, the replay must not
        send_and_settle(hs.conn, m.publish(topic, payload, qos=1, packet_id=99))
        first = by.routed(mark, b"ATTACK genuine")
        assert len(first) == 1
        mark = by.sink.mark()
    seen = send_and_settle(hs.conn, m.publish(topic, payload, qos=qos, packet_id=7))
    if qos == 1:
        acks = [m.parse_ack(p) for p in seen if p.type == m.PUBACK]
        assert acks and acks[0].reason >= 0x80, f"PUBACK {acks}"
    elif qos == 2:
        recs = [m.parse_ack(p) for p in seen if p.type == m.PUBREC]
        assert recs and recs[0].reason >= 0x80, f"PUBREC {recs}"
        # PUBREL anyway: the broker holds nothing to release
        send_and_settle(hs.conn, m.ack(m.PUBREL, 7))
    assert not by.routed(mark, b"ATTACK"), "the bad publish was routed"
    records = world.audit_fence(start)
    rejected = [r for r in records if r.get("event") == "message_rejected"
                and r.get("client_id") == uri(world, "pi-evil")]
    assert rejected, "the rejection was not audited"
    if reason:
        assert rejected[0].get("reason") == reason, rejected
    by.undisturbed()


def test_qos2_duplicate_with_other_payload_is_not_routed(world: World,
                                                         by: Bystanders) -> None:
    """QoS 2: a genuine PUBLISH (PUBREC 0x00 held), then the same packet id again with
    DUP and a forged payload, then PUBREL: exactly the genuine message, once."""
    hs = attacker(world, "pi-q2")
    assert hs.session is not None
    topic = "devices/pi-q2/telemetry/t"
    mark = by.sink.mark()
    seen = send_and_settle(hs.conn, m.publish(topic, proven(hs.session, topic, b"Q2 real"),
                                              qos=2, packet_id=5))
    assert [m.parse_ack(p).reason for p in seen if p.type == m.PUBREC] == [0]
    forged = proven(hs.session, topic, b"Q2 real")
    forged = b"Q2 fake" + forged[7:]
    send_and_settle(hs.conn, m.publish(topic, forged, qos=2, packet_id=5, dup=True))
    seen = send_and_settle(hs.conn, m.ack(m.PUBREL, 5))
    assert any(p.type == m.PUBCOMP for p in seen)
    got = [p.payload for p in by.routed(mark, topic_prefix=topic)]
    assert got == [b"Q2 real"], got
    by.undisturbed()


@pytest.mark.parametrize("topic", [b"devices/pi-evil/telemetry/#", b"devices/+/telemetry/t",
                                   b"devices/pi-evil/telemetry/\x00x",
                                   b"devices/pi-evil/telemetry/\xff\xfe", b""])
def test_publish_to_an_invalid_topic_name(world: World, by: Bystanders, topic: bytes) -> None:
    """Wildcards, NUL, ill-formed UTF-8 or an empty topic without an alias: a protocol
    error (Mosquitto closes the connection) or a refusal; nothing routed."""
    hs = attacker(world, "pi-badtopic")
    assert hs.session is not None
    mark = by.sink.mark()
    hs.conn.send(m.publish(topic, b"ATTACK badtopic" + bytes(31), qos=1))
    if not hs.conn.wait_closed(2):
        assert puback(hs.conn.sync()) >= 0x80
    assert not by.routed(mark, b"ATTACK")
    by.undisturbed()


# ------------------------------------------------------------------ topic aliases


def test_topic_alias_cannot_move_a_proof(world: World, by: Bystanders) -> None:
    """Alias 1 -> own topic A (genuine, delivered); then a publish by alias 1 whose
    proof is for topic B; then alias 1 re-bound to another device's topic."""
    hs = attacker(world, "pi-alias")
    assert hs.session is not None
    a, b = "devices/pi-alias/telemetry/a", "devices/pi-alias/telemetry/b"
    mark = by.sink.mark()
    send_and_settle(hs.conn, m.publish(a, proven(hs.session, a, b"ALIAS genuine"), qos=1,
                                       packet_id=1, props=[(m.TOPIC_ALIAS, 1)]))
    send_and_settle(hs.conn, m.publish(b"", proven(hs.session, a, b"ALIAS genuine 2"), qos=1,
                                       packet_id=2, props=[(m.TOPIC_ALIAS, 1)]))
    seen = send_and_settle(hs.conn, m.publish(b"", proven(hs.session, b, b"ATTACK moved"),
                                              qos=1, packet_id=3, props=[(m.TOPIC_ALIAS, 1)]))
    assert puback(seen) >= 0x80
    live = by.live.topic
    send_and_settle(hs.conn, m.publish(live, proven(hs.session, live, b"ATTACK rebind"), qos=1,
                                       packet_id=4, props=[(m.TOPIC_ALIAS, 2)]))
    seen = send_and_settle(hs.conn, m.publish(b"", proven(hs.session, live, b"ATTACK alias2"),
                                              qos=1, packet_id=5, props=[(m.TOPIC_ALIAS, 2)]))
    assert puback(seen) >= 0x80
    got = [p.payload for p in by.routed(mark) if b"ALIAS" in p.payload or b"ATTACK" in p.payload]
    assert got == [b"ALIAS genuine", b"ALIAS genuine 2"], got
    by.undisturbed()


@pytest.mark.parametrize("alias", [0, 11, 0xFFFF, "unset"])
def test_topic_alias_out_of_range_or_unset(world: World, by: Bystanders,
                                           alias: int | str) -> None:
    """Alias 0, beyond the broker's Topic Alias Maximum, or used before it is set: a
    protocol error (DISCONNECT 0x94 / close); nothing routed."""
    hs = attacker(world, "pi-alias2")
    assert hs.session is not None
    topic = "devices/pi-alias2/telemetry/a"
    mark = by.sink.mark()
    value = 1 if alias == "unset" else int(alias)
    hs.conn.send(m.publish(b"" if alias in ("unset", 0) else topic,
                           proven(hs.session, topic, b"ATTACK alias"), qos=1, packet_id=1,
                           props=[(m.TOPIC_ALIAS, value)]))
    packets = hs.conn.drain(2) if not hs.conn.wait_closed(3) else []
    assert hs.conn.closed or any(
        p.type == m.PUBACK and m.parse_ack(p).reason >= 0x80 for p in packets), packets
    assert not by.routed(mark, b"ATTACK")
    by.undisturbed()


# ------------------------------------------------------------------ wills


def _will_world_check(world: World, by: Bystanders, mark: int, marker: bytes,
                      subscriber: m.Conn | None = None) -> None:
    """After a will should have fired: nothing carrying ``marker`` reached the sink
    or is retained."""
    assert not by.routed(mark, marker), "the will was published"
    retained = fresh_retained(world, "#")
    assert not [p for p in retained if marker in p.payload], "the will was retained"


def fresh_retained(world: World, topic_filter: str) -> list[m.Publish]:
    """Retained messages a new back-end subscriber gets for ``topic_filter``."""
    hs = world.handshake(world.member("retained-reader", "broker"))
    hs.conn.send(m.subscribe(1, [(topic_filter, 1)]))
    hs.conn.expect(m.SUBACK)
    got = [m.parse_publish(p) for p in hs.conn.sync() if p.type == m.PUBLISH]
    hs.conn.send(m.disconnect())
    hs.conn.close()
    return [p for p in got if p.retain]


def _closed_in_broker(world: World, log_mark: int, client_id: str) -> None:
    """Wait until the broker has handled the end of ``client_id``'s connection."""
    world.wait_log(rf"(Client {client_id} (closed its connection|disconnected)|"
                   rf"Socket error on client {client_id})", log_mark)


WILL_CASES = ["telemetry-topic-abrupt", "telemetry-topic-disconnect-with-will",
              "telemetry-topic-takeover", "will-topic-with-delay", "other-devices-will-topic",
              "live-topic-retained", "commands-topic", "control-topic", "sys-topic",
              "share-topic", "unconfirmed-handshake", "no-keys-other-will-topic"]


@pytest.mark.parametrize("case", WILL_CASES)
def test_will_is_not_a_way_in(world: World, by: Bystanders, case: str) -> None:
    """A Will carries no proof. It may only be published on the device's own will topic
    (policy ``will``), for a confirmed session, at the end of that connection; any other
    Will is refused at CONNECT or never published, and never retained elsewhere."""
    name = f"pi-will-{WILL_CASES.index(case)}"
    topic = {"other-devices-will-topic": "devices/pi-other/will",
             "no-keys-other-will-topic": "devices/pi-other/will",
             "live-topic-retained": by.live.topic,
             "commands-topic": "devices/pi-live/commands/reboot",
             "control-topic": "$CONTROL/dynamic-security/v1",
             "sys-topic": "$SYS/broker/tessera",
             "share-topic": "$share/g/devices/pi-live/telemetry/live",
             "will-topic-with-delay": f"devices/{name}/will",
             "unconfirmed-handshake": f"devices/{name}/will"}.get(
                 case, f"devices/{name}/telemetry/last")
    marker = f"WILL-{case}".encode()
    props: list[tuple[int, object]] = []
    if case == "will-topic-with-delay":
        props = [(m.WILL_DELAY_INTERVAL, 1)]
    will = m.Will(topic, marker + b" unproven", qos=1, retain=True, props=props)
    mark, start, log_mark = by.sink.mark(), len(world.audit()), world.log_mark()
    client_id = uri(world, name)
    genuine: tuple[Handshake, ...] = ()
    if case in ("unconfirmed-handshake", "no-keys-other-will-topic"):
        # an on-path attacker with a captured msg1 and no keys
        _, msg1 = world.msg1(world.member(name))
        conn = world.open()
        conn.send(m.connect(client_id, auth_method=AUTH_METHOD, auth_data=msg1, will=will))
        conn.read(5)
        conn.abort()
    else:
        try:
            hs = world.handshake(world.member(name), will=will, props=[
                (m.SESSION_EXPIRY_INTERVAL, 2)] if case == "will-topic-with-delay" else [])
            genuine = (hs,)
        except Refused:
            hs = None  # refused at CONNECT: the safest answer
        if hs is not None:
            if case == "telemetry-topic-disconnect-with-will":
                hs.conn.send(m.disconnect(m.DISCONNECT_WITH_WILL))
                hs.conn.wait_closed(5)
            elif case == "telemetry-topic-takeover":
                again = world.handshake(world.member(name))
                genuine = (hs, again)
                again.conn.send(m.disconnect())
                again.conn.close()
            else:
                hs.conn.abort()
    if genuine or case in ("unconfirmed-handshake", "no-keys-other-will-topic"):
        _closed_in_broker(world, log_mark, client_id)
    # else refused at CONNECT (Mosquitto 2.0.16+ refuses a $CONTROL/ Will itself, before
    # any plugin): the Will went with the packet, and there is no client to wait for
    if case == "will-topic-with-delay":  # past the delay and the session expiry
        t0 = time.monotonic()
        wait_for(lambda: time.monotonic() > t0 + 2.5, 4, "will delay and session expiry")
    _will_world_check(world, by, mark, marker)
    no_success(world.audit_fence(start), client_id, allow=genuine)
    by.undisturbed()


@pytest.mark.parametrize("how", ["abrupt", "disconnect-with-will"])
def test_will_on_its_own_will_topic_is_delivered_once_and_only_there(
        world: World, by: Bystanders, how: str) -> None:
    """The one legitimate Will path, as a control on the cases above: a confirmed device's
    Will on its will topic arrives once, on that topic only (where subscribers know no
    device-proven message ever comes), and a normal DISCONNECT sends none."""
    name = f"pi-lastwill-{how}"
    topic = f"devices/{name}/will"
    mark, log_mark = by.sink.mark(), world.log_mark()
    hs = world.handshake(world.member(name), will=m.Will(topic, b"LASTWILL gone", qos=1))
    if how == "abrupt":
        hs.conn.abort()
    else:
        hs.conn.send(m.disconnect(m.DISCONNECT_WITH_WILL))
        hs.conn.wait_closed(5)
    _closed_in_broker(world, log_mark, uri(world, name))
    got = by.routed(mark, b"LASTWILL")
    assert [(p.topic, p.payload) for p in got] == [(topic, b"LASTWILL gone")], got
    # the will topic refuses ordinary publishes, proven or not
    hs2 = world.handshake(world.member(name))
    assert hs2.session is not None
    seen = send_and_settle(hs2.conn, m.publish(topic, proven(hs2.session, topic,
                                                              b"LASTWILL fake"), qos=1))
    assert puback(seen) >= 0x80
    hs2.conn.send(m.disconnect())
    hs2.conn.close()
    assert not by.routed(mark, b"LASTWILL fake")
    by.undisturbed()


# ------------------------------------------------------------------ retained


def test_retained_cannot_be_planted_or_cleared_without_proof(world: World,
                                                             by: Bystanders) -> None:
    hs = attacker(world, "pi-ret")
    assert hs.session is not None
    own = "devices/pi-ret/state"
    # a genuine retained message where the policy keeps them
    send_and_settle(hs.conn, m.publish(own, proven(hs.session, own, b"RET genuine"), qos=1,
                                       packet_id=1, retain=True))
    assert [p.payload for p in fresh_retained(world, own)] == [b"RET genuine"]
    # unproven empty retained (the MQTT way to clear it), a forged one, one on another
    # device's topic under the attacker's own proof, on a topic without retain, on $SYS
    live, tele = by.live.topic, "devices/pi-ret/telemetry/t"
    attempts = [
        (own, b""),
        (own, b"RET forged" + bytes(31)),
        (live, proven(hs.session, live, b"RET other")),
        ("devices/pi-live/state", proven(hs.session, "devices/pi-live/state", b"RET other")),
        (tele, proven(hs.session, tele, b"RET not here")),
        ("$SYS/broker/retained", proven(hs.session, "$SYS/broker/retained", b"RET sys")),
    ]
    for i, (topic, payload) in enumerate(attempts):
        seen = send_and_settle(hs.conn, m.publish(topic, payload, qos=1, packet_id=10 + i,
                                                  retain=True))
        assert puback(seen) >= 0x80, topic
    assert [p.payload for p in fresh_retained(world, own)] == [b"RET genuine"]
    for topic in (live, "devices/pi-live/state", tele, "$SYS/broker/retained"):
        assert not [p for p in fresh_retained(world, topic) if b"RET" in p.payload], topic
    # clean up with a genuine empty retained message
    send_and_settle(hs.conn, m.publish(own, proven(hs.session, own, b""), qos=1, packet_id=30,
                                       retain=True))
    assert not fresh_retained(world, own)
    by.undisturbed()


# ------------------------------------------------------------------ $-topics and filters


@pytest.mark.parametrize("topic", ["$CONTROL/dynamic-security/v1", "$SYS/broker/clients",
                                   "$share/g/devices/pi-evil/telemetry/t", "$internal/x"])
def test_publish_to_dollar_topics_is_refused(world: World, by: Bystanders,
                                             topic: str) -> None:
    hs = attacker(world, "pi-dollar")
    assert hs.session is not None
    payload = proven(hs.session, topic,
                     b'{"commands":[{"command":"createClient","username":"x"}]}')
    mark, start = by.sink.mark(), len(world.audit())
    seen = send_and_settle(hs.conn, m.publish(topic, payload, qos=1, packet_id=1))
    acks = [m.parse_ack(p).reason for p in seen if p.type == m.PUBACK]
    assert hs.conn.closed or (acks and acks[0] >= 0x80), acks
    assert not by.routed(mark, b"createClient")
    no_success(world.audit_fence(start), uri(world, "pi-dollar"), allow=(hs,))
    by.undisturbed()


@pytest.mark.parametrize("topic_filter", [
    "$SYS/#", "$CONTROL/#", "$share/g/devices/pi-live/telemetry/#", "$share/g/#",
    "$share/g/devices/+/commands/#", "#", "+/+/+/+", "devices/+/telemetry/#",
    "devices/pi-live/commands/#", "devices/pi-sub/commands/#/x", "devices/pi-sub/+/#",
    "$share//devices/pi-sub/commands/#",
])
def test_subscription_outside_the_policy_is_refused(world: World, by: Bystanders,
                                                    topic_filter: str) -> None:
    hs = attacker(world, "pi-sub")
    hs.conn.send(m.subscribe(3, [(topic_filter, 1)]))
    p = hs.conn.read(5)
    if p is not None and p.type == m.SUBACK:
        reasons = m.parse_suback(p).reasons
        assert reasons and reasons[0] >= 0x80, f"granted {reasons}"
    else:
        assert p is None or p.type == m.DISCONNECT, p
        assert hs.conn.wait_closed(5)
    # the live device's traffic never reaches the attacker
    if not hs.conn.closed:
        by.fence()
        leaked = [x for x in hs.conn.sync() if x.type == m.PUBLISH]
        assert not leaked, leaked
    by.undisturbed()


# ------------------------------------------------------------------ pre-auth floods


def test_half_open_connections_are_bounded(world: World, by: Bystanders) -> None:
    """300 TCP connections that never send CONNECT (bounded here; Mosquitto 2.0.11 has
    no CONNECT timeout): the broker's memory stays bounded, the live device flows."""
    rss0 = world.rss_kib()
    socks = []
    for _ in range(300):
        try:
            socks.append(socket.create_connection(("127.0.0.1", world.broker.port), 2))
        except OSError:
            break
    by.fence()
    grown = world.rss_kib() - rss0
    for s in socks:
        s.close()
    assert grown < 8 * 1024, f"broker RSS grew {grown} KiB for {len(socks)} half-open sockets"
    by.undisturbed()


def test_oversized_declared_connect_is_cut_off(world: World, by: Bystanders) -> None:
    """CONNECT declaring 200 MB: the broker must stop reading well before (the
    generated config bounds the packet size), not buffer it."""
    rss0 = world.rss_kib()
    conn = world.open()
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    header = bytes([0x10]) + m.varint(200_000_000)
    conn.send(header + b"\x00\x04MQTT\x05\x02\x00\x3c")
    chunk = os.urandom(64 * 1024)
    sent = 0
    conn.sock.settimeout(2)
    while sent < 4 * 1024 * 1024:  # at most 4 MiB from us
        try:
            conn.sock.sendall(chunk)
        except OSError:
            break
        sent += len(chunk)
    grown = world.rss_kib() - rss0
    closed = conn.wait_closed(3)
    conn.close()
    assert closed and sent < 4 * 1024 * 1024, (
        f"the broker accepted {sent} bytes of one unauthenticated CONNECT")
    assert grown < 4 * 1024, f"broker RSS grew {grown} KiB"
    by.undisturbed()


@pytest.mark.parametrize("sources", [1, 100])
def test_bad_connect_storm_keeps_audit_and_memory_bounded(world: World, by: Bystanders,
                                                          sources: int) -> None:
    """1,500 refused CONNECTs (junk msg1, anonymous, 3.1.1), 30 sockets at a time, from
    one source address or from 100 (127.0.2.1-100): the audit log grows by aggregates,
    not a record each; every refusal is counted in the metrics; broker memory and the
    live device are unaffected."""
    size0, rss0, refused0 = world.audit_size(), world.rss_kib(), refused_count(world)
    kinds = [m.connect("storm", auth_method=AUTH_METHOD, auth_data=os.urandom(200)),
             m.connect("storm"), m.connect("storm", level=4)]
    total, t0 = 0, time.monotonic()
    while total < 1500:
        conns = []
        for i in range(30):
            c = world.open(f"127.0.2.{(total + i) % sources + 1}" if sources > 1 else None)
            c.send(kinds[(total + i) % 3])
            conns.append(c)
        for c in conns:
            c.wait_closed(5)
            c.close()
        total += len(conns)
    elapsed = time.monotonic() - t0
    refused = refused_count(world) - refused0
    start = len(world.audit())
    world.audit_fence(max(0, start - 5))
    grown = world.audit_size() - size0
    rss = world.rss_kib() - rss0
    print(f"storm from {sources} source(s): {total} CONNECTs in {elapsed:.1f} s, "
          f"{refused:.0f} counted, audit +{grown} bytes, broker RSS {rss:+d} KiB")
    assert refused >= total * 0.99, f"only {refused} of {total} refusals counted"
    assert grown < 60 * 1024, f"audit log grew {grown} bytes for {total} refusals"
    assert rss < 8 * 1024
    by.undisturbed()


def test_pending_handshake_flood_is_bounded(world: World, by: Bystanders) -> None:
    """200 captured-style msg1s of one device left pending at once: bounded memory,
    none becomes a session, the live device flows."""
    victim = world.member("pi-pend")
    rss0 = world.rss_kib()
    conns = []
    for _ in range(200):
        _, msg1 = world.msg1(victim)
        c = world.open()
        c.send(m.connect(victim.identity.uri, auth_method=AUTH_METHOD, auth_data=msg1))
        conns.append(c)
    answered = sum(1 for c in conns if (p := c.read(5)) is not None and p.type == m.AUTH)
    by.fence()
    grown = world.rss_kib() - rss0
    for c in conns:
        c.close()
    print(f"pending flood: {answered} of {len(conns)} answered with msg2, broker RSS "
          f"{grown:+d} KiB")
    assert grown < 16 * 1024
    by.undisturbed()


_ = struct  # struct packing lives in mqtt5.py


def test_persisted_session_is_not_resumed_without_keys(world: World, by: Bystanders) -> None:
    """A device leaves a persistent session (Session Expiry 300 s) with a QoS 1
    subscription; a command is queued for it. A captured msg1 with Clean Start 0 gets
    msg2 at most: no queued message, no session present."""
    name = "pi-persist"
    topic = f"devices/{name}/commands/x"
    hs = world.handshake(world.member(name), props=[(m.SESSION_EXPIRY_INTERVAL, 300)])
    hs.conn.send(m.subscribe(1, [(f"devices/{name}/commands/#", 1)]))
    assert m.parse_suback(hs.conn.expect(m.SUBACK)).reasons[0] < 0x80
    hs.conn.send(m.disconnect())
    hs.conn.close()
    backend = world.handshake(world.member("backend-cmd", "broker"))
    assert backend.session is not None
    backend.conn.send(m.publish(topic, proven(backend.session, topic, b"QUEUED secret"), qos=1))
    backend.conn.sync()
    _, msg1 = world.msg1(world.member(name))
    conn = world.open()
    conn.send(m.connect(uri(world, name), auth_method=AUTH_METHOD, auth_data=msg1,
                        clean_start=False))
    got = []
    p = conn.read(5)
    if p is not None and p.type == m.AUTH:
        conn.send(m.auth(m.CONTINUE_AUTHENTICATION, AUTH_METHOD, bytes(46)))
        p = conn.read(5)
    while p is not None:
        got.append(p)
        p = conn.read(1)
    assert not [x for x in got if x.type == m.PUBLISH], got
    assert not [x for x in got if x.type == m.CONNACK and m.parse_connack(x).reason == 0], got
    assert conn.closed
    backend.conn.send(m.disconnect())
    backend.conn.close()
    by.undisturbed()
