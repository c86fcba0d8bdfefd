"""Deterministic SA1 test vectors: build them, or check the committed ones.

    .venv/bin/python -m tests.make_vectors      # (re)write tests/vectors/*.json

Every random choice comes from a seed; the one exception is ML-KEM encapsulation,
which OpenSSL does not expose with a seed, so the vector records its (shared secret,
ciphertext) and the check replays it (the initiator still decapsulates it for real).
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from hw.software import InsecureSoftwareSigner
from provisioning.certificates import issue_credential, make_authority
from structauth.credentials import Credential, Identity, TimePolicy, TrustStore
from structauth.entropy import DeterministicEntropy
from structauth.handshake import Initiator, Responder
from structauth.params import SessionParams

VECTOR_DIR = Path(__file__).parent / "vectors"
TRUST_DOMAIN = "vectors.tessera.test"
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
POLICY = TimePolicy.trusted(T0 + dt.timedelta(days=1))
START = 100.0

MESSAGES = [
    # (sender, seconds after the handshake, action, payload)
    ("initiator", 0.0, "devices/d1/telemetry/temp", '{"t":21.5}'),
    ("initiator", 0.5, "devices/d1/telemetry/temp", '{"t":21.6}'),
    ("responder", 1.0, "devices/d1/commands/reboot", "now"),
    ("initiator", 12.0, "devices/d1/telemetry/temp", '{"t":21.7}'),
    ("initiator", 25.0, "devices/d1/telemetry/empty", ""),
    ("responder", 31.0, "POST /sensors/1?unit=c", "x" * 120),
]

CASES: dict[str, dict[str, Any]] = {
    "sa1-tagged": {"sealed": False},
    "sa1-sealed": {"sealed": True},
}


def _chain(cert: Any) -> list[str]:
    return [cert.public_bytes(Encoding.DER).hex()]


def _fresh_credentials() -> dict[str, Any]:
    """Authority and credentials for a new vector (only when writing)."""
    key = ec.derive_private_key(0xA11CE, ec.SECP256R1())
    root = make_authority(TRUST_DOMAIN, key, not_before=T0, not_after=T0 + dt.timedelta(days=3650))
    out: dict[str, Any] = {"root": root.public_bytes(Encoding.DER).hex()}
    for role, path in (("device", "device/d1"), ("broker", "broker/b1")):
        signer = InsecureSoftwareSigner.from_seed(f"vector {role} key".encode())
        ident = Identity.parse(f"spiffe://{TRUST_DOMAIN}/{path}")
        cert = issue_credential(
            root,
            key,
            signer.public_key(),
            ident,
            not_before=T0,
            not_after=T0 + dt.timedelta(days=365),
        )
        out[f"{role}_key_seed"] = f"vector {role} key"
        out[f"{role}_chain"] = _chain(cert)
    return out


def run(case: dict[str, Any]) -> dict[str, Any]:
    """Run one vector from its inputs; returns the inputs plus every output."""
    from cryptography import x509

    root = x509.load_der_x509_certificate(bytes.fromhex(case["root"]))
    trust = TrustStore([root], TRUST_DOMAIN)

    def member(role: str) -> tuple[InsecureSoftwareSigner, Credential]:
        signer = InsecureSoftwareSigner.from_seed(case[f"{role}_key_seed"].encode())
        cred = Credential.from_der_chain([bytes.fromhex(c) for c in case[f"{role}_chain"]])
        return signer, cred

    d_signer, d_cred = member("device")
    b_signer, b_cred = member("broker")
    params = SessionParams(sealed=case["sealed"])
    recorded = [
        (bytes.fromhex(e["shared_secret"]), bytes.fromhex(e["ciphertext"]))
        for e in case.get("encapsulations", [])
    ]
    r_entropy = DeterministicEntropy(b"vector responder", recorded)
    ini = Initiator(
        signer=d_signer,
        credential=d_cred,
        trust=trust,
        entropy=DeterministicEntropy(b"vector initiator"),
    )
    res = Responder(
        signer=b_signer, credential=b_cred, trust=trust, params=params, entropy=r_entropy
    )
    msg1 = ini.start(context=b"vector context")
    answered = res.accept(msg1, START, POLICY)
    done = ini.receive(answered.reply, START, POLICY)
    sessions = {"initiator": done.session, "responder": answered.session}
    peers = {"initiator": "responder", "responder": "initiator"}
    messages = []
    for sender, offset, action, payload in MESSAGES:
        now = START + offset
        header, body = sessions[sender].protect(action.encode(), payload.encode(), now)
        got = sessions[peers[sender]].verify(header, action.encode(), body, now)
        assert got.payload == payload.encode()
        messages.append(
            {
                "from": sender,
                "time": now,
                "action": action,
                "payload": payload,
                "header": header.hex(),
                "body": body.hex(),
            }
        )
    out = {k: v for k, v in case.items() if k not in ("outputs",)}
    out["encapsulations"] = [
        {"shared_secret": s.hex(), "ciphertext": c.hex()} for s, c in r_entropy.encapsulations
    ]
    out["outputs"] = {
        "msg1": msg1.hex(),
        "msg2": answered.reply.hex(),
        "session_id": done.session.session_id.hex(),
        "messages": messages,
    }
    return out


def main() -> int:
    VECTOR_DIR.mkdir(exist_ok=True)
    for name, flags in CASES.items():
        case = {
            "description": f"SA1 handshake and messages, {name}",
            **flags,
            "trust_domain": TRUST_DOMAIN,
            **_fresh_credentials(),
        }
        result = run(case)
        (VECTOR_DIR / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
