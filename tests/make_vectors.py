"""Deterministic SA1 v2 test vectors: build them, or check the committed ones.

    .venv/bin/python -m tests.make_vectors           # rewrite tests/vectors/*.json,
                                                     # keeping their inputs
    .venv/bin/python -m tests.make_vectors --fresh   # new credentials and encapsulation

Vector format (tests/vectors/<name>.json; also tests/vectors/README.md)
=====================================================================

Every byte string is lower-case hex with no separators; every time is a float of
seconds on the endpoints' monotonic clocks; reasons are the names (and numbers) of
docs/PROTOCOL.md §11. Top-level keys:

``format``       "tessera-sa1-vectors/2"
``description``  what the file exercises
``inputs``       everything needed to rerun the vector, and nothing derived:

    trust_domain, root_certificate (DER)
    initiator / responder: identity (SPIFFE URI), private_key (P-256 scalar, 32 bytes;
        signatures are RFC 6979 deterministic ECDSA over SHA-256(label || data)),
        chain (list of DER certificates, leaf first)
    policy_time      ISO 8601 UTC; both sides judge credentials with this trusted time
                     and a 5 minute skew (PROTOCOL.md §6)
    handshake_time   msg1 accepted, msg2 received and msg3 confirmed at this time, so
                     both sessions start here
    pending_timeout, nonce_cache_ttl
    context, quote   msg1's context and quote fields
    params           epoch_ms, skew_epochs, lifetime_s, replay_window, sealed (bool),
                     policy_digest: msg2's session parameters
    initiator_nonce, initiator_x25519_private, initiator_mlkem_seed (64 bytes d||z),
    responder_nonce, responder_x25519_private
                     the ephemeral values, in the order the endpoints draw them
    mlkem_encapsulation: shared_secret, ciphertext
                     OpenSSL offers no seeded ML-KEM encapsulation, so this one output
                     is recorded; the initiator decapsulates the ciphertext for real
    messages         the message plan: from ("initiator"/"responder"), time (seconds
                     after handshake_time), seq, action, payload, in delivery order.
                     seq is the sender's sequence number (a sender may skip numbers;
                     a list out of order models reordering)
    other_responder  a SPIFFE ID that is not the responder's (for WRONG_IDENTITY)
    rogue            root_certificate, and identity, private_key, chain of a device of
                     an authority the responder does not trust (for UNKNOWN_AUTHORITY)

``handshake``    every intermediate value of §4 and the three messages:

    initiator_x25519_public, initiator_mlkem_ek, responder_x25519_public
    msg1_signed (msg1 before its signature field), msg1_signature_input
        (LABEL_MSG1_SIG || msg1_signed), msg1_signature_digest (its SHA-256),
        msg1_signature (DER), msg1
    msg2_body (msg2 before its signature field; "body2"), transcript_hash_input
        (LABEL_TRANSCRIPT || u32 len msg1 || msg1 || u32 len body2 || body2),
        transcript_hash (TH)
    x25519_shared_secret, mlkem_shared_secret, hkdf_ikm (their concatenation),
        hkdf_salt (= TH), hkdf_prk, hkdf_info (LABEL_KEYS), hkdf_okm (136 bytes)
    session_id, ck_i2r, ck_r2i, k_confirm_r, k_confirm_i (the slices of hkdf_okm)
    msg2_signature_input (LABEL_MSG2_SIG || TH), msg2_signature_digest, msg2_signature
    msg2_mac_key (= k_confirm_r), msg2_mac_input (LABEL_CONFIRM_R || TH ||
        var16(signature)), msg2_mac (MAC_r), msg2
    msg3_mac_key (= k_confirm_i), msg3_mac_input (LABEL_CONFIRM_I || TH ||
        var16(signature) || MAC_r), msg3_mac (MAC_i), msg3

``epoch_keys``   {"i2r": [...], "r2i": [...]}: for epochs 0.. a few past the last one
                 used, {epoch, chain_key, message_key, seal_key} (PROTOCOL.md §5)

``messages``     the plan's messages as sent and verified: from, to, time, epoch, seq,
                 action, payload, header (31 bytes), body (payload, or ciphertext when
                 sealed), then for tagged sessions mac_key (message key of the epoch),
                 mac_input (header[0:15] || u16 len action || action || payload) and
                 tag; for sealed sessions seal_key, aead_nonce (header[9:15] || 6 zero
                 bytes), aead_aad (header[0:15] || u16 len action || action),
                 plaintext, ciphertext and tag (Poly1305, = header[15:31])

``negative``     inputs that must be refused, each with its reason:

    name, description, reason (name), reason_code (number), step, time, and
    step "responder_msg1":   input (a msg1) given to a responder with an empty nonce
                             cache, unless state is "msg1_accepted": it accepted this
                             vector's msg1 at handshake_time first; optional
                             policy_time overrides the input's
    step "initiator_msg2":   input (a msg2) given to the initiator that sent this
                             vector's msg1
    step "responder_msg3":   input (a msg3) given to the pending handshake of this
                             vector's msg1/msg2 (made at handshake_time), unless state
                             is "pending_used": a wrong msg3 was offered to it first
    step "responder_message" / "initiator_message": header, action, body given to
                             that side's session after every message of ``messages``
                             addressed to it was verified

Each negative is checked on its own, from the state it names (a refused input changes
nothing, except that anything at or after a session's lifetime closes it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import hmac
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, mlkem, x25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from cryptography.hazmat.primitives.serialization import Encoding

from hw.software import InsecureSoftwareSigner
from provisioning.certificates import issue_credential, make_authority
from structauth import handshake as hs
from structauth import wire
from structauth.credentials import Credential, Identity, TimePolicy, TrustStore
from structauth.errors import Reason, TesseraError
from structauth.handshake import Initiator, NonceCache, Responder
from structauth.params import SessionParams
from structauth.session import LABEL_CHAIN, LABEL_MESSAGE, LABEL_SEAL, Role, Session

FORMAT = "tessera-sa1-vectors/2"
VECTOR_DIR = Path(__file__).parent / "vectors"
TRUST_DOMAIN = "vectors.tessera.test"
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
POLICY_TIME = T0 + dt.timedelta(days=1)
HANDSHAKE_TIME = 100.0

CASES: dict[str, dict[str, Any]] = {
    "sa1-tagged": {
        "description": "SA1 v2 handshake and tagged messages, default parameters",
        "params": {"epoch_ms": 10_000, "skew_epochs": 2, "lifetime_s": 3600,
                   "replay_window": 1024, "sealed": False, "policy_digest": "00" * 32},
        "context": b"vector context",
        "quote": b"",
    },
    "sa1-sealed": {
        "description": "SA1 v2 handshake and sealed messages, shorter epochs, w = 1, "
        "a 64-message replay window",
        "params": {"epoch_ms": 5_000, "skew_epochs": 1, "lifetime_s": 600,
                   "replay_window": 64, "sealed": True, "policy_digest": "5a" * 32},
        "context": b"",
        "quote": b"TQ1 vector quote bytes",
    },
}


def message_plan(params: dict[str, Any]) -> list[dict[str, Any]]:
    """Messages in delivery order, timed by epochs of the vector's own length: both
    directions, an empty payload, a sequence jump beyond the window and a reordered
    message inside it."""
    p = params["epoch_ms"] / 1000.0
    jump = params["replay_window"] * 2
    telemetry = "devices/d1/telemetry/temp"
    return [
        {"from": "initiator", "time": 0.0, "seq": 0, "action": telemetry, "payload": '{"t":21.5}'},
        {"from": "initiator", "time": 0.05 * p, "seq": 1, "action": telemetry,
         "payload": '{"t":21.6}'},
        {"from": "responder", "time": 0.1 * p, "seq": 0, "action": "devices/d1/commands/reboot",
         "payload": "now"},
        {"from": "initiator", "time": 1.2 * p, "seq": 2, "action": telemetry,
         "payload": '{"t":21.7}'},
        {"from": "initiator", "time": 2.5 * p, "seq": 3, "action": "devices/d1/telemetry/empty",
         "payload": ""},
        {"from": "responder", "time": 3.1 * p, "seq": 1, "action": "POST /sensors/1?unit=c",
         "payload": "x" * 120},
        {"from": "initiator", "time": 3.3 * p, "seq": jump, "action": telemetry,
         "payload": '{"t":21.8}'},
        {"from": "initiator", "time": 3.4 * p, "seq": jump - params["replay_window"] // 2,
         "action": telemetry, "payload": '{"t":21.75}'},
    ]


# ----------------------------------------------------------------------- helpers


def h(b: bytes) -> str:
    return b.hex()


def unhex(s: str) -> bytes:
    return bytes.fromhex(s)


class ScriptedEntropy:
    """Hands out recorded ephemeral values in order (the Entropy protocol)."""

    def __init__(self, values: list[bytes], encapsulation: tuple[bytes, bytes] | None = None):
        self._values = list(values)
        self._encapsulation = encapsulation

    def random_bytes(self, n: int) -> bytes:
        value = self._values.pop(0)
        assert len(value) == n, f"scripted entropy: asked for {n} bytes, recorded {len(value)}"
        return value

    def encapsulate(self, key: mlkem.MLKEM768PublicKey) -> tuple[bytes, bytes]:
        assert self._encapsulation is not None, "no recorded encapsulation"
        return self._encapsulation


def _signer(private_key: str) -> InsecureSoftwareSigner:
    return InsecureSoftwareSigner.from_private_value(
        int.from_bytes(unhex(private_key), "big"), deterministic=True
    )


def _credential(chain: list[str]) -> Credential:
    return Credential.from_der_chain([unhex(c) for c in chain])


def _policy(inputs: dict[str, Any], override: str | None = None) -> TimePolicy:
    return TimePolicy.trusted(dt.datetime.fromisoformat(override or inputs["policy_time"]))


def _trust(inputs: dict[str, Any]) -> TrustStore:
    root = x509.load_der_x509_certificate(unhex(inputs["root_certificate"]))
    return TrustStore([root], inputs["trust_domain"])


def _params(inputs: dict[str, Any]) -> SessionParams:
    p = inputs["params"]
    return SessionParams(
        epoch_ms=p["epoch_ms"], skew_epochs=p["skew_epochs"], lifetime_s=p["lifetime_s"],
        replay_window=p["replay_window"], sealed=p["sealed"],
        policy_digest=unhex(p["policy_digest"]),
    )


def _initiator_entropy(inputs: dict[str, Any]) -> ScriptedEntropy:
    return ScriptedEntropy([unhex(inputs[k]) for k in (
        "initiator_nonce", "initiator_x25519_private", "initiator_mlkem_seed")])


def make_initiator(
    inputs: dict[str, Any], *, expected: str | None = None, member: str = "initiator",
    trust: TrustStore | None = None,
) -> Initiator:
    m = inputs[member]
    return Initiator(
        signer=_signer(m["private_key"]),
        credential=_credential(m["chain"]),
        trust=trust or _trust(inputs),
        expected_peer=Identity.parse(expected or inputs["responder"]["identity"]),
        entropy=_initiator_entropy(inputs),
    )


def make_responder(inputs: dict[str, Any]) -> Responder:
    m = inputs["responder"]
    enc = inputs["mlkem_encapsulation"]
    return Responder(
        signer=_signer(m["private_key"]),
        credential=_credential(m["chain"]),
        trust=_trust(inputs),
        params=_params(inputs),
        nonce_cache=NonceCache(ttl=inputs["nonce_cache_ttl"]),
        entropy=ScriptedEntropy(
            [unhex(inputs["responder_nonce"]), unhex(inputs["responder_x25519_private"])],
            (unhex(enc["shared_secret"]), unhex(enc["ciphertext"])),
        ),
        pending_timeout=inputs["pending_timeout"],
    )


def _resign(private_key: str, label: bytes, data: bytes) -> bytes:
    return _signer(private_key).sign_digest(hashlib.sha256(label + data).digest())


def _blake(key: bytes, data: bytes, size: int = 32) -> bytes:
    return hashlib.blake2s(data, key=key, digest_size=size).digest()


# ----------------------------------------------------------------------- the run


def run_handshake(inputs: dict[str, Any]) -> dict[str, Any]:
    """Run the three messages through the implementation; returns the objects."""
    policy = _policy(inputs)
    t = inputs["handshake_time"]
    ini, res = make_initiator(inputs), make_responder(inputs)
    msg1 = ini.start(context=unhex(inputs["context"]), quote=unhex(inputs["quote"]))
    answered = res.accept(msg1, t, policy)
    done = ini.receive(answered.reply, t, policy)
    confirmed = res.confirm(answered.pending, done.reply, t)
    return {"msg1": msg1, "msg2": answered.reply, "msg3": done.reply,
            "initiator": done.session, "responder": confirmed.session,
            "responder_object": res}


def intermediates(inputs: dict[str, Any], run: dict[str, Any]) -> dict[str, str]:
    """Every intermediate value of the key schedule, each checked against what the
    implementation put on the wire."""
    msg1, msg2, msg3 = run["msg1"], run["msg2"], run["msg3"]
    m1, m2 = hs.parse_msg1(msg1), hs.parse_msg2(msg2)
    x_i = x25519.X25519PrivateKey.from_private_bytes(unhex(inputs["initiator_x25519_private"]))
    x_r = x25519.X25519PrivateKey.from_private_bytes(unhex(inputs["responder_x25519_private"]))
    kem = mlkem.MLKEM768PrivateKey.from_seed_bytes(unhex(inputs["initiator_mlkem_seed"]))
    assert m1.x25519 == x_i.public_key().public_bytes_raw()
    assert m2.x25519 == x_r.public_key().public_bytes_raw()
    assert m1.mlkem_ek == kem.public_key().public_bytes_raw()
    ss_x = x_i.exchange(x_r.public_key())
    assert ss_x == x_r.exchange(x_i.public_key())
    ss_k = unhex(inputs["mlkem_encapsulation"]["shared_secret"])
    assert kem.decapsulate(m2.mlkem_ct) == ss_k
    th_input = (hs.LABEL_TRANSCRIPT + wire.u32(len(msg1)) + msg1 + wire.u32(len(m2.body))
                + m2.body)
    th = hashlib.sha256(th_input).digest()
    assert th == hs.transcript_hash(msg1, m2.body)
    ikm = ss_x + ss_k
    prk = hmac.digest(th, ikm, "sha256")
    okm = HKDFExpand(hashes.SHA256(), hs.KEYS_SIZE, hs.LABEL_KEYS).derive(prk)
    keys = hs.derive_keys(ss_x, ss_k, th)
    assert okm == (keys.session_id + keys.initiator_to_responder + keys.responder_to_initiator
                   + keys.confirm_responder + keys.confirm_initiator)
    sig1_input = hs.LABEL_MSG1_SIG + m1.signed
    sig2_input = hs.LABEL_MSG2_SIG + th
    responder_key = _credential(inputs["responder"]["chain"]).public_key
    initiator_key = _credential(inputs["initiator"]["chain"]).public_key
    initiator_key.verify(m1.signature, sig1_input, ec.ECDSA(hashes.SHA256()))
    responder_key.verify(m2.signature, sig2_input, ec.ECDSA(hashes.SHA256()))
    mac_r_input = hs.LABEL_CONFIRM_R + th + wire.var16(m2.signature)
    mac_r = _blake(keys.confirm_responder, mac_r_input)
    assert mac_r == m2.confirm == hs.responder_confirmation(keys, th, m2.signature)
    mac_i_input = hs.LABEL_CONFIRM_I + th + wire.var16(m2.signature) + mac_r
    mac_i = _blake(keys.confirm_initiator, mac_i_input)
    assert msg3 == b"SA1\x23\x00\x01" + keys.session_id + mac_i
    assert run["initiator"].session_id == run["responder"].session_id == keys.session_id
    return {
        "initiator_x25519_public": h(m1.x25519),
        "initiator_mlkem_ek": h(m1.mlkem_ek),
        "responder_x25519_public": h(m2.x25519),
        "msg1_signed": h(m1.signed),
        "msg1_signature_input": h(sig1_input),
        "msg1_signature_digest": h(hashlib.sha256(sig1_input).digest()),
        "msg1_signature": h(m1.signature),
        "msg1": h(msg1),
        "msg2_body": h(m2.body),
        "transcript_hash_input": h(th_input),
        "transcript_hash": h(th),
        "x25519_shared_secret": h(ss_x),
        "mlkem_shared_secret": h(ss_k),
        "hkdf_ikm": h(ikm),
        "hkdf_salt": h(th),
        "hkdf_prk": h(prk),
        "hkdf_info": h(hs.LABEL_KEYS),
        "hkdf_okm": h(okm),
        "session_id": h(keys.session_id),
        "ck_i2r": h(keys.initiator_to_responder),
        "ck_r2i": h(keys.responder_to_initiator),
        "k_confirm_r": h(keys.confirm_responder),
        "k_confirm_i": h(keys.confirm_initiator),
        "msg2_signature_input": h(sig2_input),
        "msg2_signature_digest": h(hashlib.sha256(sig2_input).digest()),
        "msg2_signature": h(m2.signature),
        "msg2_mac_key": h(keys.confirm_responder),
        "msg2_mac_input": h(mac_r_input),
        "msg2_mac": h(mac_r),
        "msg2": h(msg2),
        "msg3_mac_key": h(keys.confirm_initiator),
        "msg3_mac_input": h(mac_i_input),
        "msg3_mac": h(mac_i),
        "msg3": h(msg3),
    }


def epoch_keys(ck0: bytes, count: int) -> list[dict[str, Any]]:
    out, ck = [], ck0
    for epoch in range(count):
        out.append({
            "epoch": epoch,
            "chain_key": h(ck),
            "message_key": h(_blake(ck, LABEL_MESSAGE)),
            "seal_key": h(_blake(ck, LABEL_SEAL)),
        })
        ck = _blake(ck, LABEL_CHAIN)
    return out


def _send(session: Session, seq: int, action: bytes, payload: bytes, now: float
          ) -> tuple[bytes, bytes]:
    session._next_seq = seq  # the plan names each sequence number
    return session.protect(action, payload, now)


def describe_message(
    sender: str, now: float, seq: int, action: bytes, payload: bytes, header: bytes,
    body: bytes, keys: dict[str, list[dict[str, Any]]], sealed: bool,
) -> dict[str, Any]:
    epoch = int.from_bytes(header[9:11], "big")
    direction = "i2r" if sender == "initiator" else "r2i"
    k = keys[direction][epoch]
    bound = header[:15] + wire.u16(len(action)) + action
    entry: dict[str, Any] = {
        "from": sender, "to": "responder" if sender == "initiator" else "initiator",
        "time": now, "epoch": epoch, "seq": seq, "action": h(action), "payload": h(payload),
        "header": h(header), "body": h(body),
    }
    if sealed:
        entry.update({
            "seal_key": k["seal_key"], "aead_nonce": h(header[9:15] + bytes(6)),
            "aead_aad": h(bound), "plaintext": h(payload), "ciphertext": h(body),
            "tag": h(header[15:]),
        })
    else:
        mac_input = bound + payload
        assert _blake(unhex(k["message_key"]), mac_input, 16) == header[15:]
        entry.update({"mac_key": k["message_key"], "mac_input": h(mac_input),
                      "tag": h(header[15:])})
    return entry


def run_messages(inputs: dict[str, Any], run: dict[str, Any],
                 keys: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    t0 = inputs["handshake_time"]
    sessions = {"initiator": run["initiator"], "responder": run["responder"]}
    out = []
    for m in inputs["messages"]:
        sender, receiver = m["from"], "responder" if m["from"] == "initiator" else "initiator"
        now, action, payload = t0 + m["time"], unhex(m["action"]), unhex(m["payload"])
        header, body = _send(sessions[sender], m["seq"], action, payload, now)
        got = sessions[receiver].verify(header, action, body, now)
        assert got.payload == payload and got.seq == m["seq"]
        out.append(describe_message(sender, now, m["seq"], action, payload, header, body, keys,
                                    inputs["params"]["sealed"]))
    return out


# ----------------------------------------------------------------------- negatives


def _neg(name: str, reason: Reason, step: str, time: float, description: str,
         **fields: Any) -> dict[str, Any]:
    return {"name": name, "description": description, "reason": reason.name,
            "reason_code": int(reason), "step": step, "time": time, **fields}


def _flip(data: bytes, pos: int, mask: int = 0x01) -> bytes:
    b = bytearray(data)
    b[pos] ^= mask
    return bytes(b)


def negatives(inputs: dict[str, Any], run: dict[str, Any], hsv: dict[str, str],
              messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    t = inputs["handshake_time"]
    msg1, msg2, msg3 = run["msg1"], run["msg2"], run["msg3"]
    m1, m2 = hs.parse_msg1(msg1), hs.parse_msg2(msg2)
    dkey, rkey = inputs["initiator"]["private_key"], inputs["responder"]["private_key"]
    out: list[dict[str, Any]] = []

    def msg1_neg(name: str, reason: Reason, data: bytes, description: str, **kw: Any) -> None:
        out.append(_neg(name, reason, "responder_msg1", kw.pop("time", t), description,
                        input=h(data), **kw))

    def resigned_msg1(signed: bytes) -> bytes:
        return signed + wire.var16(_resign(dkey, hs.LABEL_MSG1_SIG, signed))

    # -- msg1
    msg1_neg("msg1_tampered_signature", Reason.BAD_SIGNATURE, _flip(msg1, len(msg1) - 1),
             "the last byte of msg1's DER signature (inside s) flipped")
    msg1_neg("msg1_tampered_nonce", Reason.BAD_SIGNATURE, _flip(msg1, 6),
             "nonce_i changed: the signature covers it")
    field = "quote" if m1.quote else "context"
    assert m1.quote or m1.context
    msg1_neg(f"msg1_tampered_{field}", Reason.BAD_SIGNATURE, _flip(msg1, len(m1.signed) - 3),
             f"the last byte of the {field} changed: the signature covers it")
    other = make_initiator(inputs, expected=inputs["other_responder"])
    msg1_neg("msg1_for_another_responder", Reason.WRONG_IDENTITY,
             other.start(context=unhex(inputs["context"]), quote=unhex(inputs["quote"])),
             "a genuine, correctly signed msg1 naming another responder: refused before "
             "the nonce cache and any cryptography")
    msg1_neg("msg1_v1_type", Reason.BAD_VERSION, msg1[:3] + b"\x01" + msg1[4:],
             "type 0x01 (SA1 version 1 msg1)")
    msg1_neg("msg1_v2_wrong_type", Reason.MALFORMED, msg1[:3] + b"\x22" + msg1[4:],
             "type 0x22 (msg2) where a msg1 is expected")
    msg1_neg("msg1_bad_magic", Reason.BAD_VERSION, b"SA2" + msg1[3:], "magic 'SA2'")
    msg1_neg("msg1_unknown_suite", Reason.UNKNOWN_SUITE, msg1[:4] + b"\x00\x02" + msg1[6:],
             "suite 0x0002")
    msg1_neg("msg1_truncated_in_mlkem_ek", Reason.TRUNCATED, msg1[:600],
             "msg1 cut inside the ML-KEM encapsulation key")
    msg1_neg("msg1_truncated_in_length", Reason.TRUNCATED, msg1[:len(m1.signed) + 1],
             "msg1 cut inside the signature's length prefix")
    msg1_neg("msg1_trailing_bytes", Reason.TRAILING_BYTES, msg1 + b"\x00",
             "one byte after the signature")
    at = 70 + hs.MLKEM_EK_SIZE
    msg1_neg("msg1_empty_chain", Reason.MALFORMED, msg1[:at] + b"\x00" + msg1[at + 1:],
             "credential count 0")
    name_at = at + 1 + sum(2 + len(c) for c in m1.chain) + 2
    msg1_neg("msg1_responder_not_ascii", Reason.MALFORMED, _flip(msg1, name_at, 0x80),
             "a byte of the responder name with its high bit set")
    signed = bytearray(m1.signed)
    signed[38:70] = bytes(32)
    msg1_neg("msg1_low_order_x25519", Reason.BAD_KEY_SHARE, resigned_msg1(bytes(signed)),
             "x25519_i all zero (a low-order point: the shared secret is all zero), "
             "correctly re-signed by the initiator")
    signed = bytearray(m1.signed)
    signed[70:70 + hs.MLKEM_EK_SIZE] = b"\xff" * hs.MLKEM_EK_SIZE
    msg1_neg("msg1_bad_mlkem_ek", Reason.BAD_KEY_SHARE, resigned_msg1(bytes(signed)),
             "an ML-KEM-768 encapsulation key whose coefficients are >= q (fails the "
             "FIPS 203 modulus check), correctly re-signed by the initiator")
    rogue = inputs["rogue"]
    rogue_ini = Initiator(
        signer=_signer(rogue["private_key"]), credential=_credential(rogue["chain"]),
        trust=TrustStore([x509.load_der_x509_certificate(unhex(rogue["root_certificate"]))],
                         inputs["trust_domain"]),
        expected_peer=Identity.parse(inputs["responder"]["identity"]),
        entropy=_initiator_entropy(inputs),
    )
    msg1_neg("msg1_unknown_authority", Reason.UNKNOWN_AUTHORITY,
             rogue_ini.start(context=unhex(inputs["context"]), quote=unhex(inputs["quote"])),
             "a device of the same name and trust domain, issued by an authority the "
             "responder does not trust (inputs.rogue)")
    kind_ini = make_initiator(inputs, member="responder")
    msg1_neg("msg1_wrong_kind", Reason.WRONG_IDENTITY,
             kind_ini.start(context=unhex(inputs["context"]), quote=unhex(inputs["quote"])),
             "a msg1 from a broker credential (the responder accepts devices only)")
    msg1_neg("msg1_credential_expired", Reason.CREDENTIAL_EXPIRED, msg1,
             "this vector's msg1, judged at a policy_time after the credential's notAfter",
             policy_time=(T0 + dt.timedelta(days=400)).isoformat())
    msg1_neg("msg1_replayed", Reason.HANDSHAKE_REPLAYED, msg1,
             "this vector's msg1 again, one second after the responder accepted it",
             state="msg1_accepted", time=t + 1.0)

    # -- msg2
    def msg2_neg(name: str, reason: Reason, data: bytes, description: str) -> None:
        out.append(_neg(name, reason, "initiator_msg2", t, description, input=h(data)))

    sig_end = len(m2.body) + 2 + len(m2.signature)
    msg2_neg("msg2_tampered_signature", Reason.BAD_SIGNATURE, _flip(msg2, sig_end - 1),
             "the last byte of msg2's DER signature flipped")
    msg2_neg("msg2_bad_mac", Reason.BAD_CONFIRMATION, _flip(msg2, len(msg2) - 1),
             "the last byte of MAC_r flipped")
    msg2_neg("msg2_v1_type", Reason.BAD_VERSION, msg2[:3] + b"\x02" + msg2[4:],
             "type 0x02 (SA1 version 1 msg2)")
    p_at = 70 + hs.MLKEM_CT_SIZE
    msg2_neg("msg2_bad_parameters", Reason.BAD_PARAMETERS,
             msg2[:p_at] + wire.u32(1) + msg2[p_at + 4:], "epoch_ms = 1 (below 100)")
    msg2_neg("msg2_unknown_parameter_flag", Reason.MALFORMED,
             msg2[:p_at + 9] + b"\x02" + msg2[p_at + 10:], "parameter flags 0x02")
    msg2_neg("msg2_truncated", Reason.TRUNCATED, msg2[:-1], "MAC_r one byte short")
    msg2_neg("msg2_trailing_bytes", Reason.TRAILING_BYTES, msg2 + b"\x00",
             "one byte after MAC_r")
    msg2_neg("msg2_responder_credential_replaced", Reason.WRONG_IDENTITY,
             m2.body[:p_at + 44] + hs._chain_bytes([unhex(c) for c in inputs["initiator"]["chain"]])
             + msg2[len(m2.body):],
             "msg2 carrying the initiator's own (valid) credential instead of the responder "
             "it named: the identity check comes before the signature")
    body = bytearray(m2.body)
    body[70:70 + hs.MLKEM_CT_SIZE] = bytes(hs.MLKEM_CT_SIZE)
    sig = _resign(rkey, hs.LABEL_MSG2_SIG, hs.transcript_hash(msg1, bytes(body)))
    msg2_neg("msg2_mlkem_ciphertext_replaced", Reason.BAD_CONFIRMATION,
             bytes(body) + wire.var16(sig) + m2.confirm,
             "ML-KEM ciphertext replaced by zeros and msg2 correctly re-signed by the "
             "responder: decapsulation's implicit rejection yields another secret, so "
             "MAC_r fails (the keys depend on ML-KEM, not only on X25519)")
    body = bytearray(m2.body)
    body[38:70] = bytes(32)
    sig = _resign(rkey, hs.LABEL_MSG2_SIG, hs.transcript_hash(msg1, bytes(body)))
    msg2_neg("msg2_low_order_x25519", Reason.BAD_KEY_SHARE,
             bytes(body) + wire.var16(sig) + m2.confirm,
             "x25519_r all zero, msg2 correctly re-signed: the all-zero shared secret is "
             "refused before MAC_r is checked")

    # -- msg3
    def msg3_neg(name: str, reason: Reason, data: bytes, description: str, **kw: Any) -> None:
        out.append(_neg(name, reason, "responder_msg3", kw.pop("time", t), description,
                        input=h(data), **kw))

    msg3_neg("msg3_bad_mac", Reason.BAD_CONFIRMATION, _flip(msg3, 45),
             "the last byte of MAC_i flipped")
    msg3_neg("msg3_wrong_session_id", Reason.UNKNOWN_SESSION, _flip(msg3, 6),
             "the first byte of the session id flipped (a msg3 for another pending "
             "handshake)")
    msg3_neg("msg3_mac_r_reflected", Reason.BAD_CONFIRMATION, msg3[:14] + m2.confirm,
             "msg3 carrying msg2's MAC_r instead of MAC_i")
    msg3_neg("msg3_after_deadline", Reason.BAD_CONFIRMATION, msg3,
             "the genuine msg3, at handshake_time + pending_timeout (now >= deadline)",
             time=t + inputs["pending_timeout"])
    msg3_neg("msg3_pending_used", Reason.BAD_CONFIRMATION, msg3,
             "the genuine msg3 offered after a wrong one (msg3_bad_mac) consumed the "
             "pending handshake: one try", state="pending_used")
    msg3_neg("msg3_truncated", Reason.TRUNCATED, msg3[:-1], "45 bytes")
    msg3_neg("msg3_trailing_bytes", Reason.TRAILING_BYTES, msg3 + b"\x00", "47 bytes")
    msg3_neg("msg3_v1_type", Reason.BAD_VERSION, msg3[:3] + b"\x01" + msg3[4:],
             "type 0x01")
    msg3_neg("msg3_wrong_type", Reason.MALFORMED, msg3[:3] + b"\x21" + msg3[4:],
             "type 0x21 (msg1) where a msg3 is expected")
    msg3_neg("msg3_unknown_suite", Reason.UNKNOWN_SUITE, msg3[:4] + b"\x00\x02" + msg3[6:],
             "suite 0x0002")

    # -- messages, against the sessions after the whole plan
    out += message_negatives(inputs, hsv, messages)
    return out


def message_negatives(inputs: dict[str, Any], hsv: dict[str, str],
                      messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    t0 = inputs["handshake_time"]
    params = _params(inputs)
    p, w, window = params.epoch_seconds, params.skew_epochs, params.replay_window
    sid = unhex(hsv["session_id"])

    def forger(sender: str) -> Session:
        """The genuine sender's keys, for messages it sends but the plan does not."""
        i2r, r2i = unhex(hsv["ck_i2r"]), unhex(hsv["ck_r2i"])
        send, recv = (i2r, r2i) if sender == "initiator" else (r2i, i2r)
        return Session(role=Role.INITIATOR if sender == "initiator" else Role.RESPONDER,
                       session_id=sid, send_chain_key=send, receive_chain_key=recv,
                       params=params, start=t0)

    last = max(m["time"] for m in messages)  # every negative is judged at this time
    current = int((last - t0) / p)
    top = max(m["seq"] for m in messages if m["from"] == "initiator")
    out: list[dict[str, Any]] = []

    def neg(name: str, reason: Reason, header: bytes, action: bytes, body: bytes,
            description: str, *, to: str = "responder", time: float = last) -> None:
        out.append(_neg(name, reason, f"{to}_message", time, description, header=h(header),
                        action=h(action), body=h(body)))

    action, payload = b"devices/d1/telemetry/temp", b'{"t":22.0}'
    new_h, new_b = _send(forger("initiator"), top + 1, action, payload, last)
    by_seq = {m["seq"]: m for m in messages if m["from"] == "initiator"}
    jump_msg = by_seq[top]
    reordered = messages[-1]
    assert reordered["from"] == "initiator" and reordered["seq"] < top
    neg("replayed_sequence", Reason.REPLAYED, unhex(jump_msg["header"]),
        unhex(jump_msg["action"]), unhex(jump_msg["body"]),
        "the message with the highest sequence number, delivered again")
    neg("replayed_reordered_sequence", Reason.REPLAYED, unhex(reordered["header"]),
        unhex(reordered["action"]), unhex(reordered["body"]),
        "the reordered message (behind the top, inside the window), delivered again")
    old_h, old_b = _send(forger("initiator"), top - window, action, payload, last)
    neg("sequence_behind_window", Reason.REPLAYED, old_h, action, old_b,
        f"a genuine, never-seen message whose sequence number is {window} (the window) "
        "behind the highest accepted")
    first = messages[0]
    neg("epoch_too_old", Reason.EPOCH_OUT_OF_WINDOW, unhex(first["header"]),
        unhex(first["action"]), unhex(first["body"]),
        f"the plan's first message (epoch 0) at epoch {current}: outside ±{w}; the "
        "epoch is checked before the replay window")
    future_epoch = current + w + 1
    fut_h, fut_b = _send(forger("initiator"), top + 1, action, payload,
                         t0 + future_epoch * p + 0.1 * p)
    neg("epoch_too_new", Reason.EPOCH_OUT_OF_WINDOW, fut_h, action, fut_b,
        f"a genuine message from epoch {future_epoch} (w + 1 ahead of the receiver)")
    neg("moved_to_another_action", Reason.BAD_TAG, new_h, b"devices/d2/telemetry/temp", new_b,
        "a genuine, never-seen message presented under another topic")
    if params.sealed:
        neg("altered_ciphertext", Reason.BAD_TAG, new_h, action, _flip(new_b, 0),
            "a genuine, never-seen sealed message with its first ciphertext byte flipped")
    else:
        neg("altered_payload", Reason.BAD_TAG, new_h, action, _flip(new_b, 0),
            "a genuine, never-seen message with its first payload byte flipped")
    neg("action_payload_boundary_moved", Reason.BAD_TAG, new_h, action + new_b[:1], new_b[1:],
        "the first payload byte moved to the end of the action")
    neg("altered_tag", Reason.BAD_TAG, _flip(new_h, 30), action, new_b,
        "the last tag byte flipped")
    neg("altered_sequence_number", Reason.BAD_TAG, _flip(new_h, 11), action, new_b,
        "the sequence number's high byte changed (to a number not yet seen): the tag "
        "covers it")
    neg("truncated_header", Reason.MALFORMED, new_h[:30], action, new_b, "a 30-byte header")
    neg("extended_header", Reason.MALFORMED, new_h + b"\x00", action, new_b,
        "a 32-byte header")
    neg("sealed_flag_mismatch", Reason.MALFORMED, _flip(new_h, 0), action, new_b,
        "the sealed flag flipped: a session never accepts the other mode")
    neg("header_version_2", Reason.BAD_VERSION, bytes([0x20 | (new_h[0] & 0x0F)]) + new_h[1:],
        action, new_b, "header version nibble 2")
    neg("unknown_session", Reason.UNKNOWN_SESSION, _flip(new_h, 1), action, new_b,
        "the first session id byte flipped")
    neg("after_lifetime", Reason.SESSION_EXPIRED, new_h, action, new_b,
        "a genuine, never-seen message at start + lifetime_s",
        time=t0 + params.lifetime_s)
    neg("reflected_to_sender", Reason.BAD_TAG, new_h, action, new_b,
        "a genuine initiator-to-responder message given to the initiator: each "
        "direction has its own keys", to="initiator")
    down = [m for m in messages if m["from"] == "responder"][-1]
    neg("replayed_to_initiator", Reason.REPLAYED, unhex(down["header"]),
        unhex(down["action"]), unhex(down["body"]),
        "the last responder-to-initiator message, delivered again", to="initiator")
    return out


# ----------------------------------------------------------------------- checking


def _expect_refusal(call: Callable[[], object]) -> Reason:
    try:
        call()
    except TesseraError as exc:
        return exc.reason
    raise AssertionError("accepted")


def check_negative(inputs: dict[str, Any], vector: dict[str, Any], neg: dict[str, Any]
                   ) -> Reason:
    """Run one negative vector through the implementation; return the reason it was
    refused with (AssertionError if it was accepted)."""
    t = inputs["handshake_time"]
    data = unhex(neg["input"]) if "input" in neg else b""
    step, state = neg["step"], neg.get("state")
    if step == "responder_msg1":
        res = make_responder(inputs)
        if state == "msg1_accepted":
            res.accept(unhex(vector["handshake"]["msg1"]), t, _policy(inputs))
        policy = _policy(inputs, neg.get("policy_time"))
        return _expect_refusal(lambda: res.accept(data, neg["time"], policy))
    if step == "initiator_msg2":
        ini = make_initiator(inputs)
        ini.start(context=unhex(inputs["context"]), quote=unhex(inputs["quote"]))
        return _expect_refusal(lambda: ini.receive(data, neg["time"], _policy(inputs)))
    if step == "responder_msg3":
        ini, res = make_initiator(inputs), make_responder(inputs)
        answered = res.accept(ini.start(context=unhex(inputs["context"]),
                                        quote=unhex(inputs["quote"])), t, _policy(inputs))
        if state == "pending_used":
            _expect_refusal(lambda: res.confirm(
                answered.pending, _flip(unhex(vector["handshake"]["msg3"]), 45), t))
        return _expect_refusal(lambda: res.confirm(answered.pending, data, neg["time"]))
    if step in ("responder_message", "initiator_message"):
        run = run_handshake(inputs)
        receiver = step.split("_")[0]
        session = run[receiver]
        for m in vector["messages"]:
            if m["to"] == receiver:
                session.verify(unhex(m["header"]), unhex(m["action"]), unhex(m["body"]),
                               m["time"])
        return _expect_refusal(lambda: session.verify(
            unhex(neg["header"]), unhex(neg["action"]), unhex(neg["body"]), neg["time"]))
    raise AssertionError(f"unknown step {step}")


# ----------------------------------------------------------------------- building


def build(inputs: dict[str, Any], description: str) -> dict[str, Any]:
    """The whole vector (inputs, intermediates, messages, negatives) from its inputs."""
    run = run_handshake(inputs)
    hsv = intermediates(inputs, run)
    last_epoch = max(int(m["time"] / (inputs["params"]["epoch_ms"] / 1000.0))
                     for m in inputs["messages"])
    count = last_epoch + inputs["params"]["skew_epochs"] + 3
    keys = {"i2r": epoch_keys(unhex(hsv["ck_i2r"]), count),
            "r2i": epoch_keys(unhex(hsv["ck_r2i"]), count)}
    messages = run_messages(inputs, run, keys)
    vector: dict[str, Any] = {
        "format": FORMAT,
        "description": description,
        "inputs": inputs,
        "handshake": hsv,
        "epoch_keys": keys,
        "messages": messages,
    }
    vector["negative"] = negatives(inputs, run, hsv, messages)
    for neg in vector["negative"]:
        got = check_negative(inputs, vector, neg)
        assert got.name == neg["reason"], (neg["name"], got.name, neg["reason"])
    return vector


def _der(cert: x509.Certificate) -> str:
    return h(cert.public_bytes(Encoding.DER))


def fresh_inputs(case: dict[str, Any]) -> dict[str, Any]:
    """New credentials, ephemeral values and encapsulation for a case (only when asked)."""
    def scalar(seed: str) -> str:
        return h(hashlib.sha256(seed.encode()).digest())

    def authority(seed: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.derive_private_key(int(scalar(seed), 16) % (2**255), ec.SECP256R1())
        return key, make_authority(TRUST_DOMAIN, key, not_before=T0,
                                   not_after=T0 + dt.timedelta(days=3650))

    root_key, root = authority("vector authority")

    def member(root_key: ec.EllipticCurvePrivateKey, root: x509.Certificate, path: str,
               seed: str) -> dict[str, Any]:
        private = scalar(seed)
        identity = f"spiffe://{TRUST_DOMAIN}/{path}"
        cert = issue_credential(root, root_key, _signer(private).public_key(),
                                Identity.parse(identity), not_before=T0,
                                not_after=T0 + dt.timedelta(days=365))
        return {"identity": identity, "private_key": private, "chain": [_der(cert)]}

    rogue_key, rogue_root = authority("vector rogue authority")
    tag = "sealed" if case["params"]["sealed"] else "tagged"
    seed = hashlib.sha256(f"vector {tag} ephemerals".encode()).digest()

    def draw(label: str, n: int) -> str:
        return h(hashlib.shake_256(seed + label.encode()).digest(n))

    inputs: dict[str, Any] = {
        "trust_domain": TRUST_DOMAIN,
        "root_certificate": _der(root),
        "initiator": member(root_key, root, "device/d1", "vector device key"),
        "responder": member(root_key, root, "broker/b1", "vector broker key"),
        "policy_time": POLICY_TIME.isoformat(),
        "handshake_time": HANDSHAKE_TIME,
        "pending_timeout": hs.DEFAULT_PENDING_TIMEOUT,
        "nonce_cache_ttl": 600.0,
        "context": h(case["context"]),
        "quote": h(case["quote"]),
        "params": case["params"],
        "initiator_nonce": draw("initiator nonce", 32),
        "initiator_x25519_private": draw("initiator x25519", 32),
        "initiator_mlkem_seed": draw("initiator ml-kem seed", 64),
        "responder_nonce": draw("responder nonce", 32),
        "responder_x25519_private": draw("responder x25519", 32),
        "other_responder": f"spiffe://{TRUST_DOMAIN}/broker/b2",
        "rogue": {"root_certificate": _der(rogue_root),
                  **member(rogue_key, rogue_root, "device/d1", "vector rogue device key")},
    }
    kem = mlkem.MLKEM768PrivateKey.from_seed_bytes(unhex(inputs["initiator_mlkem_seed"]))
    secret, ciphertext = kem.public_key().encapsulate()
    inputs["mlkem_encapsulation"] = {"shared_secret": h(secret), "ciphertext": h(ciphertext)}
    return inputs


def refresh_plan(inputs: dict[str, Any], case: dict[str, Any]) -> dict[str, Any]:
    """The case's parameters, context, quote and message plan, over kept credentials."""
    out = dict(inputs)
    out["params"] = case["params"]
    out["context"], out["quote"] = h(case["context"]), h(case["quote"])
    out["messages"] = [
        {**m, "action": h(m["action"].encode()), "payload": h(m["payload"].encode())}
        for m in message_plan(case["params"])
    ]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fresh", action="store_true",
                        help="new credentials and a new ML-KEM encapsulation")
    args = parser.parse_args(argv)
    VECTOR_DIR.mkdir(exist_ok=True)
    for name, case in CASES.items():
        path = VECTOR_DIR / f"{name}.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        keep = not args.fresh and old.get("format") == FORMAT
        inputs = old["inputs"] if keep else fresh_inputs(case)
        vector = build(refresh_plan(inputs, case), case["description"])
        path.write_text(json.dumps(vector, indent=1) + "\n")
        print(f"wrote {path.name}: {len(vector['messages'])} messages, "
              f"{len(vector['negative'])} negative vectors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
