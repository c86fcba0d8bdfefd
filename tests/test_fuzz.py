"""Property tests: whatever bytes arrive, every parser of ours raises only our own error
types (``structauth.errors.TesseraError`` subclasses, protocol errors for peer input),
never anything else, and a mutated genuine message is always refused.

Targets: msg1, msg2, msg3 (parsers and the Responder/Initiator that consume them), the
31-byte message header (Session.verify), session parameters, credentials (DER chains,
PEM, validation) and fan-out trailers, anchors and disclosed keys (structauth/fanout.py).

Bounded for CI (a few hundred examples each). For a long run outside CI::

    TESSERA_FUZZ_EXAMPLES=60000 TESSERA_FUZZ_REPORT=/tmp/fuzz.json \\
        nice -n 19 .venv/bin/pytest tests/test_fuzz.py -q -p no:cacheprovider

``TESSERA_FUZZ_REPORT`` names a JSON file that receives the number of inputs each
target ran (every call of a test body, including hypothesis's shrinking and replays).
"""

from __future__ import annotations

import base64
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simulator.fleet import NOW, Fleet, Member
from structauth import wire
from structauth.credentials import Credential
from structauth.errors import ProtocolError, Reason, TesseraError
from structauth.fanout import TRAILER_SIZE, FanoutSigner, FanoutVerifier
from structauth.handshake import (
    Initiator,
    Responder,
    msg3_session_id,
    parse_msg1,
    parse_msg2,
    parse_msg3,
)
from structauth.params import SessionParams
from tests.support import SessionPair

EXAMPLES = int(os.environ.get("TESSERA_FUZZ_EXAMPLES", "300"))
FAST = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
#: inputs each target ran, written to $TESSERA_FUZZ_REPORT at the end of the module
COUNTS: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    yield
    path = os.environ.get("TESSERA_FUZZ_REPORT")
    if path:
        data = {"examples_setting": EXAMPLES, "total": sum(COUNTS.values()), **COUNTS}
        with open(path, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)


def count(name: str) -> None:
    COUNTS[name] += 1


def refused(call: Callable[[], object], *, peer_input: bool = True) -> TesseraError | None:
    """Run ``call``; return our error if it raised one, None if it returned. Anything
    that is not a TesseraError propagates and fails the test. Input from a peer must
    be refused with a ProtocolError (not a local StateError)."""
    try:
        call()
    except TesseraError as exc:
        assert isinstance(exc.reason, Reason)
        if peer_input:
            assert isinstance(exc, ProtocolError), repr(exc)
        return exc
    return None


# -- inputs ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet() -> Fleet:
    return Fleet()


@pytest.fixture(scope="module")
def members(fleet: Fleet) -> tuple[Member, Member]:
    return fleet.member("device", "fz"), fleet.member("broker", "fzb")


def initiator(fleet: Fleet, members: tuple[Member, Member]) -> Initiator:
    device, broker = members
    return Initiator(
        signer=device.signer,
        credential=device.credential,
        trust=fleet.trust,
        expected_peer=broker.identity,
    )


def responder(fleet: Fleet, members: tuple[Member, Member]) -> Responder:
    _, broker = members
    return Responder(signer=broker.signer, credential=broker.credential, trust=fleet.trust)


@pytest.fixture(scope="module")
def valid(fleet: Fleet, members: tuple[Member, Member]) -> tuple[bytes, bytes, bytes]:
    """A genuine (msg1, msg2, msg3)."""
    ini, res = initiator(fleet, members), responder(fleet, members)
    msg1 = ini.start(context=b"fuzz context", quote=b"fuzz quote")
    msg2 = res.accept(msg1, 0.0, NOW).reply
    return msg1, msg2, ini.receive(msg2, 0.0, NOW).reply


#: positions: mostly near the front (the framing) and the back (signature, MACs)
positions = st.one_of(st.integers(0, 96), st.integers(-140, -1), st.integers(0, 1 << 16))
ops = st.lists(
    st.one_of(
        st.tuples(st.just("set"), positions, st.integers(0, 255)),
        st.tuples(st.just("xor"), positions, st.integers(1, 255)),
        st.tuples(st.just("insert"), positions, st.binary(min_size=1, max_size=8)),
        st.tuples(st.just("delete"), positions, st.integers(1, 8)),
        st.tuples(st.just("cut"), positions, st.just(0)),
        st.tuples(st.just("extend"), st.just(0), st.binary(min_size=1, max_size=8)),
    ),
    min_size=1,
    max_size=4,
)


def mutate(data: bytes, edits: list[tuple[str, int, Any]]) -> bytes:
    b = bytearray(data)
    for kind, pos, arg in edits:
        at = pos % (len(b) + 1)
        if kind == "set" and b:
            b[at % len(b)] = arg
        elif kind == "xor" and b:
            b[at % len(b)] ^= arg
        elif kind == "insert":
            b[at:at] = arg
        elif kind == "delete":
            del b[at : at + arg]
        elif kind == "cut":
            del b[at:]
        elif kind == "extend":
            b += arg
    return bytes(b)


def prefixed(msg_type: int, max_size: int) -> st.SearchStrategy[bytes]:
    """Random bytes, often behind a correct 6-byte prefix so the parser goes deeper."""
    prefix = st.sampled_from(
        [b"", b"SA1" + bytes([msg_type]) + b"\x00\x01", b"SA1" + bytes([msg_type])]
    )
    return st.builds(lambda p, rest: p + rest, prefix, st.binary(max_size=max_size))


# -- handshake messages -----------------------------------------------------------------


@given(prefixed(0x21, 3000))
@FAST
def test_parse_msg1_random(data: bytes) -> None:
    count("parse_msg1 random")
    refused(lambda: parse_msg1(data))


@given(prefixed(0x22, 3000))
@FAST
def test_parse_msg2_random(data: bytes) -> None:
    count("parse_msg2 random")
    refused(lambda: parse_msg2(data))


@given(prefixed(0x23, 60))
@FAST
def test_parse_msg3_random(data: bytes) -> None:
    count("parse_msg3 random")
    err = refused(lambda: parse_msg3(data))
    sid = msg3_session_id(data)  # never raises
    assert (sid is None) == (err is not None)


@given(ops)
@FAST
def test_responder_mutated_msg1(
    fleet: Fleet,
    members: tuple[Member, Member],
    valid: tuple[bytes, bytes, bytes],
    edits: list[tuple[str, int, Any]],
) -> None:
    count("Responder.accept mutated msg1")
    res = responder(fleet, members)
    data = mutate(valid[0], edits)
    err = refused(lambda: res.accept(data, 0.0, NOW))
    # only the unmodified message may pass, and a refusal leaves no nonce behind
    assert (err is None) == (data == valid[0]), edits
    assert len(res.nonces) == (0 if err else 1)


@given(prefixed(0x21, 2500))
@FAST
def test_responder_random_msg1(
    fleet: Fleet, members: tuple[Member, Member], data: bytes
) -> None:
    count("Responder.accept random")
    res = responder(fleet, members)
    assert refused(lambda: res.accept(data, 0.0, NOW)) is not None


@given(ops)
@FAST
def test_initiator_mutated_msg2(
    fleet: Fleet, members: tuple[Member, Member], edits: list[tuple[str, int, Any]]
) -> None:
    count("Initiator.receive mutated msg2")
    ini, res = initiator(fleet, members), responder(fleet, members)
    good = res.accept(ini.start(), 0.0, NOW).reply
    data = mutate(good, edits)
    err = refused(lambda: ini.receive(data, 0.0, NOW))
    assert (err is None) == (data == good), edits


@given(prefixed(0x22, 2500))
@FAST
def test_initiator_random_msg2(
    fleet: Fleet, members: tuple[Member, Member], data: bytes
) -> None:
    count("Initiator.receive random")
    ini = initiator(fleet, members)
    ini.start()
    assert refused(lambda: ini.receive(data, 0.0, NOW)) is not None


@given(st.one_of(ops, st.just([])), prefixed(0x23, 60), st.booleans())
@FAST
def test_responder_mutated_or_random_msg3(
    fleet: Fleet,
    members: tuple[Member, Member],
    edits: list[tuple[str, int, Any]],
    junk: bytes,
    use_junk: bool,
) -> None:
    count("Responder.confirm mutated/random msg3")
    ini, res = initiator(fleet, members), responder(fleet, members)
    answered = res.accept(ini.start(), 0.0, NOW)
    good = ini.receive(answered.reply, 0.0, NOW).reply
    data = junk if use_junk else mutate(good, edits)
    err = refused(lambda: res.confirm(answered.pending, data, 1.0))
    assert (err is None) == (data == good), edits
    assert answered.pending.expired(1.0)  # one try, whatever happened


# -- per-message headers ----------------------------------------------------------------

SID = bytes(range(8))  # SessionPair.direct's session id
headers = st.builds(
    lambda flags, sid, epoch, seq, tag: bytes([flags]) + sid + epoch + seq + tag,
    st.one_of(st.sampled_from([0x10, 0x11]), st.integers(0, 255)),
    st.one_of(st.just(SID), st.binary(min_size=8, max_size=8)),
    st.one_of(st.sampled_from([b"\x00\x00", b"\x00\x01", b"\xff\xff"]),
              st.binary(min_size=2, max_size=2)),
    st.binary(min_size=4, max_size=4),
    st.binary(min_size=16, max_size=16),
)


@given(st.one_of(headers, st.binary(max_size=64)), st.binary(max_size=64),
       st.binary(max_size=256), st.booleans())
@FAST
def test_session_verify_random(header: bytes, action: bytes, body: bytes, sealed: bool) -> None:
    count("Session.verify random header")
    pair = SessionPair.direct(SessionParams(sealed=sealed))
    assert refused(lambda: pair.responder.verify(header, action, body, pair.clock.now))
    assert pair.responder._window.top == -1  # nothing was committed


@given(ops, st.one_of(ops, st.just([])), st.one_of(ops, st.just([])), st.booleans(),
       st.sampled_from([0, 1, 3]))
@FAST
def test_session_verify_mutated(
    header_edits: list[tuple[str, int, Any]],
    action_edits: list[tuple[str, int, Any]],
    body_edits: list[tuple[str, int, Any]],
    sealed: bool,
    which: int,
) -> None:
    """A genuine message with its header, action or body changed is always refused."""
    count("Session.verify mutated message")
    pair = SessionPair.direct(SessionParams(sealed=sealed))
    action, payload = b"devices/fz/telemetry", b'{"t": 21.5}'
    header, body = pair.up(action, payload)
    h = mutate(header, header_edits) if which in (0, 3) else header
    a = mutate(action, action_edits) if which in (1, 3) else action
    b = mutate(body, body_edits) if which in (1, 3) else body
    err = refused(lambda: pair.responder.verify(h, a, b, pair.clock.now))
    assert (err is None) == ((h, a, b) == (header, action, body))
    if err is not None:  # the refusal changed nothing: the genuine message still passes
        assert pair.responder.verify(header, action, body, pair.clock.now).payload == payload


@given(st.binary(max_size=80))
@FAST
def test_params_random(data: bytes) -> None:
    count("SessionParams.read random")
    refused(lambda: SessionParams.read(wire.Reader(data, "params")))


# -- credentials -----------------------------------------------------------------------


@given(st.lists(st.binary(max_size=600), min_size=0, max_size=6))
@FAST
def test_credential_random(chain: list[bytes]) -> None:
    count("Credential.from_der_chain random")
    refused(lambda: Credential.from_der_chain(chain))


@given(st.one_of(st.binary(max_size=2000),
                 st.builds(lambda body: b"-----BEGIN CERTIFICATE-----\n" + body
                           + b"\n-----END CERTIFICATE-----\n", st.binary(max_size=800))))
@FAST
def test_credential_pem_random(data: bytes) -> None:
    count("Credential.from_pem random")
    refused(lambda: Credential.from_pem(data))


@given(ops)
@FAST
def test_credential_mutated_is_refused(
    fleet: Fleet, members: tuple[Member, Member], edits: list[tuple[str, int, Any]]
) -> None:
    """A changed certificate either does not parse or does not validate."""
    count("TrustStore.validate mutated credential")
    device, _ = members
    good = device.credential.der_chain()[0]
    der = mutate(good, edits)

    def check() -> None:
        fleet.trust.validate(fleet.trust.credential([der]), NOW)

    err = refused(check)
    assert (err is None) == (der == good), edits


# -- fan-out -----------------------------------------------------------------------------


def fanout_pair() -> tuple[FanoutSigner, FanoutVerifier]:
    counter = iter(range(1 << 30))
    signer = FanoutSigner(lambda n: next(counter).to_bytes(4, "big") * (n // 4), 0.0,
                          interval_s=1.0, delay=2, length=20)
    verifier = FanoutVerifier(max_pending=100)
    verifier.on_anchor(signer.anchor(0.0), hello_sent_at=0.0)
    return signer, verifier


@given(st.one_of(
    st.binary(max_size=80),
    st.builds(lambda payload, cid, rest: payload + b"\x12" + cid + b"\x00\x00" + rest,
              st.binary(max_size=20), st.binary(min_size=8, max_size=8),
              st.binary(min_size=20, max_size=20)),
))
@FAST
def test_fanout_message_random(data: bytes) -> None:
    count("FanoutVerifier.on_message random")
    signer, verifier = fanout_pair()
    cid = signer.chain.id
    for body in (data, data[:-TRAILER_SIZE + 1] + cid + data[-TRAILER_SIZE + 9 :]):
        refused(lambda body=body: verifier.on_message("t/x", body, 0.5))  # type: ignore[misc]


@given(ops, st.booleans())
@FAST
def test_fanout_mutated_never_delivered(edits: list[tuple[str, int, Any]], topic: bool) -> None:
    """A sealed fan-out message with its payload, trailer or topic changed is refused
    on arrival or rejected once its key is disclosed; never delivered."""
    count("fan-out mutated message")
    signer, verifier = fanout_pair()
    genuine = signer.seal(b"t/x", b"payload", 0.5)
    data = genuine if topic else mutate(genuine, edits)
    name = mutate(b"t/x", edits).decode("latin-1") if topic else "t/x"
    if refused(lambda: verifier.on_message(name, data, 0.5)) is not None:
        assert (data, name) != (genuine, "t/x")
        return
    good: list[tuple[str, bytes]] = []
    for _, body in signer.due(3.0):
        if b'"key"' in body:
            good += verifier.on_key(body)[0]
    assert (good == [("t/x", b"payload")]) == ((data, name) == (genuine, "t/x"))
    if (data, name) != (genuine, "t/x"):
        assert good == []


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=12), inner, max_size=6)),
    max_leaves=12,
)
ANCHOR_KEYS = ["chain", "anchor", "interval_ms", "delay", "length", "elapsed_ms"]
KEY_KEYS = ["chain", "interval", "key"]


def json_like(keys: list[str]) -> st.SearchStrategy[bytes]:
    """Random bytes, random JSON, and JSON objects with the right keys and wild values
    (NaN, Infinity, huge integers, wrong types, deep nesting)."""
    wild = st.one_of(json_values, st.sampled_from([float("nan"), float("inf"), 10**400, -1, 0]))
    objects = st.fixed_dictionaries({k: wild for k in keys}).map(
        lambda d: json.dumps(d).encode())
    deep = st.integers(1, 200_000).map(lambda n: b"[" * n + b"]" * n)
    return st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode()),
                     objects, deep)


@given(json_like(ANCHOR_KEYS), st.one_of(st.none(), st.floats(-1e6, 1e6)))
@FAST
def test_fanout_anchor_random(body: bytes, hello: float | None) -> None:
    count("FanoutVerifier.on_anchor random")
    _, verifier = fanout_pair()
    refused(lambda: verifier.on_anchor(body, hello))


@given(json_like(KEY_KEYS))
@FAST
def test_fanout_key_random(body: bytes) -> None:
    count("FanoutVerifier.on_key random")
    _, verifier = fanout_pair()
    refused(lambda: verifier.on_key(body))


def test_fanout_anchor_refuses_non_finite_numbers() -> None:
    """An anchor whose interval or elapsed time is NaN or infinite would make the
    subscriber's time check always pass; it must be refused, like any other bad anchor."""
    signer, _ = fanout_pair()
    good = json.loads(signer.anchor(0.0))
    for field, value in (("interval_ms", "NaN"), ("elapsed_ms", "NaN"),
                         ("interval_ms", "Infinity"), ("elapsed_ms", "-Infinity"),
                         ("delay", "Infinity"), ("length", "1" + "0" * 400)):
        text = json.dumps({**good, field: 0}).replace(f'"{field}": 0', f'"{field}": {value}')
        verifier = FanoutVerifier()
        err = refused(lambda v=verifier, t=text: v.on_anchor(t.encode(), 0.0))  # type: ignore[misc]
        assert err is not None and err.reason is Reason.MALFORMED, (field, value)
        assert verifier.chains == {}


def test_certificate_with_version_1_is_our_error(
    fleet: Fleet, members: tuple[Member, Member], valid: tuple[bytes, bytes, bytes]
) -> None:
    """Found by the long fuzz run: a certificate whose version field says 1 (X.509 v2)
    made cryptography raise InvalidVersion, which is not a ValueError, straight out of
    Responder.accept. It is a credential that does not parse: BAD_CREDENTIAL."""
    device, _ = members
    good = device.credential.der_chain()[0]
    at = good.index(b"\xa0\x03\x02\x01\x02") + 4  # [0] EXPLICIT INTEGER 2 (v3)
    bad = good[:at] + b"\x01" + good[at + 1 :]
    err = refused(lambda: Credential.from_der_chain([bad]))
    assert err is not None and err.reason is Reason.BAD_CREDENTIAL
    msg1 = valid[0]
    start = msg1.index(good)
    err = refused(lambda: responder(fleet, members).accept(
        msg1[:start] + bad + msg1[start + len(good) :], 0.0, NOW))
    assert err is not None and err.reason is Reason.BAD_CREDENTIAL
    pem = (b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(bad)
           + b"-----END CERTIFICATE-----\n")
    err = refused(lambda: Credential.from_pem(pem))
    assert err is not None and err.reason is Reason.BAD_CREDENTIAL
