"""`tessera serve --log-level / --log-format json` (issue 14 point 3): a long-running
process logs one JSON object per line on stderr (uvicorn's own loggers included), says
"serving" only once bound (with --json as a JSON event), and stops on SIGTERM with 0.
A wrong level is one line, exit 1, nothing served."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from simulator.provisioner import free_port

TESSERA = str(Path(sys.executable).parent / "tessera")


def authority(tmp_path: Path) -> Path:
    directory = tmp_path / "auth"
    done = subprocess.run([TESSERA, "--json", "init", "--dir", str(directory),
                           "--trust-domain", "log.test", "--insecure-file-key"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return directory


def test_serve_logs_json_and_announces_once_bound(tmp_path: Path) -> None:
    directory = authority(tmp_path)
    port = free_port()
    proc = subprocess.Popen([TESSERA, "serve", "--dir", str(directory), "--port", str(port),
                             "--log-format", "json", "--log-level", "debug", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        event = json.loads(proc.stdout.readline())
        assert event == {"event": "serving", "trust_domain": "log.test",
                         "url": f"http://127.0.0.1:{port}"}
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            assert json.load(r)["trust_domain"] == "log.test"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    records = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert records, "no log records"
    for record in records:
        assert set(record) >= {"ts", "level", "logger", "message"}, record
    assert any(r["logger"] == "tessera.provisioning" and "serving log.test" in r["message"]
               for r in records), records
    assert any(r["logger"].startswith("uvicorn") for r in records), records  # handed over


def test_bad_log_level_is_one_line(tmp_path: Path) -> None:
    directory = authority(tmp_path)
    done = subprocess.run([TESSERA, "serve", "--dir", str(directory), "--port",
                           str(free_port()), "--log-level", "loud"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "serving" not in done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--log-level" in lines[0] and "'loud'" in lines[0], done.stderr
