"""TPM enrollment attestation against real swtpm instances (no mocks).

Two manufactured TPMs with different local "maker" CAs: A is the session swtpm, B is
started once for this module. Each attack is a real attempt made with a real TPM (or a
real software key driven through one) and must be refused with its precise reason.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import json
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from tpm2_pytss import (
    ESAPI,
    ESYS_TR,
    TPM2_ALG,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE,
    TPM2B_SENSITIVE_CREATE,
    TPMA_OBJECT,
    TPMS_ATTEST,
    TPMS_SCHEME_HASH,
    TPMT_ASYM_SCHEME,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF_OBJECT,
    TPMU_ASYM_SCHEME,
    TPMU_SIG_SCHEME,
    TCTILdr,
    TSS2_Exception,
)
from tpm2_pytss.utils import wrap

from device.attestation import (
    ActivationChallenge,
    TpmEvidence,
    answer_challenge,
    build_evidence,
)
from hw.tpm import ATTESTATION_KEY_ATTRIBUTES, TpmBackend, parse_tcti, srk_template
from provisioning.attestation import (
    TpmMakerRoots,
    VerifiedEvidence,
    check_activation,
    make_challenge,
    tpm_name,
    verify_evidence,
)
from simulator.swtpm import Swtpm
from structauth.errors import ConfigurationError, EnrollmentError, Reason, StateError

UTC = dt.UTC
NONCE = b"enrollment nonce 0123456789abcdef"
ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


def _now() -> dt.datetime:
    return dt.datetime.now(UTC)


# -- fixtures --------------------------------------------------------------------------


@dataclass
class Tpm:
    """One swtpm, the key directory of its device agent, and its maker roots."""

    swtpm: Swtpm
    key_dir: Path
    roots: TpmMakerRoots

    @contextlib.contextmanager
    def backend(self) -> Iterator[TpmBackend]:
        # short-lived: without a resource manager swtpm has three object slots, and the
        # raw-ESAPI attacks below need them
        with TpmBackend(self.swtpm.tcti, self.key_dir) as backend:
            yield backend

    def evidence(self, nonce: bytes = NONCE, **kwargs: Any) -> TpmEvidence:
        with self.backend() as backend:
            return build_evidence(backend, qualifying_data=nonce, **kwargs)


@pytest.fixture(scope="module")
def tpm_a(swtpm_session: Swtpm, tmp_path_factory: pytest.TempPathFactory) -> Tpm:
    roots = TpmMakerRoots.from_pem_files(swtpm_session.manufacturer_ca_paths)
    return Tpm(swtpm_session, tmp_path_factory.mktemp("agent-a"), roots)


@pytest.fixture(scope="module")
def tpm_b(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tpm]:
    with Swtpm() as swtpm:
        roots = TpmMakerRoots.from_pem_files(swtpm.manufacturer_ca_paths)
        yield Tpm(swtpm, tmp_path_factory.mktemp("agent-b"), roots)


@pytest.fixture(scope="module")
def evidence_a(tpm_a: Tpm) -> TpmEvidence:
    return tpm_a.evidence()


def _refused(reason: Reason, fn: Callable[[], object], *fragments: str) -> EnrollmentError:
    with pytest.raises(EnrollmentError) as info:
        fn()
    assert info.value.reason == reason, info.value
    for fragment in fragments:
        assert fragment in info.value.detail, info.value.detail
    return info.value


def _verify(evidence: TpmEvidence, roots: TpmMakerRoots, nonce: bytes = NONCE) -> VerifiedEvidence:
    return verify_evidence(evidence, roots, expected_qualifying_data=nonce, now=_now())


def _wire(record: Any) -> Any:
    """Through JSON text and back, as the HTTP service carries it."""
    return json.loads(json.dumps(record.to_json()))


# -- the round trip --------------------------------------------------------------------


def test_enrollment_round_trip(tpm_a: Tpm) -> None:
    nonce = secrets.token_bytes(32)
    with tpm_a.backend() as device:
        evidence = build_evidence(device, qualifying_data=nonce)
        key = device.load_signing_key("tessera-device")
        ak = device.load_attestation_key("tessera-ak")

        # service: evidence in, challenge out
        received = TpmEvidence.from_json(_wire(evidence))
        assert received == evidence
        verified = verify_evidence(
            received, tpm_a.roots, expected_qualifying_data=nonce, now=_now()
        )
        challenge, secret = make_challenge(verified)
        assert len(secret) == 32

        # device: challenge in, secret out
        answer = answer_challenge(device, ActivationChallenge.from_json(_wire(challenge)))

    # service: the AK, and so the key it certified, is in the TPM of the certified EK
    check_activation(secret, answer)
    assert verified.key.public_numbers() == key.public_key().public_numbers()
    assert verified.key_name == key.tpm_name()
    assert verified.ak_name == ak.tpm_name()
    assert verified.ek_fingerprint == hashlib.sha256(evidence.ek_certificate).hexdigest()
    assert verified.maker_root == "CN=swtpm-localca-rootca"


def test_json_shapes(evidence_a: TpmEvidence, tpm_a: Tpm) -> None:
    doc = _wire(evidence_a)
    assert sorted(doc) == sorted(
        [
            "ek_certificate",
            "ek_intermediates",
            "ek_public",
            "ak_public",
            "key_public",
            "certify_attest",
            "certify_signature",
        ]
    )
    assert doc["ek_intermediates"] == []
    assert base64.b64decode(doc["ek_certificate"]) == evidence_a.ek_certificate
    del doc["ek_intermediates"]  # optional on the wire
    assert TpmEvidence.from_json(doc) == evidence_a
    verified = _verify(evidence_a, tpm_a.roots)
    challenge, _ = make_challenge(verified)
    assert sorted(_wire(challenge)) == ["credential_blob", "encrypted_secret"]
    assert ActivationChallenge.from_json(_wire(challenge)) == challenge


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_build_evidence_reuses_the_keys(tpm_a: Tpm, evidence_a: TpmEvidence) -> None:
    again = tpm_a.evidence(b"another nonce 0123456789abcdef")
    assert again.key_public == evidence_a.key_public
    assert again.ak_public == evidence_a.ak_public
    assert again.certify_attest != evidence_a.certify_attest
    with tpm_a.backend() as backend, pytest.raises(StateError):
        build_evidence(backend, qualifying_data=b"")


def test_tpm_name_is_the_tpms(tpm_a: Tpm, evidence_a: TpmEvidence) -> None:
    with tpm_a.backend() as backend:
        key = backend.load_signing_key("tessera-device")
    assert tpm_name(evidence_a.key_public) == key.tpm_name()
    public = TPM2B_PUBLIC.unmarshal(evidence_a.key_public)[0]
    assert tpm_name(evidence_a.key_public) == bytes(public.get_name())


# -- the EK certificate chain ----------------------------------------------------------


def test_chain_through_configured_or_sent_intermediate(
    swtpm_session: Swtpm, evidence_a: TpmEvidence
) -> None:
    root_path, issuer_path = swtpm_session.manufacturer_ca_paths
    root, issuer = _cert(root_path), _cert(issuer_path)
    # the intermediate configured next to the root
    assert _verify(evidence_a, TpmMakerRoots([root], [issuer])).maker_root
    # the intermediate sent by the device
    sent = replace(evidence_a, ek_intermediates=(issuer.public_bytes(serialization.Encoding.DER),))
    assert _verify(sent, TpmMakerRoots([root])).maker_root == "CN=swtpm-localca-rootca"
    # the intermediate itself configured as the trust anchor
    assert _verify(evidence_a, TpmMakerRoots([issuer])).maker_root == "CN=swtpm-localca"
    # no intermediate anywhere
    _refused(
        Reason.UNKNOWN_TPM_MAKER,
        lambda: _verify(evidence_a, TpmMakerRoots([root])),
        "the issuer 'CN=swtpm-localca' of 'CN=unknown'",
        "is neither a configured TPM maker root nor a known intermediate",
    )


def test_ek_certificate_of_an_unknown_maker(
    tpm_b: Tpm, evidence_a: TpmEvidence, swtpm_session: Swtpm
) -> None:
    # B's local CA has the very same names as A's, but other keys
    _refused(
        Reason.UNKNOWN_TPM_MAKER,
        lambda: _verify(evidence_a, tpm_b.roots),
        "does not verify with the key of 'CN=swtpm-localca'",
    )
    # nor does sending A's own intermediate help: it does not chain to B's root
    issuer_a = _cert(swtpm_session.manufacturer_ca_paths[1])
    sent = replace(
        evidence_a, ek_intermediates=(issuer_a.public_bytes(serialization.Encoding.DER),)
    )
    _refused(
        Reason.UNKNOWN_TPM_MAKER,
        lambda: _verify(sent, TpmMakerRoots(tpm_b.roots.roots)),
        "does not verify with the key of 'CN=swtpm-localca-rootca'",
    )


def test_ek_certificate_validity_time(evidence_a: TpmEvidence, tpm_a: Tpm) -> None:
    cert = x509.load_der_x509_certificate(evidence_a.ek_certificate)
    early = cert.not_valid_before_utc - dt.timedelta(days=1)
    late = dt.datetime.max.replace(tzinfo=UTC)  # swtpm's EK certificates end 9999-12-31 23:59:59
    for now, fragment in ((early, "is not valid before"), (late, "expired at")):
        _refused(
            Reason.UNKNOWN_TPM_MAKER,
            lambda now=now: verify_evidence(
                evidence_a, tpm_a.roots, expected_qualifying_data=NONCE, now=now
            ),
            fragment,
        )
    with pytest.raises(StateError):  # a naive datetime is a programming error
        verify_evidence(
            evidence_a, tpm_a.roots, expected_qualifying_data=NONCE, now=dt.datetime.now()
        )


class _Maker:
    """A hand-made maker PKI that re-certifies a real EK's public key."""

    def __init__(self) -> None:
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        self.root = self.issue("CN=maker root", self.root_key, None, ca=True)

    def issue(
        self,
        subject: str,
        key: Any,  # a private key (self-signed), else the public key to certify
        issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
        *,
        ca: bool,
        path_length: int | None = None,
        cert_sign: bool = True,
        not_after: dt.datetime | None = None,
    ) -> x509.Certificate:
        name = x509.Name.from_rfc4514_string(subject)
        issuer_name, signing_key = (issuer[0].subject, issuer[1]) if issuer else (name, key)
        public = key.public_key() if hasattr(key, "public_key") else key
        now = _now()
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer_name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(not_after or now + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
        )
        if ca:
            builder = builder.add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=cert_sign,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
        return builder.sign(signing_key, hashes.SHA256())


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def test_chain_rules_on_intermediates(evidence_a: TpmEvidence) -> None:
    ek_key = x509.load_der_x509_certificate(evidence_a.ek_certificate).public_key()
    maker = _Maker()
    roots = TpmMakerRoots([maker.root])

    def chain(*links: x509.Certificate, ek_issuer: tuple[Any, Any]) -> TpmEvidence:
        ek = maker.issue("CN=ek", ek_key, ek_issuer, ca=False)
        return replace(
            evidence_a, ek_certificate=_der(ek), ek_intermediates=tuple(map(_der, links))
        )

    key_1 = ec.generate_private_key(ec.SECP256R1())
    good = maker.issue("CN=maker ca 1", key_1, (maker.root, maker.root_key), ca=True)
    verified = _verify(chain(good, ek_issuer=(good, key_1)), roots)
    assert verified.maker_root == "CN=maker root"

    cases = {
        "is not a CA": maker.issue("CN=maker ca 1", key_1, (maker.root, maker.root_key), ca=False),
        "may not sign certificates": maker.issue(
            "CN=maker ca 1", key_1, (maker.root, maker.root_key), ca=True, cert_sign=False
        ),
        "expired at": maker.issue(
            "CN=maker ca 1",
            key_1,
            (maker.root, maker.root_key),
            ca=True,
            not_after=_now() - dt.timedelta(hours=1),
        ),
    }
    for fragment, link in cases.items():
        _refused(
            Reason.UNKNOWN_TPM_MAKER,
            lambda link=link: _verify(chain(link, ek_issuer=(link, key_1)), roots),
            fragment,
        )

    # path length: the first CA allows no CA below it, and a second one sits there
    key_2 = ec.generate_private_key(ec.SECP256R1())
    upper = maker.issue(
        "CN=maker ca 1", key_1, (maker.root, maker.root_key), ca=True, path_length=0
    )
    lower = maker.issue("CN=maker ca 2", key_2, (upper, key_1), ca=True)
    _refused(
        Reason.UNKNOWN_TPM_MAKER,
        lambda: _verify(chain(lower, upper, ek_issuer=(lower, key_2)), roots),
        "allows only 0 CAs below it",
    )
    # a chain that links to itself goes nowhere
    loop = maker.issue("CN=loop", key_2, None, ca=True)
    _refused(
        Reason.UNKNOWN_TPM_MAKER,
        lambda: _verify(chain(loop, ek_issuer=(loop, key_2)), roots),
        "the issuer 'CN=loop' of 'CN=loop'",
    )


def test_maker_roots_configuration(tmp_path: Path, swtpm_session: Swtpm) -> None:
    root_path, issuer_path = swtpm_session.manufacturer_ca_paths
    both = tmp_path / "both.pem"
    both.write_bytes(root_path.read_bytes() + issuer_path.read_bytes())
    roots = TpmMakerRoots.from_pem_files([both])
    assert len(roots.roots) == 1 and len(roots.intermediates) == 1
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    for paths in ([tmp_path / "missing.pem"], [garbage], [issuer_path]):
        with pytest.raises(ConfigurationError):
            TpmMakerRoots.from_pem_files(paths)
    with pytest.raises(ConfigurationError):
        TpmMakerRoots([])


# -- EK and AK public areas ------------------------------------------------------------


def _with_attributes(public: bytes, change: Callable[[int], int]) -> bytes:
    parsed = TPM2B_PUBLIC.unmarshal(public)[0]
    parsed.publicArea.objectAttributes = change(int(parsed.publicArea.objectAttributes))
    return bytes(parsed.marshal())


def test_ek_public_that_is_not_the_certified_ek(
    evidence_a: TpmEvidence, tpm_a: Tpm, tpm_b: Tpm
) -> None:
    with tpm_b.backend() as backend:
        ek_b = backend.ek_public()
    _refused(
        Reason.ATTESTATION_FAILED,
        lambda: _verify(replace(evidence_a, ek_public=ek_b), tpm_a.roots),
        "ek_public is not the key in the EK certificate",
    )
    # the certified key, but claimed with other attributes: not an EK
    bent = _with_attributes(evidence_a.ek_public, lambda a: a & ~TPMA_OBJECT.RESTRICTED)
    _refused(
        Reason.ATTESTATION_FAILED,
        lambda: _verify(replace(evidence_a, ek_public=bent), tpm_a.roots),
        "not an endorsement key",
        "lacks restricted",
    )


def test_forged_certify_by_an_unrestricted_ak(evidence_a: TpmEvidence, tpm_a: Tpm) -> None:
    """An ordinary signing key signs anything: it could vouch for a software key.

    The forger takes a real Certify, swaps in the name of a software key that claims
    every TPM attribute, and signs it with an unrestricted TPM key as its "AK". The
    signature is genuine; the AK's attributes give it away.
    """
    software = ec.generate_private_key(ec.SECP256R1())
    claimed = _software_public(software, _SIGNING_CLAIM)
    attest = TPMS_ATTEST.unmarshal(evidence_a.certify_attest)[0]
    attest.attested.certify.name = tpm_name(claimed)
    forged = bytes(attest.marshal())
    with tpm_a.backend() as backend:
        forger = backend.get_or_create_signing_key("forger")
        signature = forger.sign_digest(hashlib.sha256(forged).digest())
        forger.public_key().verify(signature, forged, ECDSA_SHA256)
        evidence = replace(
            evidence_a,
            ak_public=forger.public_area_bytes(),
            key_public=claimed,
            certify_attest=forged,
            certify_signature=signature,
        )
    _refused(
        Reason.ATTESTATION_FAILED,
        lambda: _verify(evidence, tpm_a.roots),
        "ak_public is not an attestation key",
        "lacks restricted",
    )


# -- the Certify -----------------------------------------------------------------------


def test_replayed_certify(evidence_a: TpmEvidence, tpm_a: Tpm) -> None:
    _refused(
        Reason.CERTIFY_MISMATCH,
        lambda: _verify(evidence_a, tpm_a.roots, nonce=b"this enrollment's nonce 01234567"),
        "made for another enrollment",
    )


def test_certify_of_another_key(tpm_a: Tpm) -> None:
    with tpm_a.backend() as backend:
        shown = backend.get_or_create_signing_key("key-x").public_area_bytes()
    certified_other = tpm_a.evidence(key_name="key-y")
    _refused(
        Reason.CERTIFY_MISMATCH,
        lambda: _verify(replace(certified_other, key_public=shown), tpm_a.roots),
        "certifies another key than key_public",
    )


def test_certify_signature_and_structure(evidence_a: TpmEvidence, tpm_a: Tpm) -> None:
    other = tpm_a.evidence(b"some other nonce 0123456789abcdef")
    _refused(
        Reason.CERTIFY_MISMATCH,
        lambda: _verify(
            replace(evidence_a, certify_signature=other.certify_signature), tpm_a.roots
        ),
        "does not verify with the AK",
    )
    # one changed byte of the nonce inside the signed structure
    attest = TPMS_ATTEST.unmarshal(evidence_a.certify_attest)[0]
    attest.extraData = b"X" + NONCE[1:]
    _refused(
        Reason.CERTIFY_MISMATCH,
        lambda: _verify(
            replace(evidence_a, certify_attest=bytes(attest.marshal())),
            tpm_a.roots,
            nonce=b"X" + NONCE[1:],
        ),
        "does not verify with the AK",
    )
    # a genuine TPM quote by the same AK over the same nonce is not a Certify
    with tpm_a.backend() as backend:
        quote, signature = backend.quote("tessera-ak", NONCE)
    _refused(
        Reason.CERTIFY_MISMATCH,
        lambda: _verify(
            replace(evidence_a, certify_attest=quote, certify_signature=signature), tpm_a.roots
        ),
        "is not a TPM2_Certify",
    )


# -- software keys driven through the TPM ------------------------------------------------

_SIGN = TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.USERWITHAUTH
_SIGNING_CLAIM = (
    _SIGN | TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN
)
_ECDSA_SCHEME = TPMT_ASYM_SCHEME(
    scheme=TPM2_ALG.ECDSA,
    details=TPMU_ASYM_SCHEME(ecdsa=TPMS_SCHEME_HASH(hashAlg=TPM2_ALG.SHA256)),
)
_SIG_SCHEME = TPMT_SIG_SCHEME(
    scheme=TPM2_ALG.ECDSA,
    details=TPMU_SIG_SCHEME(ecdsa=TPMS_SCHEME_HASH(hashAlg=TPM2_ALG.SHA256)),
)


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _software_public(key: ec.EllipticCurvePrivateKey, attributes: int) -> bytes:
    public = TPM2B_PUBLIC.from_pem(_pem(key), objectAttributes=attributes, scheme=_ECDSA_SCHEME)
    return bytes(public.marshal())


@contextlib.contextmanager
def _raw_tpm(tpm: Tpm) -> Iterator[tuple[ESAPI, list[ESYS_TR]]]:
    """Raw ESAPI on the TPM; every transient object in the list is flushed afterwards."""
    esapi = ESAPI(TCTILdr(*parse_tcti(tpm.swtpm.tcti)))
    handles: list[ESYS_TR] = []
    try:
        yield esapi, handles
    finally:
        for handle in handles:
            with contextlib.suppress(Exception):
                esapi.flush_context(handle)
        esapi.close()


def _der_signature(signature: Any) -> bytes:
    ecdsa = signature.signature.ecdsa
    r = int.from_bytes(bytes(ecdsa.signatureR), "big")
    return encode_dss_signature(r, int.from_bytes(bytes(ecdsa.signatureS), "big"))


def _raw_ak(esapi: ESAPI, handles: list[ESYS_TR]) -> tuple[ESYS_TR, bytes]:
    template = TPM2B_PUBLIC.parse(
        "ecc256:ecdsa-sha256:null", objectAttributes=ATTESTATION_KEY_ATTRIBUTES
    )
    ak, public, *_ = esapi.create_primary(TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.OWNER)
    handles.append(ak)
    return ak, bytes(public.marshal())


@pytest.mark.parametrize("how", ["load_external", "import"])
def test_software_key_claimed_as_a_tpm_key(how: str, tpm_a: Tpm, evidence_a: TpmEvidence) -> None:
    """A key made outside the TPM, brought in and certified by a genuine AK.

    The TPM refuses to give such a key fixedTPM (it knows the key existed outside), but
    accepts sensitiveDataOrigin from the importer, so the importer claims that. The
    Certify is the TPM's word and the AK is real, so only the key's attributes tell.
    """
    software = ec.generate_private_key(ec.SECP256R1())
    sensitive = TPM2B_SENSITIVE.from_pem(_pem(software))

    def bring_in(esapi: ESAPI, handles: list[ESYS_TR], attributes: int) -> tuple[ESYS_TR, bytes]:
        public = TPM2B_PUBLIC.unmarshal(_software_public(software, attributes))[0]
        if how == "load_external":
            handle = esapi.load_external(public, sensitive, ESYS_TR.NULL)
        else:
            srk, srk_public, *_ = esapi.create_primary(
                TPM2B_SENSITIVE_CREATE(), srk_template(), ESYS_TR.OWNER
            )
            try:  # TPM2_Import under the SRK: the key blob comes from outside the TPM
                seed_key, duplicate, seed = wrap(srk_public.publicArea, public, sensitive)
                no_inner_wrap = TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL)
                private = esapi.import_(srk, seed_key, public, duplicate, seed, no_inner_wrap)
                handle = esapi.load(srk, private, public)
            finally:
                esapi.flush_context(srk)
        handles.append(handle)
        return handle, bytes(public.marshal())

    with _raw_tpm(tpm_a) as (esapi, handles):
        with pytest.raises(TSS2_Exception, match="attributes"):
            bring_in(esapi, handles, _SIGNING_CLAIM)  # the TPM will not say fixedTPM
        ak, ak_public = _raw_ak(esapi, handles)
        lie = _SIGN | TPMA_OBJECT.SENSITIVEDATAORIGIN
        handle, key_public = bring_in(esapi, handles, lie)
        attest, signature = esapi.certify(handle, ak, NONCE, _SIG_SCHEME)
    der = _der_signature(signature)
    evidence = replace(
        evidence_a,
        ak_public=ak_public,
        key_public=key_public,
        certify_attest=bytes(attest),
        certify_signature=der,
    )
    _refused(
        Reason.KEY_NOT_IN_TPM,
        lambda: _verify(evidence, tpm_a.roots),
        "lacks fixedTPM, fixedParent",
    )
    # claiming the attributes the TPM refused changes the key's name: the Certify is of
    # another object
    claimed = replace(evidence, key_public=_software_public(software, _SIGNING_CLAIM))
    _refused(
        Reason.CERTIFY_MISMATCH,
        lambda: _verify(claimed, tpm_a.roots),
        "certifies another key than key_public",
    )


def test_restricted_key_as_the_device_key(tpm_a: Tpm, evidence_a: TpmEvidence) -> None:
    with _raw_tpm(tpm_a) as (esapi, handles):
        ak, ak_public = _raw_ak(esapi, handles)
        attest, signature = esapi.certify(ak, ak, NONCE, _SIG_SCHEME)
    der = _der_signature(signature)
    evidence = replace(
        evidence_a,
        ak_public=ak_public,
        key_public=ak_public,
        certify_attest=bytes(attest),
        certify_signature=der,
    )
    _refused(Reason.KEY_NOT_IN_TPM, lambda: _verify(evidence, tpm_a.roots), "has restricted")


# -- credential activation -------------------------------------------------------------


def test_ak_of_another_tpm(tpm_a: Tpm, tpm_b: Tpm, evidence_a: TpmEvidence) -> None:
    """TPM B's AK and key, presented with TPM A's EK: everything checks out on paper,
    but the challenge sealed to A's EK for B's AK opens in neither TPM."""
    on_b = tpm_b.evidence()
    evidence = replace(
        on_b, ek_certificate=evidence_a.ek_certificate, ek_public=evidence_a.ek_public
    )
    verified = _verify(evidence, tpm_a.roots)
    challenge, secret = make_challenge(verified)
    with tpm_b.backend() as backend:
        _refused(
            Reason.ACTIVATION_FAILED,
            lambda: answer_challenge(backend, challenge),
            "refused the activation challenge",
        )
    with tpm_a.backend() as backend:
        _refused(Reason.ACTIVATION_FAILED, lambda: answer_challenge(backend, challenge))
    # so whatever the attacker answers, the service refuses it
    for answer in (secrets.token_bytes(32), b"", secret[:-1], bytearray(secret[:-1] + b"\0")):
        _refused(
            Reason.ACTIVATION_FAILED,
            lambda answer=answer: check_activation(secret, answer),
            "not in the TPM that holds the certified EK",
        )
    _refused(Reason.ACTIVATION_FAILED, lambda: check_activation(secret, None))  # type: ignore[arg-type]
    with pytest.raises(StateError):
        check_activation(b"", b"")


def test_each_challenge_is_fresh(evidence_a: TpmEvidence, tpm_a: Tpm) -> None:
    verified = _verify(evidence_a, tpm_a.roots)
    (first, secret_1), (second, secret_2) = make_challenge(verified), make_challenge(verified)
    assert secret_1 != secret_2 and first != second
    with tpm_a.backend() as backend:
        check_activation(secret_2, answer_challenge(backend, second))
        check_activation(secret_1, answer_challenge(backend, first))


# -- parameters ---------------------------------------------------------------------------


def test_service_parameters(evidence_a: TpmEvidence, tpm_a: Tpm) -> None:
    for nonce in (b"", b"short", b"x" * 65, "text"):
        with pytest.raises(StateError):
            verify_evidence(evidence_a, tpm_a.roots, expected_qualifying_data=nonce, now=_now())  # type: ignore[arg-type]
    with pytest.raises(StateError):
        verify_evidence(
            evidence_a.to_json(), tpm_a.roots, expected_qualifying_data=NONCE, now=_now()
        )  # type: ignore[arg-type]
    with pytest.raises(StateError):
        verify_evidence(evidence_a, [], expected_qualifying_data=NONCE, now=_now())  # type: ignore[arg-type]
    with tpm_a.backend() as backend, pytest.raises(StateError):
        answer_challenge(backend, {"credential_blob": "", "encrypted_secret": ""})  # type: ignore[arg-type]


# -- malformed records ---------------------------------------------------------------------

_FIELDS = (
    "ek_certificate",
    "ek_public",
    "ak_public",
    "key_public",
    "certify_attest",
    "certify_signature",
)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _non_canonical(value: str) -> str:
    """The same bytes with nonzero padding bits, or excess padding."""
    if not value.endswith("="):
        return value + "=="
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    body = value.rstrip("=")
    last = alphabet[alphabet.index(body[-1]) ^ 1]
    return body[:-1] + last + value[len(body) :]


def _mutations(value: str) -> dict[str, Any]:
    raw = base64.b64decode(value)
    assert base64.b64decode(_non_canonical(value)) == raw
    return {
        "missing": KeyError,
        "null": None,
        "number": 12345,
        "list": [value],
        "object": {"b64": value},
        "empty": "",
        "garbage base64": "!!not*base64!!",
        "bad padding": value.rstrip("=") if value.endswith("=") else value[:-1],
        "non-canonical base64": _non_canonical(value),
        "non-ascii": "é" + value[1:],
        "truncated by one": _b64(raw[:-1]),
        "truncated by half": _b64(raw[: len(raw) // 2]),
        "one byte": _b64(raw[:1]),
        "trailing byte": _b64(raw + b"\0"),
        "oversized": _b64(raw * 200),
    }


def _malformed_cases() -> list[tuple[str, str]]:
    names = list(_mutations("AAAA"))
    return [(field, name) for field in _FIELDS for name in names]


@pytest.mark.parametrize(("field", "mutation"), _malformed_cases())
def test_malformed_evidence_field(field: str, mutation: str, evidence_a: TpmEvidence) -> None:
    doc = evidence_a.to_json()
    value = _mutations(doc[field])[mutation]
    if value is KeyError:
        del doc[field]
    else:
        doc[field] = value
    _refused(Reason.ATTESTATION_FAILED, lambda: TpmEvidence.from_json(doc), f"field {field!r}")


def test_malformed_intermediates(evidence_a: TpmEvidence, swtpm_session: Swtpm) -> None:
    issuer = _der(_cert(swtpm_session.manufacturer_ca_paths[1]))
    cases: dict[str, tuple[Any, str]] = {
        "not a list": (_b64(issuer), "'ek_intermediates'"),
        "an object": ({"0": _b64(issuer)}, "'ek_intermediates'"),
        "too many": ([_b64(issuer)] * 5, "'ek_intermediates'"),
        "null item": ([_b64(issuer), None], "'ek_intermediates[1]'"),
        "garbage item": (["%%%"], "'ek_intermediates[0]'"),
        "truncated item": ([_b64(issuer[:-3])], "'ek_intermediates[0]'"),
        "not a certificate": ([evidence_a.to_json()["ek_public"]], "'ek_intermediates[0]'"),
    }
    for value, fragment in cases.values():
        doc = evidence_a.to_json()
        doc["ek_intermediates"] = value
        _refused(Reason.ATTESTATION_FAILED, lambda doc=doc: TpmEvidence.from_json(doc), fragment)
    doc = evidence_a.to_json()
    doc["ek_intermediates"] = [_b64(issuer)]
    assert TpmEvidence.from_json(doc).ek_intermediates == (issuer,)


def test_malformed_evidence_object(evidence_a: TpmEvidence) -> None:
    for value in (None, [], "evidence", 3):
        _refused(Reason.ATTESTATION_FAILED, lambda value=value: TpmEvidence.from_json(value))
    doc = evidence_a.to_json()
    doc["extra"] = "AAAA"
    _refused(Reason.ATTESTATION_FAILED, lambda: TpmEvidence.from_json(doc), "'extra'")
    # fields that are well-formed but of the wrong kind
    swapped = evidence_a.to_json()
    swapped["ek_public"], swapped["certify_attest"] = (
        swapped["certify_attest"],
        swapped["ek_public"],
    )
    _refused(Reason.ATTESTATION_FAILED, lambda: TpmEvidence.from_json(swapped), "'ek_public'")
    # constructed in code, the record checks itself too
    _refused(
        Reason.ATTESTATION_FAILED,
        lambda: replace(evidence_a, key_public=evidence_a.key_public.hex()),
        "'key_public'",
    )
    _refused(
        Reason.ATTESTATION_FAILED,
        lambda: replace(evidence_a, certify_signature=evidence_a.certify_signature[:-1]),
        "'certify_signature'",
    )


@pytest.mark.parametrize("field", ["credential_blob", "encrypted_secret"])
def test_malformed_challenge(field: str, evidence_a: TpmEvidence, tpm_a: Tpm) -> None:
    challenge, _ = make_challenge(_verify(evidence_a, tpm_a.roots))
    for mutation, value in _mutations(challenge.to_json()[field]).items():
        doc = challenge.to_json()
        if value is KeyError:
            del doc[field]
        else:
            doc[field] = value
        error = _refused(
            Reason.ATTESTATION_FAILED, lambda doc=doc: ActivationChallenge.from_json(doc)
        )
        assert repr(field) in error.detail, (mutation, error.detail)
    _refused(Reason.ATTESTATION_FAILED, lambda: ActivationChallenge.from_json(["x"]))
