"""hw.tpm against a real swtpm (no mocks).

Most tests share the session swtpm (``tpm_backend``); tests that need a second TPM or
break TPM state (lockout, owner password) start their own: ``bare_swtpm`` skips
swtpm_setup (no EK certificate) and starts in milliseconds.
"""

from __future__ import annotations

import hashlib
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from tpm2_pytss import (
    ESAPI,
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_ECC,
    TPM2_GENERATED,
    TPM2_HT,
    TPM2_ST,
    TPM2B_AUTH,
    TPM2B_NAME,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPMA_OBJECT,
    TPMS_ATTEST,
    TPMS_SENSITIVE_CREATE,
    TCTILdr,
    TSS2_Exception,
)
from tpm2_pytss.utils import make_credential

from hw import open_signer
from hw.tpm import KEY_FILE_SUFFIX, TpmBackend, parse_tcti
from simulator.swtpm import Swtpm
from structauth.errors import ConfigurationError, KeyBackendError, Reason, StateError
from structauth.keys import Signer

PREHASHED = ec.ECDSA(Prehashed(hashes.SHA256()))
DIGEST = hashlib.sha256(b"tessera test message").digest()


@pytest.fixture
def bare_swtpm() -> Iterator[Swtpm]:
    with Swtpm(ek_certs=False) as tpm:
        yield tpm


def _raw_esapi(tpm: Swtpm) -> ESAPI:
    name, conf = parse_tcti(tpm.tcti)
    return ESAPI(TCTILdr(name, conf))


def _public_area(blob: bytes) -> TPM2B_PUBLIC:
    public, used = TPM2B_PUBLIC.unmarshal(blob)
    assert used == len(blob)
    return public


# -- signing keys -----------------------------------------------------------------------


def test_signature_verifies_with_public_key(tpm_backend: TpmBackend) -> None:
    signer = tpm_backend.create_signing_key("device")
    assert isinstance(signer, Signer)
    assert signer.backend == "tpm"
    signature = signer.sign_digest(DIGEST)
    signer.public_key().verify(signature, DIGEST, PREHASHED)
    assert isinstance(signer.public_key().curve, ec.SECP256R1)


def test_key_attributes_in_public_area(tpm_backend: TpmBackend) -> None:
    signer = tpm_backend.create_signing_key("device")
    area = _public_area(signer.public_area_bytes()).publicArea
    attrs = int(area.objectAttributes)
    for required in (
        TPMA_OBJECT.FIXEDTPM,
        TPMA_OBJECT.FIXEDPARENT,
        TPMA_OBJECT.SENSITIVEDATAORIGIN,
        TPMA_OBJECT.USERWITHAUTH,
        TPMA_OBJECT.NODA,  # empty auth: power cuts must not lock the key out (hw/tpm.py)
        TPMA_OBJECT.SIGN_ENCRYPT,
    ):
        assert attrs & required, f"{required} not set"
    for forbidden in (TPMA_OBJECT.RESTRICTED, TPMA_OBJECT.DECRYPT):
        assert not attrs & forbidden, f"{forbidden} set"
    assert area.type == TPM2_ALG.ECC
    assert area.parameters.eccDetail.curveID == TPM2_ECC.NIST_P256
    assert area.parameters.eccDetail.scheme.scheme == TPM2_ALG.ECDSA
    assert area.parameters.eccDetail.scheme.details.ecdsa.hashAlg == TPM2_ALG.SHA256
    # The TPM name is nameAlg || SHA-256(marshalled TPMT_PUBLIC): recompute it ourselves.
    tpmt = signer.public_area_bytes()[2:]
    assert signer.tpm_name() == b"\x00\x0b" + hashlib.sha256(tpmt).digest()


def test_key_file_is_private_and_never_overwritten(tpm_backend: TpmBackend) -> None:
    tpm_backend.create_signing_key("device")
    path = tpm_backend.key_dir / f"device{KEY_FILE_SUFFIX}"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    before = path.read_bytes()
    with pytest.raises(KeyBackendError) as info:
        tpm_backend.create_signing_key("device")
    assert info.value.reason == Reason.BAD_PARAMETERS
    assert path.read_bytes() == before
    assert [p.name for p in tpm_backend.key_dir.iterdir()] == [path.name]  # no temp files


def test_get_or_create_is_idempotent(tpm_backend: TpmBackend) -> None:
    first = tpm_backend.get_or_create_signing_key("device")
    second = tpm_backend.get_or_create_signing_key("device")
    assert first.public_key() == second.public_key()
    first.public_key().verify(second.sign_digest(DIGEST), DIGEST, PREHASHED)


def test_key_survives_backend_close_and_reopen(swtpm_session: Swtpm, tmp_path: Path) -> None:
    with TpmBackend(swtpm_session.tcti, tmp_path) as backend:
        public = backend.create_signing_key("device").public_key()
    with TpmBackend(swtpm_session.tcti, tmp_path) as backend:
        signer = backend.load_signing_key("device")
        assert signer.public_key() == public
        public.verify(signer.sign_digest(DIGEST), DIGEST, PREHASHED)


def test_key_survives_swtpm_restart(bare_swtpm: Swtpm, tmp_path: Path) -> None:
    with TpmBackend(bare_swtpm.tcti, tmp_path) as backend:
        public = backend.create_signing_key("device").public_key()
    bare_swtpm.restart()
    with TpmBackend(bare_swtpm.tcti, tmp_path) as backend:
        signer = backend.load_signing_key("device")
        assert signer.public_key() == public
        public.verify(signer.sign_digest(DIGEST), DIGEST, PREHASHED)


def test_missing_and_damaged_keys_are_key_not_found(tpm_backend: TpmBackend) -> None:
    with pytest.raises(KeyBackendError) as info:
        tpm_backend.load_signing_key("nope")
    assert info.value.reason == Reason.KEY_NOT_FOUND
    assert "create_signing_key" in info.value.detail
    tpm_backend.create_signing_key("device")
    path = tpm_backend.key_dir / f"device{KEY_FILE_SUFFIX}"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(KeyBackendError) as info:
        tpm_backend.load_signing_key("device")
    assert info.value.reason == Reason.KEY_NOT_FOUND


def test_blob_of_another_tpm_is_key_not_found(
    tpm_backend: TpmBackend, bare_swtpm: Swtpm, tmp_path: Path
) -> None:
    tpm_backend.create_signing_key("device")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    shutil.copy(tpm_backend.key_dir / f"device{KEY_FILE_SUFFIX}", foreign)
    with TpmBackend(bare_swtpm.tcti, foreign) as other, pytest.raises(KeyBackendError) as info:
        other.load_signing_key("device")
    assert info.value.reason == Reason.KEY_NOT_FOUND
    assert "another TPM" in info.value.detail


@pytest.mark.parametrize("name", ["", "../escape", "a/b", ".hidden", "x" * 65, "sp ace"])
def test_bad_key_names_are_refused(tpm_backend: TpmBackend, name: str) -> None:
    with pytest.raises(StateError) as info:
        tpm_backend.create_signing_key(name)
    assert info.value.reason == Reason.BAD_PARAMETERS


def test_bad_digest_is_refused(tpm_backend: TpmBackend) -> None:
    signer = tpm_backend.create_signing_key("device")
    with pytest.raises(StateError) as info:
        signer.sign_digest(b"short")
    assert info.value.reason == Reason.BAD_PARAMETERS


def test_closed_backend_is_invalid_state(swtpm_session: Swtpm, tmp_path: Path) -> None:
    backend = TpmBackend(swtpm_session.tcti, tmp_path)
    signer = backend.create_signing_key("device")
    backend.close()
    backend.close()  # idempotent
    with pytest.raises(StateError) as info:
        signer.sign_digest(DIGEST)
    assert info.value.reason == Reason.INVALID_STATE


def test_random(tpm_backend: TpmBackend) -> None:
    assert tpm_backend.random(0) == b""
    values = {tpm_backend.random(100) for _ in range(3)}
    assert len(values) == 3 and all(len(v) == 100 for v in values)


def test_open_signer_tpm_spec(swtpm_session: Swtpm, tmp_path: Path) -> None:
    spec = f"tpm:{swtpm_session.tcti}#device"
    with pytest.raises(KeyBackendError) as info:
        open_signer(spec, key_dir=tmp_path)
    assert info.value.reason == Reason.KEY_NOT_FOUND
    with open_signer(spec, key_dir=tmp_path, create=True) as signer:  # type: ignore[attr-defined]
        public = signer.public_key()
        public.verify(signer.sign_digest(DIGEST), DIGEST, PREHASHED)
        assert signer.backend == "tpm"
        assert len(signer.tpm_name()) == 34
    with open_signer(spec, key_dir=tmp_path) as signer:  # type: ignore[attr-defined]
        assert signer.public_key() == public


# -- availability and authorization failures ------------------------------------------------


def test_tpm_not_running_is_backend_unavailable(bare_swtpm: Swtpm, tmp_path: Path) -> None:
    tcti = bare_swtpm.tcti
    backend = TpmBackend(tcti, tmp_path)
    signer = backend.create_signing_key("device")
    bare_swtpm.stop()
    bare_swtpm.stop()  # idempotent
    with pytest.raises(KeyBackendError) as info:
        signer.sign_digest(DIGEST)
    assert info.value.reason == Reason.BACKEND_UNAVAILABLE
    with pytest.raises(KeyBackendError) as info:
        TpmBackend(tcti, tmp_path)
    assert info.value.reason == Reason.BACKEND_UNAVAILABLE
    _, conf = parse_tcti(tcti)
    assert f"is swtpm running at {conf}?" in info.value.detail
    # The same backend object reconnects once the TPM is back.
    bare_swtpm.start()
    assert bare_swtpm.tcti == tcti
    signer.public_key().verify(signer.sign_digest(DIGEST), DIGEST, PREHASHED)
    backend.close()


def test_bad_tcti_strings(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError):
        TpmBackend("", tmp_path)
    with pytest.raises(ConfigurationError):
        TpmBackend("sw tpm:x", tmp_path)
    with pytest.raises(KeyBackendError) as info:
        TpmBackend("nosuchtcti:whatever", tmp_path)
    assert info.value.reason == Reason.BACKEND_UNAVAILABLE
    with pytest.raises(KeyBackendError) as info:
        TpmBackend("device:/nonexistent/tpmrm0", tmp_path)
    assert info.value.reason == Reason.BACKEND_UNAVAILABLE
    assert "/nonexistent/tpmrm0" in info.value.detail


def test_dictionary_attack_lockout_is_token_locked(bare_swtpm: Swtpm, tmp_path: Path) -> None:
    backend = TpmBackend(bare_swtpm.tcti, tmp_path)
    device = backend.create_signing_key("device")  # noDA: lockout does not stop it
    backend._create("legacy", 1, noda=False)  # DA-protected, as Tessera 0.1 made keys
    signer = backend.load_signing_key("legacy")
    signer.sign_digest(DIGEST)
    # Lock the TPM for real: one allowed failure, then a wrong password on a DA-protected
    # object of our own.
    raw = _raw_esapi(bare_swtpm)
    try:
        raw.dictionary_attack_parameters(1, 1000, 1000)
        sensitive = TPM2B_SENSITIVE_CREATE(
            sensitive=TPMS_SENSITIVE_CREATE(userAuth=TPM2B_AUTH(b"right password"))
        )
        victim, *_ = raw.create_primary(sensitive, "ecc256", ESYS_TR.OWNER)
        raw.tr_set_auth(victim, b"wrong password")
        with pytest.raises(TSS2_Exception):
            raw.create(victim, TPM2B_SENSITIVE_CREATE(), "ecc256")
        raw.flush_context(victim)
    finally:
        raw.close()
    with pytest.raises(KeyBackendError) as info:
        signer.sign_digest(DIGEST)
    assert info.value.reason == Reason.TOKEN_LOCKED
    assert "lockout" in info.value.detail
    device.public_key().verify(device.sign_digest(DIGEST), DIGEST, PREHASHED)
    backend.close()


def test_owner_password_is_wrong_pin(bare_swtpm: Swtpm, tmp_path: Path) -> None:
    raw = _raw_esapi(bare_swtpm)
    try:
        raw.hierarchy_change_auth(ESYS_TR.OWNER, b"owner password")
    finally:
        raw.close()
    with TpmBackend(bare_swtpm.tcti, tmp_path) as backend, pytest.raises(KeyBackendError) as info:
        backend.create_signing_key("device")
    assert info.value.reason == Reason.WRONG_PIN
    assert not (tmp_path / f"device{KEY_FILE_SUFFIX}").exists()


# -- attestation -------------------------------------------------------------------------


def _attest(blob: bytes) -> TPMS_ATTEST:
    attest, used = TPMS_ATTEST.unmarshal(blob)
    assert used == len(blob)
    assert attest.magic == TPM2_GENERATED.VALUE
    return attest


def test_attestation_key_is_restricted(tpm_backend: TpmBackend) -> None:
    ak = tpm_backend.create_attestation_key("ak")
    attrs = int(_public_area(ak.public_area_bytes()).publicArea.objectAttributes)
    for required in (
        TPMA_OBJECT.RESTRICTED,
        TPMA_OBJECT.SIGN_ENCRYPT,
        TPMA_OBJECT.FIXEDTPM,
        TPMA_OBJECT.FIXEDPARENT,
        TPMA_OBJECT.SENSITIVEDATAORIGIN,
    ):
        assert attrs & required
    assert not hasattr(ak, "sign_digest")  # a restricted key signs only TPM structures
    assert tpm_backend.load_attestation_key("ak").public_key() == ak.public_key()
    with pytest.raises(KeyBackendError) as info:
        tpm_backend.load_signing_key("ak")
    assert info.value.reason == Reason.KEY_NOT_FOUND
    with pytest.raises(KeyBackendError) as info:
        tpm_backend.load_attestation_key("missing")
    assert info.value.reason == Reason.KEY_NOT_FOUND


def test_certify_proves_the_device_key_to_the_ak(tpm_backend: TpmBackend) -> None:
    key = tpm_backend.create_signing_key("device")
    ak = tpm_backend.create_attestation_key("ak")
    nonce = tpm_backend.random(32)
    attest_bytes, signature = tpm_backend.certify("device", "ak", nonce)
    ak.public_key().verify(signature, attest_bytes, ec.ECDSA(hashes.SHA256()))
    attest = _attest(attest_bytes)
    assert attest.type == TPM2_ST.ATTEST_CERTIFY
    assert bytes(attest.extraData) == nonce
    assert bytes(attest.attested.certify.name) == key.tpm_name()
    with pytest.raises(Exception):  # noqa: B017 - the device key must not verify it
        key.public_key().verify(signature, attest_bytes, ec.ECDSA(hashes.SHA256()))
    with pytest.raises(StateError):
        tpm_backend.certify("device", "ak", b"x" * 65)


def test_quote_covers_nonce_and_pcrs(tpm_backend: TpmBackend) -> None:
    ak = tpm_backend.create_attestation_key("ak")
    nonce = b"step-up nonce 0123456789"
    attest_bytes, signature = tpm_backend.quote("ak", nonce)
    ak.public_key().verify(signature, attest_bytes, ec.ECDSA(hashes.SHA256()))
    attest = _attest(attest_bytes)
    assert attest.type == TPM2_ST.ATTEST_QUOTE
    assert bytes(attest.extraData) == nonce
    values = tpm_backend.pcr_values(range(8))
    assert sorted(values) == list(range(8))
    expected = hashlib.sha256(b"".join(values[i] for i in range(8))).digest()
    assert bytes(attest.attested.quote.pcrDigest) == expected


def test_ek_certificate_chains_to_swtpm_local_ca(
    tpm_backend: TpmBackend, swtpm_session: Swtpm
) -> None:
    ek_cert = x509.load_der_x509_certificate(tpm_backend.ek_certificate())
    root_path, issuer_path = swtpm_session.manufacturer_ca_paths
    root = x509.load_pem_x509_certificate(root_path.read_bytes())
    issuer = x509.load_pem_x509_certificate(issuer_path.read_bytes())
    ek_cert.verify_directly_issued_by(issuer)
    issuer.verify_directly_issued_by(root)
    root.verify_directly_issued_by(root)
    # swtpm_setup --ecc: a P-384 EK whose public key is the one the TPM uses.
    ek_key = tpm_backend.ek_public_key()
    assert isinstance(ek_key, ec.EllipticCurvePublicKey)
    assert isinstance(ek_key.curve, ec.SECP384R1)
    assert ek_cert.public_key().public_numbers() == ek_key.public_numbers()
    area = _public_area(tpm_backend.ek_public()).publicArea
    attrs = int(area.objectAttributes)
    assert attrs & TPMA_OBJECT.RESTRICTED and attrs & TPMA_OBJECT.DECRYPT
    assert attrs & TPMA_OBJECT.FIXEDTPM


def test_ek_certificate_missing_is_key_not_found(bare_swtpm: Swtpm, tmp_path: Path) -> None:
    with TpmBackend(bare_swtpm.tcti, tmp_path) as backend:
        with pytest.raises(KeyBackendError) as info:
            backend.ek_certificate()
        assert info.value.reason == Reason.KEY_NOT_FOUND
        # Without a certificate the standard ECC P-256 EK is still available.
        assert isinstance(backend.ek_public_key().curve, ec.SECP256R1)  # type: ignore[union-attr]


def test_credential_activation(tpm_backend: TpmBackend) -> None:
    ak = tpm_backend.create_attestation_key("ak")
    ek_public = _public_area(tpm_backend.ek_public())
    secret = b"enrollment challenge 0123456789"
    blob, encrypted = make_credential(ek_public, secret, TPM2B_NAME(ak.tpm_name()))
    assert tpm_backend.activate_credential("ak", blob.marshal(), encrypted.marshal()) == secret


def test_activation_fails_for_another_ak(tpm_backend: TpmBackend) -> None:
    tpm_backend.create_attestation_key("ak")
    other = tpm_backend.create_attestation_key("other-ak")
    ek_public = _public_area(tpm_backend.ek_public())
    blob, encrypted = make_credential(ek_public, b"secret", TPM2B_NAME(other.tpm_name()))
    with pytest.raises(KeyBackendError) as info:
        tpm_backend.activate_credential("ak", blob.marshal(), encrypted.marshal())
    assert info.value.reason == Reason.BAD_PARAMETERS


def test_activation_fails_for_another_tpms_ek(
    tpm_backend: TpmBackend, swtpm: Swtpm, tmp_path: Path
) -> None:
    ak = tpm_backend.create_attestation_key("ak")
    with TpmBackend(swtpm.tcti, tmp_path / "other") as other_tpm:
        foreign_ek = _public_area(other_tpm.ek_public())
    assert foreign_ek.marshal() != tpm_backend.ek_public()
    blob, encrypted = make_credential(foreign_ek, b"secret", TPM2B_NAME(ak.tpm_name()))
    with pytest.raises(KeyBackendError) as info:
        tpm_backend.activate_credential("ak", blob.marshal(), encrypted.marshal())
    assert info.value.reason == Reason.BAD_PARAMETERS
    assert "another TPM's EK" in info.value.detail


def test_activation_rejects_malformed_input(tpm_backend: TpmBackend) -> None:
    tpm_backend.create_attestation_key("ak")
    with pytest.raises(StateError) as info:
        tpm_backend.activate_credential("ak", b"\x00", b"\x00\x01")
    assert info.value.reason == Reason.BAD_PARAMETERS


def test_many_keys_fit_in_swtpm_slots(tpm_backend: TpmBackend) -> None:
    """swtpm without a resource manager holds ~3 objects: keys must not leak slots."""
    signers = [tpm_backend.create_signing_key(f"k{i}") for i in range(5)]
    ak = tpm_backend.create_attestation_key("ak")
    for signer in signers:
        signer.public_key().verify(signer.sign_digest(DIGEST), DIGEST, PREHASHED)
    for i in range(5):
        attest, signature = tpm_backend.certify(f"k{i}", "ak", b"n")
        ak.public_key().verify(signature, attest, ec.ECDSA(hashes.SHA256()))
    blob, encrypted = make_credential(
        _public_area(tpm_backend.ek_public()),
        b"s",
        TPM2B_NAME(tpm_backend.load_attestation_key("ak").tpm_name()),
    )
    assert tpm_backend.activate_credential("ak", blob.marshal(), encrypted.marshal()) == b"s"


def _transient_handles(esapi: ESAPI) -> list[int]:
    _, data = esapi.get_capability(TPM2_CAP.HANDLES, TPM2_HT.TRANSIENT << 24, 16)
    handles = data.data.handles
    return [int(handles.handle[i]) for i in range(handles.count)]


def test_signer_recovers_from_swtpm_reset(bare_swtpm: Swtpm, tmp_path: Path) -> None:
    """A restarted swtpm forgets loaded keys, and another program's key may then sit at
    our cached handle number. The backend must notice (its signature does not verify),
    reload its own key from the blob, and never hand out the stranger's signature."""
    with TpmBackend(bare_swtpm.tcti, tmp_path) as backend:
        signer = backend.create_signing_key("device")
        signer.sign_digest(DIGEST)
        raw = _raw_esapi(bare_swtpm)
        try:
            (cached,) = _transient_handles(raw)  # our loaded key, nothing else
        finally:
            raw.close()
        bare_swtpm.restart()
        raw = _raw_esapi(bare_swtpm)
        try:
            template = TPM2B_PUBLIC.parse(
                "ecc256:ecdsa-sha256",
                objectAttributes="userwithauth|sign|fixedtpm|fixedparent|sensitivedataorigin",
            )
            objects = []
            while not objects or int(raw.tr_get_tpm_handle(objects[-1])) != cached:
                obj, *_ = raw.create_primary(TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.OWNER)
                objects.append(obj)
            stranger = objects.pop()
            for obj in objects:  # free the other slots so our key can be reloaded
                raw.flush_context(obj)
            assert _transient_handles(raw) == [cached]
            for _ in range(3):
                signature = signer.sign_digest(DIGEST)
                signer.public_key().verify(signature, DIGEST, PREHASHED)
            # The stranger's key was neither used for our signatures nor flushed by us.
            assert cached in _transient_handles(raw)
            raw.flush_context(stranger)
        finally:
            raw.close()


def test_a_full_tpm_is_not_called_a_damaged_key(bare_swtpm: Swtpm, tmp_path: Path) -> None:
    """Another program holds all object slots but one of a TPM reached without a
    resource manager (a process that died mid-enrollment leaves them so on swtpm):
    the storage key takes the last one and loading our key under it fails with the
    TPM's "out of memory for object contexts". That says nothing of the key file:
    the error says the TPM is full and how to free it, never "damaged ... create and
    enroll a new key" (which would send an operator to re-enroll a good device); the
    key file is untouched, and once the slots are freed the same key signs."""
    with TpmBackend(bare_swtpm.tcti, tmp_path) as backend:
        backend.create_signing_key("device")
    key_file = tmp_path / f"device{KEY_FILE_SUFFIX}"
    before = key_file.read_bytes()
    raw = _raw_esapi(bare_swtpm)
    try:
        template = TPM2B_PUBLIC.parse("ecc256:ecdsa-sha256", objectAttributes=(
            "userwithauth|sign|fixedtpm|fixedparent|sensitivedataorigin"))
        held = []
        with pytest.raises(TSS2_Exception):  # until the TPM has no slot left
            for _ in range(16):
                obj, *_ = raw.create_primary(TPM2B_SENSITIVE_CREATE(), template,
                                             ESYS_TR.OWNER)
                held.append(obj)
        assert held
        raw.flush_context(held.pop())  # one slot free: the storage key fits, ours not
        with TpmBackend(bare_swtpm.tcti, tmp_path) as backend, \
                pytest.raises(KeyBackendError) as info:
            backend.load_signing_key("device").sign_digest(DIGEST)
        assert info.value.reason == Reason.BACKEND_FAILURE
        assert "out of object or session slots" in info.value.detail
        assert "resource manager" in info.value.detail
        assert "damaged" not in info.value.detail and "new key" not in info.value.detail
        assert key_file.read_bytes() == before
        for obj in held:
            raw.flush_context(obj)
    finally:
        raw.close()
    with TpmBackend(bare_swtpm.tcti, tmp_path) as backend:
        signer = backend.load_signing_key("device")
        signer.public_key().verify(signer.sign_digest(DIGEST), DIGEST, PREHASHED)
