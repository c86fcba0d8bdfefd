"""tessera-sim: --version, softhsm init never losing an SO PIN, swtpm keeping its port."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from simulator.cli import main
from simulator.softhsm import SoftHsm, find_softhsm_module

USER_PIN_ENV, SO_PIN_ENV = "TESSERA_PKCS11_PIN", "TESSERA_PKCS11_SO_PIN"


def _snapshot(root: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every path under ``root``: its mode and, for a file, its bytes."""
    found: dict[str, tuple[int, bytes | None]] = {}
    for path in sorted(root.rglob("*")):
        mode = path.lstat().st_mode
        data = path.read_bytes() if stat.S_ISREG(mode) else None
        found[str(path.relative_to(root))] = (mode, data)
    return found


def _refused(capsys: pytest.CaptureFixture[str], argv: list[str], *reason: str) -> None:
    """``argv`` exits 1 with one line on stderr naming every ``reason``, nothing on stdout."""
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("tessera-sim: error: ") and captured.err.count("\n") == 1
    for words in reason:
        assert words in captured.err, captured.err


def _so_pin_opens(directory: Path, label: str, so_pin: str) -> bool:
    """Whether ``so_pin`` logs in as the SO of token ``label`` (in a process of its own:
    SoftHSM2 reads SOFTHSM2_CONF once per process)."""
    code = (
        "import os, sys, pkcs11\n"
        "lib = pkcs11.lib(sys.argv[1])\n"
        "token = lib.get_token(token_label=sys.argv[2])\n"
        "try:\n"
        "    token.open(rw=True, so_pin=os.environ['SO_PIN']).close()\n"
        "except pkcs11.PinIncorrect:\n"
        "    sys.exit(3)\n"
    )
    env = {**os.environ, "SOFTHSM2_CONF": str(directory / "softhsm2.conf"), "SO_PIN": so_pin}
    result = subprocess.run([sys.executable, "-c", code, find_softhsm_module(), label],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode in (0, 3), result.stderr
    return result.returncode == 0


def test_version_names_the_installed_distribution(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    captured = capsys.readouterr()
    assert captured.out == f"tessera-sim {version('tessera')}\n"
    assert captured.err == ""


# -- softhsm init never loses an SO PIN, and a failed init changes nothing ------------------


@pytest.fixture
def hsm_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
            capsys: pytest.CaptureFixture[str]) -> Path:
    """A directory holding token 'one', made without an SO PIN in the environment."""
    monkeypatch.setenv(USER_PIN_ENV, "1234")
    monkeypatch.delenv(SO_PIN_ENV, raising=False)
    directory = tmp_path / "hsm"
    assert main(["softhsm", "init", "--dir", str(directory), "--label", "one"]) == 0
    assert "SO PIN generated and stored in" in capsys.readouterr().out
    return directory


def test_softhsm_init_reuses_the_so_pin_it_stored(
        hsm_dir: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    so_pin_file = hsm_dir / "so.pin"
    so_pin = so_pin_file.read_text().rstrip("\n")
    assert main(["softhsm", "init", "--dir", str(hsm_dir), "--label", "two"]) == 0
    assert f"SO PIN: the one kept in {so_pin_file}" in capsys.readouterr().out
    assert so_pin_file.read_text() == f"{so_pin}\n"
    assert stat.S_IMODE(so_pin_file.stat().st_mode) == 0o600
    # an SO PIN from the environment is used for that token, and so.pin stays as it is
    monkeypatch.setenv(SO_PIN_ENV, "so-from-env")
    assert main(["softhsm", "init", "--dir", str(hsm_dir), "--label", "three"]) == 0
    assert "so.pin" not in capsys.readouterr().out
    assert so_pin_file.read_text() == f"{so_pin}\n"
    assert sorted(SoftHsm(hsm_dir).token_labels()) == ["one", "three", "two"]
    assert _so_pin_opens(hsm_dir, "one", so_pin) and _so_pin_opens(hsm_dir, "two", so_pin)
    assert _so_pin_opens(hsm_dir, "three", "so-from-env")
    assert not _so_pin_opens(hsm_dir, "three", so_pin)


@pytest.mark.parametrize(("label", "env", "reason"), [
    ("one", {}, ("a token labelled 'one' already exists in",
                 "start over with: tessera-sim softhsm delete --dir")),
    ("two", {USER_PIN_ENV: ""}, ("set the user PIN", USER_PIN_ENV)),
    ("two", {USER_PIN_ENV: "123"}, ("user PIN in $TESSERA_PKCS11_PIN must be 4-255",)),
    ("two", {SO_PIN_ENV: "567"}, ("SO PIN in $TESSERA_PKCS11_SO_PIN must be 4-255",)),
    ("x" * 33, {}, ("softhsm2-util --init-token failed", "32 chars")),
])
def test_a_failed_softhsm_init_changes_nothing(
        hsm_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        label: str, env: dict[str, str], reason: tuple[str, ...]) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    before = _snapshot(hsm_dir.parent)
    _refused(capsys, ["softhsm", "init", "--dir", str(hsm_dir), "--label", label], *reason)
    assert _snapshot(hsm_dir.parent) == before
    assert SoftHsm(hsm_dir).token_labels() == ["one"]


def test_an_unusable_so_pin_file_is_refused_not_replaced(
        hsm_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (hsm_dir / "so.pin").write_text("12\n")
    before = _snapshot(hsm_dir.parent)
    _refused(capsys, ["softhsm", "init", "--dir", str(hsm_dir), "--label", "two"],
             f"SO PIN in {hsm_dir / 'so.pin'}", "restore it or set TESSERA_PKCS11_SO_PIN")
    assert _snapshot(hsm_dir.parent) == before


@pytest.mark.parametrize("where", ["absent/nested", "empty", "tokens-without-so-pin"])
def test_a_failed_first_init_removes_what_it_added(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        where: str) -> None:
    """softhsm2-util itself fails (a label over 32 characters) after init wrote the
    configuration and a generated so.pin: they go again."""
    monkeypatch.setenv(USER_PIN_ENV, "1234")
    directory = tmp_path / where
    if where == "empty":
        directory.mkdir()
    elif where == "tokens-without-so-pin":
        monkeypatch.setenv(SO_PIN_ENV, "so-from-env")
        assert main(["softhsm", "init", "--dir", str(directory), "--label", "one"]) == 0
        capsys.readouterr()
    monkeypatch.delenv(SO_PIN_ENV, raising=False)
    before = _snapshot(tmp_path)
    _refused(capsys, ["softhsm", "init", "--dir", str(directory), "--label", "x" * 33],
             "32 chars")
    assert _snapshot(tmp_path) == before
    assert not (directory / "so.pin").exists()


# -- swtpm start keeps its port across restarts ---------------------------------------------


def _start(capsys: pytest.CaptureFixture[str], state: Path, *extra: str) -> str:
    """``tessera-sim swtpm start`` (no EK certificates: fast); its TCTI string."""
    assert main(["swtpm", "start", "--state", str(state), "--no-ek-certs", *extra]) == 0
    return capsys.readouterr().out.strip()


def _stop(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["swtpm", "stop", "--state", str(state)]) == 0
    capsys.readouterr()  # "stopped"


def _tpm_answers(tcti: str, keys: Path) -> bool:
    from hw.tpm import TpmBackend

    with TpmBackend(tcti, keys) as backend:
        return len(backend.random(4)) == 4


def test_swtpm_restart_keeps_the_port_and_tcti(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "tpm"
    tcti = _start(capsys, state)
    try:
        port = int(tcti.rpartition("port=")[2])
        assert (state / "swtpm.port").read_text() == f"{port}\n"
        assert _tpm_answers(tcti, tmp_path / "keys")
        _stop(state, capsys)
        assert _start(capsys, state) == tcti  # a new process, the same port
        assert _tpm_answers(tcti, tmp_path / "keys")
    finally:
        _stop(state, capsys)


def test_swtpm_start_takes_the_port_it_is_given(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from simulator.swtpm import _port_pair

    state = tmp_path / "tpm"
    port = _port_pair("127.0.0.1")
    tcti = _start(capsys, state, "--port", str(port))
    try:
        assert tcti == f"swtpm:host=127.0.0.1,port={port}"
        assert _tpm_answers(tcti, tmp_path / "keys")
        # running: the same --port is fine, another one is refused and nothing changes
        assert _start(capsys, state, "--port", str(port)) == tcti
        before = _snapshot(state)
        _refused(capsys, ["swtpm", "start", "--state", str(state), "--port", str(port + 2)],
                 f"already running on port {port}", "tessera-sim swtpm stop --state")
        assert _snapshot(state) == before and _tpm_answers(tcti, tmp_path / "keys")
        _stop(state, capsys)
        assert _start(capsys, state) == tcti  # the port given is the one recorded
    finally:
        _stop(state, capsys)


@pytest.mark.parametrize("taken", ["server", "control"])
def test_swtpm_start_on_a_taken_recorded_port_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], taken: str) -> None:
    state = tmp_path / "tpm"
    tcti = _start(capsys, state)
    _stop(state, capsys)
    port = int(tcti.rpartition("port=")[2])
    before = _snapshot(state)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", port if taken == "server" else port + 1))
        squatter.listen()
        _refused(capsys, ["swtpm", "start", "--state", str(state), "--no-ek-certs"],
                 f"port {port} (recorded in {state.resolve() / 'swtpm.port'})", "in use",
                 "--port N")
    assert _snapshot(state) == before
    assert not (state / "swtpm.pid").exists()


def test_swtpm_start_on_a_taken_port_given_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "never-started"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        _refused(capsys, ["swtpm", "start", "--state", str(state), "--port", str(port)],
                 f"port {port} (given with --port)", "in use")
    assert not state.exists()  # not even manufactured
