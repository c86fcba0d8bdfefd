"""Byte-level reading and writing for SA1 messages.

Every parser in the core goes through :class:`Reader`, so a truncated, extended or
oversized field always becomes a :class:`~structauth.errors.MalformedMessage` with a
reason, never an IndexError or struct.error.
"""

from __future__ import annotations

import struct

from .errors import MalformedMessage, Reason

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


class Reader:
    __slots__ = ("_data", "_pos", "_what")

    def __init__(self, data: bytes, what: str) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._what = what

    @property
    def consumed(self) -> bytes:
        return bytes(self._data[: self._pos])

    def fixed(self, n: int, field: str) -> bytes:
        end = self._pos + n
        if end > len(self._data):
            raise MalformedMessage(f"{self._what}: truncated in {field}", Reason.TRUNCATED)
        out = bytes(self._data[self._pos : end])
        self._pos = end
        return out

    def u8(self, field: str) -> int:
        return self.fixed(1, field)[0]

    def u16(self, field: str) -> int:
        return int(_U16.unpack(self.fixed(2, field))[0])

    def u32(self, field: str) -> int:
        return int(_U32.unpack(self.fixed(4, field))[0])

    def var16(self, field: str, *, min_len: int = 0, max_len: int = 0xFFFF) -> bytes:
        n = self.u16(field + " length")
        if not min_len <= n <= max_len:
            raise MalformedMessage(
                f"{self._what}: {field} length {n} outside {min_len}..{max_len}", Reason.MALFORMED
            )
        return self.fixed(n, field)

    def end(self) -> None:
        if self._pos != len(self._data):
            extra = len(self._data) - self._pos
            raise MalformedMessage(
                f"{self._what}: {extra} unexpected trailing bytes", Reason.TRAILING_BYTES
            )


def u8(v: int) -> bytes:
    return bytes((v,))


def u16(v: int) -> bytes:
    return _U16.pack(v)


def u32(v: int) -> bytes:
    return _U32.pack(v)


def var16(data: bytes) -> bytes:
    if len(data) > 0xFFFF:
        raise ValueError("field longer than 65535 bytes")
    return _U16.pack(len(data)) + data
