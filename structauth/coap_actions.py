"""The SA1 action strings of CoAP requests and responses (docs/COAP.md).

Part of the wire format, so it lives in the core and both adapters (the gateway's site
wrapper and the device's client) build the same bytes from the same code.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

#: CoAP option that carries the 31-byte SA1 header: experimental range, odd (critical),
#: bit 1 set (unsafe to forward)
PROOF_OPTION_NUMBER = 65003
HANDSHAKE_PATH = (".well-known", "sa1")
LABEL_REQUEST = b"coap-req\x00"
LABEL_RESPONSE = b"coap-res\x00"
ABSENT = 0xFFFFFFFF

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


def _u32_or_absent(value: int | None) -> bytes:
    return _U32.pack(ABSENT if value is None else int(value))


def _strings(items: Sequence[str]) -> bytes:
    out = [_U16.pack(len(items))]
    for item in items:
        raw = item.encode("utf-8")
        out.append(_U16.pack(len(raw)))
        out.append(raw)
    return b"".join(out)


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
    ``b``). The payload is not here: SA1 binds it separately.
    """
    return b"".join(
        (
            LABEL_REQUEST,
            bytes((code,)),
            _strings(path),
            _strings(query),
            _u32_or_absent(content_format),
            _u32_or_absent(accept),
            _u32_or_absent(observe),
        )
    )


def response_action(request_header: bytes, code: int, content_format: int | None) -> bytes:
    """The SA1 action of a response: ``"coap-res" 0x00 | request header (31) | u8 code
    | u32 Content-Format``. The request's header carries its session, sequence number
    and tag, and the tag covers the request's action and payload, so the response is
    bound to exactly one request."""
    return LABEL_RESPONSE + request_header + bytes((code,)) + _u32_or_absent(content_format)
