"""The broker plugin from an installed wheel (issue 14, point 1, packaging part).

``pip install 'tessera[broker]'`` into a fresh venv outside the checkout, then ONE
command builds the plugin into a state directory (not site-packages) and prints the
mosquitto.conf lines; a real Mosquitto started with those lines loads the plugin, runs
the installed package's host and accepts a device. Missing build inputs give one line
naming the file and the package to install.

Offline: the wheel is built here (``pip wheel --no-deps``) and its dependencies come
from the wheelhouse tests/test_extras.py keeps in .venv/wheelhouse (built once per
pyproject.toml; this test builds it the same way when it is missing).
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parent.parent
WHEELHOUSE = ROOT / ".venv" / "wheelhouse"


def _env() -> dict[str, str]:
    # nothing may resolve to the checkout: no PYTHONPATH, no active venv
    return {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "VIRTUAL_ENV", "TESSERA_PLUGIN_DIR",
                         "TESSERA_MOSQUITTO_INCLUDE")}


def _run(*cmd: str | Path, cwd: Path, env: dict[str, str] | None = None,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env or _env(),
                          capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, f"{cmd}: exit {done.returncode}\n{done.stdout}{done.stderr}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", out, ROOT, cwd=out)
    (built,) = out.glob("tessera-*.whl")
    if not any(WHEELHOUSE.glob("prometheus_client-*.whl")):
        WHEELHOUSE.mkdir(parents=True, exist_ok=True)
        _run(sys.executable, "-m", "pip", "wheel", "-q", "-w", WHEELHOUSE, f"{built}[broker]",
             cwd=out)
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        tuple[Path, float]]:
    """A fresh venv with tessera[broker]; and when the install started (monotonic)."""
    top = tmp_path_factory.mktemp("installed")
    started = time.monotonic()
    _run(sys.executable, "-m", "venv", top / "venv", cwd=top)
    _run(top / "venv" / "bin" / "python", "-m", "pip", "install", "-q", "--no-index",
         "--find-links", WHEELHOUSE, f"{wheel}[broker]", cwd=top)
    yield top, started


def test_wheel_ships_the_plugin_sources(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("tessera_mosquitto.c", "fastlane.c", "fastlane.h", "blake2s.c", "blake2s.h"):
        assert f"broker_plugin/shim/{name}" in names, name
    assert not any(n.startswith("broker_plugin/_native/") for n in names)  # no stale build


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mosquitto exited {proc.returncode}:\n{log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise AssertionError(f"mosquitto did not listen on {port}:\n{log.read_text()}")


def test_one_command_builds_into_a_state_dir_and_the_broker_accepts_a_device(
        installed: tuple[Path, float]) -> None:
    from device.mqtt import TesseraMqttClient
    from hw.software import InsecureSoftwareSigner
    from simulator.fleet import Fleet
    from simulator.mosquitto import find_mosquitto, plugin_files
    from simulator.provisioner import free_port

    top, started = installed
    venv_python = top / "venv" / "bin" / "python"
    state = top / "broker-state"
    done = _run(venv_python, "-m", "broker_plugin.build", "--state-dir", state, cwd=top)
    lines = done.stdout.splitlines()
    plugin = state / "plugin" / "tessera_mosquitto.so"
    assert f"plugin {plugin}" in lines
    assert f"plugin_opt_python {venv_python}" in lines
    assert str(ROOT) not in done.stdout  # nothing points into the source checkout
    site = next((top / "venv" / "lib").glob("python3*/site-packages"))
    assert not (site / "broker_plugin" / "_native").exists()  # not into site-packages
    assert done.stderr == ""
    # the second run is a no-op that prints the same lines
    assert _run(venv_python, "-m", "broker_plugin.build", "--state-dir", state,
                cwd=top).stdout == done.stdout
    assert _run(venv_python, "-m", "broker_plugin.build", "--state-dir", state, "--check",
                cwd=top).returncode == 0

    # a broker with exactly those lines plus its own credential, key, bundle and policy
    fleet = Fleet(t0=dt.datetime.now(dt.UTC) - dt.timedelta(days=1))
    broker_key = InsecureSoftwareSigner.generate()
    broker = fleet.member("broker", "mqtt-1", signer=broker_key)
    files = top / "broker-files"
    files.mkdir()
    options = plugin_files(
        files, trust_domain=fleet.trust_domain,
        bundle_pem=fleet.root.public_bytes(Encoding.PEM),
        credential_pem=broker.credential.chain[0].public_bytes(Encoding.PEM),
        key=f"insecure-software:{broker_key.save(files / 'broker-key.pem')}")
    port = free_port()
    log = top / "mosquitto.log"
    user = "root" if os.geteuid() == 0 else os.environ.get("USER", "")
    conf = top / "mosquitto.conf"
    conf.write_text("\n".join([
        f"user {user}", "per_listener_settings false", f"listener {port} 127.0.0.1",
        "allow_anonymous false", "persistence false", f"log_dest file {log}",
        "log_type all", *lines, *(f"plugin_opt_{k} {v}" for k, v in options.items()), "",
    ]))
    proc = subprocess.Popen([find_mosquitto(), "-c", str(conf)], cwd=top, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        _wait_port(port, proc, log)
        member = fleet.member("device", "pump-1")
        client = TesseraMqttClient(signer=member.signer, credential=member.credential,
                                   trust=fleet.trust, host="127.0.0.1", port=port,
                                   broker=broker.identity)
        client.connect()
        accepted = time.monotonic() - started
        client.close()
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    text = log.read_text()
    # the plugin the broker loaded is the one built in the state directory, and its host
    # code is the installed package's, not the checkout's
    assert str(plugin) in text
    print(f"\npip install -> broker accepted its first device: {accepted:.1f} s")


def test_missing_header_is_one_line_naming_the_apt_package(
        installed: tuple[Path, float]) -> None:
    top, _ = installed
    empty = top / "no-headers"
    empty.mkdir(exist_ok=True)
    env = dict(_env(), TESSERA_MOSQUITTO_INCLUDE=str(empty))
    done = _run(top / "venv" / "bin" / "python", "-m", "broker_plugin.build", "--state-dir",
                top / "other-state", cwd=top, env=env, check=False)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == (f"error: mosquitto_broker.h missing (in {empty}): install "
                           "mosquitto-dev (apt install mosquitto-dev)\n")
    assert not (top / "other-state" / "plugin" / "tessera_mosquitto.so").exists()


def test_missing_package_data_is_one_line_naming_the_file(
        installed: tuple[Path, float], tmp_path: Path) -> None:
    top, _ = installed
    # a second venv whose install lost a shipped header (as with a wheel built without
    # package data): copy the first, then remove the file
    python = top / "venv" / "bin" / "python"
    site = Path(_run(python, "-c", "import broker_plugin, os; "
                     "print(os.path.dirname(broker_plugin.__file__))", cwd=top).stdout.strip())
    header = site / "shim" / "fastlane.h"
    saved = header.read_bytes()
    header.unlink()
    try:
        done = _run(python, "-m", "broker_plugin.build", "--state-dir", tmp_path / "state",
                    cwd=tmp_path, check=False)
    finally:
        header.write_bytes(saved)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"error: plugin source missing: {header} ")
    assert "pip install --force-reinstall 'tessera[broker]'" in done.stderr


# -- the agent as a systemd service (device/deploy/) -------------------------------------

DEPLOY = ROOT / "device" / "deploy"
UNIT = DEPLOY / "tessera-agent.service"


def _unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_unit_scores_ok_in_systemd_analyze_security() -> None:
    done = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(UNIT)],
                          capture_output=True, text=True, timeout=60)
    if "--offline" in done.stderr and done.returncode != 0:
        pytest.skip(f"this systemd-analyze has no --offline: {done.stderr.strip()}")
    last = done.stdout.strip().splitlines()[-1]
    assert "Overall exposure level for tessera-agent.service:" in last, done.stdout
    score = float(last.split(":")[1].split()[0])
    assert score <= 2.0, last


def test_unit_parses_and_matches_the_agent(tmp_path: Path) -> None:
    from device.agent import EXIT_REVOKED
    from device.cli import STATE_DIR

    settings = _unit_settings()
    assert settings["RestartPreventExitStatus"] == [str(EXIT_REVOKED)]
    assert settings["User"] == ["tessera"] and settings["StateDirectory"] == ["tessera"]
    assert Path("/var/lib/tessera") == STATE_DIR
    # systemd's own parser: every directive known; only ExecStart's path is this host's
    agent = Path(sys.executable).parent / "tessera-agent"
    copy = tmp_path / "tessera-agent.service"
    copy.write_text(UNIT.read_text().replace("/opt/tessera/venv/bin/tessera-agent", str(agent)))
    done = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Unknown key" not in done.stderr and "Unknown section" not in done.stderr


def test_sysusers_and_tmpfiles_make_the_account_and_its_state(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for tool, conf, extra in (("systemd-sysusers", "sysusers.d", []),
                              ("systemd-tmpfiles", "tmpfiles.d", ["--create"])):
        with (DEPLOY / conf / "tessera.conf").open() as stdin:
            done = subprocess.run([tool, f"--root={root}", *extra, "-"], stdin=stdin,
                                  capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    users = {line.split(":")[0]: line.split(":") for line in
             (root / "etc" / "passwd").read_text().splitlines()}
    groups = {line.split(":")[0]: line.split(":") for line in
              (root / "etc" / "group").read_text().splitlines()}
    tessera = users["tessera"]
    assert tessera[5] == "/var/lib/tessera" and tessera[6].endswith("nologin")
    assert "tessera" in groups["tss"][3].split(",")  # opens /dev/tpmrm0
    uid, gid = int(tessera[2]), int(tessera[3])
    for path, mode, owner in (("var/lib/tessera", 0o700, (uid, gid)),
                              ("var/lib/tessera/keys", 0o700, (uid, gid)),
                              ("etc/tessera", 0o750, (0, gid))):
        st = (root / path).stat()
        assert (st.st_mode & 0o7777, (st.st_uid, st.st_gid)) == (mode, owner), path
