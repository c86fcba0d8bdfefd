"""The independent SA1 v2 implementation (written from docs/PROTOCOL.md only): that it
imports nothing of Tessera's, that it is self-consistent and follows the document's
rules, and (test_vectors.py beside it) that it reproduces the committed vectors."""

from __future__ import annotations

import ast
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import mlkem

from . import fixtures as fx
from . import sa1_reference as sa1

HERE = Path(__file__).parent
PACKAGE = "tests.independent"
ALLOWED_THIRD_PARTY = {"cryptography", "pytest"}
FORBIDDEN = {"structauth", "hw", "device", "broker_plugin", "provisioning", "simulator", "bench"}


def _imports(path: Path) -> list[tuple[str, int]]:
    """(absolute module name, line) of every import in the file; relative imports are
    resolved against this package, and ``from m import a`` also yields ``m.a`` (``a``
    may be a module)."""
    out: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = PACKAGE.split(".")
                base = parts[: len(parts) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out += [(f"{mod}.{alias.name}", node.lineno) for alias in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            out.append(("__import__", node.lineno))
        elif isinstance(node, ast.Attribute) and node.attr == "import_module":
            out.append(("importlib.import_module", node.lineno))
    return out


def _allowed(mod: str) -> bool:
    top = mod.split(".")[0]
    if mod == PACKAGE or mod.startswith(PACKAGE + "."):
        return True
    if top in FORBIDDEN or top == "tests" or mod in ("__import__", "importlib.import_module"):
        return False
    return top in ALLOWED_THIRD_PARTY or top in sys.stdlib_module_names


def test_imports_only_stdlib_cryptography_and_itself() -> None:
    files = sorted(HERE.glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "sa1_reference.py", "test_independent.py"}
    bad = [f"{path.name}:{line} imports {mod}"
           for path in files for mod, line in _imports(path) if not _allowed(mod)]
    assert not bad, bad
    # the implementation proper (not the tests) does not even need pytest
    assert all(mod.split(".")[0] != "pytest"
               for mod, _ in _imports(HERE / "sa1_reference.py"))


def test_import_checker_catches_forbidden_imports(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import structauth.session\nfrom tests.make_vectors import run\nfrom .. import support\n"
        "import json\nfrom . import sa1_reference\n__import__('hw')\nimport hw.software\n"
        "from broker_plugin import enforcer\nimport importlib\nimportlib.import_module('x')\n"
    )
    found = sorted((m, _allowed(m)) for m, _ in _imports(probe))
    assert found == sorted([
        ("structauth.session", False), ("tests.make_vectors.run", False),
        ("tests.support", False), ("json", True), ("tests.independent.sa1_reference", True),
        ("__import__", False), ("hw.software", False), ("broker_plugin.enforcer", False),
        ("importlib", True), ("importlib.import_module", False),
    ])


# ------------------------------------------------------------------- primitives (§2)


def test_blake2s_128_is_a_digest_length_not_a_truncation() -> None:
    k = b"k" * 32
    assert sa1.b128(k, b"x").hex() == "a5ee80d192128b85369c25344d5ada2f"
    assert sa1.b256(k, b"x")[:16].hex() == "943f1c914db52e2247f734e28b0c5cb7"


def test_hkdf_written_out_matches_rfc5869_case_1() -> None:
    ikm = bytes.fromhex("0b" * 22)
    salt = bytes.fromhex("000102030405060708090a0b0c")
    info = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9")
    prk = sa1.hkdf_extract(salt, ikm)
    assert prk.hex() == "077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5"
    assert sa1.hkdf_expand(prk, info, 42).hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865")


def test_mlkem_modulus_check_agrees_with_the_library() -> None:
    ek = bytearray(mlkem.MLKEM768PrivateKey.generate().public_key().public_bytes_raw())
    assert sa1.mlkem_modulus_ok(bytes(ek))
    sa1.mlkem_import(bytes(ek))
    for i, patch in ((0, (0xFF, 0x0F)), (1150, (0xF0, 0xFF))):  # first and last coefficient
        bad = bytearray(ek)
        bad[i] |= patch[0]
        bad[i + 1] |= patch[1]
        assert not sa1.mlkem_modulus_ok(bytes(bad))
        with pytest.raises(sa1.Refused) as e:
            sa1.mlkem_import(bytes(bad))
        assert e.value.reason == "BAD_KEY_SHARE"
    rho = bytearray(ek)
    rho[-1] ^= 0xFF  # rho is not range-checked
    sa1.mlkem_import(bytes(rho))
    # the boundary: a coefficient of exactly q - 1 passes, exactly q fails (both in the
    # first and in the second coefficient of a 3-byte group)
    for value, ok in ((3328, True), (3329, False)):
        first, second = bytearray(ek), bytearray(ek)
        first[0], first[1] = value & 0xFF, (first[1] & 0xF0) | (value >> 8)
        second[1], second[2] = (second[1] & 0x0F) | ((value & 0x0F) << 4), value >> 4
        for patched in (first, second):
            assert sa1.mlkem_modulus_ok(bytes(patched)) is ok
            if ok:
                sa1.mlkem_import(bytes(patched))
            else:
                with pytest.raises(sa1.Refused):
                    sa1.mlkem_import(bytes(patched))


@pytest.mark.parametrize("point", [bytes(32), (1).to_bytes(32, "little")])
def test_x25519_low_order_share_is_refused(point: bytes) -> None:
    with pytest.raises(sa1.Refused) as e:
        sa1.x25519_shared(bytes(range(32)), point)
    assert e.value.reason == "BAD_KEY_SHARE"


def test_coap_request_action_example_of_the_document() -> None:
    got = sa1.coap_request_action(0x02, ["sensors", "pi-1", "readings"], ["unit=C"],
                                  content_format=0)
    want = (b"coap-req\x00\x02\x00\x03\x00\x07sensors\x00\x04pi-1\x00\x08readings"
            b"\x00\x01\x00\x06unit=C\x00\x00\x00\x00" + b"\xff" * 8)
    assert got == want


def test_coap_block_action_and_oversized_actions() -> None:
    request = sa1.coap_request_action(0x02, ["up"])
    first = sa1.coap_block_action(request, 0, 6, True)
    assert first == b"coap-blk\x00" + bytes(4) + b"\x06\x01" + bytes(31) + request
    header = bytes(range(31))
    second = sa1.coap_block_action(request, 1, 6, False, header)
    assert second[9:15] == b"\x00\x00\x00\x01\x06\x00" and second[15:46] == header
    calls: list[Callable[[], bytes]] = [
        lambda: sa1.coap_request_action(0x100, []),
        lambda: sa1.coap_request_action(0x01, ["x" * 65_536]),
        lambda: sa1.coap_request_action(0x01, ["x" * 40_000, "y" * 40_000]),
        lambda: sa1.coap_request_action(0x01, [], content_format=0xFFFFFFFF),
        lambda: sa1.coap_request_action(0x01, ["\ud800"]),
        lambda: sa1.coap_block_action(request, 1 << 20, 6, True),
        lambda: sa1.coap_block_action(b"r" * 65_500, 0, 6, True),
    ]
    for call in calls:
        with pytest.raises(sa1.Refused) as e:
            call()
        assert e.value.reason == "MALFORMED"


# ------------------------------------------------------------------- handshake (§4)


@pytest.fixture(scope="module")
def world() -> fx.World:
    return fx.world()


def test_handshake_runs_and_both_sides_agree(world: fx.World) -> None:
    run = fx.handshake(world)
    assert len(run.completed.msg3) == 46
    assert run.initiator.session_id == run.responder.session_id == run.answer.keys.session_id
    assert run.completed.keys.okm == run.answer.keys.okm and len(run.answer.keys.okm) == 136
    m1 = sa1.parse_msg1(run.msg1)
    assert run.msg1[:6] == b"SA1\x21\x00\x01" and m1.responder == fx.BROKER
    assert run.answer.msg2[:6] == b"SA1\x22\x00\x01"
    assert run.answer.msg2[1158:1202] == sa1.Params().encode()
    assert sa1.parse_msg2(run.answer.msg2).params == sa1.Params()


@pytest.mark.parametrize("sealed", [False, True])
def test_messages_both_ways(world: fx.World, sealed: bool) -> None:
    run = fx.handshake(world, params=sa1.Params(sealed=sealed))
    for t, (src, dst) in enumerate([(run.initiator, run.responder), (run.responder, run.initiator)]
                                   * 3):
        now = 100.0 + 7.5 * t
        header, body = src.protect(b"devices/d1/x", b"payload %d" % t, now)
        assert header[0] == (0x11 if sealed else 0x10) and len(header) == 31
        assert (body != b"payload %d" % t) == sealed
        assert dst.verify(header, b"devices/d1/x", body, now) == b"payload %d" % t
        with pytest.raises(sa1.Refused) as e:
            dst.verify(header, b"devices/d1/x", body, now)
        assert e.value.reason == "REPLAYED"
        with pytest.raises(sa1.Refused) as e:
            dst.verify(header, b"devices/d1/y", body, now)
        assert e.value.reason == "REPLAYED"


def test_message_refusals_in_document_order(world: fx.World) -> None:
    run = fx.handshake(world)
    i, r = run.initiator, run.responder
    header, _ = i.protect(b"t", b"p", 100.0)

    def reason(h: bytes, a: bytes = b"t", b: bytes = b"p", now: float = 100.0) -> str:
        with pytest.raises(sa1.Refused) as e:
            r.verify(h, a, b, now)
        return e.value.reason

    assert reason(header[:30]) == "MALFORMED"
    assert reason(b"\x20" + header[1:]) == "BAD_VERSION"
    assert reason(b"\x11" + header[1:]) == "MALFORMED"
    assert reason(header[:1] + bytes(8) + header[9:]) == "UNKNOWN_SESSION"
    assert reason(header[:9] + (3).to_bytes(2, "big") + header[11:]) == "EPOCH_OUT_OF_WINDOW"
    assert reason(header, b"u") == "BAD_TAG"
    assert reason(header, b"t", b"q") == "BAD_TAG"
    assert reason(header, b"t", b"p", 100.0 + 3600) == "SESSION_EXPIRED"


def test_responder_name_checked_before_any_cryptography(world: fx.World) -> None:
    run = fx.handshake(world)
    other = "spiffe://independent.test/broker/b2"
    with pytest.raises(sa1.Refused) as e:
        sa1.responder_check_msg1(run.msg1, 1.0, own_identity=other, trust=world.trust,
                                 policy=fx.POLICY)
    assert e.value.reason == "WRONG_IDENTITY"


def test_replayed_msg1_refused_by_cache_and_useless_without_it(world: fx.World) -> None:
    run = fx.handshake(world)
    cache = sa1.NonceCache()
    checked = sa1.responder_check_msg1(run.msg1, 1.0, own_identity=fx.BROKER, trust=world.trust,
                                       policy=fx.POLICY, nonces=cache)
    ek = mlkem.MLKEM768PublicKey.from_public_bytes(checked.msg1.mlkem_ek)
    answer = sa1.responder_answer(
        checked, 1.0, nonce_r=bytes(32), x25519_private=bytes(range(32)),
        encapsulation=ek.encapsulate(), params=sa1.Params(), chain=world.broker_chain,
        signature=lambda th: sa1.sign(world.broker_key, sa1.LABEL_MSG2_SIG, th), nonces=cache)
    with pytest.raises(sa1.Refused) as e:
        sa1.responder_check_msg1(run.msg1, 2.0, own_identity=fx.BROKER, trust=world.trust,
                                 policy=fx.POLICY, nonces=cache)
    assert e.value.reason == "HANDSHAKE_REPLAYED"
    # a fresh responder (restart, replica) answers, but the replayer cannot make msg3: the
    # old msg3 names another session, a guessed one fails, and the pending gets one try
    with pytest.raises(sa1.Refused) as e:
        sa1.responder_confirm(answer.pending, run.completed.msg3, 2.0)
    assert e.value.reason == "UNKNOWN_SESSION"
    forged = sa1.build_msg3(answer.pending.session_id, bytes(32))
    with pytest.raises(sa1.Refused) as e:
        sa1.responder_confirm(answer.pending, forged, 2.0)
    assert e.value.reason == "BAD_CONFIRMATION"
    assert run.msg1[6:38] in cache.seen


def test_msg3_one_try_and_deadline(world: fx.World) -> None:
    run = fx.handshake(world)
    # the fixture confirmed at start + 0.01; a second msg3 on the same pending is refused
    with pytest.raises(sa1.Refused) as e:
        sa1.responder_confirm(run.answer.pending, run.completed.msg3, 100.02)
    assert e.value.reason == "BAD_CONFIRMATION"
    late = fx.handshake(world, seed=b"late")
    late.answer.pending.used = False
    with pytest.raises(sa1.Refused) as e:
        sa1.responder_confirm(late.answer.pending, late.completed.msg3, 110.0)
    assert e.value.reason == "BAD_CONFIRMATION"


@pytest.mark.parametrize("kind,want", [
    (0x01, "BAD_VERSION"), (0x02, "BAD_VERSION"), (0x22, "MALFORMED"), (0x23, "MALFORMED"),
])
def test_msg1_types(world: fx.World, kind: int, want: str) -> None:
    run = fx.handshake(world)
    with pytest.raises(sa1.Refused) as e:
        sa1.parse_msg1(run.msg1[:3] + bytes((kind,)) + run.msg1[4:])
    assert e.value.reason == want


def test_parse_reasons(world: fx.World) -> None:
    m1 = fx.handshake(world).msg1
    cases = {
        m1[:3]: "TRUNCATED", b"SA2" + m1[3:]: "BAD_VERSION",
        m1[:4] + b"\x00\x02" + m1[6:]: "UNKNOWN_SUITE", m1[:-1]: "TRUNCATED",
        m1 + b"\x00": "TRAILING_BYTES", m1[:1254] + b"\x05" + m1[1255:]: "MALFORMED",
    }
    for data, want in cases.items():
        with pytest.raises(sa1.Refused) as e:
            sa1.parse_msg1(data)
        assert e.value.reason == want


# ------------------------------------------------------------------- bounds (§5, §7)


def test_replay_window_jump_is_constant_time(world: fx.World) -> None:
    run = fx.handshake(world)
    i, r = run.initiator, run.responder
    i.next_seq = 0xFFFFFFFF
    header, body = i.protect(b"t", b"p", 100.0)
    t0 = time.perf_counter()
    r.verify(header, b"t", body, 100.0)
    assert time.perf_counter() - t0 < 0.05
    assert r.top == 0xFFFFFFFF and r.mask == 1
    with pytest.raises(sa1.Refused) as e:
        i.protect(b"t", b"p", 100.0)
    assert e.value.reason == "SEQUENCE_EXHAUSTED"


def test_receive_keys_bounded_and_old_epochs_erased(world: fx.World) -> None:
    run = fx.handshake(world, params=sa1.Params(epoch_ms=1000, skew_epochs=2))
    i, r = run.initiator, run.responder
    old = i.protect(b"t", b"old", 100.0)
    for k in range(1, 40):
        now = 100.0 + k
        header, body = i.protect(b"t", b"x", now)
        r.verify(header, b"t", body, now)
        future = r.epoch_at(now) + 2
        r.recv.key(future)
        assert len(r.kept_receive_epochs()) <= 2 * 2 + 1
        assert len(i.send.keys) == 1
    with pytest.raises(sa1.Refused) as e:
        r.verify(old[0], b"t", old[1], 139.0)
    assert e.value.reason == "EPOCH_OUT_OF_WINDOW"
    # the captured state has no key for epoch 0 in either direction
    assert 0 not in r.recv.keys and r.recv.next_epoch > 0 and i.send.next_epoch > 0


# ------------------------------------------------------------------- credentials (§6)


def _validate(w: fx.World, chain: list[bytes], **kw: Any) -> str:
    try:
        cred = sa1.parse_credential(chain)
        w.trust.validate(cred, fx.POLICY, **kw)
    except sa1.Refused as e:
        return e.reason
    return "OK"


def test_chain_rules(world: fx.World) -> None:
    from cryptography.hazmat.primitives import hashes

    ik, icert, ider = fx.intermediate(world)
    nk, ncert, nder = fx.intermediate(world, key_usage=False)
    dev = fx.DEVICE
    assert _validate(world, [fx.leaf(ik, icert, dev), ider], kind="device") == "OK"
    assert _validate(world, [fx.leaf(nk, ncert, dev), nder]) == "UNKNOWN_AUTHORITY"
    assert _validate(world, [fx.leaf(ik, icert, dev)]) == "UNKNOWN_AUTHORITY"
    assert _validate(world, [fx.leaf(ik, icert, dev, eku="1.3.6.1.5.5.7.3.2"), ider]) == "OK"
    assert _validate(world, [fx.leaf(ik, icert, dev, eku="2.5.29.37.0"), ider]) == "OK"
    assert _validate(world, [fx.leaf(ik, icert, dev, eku="1.3.6.1.5.5.7.3.1"), ider]) == \
        "BAD_CREDENTIAL"
    assert _validate(world, [fx.leaf(ik, icert, fx.BROKER, eku="1.3.6.1.5.5.7.3.1"), ider]) == "OK"
    assert _validate(world, [fx.leaf(ik, icert, dev, digest=hashes.SHA224()), ider]) == \
        "BAD_CREDENTIAL"
    assert _validate(world, [fx.leaf(ik, icert, dev), ider], kind="broker") == "WRONG_IDENTITY"
    revoked_serials = {"4d"}  # the intermediate's serial, 77
    chain = [fx.leaf(ik, icert, dev), ider]
    assert _validate(world, chain, revoked=lambda c: bool(set(c.serials) & revoked_serials)) == \
        "CREDENTIAL_REVOKED"


# ------------------------------------------------------------------- fan-out (§8)


def test_fanout_round_trip_and_refusals() -> None:
    import json

    keys = sa1.fanout_chain(b"\x42" * 32, 10)
    cid = sa1.fanout_chain_id(keys[0])
    anchor = json.dumps({"chain": cid.hex(), "anchor": keys[0].hex(), "interval_ms": 1000,
                         "delay": 2, "length": 10, "elapsed_ms": 500.0,
                         "origin": "00" * 8, "start_ms": 0.0, "hello": True},
                        separators=(",", ":")).encode()
    sub = sa1.FanoutSubscriber()
    sub.on_anchor(anchor, hello_sent_at=0.0)  # broker chain time = local time + 0.5
    msg = sa1.fanout_seal(keys[1], cid, 1, b"t/a", b"hello")
    assert len(msg) == len(b"hello") + 31 and msg[5] == 0x12
    sub.on_message("t/a", msg, 0.6)
    forged = sa1.fanout_seal(keys[1], cid, 1, b"t/b", b"hello")
    sub.on_message("t/a", forged, 0.6)  # buffered: its tag is checked at disclosure

    def reason(f: Callable[[], object]) -> str:
        with pytest.raises(sa1.Refused) as e:
            f()
        return e.value.reason

    late = sa1.fanout_seal(keys[1], cid, 1, b"t/a", b"late")
    assert reason(lambda: sub.on_message("t/a", late, 1.5)) == "EPOCH_OUT_OF_WINDOW"
    assert reason(lambda: sub.on_message("t/a", msg[-30:], 0.6)) == "TRUNCATED"
    assert reason(lambda: sub.on_message("t/a", b"x" * 40, 0.6)) == "MALFORMED"
    wrong = keys[2]
    assert reason(lambda: sub.on_key(json.dumps(
        {"chain": cid.hex(), "interval": 1, "key": wrong.hex()}).encode())) == "BAD_TAG"
    good, bad = sub.on_key(json.dumps(
        {"chain": cid.hex(), "interval": 1, "key": keys[1].hex()}).encode())
    assert good == [("t/a", b"hello")] and bad == [("t/a", "BAD_TAG")]
    assert reason(lambda: sub.on_message("t/a", msg, 0.6)) == "REPLAYED"
    def anchor_reason(body: bytes) -> str:
        return reason(lambda: sa1.FanoutSubscriber().on_anchor(body, 0.0))

    for change in ('{"elapsed_ms": NaN}', '{"interval_ms": Infinity}', '{"delay": 0}',
                   '{"length": 4294967296}', '{"anchor": "00"}', '{"origin": "00"}',
                   '{"start_ms": NaN}', '{"hello": 1}', '{"nonce": "%s"}' % ("00" * 33)):
        patched = {**json.loads(anchor), **json.loads(change)}
        assert anchor_reason(json.dumps(patched).encode()) == "MALFORMED", change
    deep = b"[" * 100_000 + b"]" * 100_000
    assert anchor_reason(deep) == "MALFORMED"


def _fanout_world(length: int = 10) -> tuple[list[bytes], bytes, Callable[..., bytes]]:
    import json

    keys = sa1.fanout_chain(b"\x24" * 32, length)
    cid = sa1.fanout_chain_id(keys[0])

    def anchor(clock_s: float, *, hello: bool = True, nonce: bytes = b"",
               start_ms: float = 0.0, origin: str = "11" * 8) -> bytes:
        a = {"chain": cid.hex(), "anchor": keys[0].hex(), "interval_ms": 1000, "delay": 2,
             "length": length, "elapsed_ms": clock_s * 1000 - start_ms, "origin": origin,
             "start_ms": start_ms, "hello": hello}
        if nonce:
            a["nonce"] = nonce.hex()
        return json.dumps(a).encode()

    return keys, cid, anchor


def _fanout_reason(f: Callable[[], object]) -> str:
    with pytest.raises(sa1.Refused) as e:
        f()
    return e.value.reason


def test_fanout_drift_bound_expiry_and_duplicates() -> None:
    keys, cid, anchor = _fanout_world(4000)
    sub = sa1.FanoutSubscriber()  # rho 500 ppm, margin d * P / 4 = 0.5 s
    sub.hello(100.0)
    sub.on_anchor(anchor(0.0), None, 100.1)  # c = 0 at h = 100
    # interval 999 (its key out at clock 1000): at local 1099, U = 999 * 1.0005 = 999.4995
    late_ok = sa1.fanout_seal(keys[999], cid, 999, b"t", b"x")
    sub.on_message("t", late_ok, 1099.0)
    assert _fanout_reason(lambda: sub.on_message("t", late_ok, 1099.0)) == "REPLAYED"
    edge = sa1.fanout_seal(keys[999], cid, 999, b"t", b"y")
    # U(1099.6) = 999.6 * 1.0005 = 1000.0998: past the disclosure, though without the
    # drift term (999.6) it would not be
    assert _fanout_reason(lambda: sub.on_message("t", edge, 1099.6)) == "EPOCH_OUT_OF_WINDOW"
    # 1,000 s after the hello the drift term (0.5 s) reaches the margin; past it, refused
    fresh = sa1.fanout_seal(keys[1010], cid, 1010, b"t", b"z")
    assert _fanout_reason(lambda: sub.on_message("t", fresh, 1100.01)) == "SESSION_EXPIRED"
    sub.hello(1101.0)
    sub.on_anchor(anchor(1001.05), None, 1101.1)
    sub.on_message("t", fresh, 1101.2)


def test_fanout_hello_matching_and_violations() -> None:
    keys, cid, anchor = _fanout_world(4000)
    sub = sa1.FanoutSubscriber()
    sub.hello(0.0, b"a")
    sub.hello(10.0, b"b")
    sub.on_anchor(anchor(10.05, nonce=b"b"), None, 10.1)
    assert sub.bound == (10.05, 10.0) and sub.hellos == []
    sub.on_anchor(anchor(0.05, nonce=b"a"), None, 10.2)  # matches nothing left
    assert sub.bound == (10.05, 10.0)
    # without a nonce: by count; a reordered answer (older c) is ignored
    sub.hello(20.0)
    sub.hello(30.0)
    sub.on_anchor(anchor(30.05), None, 30.1)  # matched with 20.0: safe, looser
    assert sub.bound == (30.05, 20.0)
    sub.on_anchor(anchor(20.05), None, 30.2)
    assert sub.bound == (30.05, 20.0)
    # a key that the bound says cannot be out yet: a violation
    msg = sa1.fanout_seal(keys[40], cid, 40, b"t", b"m")
    sub.on_message("t", msg, 30.3)
    good, bad = sub.on_key(json_key(cid, 40, keys[40]), 30.5)  # out at clock 41
    assert good == [] and bad == [("t", "BAD_CONFIGURATION")]
    other = sa1.fanout_seal(keys[60], cid, 60, b"t", b"n")
    assert _fanout_reason(lambda: sub.on_message("t", other, 30.6)) == "BAD_CONFIGURATION"
    sub.hello(31.0)
    sub.on_anchor(anchor(42.0), None, 31.1)  # the broker's clock, ahead of U(31.1) again
    assert _fanout_reason(lambda: sub.on_message("t", other, 31.2)) == "BAD_CONFIGURATION"
    sub.hello(32.0)
    sub.on_anchor(anchor(42.95), None, 32.1)  # within U from (42.0, 31.0): ends it
    sub.on_message("t", other, 32.2)


def json_key(cid: bytes, i: int, key: bytes) -> bytes:
    import json

    return json.dumps({"chain": cid.hex(), "interval": i, "key": key.hex()}).encode()

