"""SA1 v2's three messages on CoAP, against a real aiocoap gateway on 127.0.0.x.

msg1 is POSTed to /.well-known/sa1, msg2 comes back, and msg3 rides on the device's
first proven request (Tessera-Confirm, 65007). Until msg3 verifies the gateway holds
only a bounded PendingHandshake: no session, no login, no ``handshake_ok``, no effect on
the device's confirmed sessions. Every refusal here is checked for its code, its reason,
and for the genuine device beside it still being served.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiocoap
import pytest
from aiocoap import resource
from aiocoap.numbers import codes

from broker_plugin.coap.handshake import HandshakeLimits
from broker_plugin.coap.limits import Limits
from broker_plugin.coap.site import GatewayLimits
from device.coap import CONFIRM_OPTION, PROOF_OPTION
from simulator.fleet import Fleet
from structauth import coap_binding
from structauth.credentials import TimePolicy
from structauth.errors import Reason
from structauth.events import HandshakeCompleted
from structauth.handshake import Initiator
from tests.support import wait_for_async
from tests.test_coap import WALL, Gateway, World, gateway, reason_of, run


@pytest.fixture(scope="module")
def world() -> World:
    fleet = Fleet()
    return World(
        fleet,
        fleet.member("broker", "gw-1"),
        {n: fleet.member("device", n) for n in ("pi-1", "pi-2")},
    )


class Audit:
    """The site's audit records, as (event, fields)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, event: str, **fields: Any) -> None:
        self.records.append((event, fields))

    def events(self, name: str) -> list[dict[str, Any]]:
        return [f for e, f in self.records if e == name]



async def until(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    await wait_for_async(predicate, timeout)


async def endpoint(host: str = "127.0.0.1") -> aiocoap.Context:
    """An aiocoap context sending from ``host`` (a server context is also a client)."""
    return await aiocoap.Context.create_server_context(
        resource.Site(), bind=(host, 0), transports=["udp6"]
    )


async def post_msg1(ctx: aiocoap.Context, gw: Gateway, msg1: bytes) -> aiocoap.Message:
    msg = aiocoap.Message(code=codes.POST, uri=gw.uri + "/.well-known/sa1", payload=msg1)
    return await ctx.request(msg).response


async def handshake(ctx: aiocoap.Context, gw: Gateway, name: str = "pi-1") -> HandshakeCompleted:
    """msg1 -> msg2 only (the gateway is left with a pending handshake)."""
    ini = gw.initiator(name)
    response = await post_msg1(ctx, gw, ini.start())
    assert response.code == codes.CHANGED, (response, response.payload)
    return ini.receive(bytes(response.payload), gw.clock(), TimePolicy.trusted(WALL))


async def proven_get(
    ctx: aiocoap.Context, gw: Gateway, done: HandshakeCompleted, msg3: bytes | None,
    path: tuple[str, ...] = ("sensors", "pi-1", "temp"),
) -> aiocoap.Message:
    action = coap_binding.request_action(1, path)
    header, _ = done.session.protect(action, b"", gw.clock())
    msg = aiocoap.Message(code=codes.GET, uri=gw.uri)
    msg.opt.uri_path = path
    msg.opt.add_option(PROOF_OPTION.create_option(value=header))
    if msg3 is not None:
        msg.opt.add_option(CONFIRM_OPTION.create_option(value=msg3))
    return await ctx.request(msg).response


def small_pending(per_source: int, total: int) -> GatewayLimits:
    return GatewayLimits(handshake=HandshakeLimits(
        pending=Limits(per_owner=per_source, per_owner_bytes=per_source * 4096, total=total,
                       total_bytes=total * 4096, idle=10.0)))


# ---------------------------------------------------------------- the flow


def test_nothing_is_granted_before_msg3(world: World) -> None:
    async def scenario() -> None:
        audit = Audit()
        async with gateway(world, audit=audit) as gw:
            ctx = await endpoint()
            try:
                done = await handshake(ctx, gw)
                sid = done.session.session_id
                assert len(done.reply) == 46
                # msg2 sent: a pending handshake, nothing else
                assert sid in gw.site.handshakes.pending
                assert not gw.site.sessions and not gw.site._by_identity
                assert not audit.events("handshake_ok")
                # a proven request without msg3 is not served
                refused = await proven_get(ctx, gw, done, None)
                assert refused.code == codes.UNAUTHORIZED
                assert reason_of(refused) is Reason.UNKNOWN_SESSION
                assert not gw.seen.requests and not gw.site.sessions
                assert sid in gw.site.handshakes.pending  # a refusal is not a try
                # with msg3: confirmed, logged in, audited, served, proven
                served = await proven_get(ctx, gw, done, done.reply)
                assert served.code == codes.CONTENT and served.opt.get_option(PROOF_OPTION)
                assert sid in gw.site.sessions and sid not in gw.site.handshakes.pending
                (ok,) = audit.events("handshake_ok")
                assert ok["session"] == sid.hex() and ok["identity"].endswith("/device/pi-1")
                assert len(gw.seen.requests) == 1
                # msg3 again on a later request: the session is confirmed, it is ignored
                again = await proven_get(ctx, gw, done, done.reply)
                assert again.code == codes.CONTENT
                assert len(audit.events("handshake_ok")) == 1
            finally:
                await ctx.shutdown()

    run(scenario())


def test_client_piggybacks_msg3_until_a_proven_response(world: World, sealed: bool) -> None:
    """The device sends msg3 on its first request only (no extra round trip), and the
    handshake plus the first request take as many exchanges as version 1 did: two
    msg1 blocks, one more msg2 block, the request."""

    async def scenario() -> None:
        async with gateway(world, sealed=sealed) as gw, gw.client() as client:
            sent: list[aiocoap.Message] = []
            real_send = client._send

            async def spy(request: aiocoap.Message, blockwise: bool = True) -> aiocoap.Message:
                sent.append(request)
                return await real_send(request, blockwise)

            client._send = spy  # type: ignore[method-assign]
            reply = await client.request("POST", "sensors/pi-1/readings", b"1")
            assert reply.payload == b"pi-1:1"
            # msg1 in two blocks, the second block of msg2, the request with msg3
            assert [bool(m.opt.get_option(CONFIRM_OPTION)) for m in sent] == [
                False, False, False, True]
            stats = gw.site.stats
            exchanges = (stats["handshakes:block"] + stats["handshakes:answered"]
                         + stats["handshakes:msg2_block"] + 1)
            assert exchanges == 4, dict(stats)
            await client.request("POST", "sensors/pi-1/readings", b"2")
            assert not sent[-1].opt.get_option(CONFIRM_OPTION)
            assert client.handshakes == 1

    run(scenario())


@pytest.fixture(params=[False, True], ids=["tagged", "sealed"])
def sealed(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def test_a_bad_msg3_ends_the_pending_handshake_and_nothing_else(world: World) -> None:
    async def scenario() -> None:
        audit = Audit()
        async with gateway(world, audit=audit) as gw, gw.client("pi-2") as bystander:
            await bystander.request("GET", "sensors/pi-2/temp")
            ctx = await endpoint()
            try:
                done = await handshake(ctx, gw)
                sid = done.session.session_id
                forged = done.reply[:-1] + bytes([done.reply[-1] ^ 1])
                refused = await proven_get(ctx, gw, done, forged)
                assert refused.code == codes.UNAUTHORIZED
                assert reason_of(refused) is Reason.BAD_CONFIRMATION
                assert not refused.opt.get_option(PROOF_OPTION)
                # one try: the genuine msg3 now finds nothing
                late = await proven_get(ctx, gw, done, done.reply)
                assert reason_of(late) is Reason.UNKNOWN_SESSION
                # msg3 of another session than the proof names
                other = await handshake(ctx, gw)
                crossed = await proven_get(ctx, gw, done, other.reply)
                assert reason_of(crossed) is Reason.UNKNOWN_SESSION
                # garbage in the option
                junk = await proven_get(ctx, gw, other, b"\x00" * 46)
                assert junk.code == codes.BAD_REQUEST and reason_of(junk) is Reason.MALFORMED
                assert sid not in gw.site.sessions and not gw.site.sessions_of(
                    world.devices["pi-1"].identity)
                assert [f["identity"] for f in audit.events("handshake_ok")] == [
                    world.devices["pi-2"].identity.uri]
                assert all(r.remote.peer.identity.name == "pi-2" for r in gw.seen.requests)
            finally:
                await ctx.shutdown()
            reply = await bystander.request("POST", "sensors/pi-2/temp", b"still")
            assert reply.payload == b"pi-2:still" and bystander.handshakes == 1

    run(scenario())


def test_replayed_msg1s_never_evict_a_confirmed_session(world: World) -> None:
    """The attack from the issue: msg1s captured off the network, replayed (now, after
    the nonce cache's TTL, after a gateway restart). Each may cost the gateway a
    signature check and a pending handshake; none becomes a session, none touches the
    device's confirmed session (version 1: four replays evicted it)."""

    async def scenario() -> None:
        audit = Audit()
        async with gateway(world, audit=audit) as gw, gw.client(clock=gw.clock) as device:
            await device.request("GET", "sensors/pi-1/temp")
            identity = world.devices["pi-1"].identity
            (genuine,) = gw.site.sessions_of(identity)
            captured = [gw.initiator().start() for _ in range(6)]  # an eavesdropper's haul
            attacker = await endpoint("127.0.0.9")
            try:
                for msg1 in captured:
                    answered = await post_msg1(attacker, gw, msg1)
                    assert answered.code == codes.CHANGED  # costs a msg2, grants nothing
                for msg1 in captured:  # the nonce cache refuses them cheaply
                    again = await post_msg1(attacker, gw, msg1)
                    assert reason_of(again) is Reason.HANDSHAKE_REPLAYED
                gw.clock.offset += 601  # past the nonce cache's TTL
                for msg1 in captured:
                    assert (await post_msg1(attacker, gw, msg1)).code == codes.CHANGED
                gw.site.responder.nonces.__init__()  # a restarted responder's empty cache
                for msg1 in captured:
                    assert (await post_msg1(attacker, gw, msg1)).code == codes.CHANGED
            finally:
                await attacker.shutdown()
            assert gw.site.sessions_of(identity) == [genuine]
            assert genuine.session.state.value == "established"
            assert len(audit.events("handshake_ok")) == 1
            assert not audit.events("session_closed")
            pending = gw.site.handshakes.pending
            assert pending.owned_by("127.0.0.9") <= pending.limits.per_owner
            reply = await device.request("POST", "sensors/pi-1/temp", b"fine")
            assert reply.payload == b"pi-1:fine" and device.handshakes == 1

    run(scenario())


def test_pending_handshakes_are_bounded_per_source_and_in_total(world: World) -> None:
    async def scenario() -> None:
        async with gateway(world, limits=small_pending(2, 5)) as gw, gw.client() as device:
            pending = gw.site.handshakes.pending
            await device.request("GET", "sensors/pi-1/temp")
            one = await endpoint("127.0.0.2")
            many = [await endpoint(f"127.0.0.{i}") for i in range(10, 16)]
            try:
                first = await handshake(one, gw)
                for _ in range(4):
                    await handshake(one, gw)
                assert pending.owned_by("127.0.0.2") == 2  # its own oldest went first
                assert pending.evicted["owner_full"] == 3
                # the evicted one cannot be confirmed any more
                late = await proven_get(one, gw, first, first.reply)
                assert reason_of(late) is Reason.UNKNOWN_SESSION
                for ctx in many:
                    await handshake(ctx, gw)
                assert len(pending) == 5 and pending.evicted["table_full"] >= 3
                # a fresh handshake is admitted (oldest pending pushed out) and completes
                fresh = await handshake(many[0], gw)
                ok = await proven_get(many[0], gw, fresh, fresh.reply)
                assert ok.code == codes.CONTENT
            finally:
                for ctx in (one, *many):
                    await ctx.shutdown()
            # the confirmed session was never at stake
            reply = await device.request("POST", "sensors/pi-1/temp", b"x")
            assert reply.payload == b"pi-1:x" and device.handshakes == 1
            assert len(gw.site.sessions) == 2

    run(scenario())


def test_a_pending_handshake_expires(world: World) -> None:
    async def scenario() -> None:
        async with gateway(world) as gw, gw.client("pi-2", clock=gw.clock) as bystander:
            await bystander.request("GET", "sensors/pi-2/temp")
            ctx = await endpoint()
            try:
                done = await handshake(ctx, gw)
                gw.clock.offset += gw.site.responder.pending_timeout + 0.5
                late = await proven_get(ctx, gw, done, done.reply)
                assert late.code == codes.UNAUTHORIZED
                assert reason_of(late) is Reason.UNKNOWN_SESSION
                gw.site.sweep(gw.clock())
                assert len(gw.site.handshakes.pending) == 0
                assert len(gw.site.handshakes.assemblies) == 0
            finally:
                await ctx.shutdown()
            assert (await bystander.request("GET", "sensors/pi-2/temp")).payload == b"21.5"

    run(scenario())


def test_revocation_between_msg2_and_msg3_is_honoured(world: World) -> None:
    async def scenario() -> None:
        audit = Audit()
        async with gateway(world, audit=audit) as gw, gw.client("pi-2") as bystander:
            await bystander.request("GET", "sensors/pi-2/temp")
            ctx = await endpoint()
            try:
                done = await handshake(ctx, gw)
                serial = format(world.devices["pi-1"].credential.chain[0].serial_number, "x")
                gw.site.revoke([serial])
                refused = await proven_get(ctx, gw, done, done.reply)
                assert refused.code == codes.UNAUTHORIZED
                assert reason_of(refused) is Reason.CREDENTIAL_REVOKED
                assert not gw.site.sessions_of(world.devices["pi-1"].identity)
                assert [f["identity"] for f in audit.events("handshake_ok")] == [
                    world.devices["pi-2"].identity.uri]
            finally:
                gw.site.revoked_serials.clear()
                await ctx.shutdown()
            assert (await bystander.request("GET", "sensors/pi-2/temp")).payload == b"21.5"

    run(scenario())


def test_a_msg1_for_another_gateway_is_refused(world: World) -> None:
    async def scenario() -> None:
        async with gateway(world) as gw, gw.client("pi-2") as bystander:
            await bystander.request("GET", "sensors/pi-2/temp")
            other = world.fleet.member("broker", "gw-2").identity
            dev = world.devices["pi-1"]
            ini = Initiator(signer=dev.signer, credential=dev.credential,
                            trust=world.fleet.trust, expected_peer=other)
            ctx = await endpoint()
            try:
                refused = await post_msg1(ctx, gw, ini.start())
                assert refused.code == codes.UNAUTHORIZED
                assert reason_of(refused) is Reason.WRONG_IDENTITY
                assert len(gw.site.handshakes.pending) == 0
            finally:
                await ctx.shutdown()
            # a client told another gateway's name gets the same refusal
            async with gw.client(gateway=other) as misdirected:
                with pytest.raises(Exception) as caught:
                    await misdirected.request("GET", "sensors/pi-1/temp")
                assert getattr(caught.value, "reason", None) is Reason.WRONG_IDENTITY
            assert (await bystander.request("GET", "sensors/pi-2/temp")).payload == b"21.5"

    run(scenario())


def test_the_client_requires_the_gateway_identity(world: World) -> None:
    dev = world.devices["pi-1"]
    with pytest.raises(TypeError):
        device_coap_client(dev)


def device_coap_client(dev: Any) -> Any:
    from device.coap import TesseraCoapClient

    return TesseraCoapClient(  # type: ignore[call-arg]
        signer=dev.signer, credential=dev.credential, trust=None, uri="coap://127.0.0.1"
    )
