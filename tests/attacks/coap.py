"""A raw CoAP client for attacks, written from RFC 7252 (messages, options) and RFC 7959
(Block1/Block2): struct packing over a plain UDP socket. Nothing here uses aiocoap or
the project's adapters, so it can send what a library would refuse to build (reserved
option nibbles, truncated options, repeated or unknown critical options, bad UTF-8).

    client = Client("127.0.0.1", port)
    reply = client.request(POST, ["sensors", "pi-1", "readings"], b"21.5",
                           options=[(PROOF, header)])
    reply.code == CHANGED

A message is encoded from a list of ``(number, value bytes)`` options, sorted by number
as RFC 7252 section 3.1 requires unless ``sort=False``.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

VERSION = 1
# message types (3)
CON, NON, ACK, RST = 0, 1, 2, 3


def code(cls: int, detail: int) -> int:
    return (cls << 5) | detail


def code_str(c: int) -> str:
    return f"{c >> 5}.{c & 31:02d}"


EMPTY = 0
GET, POST, PUT, DELETE, FETCH = 1, 2, 3, 4, 5
CREATED, DELETED, VALID, CHANGED, CONTENT = (code(2, d) for d in (1, 2, 3, 4, 5))
CONTINUE = code(2, 31)
BAD_REQUEST, UNAUTHORIZED, BAD_OPTION, FORBIDDEN, NOT_FOUND = (code(4, d) for d in range(5))
METHOD_NOT_ALLOWED = code(4, 5)
REQUEST_ENTITY_INCOMPLETE = code(4, 8)
REQUEST_ENTITY_TOO_LARGE = code(4, 13)
INTERNAL_SERVER_ERROR = code(5, 0)
SERVICE_UNAVAILABLE = code(5, 3)
PROXYING_NOT_SUPPORTED = code(5, 5)

# option numbers (RFC 7252 5.10, RFC 7641, RFC 7959, RFC 9175)
IF_MATCH = 1
URI_HOST = 3
ETAG = 4
IF_NONE_MATCH = 5
OBSERVE = 6
URI_PORT = 7
LOCATION_PATH = 8
URI_PATH = 11
CONTENT_FORMAT = 12
MAX_AGE = 14
URI_QUERY = 15
ACCEPT = 17
LOCATION_QUERY = 20
BLOCK2 = 23
BLOCK1 = 27
SIZE2 = 28
PROXY_URI = 35
PROXY_SCHEME = 39
SIZE1 = 60
ECHO = 252
REQUEST_TAG = 292
#: Tessera's options (docs/COAP.md): the SA1 header, and msg3 on a new session's first
#: proven request
PROOF = 65003
CONFIRM = 65007

Option = tuple[int, bytes]


def uint(value: int) -> bytes:
    """An option's uint value (3.2): big-endian, no leading zero bytes (0 is empty)."""
    if value == 0:
        return b""
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def parse_uint(data: bytes) -> int:
    return int.from_bytes(data, "big")


@dataclass(frozen=True)
class Block:
    """Block1/Block2 value (RFC 7959 2.2): NUM << 4 | M << 3 | SZX; size 2**(SZX+4)."""

    num: int
    more: bool
    szx: int

    @property
    def size(self) -> int:
        return 1 << (self.szx + 4)

    def encode(self) -> bytes:
        return uint((self.num << 4) | (0x08 if self.more else 0) | self.szx)

    @classmethod
    def decode(cls, data: bytes) -> Block:
        v = parse_uint(data)
        return cls(v >> 4, bool(v & 0x08), v & 0x07)


def _nibble(n: int) -> tuple[int, bytes]:
    if n < 13:
        return n, b""
    if n < 269:
        return 13, bytes([n - 13])
    return 14, struct.pack("!H", n - 269)


def encode_options(options: Sequence[Option], sort: bool = True) -> bytes:
    """Options with delta encoding (3.1). ``sort=False`` keeps the given order, which
    lets an attacker send a negative delta (unencodable, so it is clamped to 0)."""
    items = sorted(options, key=lambda o: o[0]) if sort else list(options)
    out = bytearray()
    last = 0
    for number, value in items:
        delta = max(0, number - last)
        last = number
        d, dext = _nibble(delta)
        ln, lext = _nibble(len(value))
        out.append((d << 4) | ln)
        out += dext + lext + value
    return bytes(out)


def encode(mtype: int, mcode: int, mid: int, token: bytes = b"",
           options: Sequence[Option] = (), payload: bytes = b"", *, sort: bool = True,
           raw_options: bytes | None = None) -> bytes:
    """One CoAP message (3): header, token, options, 0xFF and the payload if any.
    ``raw_options`` replaces the encoded options with bytes of the caller's choosing."""
    header = struct.pack("!BBH", (VERSION << 6) | (mtype << 4) | len(token), mcode, mid)
    opts = raw_options if raw_options is not None else encode_options(options, sort)
    return header + token + opts + (b"\xff" + payload if payload else b"")


class FormatError(Exception):
    pass


@dataclass
class Message:
    mtype: int
    code: int
    mid: int
    token: bytes
    options: list[Option] = field(default_factory=list)
    payload: bytes = b""

    def opt(self, number: int) -> bytes | None:
        for n, v in self.options:
            if n == number:
                return v
        return None

    def all(self, number: int) -> list[bytes]:
        return [v for n, v in self.options if n == number]

    @property
    def block1(self) -> Block | None:
        v = self.opt(BLOCK1)
        return None if v is None else Block.decode(v)

    @property
    def block2(self) -> Block | None:
        v = self.opt(BLOCK2)
        return None if v is None else Block.decode(v)

    def __repr__(self) -> str:
        names = {CON: "CON", NON: "NON", ACK: "ACK", RST: "RST"}
        return (f"<{names[self.mtype]} {code_str(self.code)} mid={self.mid} "
                f"opts={[n for n, _ in self.options]} {self.payload[:60]!r}>")


def decode(data: bytes) -> Message:
    if len(data) < 4:
        raise FormatError("shorter than the header")
    first, mcode, mid = struct.unpack("!BBH", data[:4])
    if first >> 6 != VERSION:
        raise FormatError("version")
    tkl = first & 0x0F  # 9-15 are reserved (3); read them anyway to see what came back
    token = data[4:4 + tkl]
    pos = 4 + tkl
    options: list[Option] = []
    number = 0
    while pos < len(data):
        byte = data[pos]
        pos += 1
        if byte == 0xFF:
            break
        delta, length = byte >> 4, byte & 0x0F
        vals = []
        for nib in (delta, length):
            if nib == 13:
                vals.append(data[pos] + 13)
                pos += 1
            elif nib == 14:
                vals.append(struct.unpack("!H", data[pos:pos + 2])[0] + 269)
                pos += 2
            elif nib == 15:
                raise FormatError("reserved nibble")
            else:
                vals.append(nib)
        number += vals[0]
        options.append((number, data[pos:pos + vals[1]]))
        pos += vals[1]
    payload = data[pos:]
    return Message(first >> 4 & 3, mcode, mid, token, options, payload)


def path_options(path: Sequence[str | bytes]) -> list[Option]:
    return [(URI_PATH, p.encode() if isinstance(p, str) else p) for p in path]


class Client:
    """One UDP endpoint. ``request`` sends a confirmable request and waits for its
    answer (piggy-backed or separate); ``send`` / ``recv`` are the raw operations."""

    def __init__(self, host: str, port: int, *, bind_host: str = "127.0.0.1") -> None:
        self.server = (host, port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((bind_host, 0))
        self._mid = int.from_bytes(os.urandom(2), "big")

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def next_mid(self) -> int:
        self._mid = (self._mid + 1) & 0xFFFF
        return self._mid

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, self.server)

    def recv(self, timeout: float) -> bytes | None:
        ready, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
        if not ready:
            return None
        data, _ = self.sock.recvfrom(70000)
        return data

    def exchange(self, data: bytes, mid: int, token: bytes, timeout: float = 5.0,
                 retries: int = 2) -> Message | None:
        """Send a CON message and return the response to it (matching the token;
        an empty ACK means a separate response follows). Retransmits on silence."""
        for _ in range(retries + 1):
            self.send(data)
            deadline = time.monotonic() + timeout / (retries + 1)
            while True:
                raw = self.recv(deadline - time.monotonic())
                if raw is None:
                    break
                try:
                    msg = decode(raw)
                except FormatError:
                    continue
                if msg.mtype == RST and msg.mid == mid:
                    return msg
                if msg.mtype == ACK and msg.mid == mid and msg.code == EMPTY:
                    deadline = time.monotonic() + timeout  # separate response to come
                    continue
                if msg.token == token and msg.code != EMPTY:
                    if msg.mtype == CON:  # acknowledge a separate response
                        self.send(encode(ACK, EMPTY, msg.mid))
                    return msg
        return None

    def request(self, mcode: int, path: Sequence[str | bytes], payload: bytes = b"",
                options: Sequence[Option] = (), *, token: bytes | None = None,
                timeout: float = 5.0, mtype: int = CON) -> Message | None:
        token = os.urandom(4) if token is None else token
        mid = self.next_mid()
        data = encode(mtype, mcode, mid, token, [*path_options(path), *options], payload)
        return self.exchange(data, mid, token, timeout)

    def upload(self, mcode: int, path: Sequence[str | bytes], body: bytes,
               options: Sequence[Option] = (), *, szx: int = 6, timeout: float = 5.0,
               per_block: Callable[[Block, bytes], Sequence[Option]] | None = None,
               request_tag: bytes | None = None) -> Message | None:
        """Block1 upload (RFC 7959 2.5): blocks of 2**(szx+4) bytes, each acknowledged
        2.31 Continue until the last, whose answer is returned. ``per_block(block,
        chunk)`` adds options to one block (a per-block proof). Stops at the first
        answer that is not 2.31."""
        size = 1 << (szx + 4)
        token = os.urandom(4)
        num = 0
        reply: Message | None = None
        extra = [(REQUEST_TAG, request_tag)] if request_tag is not None else []
        while True:
            chunk = body[num * size:(num + 1) * size]
            more = (num + 1) * size < len(body)
            block = Block(num, more, szx)
            opts = [*options, *extra, (BLOCK1, block.encode())]
            if per_block is not None:
                opts += list(per_block(block, chunk))
            mid = self.next_mid()
            reply = self.exchange(encode(CON, mcode, mid, token,
                                         [*path_options(path), *opts], chunk),
                                  mid, token, timeout)
            if reply is None or reply.code != CONTINUE or not more:
                return reply
            num += 1

    def download(self, first: Message, mcode: int, path: Sequence[str | bytes],
                 options: Sequence[Option] = (), timeout: float = 5.0,
                 limit: int = 1 << 20) -> tuple[Message, bytes]:
        """Fetch the remaining Block2 blocks of a response (RFC 7959 2.4): the final
        message (with the first's options) and the whole body."""
        body = first.payload
        block = first.block2
        last = first
        while block is not None and block.more and len(body) < limit:
            nxt = Block(block.num + 1, False, block.szx)
            reply = self.request(mcode, path, b"", [*options, (BLOCK2, nxt.encode())],
                                 timeout=timeout)
            if reply is None:
                raise AssertionError(f"no answer for Block2 #{nxt.num}")
            if reply.code != first.code:
                return reply, body
            body += reply.payload
            block = reply.block2
            last = reply
        return last, body

    def close(self) -> None:
        self.sock.close()
