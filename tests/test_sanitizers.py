"""The C shim and the fast lane under AddressSanitizer and UndefinedBehaviorSanitizer.

A bounded set runs in CI: the fast lane's differential tests (the extension loaded into
a Python with the sanitizer runtimes preloaded) and the broker tests against a real
Mosquitto that loads the sanitized plugin. Every sanitizer report is a file in one
directory; the test asserts there are none, and that the inner run passed.
``TESSERA_SANITIZE_TESTS`` overrides the inner selection (e.g. the whole broker suite
outside CI).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from broker_plugin.build import BuildError, sanitizer_env

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SELECTION = ["tests/test_fastlane.py", "tests/test_broker_mqtt.py"]


def test_shim_and_fast_lane_run_clean_under_asan_and_ubsan(tmp_path: Path) -> None:
    try:
        env = sanitizer_env(tmp_path / "reports")
    except BuildError as exc:
        pytest.skip(exc.detail)
    selection = os.environ.get("TESSERA_SANITIZE_TESTS", "").split() or DEFAULT_SELECTION
    env = {**os.environ, **env, "TESSERA_SANITIZE": "1",
           "TESSERA_SANITIZER_REPORTS": str(tmp_path / "reports"),
           "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         *selection],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    reports = sorted((tmp_path / "reports").glob("*"))
    text = "\n".join(p.read_text(errors="replace")[:4000] for p in reports)
    assert not reports, f"sanitizer reports:\n{text}"
    assert done.returncode == 0, (done.stdout[-4000:], done.stderr[-2000:])
    assert " passed" in done.stdout
