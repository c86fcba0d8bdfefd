"""Architecture rules: the core is sans-IO, imports point one way (import-linter's
contracts in pyproject.toml: layers, and no role imports another role), the import
graph has no cycle, no package imports another package's private names, and every
package ships ``py.typed``."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

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
    """structauth <- hw <- device | broker_plugin | provisioning <- simulator <- bench, and
    no role imports another (import-linter)."""
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe, "import-linter is not installed in the venv; run ./run setup"
    result = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


#: what the wheel installs, and bench (it ships with the repository, not the wheel)
PACKAGES = ("structauth", "hw", "device", "broker_plugin", "provisioning", "simulator")
CHECKED = (*PACKAGES, "bench")
#: known, reported and owned by someone else: (file, module, name). Delete an entry once
#: it is fixed (the test then keeps it fixed).
PENDING_PRIVATE: set[tuple[str, str, str]] = set()


def cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), and the
    modules that import themselves."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(root: str) -> None:  # iterative: the graph may be deep
        nonlocal counter
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append(
                        (child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1 or node in graph.find_modules_directly_imported_by(
                            node):
                        found.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


#: known, reported and owned by someone else. Delete an entry once it is fixed.
PENDING_CYCLES: list[list[str]] = []


def test_the_import_graph_has_no_cycle() -> None:
    """Imports under TYPE_CHECKING count too (they are a cycle for a reader and for
    the type checker): events <-> session was one."""
    graph = grimp.build_graph(*CHECKED, include_external_packages=False)
    assert [c for c in cycles(graph) if c not in PENDING_CYCLES] == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    """The check above can fail: a graph with a two-module cycle is reported."""
    graph = grimp.ImportGraph()
    for name in ("a", "a.x", "a.y", "a.z"):
        graph.add_module(name)
    graph.add_import(importer="a.x", imported="a.y")
    graph.add_import(importer="a.y", imported="a.x")
    graph.add_import(importer="a.z", imported="a.x")
    assert cycles(graph) == [["a.x", "a.y"]]


def private_imports(root: Path = ROOT) -> set[tuple[str, str, str]]:
    """``from other_package.module import _name`` (or a private module of another
    package) anywhere in the checked packages: (file, module, name)."""
    found = set()
    for package in CHECKED:
        for path in sorted((root / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if not isinstance(node, ast.ImportFrom) or node.level or not node.module:
                    continue
                parts = node.module.split(".")
                if parts[0] not in CHECKED or parts[0] == package:
                    continue
                private_module = any(p.startswith("_") and not p.startswith("__")
                                     for p in parts[1:])
                for alias in node.names:
                    if private_module or alias.name.startswith("_"):
                        found.add((str(path.relative_to(root)), node.module, alias.name))
    return found


def test_no_package_imports_another_packages_private_names() -> None:
    assert private_imports() - PENDING_PRIVATE == set()


def test_the_private_import_scan_sees_one(tmp_path: Path) -> None:
    (tmp_path / "device").mkdir()
    (tmp_path / "device" / "x.py").write_text(
        "from broker_plugin.host import _SETTINGS\nfrom device.mqtt import _AuthClient\n")
    for package in CHECKED:
        (tmp_path / package).mkdir(exist_ok=True)
    assert private_imports(tmp_path) == {("device/x.py", "broker_plugin.host", "_SETTINGS")}


@pytest.mark.parametrize("package", PACKAGES)
def test_every_package_ships_py_typed(package: str) -> None:
    assert (ROOT / package / "py.typed").is_file()
