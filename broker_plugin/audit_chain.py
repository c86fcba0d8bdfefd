"""The audit log's record format and its hash chain: how a record is written down
(canonical JSON), how it is hashed (SHA-256, or HMAC-SHA-256 with a key) and how a chain
spread over rotated files is checked (:func:`verify_chain`). The writer side is
:mod:`broker_plugin.audit`, which re-exports these names.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any, Final, TypeAlias

from structauth.errors import ConfigurationError

#: the record that restarts a chain after lost records (written by the async writer)
CHAIN_BREAK: Final = "chain_break"
#: ``prev`` of the first record of a chain (and of every chain_break record).
GENESIS: Final = "0" * 64
_MIN_KEY_BYTES: Final = 16

Record: TypeAlias = dict[str, Any]


# -- canonical form and hashing -----------------------------------------------------------
def canonical(record: Mapping[str, Any]) -> bytes:
    """The bytes that are hashed: ``record`` without ``hash``, sorted keys, no spaces."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return json.dumps(
        body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _digest(data: bytes, key: bytes | None) -> str:
    if key is None:
        return hashlib.sha256(data).hexdigest()
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def _hash_ok(record: Mapping[str, Any], key: bytes | None) -> bool:
    try:
        expected = _digest(canonical(record), key)
    except (ValueError, TypeError, UnicodeEncodeError):
        return False
    return hmac.compare_digest(expected, str(record["hash"]))


def _plain(value: object) -> Any:
    """A JSON value that survives a dumps/loads round trip unchanged (so it re-hashes)."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, Enum):  # before int: Reason is an IntEnum
        return value.value if isinstance(value.value, str) else value.name.lower()
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, set | frozenset):
        return [_plain(v) for v in sorted(value, key=repr)]
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def _scrub(value: Any) -> Any:
    """Replace lone surrogates (not encodable as UTF-8) by backslash escapes."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_scrub(k): _scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value


def _iso(ts: float) -> str:
    stamp = datetime.fromtimestamp(ts, UTC).isoformat(timespec="microseconds")
    return stamp.replace("+00:00", "Z")


def _session_hex(session: bytes | bytearray | str | None) -> str | None:
    if session is None or isinstance(session, str):
        return session
    return bytes(session).hex()


def _parse(raw: bytes) -> Record | None:
    """A record if ``raw`` is one well-formed audit line, else None."""
    try:
        rec = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(rec, dict):
        return None
    seq, prev, digest = rec.get("seq"), rec.get("prev"), rec.get("hash")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        return None
    if not (isinstance(prev, str) and isinstance(digest, str)):
        return None
    if not isinstance(rec.get("event"), str):
        return None
    return rec


def load_key(path: str | os.PathLike[str]) -> bytes:
    """Read an audit HMAC key: one line of hex, at least 16 bytes once decoded."""
    try:
        text = Path(path).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"cannot read audit key file {path}: {exc}") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ConfigurationError(f"audit key file {path} does not hold one line of hex") from None
    if len(key) < _MIN_KEY_BYTES:
        raise ConfigurationError(f"audit key in {path} is shorter than {_MIN_KEY_BYTES} bytes")
    return key


# -- verification -------------------------------------------------------------------------
@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    records: int
    #: "FILE:LINE: what is wrong", in file and line order
    problems: list[str] = field(default_factory=list)
    first_seq: int | None = None
    last_seq: int | None = None
    #: hash of the last record (compare with an anchored :attr:`AuditLog.head`)
    head: str | None = None

    def verdict(self) -> str:
        """One line: ``OK: ...`` or ``FAIL: ...`` with the first problems."""
        if self.ok:
            if not self.records:
                return "OK: no records"
            span = f"seq {self.first_seq}..{self.last_seq}"
            start = "" if self.first_seq == 0 else " (chain starts mid-way)"
            return f"OK: {self.records} records, {span}{start}, head {self.head}"
        shown = "; ".join(self.problems[:5])
        more = f"; ... and {len(self.problems) - 5} more" if len(self.problems) > 5 else ""
        line = f"FAIL: {len(self.problems)} problem(s) in {self.records} records: {shown}{more}"
        return line.replace("\r", "\\r").replace("\n", "\\n")


def verify_chain(
    paths: Sequence[str | os.PathLike[str]],
    *,
    key: bytes | None = None,
    from_genesis: bool = True,
    expect_head: str | None = None,
) -> VerifyResult:
    """Check one chain spread over ``paths``, oldest first (``log.2, log.1, log``).

    Every record must carry the hash of its contents (edited or forged records fail, and
    so does every record under a wrong key) and follow the one before it (``seq`` + 1,
    ``prev`` = its hash: a gap is a deletion, a step back a reordering or duplicate, a
    matching seq with a wrong ``prev`` a replacement).  A damaged line is reported as
    truncated (no newline at the end of the file) or corrupt; each ``chain_break`` the
    writer recorded is reported with its reason.  ``from_genesis=False`` accepts a chain
    whose oldest available record is not the first (older rotated files were deleted).
    ``expect_head``: a hash anchored earlier must appear, else the tail was cut.
    """
    problems: list[tuple[int, int, str]] = []
    hash_failures: list[tuple[int, int, str]] = []
    plain_ok = 0
    records = 0
    first_seq: int | None = None
    last: tuple[int, str] | None = None
    head_found = expect_head is None
    for fi, p in enumerate(paths):
        name = os.fspath(p)
        try:
            data = Path(p).read_bytes()
        except OSError as exc:
            problems.append((fi, 0, f"{name}: cannot read: {exc.strerror or exc}"))
            continue
        lines = data.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with a newline
        numbered = [(n, raw, False) for n, raw in enumerate(lines, 1)]
        if tail:
            numbered.append((len(lines) + 1, tail, True))
        for lineno, raw, unterminated in numbered:
            where = f"{name}:{lineno}"
            rec = _parse(raw)
            if rec is None:
                if unterminated:
                    what = "last line" if fi == len(paths) - 1 else "line (file ends mid-record)"
                    problems.append((fi, lineno, f"{where}: truncated {what}, {len(raw)} bytes"))
                else:
                    problems.append((fi, lineno, f"{where}: corrupt line, not an audit record"))
                continue
            records += 1
            seq: int = rec["seq"]
            prev: str = rec["prev"]
            digest: str = rec["hash"]
            if not _hash_ok(rec, key):
                hash_failures.append((fi, lineno, where))
                if key is not None and _hash_ok(rec, None):
                    plain_ok += 1
            if digest == expect_head:
                head_found = True
            if first_seq is None:
                first_seq = seq
            if rec["event"] == CHAIN_BREAK and prev == GENESIS:
                problems.append(
                    (fi, lineno, f"{where}: chain break recorded: {rec.get('problem')}")
                )
            elif last is None:
                if from_genesis and (seq != 0 or prev != GENESIS):
                    problems.append(
                        (
                            fi,
                            lineno,
                            f"{where}: chain starts at seq {seq}, not at the genesis: earlier "
                            "records deleted (give all rotated files, oldest first)",
                        )
                    )
            elif seq == last[0] + 1 and prev == last[1]:
                pass
            elif seq <= last[0]:
                problems.append(
                    (
                        fi,
                        lineno,
                        f"{where}: seq {seq} after seq {last[0]}: records reordered or duplicated",
                    )
                )
                continue  # keep following the chain from the record before
            elif seq > last[0] + 1:
                missing = seq - last[0] - 1
                problems.append(
                    (
                        fi,
                        lineno,
                        f"{where}: seq jumps from {last[0]} to {seq}: {missing} "
                        "record(s) deleted or moved",
                    )
                )
            else:
                problems.append(
                    (
                        fi,
                        lineno,
                        f"{where}: prev is not the hash of seq {last[0]}: record "
                        "replaced or inserted",
                    )
                )
            last = (seq, digest)

    if hash_failures and len(hash_failures) == records:
        span = hash_failures[0][2]
        if len(hash_failures) > 1:
            span += f" to {hash_failures[-1][2]}"
        if key is not None and plain_ok == records:
            why = "wrong key: the log is not keyed (all verify without a key)"
        elif key is not None:
            why = "wrong key (or every record edited)"
        else:
            why = "the log is keyed (give its key) or every record was edited"
        fi, lineno, _ = hash_failures[0]
        problems.append((fi, lineno, f"{span}: no record's hash verifies: {why}"))
    else:
        for fi, lineno, where in hash_failures:
            problems.append(
                (fi, lineno, f"{where}: hash does not match the contents: record edited or forged")
            )
    if not head_found:
        problems.append(
            (len(paths), 0, f"expected head {expect_head} not found: newest records deleted")
        )
    problems.sort(key=lambda item: (item[0], item[1]))
    return VerifyResult(
        ok=not problems,
        records=records,
        problems=[text for _, _, text in problems],
        first_seq=first_seq,
        last_seq=last[0] if last is not None else None,
        head=last[1] if last is not None else None,
    )
