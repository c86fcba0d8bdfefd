"""CoAP on SA1 sessions, end to end: real aiocoap servers and clients on 127.0.0.1.

The gateway is ``broker_plugin.coap.site.TesseraSite`` around an ordinary aiocoap Site;
the device is ``device.coap.TesseraCoapClient``. Keys are software keys from a throwaway
fleet. Each scenario runs in both session modes (tagged and sealed).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiocoap
import pytest
from aiocoap import resource
from aiocoap.message import Direction
from aiocoap.numbers import codes
from aiocoap.numbers.optionnumbers import OptionNumber
from aiocoap.optiontypes import OpaqueOption
from hypothesis import given, settings
from hypothesis import strategies as st

from broker_plugin.coap import site as coap_site
from broker_plugin.coap.site import TesseraSite, local_port
from broker_plugin.policy import parse_policy
from device.coap import (
    CONFIRM_OPTION,
    PROOF_OPTION,
    GatewayRefused,
    ResponseRejected,
    TesseraCoapClient,
)
from simulator.fleet import T0, Fleet, Member
from structauth import coap_binding
from structauth.credentials import Identity
from structauth.errors import ConfigurationError, Reason
from structauth.handshake import Initiator, Responder
from structauth.params import SessionParams

T = TypeVar("T")
WALL = T0 + dt.timedelta(days=1)

POLICY = """
version = 1

[classes.default]
publish = ["devices/{id}/telemetry/#"]

[classes.default.coap]
GET  = ["sensors/{id}/#", "big", "config"]
POST = ["sensors/{id}/readings", "sensors/{id}/temp", "big", "gw/sensors/{id}/#"]
"""


def run(coro: Awaitable[T], timeout: float = 20.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


# ---------------------------------------------------------------- the world


@dataclass
class World:
    fleet: Fleet
    gateway: Member
    devices: dict[str, Member]


@pytest.fixture(scope="module")
def world() -> World:
    fleet = Fleet()
    return World(
        fleet,
        fleet.member("broker", "gw-1"),
        {n: fleet.member("device", n) for n in ("pi-1", "pi-2")},
    )


@pytest.fixture(params=[False, True], ids=["tagged", "sealed"])
def sealed(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


class Clock:
    """Monotonic time plus an offset a test can move."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


@dataclass
class Seen:
    """What the inner resources saw: the gateway hands them opened, unproven requests."""

    requests: list[aiocoap.Message] = field(default_factory=list)


class Echo(resource.Resource):  # type: ignore[misc]
    def __init__(self, seen: Seen, body: bytes = b"21.5") -> None:
        super().__init__()
        self.seen = seen
        self.body = body

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        self.seen.requests.append(request)
        return aiocoap.Message(payload=self.body, content_format=0)

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        self.seen.requests.append(request)
        who = request.remote.authenticated_claims[0].name.encode()
        return aiocoap.Message(code=codes.CHANGED, payload=who + b":" + request.payload)

    async def render_delete(self, request: aiocoap.Message) -> aiocoap.Message:
        self.seen.requests.append(request)
        return aiocoap.Message(code=codes.DELETED)


class Config(resource.ObservableResource):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.version = 0

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        return aiocoap.Message(payload=f"config v{self.version}".encode())

    def bump(self) -> None:
        self.version += 1
        self.updated_state()


def inner_site(seen: Seen, config: Config) -> resource.Site:
    site = resource.Site()
    for name in ("pi-1", "pi-2"):
        for leaf in ("temp", "readings"):
            site.add_resource(["sensors", name, leaf], Echo(seen))
    site.add_resource(["big"], Echo(seen, bytes(range(256)) * 12))  # 3072 bytes: block2
    site.add_resource(["config"], config)
    return site


@dataclass
class Gateway:
    site: TesseraSite
    context: aiocoap.Context
    port: int
    seen: Seen
    config: Config
    clock: Clock
    world: World

    @property
    def uri(self) -> str:
        return f"coap://127.0.0.1:{self.port}"

    def client(self, name: str = "pi-1", uri: str | None = None, **kw: Any) -> TesseraCoapClient:
        member = self.world.devices[name]
        kw.setdefault("gateway", self.world.gateway.credential.identity)
        return TesseraCoapClient(
            signer=member.signer,
            credential=member.credential,
            trust=self.world.fleet.trust,
            uri=uri or self.uri,
            wall_clock=lambda: WALL,
            **kw,
        )

    def initiator(self, name: str = "pi-1") -> Initiator:
        """A bare SA1 initiator of device ``name`` toward this gateway."""
        member = self.world.devices[name]
        return Initiator(
            signer=member.signer,
            credential=member.credential,
            trust=self.world.fleet.trust,
            expected_peer=self.world.gateway.credential.identity,
        )


@contextlib.asynccontextmanager
async def gateway(
    world: World,
    *,
    sealed: bool = False,
    policy: Any = None,
    lifetime: int = 3600,
    mount: tuple[str, ...] = (),
    params: SessionParams | None = None,
    pending_timeout: float = 10.0,
    audit: Any = None,
    transports: tuple[str, ...] = ("udp6",),
    port: int = 0,
    **site_options: Any,
) -> AsyncIterator[Gateway]:
    seen, config, clock = Seen(), Config(), Clock()
    responder = Responder(
        signer=world.gateway.signer,
        credential=world.gateway.credential,
        trust=world.fleet.trust,
        params=params or SessionParams(sealed=sealed, lifetime_s=lifetime),
        pending_timeout=pending_timeout,
    )
    if audit is not None:
        site_options["audit"] = audit
    site = TesseraSite(
        inner_site(seen, config),
        responder,
        policy,
        clock=clock,
        wall_clock=lambda: WALL,
        **site_options,
    )
    root: Any = site
    if mount:
        root = resource.Site()
        root.add_resource(list(mount), site)
    context = await aiocoap.Context.create_server_context(
        root, bind=("127.0.0.1", port), transports=list(transports)
    )
    site.attach(context)
    try:
        yield Gateway(site, context, local_port(context), seen, config, clock, world)
    finally:
        site.close()
        await context.shutdown()


async def raw_request(
    ctx: aiocoap.Context, uri: str, code: Any, payload: bytes = b"", **options: Any
) -> aiocoap.Message:
    msg = aiocoap.Message(code=code, uri=uri, payload=payload, **options)
    return await ctx.request(msg).response


def reason_of(response: aiocoap.Message) -> Reason:
    refused = GatewayRefused(response.code, bytes(response.payload))
    return refused.reason


# ---------------------------------------------------------------- option and actions


def test_proof_option_is_experimental_critical_unsafe_and_opaque() -> None:
    assert PROOF_OPTION == coap_site.PROOF_OPTION == 65003
    assert 65000 <= PROOF_OPTION <= 65535
    assert PROOF_OPTION.is_critical() and PROOF_OPTION.is_unsafe()
    assert PROOF_OPTION.format is OpaqueOption
    header = bytes(range(31))
    msg = aiocoap.Message(code=codes.GET)
    msg.mtype, msg.mid, msg.token = aiocoap.CON, 1, b"t"
    msg.opt.add_option(PROOF_OPTION.create_option(value=header))
    decoded = aiocoap.Message.decode(msg.encode())
    (option,) = decoded.opt.get_option(OptionNumber(65003))
    assert option.value == header


@settings(max_examples=200, deadline=None)
@given(
    code=st.integers(1, 7),
    path=st.lists(st.text(max_size=12), max_size=5),
    query=st.lists(st.text(max_size=12), max_size=3),
    cf=st.none() | st.integers(0, 65535),
    accept=st.none() | st.integers(0, 65535),
    observe=st.none() | st.integers(0, 1),
)
def test_binding_builds_the_actions_docs_coap_md_defines(
    code: int,
    path: list[str],
    query: list[str],
    cf: int | None,
    accept: int | None,
    observe: int | None,
) -> None:
    """The device and the gateway both call structauth.coap_binding, so comparing them
    proves nothing; the binding is compared with a construction written from the
    layout in docs/COAP.md ("Action strings"), field by field."""
    assert coap_binding.request_action(code, path, query, cf, accept, observe) == \
        spec_request_action(code, path, query, cf, accept, observe)
    header = os.urandom(31)
    assert coap_binding.response_action(header, 69, cf) == spec_response_action(header, 69, cf)
    request = spec_request_action(code, path, query, cf, accept, observe)
    assert coap_binding.block_action(request, 3, 6, True, header) == \
        spec_block_action(request, 3, 6, True, header)


ABSENT = b"\xff\xff\xff\xff"


def _spec_str16(text: str) -> bytes:
    raw = text.encode("utf-8")
    return len(raw).to_bytes(2, "big") + raw


def _spec_u32(value: int | None) -> bytes:
    return ABSENT if value is None else value.to_bytes(4, "big")


def spec_request_action(code: int, path: list[str], query: list[str], cf: int | None,
                        accept: int | None, observe: int | None) -> bytes:
    """docs/COAP.md: "coap-req" 0x00, u8 code, u16 n + n str16 path segments, u16 m + m
    str16 query items, u32 Content-Format, u32 Accept, u32 Observe (ABSENT: ff ff ff ff)."""
    out = bytearray(b"coap-req\x00")
    out.append(code)
    out += len(path).to_bytes(2, "big")
    for segment in path:
        out += _spec_str16(segment)
    out += len(query).to_bytes(2, "big")
    for item in query:
        out += _spec_str16(item)
    return bytes(out + _spec_u32(cf) + _spec_u32(accept) + _spec_u32(observe))


def spec_response_action(request_header: bytes, code: int, cf: int | None) -> bytes:
    return b"coap-res\x00" + request_header + bytes([code]) + _spec_u32(cf)


def spec_block_action(request: bytes, number: int, szx: int, more: bool,
                      previous: bytes) -> bytes:
    return (b"coap-blk\x00" + number.to_bytes(4, "big") + bytes([szx, int(more)])
            + previous + request)


def test_the_documented_example_action() -> None:
    """The example bytes printed in docs/COAP.md, copied by hand."""
    example = bytes.fromhex(
        "636f61702d72657100" "02" "0003" "0007") + b"sensors" + bytes.fromhex("0004") \
        + b"pi-1" + bytes.fromhex("0008") + b"readings" + bytes.fromhex("0001" "0006") \
        + b"unit=C" + bytes.fromhex("00000000" "ffffffff" "ffffffff")
    assert coap_binding.request_action(
        coap_binding.METHODS["POST"], ["sensors", "pi-1", "readings"], ["unit=C"],
        content_format=0) == example


def test_actions_are_unambiguous() -> None:
    act = coap_binding.request_action
    distinct = {
        act(1, ["a/b"]),
        act(1, ["a", "b"]),
        act(1, ["a", "b"], ["x"]),
        act(1, ["a", "b", "x"]),
        act(1, ["ab"]),
        act(2, ["a", "b"]),
        act(1, ["a", "b"], content_format=0),
        act(1, ["a", "b"], accept=0),
        act(1, ["a", "b"], observe=0),
        act(1, []),
        act(1, [""]),
    }
    assert len(distinct) == 11
    assert act(1, ["sensors", "pi-1"]) == (
        b"coap-req\x00\x01"
        + b"\x00\x02"
        + b"\x00\x07sensors"
        + b"\x00\x04pi-1"
        + b"\x00\x00"
        + b"\xff\xff\xff\xff" * 3
    )


# ---------------------------------------------------------------- the full exchange


def test_full_exchange(world: World, sealed: bool) -> None:
    async def scenario() -> None:
        async with gateway(world, sealed=sealed) as gw, gw.client() as client:
            reply = await client.request("POST", "sensors/pi-1/readings", b"21.5", content_format=0)
            assert reply.code == codes.CHANGED
            assert reply.payload == b"pi-1:21.5"
            assert client.handshakes == 1
            # the gateway's session was confirmed by that first request
            (peer,) = gw.site.sessions.values()
            assert peer.identity.uri.endswith("/device/pi-1")
            assert peer.session.state.value == "established"
            # what went over the air: sealed mode hides both payloads
            wire = bytes(reply.message.payload)
            assert (wire != b"pi-1:21.5") == sealed and len(wire) == len(b"pi-1:21.5")
            inner = gw.seen.requests[-1]
            assert inner.payload == b"21.5"
            assert not inner.opt.get_option(PROOF_OPTION)
            got = await client.request("GET", "sensors/pi-1/temp")
            assert (got.code, got.payload, got.content_format) == (codes.CONTENT, b"21.5", 0)
            # block-wise both ways, proven as a whole
            big = await client.request("GET", "big")
            assert big.payload == bytes(range(256)) * 12
            up = os.urandom(5000)
            echoed = await client.request("POST", "big", up)
            assert echoed.payload == b"pi-1:" + up
            # several in flight on one session
            replies = await asyncio.gather(
                *(client.request("POST", "sensors/pi-1/temp", b"%d" % i) for i in range(20))
            )
            assert sorted(r.payload for r in replies) == sorted(b"pi-1:%d" % i for i in range(20))
            assert client.handshakes == 1
            assert not [k for k in gw.site.stats if k.startswith("rejections")]

    run(scenario())


def test_handshake_messages_travel_blockwise(world: World) -> None:
    """msg1 and msg2 are ~2 KB: more than one block each on aiocoap's 1024-byte blocks.
    msg2 leaves only a pending handshake; the session exists once msg3 (on the first
    proven request) verified."""

    async def scenario() -> None:
        async with gateway(world) as gw:
            ini = gw.initiator()
            msg1 = ini.start()
            assert len(msg1) > 1024
            ctx = await aiocoap.Context.create_client_context()
            try:
                resp = await raw_request(ctx, gw.uri + "/.well-known/sa1", codes.POST, msg1)
                assert resp.code == codes.CHANGED and len(resp.payload) > 1024
                assert resp.opt.block2 is not None  # the last block of a block2 transfer
                from structauth.credentials import TimePolicy

                done = ini.receive(bytes(resp.payload), time.monotonic(), TimePolicy.trusted(WALL))
                sid = done.session.session_id
                assert sid not in gw.site.sessions  # pending only: nothing granted yet
                assert sid in gw.site.handshakes.pending
                # the same msg1 again is a replayed handshake
                again = await raw_request(ctx, gw.uri + "/.well-known/sa1", codes.POST, msg1)
                assert again.code == codes.UNAUTHORIZED
                assert reason_of(again) is Reason.HANDSHAKE_REPLAYED
                wrong = await raw_request(ctx, gw.uri + "/.well-known/sa1", codes.GET)
                assert wrong.code == codes.METHOD_NOT_ALLOWED
                # msg3 rides on the first proven request
                action = coap_binding.request_action(1, ("sensors", "pi-1", "temp"))
                header, _ = done.session.protect(action, b"", time.monotonic())
                msg = aiocoap.Message(code=codes.GET, uri=gw.uri + "/sensors/pi-1/temp")
                msg.opt.add_option(PROOF_OPTION.create_option(value=header))
                msg.opt.add_option(CONFIRM_OPTION.create_option(value=done.reply))
                first = await ctx.request(msg).response
                assert first.code == codes.CONTENT and first.opt.get_option(PROOF_OPTION)
                assert sid in gw.site.sessions and sid not in gw.site.handshakes.pending
            finally:
                await ctx.shutdown()

    run(scenario())


def test_observe_notifications_are_proven_one_by_one(world: World, sealed: bool) -> None:
    async def scenario() -> None:
        async with gateway(world, sealed=sealed) as gw, gw.client() as client:
            seen: list[bytes] = []
            seqs: list[int] = []

            # the next change only once a notification came: none can be coalesced
            async for note in client.observe("config"):
                seen.append(note.payload)
                seqs.append(note.seq)
                if len(seen) == 4:
                    break
                gw.config.bump()
            assert seen == [b"config v0", b"config v1", b"config v2", b"config v3"]
            assert len(set(seqs)) == 4  # each notification has its own proof

    run(scenario())


# ---------------------------------------------------------------- attacks on requests


async def proven(
    client: TesseraCoapClient, method: str, path: str, payload: bytes = b"", **kw: Any
) -> tuple[aiocoap.Message, bytes]:
    session = await client.session_for_use()
    return client._build(
        session, method, path, payload, kw.get("query", ()), kw.get("content_format"), None, None
    )


def test_attacks_on_requests_are_refused(world: World, sealed: bool) -> None:
    async def scenario() -> None:
        async with gateway(world, sealed=sealed) as gw, gw.client(clock=gw.clock) as client:
            await client.request("GET", "sensors/pi-1/temp")  # confirm the session
            ctx = await aiocoap.Context.create_client_context()
            uri = gw.uri + "/sensors/pi-1/temp"
            try:

                async def send(msg: aiocoap.Message) -> aiocoap.Message:
                    return await ctx.request(msg).response

                async def expect(msg: aiocoap.Message, code: Any, reason: Reason) -> None:
                    resp = await send(msg)
                    assert resp.code == code, (resp, resp.payload)
                    assert not resp.opt.get_option(PROOF_OPTION)
                    assert reason_of(resp) is reason, resp.payload

                # no proof at all
                await expect(
                    aiocoap.Message(code=codes.GET, uri=uri), codes.UNAUTHORIZED, Reason.MALFORMED
                )
                # a proof of the wrong length
                bad = aiocoap.Message(code=codes.GET, uri=uri)
                bad.opt.add_option(PROOF_OPTION.create_option(value=b"\x10" * 30))
                await expect(bad, codes.UNAUTHORIZED, Reason.MALFORMED)
                # forged: a valid header with a random tag
                msg, header = await proven(client, "POST", "sensors/pi-1/temp", b"1")
                forged = header[:15] + os.urandom(16)
                msg.opt.delete_option(PROOF_OPTION)
                msg.opt.add_option(PROOF_OPTION.create_option(value=forged))
                await expect(msg, codes.UNAUTHORIZED, Reason.BAD_TAG)
                # an unknown session
                msg, header = await proven(client, "POST", "sensors/pi-1/temp", b"1")
                msg.opt.delete_option(PROOF_OPTION)
                msg.opt.add_option(
                    PROOF_OPTION.create_option(value=header[:1] + os.urandom(8) + header[9:])
                )
                await expect(msg, codes.UNAUTHORIZED, Reason.UNKNOWN_SESSION)
                # replayed: the same request again (aiocoap gives it a new message id)
                msg, _ = await proven(client, "POST", "sensors/pi-1/temp", b"2")
                first = await send(msg)
                assert first.code == codes.CHANGED
                await expect(msg.copy(mid=None, token=None), codes.UNAUTHORIZED, Reason.REPLAYED)
                # moved to another path, another method, another query
                msg, _ = await proven(client, "POST", "sensors/pi-1/temp", b"3")
                await expect(
                    msg.copy(uri_path=("sensors", "pi-1", "readings")),
                    codes.UNAUTHORIZED,
                    Reason.BAD_TAG,
                )
                msg, _ = await proven(client, "POST", "sensors/pi-1/temp", b"")
                await expect(msg.copy(code=codes.DELETE), codes.UNAUTHORIZED, Reason.BAD_TAG)
                msg, _ = await proven(client, "GET", "sensors/pi-1/temp")
                await expect(msg.copy(uri_query=("all",)), codes.UNAUTHORIZED, Reason.BAD_TAG)
                msg, _ = await proven(client, "POST", "sensors/pi-1/temp", b"4", content_format=0)
                await expect(msg.copy(content_format=50), codes.UNAUTHORIZED, Reason.BAD_TAG)
                # altered payload (one bit)
                msg, _ = await proven(client, "POST", "sensors/pi-1/temp", b"21.5")
                altered = bytes(msg.payload[:-1]) + bytes([msg.payload[-1] ^ 1])
                await expect(msg.copy(payload=altered), codes.UNAUTHORIZED, Reason.BAD_TAG)
                # stale: captured, held back 40 s (epochs of 10 s, w = 2), delivered
                msg, _ = await proven(client, "POST", "sensors/pi-1/temp", b"5")
                gw.clock.offset += 40  # the device and the gateway share this clock
                await expect(msg, codes.UNAUTHORIZED, Reason.EPOCH_OUT_OF_WINDOW)
                # an unknown critical option: 4.02 before anything else; elective ok
                msg, _ = await proven(client, "POST", "sensors/pi-1/temp", b"6")
                strange = OptionNumber(65001)
                msg.opt.add_option(strange.create_option(value=b"?"))
                resp = await send(msg)
                assert resp.code == codes.BAD_OPTION
                msg, _ = await proven(client, "POST", "sensors/pi-1/temp", b"7")
                msg.opt.add_option(OptionNumber(65000).create_option(value=b"?"))
                assert (await send(msg)).code == codes.CHANGED
                unproven = aiocoap.Message(code=codes.GET, uri=uri)
                unproven.opt.add_option(OptionNumber(65005).create_option(value=b"?"))
                assert (await send(unproven)).code == codes.BAD_OPTION
                # a repeated proof option is a repeated critical option
                msg, header = await proven(client, "POST", "sensors/pi-1/temp", b"8")
                msg.opt.add_option(PROOF_OPTION.create_option(value=header))
                assert (await send(msg)).code == codes.BAD_OPTION
                # proxying is not offered
                proxied = aiocoap.Message(code=codes.GET, uri=uri)
                proxied.opt.proxy_scheme = "http"
                assert (await send(proxied)).code == codes.PROXYING_NOT_SUPPORTED
            finally:
                await ctx.shutdown()
            # none of it disturbed the session
            reply = await client.request("POST", "sensors/pi-1/temp", b"ok")
            assert reply.payload == b"pi-1:ok" and client.handshakes == 1
            assert all(r.payload != altered for r in gw.seen.requests)

    run(scenario())


def test_duplicate_confirmable_is_answered_from_the_dedup_cache(world: World, sealed: bool) -> None:
    """A CON retransmission (same message id, same bytes) gets the same proven response
    from aiocoap's deduplication cache; the same request with a new message id is a
    replay and is refused 4.01."""

    async def scenario() -> None:
        async with gateway(world, sealed=sealed) as gw, gw.client() as client:
            session = await client.session_for_use()
            msg, header = client._build(
                session, "POST", "sensors/pi-1/temp", b"once", (), None, None, None
            )
            msg.mtype, msg.mid, msg.token = aiocoap.CON, 0x4242, b"\x7a\x01"
            datagram = msg.encode()
            loop = asyncio.get_running_loop()
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setblocking(False)
            sock.connect(("127.0.0.1", gw.port))
            try:

                async def exchange(data: bytes) -> bytes:
                    await loop.sock_sendall(sock, data)
                    return await asyncio.wait_for(loop.sock_recv(sock, 4096), 5)

                first = await exchange(datagram)
                again = await exchange(datagram)
                assert again == first  # byte for byte: same proof, same sequence number
                response = aiocoap.Message.decode(first)
                assert response.mtype == aiocoap.ACK and response.mid == 0x4242
                opened = client.open_response(session, header, response)
                assert opened.payload == b"pi-1:once"
                (peer,) = gw.site.sessions.values()
                assert peer.requests == 1 and len(gw.seen.requests) == 1
                assert gw.site.stats["rejections:replayed"] == 0
                msg.mid = 0x4243  # a replay under a new message id
                refused = aiocoap.Message.decode(await exchange(msg.encode()))
                assert refused.code == codes.UNAUTHORIZED
                assert reason_of(refused) is Reason.REPLAYED
                assert gw.site.stats["rejections:replayed"] == 1
                assert peer.requests == 1 and len(gw.seen.requests) == 1
            finally:
                sock.close()

    run(scenario())


# ---------------------------------------------------------------- attacks on responses


class Mitm(asyncio.DatagramProtocol):
    """A UDP man in the middle between one client and the gateway.

    modes: ``relay``; ``rewrite`` (flip a payload bit of proven responses); ``answer``
    (answer proven requests itself, with ``impostor_proof``); ``reflect`` (answer with
    the request's own proof); ``stale`` (answer with the genuine response
    ``genuine[replay_index]`` to an earlier request)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.client: tuple[str, int] | None = None
        self.mode = "relay"
        self.impostor_proof: bytes | None = None
        #: genuine proven responses of the gateway, as they arrived
        self.genuine: list[aiocoap.Message] = []
        self.replay_index = -1
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        msg = aiocoap.Message.decode(data)
        if addr == self.target:
            proof = msg.opt.get_option(PROOF_OPTION)
            if proof and msg.code.is_response():
                self.genuine.append(aiocoap.Message.decode(data))
                if self.mode == "rewrite":
                    body = bytes(msg.payload) or b"\x00"
                    msg.payload = body[:-1] + bytes([body[-1] ^ 1])
                    msg.direction = Direction.OUTGOING
                    data = msg.encode()
            if self.client is not None:
                self.transport.sendto(data, self.client)
            return
        self.client = addr
        if (
            msg.code.is_request()
            and msg.opt.get_option(PROOF_OPTION)
            and self.mode in ("answer", "reflect", "stale")
        ):
            reply = aiocoap.Message(code=codes.CHANGED, payload=b"pi-1:fake")
            reply.mtype, reply.mid, reply.token = aiocoap.ACK, msg.mid, msg.token
            proof = None
            if self.mode == "answer":
                proof = self.impostor_proof
            elif self.mode == "reflect":
                proof = msg.opt.get_option(PROOF_OPTION)[0].value
            else:
                reply = self.genuine[self.replay_index].copy(
                    mtype=aiocoap.ACK, mid=msg.mid, token=msg.token
                )
            if proof is not None:
                reply.opt.add_option(PROOF_OPTION.create_option(value=proof))
            reply.direction = Direction.OUTGOING
            self.transport.sendto(reply.encode(), addr)
            return
        self.transport.sendto(data, self.target)


def test_responses_not_from_the_gateway_are_rejected(world: World, sealed: bool) -> None:
    async def scenario() -> None:
        async with gateway(world, sealed=sealed) as gw, gateway(world, sealed=sealed) as other:
            loop = asyncio.get_running_loop()
            transport, mitm = await loop.create_datagram_endpoint(
                lambda: Mitm(("127.0.0.1", gw.port)), local_addr=("127.0.0.1", 0)
            )
            via = f"coap://127.0.0.1:{transport.get_extra_info('sockname')[1]}"
            try:
                async with gw.client(uri=via) as client, other.client() as elsewhere:
                    ok = await client.request("POST", "sensors/pi-1/temp", b"1")
                    assert ok.payload == b"pi-1:1"

                    async def rejected(reason: Reason) -> None:
                        with pytest.raises(ResponseRejected) as caught:
                            await client.request("POST", "sensors/pi-1/temp", b"x")
                        assert caught.value.reason is reason, caught.value

                    mitm.mode = "rewrite"  # altered payload of a genuine response
                    await rejected(Reason.BAD_TAG)
                    # the genuine response withheld above, used to answer a new request:
                    # fresh, unaltered, but bound to the other request
                    mitm.mode = "stale"
                    await rejected(Reason.BAD_TAG)
                    mitm.replay_index = 0  # a response the device already accepted
                    await rejected(Reason.REPLAYED)
                    mitm.mode = "reflect"  # the request's own proof sent back
                    await rejected(Reason.BAD_TAG)
                    mitm.mode = "answer"  # no proof at all on a 2.04
                    await rejected(Reason.MALFORMED)
                    # a real proof, but from the device's session with another gateway
                    await elsewhere.request("GET", "sensors/pi-1/temp")
                    _, header = await proven(elsewhere, "POST", "sensors/pi-1/temp", b"x")
                    mitm.impostor_proof = header
                    await rejected(Reason.UNKNOWN_SESSION)
                    # a well-formed header in our session with a made-up tag
                    assert client.session is not None
                    mitm.impostor_proof = (
                        bytes([0x11 if sealed else 0x10])
                        + client.session.session_id
                        + bytes(2)
                        + (1000).to_bytes(4, "big")
                        + os.urandom(16)
                    )
                    await rejected(Reason.BAD_TAG)
                    mitm.mode = "relay"
                    again = await client.request("POST", "sensors/pi-1/temp", b"2")
                    assert again.payload == b"pi-1:2" and client.handshakes == 1
            finally:
                transport.close()

    run(scenario())


# ---------------------------------------------------------------- malformed handshakes


def test_malformed_handshakes_are_refused_cleanly(world: World) -> None:
    async def scenario() -> None:
        async with gateway(world) as gw:
            good = gw.initiator().start()
            n = len(good)
            lengths = sorted({*range(0, 12), *range(12, n + 40, 97), n - 1, n + 1, 2 * n})
            payloads = [good[:k] if k <= n else good + os.urandom(k - n) for k in lengths]
            payloads += [os.urandom(k) for k in (1, 31, 600, n)]
            flipped = bytearray(good)
            flipped[n // 2] ^= 0x40
            payloads.append(bytes(flipped))
            sig_flip = bytearray(good)
            sig_flip[-5] ^= 0x01
            payloads.append(bytes(sig_flip))
            ctx = await aiocoap.Context.create_client_context()
            try:
                for payload in payloads:
                    resp = await raw_request(ctx, gw.uri + "/.well-known/sa1", codes.POST, payload)
                    assert resp.code in (codes.BAD_REQUEST, codes.UNAUTHORIZED), (
                        len(payload),
                        resp.code,
                        resp.payload,
                    )
                    assert bytes(resp.payload).startswith(b"tessera: ")
                assert not gw.site.sessions
                # a block-wise upload beyond any valid msg1 is cut off early
                huge = await raw_request(
                    ctx, gw.uri + "/.well-known/sa1", codes.POST, bytes(40 * 1024)
                )
                assert huge.code == codes.REQUEST_ENTITY_TOO_LARGE
            finally:
                await ctx.shutdown()
            # the gateway is still fine
            async with gw.client() as client:
                assert (await client.request("GET", "sensors/pi-1/temp")).payload == b"21.5"

    run(scenario())


# ---------------------------------------------------------------- session lifecycle


def test_rehandshake_before_the_lifetime_ends_and_after_loss(world: World) -> None:
    async def scenario() -> None:
        async with gateway(world, lifetime=100) as gw, gw.client(clock=gw.clock) as client:
            await client.request("GET", "sensors/pi-1/temp")
            first = client.session
            assert first is not None
            gw.clock.offset += 85  # inside the lifetime, before the renewal margin
            await client.request("GET", "sensors/pi-1/temp")
            assert client.handshakes == 1
            gw.clock.offset += 6  # 91 s: within 10 s (a tenth of 100 s) of the end
            await client.request("GET", "sensors/pi-1/temp")
            assert client.handshakes == 2 and client.session is not first
            # make-before-break: the gateway still holds the old session until it ends
            assert first.session_id in gw.site.sessions
            gw.clock.offset += 200  # both ended: a new handshake on first use
            await client.request("GET", "sensors/pi-1/temp")
            assert client.handshakes == 3
            assert first.session_id not in gw.site.sessions
            # the gateway restarts and forgets every session: one retry, new handshake
            gw.site.forget_all()
            gw.clock.offset += 2
            reply = await client.request("POST", "sensors/pi-1/temp", b"after")
            assert reply.payload == b"pi-1:after" and client.handshakes == 4

    run(scenario())


def test_revoked_device_is_cut_off(world: World) -> None:
    async def scenario() -> None:
        async with gateway(world) as gw, gw.client(min_handshake_interval=0) as client:
            await client.request("GET", "sensors/pi-1/temp")
            (peer,) = gw.site.sessions.values()
            assert gw.site.revoke([peer.cert_serial]) == [peer]
            assert not gw.site.sessions
            with pytest.raises(GatewayRefused) as caught:
                await client.request("GET", "sensors/pi-1/temp")
            assert caught.value.reason is Reason.CREDENTIAL_REVOKED
            assert client.handshakes == 1  # the retry's handshake was refused

    run(scenario())


# ---------------------------------------------------------------- authorization


def test_policy_decides_method_and_path(world: World, sealed: bool) -> None:
    async def scenario() -> None:
        policy = parse_policy(POLICY)
        async with gateway(world, sealed=sealed, policy=policy) as gw:
            async with gw.client("pi-1") as client:
                assert (await client.request("GET", "sensors/pi-1/temp")).code == codes.CONTENT
                ok = await client.request("POST", "sensors/pi-1/readings", b"1")
                assert ok.code == codes.CHANGED
                denied = await client.request("GET", "sensors/pi-2/temp")
                # a proven refusal: the device knows the gateway said no
                assert denied.code == codes.FORBIDDEN
                assert denied.payload == b"tessera: not_authorized (707)"
                assert (await client.request("DELETE", "sensors/pi-1/temp")).code == (
                    codes.FORBIDDEN
                )
                assert len(gw.seen.requests) == 2
            async with gw.client("pi-2") as client2:
                got = await client2.request("GET", "sensors/pi-2/temp")
                assert got.code == codes.CONTENT
            assert gw.site.stats["rejections:not_authorized"] == 2

    run(scenario())


def test_policy_coap_tables() -> None:
    pi = Identity.parse("spiffe://fleet.test/device/pi-1")
    bridge = Identity.parse("spiffe://fleet.test/broker/b-1")
    p = parse_policy(
        POLICY
        + '\n[classes.gateway]\ninherits = "default"\n[classes.gateway.coap]\n'
        + 'DELETE = ["sensors/{id}/+"]\niPATCH = ["+"]\n'
        + '[brokers]\n[brokers.coap]\nGET = ["#"]\n'
    )
    assert p.may_request(pi, "default", "GET", ("sensors", "pi-1", "temp"))
    assert p.may_request(pi, "default", "GET", ("sensors", "pi-1"))  # '#' matches the parent
    assert not p.may_request(pi, "default", "GET", ("sensors", "pi-2", "temp"))
    assert not p.may_request(pi, "default", "GET", ("sensors", "pi-1/temp"))
    assert not p.may_request(pi, "default", "PUT", ("sensors", "pi-1", "temp"))
    assert not p.may_request(pi, "default", "DELETE", ("sensors", "pi-1", "temp"))
    assert p.may_request(pi, "gateway", "DELETE", ("sensors", "pi-1", "temp"))
    assert p.may_request(pi, "gateway", "GET", ("config",))  # inherited
    assert p.may_request(pi, "gateway", "iPATCH", ())  # the root path is one empty level
    assert not p.may_request(pi, "default", "GET", ())
    assert p.may_request(bridge, "", "GET", ("anything", "at", "all"))
    assert not p.may_request(bridge, "", "POST", ("x",))
    assert not p.may_request(pi, "default", "GET", ("sensors", "pi-1", "a\0b"))
    # a policy without coap tables keeps its digest; coap rules change it
    base = 'version = 1\n[classes.default]\npublish = ["a/{id}"]\n'
    assert parse_policy(base).digest == parse_policy(base + "[classes.default.coap]\n").digest
    assert (
        parse_policy(base).digest
        != parse_policy(base + '[classes.default.coap]\nGET = ["a"]\n').digest
    )
    for bad, words in [
        ('[classes.default.coap]\nGETT = ["a"]\n', "unknown key 'GETT'"),
        ('[classes.default.coap]\nGET = "a"\n', "must be an array"),
        ('[classes.default.coap]\nGET = ["a/#/b"]\n', "'#' must be"),
        ('[classes.default.coap]\nGET = ["{name}"]\n', "unknown placeholder"),
        ("[classes.default]\ncoap = 1\n", "must be a table"),
    ]:
        with pytest.raises(ConfigurationError, match=words):
            parse_policy("version = 1\n" + bad)


def test_site_mounted_below_another_site_proves_the_full_path(world: World) -> None:
    """The parent Site strips /gw before the wrapper sees the request; the proof (and the
    policy) still cover the full path."""

    async def scenario() -> None:
        policy = parse_policy(POLICY)
        handshake = ("gw", ".well-known", "sa1")
        async with (
            gateway(world, policy=policy, mount=("gw",)) as gw,
            gw.client(handshake_path=handshake) as client,
        ):
            reply = await client.request("POST", "gw/sensors/pi-1/temp", b"9")
            assert reply.payload == b"pi-1:9"
            # a proof for the stripped path does not verify
            ctx = await aiocoap.Context.create_client_context()
            try:
                msg, _ = await proven(client, "POST", "sensors/pi-1/temp", b"9")
                resp = await ctx.request(
                    msg.copy(uri_path=("gw", "sensors", "pi-1", "temp"))
                ).response
                assert resp.code == codes.UNAUTHORIZED
                assert reason_of(resp) is Reason.BAD_TAG
            finally:
                await ctx.shutdown()

    run(scenario())


def test_one_device_may_hold_several_sessions(world: World) -> None:
    async def scenario() -> None:
        async with gateway(world) as gw:
            gw.site.max_sessions_per_peer = 3
            clients = [gw.client() for _ in range(4)]
            try:
                for i, client in enumerate(clients[:3]):
                    reply = await client.request("POST", "sensors/pi-1/temp", b"%d" % i)
                    assert reply.payload == b"pi-1:%d" % i
                assert len(gw.site.sessions_of(clients[0].credential.identity)) == 3
                # each session is found by its id, whatever the order of use
                for client in reversed(clients[:3]):
                    assert (await client.request("GET", "sensors/pi-1/temp")).payload == b"21.5"
                # a fourth handshake pushes the oldest session out
                await clients[3].request("GET", "sensors/pi-1/temp")
                assert clients[0].session is not None
                assert clients[0].session.session_id not in gw.site.sessions
                assert len(gw.site.sessions) == 3
                # and a full gateway refuses new handshakes with 5.03
                gw.site.max_sessions = 3
                with pytest.raises(GatewayRefused) as caught:
                    await gw.client("pi-2").request("GET", "sensors/pi-2/temp")
                assert caught.value.code == codes.SERVICE_UNAVAILABLE
            finally:
                for client in clients:
                    await client.close()

    run(scenario())


def test_plain_aiocoap_site_ignores_unknown_critical_options() -> None:
    """Why the wrapper checks critical options itself: aiocoap 0.4.17's Site serves a
    request with an unknown critical option as if the option were absent (RFC 7252
    section 5.4.1 requires 4.02). If this ever fails, aiocoap started checking."""

    async def scenario() -> None:
        site = resource.Site()
        site.add_resource(["x"], Echo(Seen()))
        server = await aiocoap.Context.create_server_context(site, bind=("127.0.0.1", 0))
        ctx = await aiocoap.Context.create_client_context()
        try:
            msg = aiocoap.Message(code=codes.GET, uri=f"coap://127.0.0.1:{local_port(server)}/x")
            msg.opt.add_option(OptionNumber(65001).create_option(value=b"?"))
            assert (await ctx.request(msg).response).code == codes.CONTENT
        finally:
            await ctx.shutdown()
            await server.shutdown()

    run(scenario())


def test_benchmark_quick_run_reports_every_figure() -> None:
    """``python -m bench coap --quick --json --flood 0.5``: shape only; timing is the
    benchmark's business (a MISS is reported, never a failure)."""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-m", "bench", "coap", "--quick", "--json", "--flood", "0.5"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["benchmark"] == "coap" and report["quick"] is True
    for mode in ("plain", "proven", "sealed", "oscore"):
        for tag in ("seq", "inflight"):
            assert report["rates"][f"{mode}_{tag}_rps"] > 0
            assert report["rates"][f"{mode}_{tag}_server_cpu_us"] > 0
    medians = report["medians_us"]
    assert medians["tessera_first_request_us"] > 0
    for key in ("tessera_coap_check_us", "tessera_session_verify_us", "oscore_unprotect_us"):
        assert medians[key] > 0
    for tag in ("one_source", "100_sources"):
        assert report["rates"][f"flood_{tag}_datagrams_per_s"] > 0
        assert f"flood_{tag}_preauth_kib" in report["rates"]
        assert report["rates"][f"flood_{tag}_genuine_failed"] == 0
        tables = report[f"flood_{tag}"]["tables"]
        assert tables["pending"] <= 1024 and tables["msg1_bytes"] <= 1024 * 1024
    assert set(report["targets"]) == {
        "first_request_vs_edhoc",
        "verify_vs_oscore_unprotect",
        "proven_vs_plain_seq",
        "proven_vs_oscore_seq",
        "proven_vs_plain_inflight",
        "proven_vs_oscore_inflight",
    }
    assert done.stdout.count("[PASS]") + done.stdout.count("[MISS]") == 6
