"""Malformed input gets a 4.xx and one log line: never a 5.00, never a traceback.

Raw datagrams against a real aiocoap gateway on 127.0.0.1: a malformed Uri-Host on a
proven request, unknown critical options, string options that are not UTF-8, paths
and queries too long for the action's u16 length, bad proofs, and a seeded soup of
random options and codes. After each, the genuine device beside it is still served.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time

import aiocoap
import pytest
from aiocoap.numbers import codes
from aiocoap.numbers.optionnumbers import OptionNumber

from broker_plugin.coap import site as coap_site
from device.coap import CONFIRM_OPTION, PROOF_OPTION, TesseraCoapClient
from simulator.fleet import Fleet
from structauth.coap_binding import block_action, request_action, response_action
from structauth.errors import MalformedMessage, Reason
from tests.test_coap import Gateway, World, gateway, reason_of, run


@pytest.fixture(scope="module")
def world() -> World:
    fleet = Fleet()
    return World(fleet, fleet.member("broker", "gw-1"),
                 {n: fleet.member("device", n) for n in ("pi-1", "pi-2")})


class Wire:
    """A raw UDP socket to the gateway. :meth:`exchange` sends one datagram, then an
    empty CON (a CoAP ping, answered RST) as a barrier: once the RST is back, the
    gateway has dealt with the datagram, and whatever it answered has arrived."""

    def __init__(self, gw: Gateway) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.sock.connect(("127.0.0.1", gw.port))
        self.mid = random.randrange(0x10000)

    def close(self) -> None:
        self.sock.close()

    def next_mid(self) -> int:
        self.mid = (self.mid + 1) & 0xFFFF
        return self.mid

    async def exchange(self, datagram: bytes) -> list[aiocoap.Message]:
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(self.sock, datagram)
        ping = self.next_mid()
        await loop.sock_sendall(self.sock, bytes((0x40, 0x00)) + ping.to_bytes(2, "big"))
        answers = []
        while True:
            data = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), 5)
            if len(data) == 4 and data[0] >> 4 & 3 == 3 and int.from_bytes(data[2:4],
                                                                            "big") == ping:
                return answers
            answers.append(aiocoap.Message.decode(data))

    async def one(self, msg: aiocoap.Message) -> aiocoap.Message:
        msg.mtype, msg.mid, msg.token = aiocoap.CON, self.next_mid(), os.urandom(4)
        (answer,) = await self.exchange(bytes(msg.encode()))
        return answer


class Lines:
    """Log records of the test, split by who wrote them."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self.caplog = caplog
        caplog.set_level(logging.INFO)
        self.mark = 0

    def since(self) -> list[logging.LogRecord]:
        records = self.caplog.records[self.mark:]
        self.mark = len(self.caplog.records)
        return records

    def exactly_one_line(self) -> logging.LogRecord:
        records = self.since()
        ours = [r for r in records if r.name == "tessera.coap"]
        assert len(ours) == 1, [r.getMessage() for r in records]
        assert not [r for r in records if r.exc_info or r.levelno >= logging.ERROR], [
            r.getMessage() for r in records]
        assert "\n" not in ours[0].getMessage()
        return ours[0]


async def proven_to(client: TesseraCoapClient, path: tuple[str, ...],
                    **options: object) -> aiocoap.Message:
    session = await client.session_for_use()
    msg, _ = client._build(session, "GET", path, b"", (), None, None, None)
    for name, value in options.items():
        setattr(msg.opt, name, value)
    return msg


# ---------------------------------------------------------------- the cases


def test_malformed_uri_host_on_a_proven_request(world: World,
                                                caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        lines = Lines(caplog)
        async with gateway(world) as gw, gw.client() as device:
            await device.request("GET", "sensors/pi-1/temp")
            wire = Wire(gw)
            try:
                for host in ("[::1", "a b", "x]", "a/b", "", "a@b", "%zz", "\x00", "h" * 300,
                             "[not-v6]", "1:2:3"):
                    lines.since()
                    msg = await proven_to(device, ("sensors", "pi-1", "temp"))
                    msg.opt.uri_host = host
                    answer = await wire.one(msg)
                    assert answer.code == codes.BAD_REQUEST, (host, answer, answer.payload)
                    assert reason_of(answer) is Reason.MALFORMED
                    assert "Uri-Host" in lines.exactly_one_line().getMessage()
                    assert not answer.opt.get_option(PROOF_OPTION)
                # well-formed hosts pass (they are not part of the proof)
                for host in ("gw.example", "192.0.2.1", "::1", "[2001:db8::1]", "gw-ü.example"):
                    msg = await proven_to(device, ("sensors", "pi-1", "temp"))
                    msg.opt.uri_host = host
                    assert (await wire.one(msg)).code == codes.CONTENT, host
            finally:
                wire.close()
            assert (await device.request("GET", "sensors/pi-1/temp")).payload == b"21.5"

    run(scenario())


def test_malformed_uri_host_below_a_parent_site(world: World,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """Mounted below another Site the wrapper re-reads the original URI; a host that
    breaks it is still a 4.00, not a 5.00."""

    async def scenario() -> None:
        lines = Lines(caplog)
        async with gateway(world, mount=("gw",)) as gw, gw.client(
                handshake_path=("gw", ".well-known", "sa1")) as device:
            await device.request("GET", "gw/sensors/pi-1/temp")
            wire = Wire(gw)
            try:
                lines.since()
                msg = await proven_to(device, ("gw", "sensors", "pi-1", "temp"))
                msg.opt.uri_host = "[::1"
                answer = await wire.one(msg)
                assert answer.code == codes.BAD_REQUEST and reason_of(answer) is Reason.MALFORMED
                lines.exactly_one_line()
            finally:
                wire.close()
            assert (await device.request("GET", "gw/sensors/pi-1/temp")).payload == b"21.5"

    run(scenario())


def test_unknown_critical_options_and_bad_proofs(world: World,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        lines = Lines(caplog)
        async with gateway(world) as gw, gw.client() as device:
            await device.request("GET", "sensors/pi-1/temp")
            wire = Wire(gw)
            try:
                lines.since()
                msg = await proven_to(device, ("sensors", "pi-1", "temp"))
                msg.opt.add_option(OptionNumber(9).create_option(value=b"?"))  # critical
                answer = await wire.one(msg)
                assert answer.code == codes.BAD_OPTION
                assert b"unknown critical option 9" in answer.payload
                lines.exactly_one_line()
                for proof, reason in ((b"\x10" * 30, Reason.MALFORMED),
                                      (None, Reason.MALFORMED)):
                    msg = aiocoap.Message(code=codes.GET)
                    msg.opt.uri_path = ("sensors", "pi-1", "temp")
                    if proof is not None:
                        msg.opt.add_option(PROOF_OPTION.create_option(value=proof))
                    answer = await wire.one(msg)
                    assert answer.code == codes.UNAUTHORIZED and reason_of(answer) is reason
                    lines.exactly_one_line()
                msg = await proven_to(device, ("sensors", "pi-1", "temp"))
                (option,) = msg.opt.get_option(PROOF_OPTION)
                forged = bytes(option.value)[:15] + os.urandom(16)
                msg.opt.delete_option(PROOF_OPTION)
                msg.opt.add_option(PROOF_OPTION.create_option(value=forged))
                answer = await wire.one(msg)
                assert answer.code == codes.UNAUTHORIZED and reason_of(answer) is Reason.BAD_TAG
                lines.exactly_one_line()
            finally:
                wire.close()
            assert (await device.request("GET", "sensors/pi-1/temp")).payload == b"21.5"

    run(scenario())


def test_string_options_that_are_not_utf8(world: World,
                                          caplog: pytest.LogCaptureFixture) -> None:
    """aiocoap 0.4.17 lets UnicodeDecodeError escape its UDP transport (a traceback per
    datagram, no answer); the gateway answers 4.02 and logs one line."""

    async def scenario() -> None:
        lines = Lines(caplog)
        async with gateway(world) as gw, gw.client() as device:
            await device.request("GET", "sensors/pi-1/temp")
            wire = Wire(gw)
            try:
                for option in (bytes([0xB2, 0xFF, 0xFE]),      # Uri-Path (11)
                               bytes([0x32, 0xFF, 0xFE]),      # Uri-Host (3)
                               bytes([0xD2, 0x02]) + b"\xc3\x28"):  # Uri-Query (15 = 13 + 2)
                    lines.since()
                    mid = wire.next_mid()
                    datagram = bytes((0x42, 0x01)) + mid.to_bytes(2, "big") + b"tk" + option
                    (answer,) = await wire.exchange(datagram)
                    assert answer.code == codes.BAD_OPTION and answer.mid == mid
                    assert answer.token == b"tk" and answer.mtype == aiocoap.ACK
                    assert "not UTF-8" in lines.exactly_one_line().getMessage()
                # a non-confirmable one is dropped (nothing to acknowledge), one line
                lines.since()
                assert await wire.exchange(bytes((0x50, 0x01, 0, 1, 0xB2, 0xFF, 0xFE))) == []
                lines.exactly_one_line()
            finally:
                wire.close()
            assert gw.site.stats["rejections:bad_option"] == 4
            assert (await device.request("GET", "sensors/pi-1/temp")).payload == b"21.5"

    run(scenario())


def test_an_action_that_does_not_fit_the_wire_format(world: World,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """33,000 empty Uri-Path options are 33 KB on the wire (a byte each) but 66 KB of
    action (two bytes each, u16 total). aiocoap's UDP transport reads at most 4,096
    bytes of a datagram, so such a request comes over CoAP-over-TCP (RFC 8323), which
    the same site serves: 4.00 ``malformed``, one log line, no OverflowError."""

    async def scenario() -> None:
        lines = Lines(caplog)
        port = free_port()
        async with gateway(world, transports=("udp6", "tcpserver"), port=port) as gw, \
                gw.client() as device:
            await device.request("GET", "sensors/pi-1/temp")
            tcp = await aiocoap.Context.create_client_context(transports=["tcpclient"])
            try:
                for path, query in ((("",) * 33_000, ()), (("a",), ("q" * 200,) * 330)):
                    lines.since()
                    msg = await proven_to(device, ("sensors", "pi-1", "temp"))
                    msg.set_request_uri(f"coap+tcp://127.0.0.1:{port}/")
                    msg.opt.uri_path = path
                    msg.opt.uri_query = query
                    answer = await tcp.request(msg).response
                    assert answer.code == codes.BAD_REQUEST, answer
                    assert reason_of(answer) is Reason.MALFORMED
                    assert "exceeds 65535" in lines.exactly_one_line().getMessage()
                # the device refuses to build one
                with pytest.raises(MalformedMessage):
                    await device.request("GET", ["x" * 250] * 300)
            finally:
                await tcp.shutdown()
            assert (await device.request("GET", "sensors/pi-1/temp")).payload == b"21.5"
            assert device.handshakes == 1

    run(scenario())


def free_port() -> int:
    """A port free for TCP and UDP on 127.0.0.1 (aiocoap's TCP server cannot bind 0)."""
    for _ in range(50):
        with socket.socket() as t:
            t.bind(("127.0.0.1", 0))
            port = int(t.getsockname()[1])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            try:
                u.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port")


def test_action_builders_refuse_what_does_not_fit() -> None:
    for bad in (lambda: request_action(1, [""] * 70_000),
                lambda: request_action(1, ["x" * 70_000]),
                lambda: request_action(1, ["x" * 255] * 260),
                lambda: request_action(1, [], ["q" * 70_000]),
                lambda: request_action(300, []),
                lambda: request_action(1, [], content_format=1 << 32),
                lambda: request_action(1, ["\udc80"]),
                lambda: block_action(request_action(1, ["x" * 65_490]), 0, 6, False,
                                     bytes(31)),
                lambda: block_action(b"", 0, 6, False, b"short"),
                lambda: block_action(b"", 1 << 20, 6, False, bytes(31))):
        with pytest.raises(MalformedMessage) as caught:
            bad()
        assert caught.value.reason is Reason.MALFORMED
    assert len(request_action(1, ["x" * 255] * 250)) <= 65_535
    assert len(response_action(bytes(31), 0x45, None)) == 45


def test_random_option_soup_never_gets_a_5xx(world: World,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """600 seeded random requests: random codes, options (critical and elective, known
    and unknown, values of any length and encoding), payloads, half of them carrying
    a genuine proof header. Every answer is a 2.xx/4.xx (or 5.05 to a proxy request),
    and nothing is logged as an error."""

    async def scenario() -> None:
        rng = random.Random(0x7E55E7A)
        numbers = [1, 3, 4, 5, 7, 8, 11, 12, 14, 15, 17, 20, 23, 27, 28, 35, 39, 60, 252,
                   258, 292, 65000, 65001, 65003, 65005, 65007, 2048, 2049]
        lines = Lines(caplog)
        async with gateway(world) as gw, gw.client() as device:
            await device.request("GET", "sensors/pi-1/temp")
            session = await device.session_for_use()
            wire = Wire(gw)
            seen: set[int] = set()
            try:
                for _ in range(600):
                    code = rng.choice([1, 1, 2, 3, 4, 5, 6, 7, 8, 31])
                    options = bytearray()
                    last = 0
                    picks = sorted(rng.sample(numbers, rng.randrange(0, 6)))
                    header = os.urandom(31)
                    if rng.random() < 0.5:
                        header, _ = session.protect(b"x", b"", gw.clock())
                        picks = sorted({*picks, 65003})
                    for number in picks:
                        if number == 65003 and rng.random() < 0.8:
                            value = header
                        else:
                            value = rng.randbytes(rng.choice([0, 1, 2, 4, 8, 31, 46, 300]))
                        delta = number - last
                        last = number
                        options += _option(delta, value)
                    payload = rng.randbytes(rng.choice([0, 10, 1024])) if rng.random() < 0.5 \
                        else b""
                    mid = wire.next_mid()
                    datagram = (bytes((0x41, code)) + mid.to_bytes(2, "big") + b"\x07"
                                + bytes(options) + ((b"\xff" + payload) if payload else b""))
                    for answer in await wire.exchange(datagram):
                        seen.add(int(answer.code))
                        fine = (answer.code.class_ != 5
                                or answer.code == codes.PROXYING_NOT_SUPPORTED)
                        assert fine, (answer, answer.payload, datagram.hex())
                records = lines.since()
                assert not [r for r in records if r.exc_info or r.levelno >= logging.ERROR], [
                    r.getMessage() for r in records if r.levelno >= logging.ERROR][:3]
            finally:
                wire.close()
            assert any(c >> 5 == 4 for c in seen)
            assert (await device.request("GET", "sensors/pi-1/temp")).payload == b"21.5"

    run(scenario(), timeout=120)


def _option(delta: int, value: bytes) -> bytes:
    def nibble(n: int) -> tuple[int, bytes]:
        if n < 13:
            return n, b""
        if n < 269:
            return 13, bytes((n - 13,))
        return 14, (n - 269).to_bytes(2, "big")

    d, dx = nibble(delta)
    ln, lx = nibble(len(value))
    return bytes(((d << 4) | ln,)) + dx + lx + value


def test_misplaced_and_repeated_tessera_options(world: World,
                                                caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        lines = Lines(caplog)
        async with gateway(world) as gw, gw.client() as device:
            await device.request("GET", "sensors/pi-1/temp")
            wire = Wire(gw)
            try:
                # a proof (or msg3) on the handshake resource
                for option in (PROOF_OPTION, CONFIRM_OPTION):
                    lines.since()
                    msg = aiocoap.Message(code=codes.POST, payload=b"x")
                    msg.opt.uri_path = (".well-known", "sa1")
                    msg.opt.add_option(option.create_option(value=os.urandom(31)))
                    answer = await wire.one(msg)
                    assert answer.code == codes.BAD_OPTION, answer
                    lines.exactly_one_line()
                # a repeated Tessera-Confirm on a proven request
                msg = await proven_to(device, ("sensors", "pi-1", "temp"))
                for _ in range(2):
                    msg.opt.add_option(CONFIRM_OPTION.create_option(value=bytes(46)))
                assert (await wire.one(msg)).code == codes.BAD_OPTION
                lines.exactly_one_line()
                # a later Block2 block of a response nobody asked for
                msg = await proven_to(device, ("sensors", "pi-1", "temp"))
                msg.opt.block2 = (2, False, 6)
                answer = await wire.one(msg)
                assert answer.code == codes.REQUEST_ENTITY_INCOMPLETE
                lines.exactly_one_line()
                assert len(gw.site.responses) == 0
            finally:
                wire.close()
            assert (await device.request("GET", "sensors/pi-1/temp")).payload == b"21.5"

    run(scenario())


def test_refusals_are_aggregated_for_audit_and_rate_limited_in_the_log(
        world: World, caplog: pytest.LogCaptureFixture) -> None:
    """A flood of refusals from many sources leaves one audit record per interval with
    counts by reason and source (bounded), and at most 20 log lines a second plus a
    summary; the device's own events are still audited one by one."""

    async def scenario() -> None:
        lines = Lines(caplog)
        records: list[tuple[str, dict[str, object]]] = []
        limits = coap_site.GatewayLimits(audit_keys=8)
        async with gateway(world, limits=limits,
                           audit=lambda e, **f: records.append((e, f))) as gw, \
                gw.client() as device:
            await device.request("GET", "sensors/pi-1/temp")
            lines.since()
            senders = []
            try:
                for i in range(12):
                    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    sock.bind((f"127.0.0.{40 + i}", 0))
                    sock.setblocking(False)
                    sock.connect(("127.0.0.1", gw.port))
                    senders.append(sock)
                loop = asyncio.get_running_loop()
                started = time.monotonic()
                for sock in senders:
                    for n in range(5):
                        msg = aiocoap.Message(code=codes.GET)
                        msg.opt.uri_path = ("sensors", "pi-1", "temp")
                        msg.mtype, msg.mid, msg.token = aiocoap.CON, n, b"t"
                        await loop.sock_sendall(sock, msg.encode())
                        answer = aiocoap.Message.decode(
                            await asyncio.wait_for(loop.sock_recv(sock, 2048), 5))
                        assert reason_of(answer) is Reason.MALFORMED
            finally:
                for sock in senders:
                    sock.close()
            seconds = int(time.monotonic()) - int(started) + 1  # wall-clock seconds touched
            ours = [r for r in lines.since() if r.name == "tessera.coap"]
            assert 20 <= len(ours) <= 21 * seconds  # 20 a second, plus one summary each
            if seconds <= 2:
                assert len(ours) < 60
            assert not [e for e, _ in records if e in ("request_rejected", "handshake_refused")]
            gw.site.flush_refusals(gw.clock())
            (summary,) = [f for e, f in records if e == "refusals"]
            counts = summary["counts"]
            assert isinstance(counts, list) and len(counts) <= 8 + 1
            assert sum(c["count"] for c in counts) == 60
            assert {"reason": "malformed", "source": "other", "count": 4 * 5} in counts
            assert [e for e, _ in records].count("handshake_ok") == 1
            assert (await device.request("GET", "sensors/pi-1/temp")).payload == b"21.5"

    run(scenario())
