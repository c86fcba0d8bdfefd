"""A provisioning service on 127.0.0.1 for the API and bounds tests and the
``service_limits`` benchmark: the real app (provisioning.service) run by the real
runner (provisioning.server) in a child process, with a development authority (an
insecure file key: what these tests look at is the HTTP layer, not the token) and a
SQLite registry, and limits the test chooses.

``python -m tests.service_host DIR LIMITS_JSON`` prints one line, the URL, once bound.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from provisioning.attestation import TpmMakerRoots
from provisioning.authority import FleetAuthority
from provisioning.enrollment import EnrollmentService
from provisioning.operators import Operators
from provisioning.registry import open_registry
from provisioning.service import Limits, build_app

TRUST_DOMAIN = "api.tessera.test"


@dataclass
class Served:
    app: Any
    service: EnrollmentService
    token: str
    directory: Path


def make_service(directory: Path, limits: Limits | None = None) -> Served:
    """The app in this process (the authority and registry created once per DIR)."""
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / "authority").exists():
        authority = FleetAuthority.open(directory / "authority")
    else:
        authority = FleetAuthority.init(directory / "authority", TRUST_DOMAIN,
                                        pkcs11_module=None, token_label=None,
                                        insecure_file_key=True, now=dt.datetime.now(dt.UTC))
    roots = TpmMakerRoots([_maker_root()])
    service = EnrollmentService(authority, open_registry(str(directory / "registry.db")), roots)
    operators = Operators(directory / "operators.json")
    token_file = directory / "operator-token"
    if token_file.exists():
        token = token_file.read_text()
    else:
        token = operators.add("api-test")
        token_file.write_text(token)
    return Served(build_app(service, operators, limits), service, token, directory)


def _maker_root() -> Any:
    """A self-signed TPM maker root nobody holds the key of: TPM enrollment is enabled
    (tpm/start answers), and no evidence can chain to it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "API test TPM maker")])
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))


@dataclass
class Child:
    proc: subprocess.Popen[str]
    url: str
    token: str
    log: Path

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


@contextmanager
def child(directory: Path, limits: Limits, *, peer: bool = False) -> Iterator[Child]:
    """The service in a child process; SIGKILLed at the end if still running. ``peer``:
    the app without its Guard on uvicorn's defaults (what the benchmark compares with)."""
    make_service(directory)  # create authority, registry and token here, once
    log = directory / "serve.log"
    with open(log, "ab") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.service_host", str(directory),
             "peer" if peer else json.dumps(asdict(limits))],
            stdout=subprocess.PIPE, stderr=err, text=True,
            cwd=Path(__file__).resolve().parent.parent,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()  # blocks until bound (or the child died)
        if not line.startswith("http://"):
            raise RuntimeError(f"service did not start: {line!r} {log.read_text()[-800:]}")
        yield Child(proc, line, (directory / "operator-token").read_text(), log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def main(argv: list[str]) -> int:
    import logging

    from provisioning.server import run_service

    directory, limits_json = Path(argv[0]), argv[1]
    if limits_json == "peer":  # the app as `tessera serve` ran it before: no Guard, no
        return _peer(directory)  # limits, uvicorn's defaults (bench service_limits)
    limits = Limits(**json.loads(limits_json))
    served = make_service(directory, limits)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    return run_service(served.app, host="127.0.0.1", port=0, limits=limits,
                       on_ready=lambda url: print(url, flush=True))


def _peer(directory: Path) -> int:
    import logging

    import uvicorn

    from provisioning.server import _listen

    served = make_service(directory, Limits(max_body=2**40, long_poll_max_s=60))
    logging.basicConfig(level=logging.WARNING)
    sock = _listen("127.0.0.1", 0, 2048)
    print(f"http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    uvicorn.Server(uvicorn.Config(served.app.app, log_level="warning")).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
