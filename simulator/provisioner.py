"""A real provisioning service for tests, benchmarks and demos: `tessera init` with the
authority key in a SoftHSM2 token, then `tessera serve` as a child process on
127.0.0.1, stopped and restarted at will."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from simulator.softhsm import SoftHsm
from structauth.errors import ConfigurationError

_BIN = Path(sys.executable).parent


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, for serving HTTPS in tests."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tessera test provisioner")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ProvisioningServer:
    def __init__(
        self,
        directory: Path,
        softhsm: SoftHsm,
        *,
        trust_domain: str = "factory.tessera.test",
        maker_roots: Sequence[str | os.PathLike[str]] = (),
        registry_url: str | None = None,
        operational_lifetime_minutes: int = 24 * 60,
        tls: bool = False,
        limits: dict[str, int | float] | None = None,
    ) -> None:
        """``limits``: the service.toml ``[limits]`` table (docs/ENROLLMENT.md), e.g. a
        load generator whose renewers all come from 127.0.0.1 lifts the per-source renew
        challenge rate."""
        self.directory = Path(directory)
        self.softhsm = softhsm
        self.trust_domain = trust_domain
        self.port = free_port()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        self.tls = _self_signed(self.directory.parent / "service-tls") if tls else None
        self.cafile = str(self.tls[0]) if self.tls else None
        self.pin = secrets.token_hex(8)
        self.token_label = f"authority-{secrets.token_hex(3)}"
        softhsm.init_token(self.token_label, so_pin=secrets.token_hex(8), user_pin=self.pin)
        self.env = {**os.environ, "SOFTHSM2_CONF": str(softhsm.conf_path),
                    "TESSERA_PKCS11_PIN": self.pin, "TESSERA_PROVISIONER": self.url}
        if self.cafile:
            self.env["TESSERA_CAFILE"] = self.cafile
        cmd = [str(_BIN / "tessera"), "--json", "init", "--dir", str(self.directory),
               "--trust-domain", trust_domain, "--pkcs11-module", softhsm.module,
               "--token", self.token_label,
               "--operational-lifetime", str(operational_lifetime_minutes)]
        if maker_roots:
            cmd += ["--tpm-maker-roots", *map(str, maker_roots)]
        if registry_url:
            cmd += ["--registry", registry_url]
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True)
        if done.returncode != 0:
            raise ConfigurationError(f"tessera init failed: {done.stderr.strip()}")
        self.operator_token = json.loads(done.stdout)["operator_token"]
        if limits:
            with open(self.directory / "service.toml", "a", encoding="utf-8") as f:
                f.write("\n[limits]\n" + "".join(f"{k} = {v!r}\n" for k, v in limits.items()))
        self.env["TESSERA_OPERATOR_TOKEN"] = self.operator_token
        self._proc: subprocess.Popen[bytes] | None = None
        self.log = self.directory / "serve.log"

    def start(self) -> ProvisioningServer:
        if self._proc is not None:
            return self
        log = open(self.log, "ab")  # noqa: SIM115 - handed to the child
        cmd = [str(_BIN / "tessera"), "serve", "--dir", str(self.directory),
               "--port", str(self.port)]
        if self.tls:
            cmd += ["--tls-cert", str(self.tls[0]), "--tls-key", str(self.tls[1])]
        self._proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=log)
        log.close()
        context = ssl.create_default_context(cafile=self.cafile) if self.tls else None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ConfigurationError(f"tessera serve exited: {self.log.read_text()[-500:]}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1, context=context):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise ConfigurationError("tessera serve did not answer within 20 s")

    def kill(self) -> None:
        """SIGKILL: no chance to clean up, like a power cut."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait()
            self._proc = None

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def cli(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        """Run the `tessera` CLI against this service."""
        return subprocess.run([str(_BIN / "tessera"), *args], env=self.env,
                              capture_output=True, text=True, check=check)

    def __enter__(self) -> ProvisioningServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
