"""Attacks on the CoAP gateway: a raw CoAP client (tests/attacks/coap.py, RFC 7252 and
RFC 7959) against a real gateway process (tests/attacks/gateway.py) on UDP 127.0.0.1.

Each case asserts the refusal (code), that nothing reached the inner site (served.jsonl)
and nothing was audited as a success, that the gateway's pre-authentication tables stay
within their bounds, and that the live device beside it (a proven POST every 100 ms)
had every reading answered and served exactly once.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import pytest

from simulator.fleet import Fleet
from structauth.coap_binding import HANDSHAKE_PATH, request_action
from tests.attacks import coap as c
from tests.attacks.coapworld import CoapDevice, GatewayProcess, LiveCoapDevice

DEVICES = ["pi-clive", "pi-cevil", "pi-cvictim", "pi-c2"]
LIVE = "pi-clive"


class Bed:
    """The gateway, the live device, and an enrolled attacker with its own session."""

    def __init__(self, gateway: GatewayProcess) -> None:
        self.gateway = gateway
        fleet = gateway.fleet
        self.members = {n: fleet.member("device", n) for n in DEVICES}
        self.live = LiveCoapDevice(gateway, self.members[LIVE]).start()
        self.evil = CoapDevice(gateway, self.members["pi-cevil"])
        self.evil.handshake()
        answer = self.evil.request(c.POST, ["sensors", "pi-cevil", "readings"], b"hello")
        assert answer.reply.code == c.CHANGED

    def device(self, name: str) -> CoapDevice:
        return CoapDevice(self.gateway, self.members[name])

    def served_mark(self) -> int:
        return len(self.gateway.served())

    def served_since(self, mark: int, marker: bytes = b"ATTACK") -> list[dict[str, Any]]:
        return [r for r in self.gateway.served()[mark:]
                if marker in bytes.fromhex(r["payload"])]

    def undisturbed(self) -> None:
        """Gateway up; the live device's next reading goes through at once; every
        reading so far was answered and served exactly once."""
        assert self.gateway.alive(), "the gateway died"
        n = self.live.post_now()
        assert n in self.live.ok, self.live.problems[-3:]
        self.live.check(self.gateway)
        assert "Traceback" not in self.gateway.log(), self.gateway.log()[-3000:]


@pytest.fixture(scope="module")
def bed(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    gateway = GatewayProcess(tmp_path_factory.mktemp("gateway"), fleet, DEVICES)
    b = Bed(gateway)
    try:
        yield b
    finally:
        b.live.stop()
        b.evil.close()
        gateway.close()


def no_success(bed: Bed, start: int, *identities: str, allow: tuple[str, ...] = ()) -> None:
    """No handshake_ok for these identities among audit records from ``start`` (the
    session ids in ``allow`` are genuine)."""
    uris = {bed.members[n].identity.uri for n in identities}
    bad = [r for r in bed.gateway.audit()[start:] if r.get("event") == "handshake_ok"
           and r.get("identity") in uris and r.get("session") not in allow]
    assert not bad, f"audited as a success: {bad}"


def raw(bed: Bed) -> c.Client:
    return c.Client("127.0.0.1", bed.gateway.port)


def refused(reply: c.Message | None, *codes: int) -> None:
    assert reply is not None, "no answer"
    assert reply.code in codes, f"{reply!r}, expected one of {[c.code_str(x) for x in codes]}"
    assert reply.opt(c.PROOF) is None or reply.code == c.FORBIDDEN, "a refusal was proven"


READINGS = ("sensors", "pi-cevil", "readings")


# ------------------------------------------------------------------ requests


def _evil_request(bed: Bed, case: str) -> tuple[c.Message | None, tuple[int, ...]]:
    evil = bed.evil
    cl = evil.client
    path = list(READINGS)
    payload = b"ATTACK " + case.encode()
    header, _ = evil.prove(c.POST, path, payload)
    token = os.urandom(4)

    def send(p: list[str], body: bytes, opts: list[c.Option]) -> c.Message | None:
        return cl.request(c.POST, p, body, opts, token=token)

    if case == "missing-proof":
        return send(path, payload, []), (c.UNAUTHORIZED,)
    if case == "short-proof":
        return send(path, payload, [(c.PROOF, header[:30])]), (c.UNAUTHORIZED,)
    if case == "unknown-session":
        return send(path, payload, [(c.PROOF, header[:1] + os.urandom(8) + header[9:])]), (
            c.UNAUTHORIZED,)
    if case == "forged-tag":
        return send(path, payload, [(c.PROOF, header[:-1] + bytes([header[-1] ^ 1]))]), (
            c.UNAUTHORIZED,)
    if case == "altered-payload":
        return send(path, payload + b"!", [(c.PROOF, header)]), (c.UNAUTHORIZED,)
    if case == "moved-path":
        return send(["sensors", "pi-cevil", "temp"], payload, [(c.PROOF, header)]), (
            c.UNAUTHORIZED, c.METHOD_NOT_ALLOWED)
    if case == "moved-method":
        return cl.request(c.PUT, path, payload, [(c.PROOF, header)]), (c.UNAUTHORIZED,)
    if case == "replayed-new-mid":
        first = send(path, payload.replace(b"ATTACK", b"GENUINE"), [])  # refused, no proof
        assert first is not None
        _, o2 = evil.prove(c.POST, path, b"GENUINE once")
        ok = cl.request(c.POST, path, b"GENUINE once", o2)
        assert ok is not None and ok.code == c.CHANGED
        return cl.request(c.POST, path, b"GENUINE once", o2), (c.UNAUTHORIZED,)
    if case == "other-devices-path":
        other = ["sensors", LIVE, "readings"]
        _, o = evil.prove(c.POST, other, payload)
        return cl.request(c.POST, other, payload, o), (c.FORBIDDEN,)
    if case == "repeated-proof":
        return send(path, payload, [(c.PROOF, header), (c.PROOF, header)]), (c.BAD_OPTION,)
    if case == "live-request-replayed":
        # a request the live device really sent and had served, captured on the wire and
        # sent again from another endpoint under a new message id
        live = bed.live.device
        body = b"ATTACK replayed live"
        with live.lock:
            _, o = live.prove(c.POST, list(bed.live.path), body)
            first = live.client.request(c.POST, list(bed.live.path), body, o)
        assert first is not None and first.code == c.CHANGED
        return cl.request(c.POST, list(bed.live.path), body, o), (c.UNAUTHORIZED,)
    if case == "live-proof-replayed":
        # a request the live device really sent (captured): under another source port
        live = bed.live.device
        with live.lock:
            _, o = live.prove(c.POST, list(bed.live.path), b"ATTACK captured")
        return cl.request(c.POST, list(bed.live.path), b"ATTACK captured", o), (
            c.UNAUTHORIZED, c.CHANGED)
    raise AssertionError(case)


REQUEST_CASES = ["missing-proof", "short-proof", "unknown-session", "forged-tag",
                 "altered-payload", "moved-path", "moved-method", "replayed-new-mid",
                 "other-devices-path", "repeated-proof", "live-proof-replayed",
                 "live-request-replayed"]


@pytest.mark.parametrize("case", REQUEST_CASES)
def test_bad_request_is_refused(bed: Bed, case: str) -> None:
    mark = bed.served_mark()
    reply, expected = _evil_request(bed, case)
    if case == "live-proof-replayed":
        # the capture was never sent by the live device itself: the gateway may serve it
        # once (it is genuine); what must hold is that the live device's session is not
        # disturbed, which undisturbed() checks below
        assert reply is not None
    elif case == "live-request-replayed":
        refused(reply, *expected)
        assert len(bed.served_since(mark)) == 1, "the captured request was served twice"
    else:
        refused(reply, *expected)
        assert not bed.served_since(mark), "the inner site served it"
    bed.undisturbed()


@pytest.mark.parametrize("option", [9, 13, 2049, 65001, c.IF_MATCH, c.IF_NONE_MATCH,
                                    c.PROXY_URI, c.PROXY_SCHEME])
@pytest.mark.parametrize("where", ["proven", "handshake"])
def test_unknown_critical_option_is_refused(bed: Bed, option: int, where: str) -> None:
    mark = bed.served_mark()
    evil = bed.evil
    if where == "proven":
        _, options = evil.prove(c.POST, list(READINGS), b"ATTACK opt")
        reply = evil.client.request(c.POST, list(READINGS), b"ATTACK opt",
                                    [*options, (option, b"x")])
    else:
        reply = raw(bed).request(c.POST, HANDSHAKE_PATH, b"SA1\x21", [(option, b"x")])
    expected = c.PROXYING_NOT_SUPPORTED if option in (c.PROXY_URI, c.PROXY_SCHEME) \
        else c.BAD_OPTION
    refused(reply, expected)
    assert not bed.served_since(mark)
    bed.undisturbed()


def _datagram(mid: int, token: bytes, raw_options: bytes, payload: bytes = b"",
              first: int | None = None) -> bytes:
    header = struct.pack("!BBH", first if first is not None else (0x40 | len(token)), c.POST,
                         mid)
    return header + token + raw_options + (b"\xff" + payload if payload else b"")


MALFORMED = {
    "reserved-delta-15": lambda: bytes([0xF1]) + b"x",
    "reserved-length-15": lambda: bytes([0xBF]) + b"x" * 20,
    "option-past-end": lambda: bytes([0xB8]) + b"sen",
    "extended-delta-cut": lambda: bytes([0xE0]),
    "payload-marker-empty": lambda: bytes([0xBB]) + b"sensors" + b"\xff",
    "uri-path-not-utf8": lambda: bytes([0xB4]) + b"\xff\xfe\xc0\xaf",
    "uri-query-not-utf8": lambda: bytes([0xF0, 0x02]) + b"\xc0\xaf",
    "uri-port-too-long": lambda: bytes([0x73]) + b"\x00\x16\x33",
    "content-format-5-bytes": lambda: bytes([0xB7]) + b"sensors" + bytes([0x15]) + b"\x01" * 5,
}


@pytest.mark.parametrize("case", [*MALFORMED, "token-length-9", "version-2", "truncated-4"])
def test_malformed_datagram_does_no_harm(bed: Bed, case: str) -> None:
    """Message format errors (RFC 7252 3, 4.2: a CON with a format error is rejected
    with RST or a 4.xx, never served); the gateway stays up, no traceback."""
    cl = raw(bed)
    mid, token = cl.next_mid(), os.urandom(4)
    if case == "token-length-9":
        data = struct.pack("!BBH", 0x49, c.POST, mid) + os.urandom(9)
    elif case == "version-2":
        data = struct.pack("!BBH", 0x84, c.POST, mid) + token
    elif case == "truncated-4":
        data = struct.pack("!BBH", 0x48, c.POST, mid)[:3]
    else:
        data = _datagram(mid, token, MALFORMED[case](), b"ATTACK malformed")
    mark = bed.served_mark()
    cl.send(data)
    # then a well-formed request from the same endpoint: the gateway reads datagrams in
    # order, so any answer to the malformed one comes first
    sync = cl.request(c.GET, ["sync"], timeout=3)
    assert sync is not None, "the gateway stopped answering"
    answers = [c.decode(raw_) for raw_ in iter(lambda: cl.recv(0.05), None)]
    for msg in answers:
        assert msg.mtype == c.RST or msg.code >= c.BAD_REQUEST, msg
        assert msg.code < c.INTERNAL_SERVER_ERROR or msg.mtype == c.RST, msg
    cl.close()
    assert not bed.served_since(mark)
    bed.undisturbed()


@pytest.mark.parametrize("case", ["not-utf8", "overlong", "empty", "nul-byte"])
def test_malformed_uri_host_on_a_proven_request(bed: Bed, case: str) -> None:
    """A proven request with a bad Uri-Host: a 4.xx and one log line, not 5.00 and a
    traceback."""
    host = {"not-utf8": b"\xff\xfe", "overlong": b"h" * 255, "empty": b"",
            "nul-byte": b"gw\x00.local"}[case]
    evil = bed.evil
    body = b"uri-host " + case.encode()
    _, options = evil.prove(c.POST, list(READINGS), body)
    reply = evil.client.request(c.POST, list(READINGS), body, [*options, (c.URI_HOST, host)])
    assert reply is not None
    if case in ("not-utf8",):
        refused(reply, c.BAD_REQUEST, c.BAD_OPTION)
    else:
        assert reply.code < c.INTERNAL_SERVER_ERROR, reply
    bed.undisturbed()


@pytest.mark.parametrize("case", ["2000-segments", "one-60k-segment", "query-60k",
                                  "action-overflow"])
def test_huge_paths_are_refused_cleanly(bed: Bed, case: str) -> None:
    if case == "2000-segments":
        path = ["s" * 20] * 2000
        query: list[str] = []
    elif case == "one-60k-segment":
        path, query = ["x" * 60000], []
    elif case == "query-60k":
        path, query = list(READINGS), ["q=" + "y" * 60000]
    else:  # 40,000 empty segments: a 40 KB datagram, an 80 KB action (2 bytes each)
        path, query = [""] * 40000, []
    cl = raw(bed)
    header = b"\x10" + bed.evil.session.session_id + bytes(22)  # type: ignore[union-attr]
    opts = [*c.path_options(path), *[(c.URI_QUERY, q.encode()) for q in query],
            (c.PROOF, header)]
    mid, token = cl.next_mid(), os.urandom(4)
    data = c.encode(c.CON, c.POST, mid, token, opts, b"ATTACK huge")
    mark = bed.served_mark()
    reply = cl.exchange(data, mid, token, timeout=1, retries=0)
    cl.close()
    if reply is not None:
        assert reply.code in (c.BAD_REQUEST, c.UNAUTHORIZED, c.REQUEST_ENTITY_TOO_LARGE,
                              c.BAD_OPTION) or reply.mtype == c.RST, reply
    assert not bed.served_since(mark)
    bed.undisturbed()


# ------------------------------------------------------------------ block-wise floods


def flood(sends: list[tuple[c.Client, bytes]], batch: int = 50,
          timeout: float = 2.0) -> dict[int, int]:
    """Send datagrams in batches, reading the answers of each batch before the next
    (so the gateway's socket buffer never drops any); answer codes -> counts, with
    ``-1`` for datagrams left unanswered."""
    import select as _select

    codes: dict[int, int] = {}
    by_sock = {cl.sock: cl for cl, _ in sends}
    for i in range(0, len(sends), batch):
        part = sends[i:i + batch]
        for cl, data in part:
            cl.send(data)
        waiting = len(part)
        deadline = time.monotonic() + timeout
        while waiting and time.monotonic() < deadline:
            ready, _, _ = _select.select(list(by_sock), [], [], deadline - time.monotonic())
            for sock in ready:
                msg = c.decode(by_sock[sock].sock.recv(70000))
                if msg.mtype == c.ACK and msg.code == c.EMPTY:
                    continue
                codes[msg.code] = codes.get(msg.code, 0) + 1
                waiting -= 1
        if waiting:
            codes[-1] = codes.get(-1, 0) + waiting
    return codes


def names(codes: dict[int, int]) -> dict[str, int]:
    return {("none" if k < 0 else c.code_str(k)): v for k, v in codes.items()}


def grown_tables(before: dict[str, Any], after: dict[str, Any],
                 allowance: int = 8) -> dict[str, tuple[int, int]]:
    """Every table the gateway holds (its own bounded tables, aiocoap's block-wise
    spools and caches it keeps, plain dicts) that grew by more than ``allowance``
    entries: the generic check that a flood left no per-datagram state."""
    out = {}
    for name, after_size in after["tables"].items():
        if name.endswith(("stats", "_refusals")):
            continue  # counters by reason/source, not per-datagram state
        was = before["tables"].get(name, {}).get("entries", 0)
        now = after_size.get("entries", 0)
        if now - was > allowance:
            out[name] = (was, now)
    return out


def _table(state: dict[str, Any], name: str) -> dict[str, int]:
    found: dict[str, int] = state["tables"].get(name, {"entries": 0, "bytes": 0})
    return found


def test_block1_flood_without_proof_spools_nothing(bed: Bed) -> None:
    """600 first blocks of a 64 KiB upload to a protected resource with forged proofs
    (random sessions, and the attacker's own session with a bad tag) from 30 ports:
    each refused, nothing spooled."""
    mark, before = bed.served_mark(), bed.gateway.state()
    clients = [raw(bed) for _ in range(30)]
    sid = bed.evil.session.session_id  # type: ignore[union-attr]
    chunk = os.urandom(1024)
    sends = []
    for i in range(600):
        cl = clients[i % 30]
        owner = sid if i % 2 else os.urandom(8)
        header = b"\x10" + owner + os.urandom(22)
        sends.append((cl, c.encode(c.CON, c.POST, cl.next_mid(), os.urandom(4),
                                   [*c.path_options(READINGS),
                                    (c.BLOCK1, c.Block(0, True, 6).encode()),
                                    (c.PROOF, header)], chunk)))
    codes = flood(sends)
    for cl in clients:
        cl.close()
    state = bed.gateway.state()
    print(f"block1 flood: answers {names(codes)}, "
          f"transfers {_table(state, 'site.transfers')}")
    assert set(codes) <= {c.UNAUTHORIZED}, codes
    assert _table(state, "site.transfers").get("bytes", 0) == 0
    assert not grown_tables(before, state), grown_tables(before, state)
    assert not bed.served_since(mark)
    bed.undisturbed()


def test_block1_upload_by_an_enrolled_device_is_bounded(bed: Bed) -> None:
    """A proven upload beyond the per-request bound: refused 4.13 at the bound; a
    proven block chain with a block left out or spliced: refused 4.08/4.01."""
    mark = bed.served_mark()
    answer = bed.evil.upload(list(READINGS), b"ATTACK big" + bytes(70 * 1024))
    refused(answer.reply, c.REQUEST_ENTITY_TOO_LARGE)
    state = bed.gateway.state()
    assert _table(state, "site.transfers").get("bytes", 0) == 0, state
    # a chain whose block 1 is skipped
    evil = bed.evil
    action = request_action(c.POST, READINGS, (), None, None, None)
    from structauth.coap_binding import NO_PREVIOUS, block_action

    assert evil.session is not None
    b0 = block_action(action, 0, 6, True, NO_PREVIOUS)
    h0, _ = evil.session.protect(b0, b"A" * 1024, time.monotonic())
    token = os.urandom(4)
    r0 = evil.client.request(c.POST, list(READINGS), b"A" * 1024,
                             [(c.BLOCK1, c.Block(0, True, 6).encode()), (c.PROOF, h0)],
                             token=token)
    assert r0 is not None and r0.code == c.CONTINUE
    b2 = block_action(action, 2, 6, False, h0)
    h2, _ = evil.session.protect(b2, b"ATTACK skipped", time.monotonic())
    r2 = evil.client.request(c.POST, list(READINGS), b"ATTACK skipped",
                             [(c.BLOCK1, c.Block(2, False, 6).encode()), (c.PROOF, h2)],
                             token=token)
    refused(r2, c.REQUEST_ENTITY_INCOMPLETE, c.UNAUTHORIZED)
    assert not bed.served_since(mark)
    bed.undisturbed()


def test_block2_flood_costs_nothing(bed: Bed) -> None:
    """500 requests for later Block2 blocks of responses that do not exist (random and
    the attacker's own session): refused, the response cache does not grow."""
    state0 = bed.gateway.state()
    before = _table(state0, "site.responses")
    cl = raw(bed)
    sid = bed.evil.session.session_id  # type: ignore[union-attr]
    sends = []
    for i in range(500):
        header = b"\x10" + (sid if i % 2 else os.urandom(8)) + os.urandom(22)
        sends.append((cl, c.encode(c.CON, c.GET, cl.next_mid(), os.urandom(4),
                                   [*c.path_options(["big"]),
                                    (c.BLOCK2, c.Block(1 + i % 5, False, 6).encode()),
                                    (c.PROOF, header)])))
    codes = flood(sends)
    cl.close()
    state = bed.gateway.state()
    after = _table(state, "site.responses")
    assert not grown_tables(state0, state), grown_tables(state0, state)
    print(f"block2 flood: {names(codes)}, responses "
          f"{before} -> {after}")
    assert all(code >= c.BAD_REQUEST for code in codes if code >= 0), codes
    assert after.get("entries", 0) <= before.get("entries", 0) + 1
    bed.undisturbed()


def test_handshake_spool_flood_is_bounded(bed: Bed) -> None:
    """First blocks of msg1 from 100 source addresses (127.0.0.2-101) x 8 ports each:
    the msg1 assemblies stay within their per-source and global bounds, and a new
    device can still complete a handshake during the flood."""
    rss0 = bed.gateway.state()["rss_kib"]
    clients = []
    for a in range(2, 102):
        for _ in range(8):
            clients.append(c.Client("127.0.0.1", bed.gateway.port, bind_host=f"127.0.0.{a}"))
    chunk = b"SA1\x21\x00\x01" + os.urandom(1018)
    codes = flood([(cl, c.encode(c.CON, c.POST, cl.next_mid(), os.urandom(4),
                                 [*c.path_options(HANDSHAKE_PATH),
                                  (c.BLOCK1, c.Block(0, True, 6).encode())], chunk))
                   for cl in clients])
    state = bed.gateway.state()
    assemblies = _table(state, "site.handshakes.assemblies")
    newcomer = bed.device("pi-c2")
    newcomer.handshake()
    ok = newcomer.request(c.POST, ["sensors", "pi-c2", "readings"], b"newcomer")
    newcomer.close()
    for cl in clients:
        cl.close()
    grown = state["rss_kib"] - rss0
    print(f"msg1 spool flood from 100 sources: {names(codes)}, assemblies {assemblies}, "
          f"gateway RSS {grown:+d} KiB")
    assert assemblies.get("bytes", 0) <= 1024 * 1024, assemblies
    assert assemblies.get("entries", 0) <= 256, assemblies
    assert ok.reply.code == c.CHANGED and ok.proven
    bed.undisturbed()


# ------------------------------------------------------------------ handshakes


def test_replayed_msg1_never_evicts_a_confirmed_session(bed: Bed) -> None:
    """The live device's own msg1 replayed (nonce cache: refused), then 12 captured,
    never-sent msg1s of it (pending at most): its confirmed session keeps working,
    no second session exists, nothing is audited as a success."""
    start = len(bed.gateway.audit())
    live = bed.live.device
    cl = raw(bed)
    reply = cl.upload(c.POST, HANDSHAKE_PATH, live.msg1)
    refused(reply, c.UNAUTHORIZED)
    for _ in range(12):
        from structauth.handshake import Initiator

        ini = Initiator(signer=live.member.signer, credential=live.member.credential,
                        trust=bed.gateway.fleet.trust, expected_peer=bed.gateway.identity)
        reply = raw(bed).upload(c.POST, HANDSHAKE_PATH, ini.start())
        assert reply is not None and reply.code in (c.CHANGED, c.SERVICE_UNAVAILABLE)
    bed.undisturbed()
    no_success(bed, start, LIVE)


@pytest.mark.parametrize("how", ["forged-msg3", "msg3-other-session", "no-msg3",
                                 "msg3-malformed", "msg3-without-proof"])
def test_msg3_attacks_grant_nothing(bed: Bed, how: str) -> None:
    """A captured msg1 of the victim answered with msg2: without the keys, no msg3 the
    attacker can make opens a session; nothing is served or audited as success."""
    start, mark = len(bed.gateway.audit()), bed.served_mark()
    victim = bed.members["pi-cvictim"]
    from structauth.handshake import Initiator

    ini = Initiator(signer=victim.signer, credential=victim.credential,
                    trust=bed.gateway.fleet.trust, expected_peer=bed.gateway.identity)
    cl = raw(bed)
    first = cl.upload(c.POST, HANDSHAKE_PATH, ini.start())
    assert first is not None and first.code == c.CHANGED
    cl.download(first, c.POST, HANDSHAKE_PATH)
    # the attacker learns msg2 but not the session id (it is derived from the keys)
    sid = os.urandom(8)
    header = b"\x10" + sid + os.urandom(22)
    msg3 = b"SA1\x23\x00\x01" + sid + os.urandom(32)
    path = ["sensors", "pi-cvictim", "readings"]
    opts: list[c.Option] = [(c.PROOF, header)]
    if how == "forged-msg3":
        opts.append((c.CONFIRM, msg3))
    elif how == "msg3-other-session":
        opts.append((c.CONFIRM, b"SA1\x23\x00\x01" + os.urandom(8) + os.urandom(32)))
    elif how == "msg3-malformed":
        opts.append((c.CONFIRM, msg3[:20]))
    elif how == "msg3-without-proof":
        opts = [(c.CONFIRM, msg3)]
    reply = cl.request(c.POST, path, b"ATTACK msg3", opts)
    refused(reply, c.UNAUTHORIZED, c.BAD_REQUEST)
    cl.close()
    assert not bed.served_since(mark)
    no_success(bed, start, "pi-cvictim")
    bed.undisturbed()


@pytest.mark.parametrize("case", ["get", "junk", "v1-type", "40k-upload", "empty"])
def test_bad_handshakes_are_refused(bed: Bed, case: str) -> None:
    cl = raw(bed)
    if case == "get":
        reply = cl.request(c.GET, HANDSHAKE_PATH)
        expected: tuple[int, ...] = (c.METHOD_NOT_ALLOWED,)
    elif case == "junk":
        reply = cl.upload(c.POST, HANDSHAKE_PATH, os.urandom(2000))
        expected = (c.BAD_REQUEST,)
    elif case == "v1-type":
        reply = cl.upload(c.POST, HANDSHAKE_PATH, b"SA1\x01\x00\x01" + os.urandom(1900))
        expected = (c.BAD_REQUEST,)
    elif case == "40k-upload":
        reply = cl.upload(c.POST, HANDSHAKE_PATH, b"SA1\x21\x00\x01" + bytes(40 * 1024))
        expected = (c.REQUEST_ENTITY_TOO_LARGE,)
    else:
        reply = cl.request(c.POST, HANDSHAKE_PATH)
        expected = (c.BAD_REQUEST,)
    cl.close()
    refused(reply, *expected)
    bed.undisturbed()


def test_pending_handshake_flood_from_many_sources_is_bounded(bed: Bed) -> None:
    """Genuine-looking msg1s (captured, never sent) of one device from 40 sources, 10
    each: the pending table stays within its bounds; the live session is untouched."""
    from structauth.handshake import Initiator

    victim = bed.members["pi-cvictim"]
    rss0 = bed.gateway.state()["rss_kib"]
    answered = 0
    for a in range(2, 42):
        for _ in range(10):
            ini = Initiator(signer=victim.signer, credential=victim.credential,
                            trust=bed.gateway.fleet.trust, expected_peer=bed.gateway.identity)
            cl = c.Client("127.0.0.1", bed.gateway.port, bind_host=f"127.0.1.{a}")
            reply = cl.upload(c.POST, HANDSHAKE_PATH, ini.start())
            answered += reply is not None and reply.code == c.CHANGED
            cl.close()
    state = bed.gateway.state()
    pending = _table(state, "site.handshakes.pending")
    print(f"pending flood: {answered} of 400 answered, pending {pending}, gateway RSS "
          f"{state['rss_kib'] - rss0:+d} KiB")
    assert pending.get("entries", 0) <= 1024
    assert state["sessions"] <= 2 + len(DEVICES), state["sessions"]
    bed.undisturbed()


_ = socket  # raw sockets live in coap.py
