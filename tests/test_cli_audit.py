"""`tessera audit verify`: the broker audit log's hash chain, from the operator CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from broker_plugin.audit import AuditLog
from provisioning.cli import main


def _log(path: Path, n: int = 5) -> None:
    with AuditLog(path) as log:
        for i in range(n):
            log.record("handshake_ok", session=bytes([i]) * 8, client_id=f"pi-{i}")


def test_an_intact_log_verifies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _log(tmp_path / "audit.jsonl")
    assert main(["audit", "verify", str(tmp_path / "audit.jsonl")]) == 0
    assert capsys.readouterr().out.startswith("OK: 5 records")
    assert main(["--json", "audit", "verify", str(tmp_path / "audit.jsonl")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True and report["records"] == 5 and report["last_seq"] == 4


@pytest.mark.parametrize("damage", ["alter", "delete", "truncate"])
def test_tampering_is_one_line_and_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          damage: str) -> None:
    path = tmp_path / "audit.jsonl"
    _log(path)
    lines = path.read_text().splitlines(keepends=True)
    if damage == "alter":
        lines[2] = lines[2].replace("pi-2", "pi-X")
    elif damage == "delete":
        del lines[2]
    else:
        lines[-1] = lines[-1][: len(lines[-1]) // 2]
    path.write_text("".join(lines))
    before = path.read_bytes()
    assert main(["audit", "verify", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tessera: error:")
    assert "audit.jsonl:" in err[0]  # names where
    assert path.read_bytes() == before  # verifying changes nothing
