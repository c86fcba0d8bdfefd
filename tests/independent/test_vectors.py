"""tests/vectors/*.json reproduced by the implementation written from docs/PROTOCOL.md:
every intermediate value, every message, and every negative vector refused with the
reason it names.

The vector format is described in tests/vectors/README.md. Nothing of Tessera's own code
is used: the vectors' inputs (private keys, ephemeral values, the recorded ML-KEM
encapsulation) drive this implementation, and its outputs must equal the recorded ones.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, mlkem

from . import sa1_reference as sa1

VECTOR_DIR = Path(__file__).parent.parent / "vectors"
FILES = sorted(VECTOR_DIR.glob("*.json"))
FORMAT = "tessera-sa1-vectors/2"


def _load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def h(value: str) -> bytes:
    return bytes.fromhex(value)


class Vector:
    """One vector file, with this implementation's view of its inputs."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        inp = data["inputs"]
        self.inp = inp
        self.hs: dict[str, str] = data["handshake"]
        self.root = x509.load_der_x509_certificate(h(inp["root_certificate"]))
        self.trust = sa1.Trust((self.root,), inp["trust_domain"])
        self.policy = self.policy_at(inp["policy_time"])
        self.t0: float = inp["handshake_time"]
        p = inp["params"]
        self.params = sa1.Params(p["epoch_ms"], p["skew_epochs"], p["lifetime_s"], p["sealed"],
                                 p["replay_window"], h(p["policy_digest"]))
        self.ini_id: str = inp["initiator"]["identity"]
        self.res_id: str = inp["responder"]["identity"]
        self.ini_key = self.private_key(inp["initiator"]["private_key"])
        self.res_key = self.private_key(inp["responder"]["private_key"])
        self.ini_chain = [h(c) for c in inp["initiator"]["chain"]]
        self.res_chain = [h(c) for c in inp["responder"]["chain"]]
        self.x_i = h(inp["initiator_x25519_private"])
        self.seed_i = h(inp["initiator_mlkem_seed"])
        self.x_r = h(inp["responder_x25519_private"])
        enc = inp["mlkem_encapsulation"]
        self.encapsulation = (h(enc["shared_secret"]), h(enc["ciphertext"]))

    @staticmethod
    def policy_at(iso: str) -> sa1.TimePolicy:
        return sa1.TimePolicy(now=datetime.fromisoformat(iso))

    @staticmethod
    def private_key(hex_scalar: str) -> ec.EllipticCurvePrivateKey:
        return ec.derive_private_key(int(hex_scalar, 16), ec.SECP256R1())

    @staticmethod
    def signer(key: ec.EllipticCurvePrivateKey, label: bytes) -> Callable[[bytes], bytes]:
        """RFC 6979 deterministic ECDSA P-256 over label || data (SHA-256)."""
        algorithm = ec.ECDSA(hashes.SHA256(), deterministic_signing=True)
        return lambda data: key.sign(label + data, algorithm)

    def msg1(self) -> bytes:
        inp = self.inp
        return sa1.build_msg1(
            nonce=h(inp["initiator_nonce"]), x25519_private=self.x_i, mlkem_seed=self.seed_i,
            chain=self.ini_chain, responder=self.res_id, context=h(inp["context"]),
            quote=h(inp["quote"]), signature=self.signer(self.ini_key, sa1.LABEL_MSG1_SIG))

    def accept(
        self, msg1: bytes, now: float, *, policy: sa1.TimePolicy | None = None,
        nonces: sa1.NonceCache | None = None, recorded: bool = True,
    ) -> sa1.Answer:
        """The responder's msg1 rules and msg2 (§4.7)."""
        checked = sa1.responder_check_msg1(
            msg1, now, own_identity=self.res_id, trust=self.trust, policy=policy or self.policy,
            nonces=nonces)
        return sa1.responder_answer(
            checked, now, nonce_r=h(self.inp["responder_nonce"]), x25519_private=self.x_r,
            encapsulation=self.encapsulation if recorded else checked.ek.encapsulate(),
            params=self.params, chain=self.res_chain,
            signature=self.signer(self.res_key, sa1.LABEL_MSG2_SIG), nonces=nonces,
            pending_timeout=self.inp["pending_timeout"])

    def receive(self, msg1: bytes, msg2: bytes, now: float) -> sa1.Completed:
        return sa1.initiator_process_msg2(
            msg1, msg2, now, x25519_private=self.x_i, mlkem_seed=self.seed_i,
            expected=self.res_id, trust=self.trust, policy=self.policy)

    def sessions(self) -> tuple[sa1.Session, sa1.Session, list[dict[str, Any]]]:
        """Both sessions after the genuine handshake and the whole message plan."""
        msg1 = self.msg1()
        answer = self.accept(msg1, self.t0)
        done = self.receive(msg1, answer.msg2, self.t0)
        responder = sa1.responder_confirm(answer.pending, done.msg3, self.t0)
        initiator = done.session
        out = []
        for plan in self.inp["messages"]:
            src, dst = (initiator, responder) if plan["from"] == "initiator" else \
                (responder, initiator)
            now = self.t0 + plan["time"]
            src.next_seq = plan["seq"]
            action, payload = h(plan["action"]), h(plan["payload"])
            header, body = src.protect(action, payload, now)
            got = dst.verify(header, action, body, now)
            assert got == payload
            out.append({"from": plan["from"], "time": now, "header": header, "body": body,
                        "action": action, "payload": payload})
        return initiator, responder, out


VECTORS = {p.stem: Vector(_load(p)) for p in FILES if _load(p).get("format") == FORMAT}


def test_vectors_present_and_version_2() -> None:
    assert {p.stem for p in FILES} >= {"sa1-tagged", "sa1-sealed"}
    for p in FILES:
        assert _load(p).get("format") == FORMAT, f"{p.name} is not an SA1 v2 vector file"


@pytest.fixture(params=sorted(VECTORS))
def vec(request: pytest.FixtureRequest) -> Vector:
    return VECTORS[request.param]


def test_inputs_consistent(vec: Vector) -> None:
    hs = vec.hs
    for who, key, chain in (("initiator", vec.ini_key, vec.ini_chain),
                            ("responder", vec.res_key, vec.res_chain)):
        cred = sa1.parse_credential(chain)
        assert cred.identity == vec.inp[who]["identity"]
        assert cred.key.public_numbers() == key.public_key().public_numbers()
    assert sa1.x25519_public(vec.x_i).hex() == hs["initiator_x25519_public"]
    assert sa1.x25519_public(vec.x_r).hex() == hs["responder_x25519_public"]
    ek = mlkem.MLKEM768PrivateKey.from_seed_bytes(vec.seed_i)
    assert ek.public_key().public_bytes_raw().hex() == hs["initiator_mlkem_ek"]
    # the recorded encapsulation is genuine: the initiator's decapsulation agrees
    assert ek.decapsulate(vec.encapsulation[1]) == vec.encapsulation[0]


def test_msg1_reproduced(vec: Vector) -> None:
    hs = vec.hs
    msg1 = vec.msg1()
    assert msg1.hex() == hs["msg1"]
    m = sa1.parse_msg1(msg1)
    assert m.signed.hex() == hs["msg1_signed"]
    sig_input = sa1.LABEL_MSG1_SIG + m.signed
    assert sig_input.hex() == hs["msg1_signature_input"]
    assert hashlib.sha256(sig_input).hexdigest() == hs["msg1_signature_digest"]
    assert m.signature.hex() == hs["msg1_signature"]
    sa1.verify_signature(vec.ini_key.public_key(), m.signature, sa1.LABEL_MSG1_SIG, m.signed)
    assert m.responder == vec.res_id and m.nonce.hex() == vec.inp["initiator_nonce"]
    assert m.context.hex() == vec.inp["context"] and m.quote.hex() == vec.inp["quote"]


def test_msg2_and_key_schedule_reproduced(vec: Vector) -> None:
    hs = vec.hs
    msg1 = h(hs["msg1"])
    answer = vec.accept(msg1, vec.t0)
    assert answer.body2.hex() == hs["msg2_body"]
    th_input = sa1.LABEL_TRANSCRIPT + sa1.u32(len(msg1)) + msg1 + sa1.u32(len(answer.body2)) \
        + answer.body2
    assert th_input.hex() == hs["transcript_hash_input"]
    assert answer.th.hex() == hs["transcript_hash"] == hashlib.sha256(th_input).hexdigest()
    assert answer.ss_x.hex() == hs["x25519_shared_secret"]
    assert vec.encapsulation[0].hex() == hs["mlkem_shared_secret"]
    keys = answer.keys
    assert (answer.ss_x + vec.encapsulation[0]).hex() == hs["hkdf_ikm"]
    assert hs["hkdf_salt"] == hs["transcript_hash"]
    assert sa1.LABEL_KEYS.hex() == hs["hkdf_info"]
    assert keys.prk.hex() == hs["hkdf_prk"] and keys.okm.hex() == hs["hkdf_okm"]
    assert len(keys.okm) == 136
    assert (keys.session_id.hex(), keys.ck_i2r.hex(), keys.ck_r2i.hex(),
            keys.k_confirm_r.hex(), keys.k_confirm_i.hex()) == (
        hs["session_id"], hs["ck_i2r"], hs["ck_r2i"], hs["k_confirm_r"], hs["k_confirm_i"])
    sig2_input = sa1.LABEL_MSG2_SIG + answer.th
    assert sig2_input.hex() == hs["msg2_signature_input"]
    assert hashlib.sha256(sig2_input).hexdigest() == hs["msg2_signature_digest"]
    m2 = sa1.parse_msg2(answer.msg2)
    assert m2.signature.hex() == hs["msg2_signature"]
    sa1.verify_signature(vec.res_key.public_key(), m2.signature, sa1.LABEL_MSG2_SIG, answer.th)
    assert hs["msg2_mac_key"] == hs["k_confirm_r"]
    assert sa1.mac_r_input(answer.th, m2.signature).hex() == hs["msg2_mac_input"]
    assert m2.mac_r.hex() == hs["msg2_mac"]
    assert answer.msg2.hex() == hs["msg2"]
    assert m2.params == vec.params


def test_msg3_reproduced_and_confirms(vec: Vector) -> None:
    hs = vec.hs
    msg1, msg2 = h(hs["msg1"]), h(hs["msg2"])
    done = vec.receive(msg1, msg2, vec.t0)
    assert done.th.hex() == hs["transcript_hash"]
    assert done.ss_x.hex() == hs["x25519_shared_secret"]
    assert done.ss_k.hex() == hs["mlkem_shared_secret"]  # decapsulated for real
    assert hs["msg3_mac_key"] == hs["k_confirm_i"]
    mac_input = sa1.mac_i_input(done.th, done.msg2.signature, done.msg2.mac_r)
    assert mac_input.hex() == hs["msg3_mac_input"]
    assert sa1.b256(done.keys.k_confirm_i, mac_input).hex() == hs["msg3_mac"]
    assert done.msg3.hex() == hs["msg3"] and len(done.msg3) == 46
    assert done.peer == vec.res_id
    answer = vec.accept(msg1, vec.t0)
    session = sa1.responder_confirm(answer.pending, done.msg3, vec.t0)
    assert session.session_id.hex() == hs["session_id"] and session.start == vec.t0


def test_epoch_keys_reproduced(vec: Vector) -> None:
    for direction, start in (("i2r", vec.hs["ck_i2r"]), ("r2i", vec.hs["ck_r2i"])):
        entries = vec.data["epoch_keys"][direction]
        ck = h(start)
        for e, entry in enumerate(entries):
            assert entry["epoch"] == e
            assert entry["chain_key"] == ck.hex()
            assert entry["message_key"] == sa1.b256(ck, sa1.LABEL_MESSAGE).hex()
            assert entry["seal_key"] == sa1.b256(ck, sa1.LABEL_SEAL).hex()
            ck = sa1.b256(ck, sa1.LABEL_CHAIN)


def test_messages_reproduced(vec: Vector) -> None:
    _, _, sent = vec.sessions()
    recorded = vec.data["messages"]
    assert len(sent) == len(recorded) == len(vec.inp["messages"])
    keys = {d: {k["epoch"]: k for k in vec.data["epoch_keys"][d]} for d in ("i2r", "r2i")}
    for ours, want in zip(sent, recorded, strict=True):
        header = ours["header"]
        assert want["from"] == ours["from"] and want["time"] == ours["time"]
        assert header.hex() == want["header"], want
        assert ours["body"].hex() == want["body"]
        assert ours["action"].hex() == want["action"] and ours["payload"].hex() == want["payload"]
        epoch, seq = int.from_bytes(header[9:11], "big"), int.from_bytes(header[11:15], "big")
        assert (epoch, seq) == (want["epoch"], want["seq"])
        k = keys["i2r" if want["from"] == "initiator" else "r2i"][epoch]
        bound = header[:15] + sa1.u16(len(ours["action"])) + ours["action"]
        assert want["tag"] == header[15:].hex()
        if vec.params.sealed:
            assert header[0] == 0x11
            assert want["seal_key"] == k["seal_key"]
            assert want["aead_nonce"] == (header[9:15] + bytes(6)).hex()
            assert want["aead_aad"] == bound.hex()
            assert want["plaintext"] == ours["payload"].hex()
            assert want["ciphertext"] == ours["body"].hex()
        else:
            assert header[0] == 0x10
            assert want["mac_key"] == k["message_key"]
            assert want["mac_input"] == (bound + ours["payload"]).hex()
            assert sa1.b128(h(k["message_key"]), bound + ours["payload"]) == header[15:]


# ------------------------------------------------------------------- negative vectors

NEGATIVES = [(name, n) for name, v in sorted(VECTORS.items()) for n in v.data["negative"]]


def _refusal(vec: Vector, neg: dict[str, Any]) -> str:
    step, now = neg["step"], neg["time"]
    policy = vec.policy_at(neg["policy_time"]) if "policy_time" in neg else None
    state = neg.get("state")
    try:
        if step == "responder_msg1":
            nonces = sa1.NonceCache(ttl=vec.inp["nonce_cache_ttl"])
            if state == "msg1_accepted":
                vec.accept(vec.msg1(), vec.t0, nonces=nonces)
            else:
                assert state is None, state
            vec.accept(h(neg["input"]), now, policy=policy, nonces=nonces, recorded=False)
        elif step == "initiator_msg2":
            assert state is None, state
            vec.receive(h(vec.hs["msg1"]), h(neg["input"]), now)
        elif step == "responder_msg3":
            pending = vec.accept(h(vec.hs["msg1"]), vec.t0).pending
            if state == "pending_used":
                genuine = h(vec.hs["msg3"])
                wrong = genuine[:-1] + bytes((genuine[-1] ^ 1,))
                with pytest.raises(sa1.Refused):
                    sa1.responder_confirm(pending, wrong, vec.t0)
            else:
                assert state is None, state
            sa1.responder_confirm(pending, h(neg["input"]), now)
        elif step in ("responder_message", "initiator_message"):
            assert state is None, state
            initiator, responder, _ = vec.sessions()
            session = responder if step == "responder_message" else initiator
            session.verify(h(neg["header"]), h(neg["action"]), h(neg["body"]), now)
        else:
            raise AssertionError(f"unknown step {step}")
    except sa1.Refused as e:
        return e.reason
    return "ACCEPTED"


@pytest.mark.parametrize("file,neg", NEGATIVES,
                         ids=[f"{f}:{n['name']}" for f, n in NEGATIVES])
def test_negative_refused_with_its_reason(file: str, neg: dict[str, Any]) -> None:
    vec = VECTORS[file]
    assert sa1.REASONS[neg["reason"]] == neg["reason_code"], "reason name and number disagree"
    assert _refusal(vec, copy.deepcopy(neg)) == neg["reason"], neg["description"]


def test_negatives_cover_every_step() -> None:
    steps = {n["step"] for _, n in NEGATIVES}
    assert steps >= {"responder_msg1", "initiator_msg2", "responder_msg3",
                     "responder_message", "initiator_message"}
