"""structauth.gatt, sans-IO: fragmentation at any ATT_MTU, a reassembler that refuses
what does not fit and changes nothing when it does, the label code and the bindings."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from structauth import gatt
from structauth.errors import MalformedMessage


@settings(max_examples=200, deadline=None)
@given(message=st.binary(min_size=1, max_size=3000), mtu=st.integers(23, 517),
       number=st.integers(0, 200))
def test_fragments_fit_the_mtu_and_reassemble(message: bytes, mtu: int, number: int) -> None:
    pieces = gatt.fragment(message, number, mtu)
    assert all(len(p) <= mtu - 3 for p in pieces)
    r = gatt.Reassembler()
    out = [r.feed(p) for p in pieces]
    assert out[-1] == message and all(o is None for o in out[:-1])
    assert not r.busy


def test_fragment_counts_at_23_and_247() -> None:
    msg = bytes(2000)
    assert len(gatt.fragment(msg, 1, 23)) == 1 + -(-(2000 - 15) // 18)
    assert len(gatt.fragment(msg, 1, 247)) == 1 + -(-(2000 - 239) // 242)


def test_a_repeated_fragment_is_ignored() -> None:
    pieces = gatt.fragment(b"x" * 100, 3, 23)
    r = gatt.Reassembler()
    assert r.feed(pieces[0]) is None
    assert r.feed(pieces[0]) is None  # the write was retried
    for p in pieces[1:-1]:
        r.feed(p)
        r.feed(p)
    assert r.feed(pieces[-1]) == b"x" * 100
    assert r.repeats == len(pieces) - 1


@pytest.mark.parametrize("bad", [
    b"",
    b"\x80",                                       # first without its length
    bytes((0x80, 1)) + (5).to_bytes(3, "big") + b"abcde",  # first with index 1
    bytes((0x80 | 0x40, 0)) + (9).to_bytes(3, "big") + b"short",  # length mismatch
    bytes((0x80, 0)) + (0).to_bytes(3, "big"),     # empty message
    bytes((0x80, 0)) + (1 << 20).to_bytes(3, "big") + b"x",  # above the limit
    bytes((0x03, 1)) + b"stray",                   # continuation of another message
    bytes((0x01, 5)) + b"skip",                    # out of order
    bytes((0x01, 1)) + b"y" * 300,                 # beyond the announced length
    bytes((0x01, 1)),                              # empty continuation
])
def test_a_bad_fragment_is_refused_and_changes_nothing(bad: bytes) -> None:
    pieces = gatt.fragment(b"m" * 60, 1, 23)
    r = gatt.Reassembler(max_message=1024)
    r.feed(pieces[0])
    with pytest.raises(MalformedMessage):
        r.feed(bad)
    assert r.refused == 1
    for p in pieces[1:-1]:
        assert r.feed(p) is None
    assert r.feed(pieces[-1]) == b"m" * 60  # the message in progress was untouched


def test_a_new_first_fragment_starts_over() -> None:
    r = gatt.Reassembler()
    r.feed(gatt.fragment(b"a" * 50, 1, 23)[0])
    assert r.feed(gatt.fragment(b"b", 2, 23)[0]) == b"b"
    assert not r.busy


def test_mtu_bounds() -> None:
    with pytest.raises(ValueError):
        gatt.fragment(b"x", 0, 22)
    with pytest.raises(ValueError):
        gatt.fragment(b"", 0, 23)


def test_label_codes() -> None:
    code = gatt.new_code()
    assert len(code) == 11 and code[5] == "-"
    assert gatt.normalize_code(code.lower().replace("-", " ")) == code.replace("-", "")
    assert gatt.normalize_code("o1l2i-3u4x5") == "01121" + "3V4X5"
    for bad in ("", "12345", "ABCDE-FGHIJK", "ABCDE-FGH!J"):
        with pytest.raises(ValueError):
            gatt.normalize_code(bad)


def test_bindings_cover_nonces_serial_and_content() -> None:
    key = gatt.oob_key("7K3QD-M9XPA", "s-1")
    assert key == gatt.oob_key("7k3qd m9xpa", "s-1") != gatt.oob_key("7K3QD-M9XPA", "s-2")
    ctx = gatt.BindingContext("s-1", b"d" * 16, b"s" * 16)
    base = gatt.device_binding(key, ctx, b"e" * 32)
    assert base != gatt.device_binding(key, gatt.BindingContext("s-1", b"D" * 16, b"s" * 16),
                                       b"e" * 32)
    assert base != gatt.device_binding(key, gatt.BindingContext("s-1", b"d" * 16, b"S" * 16),
                                       b"e" * 32)
    assert base != gatt.device_binding(key, ctx, b"E" * 32)
    # the two directions never stand in for each other
    assert base != gatt.station_binding(key, ctx, b"e" * 32)
    assert gatt.check_binding(base, base) and not gatt.check_binding(base, "x")


def test_data_and_error_messages() -> None:
    header = bytes(31)
    msg = gatt.encode_data(header, "a/b", b"body")
    assert gatt.decode_data(msg, 31) == (header, "a/b", b"body")
    for bad in (msg[:31], bytes((gatt.SA1_DATA,)) + header + b"\x05ab",
                bytes((gatt.SA1_DATA,)) + header + b"\x01\xff"):
        with pytest.raises(MalformedMessage):
            gatt.decode_data(bad, 31)
    err = gatt.encode_error(gatt.Reason.BAD_TAG, "tag does not match")
    assert gatt.decode_error(err) == (gatt.Reason.BAD_TAG, "tag does not match")
    assert gatt.decode_error(bytes((gatt.SA1_ERROR,)) + b"\xff\xff")[0] is gatt.Reason.MALFORMED
