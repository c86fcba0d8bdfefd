"""Credentials: SPIFFE identities, chains to the fleet authority, the time policy."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from simulator.fleet import NOW, T0, Fleet
from structauth.credentials import Credential, Identity, TimePolicy, TrustStore
from structauth.errors import CredentialError, Reason

DAY = dt.timedelta(days=1)


@pytest.fixture(scope="module")
def fleet() -> Fleet:
    return Fleet()


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


def leaf(
    fleet: Fleet,
    *,
    key=None,
    sans=None,
    ca=False,
    usage=True,
    issuer=None,  # type: ignore[no-untyped-def]
    issuer_key=None,
    not_before=T0,
    not_after=T0 + 30 * DAY,
) -> x509.Certificate:
    """A hand-built leaf, for the shapes issue_credential refuses to make."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    issuer = issuer or fleet.root
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans is None:
        sans = [f"spiffe://{fleet.trust_domain}/device/hand"]
    if sans:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in sans]),
            critical=False,
        )
    if not usage:
        b = b.add_extension(
            x509.KeyUsage(False, False, True, False, False, False, False, False, False),
            critical=True,
        )
    return b.sign(issuer_key or fleet.key, hashes.SHA256())


@pytest.mark.parametrize(
    "uri",
    [
        "spiffe://fleet.test/device/pi-0001",
        "spiffe://a.b-c_d/broker/edge.1",
    ],
)
def test_identity_parse_ok(uri: str) -> None:
    ident = Identity.parse(uri)
    assert ident.uri == uri and ident.kind in ("device", "broker")
    assert f"spiffe://{ident.trust_domain}/{ident.kind}/{ident.name}" == uri


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "https://fleet.test/device/x",
        "spiffe://fleet.test/device",
        "spiffe://fleet.test/user/x",
        "spiffe://Fleet.Test/device/x",
        "spiffe://fleet.test/device/x/y",
        "spiffe:///device/x",
        "spiffe://fleet.test/device/..",
        "spiffe://fleet.test/device/" + "a" * 65,
        "spiffe://fleet.test/device/a b",
        "spiffe://.fleet.test/device/x",
        "spiffe://fleet.test//x",
    ],
)
def test_identity_parse_refused(uri: str) -> None:
    with pytest.raises(CredentialError) as exc:
        Identity.parse(uri)
    assert exc.value.reason is Reason.BAD_CREDENTIAL


def test_valid_device_and_broker(fleet: Fleet) -> None:
    for kind in ("device", "broker"):
        member = fleet.member(kind, "ok")
        assert fleet.trust.validate(member.credential, NOW, kind=kind) == member.identity


def test_pem_round_trip(fleet: Fleet) -> None:
    cred = fleet.member("device", "pem").credential
    pem = cred.chain[0].public_bytes(Encoding.PEM)
    again = Credential.from_pem(pem)
    assert again.fingerprint == cred.fingerprint and again.identity == cred.identity


def test_unknown_authority_same_name(fleet: Fleet) -> None:
    rogue = Fleet()  # same trust domain and subject name, different key
    cred = rogue.member("device", "d1").credential
    with pytest.raises(CredentialError) as exc:
        fleet.trust.validate(cred, NOW)
    assert exc.value.reason is Reason.UNKNOWN_AUTHORITY


def test_tampered_signature(fleet: Fleet) -> None:
    good = fleet.member("device", "t").credential.der_chain()[0]
    bad = bytearray(good)
    bad[-5] ^= 0x01  # inside the signature
    cred = Credential.from_der_chain([bytes(bad)])
    store = TrustStore([fleet.root], fleet.trust_domain)
    with pytest.raises(CredentialError) as exc:
        store.validate(cred, NOW)
    assert exc.value.reason is Reason.UNKNOWN_AUTHORITY


def test_failed_chain_is_not_cached(fleet: Fleet) -> None:
    store = TrustStore([fleet.root], fleet.trust_domain)
    rogue = Fleet().member("device", "d1").credential
    for _ in range(2):
        with pytest.raises(CredentialError):
            store.validate(rogue, NOW)
    assert not store._verified


def test_cached_chain_still_checks_time_and_revocation(fleet: Fleet) -> None:
    store = TrustStore([fleet.root], fleet.trust_domain)
    cred = fleet.member("device", "c", days=2).credential
    store.validate(cred, NOW)
    assert store.credential(cred.der_chain()) is cred  # parsed form reused
    with pytest.raises(CredentialError) as exc:
        store.validate(cred, TimePolicy.trusted(T0 + 5 * DAY))
    assert exc.value.reason is Reason.CREDENTIAL_EXPIRED
    with pytest.raises(CredentialError) as exc:
        store.validate(cred, NOW, revoked=lambda c: True)
    assert exc.value.reason is Reason.CREDENTIAL_REVOKED


def test_cache_is_bounded(fleet: Fleet) -> None:
    store = TrustStore([fleet.root], fleet.trust_domain, cache_size=2)
    for i in range(4):
        store.validate(fleet.member("device", f"b{i}").credential, NOW)
    assert len(store._verified) == 2
    assert len(store._by_identity) == 2  # evicted identities are forgotten too


def test_a_renewed_credential_replaces_its_predecessor_in_the_cache(fleet: Fleet) -> None:
    """Renewals do not fill the cache (each entry holds parsed certificates, a few
    KiB): one entry per identity, the newest chain; other identities keep theirs, and
    the old chain still validates (parsed and checked again) if it comes back."""
    store = TrustStore([fleet.root], fleet.trust_domain)
    other = fleet.member("device", "r-other").credential
    store.validate(other, NOW)
    chains = [fleet.member("device", "r-1").credential for _ in range(5)]  # renewals
    for cred in chains:
        assert store.validate(cred, NOW) == cred.identity
    assert len(store._verified) == 2
    assert store.credential(chains[-1].der_chain()) is chains[-1]
    assert store.credential(other.der_chain()) is other
    assert store.credential(chains[0].der_chain()) is not chains[0]  # parsed anew
    assert store.validate(chains[0], NOW) == chains[0].identity
    assert len(store._verified) == 2


@pytest.mark.parametrize(
    ("policy", "reason"),
    [
        (TimePolicy.trusted(T0 + 31 * DAY), Reason.CREDENTIAL_EXPIRED),
        (TimePolicy.trusted(T0 - DAY), Reason.CREDENTIAL_NOT_YET_VALID),
        (TimePolicy.unknown(floor=T0 + 31 * DAY), Reason.CREDENTIAL_EXPIRED),
    ],
)
def test_time_refused(fleet: Fleet, policy: TimePolicy, reason: Reason) -> None:
    cred = fleet.member("device", "time").credential
    with pytest.raises(CredentialError) as exc:
        fleet.trust.validate(cred, policy)
    assert exc.value.reason is reason


@pytest.mark.parametrize(
    "policy",
    [
        TimePolicy.trusted(T0 - dt.timedelta(minutes=4)),  # not yet valid, inside the skew
        TimePolicy.trusted(T0 + 30 * DAY + dt.timedelta(minutes=4)),  # expired, inside skew
        TimePolicy.unknown(floor=T0 - 365 * DAY),  # floor: not-yet-valid is not judged
        TimePolicy.unknown(),  # nothing known: time is not judged
    ],
)
def test_time_accepted(fleet: Fleet, policy: TimePolicy) -> None:
    fleet.trust.validate(fleet.member("device", "time").credential, policy)


def test_expired_authority_refused() -> None:
    fleet = Fleet()
    cred = fleet.member("device", "x").credential
    with pytest.raises(CredentialError) as exc:
        fleet.trust.validate(cred, TimePolicy.trusted(T0 + 3651 * DAY))
    assert exc.value.reason is Reason.CREDENTIAL_EXPIRED


def test_revoked(fleet: Fleet) -> None:
    cred = fleet.member("device", "r").credential
    with pytest.raises(CredentialError) as exc:
        fleet.trust.validate(cred, NOW, revoked=lambda c: c.fingerprint == cred.fingerprint)
    assert exc.value.reason is Reason.CREDENTIAL_REVOKED


def test_wrong_trust_domain_kind_and_identity(fleet: Fleet) -> None:
    other = Fleet(trust_domain="other.test")
    with pytest.raises(CredentialError) as exc:
        fleet.trust.validate(other.member("device", "d").credential, NOW)
    assert exc.value.reason is Reason.WRONG_IDENTITY
    cred = fleet.member("broker", "b").credential
    with pytest.raises(CredentialError) as exc:
        fleet.trust.validate(cred, NOW, kind="device")
    assert exc.value.reason is Reason.WRONG_IDENTITY
    with pytest.raises(CredentialError) as exc:
        fleet.trust.validate(cred, NOW, expected=Identity.parse("spiffe://fleet.test/broker/c"))
    assert exc.value.reason is Reason.WRONG_IDENTITY


def test_leaf_that_is_a_ca(fleet: Fleet) -> None:
    cred = Credential.from_der_chain([der(leaf(fleet, ca=True))])
    with pytest.raises(CredentialError) as exc:
        fleet.trust.validate(cred, NOW)
    assert exc.value.reason is Reason.BAD_CREDENTIAL


def test_leaf_without_digital_signature(fleet: Fleet) -> None:
    cred = Credential.from_der_chain([der(leaf(fleet, usage=False))])
    with pytest.raises(CredentialError) as exc:
        fleet.trust.validate(cred, NOW)
    assert exc.value.reason is Reason.BAD_CREDENTIAL


@pytest.mark.parametrize(
    "key",
    [
        ec.generate_private_key(ec.SECP384R1()),
        ed25519.Ed25519PrivateKey.generate(),
    ],
    ids=["p384", "ed25519"],
)
def test_non_p256_key_refused(fleet: Fleet, key) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(CredentialError, match="P-256"):
        Credential.from_der_chain([der(leaf(fleet, key=key))])


@pytest.mark.parametrize(
    "sans",
    [
        [],
        ["spiffe://fleet.test/device/a", "spiffe://fleet.test/device/b"],
        ["https://x.test/"],
    ],
    ids=["none", "two", "not-spiffe"],
)
def test_san_shapes_refused(fleet: Fleet, sans: list[str]) -> None:
    with pytest.raises(CredentialError) as exc:
        Credential.from_der_chain([der(leaf(fleet, sans=sans))])
    assert exc.value.reason is Reason.BAD_CREDENTIAL


_two_level_keys: dict[int, ec.EllipticCurvePrivateKey] = {}
_CA_USAGE = x509.KeyUsage(False, False, False, False, False, True, True, False, False)


def _two_level(
    *, inter_usage: x509.KeyUsage | None = _CA_USAGE,
    eku: list[x509.ObjectIdentifier] | None = None, kind: str = "device",
) -> tuple[Fleet, x509.Certificate, x509.Certificate, x509.Certificate, Identity]:
    """root (path length 1) -> intermediate -> leaf, with the knobs the chain rules test."""
    fleet = Fleet()
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "root")]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "root")]))
        .public_key(root_key.public_key())
        .serial_number(1)
        .not_valid_before(T0)
        .not_valid_after(T0 + 3650 * DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_CA_USAGE, critical=True)
        .sign(root_key, hashes.SHA256())
    )
    inter_key = ec.generate_private_key(ec.SECP256R1())
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "intermediate")]))
        .issuer_name(root.subject)
        .public_key(inter_key.public_key())
        .serial_number(2)
        .not_valid_before(T0)
        .not_valid_after(T0 + 365 * DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
    )
    if inter_usage is not None:
        b = b.add_extension(inter_usage, critical=True)
    inter = b.sign(root_key, hashes.SHA256())
    _two_level_keys[id(inter)] = inter_key
    key = ec.generate_private_key(ec.SECP256R1())
    ident = Identity.parse(f"spiffe://{fleet.trust_domain}/{kind}/deep")
    lb = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "deep")]))
        .issuer_name(inter.subject)
        .public_key(key.public_key())
        .serial_number(3)
        .not_valid_before(T0)
        .not_valid_after(T0 + 30 * DAY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(ident.uri)]),
                       critical=False)
    )
    if eku is not None:
        lb = lb.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    cert = lb.sign(inter_key, hashes.SHA256())
    return fleet, root, inter, cert, ident


def test_intermediate_chain() -> None:
    fleet, root, inter, cert, ident = _two_level()
    store = TrustStore([root], fleet.trust_domain)
    cred = Credential.from_der_chain([der(cert), der(inter)])
    assert store.validate(cred, NOW) == ident
    # the intermediate alone is not a trust anchor, and the leaf alone does not chain
    with pytest.raises(CredentialError) as exc:
        store.validate(Credential.from_der_chain([der(cert)]), NOW)
    assert exc.value.reason is Reason.UNKNOWN_AUTHORITY




def _refused(store: TrustStore, chain: list[x509.Certificate]) -> CredentialError:
    with pytest.raises(CredentialError) as exc:
        store.validate(Credential.from_der_chain([der(c) for c in chain]), NOW)
    return exc.value


@pytest.mark.parametrize("usage", [None, x509.KeyUsage(
    True, False, False, False, False, False, True, False, False)], ids=["none", "no-certsign"])
def test_intermediate_must_be_allowed_to_sign_certificates(usage: x509.KeyUsage | None) -> None:
    fleet, root, inter, cert, _ = _two_level(inter_usage=usage)
    store = TrustStore([root], fleet.trust_domain)
    err = _refused(store, [cert, inter])
    assert err.reason is Reason.UNKNOWN_AUTHORITY and "keyCertSign" in err.detail
    assert not store._verified  # nothing cached from a refused chain


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _resign_sha1(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    """The same certificate signed with ecdsa-with-SHA1 (cryptography refuses to build
    one, so the DER is re-assembled by hand: TBS with the SHA-1 algorithm identifier,
    outer algorithm identifier, signature bit string)."""
    sha256_alg = bytes.fromhex("300a06082a8648ce3d040302")
    sha1_alg = bytes.fromhex("300906072a8648ce3d0401")
    tbs = cert.tbs_certificate_bytes
    assert tbs.count(sha256_alg) == 1
    head = 2 if tbs[1] < 0x80 else 2 + (tbs[1] & 0x7F)  # SEQUENCE tag and length
    body = tbs[head:].replace(sha256_alg, sha1_alg)
    new_tbs = b"\x30" + _der_len(len(body)) + body
    sig = key.sign(new_tbs, ec.ECDSA(hashes.SHA1()))
    bits = b"\x03" + _der_len(len(sig) + 1) + b"\x00" + sig
    outer = new_tbs + sha1_alg + bits
    return x509.load_der_x509_certificate(b"\x30" + _der_len(len(outer)) + outer)


def test_sha1_signed_credential_refused() -> None:
    fleet, root, inter, cert, _ = _two_level()
    inter_key = _two_level_keys[id(inter)]
    weak = _resign_sha1(cert, inter_key)
    err = _refused(TrustStore([root], fleet.trust_domain), [weak, inter])
    assert err.reason is Reason.BAD_CREDENTIAL and "sha1" in err.detail


@pytest.mark.parametrize("kind,eku,ok", [
    ("device", [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH], True),
    ("device", [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH], False),
    ("device", [x509.oid.ExtendedKeyUsageOID.CODE_SIGNING], False),
    ("broker", [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH], True),
    ("broker", [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH], False),
    ("broker", [x509.oid.ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE], True),
])
def test_extended_key_usage_where_present(kind: str, eku: list, ok: bool) -> None:  # type: ignore[type-arg]
    fleet, root, inter, cert, ident = _two_level(eku=eku, kind=kind)
    store = TrustStore([root], fleet.trust_domain)
    if ok:
        cred = Credential.from_der_chain([der(cert), der(inter)])
        assert store.validate(cred, NOW) == ident
    else:
        err = _refused(store, [cert, inter])
        assert err.reason is Reason.BAD_CREDENTIAL and "extended key usage" in err.detail


def test_revoking_an_intermediate_revokes_everything_under_it() -> None:
    fleet, root, inter, cert, _ = _two_level()
    store = TrustStore([root], fleet.trust_domain)
    cred = Credential.from_der_chain([der(cert), der(inter)])
    assert cred.serials == ("3", "2")
    revoked = {format(inter.serial_number, "x")}
    with pytest.raises(CredentialError) as exc:
        store.validate(cred, NOW, revoked=lambda c: bool(revoked & set(c.serials)))
    assert exc.value.reason is Reason.CREDENTIAL_REVOKED


def test_too_many_or_no_certificates(fleet: Fleet) -> None:
    one = fleet.member("device", "m").credential.der_chain()[0]
    for chain in ([], [one] * 5):
        with pytest.raises(CredentialError):
            Credential.from_der_chain(chain)
    with pytest.raises(CredentialError):
        Credential.from_der_chain([b"\x30" * 5000])


@given(st.integers(0, 600), st.binary(max_size=4))
@settings(max_examples=200, deadline=None)
def test_truncated_or_extended_der(cut: int, extra: bytes) -> None:
    fleet = _SHARED
    good = _SHARED_DER
    data = good[:cut] + extra
    try:
        cred = Credential.from_der_chain([data])
    except CredentialError:
        return
    if data == good:
        fleet.trust.validate(cred, NOW)
        return
    # a cut-and-extended certificate can still parse (e.g. only signature bytes
    # changed); it must then fail validation, never pass as another credential
    with pytest.raises(CredentialError):
        fleet.trust.validate(cred, NOW)


_SHARED = Fleet()
_SHARED_DER = _SHARED.member("device", "fz").credential.der_chain()[0]


def test_a_device_trusts_its_wall_clock_only_when_it_is_not_behind_what_it_knows() -> None:
    floor = T0 + 10 * DAY
    behind = TimePolicy.for_device(dt.datetime(1970, 1, 1, tzinfo=dt.UTC), floor)
    assert behind.now is None and behind.floor == floor
    sane = TimePolicy.for_device(floor + DAY, floor)
    assert sane.now == floor + DAY and sane.floor is None
    # within the skew of the floor still counts as a working clock
    assert TimePolicy.for_device(floor - dt.timedelta(minutes=4), floor).now is not None


def test_a_clockless_device_still_refuses_what_expired_before_its_floor(fleet: Fleet) -> None:
    cred = fleet.member("broker", "old").credential
    floor = cred.not_after + DAY  # the device knows this much time has passed
    policy = TimePolicy.for_device(dt.datetime(1970, 1, 1, tzinfo=dt.UTC), floor)
    with pytest.raises(CredentialError) as exc:
        fleet.trust.validate(cred, policy)
    assert exc.value.reason is Reason.CREDENTIAL_EXPIRED
