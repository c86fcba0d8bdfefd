"""The fleet authority: its key in a real SoftHSM2 token, certificates and CRLs signed
through the Signer interface, and the authority directory's all-or-nothing setup."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pkcs11
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from pkcs11 import Attribute, ObjectClass
from pkcs11 import exceptions as p11e

from hw.pkcs11 import DEFAULT_PIN_ENV, Pkcs11Backend
from hw.software import InsecureSoftwareSigner
from provisioning.authority import (
    CONFIG_FILE,
    FILE_KEY,
    ROOT_FILE,
    FleetAuthority,
)
from provisioning.certificates import (
    _der_length,
    issue_credential,
    make_authority,
    profile_of,
    sign_certificate,
    sign_crl,
)
from simulator.softhsm import SoftHsm
from structauth.credentials import Credential, Identity, TimePolicy
from structauth.errors import (
    ConfigurationError,
    CredentialError,
    KeyBackendError,
    Reason,
    StateError,
)

TD = "fleet.test"
T0 = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
NOW = T0 + dt.timedelta(hours=1)
DAY = dt.timedelta(days=1)
DEVICE = Identity.parse(f"spiffe://{TD}/device/d-0001")
BROKER = Identity.parse(f"spiffe://{TD}/broker/b1")


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


def credential(cert: x509.Certificate) -> Credential:
    return Credential.from_der_chain([der(cert)])


def p256() -> ec.EllipticCurvePublicKey:
    return ec.generate_private_key(ec.SECP256R1()).public_key()


def snapshot(path: Path) -> dict[str, bytes] | None:
    """Every file under ``path`` with its content, or None if ``path`` does not exist."""
    if not path.exists():
        return None
    return {
        str(p.relative_to(path)): p.read_bytes() if p.is_file() else b"<dir>"
        for p in sorted(path.rglob("*"))
    }


def init_on_token(directory: Path, token: Pkcs11Backend, **kw: object) -> FleetAuthority:
    return FleetAuthority.init(
        directory,
        TD,
        pkcs11_module=token.module_path,
        token_label=token.token_label,
        now=T0,
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
def authority(pkcs11_token: Pkcs11Backend, tmp_path: Path) -> Iterator[FleetAuthority]:
    fa = init_on_token(tmp_path / "authority", pkcs11_token)
    try:
        yield fa
    finally:
        fa.close()


@pytest.fixture
def insecure(tmp_path: Path) -> Iterator[FleetAuthority]:
    fa = FleetAuthority.init(
        tmp_path / "dev-authority",
        TD,
        pkcs11_module=None,
        token_label=None,
        insecure_file_key=True,
        now=T0,
    )
    try:
        yield fa
    finally:
        fa.close()


# -- init, open, the directory --------------------------------------------------------


def test_init_on_softhsm(authority: FleetAuthority, pkcs11_token: Pkcs11Backend) -> None:
    directory = authority.directory
    assert sorted(p.name for p in directory.iterdir()) == [CONFIG_FILE, ROOT_FILE]
    assert authority.trust_domain == TD
    assert authority.signer.backend == "pkcs11"
    assert not authority.insecure

    config = (directory / CONFIG_FILE).read_text()
    assert f'token_label = "{pkcs11_token.token_label}"' in config
    assert 'key_label = "tessera-authority"' in config
    assert f'pin_env = "{DEFAULT_PIN_ENV}"' in config
    assert os.path.realpath(pkcs11_token.module_path) in config or pkcs11_token.module_path in (
        config
    )
    pin = os.environ[DEFAULT_PIN_ENV]
    for path in directory.iterdir():
        assert pin.encode() not in path.read_bytes(), f"the PIN leaked into {path.name}"

    root = authority.root
    assert x509.load_pem_x509_certificate((directory / ROOT_FILE).read_bytes()) == root
    assert root.public_key() == authority.signer.public_key()
    assert root.not_valid_before_utc == T0
    assert root.not_valid_after_utc == T0 + dt.timedelta(days=3652)
    bc = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    usage = root.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    nc = root.extensions.get_extension_for_class(x509.NameConstraints)
    assert nc.critical
    assert nc.value.permitted_subtrees == [x509.UniformResourceIdentifier(TD)]
    # self-signed by the token's key
    root.verify_directly_issued_by(root)


def test_reopen_uses_the_same_key(authority: FleetAuthority) -> None:
    first = authority.issue(p256(), DEVICE, not_before=T0, not_after=T0 + DAY)
    root, directory = authority.root, authority.directory
    authority.close()
    with FleetAuthority.open(directory) as reopened:
        assert reopened.root == root
        assert reopened.trust_domain == TD
        assert reopened.signer.backend == "pkcs11"
        second = reopened.issue(p256(), BROKER, not_before=T0, not_after=T0 + DAY)
        for cert in (first, second):
            reopened.trust_store().validate(credential(cert), TimePolicy.trusted(NOW))


def test_authority_key_is_sensitive_and_not_extractable(
    authority: FleetAuthority, pkcs11_token: Pkcs11Backend
) -> None:
    attrs = authority.signer.key_attributes()  # type: ignore[attr-defined]
    assert attrs["token"] and attrs["private"] and attrs["sensitive"]
    assert attrs["always_sensitive"] and attrs["never_extractable"] and attrs["local"]
    assert attrs["extractable"] is False
    # ask the token directly (login state is per process, so no PIN is needed here)
    lib = pkcs11.lib(os.path.realpath(pkcs11_token.module_path))
    session = lib.get_token(token_label=pkcs11_token.token_label).open(rw=True)
    try:
        private = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label="tessera-authority")
        assert private[Attribute.SENSITIVE] is True
        assert private[Attribute.EXTRACTABLE] is False
        with pytest.raises(p11e.AttributeSensitive):
            private[Attribute.VALUE]
    finally:
        session.close()


def test_pin_from_file(
    pkcs11_token: Pkcs11Backend, softhsm: SoftHsm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pin_file = softhsm.write_pin_file(os.environ[DEFAULT_PIN_ENV], f"{tmp_path.name}.pin")
    monkeypatch.delenv("TESSERA_TEST_UNSET_PIN", raising=False)
    directory = tmp_path / "authority"
    fa = init_on_token(directory, pkcs11_token, pin_env="TESSERA_TEST_UNSET_PIN", pin_file=pin_file)
    fa.close()
    config = (directory / CONFIG_FILE).read_text()
    assert f'pin_file = "{pin_file}"' in config
    with FleetAuthority.open(directory) as reopened:
        assert reopened.root == fa.root


def test_init_twice_is_refused_and_changes_nothing(
    authority: FleetAuthority, pkcs11_token: Pkcs11Backend
) -> None:
    directory = authority.directory
    (directory / "service.toml").write_text("# written by the CLI after init\n")
    before = snapshot(directory)
    for kw in ({}, {"key_label": "other-key"}):
        with pytest.raises(ConfigurationError, match="already holds a fleet authority"):
            init_on_token(directory, pkcs11_token, **kw)
    with pytest.raises(ConfigurationError, match="already holds"):
        FleetAuthority.init(
            directory, TD, pkcs11_module=None, token_label=None, insecure_file_key=True, now=T0
        )
    assert snapshot(directory) == before
    # and the token gained no key
    with pytest.raises(KeyBackendError) as info:
        pkcs11_token.load_signing_key("other-key")
    assert info.value.reason == Reason.KEY_NOT_FOUND


def test_init_into_existing_directory_keeps_other_files(
    pkcs11_token: Pkcs11Backend, tmp_path: Path
) -> None:
    directory = tmp_path / "home"
    directory.mkdir()
    (directory / "notes.txt").write_text("keep me")
    with init_on_token(directory, pkcs11_token) as fa:
        assert fa.directory == directory
    assert (directory / "notes.txt").read_text() == "keep me"
    assert not [p for p in directory.iterdir() if p.name.startswith(".")]  # no staging left


def test_init_refuses_a_stray_root(pkcs11_token: Pkcs11Backend, tmp_path: Path) -> None:
    directory = tmp_path / "home"
    directory.mkdir()
    (directory / ROOT_FILE).write_text("not ours")
    before = snapshot(directory)
    with pytest.raises(ConfigurationError, match=ROOT_FILE):
        init_on_token(directory, pkcs11_token)
    assert snapshot(directory) == before


@pytest.mark.parametrize(
    "domain",
    ["", "Fleet.Test", "fleet.test/device", ".fleet.test", "fleet.test.", "spiffe://fleet.test",
     "fleet test", "x" * 256],
)  # fmt: skip
def test_bad_trust_domain(domain: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="trust domain") as info:
        FleetAuthority.init(
            tmp_path / "a", domain, pkcs11_module=None, token_label=None,
            insecure_file_key=True, now=T0,
        )  # fmt: skip
    assert info.value.reason == Reason.BAD_CONFIGURATION
    assert not (tmp_path / "a").exists()


def test_neither_pkcs11_nor_insecure_flag(tmp_path: Path) -> None:
    target = tmp_path / "a"
    with pytest.raises(ConfigurationError) as info:
        FleetAuthority.init(target, TD, pkcs11_module=None, token_label=None, now=T0)
    # the message says how to fix it
    assert "PKCS#11" in info.value.detail
    assert "--pkcs11-module" in info.value.detail and "--token" in info.value.detail
    assert "insecure" in info.value.detail
    with pytest.raises(ConfigurationError):  # half a PKCS#11 configuration
        FleetAuthority.init(target, TD, pkcs11_module="/x.so", token_label=None, now=T0)
    with pytest.raises(ConfigurationError, match="not both"):
        FleetAuthority.init(
            target, TD, pkcs11_module="/x.so", token_label="t", insecure_file_key=True, now=T0
        )
    assert not target.exists()


def test_wrong_pin_writes_nothing(
    pkcs11_token: Pkcs11Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    right = os.environ[DEFAULT_PIN_ENV]
    monkeypatch.setenv(DEFAULT_PIN_ENV, right + "0")
    target = tmp_path / "authority"
    # while this process is logged in with the right PIN ...
    with pytest.raises(KeyBackendError) as info:
        init_on_token(target, pkcs11_token)
    assert info.value.reason == Reason.WRONG_PIN
    assert not target.exists()
    # ... and when nobody is, the token itself refuses it
    pkcs11_token.close()
    with pytest.raises(KeyBackendError) as info:
        init_on_token(target, pkcs11_token)
    assert info.value.reason == Reason.WRONG_PIN
    assert "PinIncorrect" in info.value.detail
    assert not target.exists()
    # no key was generated either
    monkeypatch.setenv(DEFAULT_PIN_ENV, right)
    with Pkcs11Backend(pkcs11_token.module_path, pkcs11_token.token_label) as backend:
        with pytest.raises(KeyBackendError) as info:
            backend.load_signing_key("tessera-authority")
        assert info.value.reason == Reason.KEY_NOT_FOUND


def test_open_with_wrong_pin(
    authority: FleetAuthority, pkcs11_token: Pkcs11Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = authority.directory
    authority.close()
    pkcs11_token.close()  # nobody in this process is logged in now
    monkeypatch.setenv(DEFAULT_PIN_ENV, "not-the-pin")
    with pytest.raises(KeyBackendError) as info:
        FleetAuthority.open(directory)
    assert info.value.reason == Reason.WRONG_PIN
    monkeypatch.delenv(DEFAULT_PIN_ENV)
    with pytest.raises(ConfigurationError, match=DEFAULT_PIN_ENV):
        FleetAuthority.open(directory)


def test_failed_init_leaves_nothing_behind(
    pkcs11_token: Pkcs11Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_link = os.link
    calls = []

    def flaky_link(src: object, dst: object) -> None:
        calls.append(dst)
        if len(calls) == 2:  # root.pem is in place, authority.toml is not
            raise OSError(28, "No space left on device")
        real_link(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "link", flaky_link)
    fresh = tmp_path / "new" / "authority"
    with pytest.raises(OSError, match="No space"):
        init_on_token(fresh, pkcs11_token)
    assert not (tmp_path / "new").exists()

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "registry.db").write_bytes(b"data")
    before = snapshot(existing)
    calls.clear()
    with pytest.raises(OSError, match="No space"):
        init_on_token(existing, pkcs11_token)
    assert snapshot(existing) == before

    # the key made by the failed attempts stays on the token and a retry uses it
    monkeypatch.setattr(os, "link", real_link)
    kept = pkcs11_token.load_signing_key("tessera-authority").public_key()
    with init_on_token(existing, pkcs11_token) as fa:
        assert fa.root.public_key() == kept


def test_insecure_file_key_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    directory = tmp_path / "dev"
    with caplog.at_level(logging.WARNING, logger="provisioning.authority"):
        fa = FleetAuthority.init(
            directory, TD, pkcs11_module=None, token_label=None, insecure_file_key=True, now=T0
        )
    warnings = [r for r in caplog.records if r.name == "provisioning.authority"]
    assert warnings and all(r.levelno == logging.WARNING for r in warnings)
    assert "insecure-file-key" in warnings[0].getMessage()
    assert fa.insecure and fa.signer.backend == "insecure-software"
    config = (directory / CONFIG_FILE).read_text()
    assert 'backend = "insecure-file-key"' in config
    assert f'path = "{FILE_KEY}"' in config
    assert stat.S_IMODE((directory / FILE_KEY).stat().st_mode) == 0o600
    cert = fa.issue(p256(), DEVICE, not_before=T0, not_after=T0 + DAY)
    fa.close()

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="provisioning.authority"):
        reopened = FleetAuthority.open(directory)
    assert any("insecure-file-key" in r.getMessage() for r in caplog.records)
    with reopened:
        assert reopened.root == fa.root
        reopened.trust_store().validate(credential(cert), TimePolicy.trusted(NOW))


# -- open: missing or damaged directories --------------------------------------------


def test_open_missing_directory(tmp_path: Path) -> None:
    for path in (tmp_path / "nowhere", tmp_path):
        with pytest.raises(ConfigurationError, match="holds no fleet authority"):
            FleetAuthority.open(path)


@pytest.mark.parametrize(
    "damage",
    [
        "config-not-toml",
        "config-no-key-table",
        "config-bad-backend",
        "config-bad-trust-domain",
        "config-bad-version",
        "root-missing",
        "root-garbage",
        "root-replaced",
        "key-mismatch",
    ],
)
def test_open_damaged_directory(insecure: FleetAuthority, damage: str) -> None:
    directory = insecure.directory
    insecure.close()
    config = directory / CONFIG_FILE
    text = config.read_text()
    if damage == "config-not-toml":
        config.write_text("trust_domain = [unterminated\n")
    elif damage == "config-no-key-table":
        config.write_text(text.split("[key]")[0])
    elif damage == "config-bad-backend":
        config.write_text(text.replace('"insecure-file-key"', '"tpm"'))
    elif damage == "config-bad-trust-domain":
        config.write_text(text.replace(f'"{TD}"', '"Bad Domain"'))
    elif damage == "config-bad-version":
        config.write_text(text.replace("version = 1", "version = 99"))
    elif damage == "root-missing":
        (directory / ROOT_FILE).unlink()
    elif damage == "root-garbage":
        (directory / ROOT_FILE).write_text("-----BEGIN CERTIFICATE-----\nAAAA\n")
    elif damage == "root-replaced":
        other = make_authority(
            TD, ec.generate_private_key(ec.SECP256R1()), not_before=T0, not_after=T0 + DAY
        )
        (directory / ROOT_FILE).write_bytes(other.public_bytes(Encoding.PEM))
    elif damage == "key-mismatch":
        InsecureSoftwareSigner.generate().save(directory / FILE_KEY, overwrite=True)
    with pytest.raises(ConfigurationError) as info:
        FleetAuthority.open(directory)
    assert info.value.reason == Reason.BAD_CONFIGURATION


# -- issuing ---------------------------------------------------------------------------


def test_device_and_broker_credentials_validate(authority: FleetAuthority) -> None:
    store = authority.trust_store()
    device_key, broker_key = p256(), p256()
    enrollment = authority.issue(
        device_key, DEVICE, not_before=T0, not_after=T0 + 3650 * DAY, profile="enrollment"
    )
    operational = authority.issue(
        device_key, DEVICE, not_before=T0, not_after=T0 + DAY, profile="operational"
    )
    broker = authority.issue(
        broker_key, BROKER, not_before=T0, not_after=T0 + 30 * DAY, serial=0x1234
    )
    policy = TimePolicy.trusted(NOW)
    assert store.validate(credential(enrollment), policy, expected=DEVICE, kind="device") == DEVICE
    assert store.validate(credential(operational), policy, kind="device") == DEVICE
    assert store.validate(credential(broker), policy, kind="broker") == BROKER
    assert profile_of(enrollment) == "enrollment"
    assert profile_of(operational) == "operational"
    assert profile_of(broker) == "enrollment"  # the default profile
    assert broker.serial_number == 0x1234
    assert operational.public_key() == device_key
    assert operational.issuer == authority.root.subject
    assert operational.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "d-0001"
    aki = operational.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = authority.root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    # the operational credential expires; the trust store says so
    with pytest.raises(CredentialError) as info:
        store.validate(credential(operational), TimePolicy.trusted(T0 + 2 * DAY))
    assert info.value.reason == Reason.CREDENTIAL_EXPIRED


def test_credential_never_outlives_the_root(authority: FleetAuthority) -> None:
    end = authority.root.not_valid_after_utc
    cert = authority.issue(p256(), DEVICE, not_before=T0, not_after=end + 365 * DAY)
    assert cert.not_valid_after_utc == end
    with pytest.raises(StateError):
        authority.issue(p256(), DEVICE, not_before=end, not_after=end + DAY)


def test_identity_in_another_trust_domain_is_refused(authority: FleetAuthority) -> None:
    stranger = Identity.parse("spiffe://other.test/device/d-0001")
    with pytest.raises(CredentialError) as info:
        authority.issue(p256(), stranger, not_before=T0, not_after=T0 + DAY)
    assert info.value.reason == Reason.WRONG_IDENTITY


@pytest.mark.parametrize(
    "key",
    [
        ec.generate_private_key(ec.SECP384R1()).public_key(),
        ed25519.Ed25519PrivateKey.generate().public_key(),
    ],
    ids=["p384", "ed25519"],
)
def test_non_p256_public_key_is_refused(authority: FleetAuthority, key: object) -> None:
    with pytest.raises(StateError, match="P-256") as info:
        authority.issue(key, DEVICE, not_before=T0, not_after=T0 + DAY)  # type: ignore[arg-type]
    assert info.value.reason == Reason.BAD_PARAMETERS


@pytest.mark.parametrize(
    "kw",
    [
        {"profile": "admin"},
        {"not_after": T0},
        {"not_after": T0 - DAY},
        {"not_before": dt.datetime(2025, 1, 1)},  # naive: whose clock?
        {"serial": 0},
        {"serial": -5},
        {"serial": 1 << 160},
    ],
    ids=["profile", "empty", "backwards", "naive", "serial0", "negative", "huge"],
)
def test_bad_issue_parameters(authority: FleetAuthority, kw: dict[str, object]) -> None:
    args: dict[str, object] = {"not_before": T0, "not_after": T0 + DAY, **kw}
    with pytest.raises(StateError) as info:
        authority.issue(p256(), DEVICE, **args)  # type: ignore[arg-type]
    assert info.value.reason == Reason.BAD_PARAMETERS


def test_closed_authority_issues_nothing(authority: FleetAuthority) -> None:
    authority.close()
    authority.close()  # idempotent
    with pytest.raises(StateError) as info:
        authority.issue(p256(), DEVICE, not_before=T0, not_after=T0 + DAY)
    assert info.value.reason == Reason.INVALID_STATE


# -- CRLs and the bundle ---------------------------------------------------------------


def test_crl_verifies_and_lists_serials(authority: FleetAuthority) -> None:
    revoked_at = T0 + dt.timedelta(minutes=30)
    crl = authority.sign_crl(
        [(0x10, revoked_at), (0x20, revoked_at), (0x10, T0 + DAY)],
        now=NOW,
        next_update=NOW + dt.timedelta(hours=1),
        crl_number=7,
    )
    assert crl.is_signature_valid(authority.root.public_key())  # type: ignore[arg-type]
    assert crl.issuer == authority.root.subject
    assert crl.last_update_utc == NOW
    assert crl.next_update_utc == NOW + dt.timedelta(hours=1)
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 7
    assert sorted(r.serial_number for r in crl) == [0x10, 0x20]
    entry = crl.get_revoked_certificate_by_serial_number(0x10)
    assert entry is not None and entry.revocation_date_utc == revoked_at  # the earliest
    assert crl.get_revoked_certificate_by_serial_number(0x30) is None
    empty = authority.sign_crl([], now=NOW, next_update=NOW + DAY, crl_number=8)
    assert empty.is_signature_valid(authority.root.public_key()) and len(empty) == 0  # type: ignore[arg-type]


def test_bad_crl_parameters(authority: FleetAuthority) -> None:
    ok: dict[str, object] = {"now": NOW, "next_update": NOW + DAY, "crl_number": 1}
    for revoked, kw in (
        ([], {"next_update": NOW}),
        ([], {"crl_number": -1}),
        ([(0, NOW)], {}),
        ([(5, dt.datetime(2025, 1, 1))], {}),
    ):
        with pytest.raises(StateError):
            authority.sign_crl(revoked, **{**ok, **kw})  # type: ignore[arg-type]


def test_bundle_round_trip(authority: FleetAuthority) -> None:
    bundle = authority.bundle_pem()
    assert bundle.startswith(b"-----BEGIN CERTIFICATE-----\n")
    assert bundle.endswith(b"-----END CERTIFICATE-----\n")
    assert bundle == (authority.directory / ROOT_FILE).read_bytes()
    (root,) = x509.load_pem_x509_certificates(bundle)
    assert root == authority.root
    # a device or broker that has only the bundle accepts what the authority issues
    from structauth.credentials import TrustStore

    store = TrustStore(x509.load_pem_x509_certificates(bundle), TD)
    cert = authority.issue(p256(), DEVICE, not_before=T0, not_after=T0 + DAY)
    assert store.validate(credential(cert), TimePolicy.trusted(NOW)) == DEVICE


# -- OpenSSL agrees --------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl binary")
def test_openssl_verifies_hsm_signed_certificates(
    authority: FleetAuthority, tmp_path: Path
) -> None:
    good = authority.issue(p256(), DEVICE, not_before=T0, not_after=T0 + DAY, profile="operational")
    bad = authority.issue(p256(), BROKER, not_before=T0, not_after=T0 + DAY)
    crl = authority.sign_crl(
        [(bad.serial_number, NOW)], now=NOW, next_update=NOW + DAY, crl_number=1
    )
    files = {"good.pem": good, "bad.pem": bad}
    for name, cert in files.items():
        (tmp_path / name).write_bytes(cert.public_bytes(Encoding.PEM))
    (tmp_path / "crl.pem").write_bytes(crl.public_bytes(Encoding.PEM))
    root_pem = str(authority.directory / ROOT_FILE)
    at = str(int((NOW + dt.timedelta(minutes=5)).timestamp()))

    def openssl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["openssl", *args], capture_output=True, text=True, timeout=30, cwd=tmp_path
        )

    result = openssl("verify", "-attime", at, "-CAfile", root_pem, "good.pem")
    assert result.returncode == 0 and "good.pem: OK" in result.stdout, result.stderr
    # the root checks out on its own too (self-signed, signature by the token's key)
    result = openssl("verify", "-attime", at, "-check_ss_sig", "-CAfile", root_pem, root_pem)
    assert result.returncode == 0, result.stderr
    # the CRL is signed correctly: the good credential passes a CRL check, the revoked fails
    crl_args = ("verify", "-attime", at, "-crl_check", "-CRLfile", "crl.pem", "-CAfile", root_pem)
    result = openssl(*crl_args, "good.pem")
    assert result.returncode == 0, result.stderr
    result = openssl(*crl_args, "bad.pem")
    assert result.returncode != 0 and "revoked" in (result.stdout + result.stderr)
    # and the encoding is what OpenSSL expects byte for byte: it re-encodes it identically
    raw = subprocess.run(
        ["openssl", "x509", "-inform", "DER", "-outform", "DER"],
        input=der(good), capture_output=True, timeout=30,
    )  # fmt: skip
    assert raw.returncode == 0 and raw.stdout == der(good)
    text = openssl("x509", "-in", "good.pem", "-noout", "-text").stdout
    assert "ecdsa-with-SHA256" in text and f"URI:{DEVICE}" in text and "OU = operational" in text


# -- provisioning.certificates with any Signer -----------------------------------------


class LyingSigner:
    """Signs with its key, but over the wrong digest."""

    backend = "lying"

    def __init__(self) -> None:
        self._inner = InsecureSoftwareSigner.generate()

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._inner.public_key()

    def sign_digest(self, digest: bytes) -> bytes:
        return self._inner.sign_digest(hashlib.sha256(digest).digest())


def test_der_length_encoding() -> None:
    assert _der_length(0) == b"\x00"
    assert _der_length(127) == b"\x7f"
    assert _der_length(128) == b"\x81\x80"
    assert _der_length(255) == b"\x81\xff"
    assert _der_length(256) == b"\x82\x01\x00"
    assert _der_length(65536) == b"\x83\x01\x00\x00"


def test_signer_and_memory_key_give_the_same_certificate_shape() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    signer = InsecureSoftwareSigner.generate()
    for signing_key in (key, signer):
        root = make_authority(TD, signing_key, not_before=T0, not_after=T0 + 365 * DAY)
        leaf = issue_credential(
            root, signing_key, p256(), DEVICE, not_before=T0, not_after=T0 + DAY
        )
        root.verify_directly_issued_by(root)
        leaf.verify_directly_issued_by(root)
        assert profile_of(leaf) is None  # no profile asked for
        assert leaf.signature_hash_algorithm is not None
        assert leaf.signature_hash_algorithm.name == "sha256"


def test_big_crl_uses_long_der_lengths() -> None:
    signer = InsecureSoftwareSigner.generate()
    root = make_authority(TD, signer, not_before=T0, not_after=T0 + DAY)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(root.subject)
        .last_update(T0)
        .next_update(T0 + DAY)
    )
    for serial in range(1, 3500):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(T0).build()
        )
    crl = sign_crl(builder, signer)
    assert len(crl.public_bytes(Encoding.DER)) > 65536
    assert crl.is_signature_valid(signer.public_key()) and len(crl) == 3499


def test_a_signature_that_does_not_verify_is_never_returned() -> None:
    signer = LyingSigner()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
        .public_key(signer.public_key())
        .serial_number(1)
        .not_valid_before(T0)
        .not_valid_after(T0 + DAY)
    )
    with pytest.raises(KeyBackendError) as info:
        sign_certificate(builder, signer)
    assert info.value.reason == Reason.BACKEND_FAILURE
    crl_builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
        .last_update(T0)
        .next_update(T0 + DAY)
    )
    with pytest.raises(KeyBackendError):
        sign_crl(crl_builder, signer)
    # a sanity check of the check: the lying signature really is invalid
    with pytest.raises(InvalidSignature):
        signer.public_key().verify(
            signer.sign_digest(b"\x00" * 32), b"\x00" * 32, ec.ECDSA(Prehashed(hashes.SHA256()))
        )


def test_issue_credential_refuses_a_key_that_is_not_the_authoritys() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    root = make_authority(TD, key, not_before=T0, not_after=T0 + DAY)
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(StateError) as info:
        issue_credential(root, other, p256(), DEVICE, not_before=T0, not_after=T0 + DAY)
    assert info.value.reason == Reason.BAD_PARAMETERS
