"""SA1 over MQTT 5: everything the device, the broker and the benchmarks must agree on.

One place for the binding (docs/MQTT.md describes it), so the agent
(``device/mqtt.py``), the broker's enforcer and step-up (``broker_plugin/``) and the
benchmarks' raw connectors (``bench/``) cannot drift apart:

* the Authentication Method (:data:`AUTH_METHOD`) and the AUTH packet with SA1 msg1,
  msg2, msg3 as Authentication Data (:func:`encode_auth`, :func:`decode_auth`,
  :func:`auth_properties`);
* how a topic becomes an SA1 action (:func:`action`) and the proof as a trailer,
  ``payload || 31-byte header`` (:func:`seal`, :func:`split`);
* the grace of a replaced session after a re-authentication (:class:`ReplacedSessions`):
  messages proven just before the swap still verify under the session they name;
* the control topics and their payloads: step-up requests (:class:`StepUpRequest`),
  resynchronisation requests (:func:`resync_payload`, :func:`resync_session`), the
  TPM quote blob carried in msg1 (:func:`encode_quote`, :func:`decode_quote`);
* the reason string of a refused PUBLISH (:func:`refusal_text`).

Sans-IO like the rest of the core: bytes and ``now`` in, bytes out; no paho, no
sockets. The MQTT 5 property table is the specification's (OASIS MQTT 5.0, 2.2.2.2).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import MalformedMessage, Reason
from .wire import Reader, var16

if TYPE_CHECKING:
    from .session import MessageVerified, Session

AUTH_METHOD = "tessera-sa1"
#: the broker asks for fresh hardware proof (proven under the device's session)
STEP_UP_TOPIC = "tessera/step-up"
#: the broker asks for a re-handshake: a message of this session was refused for its
#: epoch (clock drift or a step); proven, QoS 0
RESYNC_TOPIC = "tessera/resync"
#: the broker's first message on a re-authenticated session (empty, proven, QoS 0;
#: devices need not subscribe to it and may ignore it)
REKEYED_TOPIC = "tessera/rekeyed"
#: the SA1 header, appended to every proven payload (structauth.session.HEADER_SIZE)
TRAILER_SIZE = 31
#: replaced sessions kept per connection, each side (rotations faster lose the oldest)
MAX_REPLACED = 4
#: how long a replaced session still verifies messages that name it: (w+1)*P of the
#: default session parameters, as long as the epoch window would have accepted a
#: message proven just before the swap
ROTATION_GRACE_S = 30.0
QUOTE_MAGIC = b"TQ1"

# MQTT 5 control packet types (first byte, upper nibble) and reason codes used here
PACKET_CONNACK = 0x20
PACKET_PUBREC = 0x50
PACKET_DISCONNECT = 0xE0
PACKET_AUTH = 0xF0
RC_SUCCESS = 0x00
RC_CONTINUE_AUTHENTICATION = 0x18
RC_REAUTHENTICATE = 0x19
RC_UNSPECIFIED_ERROR = 0x80
RC_PROTOCOL_ERROR = 0x82
RC_IMPLEMENTATION_SPECIFIC = 0x83
RC_NOT_AUTHORIZED = 0x87
RC_BAD_AUTH_METHOD = 0x8C
RC_SESSION_TAKEN_OVER = 0x8E
RC_TOPIC_NAME_INVALID = 0x90
RC_PAYLOAD_FORMAT_INVALID = 0x99
RC_ADMINISTRATIVE_ACTION = 0x98
PROP_AUTHENTICATION_METHOD = 0x15
PROP_AUTHENTICATION_DATA = 0x16
PROP_REASON_STRING = 0x1F

#: what a refused re-authentication or a closed connection means for the device, by
#: the DISCONNECT (or CONNACK) reason code the broker sent (MQTT 5.0, 3.14.2.1)
DISCONNECT_REASONS: dict[int, str] = {
    RC_SUCCESS: "normal disconnection",
    RC_UNSPECIFIED_ERROR: "unspecified error",
    0x81: "malformed packet",
    RC_PROTOCOL_ERROR: "protocol error",
    RC_IMPLEMENTATION_SPECIFIC: "implementation specific error",
    RC_NOT_AUTHORIZED: "not authorized",
    0x89: "server busy",
    0x8B: "server shutting down",
    RC_BAD_AUTH_METHOD: "bad authentication method",
    0x8D: "keep alive timeout",
    RC_SESSION_TAKEN_OVER: "session taken over (another connection with this client id)",
    0x97: "quota exceeded",
    RC_ADMINISTRATIVE_ACTION: "administrative action",
    0x9F: "connection rate exceeded",
}


def reason_text(code: int) -> str:
    """``0x87 not authorized``: a reason code as a device reports it."""
    return f"{code:#04x} {DISCONNECT_REASONS.get(code, 'reason code')}"


# ----------------------------------------------------------------- topics and proofs


def action(topic: str) -> bytes:
    """The SA1 action of a PUBLISH: its topic name, UTF-8 (as MQTT encodes it)."""
    return topic.encode("utf-8")


def seal(session: Session, topic: str, payload: bytes, now: float) -> bytes:
    """``payload || header``: ``payload`` proven under ``session`` for ``topic`` (in
    sealed mode the payload is encrypted)."""
    header, body = session.protect(action(topic), payload, now)
    return body + header


def split(data: bytes) -> tuple[bytes, bytes]:
    """(body, header) of a proven payload; MalformedMessage(TRUNCATED) if it is shorter
    than the proof."""
    if len(data) < TRAILER_SIZE:
        raise MalformedMessage("payload shorter than the SA1 proof", Reason.TRUNCATED)
    cut = len(data) - TRAILER_SIZE
    return data[:cut], data[cut:]


def session_id_of(header: bytes) -> bytes:
    """The session id a header names (bytes 1..8, after the epoch byte)."""
    return header[1:9]


class ReplacedSessions:
    """Sessions a re-authentication replaced on one connection, each verifying the
    messages that name it until ``grace_s`` after the swap (QoS 1/2 messages proven
    before the swap and sent or delivered after it). At most ``limit`` are kept
    (oldest closed first); a message under a replaced session never counts as fresh
    (the broker grants no step-up on it)."""

    __slots__ = ("_kept", "grace_s", "limit")

    def __init__(self, grace_s: float = ROTATION_GRACE_S, limit: int = MAX_REPLACED) -> None:
        self.grace_s = grace_s
        self.limit = limit
        self._kept: dict[bytes, tuple[Session, float]] = {}

    def __len__(self) -> int:
        return len(self._kept)

    def __bool__(self) -> bool:
        return bool(self._kept)

    def __iter__(self) -> Iterator[Session]:
        return iter([session for session, _ in self._kept.values()])

    def retire(self, session: Session, now: float) -> None:
        """``session`` was just replaced: keep it for the grace period."""
        self._kept[session.session_id] = (session, now + self.grace_s)
        while len(self._kept) > self.limit:
            self._kept.pop(next(iter(self._kept)))[0].close()

    def named(self, header: bytes, now: float) -> Session | None:
        """The replaced session ``header`` names, if it is still within its grace."""
        kept = self._kept.get(session_id_of(header))
        if kept is not None and now < kept[1]:
            return kept[0]
        return None

    def expire(self, now: float) -> None:
        """Close (erase) the replaced sessions whose grace is over."""
        for sid, (session, until) in list(self._kept.items()):
            if now >= until:
                session.close()
                del self._kept[sid]

    def close(self) -> None:
        for session, _ in self._kept.values():
            session.close()
        self._kept.clear()


def pick_session(current: Session, replaced: ReplacedSessions, header: bytes,
                 now: float) -> Session | None:
    """The replaced session a header names within its grace, or None: verify under
    ``current``. Nothing is tried twice (the header carries the session id)."""
    if replaced and session_id_of(header) != current.session_id:
        return replaced.named(header, now)
    return None


def open_proven(current: Session, replaced: ReplacedSessions, topic: str, data: bytes,
                now: float) -> tuple[MessageVerified, Session]:
    """Verify a proven payload on ``topic`` under the session its header names (the
    current one, or a replaced one within its grace): the verified message and the
    session it verified under. Raises the core's ProtocolError otherwise."""
    body, header = split(data)
    session = pick_session(current, replaced, header, now) or current
    return session.verify(header, action(topic), body, now), session


def refusal_text(reason: Reason) -> str:
    """The reason string of a PUBACK/PUBREC refusing a message (``tessera: <reason>``;
    Mosquitto 2.0.x does not pass a plugin's reason string on, so a device may get
    only the bare reason code)."""
    return f"tessera: {reason.name.lower()}"


#: the reason string of a PUBACK/PUBREC refusing a message for its epoch
EPOCH_REFUSAL = refusal_text(Reason.EPOCH_OUT_OF_WINDOW)
_REFUSAL = re.compile(r"tessera: ([a-z_]+)")
#: reason codes that say "not now" rather than "not you"
_UNAVAILABLE_CODES = frozenset({0x89, 0x8B, 0x8D, 0x97, 0x9F})


def refused_reason(text: str) -> Reason | None:
    """The reason a ``tessera: <reason>`` reason string names (what
    :func:`refusal_text` wrote); None for any other text. Unproven: it only explains."""
    match = _REFUSAL.match(text or "")
    if match is None:
        return None
    return Reason.__members__.get(match.group(1).upper())


def broker_refusal(code: int, text: str = "") -> Reason:
    """What a CONNACK or DISCONNECT reason code (and its reason string, if the broker
    passed one on) means for a device: the reason the string names, else "try later"
    for server busy / shutting down / keep alive / quota / rate, else not authorized."""
    named = refused_reason(text)
    if named is not None:
        return named
    return Reason.BACKEND_UNAVAILABLE if code in _UNAVAILABLE_CODES else Reason.NOT_AUTHORIZED


# ----------------------------------------------------------------------- MQTT 5 AUTH


def varint(n: int) -> bytes:
    """MQTT Variable Byte Integer."""
    if not 0 <= n <= 268_435_455:
        raise ValueError("too large for an MQTT variable byte integer")
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def packet(first: int, body: bytes) -> bytes:
    """An MQTT control packet: fixed header byte, remaining length, body."""
    return bytes((first,)) + varint(len(body)) + body


def auth_properties(data: bytes | None) -> bytes:
    """The property block (without its length) of a CONNECT or AUTH carrying SA1:
    Authentication Method ``tessera-sa1`` and, if given, Authentication Data."""
    props = bytes((PROP_AUTHENTICATION_METHOD,)) + var16(AUTH_METHOD.encode())
    if data:
        if len(data) > 0xFFFF:
            raise ValueError("authentication data longer than 65535 bytes")
        props += bytes((PROP_AUTHENTICATION_DATA,)) + var16(data)
    return props


def encode_auth(reason: int, data: bytes | None) -> bytes:
    """An MQTT 5 AUTH packet with method ``tessera-sa1`` and ``data`` (SA1 msg1, msg2
    or msg3) as Authentication Data."""
    props = auth_properties(data)
    return packet(PACKET_AUTH, bytes((reason,)) + varint(len(props)) + props)


# MQTT 5 property identifier -> its value: a fixed size in bytes, "v" a variable byte
# integer, "s" a two-byte length and its bytes, "p" a pair of those (MQTT 5.0, 2.2.2.2)
_PROPERTY_SIZES: dict[int, int | str] = {
    0x01: 1, 0x02: 4, 0x03: "s", 0x08: "s", 0x09: "s", 0x0B: "v", 0x11: 4, 0x12: "s",
    0x13: 2, 0x15: "s", 0x16: "s", 0x17: 1, 0x18: 4, 0x19: 1, 0x1A: "s", 0x1C: "s",
    0x1F: "s", 0x21: 2, 0x22: 2, 0x23: 2, 0x24: 1, 0x25: 1, 0x26: "p", 0x27: 4, 0x28: 1,
    0x29: 1, 0x2A: 1,
}


def _readvarint(data: bytes, at: int) -> tuple[int, int]:
    value, mult = 0, 1
    for i in range(at, min(at + 4, len(data))):
        value += (data[i] & 0x7F) * mult
        if data[i] < 0x80:
            return value, i + 1
        mult *= 128
    raise MalformedMessage("bad variable byte integer", Reason.MALFORMED)


def properties(block: bytes) -> dict[int, bytes]:
    """The properties of an MQTT 5 property block (without its length) by identifier:
    the raw value of fixed-size and integer properties, the bytes of strings and
    binary data (of a repeated property, the last one). MalformedMessage for an
    unknown identifier or a truncated block."""
    out: dict[int, bytes] = {}
    i = 0
    while i < len(block):
        ident = block[i]
        size = _PROPERTY_SIZES.get(ident)
        if size is None:
            raise MalformedMessage(f"unknown MQTT 5 property {ident:#04x}", Reason.MALFORMED)
        start = i + 1
        if isinstance(size, int):
            i = start + size
            value = block[start:i]
        elif size == "v":
            _, i = _readvarint(block, start)
            value = block[start:i]
        else:
            i = start
            for _ in range(2 if size == "p" else 1):
                value_at = i + 2
                i = value_at + int.from_bytes(block[i:value_at], "big")
            value = block[value_at:i]
        if i > len(block):
            raise MalformedMessage("truncated MQTT 5 property", Reason.TRUNCATED)
        out[ident] = bytes(value)
    return out


def property_block(body: bytes, at: int) -> bytes:
    """The property block that starts with its length at ``body[at]``."""
    length, start = _readvarint(body, at)
    if start + length > len(body):
        raise MalformedMessage("truncated MQTT 5 property block", Reason.TRUNCATED)
    return body[start:start + length]


def decode_auth(body: bytes) -> tuple[int, str | None, bytes | None]:
    """(reason code, authentication method, authentication data) of an AUTH packet's
    body (what follows the fixed header). An empty body is reason 0x00 (MQTT 5.0,
    3.15.2.1). MalformedMessage if the properties do not parse."""
    if not body:
        return RC_SUCCESS, None, None
    if len(body) == 1:
        return body[0], None, None
    props = properties(property_block(body, 1))
    method = props.get(PROP_AUTHENTICATION_METHOD)
    try:
        text = method.decode("utf-8") if method is not None else None
    except UnicodeDecodeError:
        raise MalformedMessage("authentication method is not UTF-8",
                               Reason.MALFORMED) from None
    return body[0], text, props.get(PROP_AUTHENTICATION_DATA)


# ---------------------------------------------------------------- control messages


@dataclass(frozen=True)
class StepUpRequest:
    """The payload of a ``tessera/step-up`` message (before its proof): a fresh nonce to
    sign as msg1's ``context`` in a re-authentication, whether a TPM quote over it is
    required, the trigger, and the seconds left to answer."""

    nonce: bytes
    quote: bool
    reason: str
    deadline_s: int

    def encode(self) -> bytes:
        return json.dumps({
            "nonce": base64.b64encode(self.nonce).decode(),
            "quote": self.quote,
            "reason": self.reason,
            "deadline_s": self.deadline_s,
        }, separators=(",", ":")).encode()

    @classmethod
    def parse(cls, payload: bytes) -> StepUpRequest:
        """MalformedMessage unless ``payload`` is exactly such a request."""
        try:
            data: Any = json.loads(payload)
            nonce = base64.b64decode(data["nonce"], validate=True)
            quote, reason, deadline = data["quote"], data["reason"], data["deadline_s"]
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise MalformedMessage(f"malformed step-up request: {exc}",
                                   Reason.MALFORMED) from None
        if (not isinstance(quote, bool) or not isinstance(reason, str) or len(reason) > 64
                or type(deadline) is not int or deadline < 0 or not 16 <= len(nonce) <= 64):
            raise MalformedMessage("malformed step-up request", Reason.MALFORMED)
        return cls(nonce, quote, reason, deadline)


def resync_payload(session_id: bytes) -> bytes:
    """The payload of a ``tessera/resync`` message naming the refused session."""
    return json.dumps({"reason": Reason.EPOCH_OUT_OF_WINDOW.name.lower(),
                       "session": session_id.hex()}, separators=(",", ":")).encode()


def resync_session(payload: bytes) -> bytes:
    """The session id a ``tessera/resync`` payload names; MalformedMessage otherwise."""
    try:
        named = bytes.fromhex(json.loads(payload)["session"])
    except (ValueError, KeyError, TypeError) as exc:
        raise MalformedMessage(f"malformed resync request: {exc}", Reason.MALFORMED) from None
    return named


def encode_quote(attest: bytes, signature: bytes, ak_public: bytes) -> bytes:
    """The msg1 ``quote`` field: ``"TQ1" || var16 attest || var16 signature || var16
    ak_public`` (TPMS_ATTEST of a TPM2_Quote, the AK's DER ECDSA signature over it,
    the AK's marshalled TPM2B_PUBLIC)."""
    return QUOTE_MAGIC + var16(attest) + var16(signature) + var16(ak_public)


def decode_quote(blob: bytes) -> tuple[bytes, bytes, bytes]:
    """(attest, signature, ak_public) of a quote blob, parsed strictly (no trailing
    bytes, sizes in range); MalformedMessage otherwise."""
    r = Reader(blob, "quote")
    if r.fixed(3, "magic") != QUOTE_MAGIC:
        raise MalformedMessage("not a Tessera quote (magic)", Reason.MALFORMED)
    attest = r.var16("attest", min_len=1)
    signature = r.var16("signature", min_len=8, max_len=72)
    ak_public = r.var16("ak_public", min_len=1)
    r.end()
    return attest, signature, ak_public
