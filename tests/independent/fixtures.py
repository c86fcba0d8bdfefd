"""Credentials and a whole SA1 v2 run made with the independent implementation only
(for the tests that do not need the committed vectors)."""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, mlkem
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID, ObjectIdentifier

from . import sa1_reference as sa1

DOMAIN = "independent.test"
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
NOW = T0 + dt.timedelta(days=1)
POLICY = sa1.TimePolicy(now=NOW)
DEVICE = f"spiffe://{DOMAIN}/device/d1"
BROKER = f"spiffe://{DOMAIN}/broker/b1"


def key(seed: str) -> ec.EllipticCurvePrivateKey:
    n = int.from_bytes(hashlib.sha256(seed.encode()).digest(), "big") % (2**255) + 1
    return ec.derive_private_key(n, ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_root(ca_key: ec.EllipticCurvePrivateKey, cn: str = "authority") -> x509.Certificate:
    return (
        x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
        .public_key(ca_key.public_key()).serial_number(1)
        .not_valid_before(T0).not_valid_after(T0 + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .sign(ca_key, hashes.SHA256())
    )


def make_leaf(
    ca_key: ec.EllipticCurvePrivateKey, root: x509.Certificate, subject: ec.EllipticCurvePublicKey,
    uri: str, *, days: int = 365, not_before: dt.datetime = T0,
) -> bytes:
    cert = (
        x509.CertificateBuilder().subject_name(_name(uri)).issuer_name(root.subject)
        .public_key(subject).serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_before + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(Encoding.DER)


def intermediate(
    w: World, *, key_usage: bool = True,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, bytes]:
    """An intermediate CA under the world's root (keyCertSign unless told otherwise)."""
    ik = key("intermediate")
    b = (x509.CertificateBuilder().subject_name(_name("intermediate"))
         .issuer_name(w.root.subject).public_key(ik.public_key()).serial_number(77)
         .not_valid_before(T0).not_valid_after(T0 + dt.timedelta(days=1000))
         .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True))
    if key_usage:
        b = b.add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
    cert = b.sign(w.ca_key, hashes.SHA256())
    return ik, cert, cert.public_bytes(Encoding.DER)


def leaf(
    issuer_key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate, uri: str, *,
    eku: str | None = None, digest: hashes.SHA224 | hashes.SHA256 | None = None,
) -> bytes:
    b = (x509.CertificateBuilder().subject_name(_name("leaf")).issuer_name(issuer.subject)
         .public_key(key(uri).public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(T0).not_valid_after(T0 + dt.timedelta(days=100))
         .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]),
                        critical=False))
    if eku:
        b = b.add_extension(x509.ExtendedKeyUsage([ObjectIdentifier(eku)]), critical=False)
    return b.sign(issuer_key, digest or hashes.SHA256()).public_bytes(Encoding.DER)


@dataclass
class World:
    ca_key: ec.EllipticCurvePrivateKey
    root: x509.Certificate
    trust: sa1.Trust
    device_key: ec.EllipticCurvePrivateKey
    broker_key: ec.EllipticCurvePrivateKey
    device_chain: list[bytes]
    broker_chain: list[bytes]


def world() -> World:
    ca_key = key("ca")
    root = make_root(ca_key)
    dk, bk = key("device"), key("broker")
    return World(
        ca_key, root, sa1.Trust((root,), DOMAIN), dk, bk,
        [make_leaf(ca_key, root, dk.public_key(), DEVICE)],
        [make_leaf(ca_key, root, bk.public_key(), BROKER)],
    )


@dataclass
class Run:
    msg1: bytes
    answer: sa1.Answer
    completed: sa1.Completed
    initiator: sa1.Session
    responder: sa1.Session


def handshake(
    w: World, *, params: sa1.Params | None = None, start: float = 100.0, seed: bytes = b"s",
    context: bytes = b"",
) -> Run:
    def rnd(label: str, n: int) -> bytes:
        return hashlib.shake_256(seed + label.encode()).digest(n)

    x_i, seed_i = rnd("xi", 32), rnd("mlkem", 64)
    msg1 = sa1.build_msg1(
        nonce=rnd("ni", 32), x25519_private=x_i, mlkem_seed=seed_i, chain=w.device_chain,
        responder=BROKER, context=context,
        signature=lambda signed: sa1.sign(w.device_key, sa1.LABEL_MSG1_SIG, signed),
    )
    checked = sa1.responder_check_msg1(msg1, start, own_identity=BROKER, trust=w.trust,
                                       policy=POLICY)
    ek = mlkem.MLKEM768PrivateKey.from_seed_bytes(seed_i).public_key()
    ss_k, ct = ek.encapsulate()
    answer = sa1.responder_answer(
        checked, start, nonce_r=rnd("nr", 32), x25519_private=rnd("xr", 32),
        encapsulation=(ss_k, ct), params=params or sa1.Params(), chain=w.broker_chain,
        signature=lambda th: sa1.sign(w.broker_key, sa1.LABEL_MSG2_SIG, th),
    )
    done = sa1.initiator_process_msg2(
        msg1, answer.msg2, start, x25519_private=x_i, mlkem_seed=seed_i, expected=BROKER,
        trust=w.trust, policy=POLICY,
    )
    session = sa1.responder_confirm(answer.pending, done.msg3, start + 0.01)
    return Run(msg1, answer, done, done.session, session)
