"""structauth.mqtt_binding: the bytes both MQTT ends agree on, checked against bytes
written out from the MQTT 5 specification and docs/MQTT.md (not against the code's
own encoder), and the replaced-session grace at its bounds."""

from __future__ import annotations

import pytest

from structauth import mqtt_binding as mb
from structauth.errors import MalformedMessage, Reason, TesseraError
from structauth.params import SessionParams
from structauth.session import Role, Session
from tests.support import SessionPair


def _session(n: int, now: float = 1000.0) -> Session:
    return Session(role=Role.RESPONDER, session_id=bytes([n]) * 8, send_chain_key=b"\x01" * 32,
                   receive_chain_key=b"\x02" * 32, params=SessionParams(), start=now)


def test_auth_packet_bytes_follow_mqtt5() -> None:
    # fixed header F0, remaining length, reason 0x18, property length, 0x15 "tessera-sa1",
    # 0x16 two bytes of data (MQTT 5.0, 3.15)
    expected = bytes.fromhex("f0 15 18 13 15 000b") + b"tessera-sa1" + bytes.fromhex(
        "16 0002 abcd")
    assert mb.encode_auth(0x18, b"\xab\xcd") == expected
    assert mb.decode_auth(expected[2:]) == (0x18, "tessera-sa1", b"\xab\xcd")


def test_auth_decoding_skips_other_properties_and_refuses_unknown_ones() -> None:
    # a Reason String (0x1F) and a User Property (0x26, a string pair) around the data
    props = (bytes.fromhex("1f 0002") + b"hi" + bytes.fromhex("16 0001 07")
             + bytes.fromhex("26 0001") + b"k" + bytes.fromhex("0001") + b"v")
    body = bytes([0x19, len(props)]) + props
    assert mb.decode_auth(body) == (0x19, None, b"\x07")
    assert mb.decode_auth(b"") == (0x00, None, None)  # 3.15.2.1: no reason code is 0x00
    assert mb.decode_auth(b"\x87") == (0x87, None, None)
    with pytest.raises(MalformedMessage) as unknown:
        mb.decode_auth(bytes([0x18, 2, 0x7F, 0]))
    assert unknown.value.reason is Reason.MALFORMED
    with pytest.raises(MalformedMessage) as short:
        mb.decode_auth(bytes([0x18, 5]) + bytes.fromhex("16 0009 01"))
    assert short.value.reason is Reason.TRUNCATED


def test_a_topic_is_its_utf8_bytes_and_the_proof_a_31_byte_trailer() -> None:
    pair = SessionPair.direct()
    sealed = mb.seal(pair.initiator, "devices/ü/t", b"payload", pair.clock.now)
    body, header = mb.split(sealed)
    assert body == b"payload" and len(header) == 31 == mb.TRAILER_SIZE
    assert mb.session_id_of(header) == pair.initiator.session_id
    # the responder verifies with the action spelled out by hand: UTF-8 of the topic
    verified = pair.responder.verify(header, "devices/ü/t".encode(), body, pair.clock.now)
    assert verified.payload == b"payload"
    with pytest.raises(MalformedMessage) as short:
        mb.split(b"x" * 30)
    assert short.value.reason is Reason.TRUNCATED


def test_replaced_sessions_are_bounded_and_expire_after_their_grace() -> None:
    kept = mb.ReplacedSessions(grace_s=30.0, limit=2)
    first, second, third = _session(1), _session(2), _session(3)
    for s in (first, second, third):
        kept.retire(s, 1000.0)
    assert len(kept) == 2 and list(kept) == [second, third]  # at the bound: oldest out
    assert first.state.name == "CLOSED"  # and erased
    header = b"\x10" + second.session_id + bytes(22)
    assert kept.named(header, 1029.9) is second
    assert kept.named(header, 1030.0) is None  # the grace is over at exactly +30 s
    assert mb.pick_session(_session(9), kept, header, 1000.0) is second
    # a header naming the current session is never looked up among the replaced ones
    assert mb.pick_session(second, kept, header, 1000.0) is None
    kept.expire(1030.0)
    assert len(kept) == 0 and second.state.name == "CLOSED" and third.state.name == "CLOSED"


def test_step_up_request_round_trip_and_refusals() -> None:
    request = mb.StepUpRequest(b"n" * 32, True, "sensitive_topic", 30)
    assert mb.StepUpRequest.parse(request.encode()) == request
    assert request.encode() == (b'{"nonce":"' + b"bm5u" * 10 + b'bm4=","quote":true,'
                                b'"reason":"sensitive_topic","deadline_s":30}')
    for bad in (b"", b"{}", b'{"nonce":"!!","quote":true,"reason":"x","deadline_s":1}',
                request.encode().replace(b"30", b"-1"),
                request.encode().replace(b"true", b'"yes"')):
        with pytest.raises(MalformedMessage):
            mb.StepUpRequest.parse(bad)


def test_resync_and_quote_formats() -> None:
    sid = bytes(range(8))
    assert mb.resync_payload(sid) == (b'{"reason":"epoch_out_of_window",'
                                      b'"session":"0001020304050607"}')
    assert mb.resync_session(mb.resync_payload(sid)) == sid
    with pytest.raises(MalformedMessage):
        mb.resync_session(b'{"session": 5}')
    blob = mb.encode_quote(b"A", b"S" * 8, b"K")
    assert blob == b"TQ1\x00\x01A\x00\x08SSSSSSSS\x00\x01K"
    assert mb.decode_quote(blob) == (b"A", b"S" * 8, b"K")
    with pytest.raises(TesseraError) as trailing:
        mb.decode_quote(blob + b"\x00")
    assert trailing.value.reason is Reason.TRAILING_BYTES


def test_refusal_text_and_reason_codes() -> None:
    assert mb.EPOCH_REFUSAL == "tessera: epoch_out_of_window"
    assert mb.refusal_text(Reason.BAD_TAG) == "tessera: bad_tag"
    assert mb.reason_text(0x8E).startswith("0x8e session taken over")
    assert mb.reason_text(0x42) == "0x42 reason code"
