"""Each role's extra installs what that role imports and nothing else.

The project is built into a wheel, every dependency into a local wheelhouse (once, kept
in .venv/wheelhouse), and each extra is installed into a fresh venv outside the checkout
with ``--no-index``: its entry points must import and run, and the other roles' stacks
must be absent. A fresh venv per extra is the only honest check — the development venv
has everything, so an import that needs another role's package would pass there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WHEELHOUSE = ROOT / ".venv" / "wheelhouse"
ALL_EXTRAS = "device-tpm,device-pkcs11,coap,broker,provisioning,ble"

# the top-level import names of each role's third-party stack
STACKS = {
    "tpm": "tpm2_pytss",
    "pkcs11": "pkcs11",
    "mqtt": "paho",
    "coap": "aiocoap",
    "service": "starlette",
    "schema": "pydantic",
    "postgres": "psycopg",
    "metrics": "prometheus_client",
    "ble": "bleak",
    "radio": "bumble",
}

# extra -> (modules that must import, stacks that must be absent, commands that must run)
ROLES: dict[str, tuple[list[str], list[str], list[list[str]]]] = {
    "": (
        ["structauth.handshake", "structauth.session", "structauth.fanout", "hw.software"],
        list(STACKS),
        [],
    ),
    "device-tpm": (
        ["device.agent", "device.cli", "device.mqtt", "hw.tpm"],
        ["pkcs11", "coap", "service", "schema", "postgres", "metrics", "ble", "radio"],
        [["tessera-agent", "--help"], ["tessera-agent", "ble-enroll", "--help"],
         ["tessera-agent", "ble-sa1-serve", "--help"]],
    ),
    "device-pkcs11": (
        ["device.agent", "device.cli", "device.mqtt", "hw.pkcs11"],
        ["tpm", "coap", "service", "schema", "postgres", "metrics", "ble", "radio"],
        [["tessera-agent", "--help"]],
    ),
    "coap": (
        ["device.coap"],
        ["tpm", "pkcs11", "mqtt", "service", "schema", "postgres", "ble", "radio"],
        [],
    ),
    "broker": (
        ["broker_plugin.host", "broker_plugin.metrics", "broker_plugin.nonce_store",
         "broker_plugin.build", "hw.pkcs11"],
        ["tpm", "mqtt", "coap", "service", "schema", "ble", "radio"],
        [],
    ),
    # the CoAP gateway beside the broker
    "broker,coap": (
        ["broker_plugin.coap.site", "broker_plugin.coap.transport"],
        ["tpm", "mqtt", "service", "schema", "ble", "radio"],
        [],
    ),
    "provisioning": (
        ["provisioning.cli", "provisioning.service", "provisioning.registry",
         "provisioning.attestation", "hw.tpm", "hw.pkcs11"],
        ["mqtt", "coap", "metrics", "ble", "radio"],
        [["tessera", "--help"]],
    ),
    # a device enrolled and talking over Bluetooth LE (the peripheral side)
    "device-tpm,ble": (
        ["device.ble_peripheral", "device.ble_enrollment", "device.ble_session",
         "structauth.gatt", "structauth.gatt_session"],
        ["pkcs11", "coap", "service", "schema", "postgres", "metrics"],
        [["tessera-agent", "--help"]],
    ),
    # the factory station enrolling over BLE
    "provisioning,ble": (
        ["provisioning.ble_cli", "provisioning.ble_station"],
        ["mqtt", "coap", "metrics"],
        [["tessera", "enroll", "--help"]],
    ),
}


def _run(*cmd: str | Path, cwd: Path | None = None, timeout: float = 900) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
         "-w", out, ROOT)
    (built,) = out.glob("tessera-*.whl")
    # every dependency as a wheel, once per checkout (sdists such as tpm2-pytss are built
    # here, so the per-extra installs below are offline and quick)
    stamp = WHEELHOUSE / ".extras"
    want = (ROOT / "pyproject.toml").read_text()
    if not stamp.exists() or stamp.read_text() != want:
        WHEELHOUSE.mkdir(parents=True, exist_ok=True)
        _run(sys.executable, "-m", "pip", "wheel", "-q", "-w", WHEELHOUSE,
             f"{built}[{ALL_EXTRAS}]")
        stamp.write_text(want)
    return built


def test_wheel_holds_the_packages_and_not_bench_or_tests(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names if "/" in n and ".dist-info" not in n}
    assert tops >= {"structauth", "hw", "device", "broker_plugin", "provisioning", "simulator"}
    assert not tops & {"bench", "tests"}, tops
    # every package of the checkout is in the wheel (broker_plugin/coap once was not)
    shipped = {n.rsplit("/", 1)[0] for n in names if n.endswith("/__init__.py")}
    for top in ("structauth", "hw", "device", "broker_plugin", "provisioning", "simulator"):
        for init in (ROOT / top).rglob("__init__.py"):
            assert init.parent.relative_to(ROOT).as_posix() in shipped, init
    # PEP 561: type checkers use the installed packages' annotations
    assert {f"{p}/py.typed" for p in ("structauth", "hw", "device", "broker_plugin",
                                      "provisioning", "simulator")} <= set(names)


@pytest.mark.parametrize("extra", list(ROLES), ids=lambda e: e or "core")
def test_each_extra_installs_what_its_role_imports_and_nothing_else(
        extra: str, wheel: Path, tmp_path: Path) -> None:
    modules, absent, commands = ROLES[extra]
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv)
    py = venv / "bin" / "python"
    spec = f"{wheel}[{extra}]" if extra else str(wheel)
    _run(py, "-m", "pip", "install", "-q", "--no-index", "--find-links", WHEELHOUSE, spec,
         cwd=tmp_path)
    # run from tmp_path so nothing resolves to the checkout
    probe = (
        "import importlib, importlib.util, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"present = [n for n in {[STACKS[s] for s in absent]!r} "
        "if importlib.util.find_spec(n) is not None]\n"
        "print(' '.join(present))\n"
    )
    present = _run(py, "-c", probe, cwd=tmp_path).split()
    assert present == [], f"tessera[{extra}] installed other roles' packages: {present}"
    for command in commands:
        _run(venv / "bin" / command[0], *command[1:], cwd=tmp_path)
