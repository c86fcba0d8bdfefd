"""hw.pkcs11 against a real SoftHSM2 token (no mocks)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import pkcs11
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11 import exceptions as p11e
from pkcs11.util.ec import encode_named_curve_parameters

from hw import open_signer
from hw.pkcs11 import DEFAULT_PIN_ENV, Pkcs11Backend, _translate, rescan_tokens
from simulator.softhsm import SoftHsm
from structauth.errors import ConfigurationError, KeyBackendError, Reason, StateError
from structauth.keys import Signer

PREHASHED = ec.ECDSA(Prehashed(hashes.SHA256()))
DIGEST = hashlib.sha256(b"tessera pkcs11 test").digest()


@pytest.fixture
def raw_session(pkcs11_token: Pkcs11Backend) -> Iterator[pkcs11.Session]:
    """A plain python-pkcs11 session on the same token, without Tessera in between.

    PKCS#11 login state is per process, so this session (opened without a PIN) acts as
    the user the backend logged in as.
    """
    lib = pkcs11.lib(os.path.realpath(pkcs11_token.module_path))  # as hw.pkcs11 does
    session = lib.get_token(token_label=pkcs11_token.token_label).open(rw=True)
    try:
        yield session
    finally:
        session.close()


def test_signature_verifies_with_public_key(pkcs11_token: Pkcs11Backend) -> None:
    signer = pkcs11_token.generate_signing_key("device")
    assert isinstance(signer, Signer)
    assert signer.backend == "pkcs11"
    signature = signer.sign_digest(DIGEST)
    signer.public_key().verify(signature, DIGEST, PREHASHED)
    assert isinstance(signer.public_key().curve, ec.SECP256R1)


def test_private_key_is_sensitive_and_not_extractable(
    pkcs11_token: Pkcs11Backend, raw_session: pkcs11.Session
) -> None:
    signer = pkcs11_token.generate_signing_key("device")
    attrs = signer.key_attributes()
    assert attrs["sensitive"] is True
    assert attrs["extractable"] is False
    assert attrs["token"] is True
    assert attrs["always_sensitive"] and attrs["never_extractable"] and attrs["local"]
    # Ask the token directly, bypassing Tessera: the value must not come out.
    private = raw_session.get_key(object_class=ObjectClass.PRIVATE_KEY, label="device")
    assert private[Attribute.SENSITIVE] is True
    assert private[Attribute.EXTRACTABLE] is False
    with pytest.raises(p11e.AttributeSensitive):
        private[Attribute.VALUE]


def test_duplicate_label_is_refused(pkcs11_token: Pkcs11Backend) -> None:
    pkcs11_token.generate_signing_key("device")
    with pytest.raises(KeyBackendError) as info:
        pkcs11_token.generate_signing_key("device")
    assert info.value.reason == Reason.BAD_PARAMETERS


def test_missing_key_is_key_not_found(pkcs11_token: Pkcs11Backend) -> None:
    with pytest.raises(KeyBackendError) as info:
        pkcs11_token.load_signing_key("nope")
    assert info.value.reason == Reason.KEY_NOT_FOUND


def test_get_or_create_is_idempotent(pkcs11_token: Pkcs11Backend) -> None:
    first = pkcs11_token.get_or_create_signing_key("device")
    second = pkcs11_token.get_or_create_signing_key("device")
    assert first.public_key() == second.public_key()
    first.public_key().verify(second.sign_digest(DIGEST), DIGEST, PREHASHED)


def test_key_survives_close_and_module_reinitialisation(
    pkcs11_token: Pkcs11Backend, softhsm: SoftHsm
) -> None:
    label = pkcs11_token.token_label
    public = pkcs11_token.generate_signing_key("device").public_key()
    pkcs11_token.close()
    with Pkcs11Backend(softhsm.module, label) as backend:
        assert backend.load_signing_key("device").public_key() == public
        rescan_tokens(softhsm.module)  # like a process restart: the module starts afresh
        with pytest.raises(KeyBackendError) as info:
            backend.random(8)
        assert info.value.reason == Reason.BACKEND_UNAVAILABLE
    with Pkcs11Backend(softhsm.module, label) as backend:
        signer = backend.load_signing_key("device")
        assert signer.public_key() == public
        public.verify(signer.sign_digest(DIGEST), DIGEST, PREHASHED)


def test_backends_in_one_process_share_the_login(
    pkcs11_token: Pkcs11Backend, softhsm: SoftHsm
) -> None:
    signer = pkcs11_token.generate_signing_key("device")
    second = Pkcs11Backend(softhsm.module, pkcs11_token.token_label)
    second.close()  # must not log the first backend out
    signer.public_key().verify(signer.sign_digest(DIGEST), DIGEST, PREHASHED)


def test_wrong_pin(pkcs11_token: Pkcs11Backend, softhsm: SoftHsm, monkeypatch) -> None:
    label = pkcs11_token.token_label
    right = os.environ[DEFAULT_PIN_ENV]
    monkeypatch.setenv(DEFAULT_PIN_ENV, right + "0")
    # While this process is logged in, a different PIN is still refused ...
    with pytest.raises(KeyBackendError) as info:
        Pkcs11Backend(softhsm.module, label)
    assert info.value.reason == Reason.WRONG_PIN
    # ... and once it is logged out, the token itself refuses it.
    pkcs11_token.close()
    with pytest.raises(KeyBackendError) as info:
        Pkcs11Backend(softhsm.module, label)
    assert info.value.reason == Reason.WRONG_PIN
    assert "PinIncorrect" in info.value.detail


def test_pin_lockout(pkcs11_token: Pkcs11Backend, softhsm: SoftHsm, monkeypatch) -> None:
    label = pkcs11_token.token_label
    right = os.environ[DEFAULT_PIN_ENV]
    pkcs11_token.close()
    monkeypatch.setenv(DEFAULT_PIN_ENV, "wrong-pin")
    reasons = set()
    for _ in range(12):
        with pytest.raises(KeyBackendError) as info:
            Pkcs11Backend(softhsm.module, label)
        reasons.add(info.value.reason)
    monkeypatch.setenv(DEFAULT_PIN_ENV, right)
    try:
        Pkcs11Backend(softhsm.module, label).close()
    except KeyBackendError as exc:
        assert exc.reason == Reason.TOKEN_LOCKED
        assert Reason.TOKEN_LOCKED in reasons
        return
    assert reasons == {Reason.WRONG_PIN}
    pytest.skip(
        "SoftHSM2 has no user-PIN retry counter: after 12 wrong PINs it still accepts the "
        "right one and never returns CKR_PIN_LOCKED, so TOKEN_LOCKED cannot be reached "
        "on it (the mapping is checked in test_error_translation_table)"
    )


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (p11e.PinIncorrect(), Reason.WRONG_PIN),
        (p11e.PinLocked(), Reason.TOKEN_LOCKED),
        (p11e.UserPinNotInitialized(), Reason.TOKEN_LOCKED),
        (p11e.NoSuchToken("x"), Reason.BACKEND_UNAVAILABLE),
        (p11e.TokenNotPresent(), Reason.BACKEND_UNAVAILABLE),
        (p11e.DeviceRemoved(), Reason.BACKEND_UNAVAILABLE),
        (p11e.NoSuchKey("x"), Reason.KEY_NOT_FOUND),
        (p11e.GeneralError(), Reason.BACKEND_FAILURE),
        (ValueError("x"), Reason.BACKEND_FAILURE),
    ],
)
def test_error_translation_table(exc: Exception, reason: Reason) -> None:
    """The mapping itself, with the library's real exception types (SoftHSM2 cannot
    produce all of them, e.g. CKR_PIN_LOCKED)."""
    error = _translate(exc, "login", "token 't'")
    assert isinstance(error, KeyBackendError)
    assert error.reason == reason


def test_pin_from_file(pkcs11_token: Pkcs11Backend, softhsm: SoftHsm, monkeypatch) -> None:
    label = pkcs11_token.token_label
    pin = os.environ[DEFAULT_PIN_ENV]
    pkcs11_token.close()
    monkeypatch.delenv(DEFAULT_PIN_ENV)
    pin_file = softhsm.write_pin_file(pin, name=f"{label}.pin")
    assert pin_file.stat().st_mode & 0o777 == 0o600
    with Pkcs11Backend(softhsm.module, label, pin_file=pin_file) as backend:
        backend.generate_signing_key("from-file")
    pin_file.chmod(0o644)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        Pkcs11Backend(softhsm.module, label, pin_file=pin_file)
    with pytest.raises(ConfigurationError) as info:
        Pkcs11Backend(softhsm.module, label, pin_file=pin_file.with_name("absent.pin"))
    assert "absent.pin" in info.value.detail
    pin_file.unlink()


def test_pin_env_missing_is_configuration_error(softhsm: SoftHsm, monkeypatch) -> None:
    monkeypatch.delenv(DEFAULT_PIN_ENV, raising=False)
    with pytest.raises(ConfigurationError) as info:
        Pkcs11Backend(softhsm.module, "any-token")
    assert info.value.reason == Reason.BAD_CONFIGURATION
    assert DEFAULT_PIN_ENV in info.value.detail
    monkeypatch.setenv("DEVICE_HSM_PIN", "1234")
    with pytest.raises(ConfigurationError) as info:
        Pkcs11Backend(softhsm.module, "any-token", pin_env="OTHER_PIN_VARIABLE")
    assert "OTHER_PIN_VARIABLE" in info.value.detail


def test_custom_pin_variable(pkcs11_token: Pkcs11Backend, softhsm: SoftHsm, monkeypatch) -> None:
    label = pkcs11_token.token_label
    monkeypatch.setenv("DEVICE_HSM_PIN", os.environ[DEFAULT_PIN_ENV])
    pkcs11_token.close()
    monkeypatch.delenv(DEFAULT_PIN_ENV)
    with Pkcs11Backend(softhsm.module, label, pin_env="DEVICE_HSM_PIN") as backend:
        assert len(backend.random(16)) == 16


def test_missing_token_and_module_are_unavailable(softhsm: SoftHsm, monkeypatch) -> None:
    monkeypatch.setenv(DEFAULT_PIN_ENV, "1234")
    with pytest.raises(KeyBackendError) as info:
        Pkcs11Backend(softhsm.module, "no-such-token")
    assert info.value.reason == Reason.BACKEND_UNAVAILABLE
    with pytest.raises(KeyBackendError) as info:
        Pkcs11Backend("/nonexistent/libpkcs11.so", "token")
    assert info.value.reason == Reason.BACKEND_UNAVAILABLE
    assert "/nonexistent/libpkcs11.so" in info.value.detail


def test_exportable_key_is_refused(
    pkcs11_token: Pkcs11Backend, raw_session: pkcs11.Session
) -> None:
    params = raw_session.create_domain_parameters(
        KeyType.EC,
        {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
        local=True,
    )
    params.generate_keypair(
        store=True,
        label="weak",
        private_template={Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True},
    )
    with pytest.raises(KeyBackendError) as info:
        pkcs11_token.load_signing_key("weak")
    assert info.value.reason == Reason.BAD_PARAMETERS


def test_random_and_bad_input(pkcs11_token: Pkcs11Backend) -> None:
    assert pkcs11_token.random(0) == b""
    values = {pkcs11_token.random(48) for _ in range(3)}
    assert len(values) == 3 and all(len(v) == 48 for v in values)
    signer = pkcs11_token.generate_signing_key("device")
    with pytest.raises(StateError) as info:
        signer.sign_digest(b"\x00" * 33)
    assert info.value.reason == Reason.BAD_PARAMETERS
    with pytest.raises(StateError):
        pkcs11_token.generate_signing_key("")


def test_closed_backend_is_invalid_state(pkcs11_token: Pkcs11Backend) -> None:
    signer = pkcs11_token.generate_signing_key("device")
    pkcs11_token.close()
    pkcs11_token.close()  # idempotent
    with pytest.raises(StateError) as info:
        signer.sign_digest(DIGEST)
    assert info.value.reason == Reason.INVALID_STATE


def test_open_signer_pkcs11_spec(pkcs11_token: Pkcs11Backend) -> None:
    spec = f"pkcs11:{pkcs11_token.module_path}#{pkcs11_token.token_label}/device"
    with pytest.raises(KeyBackendError) as info:
        open_signer(spec)
    assert info.value.reason == Reason.KEY_NOT_FOUND
    with open_signer(spec, create=True) as signer:  # type: ignore[attr-defined]
        public = signer.public_key()
        public.verify(signer.sign_digest(DIGEST), DIGEST, PREHASHED)
        assert signer.backend == "pkcs11"
    # closing the spec's signer released only its own share of the login
    assert pkcs11_token.load_signing_key("device").public_key() == public
