"""A TLS 1.3 mutual-auth handshake with Python's ``ssl`` over memory BIOs.

The comparison point for the SA1 responder: the broker answering a device's TLS 1.3
handshake with client certificates (CERT_REQUIRED), P-256 ECDSA certificates from a
test CA generated here, no sockets (``ssl.MemoryBIO`` + ``SSLContext.wrap_bio``).

Only the server object's ``do_handshake`` calls are billed; the client's work and the
copying between BIOs are not. Choices that keep the comparison fair to TLS:

* full handshakes only (the client never offers a session to resume);
* the server issues no session tickets (``num_tickets = 0``): SA1 has no tickets, and
  issuing them would only add to the TLS figure;
* TLS 1.3 only, default cipher suites and groups of the linked OpenSSL (X25519, not
  a post-quantum hybrid: SA1 does X25519 *and* ML-KEM-768, so TLS does less key
  exchange work here than SA1 does);
* leaf certificates carry SPIFFE URI SANs like Tessera's credentials, and the server
  validates the client chain against the CA, as the SA1 responder does.
"""

from __future__ import annotations

import datetime as dt
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter_ns

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_NAME = "broker.fleet.example"
TRUST_DOMAIN = "fleet.example"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _issue(
    ca_cert: x509.Certificate | None,
    ca_key: ec.EllipticCurvePrivateKey,
    key: ec.EllipticCurvePrivateKey,
    subject: str,
    *,
    ca: bool,
    sans: list[x509.GeneralName] | None = None,
    usage: list[x509.ObjectIdentifier] | None = None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(ca_cert.subject if ca_cert is not None else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
    else:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        )
    if ca_cert is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


@dataclass
class TlsPeers:
    """Server and client contexts sharing a freshly generated test CA."""

    server: ssl.SSLContext
    client: ssl.SSLContext
    workdir: tempfile.TemporaryDirectory[str]

    def close(self) -> None:
        self.workdir.cleanup()


def make_peers() -> TlsPeers:
    """A test CA, a broker certificate and a device certificate, and both contexts."""
    tmp = tempfile.TemporaryDirectory(prefix="tessera-bench-tls-")
    d = Path(tmp.name)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue(None, ca_key, ca_key, "Tessera bench CA", ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _issue(
        ca,
        ca_key,
        server_key,
        "broker",
        ca=False,
        sans=[
            x509.DNSName(SERVER_NAME),
            x509.UniformResourceIdentifier(f"spiffe://{TRUST_DOMAIN}/broker/main"),
        ],
        usage=[ExtendedKeyUsageOID.SERVER_AUTH],
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_cert = _issue(
        ca,
        ca_key,
        client_key,
        "pi-0042",
        ca=False,
        sans=[x509.UniformResourceIdentifier(f"spiffe://{TRUST_DOMAIN}/device/pi-0042")],
        usage=[ExtendedKeyUsageOID.CLIENT_AUTH],
    )
    pem = serialization.Encoding.PEM
    (d / "ca.pem").write_bytes(ca.public_bytes(pem))
    (d / "server.pem").write_bytes(server_cert.public_bytes(pem))
    (d / "client.pem").write_bytes(client_cert.public_bytes(pem))
    _write_key(d / "server.key", server_key)
    _write_key(d / "client.key", client_key)

    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_3
    server.maximum_version = ssl.TLSVersion.TLSv1_3
    server.verify_mode = ssl.CERT_REQUIRED
    server.load_cert_chain(d / "server.pem", d / "server.key")
    server.load_verify_locations(cafile=d / "ca.pem")
    server.num_tickets = 0

    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.minimum_version = ssl.TLSVersion.TLSv1_3
    client.maximum_version = ssl.TLSVersion.TLSv1_3
    client.load_cert_chain(d / "client.pem", d / "client.key")
    client.load_verify_locations(cafile=d / "ca.pem")
    return TlsPeers(server, client, tmp)


def _pump(src: ssl.MemoryBIO, dst: ssl.MemoryBIO) -> int:
    data = src.read()
    if data:
        dst.write(data)
    return len(data)


def server_handshake_ns(peers: TlsPeers) -> int:
    """One full mutual handshake; returns ns spent in the server's ``do_handshake``."""
    c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = peers.client.wrap_bio(c_in, c_out, server_hostname=SERVER_NAME)
    server = peers.server.wrap_bio(s_in, s_out, server_side=True)
    server_ns = 0
    client_done = server_done = False
    for _ in range(16):
        if not client_done:
            try:
                client.do_handshake()
                client_done = True
            except ssl.SSLWantReadError:
                pass
        _pump(c_out, s_in)
        if not server_done:
            t0 = perf_counter_ns()
            try:
                server.do_handshake()
                server_done = True
            except ssl.SSLWantReadError:
                pass
            finally:
                server_ns += perf_counter_ns() - t0
        _pump(s_out, c_in)
        if client_done and server_done:
            break
    else:
        raise RuntimeError("TLS handshake did not finish")
    if server.getpeercert() is None or server.version() != "TLSv1.3":
        raise RuntimeError("expected a TLS 1.3 handshake with a client certificate")
    return server_ns
