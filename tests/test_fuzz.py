"""Property tests: whatever bytes arrive, parsers raise only our protocol errors."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simulator.fleet import NOW, Fleet, Member
from structauth import wire
from structauth.credentials import Credential
from structauth.errors import ProtocolError, TesseraError
from structauth.handshake import Initiator, Responder, parse_msg1, parse_msg2
from structauth.params import SessionParams
from tests.support import SessionPair

FAST = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def fleet() -> Fleet:
    return Fleet()


@pytest.fixture(scope="module")
def members(fleet: Fleet) -> tuple[Member, Member]:
    return fleet.member("device", "fz"), fleet.member("broker", "fzb")


@pytest.fixture(scope="module")
def valid(fleet: Fleet, members: tuple[Member, Member]) -> tuple[bytes, bytes]:
    device, broker = members
    ini = Initiator(signer=device.signer, credential=device.credential, trust=fleet.trust)
    res = Responder(signer=broker.signer, credential=broker.credential, trust=fleet.trust)
    msg1 = ini.start()
    return msg1, res.accept(msg1, 0.0, NOW).reply


def mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None, extra: bytes) -> bytes:
    b = bytearray(data)
    for pos, val in edits:
        b[pos % len(b)] = val
    out = bytes(b[:cut] if cut is not None else b)
    return out + extra


edits = st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=4)
cuts = st.one_of(st.none(), st.integers(0, 4000))


@given(st.binary(max_size=3000))
@FAST
def test_parse_msg1_random(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        parse_msg1(data)


@given(st.binary(max_size=3000))
@FAST
def test_parse_msg2_random(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        parse_msg2(data)


@given(edits, cuts, st.binary(max_size=8))
@FAST
def test_responder_mutated_msg1(
    fleet: Fleet,
    members: tuple[Member, Member],
    valid: tuple[bytes, bytes],
    e: list[tuple[int, int]],
    cut: int | None,
    extra: bytes,
) -> None:
    _, broker = members
    res = Responder(signer=broker.signer, credential=broker.credential, trust=fleet.trust)
    data = mutate(valid[0], e, cut, extra)
    try:
        res.accept(data, 0.0, NOW)
    except ProtocolError:
        return
    assert data == valid[0] or not e  # only the unmodified message may pass


@given(edits, cuts, st.binary(max_size=8))
@FAST
def test_initiator_mutated_msg2(
    fleet: Fleet,
    members: tuple[Member, Member],
    e: list[tuple[int, int]],
    cut: int | None,
    extra: bytes,
) -> None:
    device, broker = members
    ini = Initiator(signer=device.signer, credential=device.credential, trust=fleet.trust)
    res = Responder(signer=broker.signer, credential=broker.credential, trust=fleet.trust)
    good = res.accept(ini.start(), 0.0, NOW).reply
    data = mutate(good, e, cut, extra)
    try:
        ini.receive(data, 0.0, NOW)
    except ProtocolError:
        return
    assert data == good


@given(st.binary(max_size=64), st.binary(max_size=64), st.binary(max_size=256))
@FAST
def test_session_verify_random(header: bytes, action: bytes, body: bytes) -> None:
    pair = SessionPair.direct()
    with pytest.raises(ProtocolError):
        pair.responder.verify(header, action, body, pair.clock.now)


@given(st.binary(min_size=31, max_size=31), st.booleans())
@FAST
def test_session_verify_random_header_right_size(header: bytes, sealed: bool) -> None:
    pair = SessionPair.direct(SessionParams(sealed=sealed))
    with pytest.raises(ProtocolError):
        pair.responder.verify(header, b"t", b"p", pair.clock.now)


@given(st.binary(max_size=80))
@FAST
def test_params_random(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        SessionParams.read(wire.Reader(data, "params"))


@given(st.lists(st.binary(max_size=600), min_size=0, max_size=6))
@FAST
def test_credential_random(chain: list[bytes]) -> None:
    with contextlib.suppress(TesseraError):
        Credential.from_der_chain(chain)
