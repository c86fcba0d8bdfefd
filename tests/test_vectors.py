"""Committed SA1 v2 vectors: reproduced byte for byte (handshake, every intermediate
value, messages), internally consistent as tests/vectors/README.md describes them, and
every negative vector refused with its named reason."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from structauth.errors import Reason
from tests.make_vectors import FORMAT, VECTOR_DIR, build, check_negative

FILES = sorted(VECTOR_DIR.glob("*.json"))


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def u(s: str) -> bytes:
    return bytes.fromhex(s)


def test_vectors_exist() -> None:
    assert {f.stem for f in FILES} >= {"sa1-tagged", "sa1-sealed"}
    assert (VECTOR_DIR / "README.md").exists()
    sealed = {load(f)["inputs"]["params"]["sealed"] for f in FILES}
    assert sealed == {False, True}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_vector_reproduced(path: Path) -> None:
    """Rebuilding from the inputs gives the committed file exactly: every message,
    every intermediate value and every negative vector (whose reasons build() checks
    against the implementation as it goes)."""
    committed = load(path)
    assert committed["format"] == FORMAT
    again = json.loads(json.dumps(build(committed["inputs"], committed["description"])))
    for section in ("handshake", "epoch_keys", "messages", "negative"):
        assert again[section] == committed[section], section
    assert again == committed


def negatives() -> list[tuple[Path, str]]:
    return [(p, n["name"]) for p in FILES for n in load(p)["negative"]]


@pytest.mark.parametrize(("path", "name"), negatives(),
                         ids=[f"{p.stem}:{n}" for p, n in negatives()])
def test_negative_vector(path: Path, name: str) -> None:
    vector = load(path)
    neg = next(n for n in vector["negative"] if n["name"] == name)
    assert Reason[neg["reason"]].value == neg["reason_code"]
    got = check_negative(vector["inputs"], vector, neg)
    assert got.name == neg["reason"], neg["description"]


def test_negative_vectors_cover_what_they_must() -> None:
    for path in FILES:
        vector = load(path)
        by_name = {n["name"]: n["reason"] for n in vector["negative"]}
        sealed = vector["inputs"]["params"]["sealed"]
        for name, reason in {
            "msg1_tampered_signature": "BAD_SIGNATURE",
            "msg1_for_another_responder": "WRONG_IDENTITY",
            "msg1_v1_type": "BAD_VERSION",
            "msg2_v1_type": "BAD_VERSION",
            "msg3_v1_type": "BAD_VERSION",
            "msg3_bad_mac": "BAD_CONFIRMATION",
            "msg3_wrong_session_id": "UNKNOWN_SESSION",
            "msg3_after_deadline": "BAD_CONFIRMATION",
            "replayed_sequence": "REPLAYED",
            "epoch_too_old": "EPOCH_OUT_OF_WINDOW",
            "moved_to_another_action": "BAD_TAG",
            "altered_ciphertext" if sealed else "altered_payload": "BAD_TAG",
            "truncated_header": "MALFORMED",
            "sealed_flag_mismatch": "MALFORMED",
        }.items():
            assert by_name.get(name) == reason, (path.stem, name)
        assert len(by_name) == len(vector["negative"])  # names are unique


def _b256(key: bytes, data: bytes) -> bytes:
    return hashlib.blake2s(data, key=key).digest()


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_intermediate_values_are_consistent(path: Path) -> None:
    """Recompute the key schedule from the vector's own values with plain primitives
    (no Tessera code), as the README says they relate."""
    v = load(path)
    hsv = {k: u(s) for k, s in v["handshake"].items()}
    msg1, msg2, msg3 = hsv["msg1"], hsv["msg2"], hsv["msg3"]
    body2 = hsv["msg2_body"]
    # signatures
    assert msg1 == hsv["msg1_signed"] + len(hsv["msg1_signature"]).to_bytes(2, "big") + \
        hsv["msg1_signature"]
    assert hsv["msg1_signature_input"] == b"SA1v2 msg1 signature" + hsv["msg1_signed"]
    assert hsv["msg1_signature_digest"] == hashlib.sha256(hsv["msg1_signature_input"]).digest()
    for side, what in (("initiator", "msg1"), ("responder", "msg2")):
        cert = x509.load_der_x509_certificate(u(v["inputs"][side]["chain"][0]))
        key = cert.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        key.verify(hsv[f"{what}_signature"], hsv[f"{what}_signature_input"],
                   ec.ECDSA(hashes.SHA256()))
    # transcript and keys
    assert hsv["transcript_hash_input"] == (
        b"SA1v2 transcript" + len(msg1).to_bytes(4, "big") + msg1
        + len(body2).to_bytes(4, "big") + body2)
    th = hashlib.sha256(hsv["transcript_hash_input"]).digest()
    assert th == hsv["transcript_hash"] == hsv["hkdf_salt"]
    assert hsv["hkdf_ikm"] == hsv["x25519_shared_secret"] + hsv["mlkem_shared_secret"]
    assert hsv["mlkem_shared_secret"] == u(v["inputs"]["mlkem_encapsulation"]["shared_secret"])
    prk = hmac.digest(th, hsv["hkdf_ikm"], "sha256")
    assert prk == hsv["hkdf_prk"] and hsv["hkdf_info"] == b"SA1v2 session keys"
    okm = HKDFExpand(hashes.SHA256(), 136, hsv["hkdf_info"]).derive(prk)
    assert okm == hsv["hkdf_okm"]
    slices = {"session_id": okm[:8], "ck_i2r": okm[8:40], "ck_r2i": okm[40:72],
              "k_confirm_r": okm[72:104], "k_confirm_i": okm[104:136]}
    for name, value in slices.items():
        assert hsv[name] == value, name
    # confirmations and the messages they end
    sig2 = hsv["msg2_signature"]
    var_sig2 = len(sig2).to_bytes(2, "big") + sig2
    assert hsv["msg2_signature_input"] == b"SA1v2 msg2 signature" + th
    assert hsv["msg2_mac_input"] == b"SA1v2 responder confirmation" + th + var_sig2
    assert _b256(slices["k_confirm_r"], hsv["msg2_mac_input"]) == hsv["msg2_mac"]
    assert msg2 == body2 + var_sig2 + hsv["msg2_mac"]
    assert hsv["msg3_mac_input"] == (b"SA1v2 initiator confirmation" + th + var_sig2
                                     + hsv["msg2_mac"])
    assert _b256(slices["k_confirm_i"], hsv["msg3_mac_input"]) == hsv["msg3_mac"]
    assert msg3 == b"SA1\x23\x00\x01" + slices["session_id"] + hsv["msg3_mac"]
    # epoch keys
    for direction, ck0 in (("i2r", slices["ck_i2r"]), ("r2i", slices["ck_r2i"])):
        ck = ck0
        for e, keys in enumerate(v["epoch_keys"][direction]):
            assert keys["epoch"] == e and u(keys["chain_key"]) == ck
            assert u(keys["message_key"]) == _b256(ck, b"SA1 message key")
            assert u(keys["seal_key"]) == _b256(ck, b"SA1 seal key")
            ck = _b256(ck, b"SA1 chain key")
    # messages
    sealed = v["inputs"]["params"]["sealed"]
    p = v["inputs"]["params"]["epoch_ms"] / 1000.0
    start = v["inputs"]["handshake_time"]
    for m in v["messages"]:
        header, action, body = u(m["header"]), u(m["action"]), u(m["body"])
        assert len(header) == 31 and header[0] == (0x11 if sealed else 0x10)
        assert header[1:9] == slices["session_id"]
        assert int.from_bytes(header[9:11], "big") == m["epoch"] == int((m["time"] - start) / p)
        assert int.from_bytes(header[11:15], "big") == m["seq"]
        direction = "i2r" if m["from"] == "initiator" else "r2i"
        keys = v["epoch_keys"][direction][m["epoch"]]
        bound = header[:15] + len(action).to_bytes(2, "big") + action
        assert u(m["tag"]) == header[15:]
        if sealed:
            assert u(m["seal_key"]) == u(keys["seal_key"])
            assert u(m["aead_nonce"]) == header[9:15] + bytes(6) and u(m["aead_aad"]) == bound
            plain = ChaCha20Poly1305(u(keys["seal_key"])).decrypt(
                u(m["aead_nonce"]), body + header[15:], bound)
            assert plain == u(m["plaintext"]) == u(m["payload"])
            assert u(m["ciphertext"]) == body
        else:
            assert u(m["mac_key"]) == u(keys["message_key"])
            assert u(m["mac_input"]) == bound + u(m["payload"]) and body == u(m["payload"])
            tag = hashlib.blake2s(u(m["mac_input"]), key=u(keys["message_key"]),
                                  digest_size=16).digest()
            assert tag == header[15:]
