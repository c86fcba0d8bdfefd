"""The provisioning path end to end: `tessera init/serve/enroll/renew/revoke/list`
over real HTTP on 127.0.0.1, the authority key in SoftHSM2, devices in swtpm."""

from __future__ import annotations

import csv
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from device.provisioner import ProvisionerClient, ServiceError
from simulator.provisioner import ProvisioningServer
from simulator.softhsm import SoftHsm
from simulator.swtpm import Swtpm
from structauth.credentials import Credential, TimePolicy, TrustStore
from structauth.errors import Reason

pytestmark = pytest.mark.hardware


@pytest.fixture
def service(tmp_path: Path, softhsm: SoftHsm, swtpm_session: Swtpm) -> Iterator[ProvisioningServer]:
    server = ProvisioningServer(tmp_path / "authority", softhsm,
                                maker_roots=swtpm_session.manufacturer_ca_paths)
    with server:
        yield server


def enroll(service: ProvisioningServer, tpm: Swtpm, serial: str, keys: Path,
           *extra: str) -> dict:  # type: ignore[type-arg]
    done = service.cli("--json", "enroll", "--serial", serial, "--tpm", tpm.tcti,
                       "--key-dir", str(keys), *extra)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def devices(service: ProvisioningServer) -> list[dict]:  # type: ignore[type-arg]
    done = service.cli("--json", "list", check=True)
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def validate(issued: dict, pem_key: str = "operational_credential") -> str:  # type: ignore[type-arg]
    bundle = x509.load_pem_x509_certificates(issued["bundle"].encode())
    cred = Credential.from_pem(issued[pem_key].encode())
    store = TrustStore(bundle, cred.identity.trust_domain)
    import datetime as dt

    return store.validate(cred, TimePolicy.trusted(dt.datetime.now(dt.UTC))).uri


def test_tpm_enrollment_renewal_revocation(service: ProvisioningServer, swtpm_session: Swtpm,
                                            tmp_path: Path) -> None:
    out = tmp_path / "creds"
    issued = enroll(service, swtpm_session, "pi-0001", tmp_path / "keys", "--out", str(out))
    assert issued["attestation"] == "tpm-attested"
    assert validate(issued) == f"spiffe://{service.trust_domain}/device/pi-0001"
    assert validate(issued, "enrollment_credential") == issued["identity"]
    assert (out / "operational.pem").exists() and (out / "bundle.pem").exists()
    [record] = devices(service)
    assert record["status"] == "active" and record["enrolled_by"] == "admin"
    assert record["ek_fingerprint"] and record["key_backend"] == "tpm"

    # renewal proves possession of the TPM key; works across an authority restart
    service.restart()
    done = service.cli("--json", "renew", "--serial", "pi-0001", "--tpm", swtpm_session.tcti,
                       "--key-dir", str(tmp_path / "keys"))
    assert done.returncode == 0, done.stderr
    renewed = json.loads(done.stdout)
    assert renewed["operational_credential"] != issued["operational_credential"]
    validate(renewed)

    # revocation: feed event, CRL entry, renewal refused
    done = service.cli("--json", "revoke", "pi-0001", "--reason", "stolen", check=True)
    event = json.loads(done.stdout)
    client = ProvisionerClient(service.url)
    feed = client.call("GET", f"/v1/revocations?since={event['id'] - 1}")["events"]
    assert [e["serial"] for e in feed] == ["pi-0001"]
    assert client.call("GET", f"/v1/revocations?since={event['id']}")["events"] == []
    crl = x509.load_der_x509_crl(client.call("GET", "/v1/crl", raw=True))
    assert {format(r.serial_number, "x") for r in crl} >= set(event["cert_serials"])
    done = service.cli("renew", "--serial", "pi-0001", "--tpm", swtpm_session.tcti,
                       "--key-dir", str(tmp_path / "keys"))
    assert done.returncode == 1 and "revoked" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_second_enrollment_refused_then_reenroll(service: ProvisioningServer,
                                                 swtpm_session: Swtpm, tmp_path: Path) -> None:
    enroll(service, swtpm_session, "pi-0002", tmp_path / "keys")
    before = devices(service)
    done = service.cli("enroll", "--serial", "pi-0002", "--tpm", swtpm_session.tcti,
                       "--key-dir", str(tmp_path / "keys"))
    assert done.returncode == 1
    assert "already enrolled" in done.stderr and "--reenroll" in done.stderr
    assert devices(service) == before
    # the same TPM (EK) under another serial is refused too
    done = service.cli("enroll", "--serial", "pi-0003", "--tpm", swtpm_session.tcti,
                       "--key-dir", str(tmp_path / "keys"))
    assert done.returncode == 1 and devices(service) == before
    again = enroll(service, swtpm_session, "pi-0002", tmp_path / "keys", "--reenroll")
    assert again["revoked_previous"]["serial"] == "pi-0002"
    [record] = devices(service)
    assert record["status"] == "active"


def test_unknown_tpm_maker_refused(tmp_path: Path, softhsm: SoftHsm, swtpm_session: Swtpm) -> None:
    with Swtpm(tmp_path / "other") as other:  # its local CA is not configured
        server = ProvisioningServer(tmp_path / "authority", softhsm,
                                    maker_roots=swtpm_session.manufacturer_ca_paths)
        with server:
            done = server.cli("enroll", "--serial", "x1", "--tpm", other.tcti,
                              "--key-dir", str(tmp_path / "keys"))
            assert done.returncode == 1 and "unknown_tpm_maker" in done.stderr
            assert devices(server) == []


def test_witnessed_pkcs11_enrollment(service: ProvisioningServer, softhsm: SoftHsm) -> None:
    softhsm.init_token("device-token", so_pin="so-pin-1234", user_pin="user-1234")
    service.env["TESSERA_PKCS11_PIN"] = "user-1234"  # the device token's PIN for this CLI run
    done = service.cli("--json", "enroll", "--serial", "gw-1", "--kind", "broker",
                       "--pkcs11", f"{softhsm.module}#device-token/gw-key")
    assert done.returncode == 0, done.stderr
    issued = json.loads(done.stdout)
    assert issued["attestation"] == "factory-witnessed"
    assert issued["identity"].endswith("/broker/gw-1")
    [record] = devices(service)
    assert record["key_backend"] == "pkcs11" and record["enrolled_by"] == "admin"


def test_operator_authentication(service: ProvisioningServer) -> None:
    for token in (None, "tso_wrong"):
        client = ProvisionerClient(service.url, operator_token=token)
        with pytest.raises(ServiceError) as exc:
            client.call("POST", "/v1/enroll/tpm/start", {"serial": "x"})
        assert exc.value.reason is Reason.NOT_AUTHORIZED
        with pytest.raises(ServiceError):
            client.call("GET", "/v1/devices")
    done = service.cli("list")
    assert done.returncode == 0
    env_without = dict(service.env)
    env_without.pop("TESSERA_OPERATOR_TOKEN")
    service.env = env_without
    done = service.cli("list")
    assert done.returncode == 1 and "TESSERA_OPERATOR_TOKEN" in done.stderr


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/enroll/tpm/start", {}),
    ("/v1/enroll/tpm/start", {"serial": "bad serial!"}),
    ("/v1/enroll/tpm/start", {"serial": "a" * 65}),
    ("/v1/enroll/tpm/start", {"serial": 5}),
    ("/v1/enroll/tpm/start", {"serial": "ok", "kind": "user"}),
    ("/v1/enroll/tpm/evidence", {"enrollment_id": "nope-nope-nope", "evidence": {}}),
    ("/v1/enroll/tpm/finish", {"enrollment_id": 3, "secret": "AA=="}),
    ("/v1/enroll/witnessed/start", {"serial": "w", "public_key": "not base64!"}),
    ("/v1/enroll/witnessed/start", {"serial": "w", "public_key": "AAAA"}),
    ("/v1/enroll/witnessed/finish", {"enrollment_id": "x" * 20, "signature": "AA=="}),
    ("/v1/renew/challenge", {"serial": "never-enrolled"}),
    ("/v1/renew", {"renewal_id": "x" * 20, "signature": "AA=="}),
])
def test_malformed_requests_refused(service: ProvisioningServer, path: str, body: dict) -> None:  # type: ignore[type-arg]
    client = ProvisionerClient(service.url, operator_token=service.operator_token)
    with pytest.raises(ServiceError) as exc:
        client.call("POST", path, body)
    assert exc.value.reason is not None and exc.value.detail
    assert devices(service) == []


def test_malformed_evidence_every_field(service: ProvisioningServer, swtpm_session: Swtpm,
                                        tmp_path: Path) -> None:
    from device.attestation import build_evidence
    from hw.tpm import TpmBackend

    client = ProvisionerClient(service.url, operator_token=service.operator_token)
    with TpmBackend(swtpm_session.tcti, tmp_path / "keys") as backend:
        start = client.call("POST", "/v1/enroll/tpm/start", {"serial": "m1"})
        import base64

        good = build_evidence(backend, qualifying_data=base64.b64decode(start["nonce"])).to_json()
    for field in good:
        for bad in (None, 7, "", "!!!", base64.b64encode(b"\x00" * 9).decode()):
            start = client.call("POST", "/v1/enroll/tpm/start", {"serial": "m1"})
            evidence = {**good, field: bad}
            with pytest.raises(ServiceError) as exc:
                client.call("POST", "/v1/enroll/tpm/evidence",
                            {"enrollment_id": start["enrollment_id"], "evidence": evidence})
            assert exc.value.reason is not None, field
    assert devices(service) == []


def test_replayed_enrollment_step_refused(service: ProvisioningServer, swtpm_session: Swtpm,
                                          tmp_path: Path) -> None:
    """Each step's id is one-shot: replaying a captured finish cannot enroll twice."""
    import base64

    from device.attestation import ActivationChallenge, answer_challenge, build_evidence
    from hw.tpm import TpmBackend

    client = ProvisionerClient(service.url, operator_token=service.operator_token)
    with TpmBackend(swtpm_session.tcti, tmp_path / "keys") as backend:
        start = client.call("POST", "/v1/enroll/tpm/start", {"serial": "r1"})
        ev = build_evidence(backend, qualifying_data=base64.b64decode(start["nonce"]))
        step = client.call("POST", "/v1/enroll/tpm/evidence",
                           {"enrollment_id": start["enrollment_id"], "evidence": ev.to_json()})
        with pytest.raises(ServiceError) as exc:  # evidence step replayed
            client.call("POST", "/v1/enroll/tpm/evidence",
                        {"enrollment_id": start["enrollment_id"], "evidence": ev.to_json()})
        assert exc.value.reason is Reason.ENROLLMENT_EXPIRED
        secret = answer_challenge(backend, ActivationChallenge.from_json(step["challenge"]))
        finish = {"enrollment_id": step["enrollment_id"],
                  "secret": base64.b64encode(secret).decode()}
        client.call("POST", "/v1/enroll/tpm/finish", finish)
        with pytest.raises(ServiceError) as exc:
            client.call("POST", "/v1/enroll/tpm/finish", finish)
        assert exc.value.reason is Reason.ENROLLMENT_EXPIRED
    assert len(devices(service)) == 1


def test_wrong_activation_secret_refused(service: ProvisioningServer, swtpm_session: Swtpm,
                                         tmp_path: Path) -> None:
    import base64

    from device.attestation import build_evidence
    from hw.tpm import TpmBackend

    client = ProvisionerClient(service.url, operator_token=service.operator_token)
    with TpmBackend(swtpm_session.tcti, tmp_path / "keys") as backend:
        start = client.call("POST", "/v1/enroll/tpm/start", {"serial": "a1"})
        ev = build_evidence(backend, qualifying_data=base64.b64decode(start["nonce"]))
        step = client.call("POST", "/v1/enroll/tpm/evidence",
                           {"enrollment_id": start["enrollment_id"], "evidence": ev.to_json()})
        with pytest.raises(ServiceError) as exc:
            client.call("POST", "/v1/enroll/tpm/finish",
                        {"enrollment_id": step["enrollment_id"],
                         "secret": base64.b64encode(b"\x00" * 32).decode()})
        assert exc.value.reason is Reason.ACTIVATION_FAILED
    assert devices(service) == []


def test_service_killed_mid_enrollment(service: ProvisioningServer, swtpm_session: Swtpm,
                                       tmp_path: Path) -> None:
    """SIGKILL between the evidence and finish steps: no trace of the device, and the
    pending step survives the restart (it lives in the registry), so the enrollment
    still completes."""
    import base64

    from device.attestation import ActivationChallenge, answer_challenge, build_evidence
    from hw.tpm import TpmBackend

    client = ProvisionerClient(service.url, operator_token=service.operator_token)
    with TpmBackend(swtpm_session.tcti, tmp_path / "keys") as backend:
        start = client.call("POST", "/v1/enroll/tpm/start", {"serial": "k1"})
        ev = build_evidence(backend, qualifying_data=base64.b64decode(start["nonce"]))
        step = client.call("POST", "/v1/enroll/tpm/evidence",
                           {"enrollment_id": start["enrollment_id"], "evidence": ev.to_json()})
        service.kill()
        db = service.directory / "registry.db"
        with sqlite3.connect(db) as conn:
            assert conn.execute("SELECT count(*) FROM devices").fetchone()[0] == 0
        service.start()
        secret = answer_challenge(backend, ActivationChallenge.from_json(step["challenge"]))
        issued = client.call("POST", "/v1/enroll/tpm/finish",
                             {"enrollment_id": step["enrollment_id"],
                              "secret": base64.b64encode(secret).decode()})
    assert issued["identity"].endswith("/device/k1")
    assert [d["serial"] for d in devices(service)] == ["k1"]


def test_batch_enrollment(softhsm: SoftHsm, tmp_path: Path) -> None:
    # Two separately manufactured TPMs: each swtpm has its own maker CA, so the
    # service trusts both.
    with Swtpm(tmp_path / "t1") as t1, Swtpm(tmp_path / "t2") as t2, ProvisioningServer(
        tmp_path / "authority", softhsm,
        maker_roots=[*t1.manufacturer_ca_paths, *t2.manufacturer_ca_paths],
    ) as service:
        rows = [{"serial": "b1", "tpm": t1.tcti, "key_dir": str(tmp_path / "k1")},
                {"serial": "b2", "tpm": t2.tcti, "key_dir": str(tmp_path / "k2")},
                {"serial": "b3", "tpm": t1.tcti, "key_dir": str(tmp_path / "k3")}]  # same EK
        path = tmp_path / "devices.csv"
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, ["serial", "tpm", "key_dir"])
            w.writeheader()
            w.writerows(rows)
        done = service.cli("enroll", "--batch", str(path), "--out", str(tmp_path / "out"))
        assert done.returncode == 1  # b3 reuses b1's TPM
        assert "enrolled 2 of 3 devices" in done.stdout, done.stdout
        assert "b3:" in done.stdout and "--reenroll" in done.stdout
        assert "3/3" in done.stderr  # the progress bar
        assert sorted(d["serial"] for d in devices(service)) == ["b1", "b2"]
        assert (tmp_path / "out" / "b2" / "operational.pem").exists()
        assert not (tmp_path / "out" / "b3").exists()


def test_openapi_bundle_and_export(service: ProvisioningServer, tmp_path: Path) -> None:
    client = ProvisionerClient(service.url)
    spec = client.call("GET", "/openapi.json")
    assert "/v1/enroll/tpm/start" in spec["paths"]
    out = tmp_path / "bundle.pem"
    done = service.cli("export-bundle", "-o", str(out))
    assert done.returncode == 0
    assert out.read_bytes() == client.call("GET", "/v1/bundle", raw=True)


def test_cli_errors_are_one_line(tmp_path: Path, softhsm: SoftHsm) -> None:
    import subprocess
    import sys

    tessera = str(Path(sys.executable).parent / "tessera")
    cases = [
        [tessera, "init", "--dir", str(tmp_path / "a"), "--trust-domain", "t.test"],
        [tessera, "serve", "--dir", str(tmp_path / "missing")],
        [tessera, "list", "--provisioner", "http://127.0.0.1:9"],
        [tessera, "enroll", "--provisioner", "http://127.0.0.1:9", "--serial", "x"],
    ]
    for cmd in cases:
        done = subprocess.run(cmd, capture_output=True, text=True,
                              env={"PATH": "/usr/bin:/bin", "TESSERA_OPERATOR_TOKEN": "t"})
        assert done.returncode == 1, (cmd, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert done.stderr.startswith("tessera: error:")
    assert not (tmp_path / "a").exists()


# -- attacks over HTTP: each refused with its reason, the registry untouched -----------


def _start(client: ProvisionerClient, serial: str) -> tuple[str, bytes]:
    import base64

    start = client.call("POST", "/v1/enroll/tpm/start", {"serial": serial})
    return start["enrollment_id"], base64.b64decode(start["nonce"])


def test_ak_of_another_tpm_fails_activation(service: ProvisioningServer, swtpm_session: Swtpm,
                                            swtpm: Swtpm, tmp_path: Path) -> None:
    """TPM B's AK and key presented with TPM A's (trusted) EK: the challenge is sealed
    to A's EK for B's AK, so it opens in neither TPM and any answer is refused."""
    import base64
    from dataclasses import replace

    from device.attestation import ActivationChallenge, answer_challenge, build_evidence
    from hw.tpm import TpmBackend
    from structauth.errors import EnrollmentError

    client = ProvisionerClient(service.url, operator_token=service.operator_token)
    with TpmBackend(swtpm_session.tcti, tmp_path / "a") as a, \
            TpmBackend(swtpm.tcti, tmp_path / "b") as b:
        enrollment_id, nonce = _start(client, "x1")
        on_b = build_evidence(b, qualifying_data=nonce)
        ek_a = build_evidence(a, qualifying_data=nonce)
        forged = replace(on_b, ek_certificate=ek_a.ek_certificate, ek_public=ek_a.ek_public)
        step = client.call("POST", "/v1/enroll/tpm/evidence",
                           {"enrollment_id": enrollment_id, "evidence": forged.to_json()})
        challenge = ActivationChallenge.from_json(step["challenge"])
        for backend in (a, b):
            with pytest.raises(EnrollmentError) as refused:
                answer_challenge(backend, challenge)
            assert refused.value.reason is Reason.ACTIVATION_FAILED
        with pytest.raises(ServiceError) as exc:
            client.call("POST", "/v1/enroll/tpm/finish",
                        {"enrollment_id": step["enrollment_id"],
                         "secret": base64.b64encode(b"\x01" * 32).decode()})
    assert exc.value.reason is Reason.ACTIVATION_FAILED
    assert devices(service) == []
    assert "activation" in (service.log.read_text()).lower()  # refusal logged


def test_certify_of_another_key_refused(service: ProvisioningServer, swtpm_session: Swtpm,
                                        tmp_path: Path) -> None:
    from dataclasses import replace

    from device.attestation import build_evidence
    from hw.tpm import TpmBackend

    client = ProvisionerClient(service.url, operator_token=service.operator_token)
    with TpmBackend(swtpm_session.tcti, tmp_path / "keys") as backend:
        enrollment_id, nonce = _start(client, "c1")
        shown = backend.get_or_create_signing_key("other").public_area_bytes()
        evidence = replace(build_evidence(backend, qualifying_data=nonce), key_public=shown)
        with pytest.raises(ServiceError) as exc:
            client.call("POST", "/v1/enroll/tpm/evidence",
                        {"enrollment_id": enrollment_id, "evidence": evidence.to_json()})
        assert exc.value.reason is Reason.CERTIFY_MISMATCH
        # a Certify made for another enrollment's nonce (a replayed enrollment)
        old_evidence = build_evidence(backend, qualifying_data=nonce)
        enrollment_id, _ = _start(client, "c1")
        with pytest.raises(ServiceError) as exc:
            client.call("POST", "/v1/enroll/tpm/evidence",
                        {"enrollment_id": enrollment_id, "evidence": old_evidence.to_json()})
        assert exc.value.reason is Reason.CERTIFY_MISMATCH
    assert devices(service) == []


# -- a device on the network, through its agent's enrollment endpoint -------------------


def _agent_endpoint(service: ProvisioningServer, tpm: Swtpm, serial: str,
                    state: Path) -> tuple[object, str, str]:
    import subprocess
    import sys
    import time

    from simulator.provisioner import free_port

    port = free_port()
    code_file = state.parent / f"{serial}.code"
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "tessera-agent"), "enrollment-endpoint",
         "--serial", serial, "--tpm", tpm.tcti, "--state-dir", str(state),
         "--listen", f"127.0.0.1:{port}", "--code-file", str(code_file), "--timeout", "120"],
        env={k: v for k, v in service.env.items() if k != "TESSERA_OPERATOR_TOKEN"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not (code_file.exists() and code_file.read_text().strip()):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.2)
    return proc, f"http://127.0.0.1:{port}", code_file.read_text().strip()


def test_pairing_codes_read_as_values_on_a_command_line() -> None:
    """A code that began with '-' (URL-safe base64 did, one time in 64) was taken by
    argparse for an option: `tessera enroll --device-code -xyz...` failed in CI."""
    import re

    from device.enrollment_endpoint import new_pairing_code
    from provisioning.cli import build_parser

    codes = {new_pairing_code() for _ in range(4096)}
    assert len(codes) == 4096
    assert all(re.fullmatch(r"[A-Z2-7]{4}(-[A-Z2-7]{4}){7}", c) for c in codes)
    parser = build_parser()
    for code in list(codes)[:64]:
        args = parser.parse_args(["enroll", "--device", "http://127.0.0.1:1",
                                  "--device-code", code])
        assert args.device_code == code


def test_enroll_device_over_the_network(service: ProvisioningServer, swtpm_session: Swtpm,
                                        tmp_path: Path) -> None:
    state = tmp_path / "device-state"
    proc, url, code = _agent_endpoint(service, swtpm_session, "net-1", state)
    try:
        wrong = service.cli("enroll", "--device", url, "--device-code", "not-the-code")
        assert wrong.returncode == 1 and len(wrong.stderr.strip().splitlines()) == 1
        assert "pairing code" in wrong.stderr
        assert devices(service) == []
        done = service.cli("--json", "enroll", "--device", url, "--device-code", code)
        assert done.returncode == 0, done.stderr
        out, _ = proc.communicate(timeout=30)  # type: ignore[attr-defined]
    finally:
        proc.kill()  # type: ignore[attr-defined]
    assert proc.returncode == 0 and "enrolled as" in out  # type: ignore[attr-defined]
    issued = json.loads(done.stdout)
    assert issued["attestation"] == "tpm-attested"
    assert (state / "operational.pem").read_text() == issued["operational_credential"]
    assert json.loads((state / "agent.json").read_text())["serial"] == "net-1"
    assert [d["serial"] for d in devices(service)] == ["net-1"]
    # the device renews on its own with what the endpoint stored
    import subprocess
    import sys

    renewed = subprocess.run(
        [str(Path(sys.executable).parent / "tessera-agent"), "renew", "--state-dir", str(state),
         "--provisioner", service.url], capture_output=True, text=True, env=service.env)
    assert renewed.returncode == 0, renewed.stderr


def test_device_refuses_credentials_for_another_key(service: ProvisioningServer,
                                                    swtpm_session: Swtpm,
                                                    tmp_path: Path) -> None:
    from device.enrollment_endpoint import EnrollmentEndpoint, RemoteDevice
    from device.provisioner import LocalTpm
    from hw.tpm import TpmBackend

    other = enroll(service, swtpm_session, "someone-else", tmp_path / "other-keys")
    stored: list[object] = []
    with TpmBackend(swtpm_session.tcti, tmp_path / "keys") as backend:
        endpoint = EnrollmentEndpoint(LocalTpm(backend), "net-2", stored.append).start()
        try:
            device = RemoteDevice(endpoint.url, endpoint.code)
            with pytest.raises(Exception) as exc:
                device.deliver(other)
            assert getattr(exc.value, "reason", None) is Reason.BAD_CREDENTIAL
            assert stored == [] and not endpoint.enrolled.is_set()
        finally:
            endpoint.close()


# -- HTTPS and the PostgreSQL registry, end to end -------------------------------------


def test_https_service_on_postgresql(softhsm: SoftHsm, swtpm_session: Swtpm, tmp_path: Path,
                                     postgres_server: object) -> None:
    import datetime as dt

    from structauth.errors import CredentialError

    url = postgres_server.create_database()  # type: ignore[attr-defined]
    with ProvisioningServer(tmp_path / "authority", softhsm, tls=True, registry_url=url,
                            maker_roots=swtpm_session.manufacturer_ca_paths,
                            operational_lifetime_minutes=5) as service:
        assert service.url.startswith("https://")
        issued = enroll(service, swtpm_session, "pg-1", tmp_path / "keys")
        validate(issued)
        # five-minute operational credential: unrenewed, it stops working like a revocation
        cred = Credential.from_pem(issued["operational_credential"].encode())
        assert cred.not_after - dt.datetime.now(dt.UTC) <= dt.timedelta(minutes=5)
        store = TrustStore(x509.load_pem_x509_certificates(issued["bundle"].encode()),
                           cred.identity.trust_domain)
        later = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=11)
        with pytest.raises(CredentialError) as exc:
            store.validate(cred, TimePolicy.trusted(later))
        assert exc.value.reason is Reason.CREDENTIAL_EXPIRED
        service.restart()
        done = service.cli("--json", "renew", "--serial", "pg-1", "--tpm", swtpm_session.tcti,
                           "--key-dir", str(tmp_path / "keys"))
        assert done.returncode == 0, done.stderr
        service.cli("revoke", "pg-1", check=True)
        [record] = devices(service)
        assert record["status"] == "revoked"
        # without the service's CA the client refuses the connection, in one line
        env = {k: v for k, v in service.env.items() if k != "TESSERA_CAFILE"}
        import subprocess
        import sys

        done = subprocess.run([str(Path(sys.executable).parent / "tessera"), "list"],
                              env=env, capture_output=True, text=True)
        assert done.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    # the records are in PostgreSQL, not in a file next to the authority
    assert not (tmp_path / "authority" / "registry.db").exists()
    from provisioning.registry import open_registry

    with open_registry(url) as registry:
        assert [(r.serial, r.status) for r in registry.list()] == [("pg-1", "revoked")]
        assert len(registry.revocations()) == 1


def test_revocation_feed_long_poll_and_catch_up(service: ProvisioningServer,
                                                softhsm: SoftHsm) -> None:
    """A broker long-polls the feed and is woken by a revocation; one that was offline
    catches up from the last id it saw, in order, nothing missed."""
    import threading
    import time

    from device.provisioner import enroll_witnessed
    from hw.software import InsecureSoftwareSigner

    operator = ProvisionerClient(service.url, operator_token=service.operator_token)
    for i in range(3):
        enroll_witnessed(operator, InsecureSoftwareSigner.generate(), f"feed-{i}")
    feed = ProvisionerClient(service.url)
    got: list[dict] = []  # type: ignore[type-arg]

    def poll() -> None:
        t0 = time.monotonic()
        got.extend(feed.call("GET", "/v1/revocations?since=0&wait=30")["events"])
        got.append({"elapsed": time.monotonic() - t0})

    poller = threading.Thread(target=poll)
    poller.start()
    time.sleep(0.3)
    service.cli("revoke", "feed-0", check=True)
    poller.join(timeout=30)
    assert [e.get("serial") for e in got[:-1]] == ["feed-0"]
    assert got[-1]["elapsed"] < 20  # woken by the revocation, not by the 30 s deadline
    # offline broker: last saw event 1; two more revocations happen; it catches up
    service.cli("revoke", "feed-1", check=True)
    service.cli("revoke", "feed-2", check=True)
    events = feed.call("GET", "/v1/revocations?since=1")["events"]
    assert [(e["id"], e["serial"]) for e in events] == [(2, "feed-1"), (3, "feed-2")]
    assert feed.call("GET", "/v1/revocations?since=3&wait=0.2")["events"] == []
    with pytest.raises(ServiceError):
        feed.call("GET", "/v1/revocations?since=abc")
