"""Audit log: format, hash chain, tamper detection, restart, rotation, async writer, CLI."""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import os
import subprocess
import sys
import threading
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from broker_plugin.audit import (
    AUDIT_OVERFLOW,
    CHAIN_BREAK,
    EVENTS,
    GENESIS,
    HANDSHAKE_OK,
    HANDSHAKE_REFUSED,
    MESSAGE_REJECTED,
    REFUSALS_AGGREGATED,
    WILL_REFUSED,
    AsyncAuditWriter,
    AuditLog,
    RefusalAggregation,
    canonical,
    load_key,
    main,
    source_of,
    verify_chain,
)
from structauth.errors import ConfigurationError, Reason, StateError
from tests.support import wait_for

KEY = bytes(range(32))
T0 = 1_700_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in path.read_bytes().split(b"\n") if raw]


def write_log(path: Path, n: int = 6, *, key: bytes | None = None) -> None:
    with AuditLog(path, key=key, clock=Clock()) as log:
        for i in range(n):
            log.record(
                MESSAGE_REJECTED,
                session=bytes([i]) * 8,
                identity="spiffe://t/device/d",
                reason=Reason.BAD_TAG,
                topic=f"devices/d/telemetry/{i}",
            )


def rehash(rec: dict[str, Any], key: bytes | None = None) -> bytes:
    """What an attacker who can write the file (but lacks the key) does after an edit."""
    body = canonical(rec)
    rec["hash"] = (hmac.new(key, body, hashlib.sha256) if key else hashlib.sha256(body)).hexdigest()
    return (json.dumps(rec, separators=(",", ":")) + "\n").encode()


# -- format ----------------------------------------------------------------------------------
def test_record_format_and_hash(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with AuditLog(path, clock=lambda: T0) as log:
        first = log.record(
            HANDSHAKE_OK,
            session=b"\x01\xab",
            identity="spiffe://t/device/d",
            reason=Reason.BAD_TAG,
            nonce=b"\x00\xff",
            note="two\nlines",
        )
        second = log.record("released")
    raw = lines(path)
    assert len(raw) == 2 and all(r.endswith(b"\n") for r in raw)
    rec = json.loads(raw[0])
    assert list(rec)[:5] == ["seq", "time", "event", "session", "identity"]
    assert list(rec)[-2:] == ["prev", "hash"]
    assert rec == first
    assert rec["seq"] == 0 and rec["prev"] == GENESIS
    assert rec["time"] == "2023-11-14T22:13:20.000000Z"
    assert rec["session"] == "01ab" and rec["reason"] == "bad_tag" and rec["nonce"] == "00ff"
    assert rec["note"] == "two\nlines"  # escaped in the line: no forged second record
    body = {k: v for k, v in rec.items() if k != "hash"}
    expected = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    assert canonical(rec) == expected
    assert rec["hash"] == hashlib.sha256(expected).hexdigest()
    assert second["seq"] == 1 and second["prev"] == rec["hash"] and second["session"] is None
    assert verify_chain([path]).ok


def test_hmac_chain_and_odd_values(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with AuditLog(path, key=KEY) as log:
        rec = log.record(
            "policy_reloaded",
            version=3,
            digest={"b": [1, 2.5], 7: None},
            bad="lone \udc80 surrogate",
            inf=float("inf"),
            tags={"x", "y"},
        )
        assert log.head == (0, rec["hash"])
    assert rec["hash"] == hmac.new(KEY, canonical(rec), hashlib.sha256).hexdigest()
    assert json.loads(lines(path)[0])["digest"] == {"b": [1, 2.5], "7": None}
    assert verify_chain([path], key=KEY).ok


def test_reserved_fields_and_bad_configuration(tmp_path: Path) -> None:
    with AuditLog(tmp_path / "a.log") as log:
        with pytest.raises(StateError) as err:
            log.record("x", seq=3)
        assert err.value.reason is Reason.BAD_PARAMETERS
    with pytest.raises(StateError):
        log.record("x")  # closed
    with pytest.raises(ConfigurationError):
        AuditLog(tmp_path / "b.log", key=b"short")
    with pytest.raises(ConfigurationError):
        AuditLog(tmp_path / "b.log", max_bytes=0)
    with pytest.raises(ConfigurationError):
        AuditLog(tmp_path / "missing-dir" / "c.log")
    assert CHAIN_BREAK in EVENTS and AUDIT_OVERFLOW in EVENTS and len(EVENTS) == 17


def test_second_writer_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with AuditLog(path), pytest.raises(ConfigurationError, match="another writer"):
        AuditLog(path)
    AuditLog(path).close()  # free again once the first is closed


# -- tamper detection --------------------------------------------------------------------------
def problems_after(path: Path, key: bytes | None = None, **kw: Any) -> list[str]:
    result = verify_chain([path], key=key, **kw)
    assert not result.ok
    return result.problems


def test_clean_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path)
    result = verify_chain([path])
    assert result.ok and result.records == 6 and result.problems == []
    assert (result.first_seq, result.last_seq) == (0, 5)
    assert result.head == records(path)[-1]["hash"]
    assert result.verdict().startswith("OK: 6 records, seq 0..5, head ")


def test_edited_field(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path)
    raw = lines(path)
    raw[2] = raw[2].replace(b"bad_tag", b"bad_tog")
    path.write_bytes(b"".join(raw))
    (problem,) = problems_after(path)
    assert problem.startswith(f"{path}:3: hash does not match")


def test_edited_field_with_recomputed_hash(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path)
    raw = lines(path)
    rec = json.loads(raw[2])
    rec["identity"] = "spiffe://t/device/innocent"
    raw[2] = rehash(rec)
    path.write_bytes(b"".join(raw))
    (problem,) = problems_after(path)
    assert problem.startswith(f"{path}:4: prev is not the hash of seq 2")


def test_deleted_record(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path)
    raw = lines(path)
    del raw[3]
    path.write_bytes(b"".join(raw))
    (problem,) = problems_after(path)
    assert problem == f"{path}:4: seq jumps from 2 to 4: 1 record(s) deleted or moved"


def test_deleted_first_record(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path)
    path.write_bytes(b"".join(lines(path)[1:]))
    (problem,) = problems_after(path)
    assert "starts at seq 1, not at the genesis" in problem
    assert verify_chain([path], from_genesis=False).ok


def test_reordered_records(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path)
    raw = lines(path)
    raw[2], raw[3] = raw[3], raw[2]
    path.write_bytes(b"".join(raw))
    problems = problems_after(path)
    assert problems == [
        f"{path}:3: seq jumps from 1 to 3: 1 record(s) deleted or moved",
        f"{path}:4: seq 2 after seq 3: records reordered or duplicated",
    ]


def test_duplicated_record(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path)
    raw = lines(path)
    raw.insert(3, raw[2])
    path.write_bytes(b"".join(raw))
    (problem,) = problems_after(path)
    assert problem == f"{path}:4: seq 2 after seq 2: records reordered or duplicated"


@pytest.mark.parametrize("cut", [2, 40])
def test_truncated_last_line(tmp_path: Path, cut: int) -> None:
    path = tmp_path / "audit.log"
    write_log(path)
    path.write_bytes(path.read_bytes()[:-cut])
    (problem,) = problems_after(path)
    assert problem.startswith(f"{path}:6: truncated last line")


def test_lost_newline_only_is_not_a_problem_for_a_whole_record(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path)
    path.write_bytes(path.read_bytes()[:-1])
    result = verify_chain([path])
    # JSON of the last record is complete: it verifies, and a reopen simply continues
    assert result.ok, result.problems


def test_forged_appended_record_fails_under_hmac(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path, key=KEY)
    last = records(path)[-1]
    forged = {
        "seq": last["seq"] + 1,
        "time": last["time"],
        "event": "released",
        "session": None,
        "identity": "spiffe://t/device/d",
        "by": "operator",
        "prev": last["hash"],
    }
    with path.open("ab") as f:
        f.write(rehash(forged))  # a perfect SHA-256 chain link, but no HMAC key
    (problem,) = problems_after(path, key=KEY)
    assert problem.startswith(f"{path}:7: hash does not match the contents")
    # without a key the same forgery would be a valid link: that is what the key is for
    with path.open("ab") as f:
        f.write(b'{"seq":8,"event":"x","prev":"00","hash":"11"}\n')
    assert any(p.startswith(f"{path}:8:") for p in problems_after(path, key=KEY))


def test_wrong_key(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path, key=KEY)
    (problem,) = problems_after(path, key=bytes(32))
    assert (
        problem == f"{path}:1 to {path}:6: no record's hash verifies: wrong key (or every "
        "record edited)"
    )
    (problem,) = problems_after(path)
    assert "the log is keyed" in problem
    plain = tmp_path / "plain.log"
    write_log(plain)
    (problem,) = problems_after(plain, key=KEY)
    assert "the log is not keyed" in problem


def test_expect_head_catches_a_cut_tail(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path)
    head = records(path)[-1]["hash"]
    path.write_bytes(b"".join(lines(path)[:-2]))
    assert verify_chain([path]).ok  # a shorter chain is still a chain ...
    (problem,) = problems_after(path, expect_head=head)  # ... unless the head was anchored
    assert "newest records deleted" in problem
    assert not verify_chain([path], expect_head=head).ok


def test_corrupt_line_in_the_middle(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path)
    raw = lines(path)
    raw[1] = b"garbage\n"
    path.write_bytes(b"".join(raw))
    problems = problems_after(path)
    assert problems[0] == f"{path}:2: corrupt line, not an audit record"
    assert "seq jumps from 0 to 2" in problems[1]


# -- restart and recovery -----------------------------------------------------------------------
def test_restart_continues_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path, 3, key=KEY)
    before = records(path)[-1]
    with AuditLog(path, key=KEY) as log:
        assert log.head == (2, before["hash"])
        rec = log.record("released", by="operator")
        assert log.chain_breaks == 0
    assert rec["seq"] == 3 and rec["prev"] == before["hash"]
    result = verify_chain([path], key=KEY)
    assert result.ok and result.records == 4


def test_restart_after_a_lost_newline_terminates_the_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path, 3)
    path.write_bytes(path.read_bytes()[:-1])
    with AuditLog(path) as log:
        log.record("released")
        assert log.chain_breaks == 0
    assert verify_chain([path]).ok and len(lines(path)) == 4


def test_restart_after_truncation_writes_a_chain_break(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path, 4, key=KEY)
    good = records(path)
    damaged = path.read_bytes()[:-30]
    path.write_bytes(damaged)
    with AuditLog(path, key=KEY, clock=Clock()) as log:
        assert log.chain_breaks == 1
        log.record("released")
    data = path.read_bytes()
    assert data.startswith(damaged + b"\n")  # history is kept, only the line terminated
    recs = [json.loads(raw) for raw in data.split(b"\n")[4:] if raw]
    brk, after = recs
    assert brk["event"] == CHAIN_BREAK and brk["prev"] == GENESIS
    assert brk["problem"].startswith("last line truncated")
    assert brk["after_seq"] == 2 and brk["seq"] == 3
    assert brk["after_hash"] == good[2]["hash"]
    assert after["seq"] == 4 and after["prev"] == brk["hash"]
    problems = problems_after(path, key=KEY)
    assert problems == [
        f"{path}:4: corrupt line, not an audit record",
        f"{path}:5: chain break recorded: {brk['problem']}",
    ]


def test_restart_with_another_key_writes_a_chain_break(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path, 2, key=KEY)
    with AuditLog(path, key=bytes(32)) as log:
        assert log.chain_breaks == 1
        assert log.head[1] != GENESIS
    brk = records(path)[-1]
    assert brk["event"] == CHAIN_BREAK and "fails its hash check" in brk["problem"]
    assert brk["after_seq"] is None and brk["seq"] == 0


def test_failed_write_is_recovered_on_the_next_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    log.record("released")
    real_write = os.write

    def half_then_enospc(fd: int, data: Any) -> int:
        real_write(fd, bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_enospc)
    with pytest.raises(OSError):
        log.record("quarantined", failures=5)
    monkeypatch.setattr(os, "write", real_write)
    rec = log.record("quarantined", failures=5)
    log.close()
    assert rec["seq"] == 2 and log.chain_breaks == 1
    problems = problems_after(path)
    assert problems[0] == f"{path}:2: corrupt line, not an audit record"
    assert "chain break recorded: last line truncated" in problems[1]


# -- rotation -------------------------------------------------------------------------------------
def test_rotation_chains_across_files(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with AuditLog(path, key=KEY, max_bytes=1000, keep=10) as log:
        for i in range(20):
            log.record(MESSAGE_REJECTED, reason=Reason.REPLAYED, n=i)
    files = [*sorted(tmp_path.glob("audit.log.*"), key=lambda p: -int(p.suffix[1:])), path]
    assert len(files) > 3
    assert all(f.stat().st_size <= 1000 for f in files)
    for older, newer in pairwise(files):
        assert records(newer)[0]["prev"] == records(older)[-1]["hash"]
        assert records(newer)[0]["seq"] == records(older)[-1]["seq"] + 1
    result = verify_chain(files, key=KEY)
    assert result.ok and result.records == 20
    # newest first is the wrong order and says so
    assert not verify_chain(list(reversed(files)), key=KEY).ok


def test_rotation_keeps_n_files_and_partial_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with AuditLog(path, max_bytes=600, keep=2) as log:
        for i in range(20):
            log.record("released", n=i)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.log", "audit.log.1", "audit.log.2"]
    files = [tmp_path / "audit.log.2", tmp_path / "audit.log.1", path]
    result = verify_chain(files)
    assert not result.ok and "not at the genesis" in result.problems[0]
    partial = verify_chain(files, from_genesis=False)
    assert partial.ok and partial.last_seq == 19 and partial.first_seq is not None
    assert partial.verdict().endswith(f"(chain starts mid-way), head {partial.head}")


def test_restart_right_after_rotation_continues_from_the_rotated_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with AuditLog(path, max_bytes=10_000) as log:
        log.record("released")
        log.rotate()
    assert path.stat().st_size == 0
    with AuditLog(path, max_bytes=10_000) as log:
        rec = log.record("released")
    assert rec["seq"] == 1
    assert verify_chain([tmp_path / "audit.log.1", path]).ok


# -- asynchronous writer ---------------------------------------------------------------------------
def test_async_writer_writes_in_order_and_close_drains(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    writer = AsyncAuditWriter(AuditLog(path))
    for i in range(200):
        assert writer.submit(MESSAGE_REJECTED, session=b"\x07" * 8, reason=Reason.BAD_TAG, n=i)
    writer.close()
    recs = records(path)
    assert [r["n"] for r in recs] == list(range(200))
    assert recs[0]["session"] == "07" * 8
    assert verify_chain([path]).ok
    assert not writer.submit("late")  # after close: counted, not written
    assert writer.dropped_total == 1


def test_overflow_is_recorded_with_the_count(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    writer = AsyncAuditWriter(AuditLog(path, clock=Clock()), maxsize=2, start=False)
    assert writer.submit("a") and writer.submit("b")
    assert not writer.submit(MESSAGE_REJECTED)
    assert not writer.submit(MESSAGE_REJECTED)
    assert not writer.submit("c")
    assert writer.pending == 2 and writer.dropped_total == 3
    writer.start()
    assert writer.drain(5)
    assert writer.submit("d")
    writer.close()
    recs = records(path)
    assert [r["event"] for r in recs] == ["a", "b", AUDIT_OVERFLOW, "d"]
    overflow = recs[2]
    assert overflow["dropped"] == 3 and overflow["failed"] == 0
    assert overflow["events"] == {MESSAGE_REJECTED: 2, "c": 1}
    assert overflow["since"] == "2023-11-14T22:13:23.000000Z"  # time of the first drop
    assert verify_chain([path]).ok


class PausingLog(AuditLog):
    """Blocks its first record until released: a writer stuck on a slow disk."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.entered = threading.Event()
        self.release = threading.Event()

    def record(self, event: str, /, **kw: Any) -> dict[str, Any]:
        if not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(5)
        return super().record(event, **kw)


def test_overflow_while_the_writer_is_busy(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = PausingLog(path)
    writer = AsyncAuditWriter(log, maxsize=2)
    assert writer.submit("first")
    assert log.entered.wait(5)  # the writer took "first" and is stuck writing it
    assert writer.submit("second") and writer.submit("third")
    assert not writer.submit("lost-1") and not writer.submit("lost-2")
    log.release.set()
    assert writer.drain(5)
    assert writer.submit("after")
    writer.close()
    events = [r["event"] for r in records(path)]
    assert events == ["first", "second", "third", AUDIT_OVERFLOW, "after"]
    assert records(path)[3]["dropped"] == 2


def test_failed_records_are_counted(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    writer = AsyncAuditWriter(AuditLog(path))
    writer.submit("ok-1")
    writer.submit("bad", seq=99)  # reserved field: the log refuses it on the writer thread
    writer.submit("ok-2")
    writer.close()
    recs = records(path)
    assert [r["event"] for r in recs] == ["ok-1", "ok-2", AUDIT_OVERFLOW]
    assert recs[2]["failed"] == 1 and recs[2]["dropped"] == 0
    assert isinstance(writer.last_error, StateError)


def test_concurrent_submitters(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    writer = AsyncAuditWriter(AuditLog(path, key=KEY), maxsize=100_000)
    threads, per_thread = 4, 500
    start = threading.Barrier(threads)

    def run(t: int) -> None:
        start.wait()
        for i in range(per_thread):
            assert writer.submit(MESSAGE_REJECTED, identity=f"spiffe://t/device/{t}", n=i)

    workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    writer.close()
    recs = records(path)
    assert len(recs) == threads * per_thread and writer.dropped_total == 0
    for t in range(threads):
        mine = [r["n"] for r in recs if r["identity"] == f"spiffe://t/device/{t}"]
        assert mine == list(range(per_thread))  # each thread's order is kept
    assert verify_chain([path], key=KEY).ok


def test_concurrent_submitters_with_overflow_lose_no_count(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    writer = AsyncAuditWriter(AuditLog(path), maxsize=8)
    accepted = [0] * 4

    def run(t: int) -> None:
        for i in range(400):
            accepted[t] += writer.submit("released", n=i)

    workers = [threading.Thread(target=run, args=(t,)) for t in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    writer.close()
    recs = records(path)
    written = [r for r in recs if r["event"] == "released"]
    reported = sum(r["dropped"] for r in recs if r["event"] == AUDIT_OVERFLOW)
    assert len(written) == sum(accepted)
    assert len(written) + reported == 1600 == sum(accepted) + writer.dropped_total
    assert verify_chain([path]).ok


# -- command line -------------------------------------------------------------------------------
def test_cli_exit_codes_and_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "audit.log"
    write_log(path, key=KEY)
    key_file = tmp_path / "audit.key"
    key_file.write_text(KEY.hex() + "\n")
    assert load_key(key_file) == KEY

    assert main(["verify", str(path), "--key-file", str(key_file)]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("OK: 6 records, seq 0..5, head ")

    assert main(["verify", str(path)]) == 1
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("FAIL: 1 problem(s) in 6 records: ")

    raw = lines(path)
    for i in (0, 1, 2, 3, 4):
        raw[i] = raw[i].replace(b"bad_tag", b"bad_tig")
    del raw[3]
    path.write_bytes(b"".join(raw) + b'{"seq":')
    assert main(["verify", str(path), "--key-file", str(key_file)]) == 1
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "... and 1 more" in out and "FAIL: 6 problem(s)" in out

    assert main(["verify", str(tmp_path / "nope.log")]) == 1
    assert "cannot read" in capsys.readouterr().out

    key_file.write_text("not hex")
    assert main(["verify", str(path), "--key-file", str(key_file)]) == 2
    assert capsys.readouterr().out.startswith("ERROR: ")
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2


def test_cli_as_a_module(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path, 2)
    run = subprocess.run(
        [sys.executable, "-m", "broker_plugin.audit", "verify", str(path)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        check=False,
    )
    assert run.returncode == 0 and run.stdout.startswith("OK: 2 records")
    path.write_bytes(path.read_bytes()[:-5])
    run = subprocess.run(
        [sys.executable, "-m", "broker_plugin.audit", "verify", str(path)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        check=False,
    )
    assert run.returncode == 1 and run.stdout.startswith("FAIL: 1 problem(s)")
    assert run.stdout.count("\n") == 1


# -- aggregation of unauthenticated refusals ---------------------------------------------------
class StillClock:
    """A wall clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def refused(writer: AsyncAuditWriter, address: str = "127.0.0.9", reason: str = "malformed",
            **extra: Any) -> bool:
    return writer.submit(HANDSHAKE_REFUSED, client_id="spiffe://x/device/who", address=address,
                         reason=reason, detail="no SA1 msg1", **extra)


def test_a_refusal_flood_from_one_source_writes_two_records(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    writer = AsyncAuditWriter(AuditLog(path))
    for _ in range(5000):
        assert refused(writer)
    assert writer.flush_refusals(5)
    writer.close()
    recs = records(path)
    assert [r["event"] for r in recs] == [HANDSHAKE_REFUSED, REFUSALS_AGGREGATED]
    first, summary = recs
    assert first["address"] == "127.0.0.9" and first["detail"] == "no SA1 msg1"
    assert summary["refused_event"] == HANDSHAKE_REFUSED and summary["reason"] == "malformed"
    assert summary["source"] == "127.0.0.9" and summary["count"] == 4999
    assert summary["first"] <= summary["last"] and summary["interval_s"] == 10.0
    assert summary["client_id"] == "spiffe://x/device/who"
    assert path.stat().st_size < 2000
    assert verify_chain([path]).ok
    assert writer.aggregate is not None and writer.aggregate.offered_total == 5000


def test_each_window_gets_its_own_records_and_the_writer_ends_it_alone(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    clock = StillClock()
    writer = AsyncAuditWriter(AuditLog(path, clock=clock),
                              aggregate=RefusalAggregation(interval_s=0.2))
    for _ in range(3):
        refused(writer)
    clock.now += 1.0  # past the window: the writer thread writes it without being asked
    wait_for(lambda: any(r["event"] == REFUSALS_AGGREGATED for r in records(path)),
             what="the window's summary")
    refused(writer)  # a new window: written in full again
    refused(writer, reason="bad_confirmation")  # another reason: its own entry
    writer.close()  # close ends the last window
    recs = records(path)
    assert [(r["event"], r.get("reason"), r.get("count")) for r in recs] == [
        (HANDSHAKE_REFUSED, "malformed", None),
        (REFUSALS_AGGREGATED, "malformed", 2),
        (HANDSHAKE_REFUSED, "malformed", None),
        (HANDSHAKE_REFUSED, "bad_confirmation", None),
    ]
    assert recs[1]["first"] == recs[1]["last"] == "2023-11-14T22:13:20.000000Z"
    assert verify_chain([path]).ok


def test_confirmed_session_events_are_never_aggregated(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    writer = AsyncAuditWriter(AuditLog(path))
    for _ in range(3):
        refused(writer, reauth=True)  # a refused re-authentication on a live connection
        writer.submit(WILL_REFUSED, client_id="c", address=None, reason="not_authorized",
                      confirmed=True)
        writer.submit(HANDSHAKE_REFUSED, session=b"\x01" * 8, reason="x", address="a")
        writer.submit(MESSAGE_REJECTED, session=b"\x01" * 8, reason="bad_tag")
    for _ in range(3):  # an unconfirmed connection's Will is an outsider's
        writer.submit(WILL_REFUSED, client_id="c", reason="unconfirmed", confirmed=False)
    writer.close()
    events = [r["event"] for r in records(path)]
    assert events.count(HANDSHAKE_REFUSED) == 6 and events.count(MESSAGE_REJECTED) == 3
    assert events.count(WILL_REFUSED) == 4  # 3 confirmed + the first unconfirmed one
    [summary] = [r for r in records(path) if r["event"] == REFUSALS_AGGREGATED]
    assert summary["refused_event"] == WILL_REFUSED and summary["count"] == 2
    assert summary["source"] == "?"  # a Will check knows no address


def test_the_table_is_bounded_per_source_and_in_total() -> None:
    agg = RefusalAggregation(per_source=2, sources=3, immediate=4)
    written = [agg.offer(HANDSHAKE_REFUSED, {"reason": f"r{i}", "address": "10.0.0.1"}, T0)
               for i in range(5)]
    assert written == [True, True, True, False, False]  # r0, r1, then "other" for the rest
    for n in range(2, 40):  # the table is full (3 entries): other sources go to "*"
        agg.offer(HANDSHAKE_REFUSED, {"reason": "malformed", "address": f"10.0.0.{n}"}, T0)
    for i in range(10):  # many reasons from many sources: "*" entries are bounded too
        agg.offer(HANDSHAKE_REFUSED, {"reason": f"x{i}", "address": f"10.1.0.{i}"}, T0 + 1)
    assert len(agg) <= 2 * 3 + 1
    assert agg.written_total == 4  # the immediate budget
    out: dict[tuple[object, object], int] = {
        (f["reason"], f["source"]): int(str(f["count"])) for f, _ in agg.take()}
    assert out[("other", "10.0.0.1")] == 2
    assert out[("malformed", "*")] == 38 - 1  # the first one was written in full
    assert sum(out.values()) + 4 == 5 + 38 + 10  # every refusal counted once
    assert len(agg) == 0 and agg.deadline is None


def test_sources_are_addresses_and_ipv6_64s() -> None:
    assert source_of("127.0.0.5") == "127.0.0.5"
    assert source_of("127.0.0.5:5683") == "127.0.0.5"
    assert source_of("::ffff:10.1.2.3") == "10.1.2.3"
    assert source_of("2001:db8:1:2:aaaa::1") == source_of("[2001:db8:1:2::ffff]:5683")
    assert source_of("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert source_of(None) == "?"
    assert source_of("x" * 1000) == "x" * 64
