"""Architecture rules: the core is sans-IO and imports point one way."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "structauth"

# Modules that do IO, keep time or run event loops; the core must not import them.
BANNED = {
    "socket",
    "ssl",
    "asyncio",
    "selectors",
    "select",
    "threading",
    "multiprocessing",
    "subprocess",
    "time",
    "urllib",
    "http",
    "logging",
    "paho",
    "aiocoap",
    "bleak",
    "bumble",
    "tpm2_pytss",
    "pkcs11",
    "sqlite3",
}
# Calls that read a clock.
CLOCK_CALLS = {"now", "utcnow", "today", "time", "monotonic", "perf_counter"}
OURS = {"hw", "device", "broker_plugin", "provisioning", "simulator", "tests", "bench"}


def core_files() -> list[Path]:
    return sorted(CORE.glob("*.py"))


def test_core_imports_no_io_module() -> None:
    for path in core_files():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                assert top not in BANNED, f"{path.name} imports {name}"
                assert top not in OURS, (
                    f"{path.name} imports {name}: the core imports nothing of ours"
                )


def test_core_reads_no_clock() -> None:
    for path in core_files():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                assert node.func.attr not in CLOCK_CALLS, (
                    f"{path.name}:{node.lineno} calls .{node.func.attr}(): time must come in "
                    "as a value"
                )


def test_core_pulls_in_no_io_module_at_runtime() -> None:
    code = (
        "import sys, json, importlib, pkgutil, structauth\n"
        "for m in pkgutil.iter_modules(structauth.__path__):\n"
        "    importlib.import_module('structauth.' + m.name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    loaded = {m.split(".")[0] for m in json.loads(out)}
    forbidden = {
        "asyncio",
        "paho",
        "aiocoap",
        "bleak",
        "bumble",
        "tpm2_pytss",
        "pkcs11",
        "sqlite3",
    } | (OURS - {"structauth"})
    assert not loaded & forbidden, loaded & forbidden


def test_import_direction() -> None:
    """structauth <- hw <- device/broker_plugin <- provisioning <- simulator (import-linter)."""
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe, "import-linter is not installed in the venv; run ./run setup"
    result = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
