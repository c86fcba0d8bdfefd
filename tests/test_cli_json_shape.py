"""One error shape for both CLIs, and TESSERA_PROVISIONER as the agent's default.

With --json a failing `tessera` and a failing `tessera-agent` print exactly one JSON
object on stderr, ``{"error": "<one line>", "reason": "<reason name>" or null, "exit":
N}`` with N the exit status, and nothing on stdout (docs/ENROLLMENT.md "Errors and exit
codes", docs/AGENT.md "Command line"). tessera-sim has no --json (its errors are one
text line), so it is not here.

`tessera-agent enroll` and `renew` take the provisioning service from --provisioner,
else $TESSERA_PROVISIONER (renew: else the URL enrollment recorded); with neither, one
line naming both and nothing written. Every command runs as a real process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from simulator.provisioner import ProvisioningServer, free_port
from simulator.softhsm import SoftHsm
from simulator.swtpm import Swtpm

BIN = Path(sys.executable).parent


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("TESSERA_PROVISIONER", "TESSERA_OPERATOR_TOKEN", "TESSERA_CAFILE")}
    return {**env, **extra}


def _run(tool: str, *args: str, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / tool), *args], env=env or _env(), capture_output=True,
                          text=True, timeout=60)


def _json_error(done: subprocess.CompletedProcess[str]) -> dict[str, object]:
    """The one documented error object: exactly these keys and types, exit = status."""
    assert done.returncode != 0
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    error = json.loads(line)
    assert set(error) == {"error", "reason", "exit"}, error
    assert isinstance(error["error"], str) and error["error"] and "\n" not in error["error"]
    assert error["reason"] is None or isinstance(error["reason"], str)
    assert error["exit"] == done.returncode
    return error  # type: ignore[no-any-return]


def _dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


# -- the shape -------------------------------------------------------------------------


@pytest.mark.parametrize("tool", ["tessera", "tessera-agent"])
def test_usage_error_shape(tool: str) -> None:
    error = _json_error(_run(tool, "--json", "frobnicate"))
    assert error["reason"] == "usage" and error["exit"] == 1
    assert "frobnicate" in str(error["error"])


def test_tessera_error_with_a_reason() -> None:
    error = _json_error(_run("tessera", "list", "--json",
                             env=_env(TESSERA_PROVISIONER=_dead_url(),
                                      TESSERA_OPERATOR_TOKEN="tso_x")))
    assert error["reason"] == "backend_unavailable" and error["exit"] == 1


def test_tessera_error_without_a_reason_is_null() -> None:
    # --broker without --broker-identity: refused before anything is asked of a service
    error = _json_error(_run("tessera", "--json", "enroll", "--serial", "s-1", "--broker",
                             "mqtt://broker.example:1883",
                             env=_env(TESSERA_PROVISIONER=_dead_url())))
    assert error["reason"] is None and error["exit"] == 1
    assert "--broker-identity" in str(error["error"])


def test_agent_error_with_a_reason(tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    error = _json_error(_run("tessera-agent", "run", "--config", str(missing), "--json"))
    assert error["reason"] == "bad_configuration" and error["exit"] == 1
    assert str(missing) in str(error["error"])


def test_text_mode_is_one_plain_line(tmp_path: Path) -> None:
    for tool, prefix in (("tessera", "tessera: error: "),
                         ("tessera-agent", "tessera-agent: error: ")):
        done = _run(tool, "frobnicate")
        assert done.returncode == 1 and done.stdout == ""
        (line,) = done.stderr.splitlines()
        assert line.startswith(prefix), line


# -- TESSERA_PROVISIONER for tessera-agent ------------------------------------------------


@pytest.mark.parametrize("json_mode", [False, True])
def test_enroll_without_any_provisioner_is_one_line(tmp_path: Path, json_mode: bool) -> None:
    state = tmp_path / "state"
    done = _run("tessera-agent", *(["--json"] if json_mode else []), "enroll", "--serial",
                "pi-np", "--tpm", "swtpm:host=127.0.0.1,port=1", "--state-dir", str(state),
                env=_env(TESSERA_OPERATOR_TOKEN="tso_x"))
    assert done.returncode == 1 and done.stdout == ""
    if json_mode:
        error = _json_error(done)
        assert error["reason"] == "bad_configuration"
        message = str(error["error"])
    else:
        (message,) = done.stderr.splitlines()
        assert message.startswith("tessera-agent: error: ")
    assert "--provisioner" in message and "TESSERA_PROVISIONER" in message
    assert not state.exists()  # nothing written, no key made


def test_renew_without_any_provisioner_is_one_line(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    recorded = json.dumps({"backend": "tpm", "tcti": "swtpm:host=127.0.0.1,port=1",
                           "key_dir": str(state / "keys"), "serial": "pi-np"})
    (state / "agent.json").write_text(recorded)
    done = _run("tessera-agent", "renew", "--state-dir", str(state))
    assert done.returncode == 1 and done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert "--provisioner" in line and "TESSERA_PROVISIONER" in line, line
    assert sorted(p.name for p in state.iterdir()) == ["agent.json"]
    assert (state / "agent.json").read_text() == recorded


@pytest.mark.hardware
def test_enroll_and_renew_take_the_environment(tmp_path: Path, softhsm: SoftHsm,
                                              swtpm_session: Swtpm) -> None:
    with ProvisioningServer(tmp_path / "authority", softhsm,
                            maker_roots=swtpm_session.manufacturer_ca_paths) as server:
        env = _env(TESSERA_PROVISIONER=server.url,
                   TESSERA_OPERATOR_TOKEN=server.operator_token)
        state = tmp_path / "pi-env"
        done = _run("tessera-agent", "--json", "enroll", "--serial", "pi-env", "--tpm",
                    swtpm_session.tcti, "--state-dir", str(state), env=env)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["identity"].endswith("/device/pi-env")
        settings = json.loads((state / "agent.json").read_text())
        assert settings["provisioner"] == server.url

        # renew: the environment before what agent.json recorded (a dead URL here)
        settings["provisioner"] = _dead_url()
        (state / "agent.json").write_text(json.dumps(settings))
        before = (state / "operational.pem").read_bytes()
        done = _run("tessera-agent", "--json", "renew", "--state-dir", str(state),
                    env=_env(TESSERA_PROVISIONER=server.url))
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["renewed"] is True
        assert (state / "operational.pem").read_bytes() != before
