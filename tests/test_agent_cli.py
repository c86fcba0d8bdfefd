"""tessera-agent's command-line conventions (issue 14, points 3 and 4, agent side).

--json anywhere (errors as JSON too), --version from the installed metadata,
--log-level / --log-format json, documented exit codes; configuration problems refused
at load in one line naming the file, the key and the fix; a revoked agent says why once,
exits 3 and stops connecting. The device key is in swtpm; the agent runs as a real
process where it can.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.serialization import Encoding

from device import cli
from device.agent import EXIT_REVOKED, Agent, AgentConfig, revocation_of
from device.mqtt import MqttError
from device.state import DeviceState
from hw.tpm import TpmBackend
from simulator.fleet import Fleet
from simulator.provisioner import free_port
from simulator.swtpm import Swtpm
from structauth.errors import ConfigurationError, Reason
from tests.support import wait_for

pytestmark = pytest.mark.hardware

AGENT = str(Path(sys.executable).parent / "tessera-agent")


class Device:
    """An enrolled device's state directory (key in swtpm) and an agent.toml for it."""

    def __init__(self, base: Path, tpm: Swtpm) -> None:
        self.fleet = Fleet(t0=dt.datetime.now(dt.UTC) - dt.timedelta(days=1))
        self.state = base / "state"
        self.state.mkdir()
        with TpmBackend(tpm.tcti, self.state / "keys") as backend:
            key = backend.get_or_create_signing_key("tessera-device").public_key()
        cred = self.fleet.credential_for(key, "device", "pi-a")
        (self.state / "operational.pem").write_bytes(cred.chain[0].public_bytes(Encoding.PEM))
        (self.state / "bundle.pem").write_bytes(self.fleet.root.public_bytes(Encoding.PEM))
        (self.state / "agent.json").write_text(json.dumps(
            {"backend": "tpm", "tcti": tpm.tcti, "key_dir": str(self.state / "keys"),
             "serial": "pi-a"}))
        self.config = base / "agent.toml"
        self.port = free_port()  # nothing listens there
        self.write()

    def write(self, extra: str = "", broker: str | None = None, *, mqtt: str = "",
              renewal: str = "", state: Path | None = None) -> Path:
        broker = broker or f"spiffe://{self.fleet.trust_domain}/broker/mqtt-1"
        self.config.write_text(
            f'[device]\nstate_dir = "{state or self.state}"\n'
            f'[mqtt]\nhost = "127.0.0.1"\nport = {self.port}\nbroker_identity = "{broker}"\n'
            f"{mqtt}[renewal]\nenabled = false\n{renewal}"
            "[reconnect]\ninitial_s = 0.05\nmax_s = 0.1\n" + extra)
        return self.config


@pytest.fixture
def device(tmp_path: Path, swtpm_session: Swtpm) -> Device:
    return Device(tmp_path, swtpm_session)


def _agent(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([AGENT, *args], capture_output=True, text=True, timeout=60, env=env)


# -- --version, --json, exit codes -------------------------------------------------------


def test_version_comes_from_the_installed_metadata() -> None:
    done = _agent("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"tessera-agent {version('tessera')}"


@pytest.mark.parametrize("where", ["before", "after"])
def test_json_anywhere_and_errors_as_json(where: str, tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    args = ["--json", "run", "--config", str(missing)] if where == "before" else \
        ["run", "--config", str(missing), "--json"]
    done = _agent(*args)
    assert done.returncode == 1
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    error = json.loads(line)
    assert error["reason"] == "bad_configuration" and error["exit"] == 1
    assert str(missing) in error["error"] and "--config" in error["error"]


def test_usage_errors_are_json_in_json_mode() -> None:
    done = _agent("run", "--json", "--frobnicate")
    assert done.returncode == 1
    error = json.loads(done.stderr)
    assert error["reason"] == "usage" and "--frobnicate" in error["error"]
    text = _agent("run", "--frobnicate")
    assert text.returncode == 1
    assert text.stderr.startswith("tessera-agent: error: unrecognized arguments: --frobnicate")
    assert len(text.stderr.splitlines()) == 1


def test_enrolled_message_without_attestation(capsys: pytest.CaptureFixture[str],
                                              tmp_path: Path) -> None:
    """The enrollment endpoint's answer may lack 'attestation' (was a KeyError)."""
    issued = {"identity": "spiffe://fleet.test/device/pi-a"}
    args = cli.build_parser().parse_args(["enrollment-endpoint", "--serial", "s", "--tpm", "x",
                                          "--state-dir", str(tmp_path)])
    cli._enrolled(args, issued)
    assert capsys.readouterr().out == "enrolled as spiffe://fleet.test/device/pi-a\n"
    args.json = True
    cli._enrolled(args, {**issued, "attestation": "tpm"})
    assert json.loads(capsys.readouterr().out)["attestation"] == "tpm"


# -- configuration refused at load --------------------------------------------------------


@pytest.mark.parametrize(("extra", "broker", "expect"), [
    ("[mqtt.extra]\n", None, "unknown key mqtt.extra (known in [mqtt]: host"),
    ("[wat]\n", None, "unknown section [wat]"),
    ('[renewal.x]\n', None, "unknown key renewal.x"),
    (None, "spiffe://fleet.test/device/pi-b", "is not a broker identity"),
    (None, "spiffe://other.example/broker/mqtt-1",
     "mqtt.broker_identity: spiffe://other.example/broker/mqtt-1 is in trust domain "
     "'other.example', this device (spiffe://fleet.test/device/pi-a) in 'fleet.test'; use "
     "the broker's identity in 'fleet.test'"),
])
def test_config_problems_are_refused_at_load_in_one_line(
        device: Device, extra: str | None, broker: str | None, expect: str) -> None:
    path = device.write(extra or "", broker=broker)
    with pytest.raises(ConfigurationError) as refused:
        AgentConfig.load(path)
    assert expect in refused.value.detail, refused.value.detail
    assert refused.value.detail.startswith(f"{path}: ")
    assert "\n" not in refused.value.detail


def test_missing_files_named_with_their_key_and_fix(device: Device, tmp_path: Path) -> None:
    path = device.write(mqtt=f'tls_cafile = "{tmp_path}/ca.pem"\n')
    with pytest.raises(ConfigurationError) as refused:
        AgentConfig.load(path)
    assert refused.value.detail == (
        f"{path}: mqtt.tls_cafile: {tmp_path}/ca.pem does not exist; set it to the PEM bundle "
        "of the CA that signed the broker's TLS certificate")
    device.write(renewal=f'cafile = "{tmp_path}/nope.pem"\n')
    with pytest.raises(ConfigurationError, match=r"renewal.cafile: .*nope.pem does not exist"):
        AgentConfig.load(path)
    device.write(state=tmp_path / "x")
    with pytest.raises(ConfigurationError) as refused:
        AgentConfig.load(path)
    assert refused.value.detail.startswith(
        f"{path}: device.state_dir: {tmp_path / 'x'} holds no agent.json; set it to the "
        "directory enrollment wrote")


def test_missing_extra_is_refused_at_load(device: Device) -> None:
    """tpm2-pytss absent (hidden from the import system in a subprocess: installing a
    venv without it is tests/test_extras.py's job): one line with the pip command."""
    probe = (
        "import sys; sys.modules['tpm2_pytss'] = None\n"
        "from device.cli import main\n"
        f"sys.exit(main(['run', '--config', {str(device.config)!r}]))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"tessera-agent: error: {device.state / 'agent.json'}: backend 'tpm' needs the Python "
        "package tpm2-pytss, which is not installed; pip install 'tessera[device-tpm]' "
        "[bad_configuration]"]


# -- logging -------------------------------------------------------------------------------


def test_log_format_json_and_level_on_the_running_agent(device: Device) -> None:
    """The real agent process: nothing listens on its broker port, so it logs its
    connection attempts (warning) as JSON lines; SIGTERM stops it with status 0."""
    proc = subprocess.Popen([AGENT, "run", "--config", str(device.config), "--log-format",
                             "json", "--log-level", "warning", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        started = json.loads(proc.stdout.readline())
        assert started["event"] == "running" and started["version"] == version("tessera")
        record = json.loads(proc.stderr.readline())  # blocks until the first log line
        assert record["level"] == "warning" and record["logger"] == "tessera.agent"
        assert record["message"].startswith("connect: ")
    finally:
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=30)[1]
    assert proc.returncode == 0
    for line in rest.splitlines():  # every line is a JSON record; no info lines at warning
        assert json.loads(line)["level"] in ("warning", "error")


# -- revocation ------------------------------------------------------------------------------


class _RefusingClient:
    """Stands in for TesseraMqttClient: the broker cannot yet tell a device it is revoked
    (its CONNACK carries no reason string; device/mqtt.py will report it as a
    CREDENTIAL_REVOKED MqttError), so that refusal cannot be produced for real here."""

    attempts: list[float] = []
    reason = Reason.CREDENTIAL_REVOKED

    def __init__(self, **kw: Any) -> None:
        pass

    def connect(self, **kw: Any) -> None:
        type(self).attempts.append(1.0)
        raise MqttError("broker refused the connection: Not authorized (tessera: "
                        "credential_revoked)" if self.reason == Reason.CREDENTIAL_REVOKED
                        else "broker refused the connection: Not authorized", self.reason)

    def close(self) -> None:
        pass


@pytest.fixture
def refusing() -> Iterator[type[_RefusingClient]]:
    _RefusingClient.attempts = []
    _RefusingClient.reason = Reason.CREDENTIAL_REVOKED
    yield _RefusingClient


def test_revoked_agent_says_why_once_and_stops(device: Device, refusing: type[_RefusingClient],
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tessera.agent")
    agent = Agent(AgentConfig.load(device.config), client_factory=refusing)
    agent.start()
    try:
        assert agent.finished.wait(10)
        assert agent._thread is not None
        agent._thread.join(5)
        assert not agent._thread.is_alive()  # the loop ended: no more attempts
    finally:
        agent.stop()
    assert len(refusing.attempts) == 1
    assert agent.revoked is not None and "credential_revoked" in agent.revoked
    said = [r for r in caplog.records if "revoked" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.ERROR
    assert "--reenroll" in said[0].getMessage()


def test_a_refusal_that_is_not_revocation_is_retried(
        device: Device, refusing: type[_RefusingClient]) -> None:
    refusing.reason = Reason.NOT_AUTHORIZED
    agent = Agent(AgentConfig.load(device.config), client_factory=refusing)
    agent.start()
    try:
        wait_for(lambda: len(refusing.attempts) >= 3, 10, "three connection attempts")
        assert not agent.finished.is_set() and agent.revoked is None
    finally:
        agent.stop()


def test_revoked_run_exits_with_its_own_code(device: Device, refusing: type[_RefusingClient],
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    import device.mqtt as mqtt_module

    monkeypatch.setattr(mqtt_module, "TesseraMqttClient", refusing)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert threading.current_thread() is threading.main_thread()
        code = cli.main(["run", "--config", str(device.config), "--json"])
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert code == EXIT_REVOKED == 3
    err = [json.loads(line) for line in capsys.readouterr().err.splitlines()
           if line.startswith("{\"error\"")]
    assert [e["reason"] for e in err] == ["revoked"] and err[0]["exit"] == 3


def test_revocation_of_reads_reasons_and_reason_strings() -> None:
    assert revocation_of(MqttError("x", Reason.DEVICE_REVOKED)) == "x"
    assert revocation_of(MqttError("refused (tessera: credential_revoked)",
                                   Reason.NOT_AUTHORIZED)) is not None
    assert revocation_of(MqttError("Not authorized", Reason.NOT_AUTHORIZED)) is None
    assert revocation_of(None) is None
    assert revocation_of(OSError("revoked")) is None


def test_persist_key_puts_the_device_key_at_the_operators_handle(tmp_path: Path) -> None:
    with Swtpm(ek_certs=False) as tpm:  # its own TPM: the handle outlives the test
        dev = Device(tmp_path, tpm)
        done = _agent("persist-key", "--handle", "0x81000010", "--state-dir", str(dev.state),
                      "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"handle": "0x81000010", "key": "tessera-device"}
        assert (dev.state / "keys" / "tessera-device.handle").read_text() == "0x81000010\n"
        # the agent's own way of opening its key now uses the handle
        signer = DeviceState.load(dev.state).signer()
        try:
            digest = bytes(32)
            signer.public_key().verify(signer.sign_digest(digest), digest,
                                       ec.ECDSA(Prehashed(hashes.SHA256())))
        finally:
            signer.close()
        bad = _agent("persist-key", "--handle", "0x01000010", "--state-dir", str(dev.state))
        assert bad.returncode == 1 and len(bad.stderr.splitlines()) == 1
        assert "outside the owner range 0x81000000-0x817fffff" in bad.stderr
