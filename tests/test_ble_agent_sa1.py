"""``tessera-agent ble-sa1-serve`` in its own process (``python -m device.ble_sa1_cli
serve``), with its device key in swtpm, talking HCI over a socket to a virtual
controller on the test's radio (the Pi path but for the transport); a device in the
test process reaches it as a bleak central. And the commands' bad input as one line,
through the agent's own parser."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import subprocess
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import Encoding

from device.ble_central import scan
from device.ble_session import PeerRefusedError, Sa1Central, sa1_link
from device.state import DEVICE_KEY_NAME
from hw.tpm import TpmBackend
from simulator.ble import VirtualRadio
from simulator.fleet import Fleet, Member
from simulator.provisioner import free_port
from simulator.swtpm import Swtpm
from structauth import gatt
from structauth.errors import Reason
from structauth.handshake import Initiator

pytestmark = pytest.mark.hardware

WALL = dt.datetime.now(dt.UTC)


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 50))


def crl(fleet: Fleet, revoked: list[Member]) -> bytes:
    builder = (x509.CertificateRevocationListBuilder().issuer_name(fleet.root.subject)
               .last_update(WALL - dt.timedelta(minutes=5))
               .next_update(WALL + dt.timedelta(hours=1)))
    for member in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(member.credential.chain[0].serial_number)
            .revocation_date(WALL - dt.timedelta(minutes=5)).build())
    return builder.sign(fleet.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def device_state(fleet: Fleet, tcti: str, directory: Path, name: str) -> Member:
    """An enrolled device's state directory, its key in the TPM (closed again: the
    process under test opens it)."""
    key_dir = directory / "keys"
    key_dir.mkdir(parents=True)
    with TpmBackend(tcti, key_dir) as backend:
        signer = backend.get_or_create_signing_key(DEVICE_KEY_NAME)
        member = Member(signer, fleet.credential_for(signer.public_key(), "device", name))
    (directory / "operational.pem").write_bytes(
        b"".join(c.public_bytes(Encoding.PEM) for c in member.credential.chain))
    (directory / "bundle.pem").write_bytes(fleet.root.public_bytes(Encoding.PEM))
    (directory / "agent.json").write_text(json.dumps({
        "backend": "tpm", "tcti": tcti, "key_dir": str(key_dir), "serial": name,
        "identity": member.identity.uri}))
    return member


def test_serve_answers_sa1_in_its_own_process(swtpm_session: Swtpm, tmp_path: Path) -> None:
    fleet = Fleet(t0=WALL - dt.timedelta(days=1))  # valid by the wall clock
    field_b = device_state(fleet, swtpm_session.tcti, tmp_path / "b", "field-b")
    field_a, revoked_c = fleet.member("device", "field-a"), fleet.member("device", "field-c")
    (tmp_path / "crl.pem").write_bytes(crl(fleet, [revoked_c]))

    async def scenario() -> tuple[int, str, str]:
        radio = VirtualRadio()
        port = free_port()
        transport = await radio.serve_controller(f"tcp-server:127.0.0.1:{port}")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "device.ble_sa1_cli", "serve",
            "--state-dir", str(tmp_path / "b"), "--crl", str(tmp_path / "crl.pem"),
            "--max-crl-age-hours", "24", "--sealed", "--count", "1", "--timeout", "40",
            "--hci", f"tcp-client:127.0.0.1:{port}",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 20)
            assert b"advertising SA1 as field-b" in line, line
            dev = radio.add_device("field-a")
            await dev.power_on()
            backends = radio.bleak_backends(dev)
            found = await scan(gatt.SA1_SERVICE, timeout=5, backends=backends, stop_after=1)
            assert found, "field-b's advertisement was not seen"

            def central(member: Member) -> Sa1Central:
                return Sa1Central(sa1_link(found[0][0], backends=backends), Initiator(
                    signer=member.signer, credential=member.credential, trust=fleet.trust,
                    expected_peer=field_b.identity))

            # a device on field-b's revocation list is refused, and field-b goes on
            refused = central(revoked_c)
            with pytest.raises(PeerRefusedError) as exc:
                await refused.open()
            assert exc.value.reason is Reason.CREDENTIAL_REVOKED
            await refused.close()

            good = central(field_a)
            assert await good.open() == field_b.identity
            await good.send("field/a/hello", b"from a")
            out, err = await asyncio.wait_for(proc.communicate(), 20)
            await good.close()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await transport.close()
        return proc.returncode or 0, out.decode(), err.decode()

    status, out, err = run(scenario())
    assert status == 0, err
    assert [json.loads(line) for line in out.splitlines()] == [
        {"peer": field_a.identity.uri, "topic": "field/a/hello", "payload": "from a"}]


def test_send_reaches_serve_both_keys_in_swtpm(swtpm_session: Swtpm, tmp_path: Path) -> None:
    """``ble-sa1-send``'s code (``send_once``, which the command runs under
    asyncio.run with BlueZ) with the radio's bleak backends, its key in a second swtpm,
    to ``ble-sa1-serve`` in its own process."""
    import argparse

    from device.ble_args import add_send_arguments
    from device.ble_sa1_cli import send_once

    fleet = Fleet(t0=WALL - dt.timedelta(days=1))
    field_b = device_state(fleet, swtpm_session.tcti, tmp_path / "b", "field-b")
    (tmp_path / "crl.pem").write_bytes(crl(fleet, []))
    parser = argparse.ArgumentParser()
    add_send_arguments(parser)

    async def scenario(tcti_a: str) -> tuple[dict[str, Any], int, str, str]:
        field_a = device_state(fleet, tcti_a, tmp_path / "a", "field-a")
        radio = VirtualRadio()
        port = free_port()
        transport = await radio.serve_controller(f"tcp-server:127.0.0.1:{port}")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "device.ble_sa1_cli", "serve",
            "--state-dir", str(tmp_path / "b"), "--crl", str(tmp_path / "crl.pem"),
            "--max-crl-age-hours", "24", "--count", "1", "--timeout", "40",
            "--hci", f"tcp-client:127.0.0.1:{port}",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 20)
            assert b"advertising SA1 as field-b" in line, line
            dev = radio.add_device("field-a")
            await dev.power_on()
            args = parser.parse_args([
                "--state-dir", str(tmp_path / "a"), "--crl", str(tmp_path / "crl.pem"),
                "--max-crl-age-hours", "24", "--peer", field_b.identity.uri,
                "--topic", "field/a/t", "--message", "21.5", "--scan-time", "5"])
            result = await send_once(args, backends=radio.bleak_backends(dev))
            out, err = await asyncio.wait_for(proc.communicate(), 20)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await transport.close()
        assert json.loads(out.splitlines()[-1]) == {
            "peer": field_a.identity.uri, "topic": "field/a/t", "payload": "21.5"}
        return result, proc.returncode or 0, out.decode(), err.decode()

    with Swtpm(ek_certs=False) as tpm_a:
        result, status, _out, err = run(scenario(tpm_a.tcti))
    assert status == 0, err
    assert result == {"peer": field_b.identity.uri, "sent": "field/a/t"}


def agent(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "import sys; from device.cli import main; "
                           "sys.exit(main(sys.argv[1:]))", *argv],
                          capture_output=True, text=True, timeout=60)


def test_bad_input_is_one_line(tmp_path: Path, swtpm_session: Swtpm) -> None:
    fleet = Fleet(t0=WALL - dt.timedelta(days=1))
    device_state(fleet, swtpm_session.tcti, tmp_path / "d", "field-d")
    (tmp_path / "crl.pem").write_bytes(crl(fleet, []))
    other = Fleet(t0=WALL - dt.timedelta(days=1))
    (tmp_path / "foreign.pem").write_bytes(crl(other, []))
    state = ["--state-dir", str(tmp_path / "d"), "--max-crl-age-hours", "24"]
    cases = [
        (["ble-sa1-serve", *state, "--crl", str(tmp_path / "missing.pem")],
         "cannot read the revocation list"),
        (["ble-sa1-serve", *state, "--crl", str(tmp_path / "foreign.pem")],
         "not signed by a root of the trust bundle"),
        (["ble-sa1-serve", "--state-dir", str(tmp_path / "nowhere"), "--crl",
          str(tmp_path / "crl.pem"), "--max-crl-age-hours", "24"], "agent.json"),
        (["ble-sa1-serve", *state, "--crl", str(tmp_path / "crl.pem"),
          "--hci", "no-such-transport:0"], "cannot open the Bluetooth controller"),
        (["ble-sa1-send", *state, "--crl", str(tmp_path / "crl.pem"), "--peer", "gw-1",
          "--topic", "a", "--message", "b"], "is not a SPIFFE identity"),
        (["ble-sa1-serve", "--state-dir", str(tmp_path / "d"), "--crl",
          str(tmp_path / "crl.pem")], "--max-crl-age-hours"),
        # no BlueZ here (no system D-Bus, no adapter): what a station without one sees
        (["ble-sa1-send", *state, "--crl", str(tmp_path / "crl.pem"), "--peer",
          "spiffe://fleet.test/device/x", "--address", "AA:BB:CC:DD:EE:FF", "--topic", "a",
          "--message", "b"], "cannot use the Bluetooth adapter"),
    ]
    for argv, expected in cases:
        done = agent(*argv)
        assert done.returncode != 0, (argv, done.stdout)
        lines = done.stderr.splitlines()
        assert expected in lines[-1], (argv, done.stderr)
        # ours is one line; bleak itself may log a warning first (no bluetoothctl)
        assert [line for line in lines if "bleak" not in line] == lines[-1:], done.stderr
        assert done.stdout == ""
