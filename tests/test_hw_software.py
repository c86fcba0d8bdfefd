"""hw.software (development-only signer) and the hw.open_signer spec parser."""

from __future__ import annotations

import hashlib
import logging
import stat

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature

from hw import open_signer
from hw.software import InsecureSoftwareSigner
from structauth.errors import ConfigurationError, KeyBackendError, Reason, StateError
from structauth.keys import Signer

PREHASHED = ec.ECDSA(Prehashed(hashes.SHA256()))

# RFC 6979, appendix A.2.5: ECDSA, 256 bits (prime field), SHA-256, message "sample".
RFC6979_X = 0xC9AFA9D845BA75166B5C215767B1D6934E50C3DB36E89B127B8A622B120F6721
RFC6979_UX = 0x60FED4BA255A9D31C961EB74C6356D68C049B8923B61FA6CE669622E60F29FB6
RFC6979_R = 0xEFD48B2AACB6A8FD1140DD9CD45E81D69D2C877B56AAF991C34D0EA84EAF3716
RFC6979_S = 0xF7CB1C942D657C41D436C7A1B6E29F65F3E900DBB9AFF4064DC4AB2F843ACDA8


def test_generated_key_signs_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="hw.software"):
        signer = InsecureSoftwareSigner.generate()
    assert any("NOT in a TPM or HSM" in r.getMessage() for r in caplog.records)
    assert isinstance(signer, Signer)
    assert signer.backend == "insecure-software"
    digest = hashlib.sha256(b"hello").digest()
    signature = signer.sign_digest(digest)
    signer.public_key().verify(signature, digest, PREHASHED)
    with pytest.raises(InvalidSignature):
        signer.public_key().verify(signature, hashlib.sha256(b"other").digest(), PREHASHED)


def test_deterministic_signing_matches_rfc6979_vector() -> None:
    signer = InsecureSoftwareSigner.from_private_value(RFC6979_X, deterministic=True)
    assert signer.public_key().public_numbers().x == RFC6979_UX
    digest = hashlib.sha256(b"sample").digest()
    signature = signer.sign_digest(digest)
    assert decode_dss_signature(signature) == (RFC6979_R, RFC6979_S)
    assert signer.sign_digest(digest) == signature


def test_randomised_signing_differs_each_time() -> None:
    signer = InsecureSoftwareSigner.from_private_value(RFC6979_X, deterministic=False)
    digest = hashlib.sha256(b"sample").digest()
    first, second = signer.sign_digest(digest), signer.sign_digest(digest)
    assert first != second
    signer.public_key().verify(first, digest, PREHASHED)


def test_seeded_keys_are_reproducible() -> None:
    a = InsecureSoftwareSigner.from_seed(b"device-0001")
    b = InsecureSoftwareSigner.from_seed(b"device-0001")
    c = InsecureSoftwareSigner.from_seed(b"device-0002")
    assert a.public_key() == b.public_key()
    assert a.public_key() != c.public_key()
    digest = hashlib.sha256(b"vector").digest()
    assert a.sign_digest(digest) == b.sign_digest(digest)


@pytest.mark.parametrize("value", [0, -1, 2**256, "1"])
def test_private_value_out_of_range_is_refused(value: object) -> None:
    with pytest.raises(StateError) as info:
        InsecureSoftwareSigner.from_private_value(value)  # type: ignore[arg-type]
    assert info.value.reason == Reason.BAD_PARAMETERS


def test_empty_seed_and_bad_digest_are_refused() -> None:
    with pytest.raises(StateError) as info:
        InsecureSoftwareSigner.from_seed(b"")
    assert info.value.reason == Reason.BAD_PARAMETERS
    signer = InsecureSoftwareSigner.from_seed(b"x")
    with pytest.raises(StateError) as info:
        signer.sign_digest(b"\x00" * 31)
    assert info.value.reason == Reason.BAD_PARAMETERS


def test_save_and_load_round_trip(tmp_path) -> None:
    path = tmp_path / "dev" / "key.pem"
    signer = InsecureSoftwareSigner.from_seed(b"persist")
    signer.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = InsecureSoftwareSigner.load(path)
    assert loaded.public_key() == signer.public_key()
    digest = hashlib.sha256(b"after reload").digest()
    signer.public_key().verify(loaded.sign_digest(digest), digest, PREHASHED)
    with pytest.raises(KeyBackendError) as info:
        InsecureSoftwareSigner.generate().save(path)
    assert info.value.reason == Reason.BAD_PARAMETERS
    InsecureSoftwareSigner.generate().save(path, overwrite=True)
    assert InsecureSoftwareSigner.load(path).public_key() != signer.public_key()


def test_load_errors(tmp_path) -> None:
    with pytest.raises(KeyBackendError) as info:
        InsecureSoftwareSigner.load(tmp_path / "missing.pem")
    assert info.value.reason == Reason.KEY_NOT_FOUND
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key")
    with pytest.raises(KeyBackendError) as info:
        InsecureSoftwareSigner.load(garbage)
    assert info.value.reason == Reason.KEY_NOT_FOUND
    p384 = tmp_path / "p384.pem"
    p384.write_bytes(
        ec.generate_private_key(ec.SECP384R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(KeyBackendError) as info:
        InsecureSoftwareSigner.load(p384)
    assert info.value.reason == Reason.KEY_NOT_FOUND


def test_open_signer_insecure_software(tmp_path) -> None:
    path = tmp_path / "dev.pem"
    with pytest.raises(KeyBackendError) as info:
        open_signer(f"insecure-software:{path}")
    assert info.value.reason == Reason.KEY_NOT_FOUND
    created = open_signer(f"insecure-software:{path}", create=True)
    again = open_signer(f"insecure-software:{path}", deterministic=True)
    assert created.public_key() == again.public_key()
    assert again.backend == "insecure-software"


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "software:/tmp/x.pem",
        "tpm",
        "tpm:device:/dev/tpmrm0",  # no key name
        "pkcs11:/usr/lib/softhsm/libsofthsm2.so#token-without-key",
        "pkcs11:/usr/lib/softhsm/libsofthsm2.so#/key",
    ],
)
def test_open_signer_rejects_bad_specs(spec: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        open_signer(spec, key_dir="/nonexistent")
    assert info.value.reason == Reason.BAD_CONFIGURATION


def test_open_signer_options_are_checked(tmp_path) -> None:
    with pytest.raises(ConfigurationError, match="key_dir"):
        open_signer("tpm:swtpm:host=127.0.0.1,port=1#k")
    with pytest.raises(ConfigurationError, match="unknown option"):
        open_signer(f"insecure-software:{tmp_path / 'k.pem'}", pin="1234")
