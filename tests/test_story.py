"""The README's main command end to end: `tessera-sim demo` (and its protocol-only
variant) exit 0 with every genuine step verified and every attack refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.broker, pytest.mark.hardware]
SIM = str(Path(sys.executable).parent / "tessera-sim")


def test_the_whole_story(tmp_path: Path) -> None:
    done = subprocess.run([SIM, "demo", "--workdir", str(tmp_path)], capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "all as expected" in out
    for line in ("forged message (tag altered)                 refused    bad_tag",
                 "replayed message                             refused    replayed",
                 "pi-0001 publishing as pi-0002                refused    not_authorized",
                 "revoked pi-0003: reconnect                   refused    credential_revoked"):
        assert line in out, out
    assert out.count("verified") >= 4 and "must never happen" not in out


def test_protocol_only_demo() -> None:
    done = subprocess.run([SIM, "demo", "--protocol-only"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "replayed handshake" in done.stdout
