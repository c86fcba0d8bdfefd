"""The device's side of enrollment and renewal, over HTTP(S) to the provisioning
service. Standard library only (urllib), so a Pi install pulls in nothing more."""

from __future__ import annotations

import base64
import datetime as dt
import http.client
import json
import logging
import os
import shutil
import ssl
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from device.attestation import (
    DEFAULT_AK_NAME,
    DEFAULT_KEY_NAME,
    ActivationChallenge,
    TpmEvidence,
    answer_challenge,
    build_evidence,
)
from structauth.errors import (
    ConfigurationError,
    EnrollmentError,
    MalformedMessage,
    Reason,
    TesseraError,
)
from structauth.keys import Signer
from structauth.possession import LABEL_ENROLL, LABEL_RENEW, possession_digest

log = logging.getLogger("tessera.agent")


def pop_signature(signer: Signer, label: bytes, nonce: bytes, serial: str) -> bytes:
    return signer.sign_digest(possession_digest(label, nonce, serial))


class ServiceError(TesseraError):
    """The provisioning service refused a request; ``reason`` is the service's.

    ``answered`` is True when the service answered (an HTTP error with its reason): the
    request was refused and nothing was recorded. False means the request may or may
    not have reached it (connection refused, reset or timed out, an answer that was not
    the service's): a caller that sent a recording step must treat it as maybe done."""

    def __init__(self, detail: str, reason: Reason | None = None, *,
                 answered: bool = False) -> None:
        super().__init__(detail, reason)
        self.answered = answered


class ProvisionerClient:
    def __init__(
        self,
        url: str,
        *,
        operator_token: str | None = None,
        cafile: str | None = None,
        timeout: float = 30.0,
        peer: str = "the provisioning service",
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ConfigurationError(f"provisioner URL {url!r} must start with http:// or https://")
        self.url = url.rstrip("/")
        self.token = operator_token
        self.timeout = timeout
        self.peer = peer  # who we talk to, for error messages
        self._ctx = ssl.create_default_context(cafile=cafile) if url.startswith("https") else None

    def call(
        self, method: str, path: str, body: dict[str, Any] | None = None, *, raw: bool = False
    ) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self._ctx) as resp:
                payload = resp.read()
                kind = resp.headers.get("Content-Type", "no Content-Type")
        except urllib.error.HTTPError as exc:
            raise _service_error(exc, self.peer) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise ServiceError(
                f"cannot reach {self.peer} at {self.url}: {reason}",
                Reason.BACKEND_UNAVAILABLE,
            ) from None
        except ValueError as exc:  # http.client.InvalidURL: a space or newline in the path
            raise ServiceError(f"cannot send {method} {path!r}: {exc}",
                               Reason.BAD_PARAMETERS) from None
        if raw:
            return payload
        try:
            return json.loads(payload)
        except ValueError:
            raise ServiceError(
                f"{self.url} answered {method} {path} with {len(payload)} bytes of {kind} "
                f"that are not JSON: is it {self.peer}? (check the URL)",
                Reason.MALFORMED,
            ) from None


def _service_error(exc: urllib.error.HTTPError, peer: str) -> ServiceError:
    try:
        info = json.loads(exc.read())
        reason = Reason(int(info["code"]))
        return ServiceError(str(info["detail"]), reason, answered=True)
    except (ValueError, KeyError, TypeError, OSError, http.client.HTTPException):
        # not the service's JSON error: a proxy or another server answered, so the
        # request may not have reached the service (answered=False)
        return ServiceError(f"{peer} answered HTTP {exc.code}", Reason.MALFORMED)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(value: str) -> bytes:
    return base64.b64decode(value, validate=True)


Progress = Callable[[str], None]


def _no_progress(step: str) -> None:
    pass


class Attester(Protocol):
    """A TPM that can answer the enrollment's two questions: the device's own TPM
    (:class:`LocalTpm`) or one reached over the network through its agent's
    enrollment endpoint (``device.enrollment_endpoint.RemoteDevice``)."""

    def evidence(self, nonce: bytes) -> TpmEvidence: ...

    def activate(self, challenge: ActivationChallenge) -> bytes: ...


@dataclass
class LocalTpm:
    backend: Any  # hw.tpm.TpmBackend
    key_name: str = DEFAULT_KEY_NAME
    ak_name: str = DEFAULT_AK_NAME

    def evidence(self, nonce: bytes) -> TpmEvidence:
        return build_evidence(
            self.backend, key_name=self.key_name, ak_name=self.ak_name, qualifying_data=nonce
        )

    def activate(self, challenge: ActivationChallenge) -> bytes:
        return answer_challenge(self.backend, challenge, ak_name=self.ak_name)

    def public_key(self) -> ec.EllipticCurvePublicKey:
        key: ec.EllipticCurvePublicKey = self.backend.get_or_create_signing_key(
            self.key_name
        ).public_key()
        return key


def enroll_attested(
    client: ProvisionerClient,
    attester: Attester,
    serial: str,
    *,
    kind: str = "device",
    device_class: str = "default",
    reenroll: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """The three-step TPM enrollment: nonce -> evidence -> activation -> credentials.

    ``progress`` (if given) is called with "accepted" once the service accepted the
    request and with "finishing" just before the step that records the device."""
    step = progress or _no_progress
    start = client.call(
        "POST",
        "/v1/enroll/tpm/start",
        {"serial": serial, "kind": kind, "device_class": device_class, "reenroll": reenroll},
    )
    step("accepted")
    evidence = attester.evidence(unb64(start["nonce"]))
    step2 = client.call(
        "POST",
        "/v1/enroll/tpm/evidence",
        {"enrollment_id": start["enrollment_id"], "evidence": evidence.to_json()},
    )
    secret = attester.activate(ActivationChallenge.from_json(step2["challenge"]))
    step("finishing")
    result: dict[str, Any] = client.call(
        "POST",
        "/v1/enroll/tpm/finish",
        {"enrollment_id": step2["enrollment_id"], "secret": b64(secret)},
    )
    return result


def enroll_tpm(
    client: ProvisionerClient,
    backend: Any,
    serial: str,
    *,
    kind: str = "device",
    device_class: str = "default",
    reenroll: bool = False,
    key_name: str = DEFAULT_KEY_NAME,
    ak_name: str = DEFAULT_AK_NAME,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """TPM enrollment of this device's own TPM (a hw.tpm.TpmBackend); the answer is
    checked against the TPM's key before it is returned."""
    local = LocalTpm(backend, key_name, ak_name)
    issued = enroll_attested(
        client, local, serial, kind=kind, device_class=device_class, reenroll=reenroll,
        progress=progress,
    )
    check_issued(issued, local.public_key(), serial)
    return issued


def check_issued(
    issued: Any, key: ec.EllipticCurvePublicKey, serial: str, *, now: dt.datetime | None = None
) -> None:
    """Refuse credentials that are not for this device's key and serial, or that do
    not chain to the bundle they came with (a confused or hostile service, or a
    station pushing someone else's credentials)."""
    from structauth.credentials import Credential, TimePolicy, TrustStore

    try:
        bundle = x509.load_pem_x509_certificates(issued["bundle"].encode())
        pems = [issued["operational_credential"]]
        if issued.get("enrollment_credential"):
            pems.append(issued["enrollment_credential"])
        creds = [Credential.from_pem(p.encode()) for p in pems]
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise EnrollmentError(
            f"the issued credentials are malformed: {exc}", Reason.BAD_CREDENTIAL
        ) from None
    mine = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    policy = TimePolicy.trusted(now or dt.datetime.now(dt.UTC))
    for cred in creds:
        theirs = cred.public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if theirs != mine:
            raise EnrollmentError(
                "the issued credential is for another key than this device's",
                Reason.BAD_CREDENTIAL,
            )
        if cred.identity.name != serial or cred.identity.uri != issued.get("identity"):
            raise EnrollmentError(
                f"the issued credential names {cred.identity.uri}, not serial {serial}",
                Reason.WRONG_IDENTITY,
            )
        TrustStore(bundle, cred.identity.trust_domain).validate(cred, policy)


def enroll_witnessed(
    client: ProvisionerClient,
    signer: Signer,
    serial: str,
    *,
    kind: str = "device",
    device_class: str = "default",
    reenroll: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Factory-witnessed enrollment of a PKCS#11 key: the operator vouches for the
    device; the device proves it holds the key. ``progress`` as for enroll_attested."""
    step = progress or _no_progress
    spki = signer.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    start = client.call(
        "POST",
        "/v1/enroll/witnessed/start",
        {
            "serial": serial,
            "kind": kind,
            "device_class": device_class,
            "reenroll": reenroll,
            "public_key": b64(spki),
            "key_backend": signer.backend,
        },
    )
    step("accepted")
    sig = pop_signature(signer, LABEL_ENROLL, unb64(start["nonce"]), serial)
    step("finishing")
    result: dict[str, Any] = client.call(
        "POST",
        "/v1/enroll/witnessed/finish",
        {"enrollment_id": start["enrollment_id"], "signature": b64(sig)},
    )
    check_issued(result, signer.public_key(), serial)
    return result


def renew(client: ProvisionerClient, signer: Signer, serial: str) -> dict[str, Any]:
    """Get a fresh operational credential by signing the service's nonce."""
    challenge = client.call("POST", "/v1/renew/challenge", {"serial": serial})
    sig = pop_signature(signer, LABEL_RENEW, unb64(challenge["nonce"]), serial)
    result: dict[str, Any] = client.call(
        "POST", "/v1/renew", {"renewal_id": challenge["renewal_id"], "signature": b64(sig)}
    )
    check_issued(result, signer.public_key(), serial)
    return result


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Create ``path`` (never an existing one) holding ``data``, flushed to disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise


@dataclass
class CredentialStore:
    """Where a device keeps its credentials: PEM files (operational.pem, bundle.pem,
    enrollment.pem) and ``identity``.

    :meth:`save` is all or nothing as far as a file system allows: a new directory is
    filled under a temporary name and renamed into place; in an existing one (an
    agent's state directory) every file is first written and synced under a temporary
    name, then all are renamed over the old ones. An error removes what was written;
    the old credentials stay as they were."""

    directory: Path

    @staticmethod
    def files(issued: dict[str, Any]) -> dict[str, bytes]:
        files = {
            "operational.pem": issued["operational_credential"].encode(),
            "bundle.pem": issued["bundle"].encode(),
        }
        if issued.get("enrollment_credential"):
            files["enrollment.pem"] = issued["enrollment_credential"].encode()
        files["identity"] = (issued["identity"] + "\n").encode()
        return files

    @classmethod
    def stage(cls, issued: dict[str, Any], into: Path) -> None:
        """Write the credential files into the (existing) directory ``into``, synced."""
        for name, data in cls.files(issued).items():
            target = into / name
            target.unlink(missing_ok=True)  # a leftover of an interrupted run
            write_synced(target, data)
        fsync_dir(into)

    def install(self, staged: Path) -> None:
        """Move the files :meth:`stage` wrote in ``staged`` into place: rename the
        whole directory when ours is missing or empty, else replace file by file."""
        target = self.directory
        if not target.exists() or (target.is_dir() and not any(target.iterdir())):
            staged.chmod(0o755)
            os.replace(staged, target)  # rename(2) may replace an empty directory
            fsync_dir(target.parent)
            return
        for path in sorted(staged.iterdir()):
            if not path.name.startswith("."):  # a caller's own bookkeeping stays
                os.replace(path, target / path.name)
        fsync_dir(target)

    def save(self, issued: dict[str, Any]) -> None:
        target = self.directory
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() and not target.is_dir():
            raise ConfigurationError(f"{target} exists and is not a directory")
        # staged next to the directory (a new one) or inside it (an existing one), so
        # the final renames never cross a file system
        where = target if target.is_dir() else target.parent
        staged = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=where))
        try:
            self.stage(issued, staged)
            self.install(staged)
        finally:
            shutil.rmtree(staged, ignore_errors=True)

    def load(self, name: str = "operational.pem") -> bytes:
        path = self.directory / name
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise ConfigurationError(f"no {name} in {self.directory}: enroll first") from None


#: the station's broker facts, delivered inside ``issued`` (so the binding covers them)
AGENT_TOML, BROKER_CA = "agent.toml", "broker-ca.pem"
MAX_AGENT_TOML = 4096


def agent_files(issued: dict[str, Any], state_dir: Path) -> dict[str, bytes]:
    """agent.toml (and the broker's TLS CA) from the station's ``agent_toml`` and
    ``broker_ca`` fields: nothing when the station did not send them, nothing when the
    state directory already holds an agent.toml (the operator's, kept with the CA it
    names). MalformedMessage for a field that is not what a station sends, before
    anything is stored."""
    toml, ca = issued.get("agent_toml"), issued.get("broker_ca")
    if toml is None and ca is None:
        return {}
    import tomllib

    try:
        if not isinstance(toml, str) or len(toml) > MAX_AGENT_TOML:
            raise ValueError
        # an [mqtt] table, its host filled in or (the station did not know the
        # broker) left for the operator: the template 'tessera-agent run' then names
        mqtt = tomllib.loads(toml).get("mqtt")
        if not isinstance(mqtt, dict) or not isinstance(mqtt.get("host", ""), str):
            raise ValueError
    except ValueError:  # tomllib.TOMLDecodeError too
        raise MalformedMessage(f"field 'agent_toml' must be an agent.toml of at most "
                               f"{MAX_AGENT_TOML} characters with an [mqtt] table") from None
    files = {AGENT_TOML: toml.encode()}
    if ca is not None:
        try:
            if not isinstance(ca, str) or not x509.load_pem_x509_certificates(ca.encode()):
                raise ValueError
        except ValueError:
            raise MalformedMessage("field 'broker_ca' must be PEM certificates") from None
        files[BROKER_CA] = ca.encode()
    if (state_dir / AGENT_TOML).exists():
        log.info("%s already holds an agent.toml: kept, the station's not written", state_dir)
        return {}
    return files


_FILES = " state files"  # no field of the service's: only _StateStore reads it


class _StateStore(CredentialStore):
    """The credentials and the agent's files, staged and installed together by
    :meth:`CredentialStore.save` (all or nothing)."""

    @staticmethod
    def files(issued: dict[str, Any]) -> dict[str, bytes]:
        return {**CredentialStore.files(issued), **issued[_FILES]}


def save_device_state(state_dir: Path, agent_json: dict[str, Any],
                      issued: dict[str, Any]) -> None:
    """What an enrolled device keeps, by whichever path it was enrolled (network,
    enrollment endpoint, BLE): its credentials, the agent's state (agent.json) and,
    when the station sent the broker facts, agent.toml and the broker's CA
    (:func:`agent_files`), written all or nothing (one staged directory); a malformed
    field is refused before anything is written."""
    files = {**agent_files(issued, state_dir),
             "agent.json": json.dumps(agent_json, indent=1).encode()}
    _StateStore(state_dir).save({**issued, _FILES: files})
