"""What an unauthenticated sender can make the gateway hold: floods of Block1 uploads,
msg1 assemblies and plain refused requests, from one source port, many ports and many
addresses on 127.0.0.x, against a real aiocoap gateway. Datagrams are built by hand
(aiocoap's encoder only), so nothing of the device's code is on the attacking side.

Each case asserts the refusal and its reason, that the bounded tables stay within
their limits, and that a genuine device beside the flood keeps being served.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

import aiocoap
import pytest
from aiocoap.numbers import codes

from broker_plugin.coap.handshake import MAX_MSG1, HandshakeLimits
from broker_plugin.coap.limits import BoundedTable, Limits, source_of_host
from broker_plugin.coap.site import MAX_PAYLOAD, GatewayLimits
from broker_plugin.coap.transport import DedupLimits
from device.coap import PROOF_OPTION
from simulator.fleet import Fleet
from structauth.errors import Reason
from tests.test_coap import Gateway, World, gateway, reason_of, run

READINGS = ("sensors", "pi-1", "readings")


@pytest.fixture(scope="module")
def world() -> World:
    fleet = Fleet()
    return World(
        fleet,
        fleet.member("broker", "gw-1"),
        {n: fleet.member("device", n) for n in ("pi-1", "pi-2")},
    )


class Sender:
    """A raw UDP socket on ``host`` (port chosen by the kernel) speaking CoAP datagrams."""

    def __init__(self, gw: Gateway, host: str = "127.0.0.1") -> None:
        self.gw = gw
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.setblocking(False)
        self.sock.connect(("127.0.0.1", gw.port))
        self.mid = int.from_bytes(os.urandom(2), "big")

    def close(self) -> None:
        self.sock.close()

    def datagram(self, msg: aiocoap.Message) -> bytes:
        self.mid = (self.mid + 1) & 0xFFFF
        msg.mtype, msg.mid, msg.token = aiocoap.CON, self.mid, os.urandom(4)
        return bytes(msg.encode())

    async def exchange(self, msg: aiocoap.Message) -> aiocoap.Message:
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(self.sock, self.datagram(msg))
        data = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), 5)
        return aiocoap.Message.decode(data)


def upload_block(number: int, proof: bytes | None, more: bool = True,
                 path: tuple[str, ...] = READINGS) -> aiocoap.Message:
    msg = aiocoap.Message(code=codes.POST, payload=os.urandom(1024 if more else 10))
    msg.opt.uri_path = path
    msg.opt.block1 = (number, more, 6)
    if proof is not None:
        msg.opt.add_option(PROOF_OPTION.create_option(value=proof))
    return msg


def msg1_block(number: int = 0, more: bool = True) -> aiocoap.Message:
    msg = aiocoap.Message(code=codes.POST, payload=os.urandom(1024 if more else 100))
    msg.opt.uri_path = (".well-known", "sa1")
    msg.opt.block1 = (number, more, 6)
    return msg


def within(table: BoundedTable[Any, Any]) -> None:
    lim = table.limits
    assert len(table) <= lim.total and table.bytes <= lim.total_bytes


def small(**kw: Any) -> GatewayLimits:
    msg1 = Limits(per_owner=3, per_owner_bytes=8 * 1024, total=12, total_bytes=32 * 1024,
                  idle=5.0, max_age=10.0)
    return GatewayLimits(handshake=HandshakeLimits(msg1=msg1), **kw)


# ---------------------------------------------------------------- Block1 on protected resources


def test_unproven_block1_uploads_spool_nothing(world: World, sealed: bool) -> None:
    """No proof, a made-up session, a genuine session id with a forged tag, a later
    block with no transfer: all refused before a byte is kept, from one port and from
    many ports and addresses. The device's own 5,000-byte upload beside it works."""

    async def scenario() -> None:
        async with gateway(world, sealed=sealed) as gw, gw.client() as device:
            await device.request("POST", "sensors/pi-1/readings", b"first")
            (peer,) = gw.site.sessions.values()
            sid = peer.session.session_id
            flag = bytes([0x11 if sealed else 0x10])
            one = Sender(gw)
            many = [Sender(gw, f"127.0.0.{2 + i % 20}") for i in range(40)]
            try:
                cases = [
                    (None, 0, Reason.MALFORMED, codes.UNAUTHORIZED),
                    (flag + os.urandom(8) + bytes(6) + os.urandom(16), 0,
                     Reason.UNKNOWN_SESSION, codes.UNAUTHORIZED),
                    (flag + sid + bytes(2) + os.urandom(4) + os.urandom(16), 0,
                     Reason.BAD_TAG, codes.UNAUTHORIZED),
                    (flag + sid + bytes(6) + os.urandom(16), 3, Reason.MALFORMED,
                     codes.REQUEST_ENTITY_INCOMPLETE),
                ]
                for proof, number, reason, code in cases:
                    for sender in (one, *many):
                        for _ in range(8 if sender is one else 1):
                            answer = await sender.exchange(upload_block(number, proof))
                            assert answer.code == code, (answer, answer.payload)
                            assert reason_of(answer) is reason
                            assert not answer.opt.get_option(PROOF_OPTION)
                assert len(gw.site.transfers) == 0 and gw.site.transfers.bytes == 0
                # aiocoap's dedup keeps nothing for refused requests: what it holds is
                # the device's own handshake (2.31, two msg2 blocks) and proven answer
                (store,) = gw.site.dedup
                assert store.unproven.owners() == 1 and len(store.unproven) == 3
                assert len(store.proven) == 1
                body = os.urandom(5000)
                reply = await device.request("POST", "sensors/pi-1/readings", body)
                assert reply.payload == b"pi-1:" + body
                assert len(gw.site.transfers) == 0  # finished transfers leave nothing
                assert not [r for r in gw.seen.requests if r.remote.peer is not peer]
            finally:
                for sender in (one, *many):
                    sender.close()

    run(scenario())


@pytest.fixture(params=[False, True], ids=["tagged", "sealed"])
def sealed(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def test_proven_blocks_cannot_be_reordered_replayed_or_spliced(world: World) -> None:
    async def scenario() -> None:
        async with gateway(world) as gw, gw.client() as device:
            await device.request("GET", "sensors/pi-1/temp")
            session = await device.session_for_use()
            action = device_action(READINGS)
            from structauth.coap_binding import NO_PREVIOUS, block_action

            def block(number: int, more: bool, previous: bytes, data: bytes) -> tuple[
                    aiocoap.Message, bytes]:
                bound = block_action(action, number, 6, more, previous)
                header, body = session.protect(bound, data, gw.clock())
                msg = aiocoap.Message(code=codes.POST, payload=body)
                msg.opt.uri_path = READINGS
                msg.opt.block1 = (number, more, 6)
                msg.opt.add_option(PROOF_OPTION.create_option(value=header))
                return msg, header

            a0, ha0 = block(0, True, NO_PREVIOUS, b"a" * 1024)
            a1, _ = block(1, True, ha0, b"b" * 1024)
            b0, hb0 = block(0, True, NO_PREVIOUS, b"x" * 1024)
            b1, _ = block(1, False, hb0, b"y" * 10)
            sender = Sender(gw)
            try:
                # block 1 before block 0: nothing to continue
                early = await sender.exchange(a1.copy())
                assert early.code == codes.REQUEST_ENTITY_INCOMPLETE
                assert (await sender.exchange(a0.copy())).code == codes.CONTINUE
                # the same block 0 again (new message id): a replay
                again = await sender.exchange(a0.copy())
                assert reason_of(again) is Reason.REPLAYED
                # transfer B starts (same resource: it replaces A's spool); A's block 1,
                # a genuine proof, does not fit B's chain
                assert (await sender.exchange(b0.copy())).code == codes.CONTINUE
                spliced = await sender.exchange(a1.copy())
                assert spliced.code == codes.UNAUTHORIZED
                assert reason_of(spliced) in (Reason.BAD_TAG, Reason.REPLAYED)
                # B completes with its own block 1
                done = await sender.exchange(b1.copy())
                assert done.code == codes.CHANGED and done.opt.get_option(PROOF_OPTION)
                assert gw.seen.requests[-1].payload == b"x" * 1024 + b"y" * 10
                assert len(gw.site.transfers) == 0
            finally:
                sender.close()
            reply = await device.request("POST", "sensors/pi-1/readings", b"ok")
            assert reply.payload == b"pi-1:ok"

    run(scenario())


def device_action(path: tuple[str, ...]) -> bytes:
    from structauth.coap_binding import request_action

    return request_action(2, path)


def test_a_device_uploads_within_its_own_budget(world: World) -> None:
    """Uploads are spooled only after proof, and even then per device: one device's
    half-finished uploads push out its own oldest, never another device's."""

    async def scenario() -> None:
        block1 = Limits(per_owner=2, per_owner_bytes=MAX_PAYLOAD, total=8,
                        total_bytes=1024 * 1024, idle=20.0)
        async with (
            gateway(world, limits=GatewayLimits(block1=block1)) as gw,
            gw.client("pi-1") as greedy,
            gw.client("pi-2") as other,
        ):
            await other.request("GET", "sensors/pi-2/temp")
            session = await greedy.session_for_use()
            from structauth.coap_binding import NO_PREVIOUS, block_action, request_action

            sender = Sender(gw)
            try:
                for i in range(5):
                    path = ("sensors", "pi-1", "readings")
                    action = request_action(2, path, (f"n={i}",))
                    header, body = session.protect(
                        block_action(action, 0, 6, True, NO_PREVIOUS), b"z" * 1024, gw.clock())
                    msg = aiocoap.Message(code=codes.POST, payload=body)
                    msg.opt.uri_path = path
                    msg.opt.uri_query = (f"n={i}",)
                    msg.opt.block1 = (0, True, 6)
                    msg.opt.add_option(PROOF_OPTION.create_option(value=header))
                    from device.coap import CONFIRM_OPTION

                    msg3 = greedy._unconfirmed.get(session.session_id)
                    if msg3:
                        msg.opt.add_option(CONFIRM_OPTION.create_option(value=msg3))
                    assert (await sender.exchange(msg)).code == codes.CONTINUE
                owner = world.devices["pi-1"].identity.uri
                assert gw.site.transfers.owned_by(owner) == 2
                assert gw.site.transfers.evicted["owner_full"] == 3
                body = os.urandom(3000)
                reply = await other.request("POST", "sensors/pi-2/readings", body)
                assert reply.payload == b"pi-2:" + body
                too_big = os.urandom(MAX_PAYLOAD + 1)
                with pytest.raises(Exception) as caught:
                    await other.request("POST", "sensors/pi-2/readings", too_big)
                assert getattr(caught.value, "code", None) == codes.REQUEST_ENTITY_TOO_LARGE
            finally:
                sender.close()
            assert (await other.request("GET", "sensors/pi-2/temp")).payload == b"21.5"

    run(scenario())


# ---------------------------------------------------------------- the handshake's msg1 spool


def test_msg1_assemblies_are_bounded_per_source_and_in_total(world: World) -> None:
    async def scenario() -> None:
        async with gateway(world, limits=small()) as gw:
            spool = gw.site.handshakes.assemblies
            # one address, many ports (each a new endpoint): its own oldest go first
            ports = [Sender(gw, "127.0.0.2") for _ in range(30)]
            # many addresses
            hosts = [Sender(gw, f"127.0.0.{10 + i}") for i in range(40)]
            try:
                for sender in ports:
                    answer = await sender.exchange(msg1_block())
                    assert answer.code == codes.CONTINUE
                    assert spool.owned_by("127.0.0.2") <= 3
                    assert spool.owner_bytes("127.0.0.2") <= 8 * 1024
                within(spool)
                for sender in hosts:
                    assert (await sender.exchange(msg1_block())).code == codes.CONTINUE
                    within(spool)
                assert len(spool) == 12 and spool.evicted["table_full"] >= 40 - 12
                # one endpoint growing an assembly beyond MAX_MSG1 is cut off with 4.13
                big = Sender(gw, "127.0.0.3")
                assert (await big.exchange(msg1_block(0))).code == codes.CONTINUE
                answer = None
                for n in range(1, 40):
                    answer = await big.exchange(msg1_block(n))
                    if answer.code != codes.CONTINUE:
                        break
                assert answer is not None
                assert answer.code == codes.REQUEST_ENTITY_TOO_LARGE
                assert n * 1024 <= max(MAX_MSG1, 8 * 1024)
                assert spool.owned_by("127.0.0.3") == 0
                big.close()
                # a genuine device completes its handshake through the flood
                async with gw.client() as device:
                    reply = await device.request("POST", "sensors/pi-1/readings", b"1")
                    assert reply.payload == b"pi-1:1"
                # and it all expires
                gw.clock.offset += 11
                gw.site.sweep(gw.clock())
                assert len(spool) == 0 and spool.bytes == 0
            finally:
                for sender in (*ports, *hosts):
                    sender.close()

    run(scenario())


def test_msg1_blocks_out_of_order_or_without_a_start_are_refused(world: World) -> None:
    async def scenario() -> None:
        async with gateway(world) as gw:
            sender = Sender(gw, "127.0.0.4")
            try:
                orphan = await sender.exchange(msg1_block(1))
                assert orphan.code == codes.REQUEST_ENTITY_INCOMPLETE
                assert (await sender.exchange(msg1_block(0))).code == codes.CONTINUE
                gap = await sender.exchange(msg1_block(2))
                assert gap.code == codes.REQUEST_ENTITY_INCOMPLETE
                short = msg1_block(0)
                short.payload = b"x" * 100  # "more" with a short block
                assert (await sender.exchange(short)).code == codes.BAD_REQUEST
                assert len(gw.site.handshakes.assemblies) == 0
                garbage = await sender.exchange(msg1_block(0, more=False))
                assert garbage.code == codes.BAD_REQUEST
                assert reason_of(garbage) in (Reason.MALFORMED, Reason.TRUNCATED,
                                              Reason.BAD_VERSION, Reason.UNKNOWN_SUITE)
            finally:
                sender.close()
            async with gw.client() as device:
                assert (await device.request("GET", "sensors/pi-1/temp")).payload == b"21.5"

    run(scenario())


# ---------------------------------------------------------------- aiocoap's message layer


def test_refused_requests_leave_no_dedup_state(world: World) -> None:
    """aiocoap keeps every (remote, message id) it saw for 247 s; on the gateway that
    store is bounded per source and in total, and a refused request leaves nothing."""

    async def scenario() -> None:
        dedup = DedupLimits(unproven=Limits(per_owner=4, per_owner_bytes=64 * 1024, total=16,
                                            total_bytes=256 * 1024, idle=10.0))
        async with gateway(world, limits=GatewayLimits(dedup=dedup)) as gw, \
                gw.client() as device:
            await device.request("GET", "sensors/pi-1/temp")
            senders = [Sender(gw, f"127.0.0.{30 + i % 10}") for i in range(30)]
            try:
                for _ in range(10):
                    for sender in senders:
                        msg = aiocoap.Message(code=codes.GET)
                        msg.opt.uri_path = ("sensors", "pi-1", "temp")
                        answer = await sender.exchange(msg)
                        assert reason_of(answer) is Reason.MALFORMED
                (store,) = gw.site.dedup
                # only the device's own handshake (2.31 and two msg2 blocks, 10 s)
                assert store.unproven.owners() == 1 and len(store.unproven) == 3
                assert all(store.unproven.owned_by(f"127.0.0.{30 + i}") == 0 for i in range(10))
                # unproven successes (2.31 for msg1 blocks) are kept, but bounded
                for sender in senders:
                    await sender.exchange(msg1_block())
                assert len(store.unproven) <= 16 and store.unproven.evicted["table_full"] > 0
                assert max(store.unproven.owned_by(f"127.0.0.{30 + i}") for i in range(10)) <= 4
                within(store.unproven)
            finally:
                for sender in senders:
                    sender.close()
            assert (await device.request("GET", "sensors/pi-1/temp")).payload == b"21.5"
            assert device.handshakes == 1

    run(scenario())


def test_source_addresses() -> None:
    assert source_of_host("127.0.0.7") == "127.0.0.7"
    assert source_of_host("::ffff:127.0.0.7") == "127.0.0.7"
    assert source_of_host("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert source_of_host("2001:db8:1:2:ffff::1") == "2001:db8:1:2::/64"
    assert source_of_host("fe80::1%eth0") == "fe80::/64"


def test_bounded_table_rules() -> None:
    evicted: list[tuple[str, str]] = []
    table: BoundedTable[str, int] = BoundedTable(
        Limits(per_owner=2, per_owner_bytes=100, total=3, total_bytes=150, idle=5.0,
               max_age=8.0),
        on_evict=lambda k, v, why: evicted.append((k, why)),
    )
    assert table.put("a1", "A", 1, 10, 0.0) and table.put("a2", "A", 2, 10, 0.0)
    assert table.put("a3", "A", 3, 10, 0.0)  # A's oldest goes
    assert evicted == [("a1", "owner_full")]
    assert table.put("b1", "B", 4, 10, 1.0)
    assert table.put("c1", "C", 5, 10, 1.0)  # table full: oldest overall (a2)
    assert evicted[-1] == ("a2", "table_full")
    assert not table.put("big", "D", 6, 101, 1.0)  # more than one owner may hold
    assert table.get("a3", 4.9, touch=True) == 3  # touched: lives to 9.9, not 5
    assert table.get("b1", 6.0) is None and ("b1", "expired") in evicted
    assert table.get("a3", 8.5) is None  # max_age 8 s from creation
    assert table.grow("c1", 95, 2.0) is False  # 105 > per-owner 100: removed
    assert "c1" not in table and len(table) == 0 and table.bytes == 0


# ---------------------------------------------------------------- the pre-auth budget


def test_a_flood_without_sessions_is_dropped_before_decoding(world: World) -> None:
    """Datagrams from addresses that hold no session are decoded only within a budget
    (per source and in total); the device with a session is served throughout."""

    async def scenario() -> None:
        limits = GatewayLimits(preauth_rate=60.0, preauth_burst=60.0,
                               preauth_rate_per_source=20.0, preauth_burst_per_source=20.0)
        async with gateway(world, limits=limits) as gw, gw.client() as device:
            await device.request("GET", "sensors/pi-1/temp")  # 127.0.0.1 now has a session
            loop = asyncio.get_running_loop()
            floods = [Sender(gw, "127.0.0.2")] + [Sender(gw, f"127.0.0.{50 + i}")
                                                  for i in range(10)]
            barrier = Sender(gw, "127.0.0.1")  # an address with a session: never dropped
            sent = 0
            try:
                started = loop.time()
                for burst in range(4):
                    for sender in floods:
                        for _ in range(50 if sender is floods[0] else 5):
                            msg = aiocoap.Message(code=codes.GET)
                            msg.opt.uri_path = ("sensors", "pi-1", "temp")
                            sender.sock.send(sender.datagram(msg))
                            sent += 1
                    # a ping from the device's address is answered after the burst
                    await loop.sock_sendall(barrier.sock, bytes((0x40, 0, 0, burst)))
                    assert len(await asyncio.wait_for(loop.sock_recv(barrier.sock, 64), 5)) == 4
                    # and the device is served while the flood goes on
                    reply = await device.request("POST", "sensors/pi-1/temp", b"%d" % burst)
                    assert reply.payload == b"pi-1:%d" % burst
                elapsed = loop.time() - started
                answered = []
                for sender in floods:
                    n = 0
                    while True:
                        try:
                            sender.sock.recv(4096)
                        except BlockingIOError:
                            break
                        n += 1
                    answered.append(n)
                assert answered[0] <= 20 + 20 * elapsed + 1
                assert sum(answered) <= 60 + 60 * elapsed + 1
                dropped = gw.site.stats["dropped:preauth_budget"]
                assert dropped + sum(answered) == sent == 4 * (50 + 10 * 5)
                assert gw.site.stats["rejections:malformed"] == sum(answered)
            finally:
                for sender in (*floods, barrier):
                    sender.close()
            assert device.handshakes == 1
            within(gw.site._buckets)

    run(scenario())
