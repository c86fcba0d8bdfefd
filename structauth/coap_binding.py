"""SA1 over CoAP: everything the gateway and the device must agree on (docs/COAP.md).

The option numbers (Tessera-Proof, Tessera-Confirm), the handshake path, the SA1
action strings of requests, request blocks and responses, the method codes, and the
diagnostic payload of an unproven refusal. Part of the wire format, so it lives in the
core and both adapters (the gateway's site wrapper and the device's client) build the
same bytes from the same code; tests/test_coap.py checks the bytes against an
independent construction from docs/COAP.md. Sans-IO: no aiocoap here (each adapter
registers the two option numbers with aiocoap as opaque options).

An action is at most 65,535 bytes (SA1 binds it with a u16 length); a request whose
path, query or number of segments does not fit raises :class:`MalformedMessage`
(reason ``malformed``), which the gateway answers 4.00 and the device refuses to send.
"""

from __future__ import annotations

import functools
import re
import struct
from collections.abc import Sequence

from .errors import MalformedMessage, Reason

#: CoAP option that carries the 31-byte SA1 header: experimental range, odd (critical),
#: bit 1 set (unsafe to forward)
PROOF_OPTION_NUMBER = 65003
#: CoAP option that carries SA1 msg3 (46 bytes) on the first proven request(s) of a new
#: session: critical, unsafe to forward, like the proof option
CONFIRM_OPTION_NUMBER = 65007
HANDSHAKE_PATH = (".well-known", "sa1")
LABEL_REQUEST = b"coap-req\x00"
LABEL_BLOCK = b"coap-blk\x00"
LABEL_RESPONSE = b"coap-res\x00"
ABSENT = 0xFFFFFFFF
#: the longest action SA1 can bind (u16 length)
MAX_ACTION = 0xFFFF
#: the 31-byte header, as in structauth.session.HEADER_SIZE
HEADER_SIZE = 31
NO_PREVIOUS = bytes(HEADER_SIZE)

#: CoAP request codes (RFC 7252, RFC 8132) by method name, and back
METHODS = {"GET": 1, "POST": 2, "PUT": 3, "DELETE": 4, "FETCH": 5, "PATCH": 6, "iPATCH": 7}
METHOD_NAMES = {code: name for name, code in METHODS.items()}

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_BLOCK = struct.Struct(">IBB")


def _u32_or_absent(value: int | None, what: str) -> bytes:
    if value is None:
        return _U32.pack(ABSENT)
    if not 0 <= value < ABSENT:
        raise MalformedMessage(f"{what} {value} does not fit the action", Reason.MALFORMED)
    return _U32.pack(value)


def _strings(items: Sequence[str], what: str) -> list[bytes]:
    if len(items) > MAX_ACTION:
        raise MalformedMessage(f"{len(items)} {what} items do not fit the action",
                               Reason.MALFORMED)
    out = [_U16.pack(len(items))]
    for item in items:
        try:
            raw = item.encode("utf-8")
        except UnicodeEncodeError:
            raise MalformedMessage(f"a {what} item is not valid UTF-8",
                                   Reason.MALFORMED) from None
        if len(raw) > MAX_ACTION:
            raise MalformedMessage(f"a {what} item of {len(raw)} bytes does not fit the action",
                                   Reason.MALFORMED)
        out.append(_U16.pack(len(raw)))
        out.append(raw)
    return out


def request_action(
    code: int,
    path: Sequence[str],
    query: Sequence[str] = (),
    content_format: int | None = None,
    accept: int | None = None,
    observe: int | None = None,
) -> bytes:
    """The SA1 action of a CoAP request::

        "coap-req" 0x00 | u8 code | u16 n | n x (u16 len | Uri-Path segment, UTF-8)
                        | u16 m | m x (u16 len | Uri-Query item, UTF-8)
                        | u32 Content-Format | u32 Accept | u32 Observe

    with 0xFFFFFFFF for an absent option. Every field has a length or a fixed size, so
    two different requests never share an action (``a/b`` as one segment is not ``a``,
    ``b``). The payload is not here: SA1 binds it separately. Raises
    :class:`MalformedMessage` when the result would exceed 65,535 bytes.
    """
    if not 0 <= code <= 0xFF:
        raise MalformedMessage(f"code {code} does not fit the action", Reason.MALFORMED)
    parts = [LABEL_REQUEST, bytes((code,))]
    parts += _strings(path, "Uri-Path")
    parts += _strings(query, "Uri-Query")
    parts.append(_u32_or_absent(content_format, "Content-Format"))
    parts.append(_u32_or_absent(accept, "Accept"))
    parts.append(_u32_or_absent(observe, "Observe"))
    action = b"".join(parts)
    if len(action) > MAX_ACTION:
        raise MalformedMessage(
            f"request action of {len(action)} bytes exceeds {MAX_ACTION} "
            "(path or query too long)", Reason.MALFORMED)
    return action


def block_action(request: bytes, number: int, size_exponent: int, more: bool,
                 previous: bytes) -> bytes:
    """The SA1 action of one Block1 block of a request (every block is proven on its own,
    so a gateway spools only bytes whose proof it checked)::

        "coap-blk" 0x00 | u32 block number | u8 SZX | u8 more (0/1)
                        | 31 bytes: the previous block's SA1 header (zeros for block 0)
                        | the request action (request_action above)

    Chaining each block to the previous block's header binds the blocks into one
    transfer in order: no block can be dropped, reordered or spliced in from another
    transfer, and the proof of the last block (to which the response is bound) covers
    the whole body. ``request`` is the request action; the result is at most 65,535
    bytes (:class:`MalformedMessage` otherwise).
    """
    if len(previous) != HEADER_SIZE:
        raise MalformedMessage("previous block header is not 31 bytes", Reason.MALFORMED)
    if not 0 <= number <= 0xFFFFF or not 0 <= size_exponent <= 7:
        raise MalformedMessage("block number or size does not fit", Reason.MALFORMED)
    action = b"".join(
        (LABEL_BLOCK, _BLOCK.pack(number, size_exponent, 1 if more else 0), previous, request)
    )
    if len(action) > MAX_ACTION:
        raise MalformedMessage(
            f"block action of {len(action)} bytes exceeds {MAX_ACTION}", Reason.MALFORMED)
    return action


def response_action(request_header: bytes, code: int, content_format: int | None) -> bytes:
    """The SA1 action of a response: ``"coap-res" 0x00 | request header (31) | u8 code
    | u32 Content-Format``. The request's header carries its session, sequence number
    and tag, and the tag covers the request's action and payload, so the response is
    bound to exactly one request (for a block-wise request: to its last block, whose
    proof chains every block before it)."""
    return (
        LABEL_RESPONSE
        + request_header
        + bytes((code,))
        + _u32_or_absent(content_format, "Content-Format")
    )


_cached_request_action = functools.lru_cache(maxsize=1024)(request_action)


def cached_request_action(
    code: int,
    path: tuple[str, ...],
    query: tuple[str, ...],
    content_format: int | None,
    accept: int | None,
    observe: int | None,
) -> bytes:
    """:func:`request_action`, cached for short paths only, so that nobody can fill the
    cache with large ones before proving anything (at most 1024 x ~600 bytes)."""
    if len(path) + len(query) <= 16 and sum(map(len, path)) + sum(map(len, query)) <= 512:
        return _cached_request_action(code, path, query, content_format, accept, observe)
    return request_action(code, path, query, content_format, accept, observe)


_DIAGNOSTIC = re.compile(rb"^tessera: ([a-z_]+) \((\d+)\)")
_REASON_CODES = frozenset(int(r) for r in Reason)


def diagnostic(reason: Reason, detail: str = "") -> bytes:
    """The payload of an unproven refusal: ``tessera: <reason> (<code>)[: <detail>]``."""
    text = f"tessera: {reason.name.lower()} ({int(reason)})"
    return (text + (f": {detail}" if detail else "")).encode()


def diagnostic_reason(payload: bytes) -> Reason | None:
    """The reason a refusal's diagnostic payload names (None: not a Tessera diagnostic).
    Unproven: anyone on the path can write one, so it only chooses what to try next."""
    match = _DIAGNOSTIC.match(payload)
    if match and int(match.group(2)) in _REASON_CODES:
        return Reason(int(match.group(2)))
    return None
