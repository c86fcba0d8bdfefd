"""simulator.swtpm, simulator.softhsm and the tessera-sim CLI, with the real tools."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from hw.pkcs11 import DEFAULT_PIN_ENV, Pkcs11Backend
from hw.tpm import TpmBackend
from simulator.cli import main
from simulator.softhsm import SoftHsm, write_pin_file
from simulator.swtpm import Swtpm, _process_alive
from structauth.errors import ConfigurationError, KeyBackendError, Reason


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


# -- swtpm --------------------------------------------------------------------------------


def test_session_swtpm_is_manufactured(swtpm_session: Swtpm) -> None:
    assert swtpm_session.running and swtpm_session.manufactured
    assert swtpm_session.tcti == f"swtpm:host=127.0.0.1,port={swtpm_session.port}"
    assert swtpm_session.port is not None and _answers(swtpm_session.port)
    assert swtpm_session.ctrl_port == swtpm_session.port + 1
    root_path, issuer_path = swtpm_session.manufacturer_ca_paths
    root = x509.load_pem_x509_certificate(root_path.read_bytes())
    issuer = x509.load_pem_x509_certificate(issuer_path.read_bytes())
    issuer.verify_directly_issued_by(root)
    assert root.subject == root.issuer  # self-signed root


def test_restart_keeps_state_and_port(tmp_path: Path) -> None:
    # ek_certs=False keeps this fast; the seeds and NV live in the same state file.
    with Swtpm(tmp_path / "tpm", ek_certs=False) as tpm:
        with TpmBackend(tpm.tcti, tmp_path / "keys") as backend:
            public = backend.create_signing_key("k").public_key()
        old_pid, tcti = tpm.pid, tpm.tcti
        tpm.restart()
        assert tpm.pid != old_pid and tpm.tcti == tcti
        assert old_pid is not None and not _process_alive(old_pid)
        with TpmBackend(tpm.tcti, tmp_path / "keys") as backend:
            assert backend.load_signing_key("k").public_key() == public
    # a directory we passed in is kept; a stopped swtpm no longer answers
    assert (tmp_path / "tpm" / "tpm" / "tpm2-00.permall").exists()
    assert tpm.port is not None and not _answers(tpm.port)
    tpm.stop()  # twice is fine


def test_temporary_directory_is_removed(tmp_path: Path) -> None:
    tpm = Swtpm(ek_certs=False).start()
    directory = tpm.directory
    assert tpm.running
    with pytest.raises(ConfigurationError):
        _ = tpm.manufacturer_ca_paths  # no swtpm_setup, no CA
    tpm.close()
    assert not directory.exists()
    assert not tpm.running
    with pytest.raises(KeyBackendError) as info:
        Swtpm(tmp_path / "never-started").tcti  # noqa: B018
    assert info.value.reason == Reason.BACKEND_UNAVAILABLE


def test_two_swtpms_get_different_ports() -> None:
    with Swtpm(ek_certs=False) as a, Swtpm(ek_certs=False) as b:
        assert a.port != b.port
        assert {a.port, a.ctrl_port}.isdisjoint({b.port, b.ctrl_port})


def test_missing_swtpm_binaries_say_how_to_install(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigurationError) as info:
        Swtpm()
    assert "./run setup" in info.value.detail
    with pytest.raises(ConfigurationError) as info:
        SoftHsm(tmp_path / "hsm")
    assert "./run setup" in info.value.detail


# -- SoftHSM2 -------------------------------------------------------------------------------


def test_softhsm_tokens_and_pin_file(tmp_path: Path) -> None:
    hsm = SoftHsm(tmp_path / "hsm")
    assert hsm.conf_path.read_text().startswith(f"directories.tokendir = {hsm.token_dir}")
    assert Path(hsm.module).is_file()
    hsm.init_token("alpha", so_pin="so-secret", user_pin="user secret with spaces")
    assert "alpha" in hsm.token_labels()
    with pytest.raises(KeyBackendError) as info:
        hsm.init_token("alpha", so_pin="so-secret", user_pin="1234")
    assert info.value.reason == Reason.BAD_PARAMETERS
    with pytest.raises(ConfigurationError):
        hsm.init_token("beta", so_pin="123", user_pin="1234")  # SoftHSM2 needs >= 4
    hsm.delete_token("alpha")
    assert "alpha" not in hsm.token_labels()
    with pytest.raises(KeyBackendError) as info:
        hsm.delete_token("alpha")
    assert info.value.reason == Reason.KEY_NOT_FOUND
    pin_file = write_pin_file(tmp_path / "pin", "1234")
    assert stat.S_IMODE(pin_file.stat().st_mode) == 0o600
    assert pin_file.read_text() == "1234\n"


def test_token_made_by_another_process_is_found(softhsm: SoftHsm, monkeypatch) -> None:
    """softhsm2-util runs in its own process; the backend re-scans when it has no
    sessions, both after a token appeared and after one disappeared."""
    monkeypatch.setenv(DEFAULT_PIN_ENV, "4321")
    softhsm.init_token("external-1", so_pin="so-pin-1", user_pin="4321")
    with Pkcs11Backend(softhsm.module, "external-1") as backend:
        backend.generate_signing_key("k")
    softhsm.init_token("external-2", so_pin="so-pin-1", user_pin="4321")
    softhsm.delete_token("external-1")
    with Pkcs11Backend(softhsm.module, "external-2") as backend:
        assert len(backend.random(8)) == 8
    softhsm.delete_token("external-2")


# -- tessera-sim ----------------------------------------------------------------------------


def test_cli_swtpm_start_stop(tmp_path: Path, capsys) -> None:
    state = tmp_path / "state"
    assert main(["swtpm", "start", "--state", str(state), "--no-ek-certs"]) == 0
    tcti = capsys.readouterr().out.strip()
    assert tcti.startswith("swtpm:host=127.0.0.1,port=")
    try:
        pid = int((state / "swtpm.pid").read_text())
        assert _process_alive(pid)
        with TpmBackend(tcti, tmp_path / "keys") as backend:
            assert len(backend.random(4)) == 4
        assert main(["swtpm", "start", "--state", str(state)]) == 0  # already running
        assert capsys.readouterr().out.strip() == tcti
    finally:
        assert main(["swtpm", "stop", "--state", str(state)]) == 0
    assert not _process_alive(pid)
    assert main(["swtpm", "stop", "--state", str(state)]) == 0  # not running: still fine


def test_cli_softhsm_init_and_delete(tmp_path: Path, capsys, monkeypatch) -> None:
    directory = tmp_path / "hsm"
    monkeypatch.delenv(DEFAULT_PIN_ENV, raising=False)
    assert main(["softhsm", "init", "--dir", str(directory), "--label", "cli"]) == 1
    assert DEFAULT_PIN_ENV in capsys.readouterr().err
    monkeypatch.setenv(DEFAULT_PIN_ENV, "24680")
    monkeypatch.delenv("TESSERA_PKCS11_SO_PIN", raising=False)
    assert main(["softhsm", "init", "--dir", str(directory), "--label", "cli"]) == 0
    out = capsys.readouterr().out
    assert f"export SOFTHSM2_CONF={directory.resolve() / 'softhsm2.conf'}" in out
    assert "libsofthsm2.so" in out
    assert stat.S_IMODE((directory / "so.pin").stat().st_mode) == 0o600
    assert "cli" in SoftHsm(directory).token_labels()
    assert main(["softhsm", "init", "--dir", str(directory), "--label", "cli"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("tessera-sim: error:") and "\n" not in err
    assert main(["softhsm", "delete", "--dir", str(directory), "--label", "cli"]) == 0
    assert main(["softhsm", "delete", "--dir", str(directory), "--label", "cli"]) == 1


def test_cli_console_script_reports_errors_in_one_line(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("tessera-sim")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "simulator.cli"]
    result = subprocess.run(
        [*command, "swtpm", "stop", "--state", str(tmp_path / "absent")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "no swtpm state directory" in result.stderr
    usage = subprocess.run([*command, "bogus"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2


def test_softhsm2_util_is_on_path() -> None:
    # The fixtures fail rather than skip when a tool is missing; make that visible here.
    assert shutil.which("softhsm2-util") and shutil.which("swtpm_setup")
