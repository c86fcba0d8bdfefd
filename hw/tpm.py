"""TPM 2.0 key backend (tpm2-pytss / tpm2-tss ESAPI).

Keys are ordinary TPM objects created under a storage root key (SRK) in the owner
hierarchy. The SRK is an ECC P-256 primary key made from the standard deterministic
template (TCG "TPM 2.0 Provisioning Guidance", SRK template with an all-zero unique
field), so the TPM re-derives the very same SRK every time and nothing has to be
persisted in the TPM itself. What survives a reboot is the TPM-wrapped key blob
(TPM2B_PUBLIC + TPM2B_PRIVATE, encrypted and integrity-protected by the SRK), which we
keep in ``key_dir/<name>.tpmkey``; the blob is useless on any other TPM.

Objects and their attributes:

* device signing key: ECC P-256, ECDSA-SHA256, fixedTPM | fixedParent |
  sensitiveDataOrigin | userWithAuth | noDA | sign. It never leaves the TPM.
* attestation key (AK): the same plus ``restricted``, so it only signs structures the
  TPM itself produced (quotes, certifications) and can be bound to the EK by
  credential activation.
* endorsement key (EK): the TPM maker's key, found through its certificate in NV and
  re-created from the TCG EK template that matches it (or its persistent handle).

Resource use. Without a resource manager (swtpm's socket, ``/dev/tpm0``) a TPM holds
only about three loaded objects, and they outlive the connection. The backend therefore
flushes the SRK right after each load, loads an attestation key only for the command
that needs it, and keeps at most one loaded handle per open signing key; ``close()``
flushes everything. Use ``/dev/tpmrm0`` on Linux devices: the kernel's resource manager
virtualises the slots and cleans up after a crashed process.

Every error from tpm2-pytss is translated into :class:`structauth.errors.KeyBackendError`
whose message says what to check.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from tpm2_pytss import (
    ESAPI,
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_ECC,
    TPM2_HT,
    TPM2_PT_NV,
    TPM2_RC,
    TPM2_RH,
    TPM2_SE,
    TPM2_ST,
    TPM2B_DATA,
    TPM2B_DIGEST,
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_NAME,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPMA_OBJECT,
    TPML_DIGEST,
    TPML_PCR_SELECTION,
    TPMS_ECC_PARMS,
    TPMS_ECC_POINT,
    TPMS_SCHEME_HASH,
    TPMT_ECC_SCHEME,
    TPMT_KDF_SCHEME,
    TPMT_PUBLIC,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF,
    TPMT_SYM_DEF_OBJECT,
    TPMT_TK_HASHCHECK,
    TPMU_ASYM_SCHEME,
    TPMU_PUBLIC_ID,
    TPMU_PUBLIC_PARMS,
    TPMU_SIG_SCHEME,
    TPMU_SYM_KEY_BITS,
    TPMU_SYM_MODE,
    TCTILdr,
    TSS2_Exception,
)
from tpm2_pytss.constants import TSS2_RC
from tpm2_pytss.tsskey import TSSPrivKey
from tpm2_pytss.utils import NoSuchIndex, create_ek_template

from structauth.errors import (
    ConfigurationError,
    KeyBackendError,
    Reason,
    StateError,
    TesseraError,
)

__all__ = [
    "EK_CERT_INDICES",
    "HANDLE_FILE_SUFFIX",
    "KEY_FILE_SUFFIX",
    "TpmAttestationKey",
    "TpmBackend",
    "TpmSigner",
    "parse_tcti",
]

KEY_FILE_SUFFIX = ".tpmkey"
#: beside a key file: the persistent handle the operator put the key at (persist_key)
HANDLE_FILE_SUFFIX = ".handle"
_T = TypeVar("_T")

#: (NV index of the EK certificate, TCG EK template, usual persistent EK handle), in the
#: order we look for them: ECC first (P-256 low range, then P-384 high range, which is
#: what ``swtpm_setup --ecc`` writes), then RSA 2048.
EK_CERT_INDICES: tuple[tuple[int, str, int], ...] = (
    (0x01C0000A, "EK-ECC256", 0x81010002),
    (0x01C00016, "EK-HIGH-ECC384", 0x81010016),
    (0x01C00002, "EK-RSA2048", 0x81010001),
)

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_FILE_MAGIC = b"TESSERA-TPMKEY\n"
#: the parent of every key file: TPM_RH_OWNER, i.e. the owner hierarchy's standard SRK
_TSS_PARENT = int(TPM2_RH.OWNER)
_FILE_VERSION = 1
_KIND_SIGNING = 1
_KIND_ATTESTATION = 2
_KIND_LABEL = {_KIND_SIGNING: "signing key", _KIND_ATTESTATION: "attestation key"}

_TPM_CC_POLICY_SECRET = 0x151
_TPM_CC_POLICY_OR = 0x171
#: PolicyC (PolicyAuthorizeNV on the EK policy index) from the TCG EK Credential Profile
#: 2.x; the high-range EK templates use PolicyOR(PolicyA, PolicyC). PolicyA (a
#: PolicySecret on the endorsement hierarchy) is computed in _policy_secret_endorsement.
_EK_POLICY_C = {
    "sha256": bytes.fromhex("3767e2edd43ff45a3a7e1eaefcef78643dca964632e7aad82c673a30d8633fde"),
    "sha384": bytes.fromhex(
        "d6032ce61f2fb3c240eb3cf6a33237ef2b6a16f4293c22b455e261cffd217ad5"
        "b4947c2d73e63005eed2dc2b3593d165"
    ),
}
_HASH_NAMES = {TPM2_ALG.SHA256: "sha256", TPM2_ALG.SHA384: "sha384", TPM2_ALG.SHA512: "sha512"}
_CURVES: dict[int, ec.EllipticCurve] = {
    TPM2_ECC.NIST_P256: ec.SECP256R1(),
    TPM2_ECC.NIST_P384: ec.SECP384R1(),
    TPM2_ECC.NIST_P521: ec.SECP521R1(),
}
_TCTI_LAYER = int(TSS2_RC.TCTI_RC_LAYER)
_LAYER_MASK = int(TSS2_RC.RC_LAYER_MASK)
_FMT1 = 0x080


# --------------------------------------------------------------------------------------
# templates


def _ecdsa_sha256() -> TPMT_ECC_SCHEME:
    return TPMT_ECC_SCHEME(
        scheme=TPM2_ALG.ECDSA,
        details=TPMU_ASYM_SCHEME(ecdsa=TPMS_SCHEME_HASH(hashAlg=TPM2_ALG.SHA256)),
    )


def _sig_scheme() -> TPMT_SIG_SCHEME:
    return TPMT_SIG_SCHEME(
        scheme=TPM2_ALG.ECDSA,
        details=TPMU_SIG_SCHEME(ecdsa=TPMS_SCHEME_HASH(hashAlg=TPM2_ALG.SHA256)),
    )


def _ecc_template(
    attributes: int, scheme: TPMT_ECC_SCHEME, symmetric: TPMT_SYM_DEF_OBJECT, zero_unique: bool
) -> TPM2B_PUBLIC:
    unique = (
        TPMU_PUBLIC_ID(ecc=TPMS_ECC_POINT(x=b"\x00" * 32, y=b"\x00" * 32))
        if zero_unique
        else TPMU_PUBLIC_ID()
    )
    return TPM2B_PUBLIC(
        publicArea=TPMT_PUBLIC(
            type=TPM2_ALG.ECC,
            nameAlg=TPM2_ALG.SHA256,
            objectAttributes=attributes,
            parameters=TPMU_PUBLIC_PARMS(
                eccDetail=TPMS_ECC_PARMS(
                    symmetric=symmetric,
                    scheme=scheme,
                    curveID=TPM2_ECC.NIST_P256,
                    kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL),
                )
            ),
            unique=unique,
        )
    )


def srk_template(*, tss: bool = False) -> TPM2B_PUBLIC:
    """An ECC P-256 storage root key template (deterministic, so the TPM re-derives the
    same key every time).

    ``tss=True``: the parent that the TSS2 key file format means by TPM_RH_OWNER, as
    tpm2-tools, the tpm2 OpenSSL provider and tpm2-pytss's tsskey create it: an empty
    unique field. Keys in TSS2 PEM files live under it. ``tss=False``: the TCG
    Provisioning Guidance SRK (unique = 32 zero bytes for x and y), the parent of the
    keys Tessera <= 0.1 wrote in its own container. The two are different keys.
    """
    return _ecc_template(
        TPMA_OBJECT.FIXEDTPM
        | TPMA_OBJECT.FIXEDPARENT
        | TPMA_OBJECT.SENSITIVEDATAORIGIN
        | TPMA_OBJECT.USERWITHAUTH
        | TPMA_OBJECT.NODA
        | TPMA_OBJECT.RESTRICTED
        | TPMA_OBJECT.DECRYPT,
        TPMT_ECC_SCHEME(scheme=TPM2_ALG.NULL),
        TPMT_SYM_DEF_OBJECT(
            algorithm=TPM2_ALG.AES,
            keyBits=TPMU_SYM_KEY_BITS(aes=128),
            mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB),
        ),
        zero_unique=not tss,
    )


#: noDA: the keys have an empty authorization value, so dictionary-attack protection
#: guards no secret; but a DA-protected key used since the last orderly TPM2_Shutdown
#: counts every power cut (or killed swtpm) as a failed authorization, and after
#: maxTries of them (3 on swtpm, typically 32 on a TPM chip) the device key refuses to
#: sign until the recovery time passes. tpm2-tss-engine, tpm2-openssl and tpm2-pytss's
#: tsskey set noDA for password-less keys for the same reason.
SIGNING_KEY_ATTRIBUTES = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.NODA
    | TPMA_OBJECT.SIGN_ENCRYPT
)
ATTESTATION_KEY_ATTRIBUTES = SIGNING_KEY_ATTRIBUTES | TPMA_OBJECT.RESTRICTED


def _child_template(kind: int, *, noda: bool = True) -> TPM2B_PUBLIC:
    attrs = SIGNING_KEY_ATTRIBUTES if kind == _KIND_SIGNING else ATTESTATION_KEY_ATTRIBUTES
    if not noda:  # a DA-protected key, as Tessera 0.1 made them (tests of lockout)
        attrs &= ~TPMA_OBJECT.NODA
    return _ecc_template(
        attrs, _ecdsa_sha256(), TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL), zero_unique=False
    )


# --------------------------------------------------------------------------------------
# helpers


def parse_tcti(tcti: str) -> tuple[str, str | None]:
    """Split a tpm2-tools style TCTI string ``name[:conf]`` (e.g. ``device:/dev/tpmrm0``)."""
    if not isinstance(tcti, str) or not tcti.strip():
        raise ConfigurationError(
            "empty TCTI string; use e.g. 'device:/dev/tpmrm0' or 'swtpm:host=127.0.0.1,port=2321'"
        )
    name, sep, conf = tcti.strip().partition(":")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ConfigurationError(f"bad TCTI name {name!r} in {tcti!r}; expected 'name:conf'")
    return name, (conf if sep else None)


def _check_persistent(handle: int) -> int:
    if isinstance(handle, bool) or not isinstance(handle, int) or not (
        0x81000000 <= handle <= 0x817FFFFF
    ):
        raise StateError(
            f"persistent handle {handle!r} is outside the owner range 0x81000000-0x817fffff "
            "(e.g. 0x81000010)",
            Reason.BAD_PARAMETERS)
    return handle


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise StateError(
            f"bad TPM key name {name!r}: use 1-64 characters from [A-Za-z0-9._-], "
            "starting with a letter or digit",
            Reason.BAD_PARAMETERS,
        )
    return name


def _public_key(area: TPMT_PUBLIC) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    if area.type == TPM2_ALG.ECC:
        curve = _CURVES.get(int(area.parameters.eccDetail.curveID))
        if curve is None:
            raise KeyBackendError(
                f"unsupported TPM curve {area.parameters.eccDetail.curveID}",
                Reason.BACKEND_FAILURE,
            )
        x = int.from_bytes(bytes(area.unique.ecc.x), "big")
        y = int.from_bytes(bytes(area.unique.ecc.y), "big")
        return ec.EllipticCurvePublicNumbers(x, y, curve).public_key()
    if area.type == TPM2_ALG.RSA:
        exponent = int(area.parameters.rsaDetail.exponent) or 65537
        n = int.from_bytes(bytes(area.unique.rsa), "big")
        return rsa.RSAPublicNumbers(exponent, n).public_key()
    raise KeyBackendError(f"unsupported TPM key type {area.type}", Reason.BACKEND_FAILURE)


def _signature_der(sig: object) -> bytes:
    ecdsa = sig.signature.ecdsa  # type: ignore[attr-defined]
    r = int.from_bytes(bytes(ecdsa.signatureR), "big")
    s = int.from_bytes(bytes(ecdsa.signatureS), "big")
    return encode_dss_signature(r, s)


def _policy_secret_endorsement(hash_name: str) -> bytes:
    """PolicyA: the policy digest of TPM2_PolicySecret(TPM_RH_ENDORSEMENT), empty ref."""
    size = hashlib.new(hash_name).digest_size
    step = hashlib.new(
        hash_name,
        b"\x00" * size
        + _TPM_CC_POLICY_SECRET.to_bytes(4, "big")
        + int(TPM2_RH.ENDORSEMENT).to_bytes(4, "big"),
    ).digest()
    return hashlib.new(hash_name, step).digest()  # PolicyUpdate's second hash: policyRef


def _policy_or(hash_name: str, branches: Sequence[bytes]) -> bytes:
    size = hashlib.new(hash_name).digest_size
    data = b"\x00" * size + _TPM_CC_POLICY_OR.to_bytes(4, "big") + b"".join(branches)
    return hashlib.new(hash_name, data).digest()


def _der_length(data: bytes) -> int:
    """Total length of the DER TLV at the start of ``data`` (certificates in NV may be
    padded)."""
    if len(data) < 2 or data[0] != 0x30:
        raise ValueError("not a DER SEQUENCE")
    first = data[1]
    if first < 0x80:
        return 2 + first
    count = first & 0x7F
    if count == 0 or count > 4 or len(data) < 2 + count:
        raise ValueError("bad DER length")
    return 2 + count + int.from_bytes(data[2 : 2 + count], "big")


#: TPM response codes for "no room": object, session or memory slots all taken
_OUT_OF_SLOTS = frozenset({int(TPM2_RC.OBJECT_MEMORY), int(TPM2_RC.SESSION_MEMORY),
                           int(TPM2_RC.MEMORY), int(TPM2_RC.OBJECT_HANDLES)})


def _base_rc(rc: int) -> int:
    """The TPM response code without layer, handle, parameter and session numbers."""
    rc &= 0xFFFF
    if rc & _FMT1:
        return _FMT1 | (rc & 0x3F)
    return rc


# --------------------------------------------------------------------------------------
# key files


@dataclass(frozen=True)
class _KeyFile:
    """A TPM-wrapped key: its public area and SRK-encrypted private area.

    Written as a TSS2 PRIVATE KEY PEM (the ASN.1 TPMKey of the TSS2 key file format:
    type 2.23.133.10.1.3 "loadable key", emptyAuth, parent TPM_RH_OWNER, pubkey,
    privkey), which tpm2-tools (``tpm2_load -r``), the tpm2 OpenSSL provider and the
    tpm2-tss engine load. Parent TPM_RH_OWNER means "the owner hierarchy's standard
    storage key", the ECC P-256 primary these tools derive (``srk_template(tss=True)``).
    Files in the container of Tessera <= 0.1 (``TESSERA-TPMKEY``, which also recorded
    the SRK's name) are still read.
    """

    kind: int
    parent_name: bytes | None  # the SRK's name (old container only; None for PEM)
    public: bytes  # marshalled TPM2B_PUBLIC
    private: bytes  # marshalled TPM2B_PRIVATE

    def to_pem(self) -> bytes:
        return bytes(
            TSSPrivKey(
                self.tpm2b_private(), self.tpm2b_public(), empty_auth=True, parent=_TSS_PARENT
            ).to_pem()
        )

    @classmethod
    def from_pem(cls, data: bytes) -> _KeyFile:
        try:
            key = TSSPrivKey.from_pem(data)
        except Exception as exc:
            raise ValueError(f"not a TSS2 PRIVATE KEY ({exc})") from None
        if int(key.parent) != _TSS_PARENT:
            raise ValueError(
                f"its parent is 0x{int(key.parent):08x}; Tessera loads keys whose parent "
                f"is the owner hierarchy's storage key (0x{_TSS_PARENT:08x})"
            )
        if not key.empty_auth:
            raise ValueError("the key has an authorization value; Tessera keys have none")
        public = key.public
        if public.publicArea.type != TPM2_ALG.ECC:
            raise ValueError("the key is not an ECC key")
        restricted = int(public.publicArea.objectAttributes) & TPMA_OBJECT.RESTRICTED
        kind = _KIND_ATTESTATION if restricted else _KIND_SIGNING
        return cls(kind, None, bytes(public.marshal()), bytes(key.private.marshal()))

    @classmethod
    def parse(cls, data: bytes) -> _KeyFile:
        """Either format: TSS2 PEM, or the old Tessera container."""
        if data.lstrip().startswith(b"-----BEGIN TSS2 PRIVATE KEY-----"):
            return cls.from_pem(data)
        return cls.from_bytes(data)

    def tpm_name(self) -> bytes:
        return bytes(self.tpm2b_public().get_name())

    def to_bytes(self) -> bytes:
        """The old container (kept for tests of compatibility with existing files)."""
        assert self.parent_name is not None
        return b"".join(
            (
                _FILE_MAGIC,
                bytes((_FILE_VERSION, self.kind)),
                TPM2B_NAME(self.parent_name).marshal(),
                self.public,
                self.private,
            )
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> _KeyFile:
        if not data.startswith(_FILE_MAGIC) or len(data) < len(_FILE_MAGIC) + 2:
            raise ValueError("not a Tessera TPM key file")
        pos = len(_FILE_MAGIC)
        version, kind = data[pos], data[pos + 1]
        if version != _FILE_VERSION or kind not in _KIND_LABEL:
            raise ValueError(f"unsupported key file version {version} / kind {kind}")
        pos += 2
        parent, used = TPM2B_NAME.unmarshal(data[pos:])
        pos += used
        public, used = TPM2B_PUBLIC.unmarshal(data[pos:])
        public_bytes = data[pos : pos + used]
        pos += used
        _private, used = TPM2B_PRIVATE.unmarshal(data[pos:])
        private_bytes = data[pos : pos + used]
        pos += used
        if pos != len(data):
            raise ValueError("trailing bytes after the key blobs")
        if public.publicArea.type != TPM2_ALG.ECC:
            raise ValueError("the key is not an ECC key")
        return cls(kind, bytes(parent), public_bytes, private_bytes)

    def tpm2b_public(self) -> TPM2B_PUBLIC:
        return TPM2B_PUBLIC.unmarshal(self.public)[0]

    def tpm2b_private(self) -> TPM2B_PRIVATE:
        return TPM2B_PRIVATE.unmarshal(self.private)[0]


@dataclass(frozen=True)
class _EkChoice:
    cert_index: int | None
    template_name: str
    persistent_handle: int
    certificate: bytes | None
    template: TPM2B_PUBLIC


# --------------------------------------------------------------------------------------
# key objects


class _TpmKey:
    backend = "tpm"

    def __init__(self, tpm: TpmBackend, name: str, keyfile: _KeyFile) -> None:
        self._tpm = tpm
        self.name = name
        self._keyfile = keyfile
        area = keyfile.tpm2b_public().publicArea
        key = _public_key(area)
        assert isinstance(key, ec.EllipticCurvePublicKey)
        self._public_key = key
        self._tpm_name = bytes(keyfile.tpm2b_public().get_name())

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public_key

    def public_area_bytes(self) -> bytes:
        """The key's marshalled TPM2B_PUBLIC (what a verifier hashes into its TPM name)."""
        return self._keyfile.public

    def tpm_name(self) -> bytes:
        """The TPM name: nameAlg (2 bytes) followed by the hash of the public area."""
        return self._tpm_name

    def object_attributes(self) -> TPMA_OBJECT:
        return TPMA_OBJECT(self._keyfile.tpm2b_public().publicArea.objectAttributes)


class TpmSigner(_TpmKey):
    """A non-exportable ECC P-256 key in the TPM; implements ``structauth.keys.Signer``."""

    def sign_digest(self, digest: bytes) -> bytes:
        if not isinstance(digest, (bytes, bytearray, memoryview)) or len(digest) != 32:
            raise StateError("sign_digest needs a 32-byte SHA-256 digest", Reason.BAD_PARAMETERS)
        return self._tpm._sign(self._keyfile, self._public_key, bytes(digest))

    def close(self) -> None:
        """Flush the key from the TPM (it is reloaded from its blob on the next use)."""
        self._tpm._unload(self._keyfile)

    def __enter__(self) -> TpmSigner:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<TpmSigner {self.name!r} on {self._tpm.tcti}>"


class TpmAttestationKey(_TpmKey):
    """A restricted signing key (AK): signs only TPM-generated structures."""

    def __repr__(self) -> str:
        return f"<TpmAttestationKey {self.name!r} on {self._tpm.tcti}>"


# --------------------------------------------------------------------------------------
# the backend


class TpmBackend:
    """A connection to one TPM plus a directory of TPM-wrapped key blobs.

    ``tcti`` is a tpm2-tools style string: ``device:/dev/tpmrm0`` on a Raspberry Pi,
    ``swtpm:host=127.0.0.1,port=2321`` for swtpm. The object is thread-safe (one lock
    around the ESAPI context) and reconnects on the next call after the TPM went away.
    """

    def __init__(self, tcti: str, key_dir: str | os.PathLike[str]) -> None:
        self.tcti = tcti
        self._tcti_name, self._tcti_conf = parse_tcti(tcti)
        self.key_dir = Path(key_dir)
        self._lock = threading.RLock()
        self._esapi: ESAPI | None = None
        self._tcti_ctx: TCTILdr | None = None
        self._closed = False
        self._loaded: dict[bytes, ESYS_TR] = {}  # signing keys kept loaded, by public area
        #: transient objects we loaded and have not flushed yet: ESYS handle -> (TPM
        #: handle, TPM name). When the connection breaks (the TPM, its resource manager or
        #: the link went away) the ESYS context cannot flush them any more; they become
        #: orphans, flushed through the next connection if the TPM still holds them.
        self._objects: dict[int, tuple[int, bytes]] = {}
        self._orphans: list[tuple[int, bytes]] = []
        #: keys the operator made persistent (persist_key), by public area: TPM handle
        self._persist_at: dict[bytes, int] = {}
        #: ESYS handles of persistent objects: closed, never flushed
        self._persistent: set[int] = set()
        self._pinned: set[bytes] = set()  # cached keys in use by the running command
        self._ek: _EkChoice | None = None
        with self._lock:
            self._connect()

    # -- lifecycle ------------------------------------------------------------------

    def _connect(self) -> None:
        try:
            self._tcti_ctx = TCTILdr(self._tcti_name, self._tcti_conf)
            self._esapi = ESAPI(self._tcti_ctx)
        except Exception as exc:
            self._drop_connection()
            raise self._translate(exc, "connect to the TPM") from exc
        self._reap_orphans(self._esapi)

    def _drop_connection(self) -> None:
        """Forget the ESYS context. After a TCTI error ESYS marks its context as failed
        and answers every later call with "Function called in the wrong order"
        (BAD_SEQUENCE), so a broken context is never reused: the next call connects
        afresh."""
        self._loaded.clear()
        self._persistent.clear()
        self._orphans.extend(self._objects.values())
        self._objects.clear()
        esapi, tcti = self._esapi, self._tcti_ctx
        self._esapi = self._tcti_ctx = None
        with contextlib.suppress(Exception):
            if esapi is not None:
                esapi.close()
        with contextlib.suppress(Exception):
            if tcti is not None:
                tcti.close()

    def close(self) -> None:
        """Flush every object this backend loaded and close the connection (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._esapi is not None:
                for handle in list(self._loaded.values()):
                    self._flush(self._esapi, handle)
            self._drop_connection()
            self._orphans.clear()

    def __enter__(self) -> TpmBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<TpmBackend {self.tcti} keys in {self.key_dir}>"

    @contextlib.contextmanager
    def _tpm(self, doing: str) -> Iterator[ESAPI]:
        """Hold the lock, hand out the ESAPI context, translate every library error."""
        with self._lock:
            if self._closed:
                raise StateError("the TPM backend is closed", Reason.INVALID_STATE)
            if self._esapi is None:
                self._connect()
            assert self._esapi is not None
            try:
                yield self._esapi
            except TesseraError as known:
                # already translated deeper down (e.g. a failed load): a lost connection
                # still poisons the context, so drop it here too, or the first retry
                # would fail with BAD_SEQUENCE and only the second would work
                if known.reason == Reason.BACKEND_UNAVAILABLE:
                    self._drop_connection()
                raise
            except Exception as exc:
                error = self._translate(exc, doing)
                if error.reason == Reason.BACKEND_UNAVAILABLE:
                    # The ESAPI context is unusable after an I/O error; reconnect next time.
                    self._drop_connection()
                raise error from exc

    # -- error translation ------------------------------------------------------------

    def _reach_hint(self) -> str:
        name, conf = self._tcti_name, self._tcti_conf or ""
        if name in ("swtpm", "mssim"):
            where = conf or "host=localhost,port=2321"
            return (
                f"is {name} running at {where}? Start one with "
                "'tessera-sim swtpm start --state DIR' and use the TCTI it prints"
            )
        if name == "device":
            path = conf or "/dev/tpmrm0"
            return (
                f"does {path} exist, and may this user open it (usually group 'tss')? "
                "Check that the TPM driver is loaded (dtoverlay=tpm-slb9670 on a Raspberry Pi)"
            )
        if name == "tabrmd":
            return "is tpm2-abrmd running and reachable on the D-Bus?"
        return f"check the TCTI string {self.tcti!r}"

    def _translate(self, exc: BaseException, doing: str) -> TesseraError:
        if isinstance(exc, TesseraError):
            return exc
        if not isinstance(exc, TSS2_Exception):
            return KeyBackendError(
                f"TPM {doing} failed: {type(exc).__name__}: {exc}", Reason.BACKEND_FAILURE
            )
        rc = int(exc.rc)
        layer = rc & _LAYER_MASK
        if layer == _TCTI_LAYER:
            if rc == int(TSS2_RC.TCTI_RC_NOT_SUPPORTED):
                return KeyBackendError(
                    f"TCTI {self._tcti_name!r} is not available: is "
                    f"libtss2-tcti-{self._tcti_name}.so installed?",
                    Reason.BACKEND_UNAVAILABLE,
                )
            if rc == int(TSS2_RC.TCTI_RC_BAD_VALUE):
                return KeyBackendError(
                    f"the TCTI rejected its configuration {self.tcti!r}; use e.g. "
                    "'device:/dev/tpmrm0' or 'swtpm:host=127.0.0.1,port=2321'",
                    Reason.BAD_CONFIGURATION,
                )
            return KeyBackendError(
                f"cannot reach the TPM via {self.tcti!r} ({exc}): {self._reach_hint()}",
                Reason.BACKEND_UNAVAILABLE,
            )
        base = rc & 0xFFFF
        if layer != 0 and base in (
            int(TSS2_RC.BASE_RC_IO_ERROR),
            int(TSS2_RC.BASE_RC_NO_CONNECTION),
            int(TSS2_RC.BASE_RC_BAD_SEQUENCE),
            int(TSS2_RC.BASE_RC_TRY_AGAIN),
        ):
            return KeyBackendError(
                f"lost the connection to the TPM via {self.tcti!r} ({exc}): {self._reach_hint()}",
                Reason.BACKEND_UNAVAILABLE,
            )
        if layer in (0, int(TSS2_RC.RESMGR_TPM_RC_LAYER)):
            code = _base_rc(rc)
            if code == int(TPM2_RC.LOCKOUT):
                return KeyBackendError(
                    f"TPM {doing} refused: the TPM is in dictionary-attack lockout. Wait for "
                    "the recovery time or reset it with the lockout authorization "
                    "(tpm2_dictionarylockout --clear-lockout)",
                    Reason.TOKEN_LOCKED,
                )
            if code in (int(TPM2_RC.AUTH_FAIL), int(TPM2_RC.BAD_AUTH)):
                return KeyBackendError(
                    f"TPM {doing} refused: wrong authorization value ({exc}). Tessera uses "
                    "empty authorizations for the owner hierarchy, the SRK and its keys; "
                    "if the owner hierarchy has a password, clear it or provision keys with it",
                    Reason.WRONG_PIN,
                )
            if code in _OUT_OF_SLOTS:
                return KeyBackendError(
                    f"TPM {doing} failed: the TPM is out of object or session slots ({exc}): "
                    "another program holds them, or one that stopped while talking to the "
                    "TPM directly left them. Close signers you no longer need, use the "
                    "kernel resource manager (device:/dev/tpmrm0) or tpm2-abrmd, which "
                    "flush what a program leaves, or restart the TPM",
                    Reason.BACKEND_FAILURE,
                )
            if code == int(TPM2_RC.INITIALIZE):
                return KeyBackendError(
                    f"the TPM at {self.tcti!r} has not been started (TPM2_Startup); "
                    "start swtpm with --flags startup-clear or run tpm2_startup -c",
                    Reason.BACKEND_UNAVAILABLE,
                )
        return KeyBackendError(f"TPM {doing} failed: {exc} (rc 0x{rc:x})", Reason.BACKEND_FAILURE)

    # -- low-level object handling (call with the lock held, inside _tpm) --------------

    def _track(self, esapi: ESAPI, handle: ESYS_TR, name: bytes) -> ESYS_TR:
        """Remember a transient object we made, so that it can be flushed even if the
        connection breaks before we flush it."""
        with contextlib.suppress(Exception):
            self._objects[int(handle)] = (int(esapi.tr_get_tpm_handle(handle)), bytes(name))
        return handle

    def _flush(self, esapi: ESAPI, handle: ESYS_TR) -> None:
        if int(handle) in self._persistent:  # the operator's persistent key stays put
            self._persistent.discard(int(handle))
            with contextlib.suppress(Exception):
                esapi.tr_close(handle)
            return
        try:
            esapi.flush_context(handle)
        except Exception:
            return  # still tracked: an orphan if the connection turns out to be broken
        self._objects.pop(int(handle), None)

    def _reap_orphans(self, esapi: ESAPI) -> None:
        """Flush, through a fresh connection, what a broken one left loaded. Without a
        resource manager (swtpm's socket, /dev/tpm0) such objects hold the TPM's few
        slots until it resets. An object is flushed only if the TPM handle still holds
        an object of the same TPM name: after a TPM reset the number may belong to
        another program's object, which we leave alone."""
        orphans, self._orphans = self._orphans, []
        for tpm_handle, name in orphans:
            try:
                handle = esapi.tr_from_tpmpublic(tpm_handle)
            except Exception:
                continue  # gone (the TPM was reset or a resource manager cleaned up)
            try:
                if bytes(esapi.tr_get_name(handle)) == name:
                    esapi.flush_context(handle)
                    continue
            except Exception:
                pass
            with contextlib.suppress(Exception):
                esapi.tr_close(handle)

    @contextlib.contextmanager
    def _srk(self, esapi: ESAPI, *, tss: bool = True) -> Iterator[tuple[ESYS_TR, bytes]]:
        template = srk_template(tss=tss)
        handle, public, *_ = self._retry_on_full(
            lambda: esapi.create_primary(TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.OWNER)
        )
        name = bytes(public.get_name())
        self._track(esapi, handle, name)
        try:
            yield handle, name
        finally:
            self._flush(esapi, handle)

    def _retry_on_full(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn``; if the TPM has no free object slot, flush our cached keys, retry."""
        try:
            return fn()
        except TSS2_Exception as exc:
            idle = [k for k in self._loaded if k not in self._pinned]
            if _base_rc(int(exc.rc)) != int(TPM2_RC.OBJECT_MEMORY) or not idle:
                raise
            assert self._esapi is not None
            for key in idle:
                self._flush(self._esapi, self._loaded.pop(key))
            return fn()

    def _load(self, esapi: ESAPI, keyfile: _KeyFile, name: str) -> ESYS_TR:
        # an old container names its parent: the TCG SRK; a TSS2 PEM: the tools' parent
        with self._srk(esapi, tss=keyfile.parent_name is None) as (srk, srk_name):
            if keyfile.parent_name is not None and srk_name != keyfile.parent_name:
                raise KeyBackendError(
                    f"TPM key {name!r} was wrapped by a different storage root key: the "
                    "file comes from another TPM, or this TPM's owner hierarchy was cleared. "
                    "Create and enroll a new key",
                    Reason.KEY_NOT_FOUND,
                )
            try:
                handle = self._retry_on_full(
                    lambda: esapi.load(srk, keyfile.tpm2b_private(), keyfile.tpm2b_public())
                )
            except TSS2_Exception as exc:
                error = self._translate(exc, f"load of key {name!r}")
                # a full TPM says nothing of the blob: not "create a new key"
                if (error.reason != Reason.BACKEND_FAILURE
                        or _base_rc(int(exc.rc)) in _OUT_OF_SLOTS):
                    raise error from exc
                raise KeyBackendError(
                    f"the TPM refused to load key {name!r} ({exc}): the blob is damaged or "
                    "belongs to another TPM. Create and enroll a new key",
                    Reason.KEY_NOT_FOUND,
                ) from exc
            return self._track(esapi, handle, keyfile.tpm_name())

    @contextlib.contextmanager
    def _transient(self, esapi: ESAPI, keyfile: _KeyFile, name: str) -> Iterator[ESYS_TR]:
        cached = self._loaded.get(keyfile.public)
        if cached is not None:
            self._pinned.add(keyfile.public)
            try:
                yield cached
            finally:
                self._pinned.discard(keyfile.public)
            return
        handle = self._load(esapi, keyfile, name)
        try:
            yield handle
        finally:
            self._flush(esapi, handle)

    def _handles(self, esapi: ESAPI, handle_type: int) -> list[int]:
        found: list[int] = []
        start = handle_type << 24
        while True:
            more, data = esapi.get_capability(TPM2_CAP.HANDLES, start, 64)
            handles = data.data.handles
            batch = [int(handles.handle[i]) for i in range(handles.count)]
            found.extend(h for h in batch if h >> 24 == handle_type)
            if not more or not batch:
                return found
            start = batch[-1] + 1

    def _nv_read(self, esapi: ESAPI, index: int) -> bytes:
        nv = esapi.tr_from_tpmpublic(index)
        try:
            public, _ = esapi.nv_read_public(nv)
            size = int(public.nvPublic.dataSize)
            _, props = esapi.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT_NV.BUFFER_MAX, 1)
            plist = props.data.tpmProperties
            chunk = 512
            if plist.count and int(plist.tpmProperty[0].property) == int(TPM2_PT_NV.BUFFER_MAX):
                chunk = int(plist.tpmProperty[0].value)
            data = b""
            while len(data) < size:
                part = esapi.nv_read(nv, min(chunk, size - len(data)), len(data))
                data += bytes(part)
            return data
        finally:
            with contextlib.suppress(Exception):
                esapi.tr_close(nv)

    # -- key files ------------------------------------------------------------------

    def _key_path(self, name: str) -> Path:
        return self.key_dir / f"{_check_name(name)}{KEY_FILE_SUFFIX}"

    def _read_keyfile(self, name: str, kind: int) -> _KeyFile:
        path = self._key_path(name)
        create = "create_signing_key" if kind == _KIND_SIGNING else "create_attestation_key"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise KeyBackendError(
                f"no TPM {_KIND_LABEL[kind]} named {name!r} in {self.key_dir} "
                f"(create it with {create}, or check the key directory)",
                Reason.KEY_NOT_FOUND,
            ) from None
        except OSError as exc:
            raise KeyBackendError(
                f"cannot read TPM key file {path}: {exc.strerror}", Reason.KEY_NOT_FOUND
            ) from None
        try:
            keyfile = _KeyFile.parse(data)
        except Exception as exc:
            raise KeyBackendError(
                f"TPM key file {path} is damaged or not a TSS2 PRIVATE KEY ({exc})",
                Reason.KEY_NOT_FOUND,
            ) from None
        if keyfile.kind != kind:
            raise KeyBackendError(
                f"{path} holds a TPM {_KIND_LABEL[keyfile.kind]}, not a {_KIND_LABEL[kind]}",
                Reason.KEY_NOT_FOUND,
            )
        return keyfile

    def _write_keyfile(self, path: Path, keyfile: _KeyFile) -> None:
        """Write atomically (temp file, fsync, link into place) without clobbering."""
        self.key_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=self.key_dir)
        try:
            with os.fdopen(fd, "wb") as fh:  # mkstemp: mode 0600
                fh.write(keyfile.to_pem())
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)  # fails if path exists: no silent overwrite of a key
            except FileExistsError:
                raise self._exists(path) from None
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
                if path.exists():  # file system without hard links
                    raise self._exists(path) from None
                os.replace(tmp, path)
        except OSError as exc:
            raise KeyBackendError(
                f"cannot write TPM key file {path}: {exc.strerror}", Reason.BACKEND_FAILURE
            ) from None
        finally:
            Path(tmp).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            dir_fd = os.open(self.key_dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    @staticmethod
    def _exists(path: Path) -> KeyBackendError:
        return KeyBackendError(
            f"TPM key file {path} already exists; load it, or delete it first if you really "
            "mean to replace the key",
            Reason.BAD_PARAMETERS,
        )

    def _create(self, name: str, kind: int, *, noda: bool = True) -> _KeyFile:
        path = self._key_path(name)
        if path.exists():
            raise self._exists(path)
        with self._tpm(f"creation of {_KIND_LABEL[kind]} {name!r}") as esapi:
            with self._srk(esapi) as (srk, _):
                private, public, *_ = self._retry_on_full(
                    lambda: esapi.create(
                        srk, TPM2B_SENSITIVE_CREATE(), _child_template(kind, noda=noda)
                    )
                )
            keyfile = _KeyFile(kind, None, public.marshal(), private.marshal())
        self._write_keyfile(path, keyfile)
        return keyfile

    # -- public API: keys -------------------------------------------------------------

    def create_signing_key(self, name: str) -> TpmSigner:
        """Create a new P-256 signing key in the TPM and store its blob as ``name``."""
        return TpmSigner(self, name, self._create(name, _KIND_SIGNING))

    def load_signing_key(self, name: str) -> TpmSigner:
        """Open an existing signing key; raises KEY_NOT_FOUND if there is none. A key
        made persistent (:meth:`persist_key`) is used at its handle, not loaded."""
        keyfile = self._read_keyfile(name, _KIND_SIGNING)
        handle = self._read_handle(name)
        if handle is not None:
            self._persist_at[keyfile.public] = handle
        with self._tpm(f"load of key {name!r}") as esapi:
            # Load now, so a blob this TPM cannot use is reported here, not at first use.
            if keyfile.public not in self._loaded:
                self._loaded[keyfile.public] = self._resolve(esapi, keyfile, name)
        return TpmSigner(self, name, keyfile)

    # -- persistent keys ----------------------------------------------------------

    def _handle_path(self, name: str) -> Path:
        return self.key_dir / f"{_check_name(name)}{HANDLE_FILE_SUFFIX}"

    def _read_handle(self, name: str) -> int | None:
        path = self._handle_path(name)
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise KeyBackendError(f"cannot read {path}: {exc.strerror}",
                                  Reason.KEY_NOT_FOUND) from None
        try:
            return _check_persistent(int(text, 16))
        except (ValueError, StateError):
            raise KeyBackendError(
                f"{path} does not hold a persistent handle (0x81000000-0x817fffff): "
                f"{text[:20]!r}; fix it, or delete it to load the key from its file",
                Reason.KEY_NOT_FOUND) from None

    def _resolve(self, esapi: ESAPI, keyfile: _KeyFile, name: str) -> ESYS_TR:
        """The key's handle for this connection: its persistent handle (checked to
        hold this very key), else a transient load of its file."""
        persistent = self._persist_at.get(keyfile.public)
        if persistent is None:
            return self._load(esapi, keyfile, name)
        try:
            handle = esapi.tr_from_tpmpublic(persistent)
        except TSS2_Exception as exc:
            if int(exc.rc) & _LAYER_MASK != 0 or _base_rc(int(exc.rc)) != int(TPM2_RC.HANDLE):
                raise
            raise KeyBackendError(
                f"key {name!r} should be at persistent handle 0x{persistent:08x}, which is "
                f"empty: persist it again (tessera-agent persist-key), or delete "
                f"{self._handle_path(name)} to load it from its file",
                Reason.KEY_NOT_FOUND) from None
        if bytes(esapi.tr_get_name(handle)) != keyfile.tpm_name():
            with contextlib.suppress(Exception):
                esapi.tr_close(handle)
            raise KeyBackendError(
                f"persistent handle 0x{persistent:08x} holds another key than {name!r}; "
                f"delete {self._handle_path(name)} to load the key from its file",
                Reason.KEY_NOT_FOUND)
        self._persistent.add(int(handle))
        return handle

    def persist_key(self, name: str, handle: int) -> None:
        """Make signing key ``name`` a persistent object at ``handle`` (owner range
        0x81000000-0x817fffff), where tpm2-tools and the tpm2 OpenSSL provider use it
        directly (``tpm2_sign -c 0x81000010``, ``handle:0x81000010``). The key file
        stays (the key's public area, and the way back); ``<name>.handle`` records the
        handle, and every later load uses it. Idempotent for the same key."""
        _check_persistent(handle)
        keyfile = self._read_keyfile(name, _KIND_SIGNING)
        with self._tpm(f"persisting key {name!r} at 0x{handle:08x}") as esapi:
            if handle in self._handles(esapi, TPM2_HT.PERSISTENT):
                there = esapi.tr_from_tpmpublic(handle)
                try:
                    same = bytes(esapi.tr_get_name(there)) == keyfile.tpm_name()
                finally:
                    with contextlib.suppress(Exception):
                        esapi.tr_close(there)
                if not same:
                    raise KeyBackendError(
                        f"persistent handle 0x{handle:08x} already holds another object; "
                        "choose a free one ('tpm2_getcap handles-persistent' lists those in "
                        "use)", Reason.BAD_PARAMETERS)
            else:
                with self._transient(esapi, keyfile, name) as transient:
                    made = esapi.evict_control(ESYS_TR.OWNER, transient, handle)
                    with contextlib.suppress(Exception):
                        esapi.tr_close(made)
        path = self._handle_path(name)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_text(f"0x{handle:08x}\n")
            os.replace(tmp, path)
        except OSError as exc:
            raise KeyBackendError(f"cannot write {path}: {exc.strerror}",
                                  Reason.BACKEND_FAILURE) from None
        self._forget(keyfile)  # the next use resolves the persistent handle
        self._persist_at[keyfile.public] = handle

    def get_or_create_signing_key(self, name: str) -> TpmSigner:
        if self._key_path(name).exists():
            return self.load_signing_key(name)
        try:
            return self.create_signing_key(name)
        except KeyBackendError as exc:
            if exc.reason != Reason.BAD_PARAMETERS:
                raise
            return self.load_signing_key(name)  # somebody else created it meanwhile

    def create_attestation_key(self, name: str) -> TpmAttestationKey:
        """Create a restricted ECC P-256 signing key (AK) stored as ``name``."""
        return TpmAttestationKey(self, name, self._create(name, _KIND_ATTESTATION))

    def load_attestation_key(self, name: str) -> TpmAttestationKey:
        keyfile = self._read_keyfile(name, _KIND_ATTESTATION)
        with self._tpm(f"load of attestation key {name!r}") as esapi:
            handle = self._load(esapi, keyfile, name)  # fail early, then free the slot
            self._flush(esapi, handle)
        return TpmAttestationKey(self, name, keyfile)

    def get_or_create_attestation_key(self, name: str) -> TpmAttestationKey:
        if self._key_path(name).exists():
            return self.load_attestation_key(name)
        try:
            return self.create_attestation_key(name)
        except KeyBackendError as exc:
            if exc.reason != Reason.BAD_PARAMETERS:
                raise
            return self.load_attestation_key(name)

    def _sign(self, keyfile: _KeyFile, public: ec.EllipticCurvePublicKey, digest: bytes) -> bytes:
        """Sign with the cached handle, and check the result before handing it out.

        The check (one P-256 verification, ~0.1 ms against ~0.6 ms for swtpm's signature)
        catches a faulty TPM response and a stale handle: a TPM reset without a resource
        manager flushes our key, and another object may then sit at the same handle. In
        those cases the key is reloaded from its blob and the signature made once more.
        """
        validation = TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL)
        with self._tpm("signature") as esapi:
            for attempt in (1, 2):
                handle = self._loaded.get(keyfile.public)
                cached = handle is not None
                if handle is None:
                    handle = self._resolve(esapi, keyfile, "signing key")
                    self._loaded[keyfile.public] = handle
                try:
                    signature = esapi.sign(handle, TPM2B_DIGEST(digest), _sig_scheme(), validation)
                except TSS2_Exception as exc:
                    retry = (
                        cached
                        and attempt == 1
                        and int(exc.rc) & _LAYER_MASK == 0
                        and _base_rc(int(exc.rc)) != int(TPM2_RC.LOCKOUT)
                    )
                    if not retry:
                        raise
                    self._forget(keyfile)
                    continue
                der = _signature_der(signature)
                try:
                    public.verify(der, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
                except InvalidSignature:
                    self._forget(keyfile)
                    if attempt == 1:
                        continue
                    raise KeyBackendError(
                        "the TPM returned a signature that does not verify with the key's "
                        "public half; the TPM may be faulty",
                        Reason.BACKEND_FAILURE,
                    ) from None
                return der
        raise AssertionError("unreachable")  # pragma: no cover

    def _forget(self, keyfile: _KeyFile) -> None:
        """Drop a cached handle we no longer trust, without TPM2_FlushContext: after a TPM
        reset the handle number may belong to another program's object."""
        handle = self._loaded.pop(keyfile.public, None)
        if handle is not None:
            self._objects.pop(int(handle), None)
            if self._esapi is not None:
                with contextlib.suppress(Exception):
                    self._esapi.tr_close(handle)

    def _unload(self, keyfile: _KeyFile) -> None:
        with self._lock:
            handle = self._loaded.pop(keyfile.public, None)
            if handle is not None and self._esapi is not None:
                self._flush(self._esapi, handle)

    # -- public API: randomness and attestation --------------------------------------

    def random(self, n: int) -> bytes:
        """``n`` bytes from the TPM's random number generator."""
        if not isinstance(n, int) or n < 0:
            raise StateError("random(n) needs n >= 0", Reason.BAD_PARAMETERS)
        out = bytearray()
        with self._tpm("GetRandom") as esapi:
            while len(out) < n:
                part = bytes(esapi.get_random(min(32, n - len(out))))
                if not part:
                    raise KeyBackendError(
                        "the TPM returned no random bytes", Reason.BACKEND_FAILURE
                    )
                out += part
        return bytes(out)

    def certify(self, key_name: str, ak_name: str, qualifying_data: bytes) -> tuple[bytes, bytes]:
        """TPM2_Certify of signing key ``key_name`` by attestation key ``ak_name``.

        Returns ``(attest, signature)``: the marshalled TPMS_ATTEST (its ``extraData`` is
        ``qualifying_data`` and its certified name is the key's TPM name) and the AK's
        DER ECDSA signature over SHA-256(attest).
        """
        data = self._qualifying(qualifying_data)
        key = self._read_keyfile(key_name, _KIND_SIGNING)
        ak = self._read_keyfile(ak_name, _KIND_ATTESTATION)
        with (
            self._tpm(f"certification of {key_name!r} by {ak_name!r}") as esapi,
            self._transient(esapi, key, key_name) as key_handle,
            self._transient(esapi, ak, ak_name) as ak_handle,
        ):
            attest, signature = esapi.certify(key_handle, ak_handle, data, _sig_scheme())
            return bytes(attest), _signature_der(signature)

    def quote(
        self,
        ak_name: str,
        nonce: bytes,
        pcrs: Sequence[int] = tuple(range(8)),
        bank: str = "sha256",
    ) -> tuple[bytes, bytes]:
        """TPM2_Quote of ``pcrs`` in ``bank`` by attestation key ``ak_name``.

        Returns ``(attest, signature)``; ``extraData`` in the attest is ``nonce``.
        """
        data = self._qualifying(nonce)
        selection = self._pcr_selection(pcrs, bank)
        ak = self._read_keyfile(ak_name, _KIND_ATTESTATION)
        with (
            self._tpm(f"quote by {ak_name!r}") as esapi,
            self._transient(esapi, ak, ak_name) as ak_handle,
        ):
            attest, signature = esapi.quote(ak_handle, selection, data, _sig_scheme())
            return bytes(attest), _signature_der(signature)

    def pcr_values(
        self, pcrs: Sequence[int] = tuple(range(8)), bank: str = "sha256"
    ) -> dict[int, bytes]:
        """Current values of ``pcrs`` (what a verifier needs to check a quote's digest)."""
        wanted = sorted(set(pcrs))
        values: dict[int, bytes] = {}
        with self._tpm("PCR read") as esapi:
            while len(values) < len(wanted):
                todo = [p for p in wanted if p not in values]
                _, selection, digests = esapi.pcr_read(self._pcr_selection(todo, bank))
                read: list[int] = []
                for i in range(selection.count):
                    sel = selection.pcrSelections[i]
                    bitmap = bytes(sel.pcrSelect)[: sel.sizeofSelect]
                    read += [p for p in range(len(bitmap) * 8) if bitmap[p // 8] >> (p % 8) & 1]
                if not read:
                    raise KeyBackendError(
                        f"the TPM has no {bank} PCR bank with {todo}", Reason.BACKEND_FAILURE
                    )
                for p, i in zip(sorted(read), range(digests.count), strict=False):
                    values[p] = bytes(digests.digests[i])
        return {p: values[p] for p in wanted}

    @staticmethod
    def _qualifying(data: bytes) -> TPM2B_DATA:
        if not isinstance(data, (bytes, bytearray)) or len(data) > 64:
            raise StateError(
                "qualifying data / nonce must be at most 64 bytes", Reason.BAD_PARAMETERS
            )
        return TPM2B_DATA(bytes(data))

    @staticmethod
    def _pcr_selection(pcrs: Sequence[int], bank: str) -> TPML_PCR_SELECTION:
        items = sorted(set(pcrs))
        if not items or any(not isinstance(p, int) or not 0 <= p < 24 for p in items):
            raise StateError("PCR numbers must be in 0..23", Reason.BAD_PARAMETERS)
        if bank not in ("sha1", "sha256", "sha384", "sha512"):
            raise StateError(f"unknown PCR bank {bank!r}", Reason.BAD_PARAMETERS)
        return TPML_PCR_SELECTION.parse(f"{bank}:{','.join(map(str, items))}")

    # -- endorsement key ------------------------------------------------------------

    def _select_ek(self, esapi: ESAPI) -> _EkChoice:
        if self._ek is not None:
            return self._ek
        defined = set(self._handles(esapi, TPM2_HT.NV_INDEX))

        def nv_read(index: int) -> bytes:
            if int(index) not in defined:
                raise NoSuchIndex(index)
            return self._nv_read(esapi, int(index))

        found = [entry for entry in EK_CERT_INDICES if entry[0] in defined]
        # No certificate at all: fall back to the standard low-range ECC P-256 EK.
        index, template_name, persistent = found[0] if found else (None, "EK-ECC256", 0x81010002)
        raw_cert, template = create_ek_template(template_name, nv_read)
        cert = None
        if raw_cert:
            try:
                cert = bytes(raw_cert[: _der_length(bytes(raw_cert))])
            except ValueError:
                raise KeyBackendError(
                    f"NV index 0x{index:08x} does not hold a DER certificate",
                    Reason.BACKEND_FAILURE,
                ) from None
        self._ek = _EkChoice(index, template_name, persistent, cert, template)
        return self._ek

    def _ek_matches(self, public: TPM2B_PUBLIC, choice: _EkChoice) -> bool:
        area = public.publicArea
        if choice.certificate is not None:
            try:
                cert_key = x509.load_der_x509_certificate(choice.certificate).public_key()
                ours = _public_key(area)
            except Exception:
                return False
            if isinstance(cert_key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)) and type(
                cert_key.public_numbers()
            ) is type(ours.public_numbers()):
                return cert_key.public_numbers() == ours.public_numbers()
            return False
        tmpl = choice.template.publicArea
        return (
            area.type == tmpl.type
            and area.nameAlg == tmpl.nameAlg
            and int(area.objectAttributes) == int(tmpl.objectAttributes)
            and bytes(area.authPolicy) == bytes(tmpl.authPolicy)
        )

    @contextlib.contextmanager
    def _ek_handle(self, esapi: ESAPI) -> Iterator[tuple[ESYS_TR, TPM2B_PUBLIC]]:
        choice = self._select_ek(esapi)
        if choice.certificate is not None and choice.persistent_handle in self._handles(
            esapi, TPM2_HT.PERSISTENT
        ):
            handle = esapi.tr_from_tpmpublic(choice.persistent_handle)
            public, _, _ = esapi.read_public(handle)
            if self._ek_matches(public, choice):
                try:
                    yield handle, public
                finally:
                    with contextlib.suppress(Exception):
                        esapi.tr_close(handle)
                return
            with contextlib.suppress(Exception):
                esapi.tr_close(handle)
        handle, public, *_ = self._retry_on_full(
            lambda: esapi.create_primary(
                TPM2B_SENSITIVE_CREATE(), choice.template, ESYS_TR.ENDORSEMENT
            )
        )
        self._track(esapi, handle, bytes(public.get_name()))
        try:
            if not self._ek_matches(public, choice):
                raise KeyBackendError(
                    f"the EK re-created from template {choice.template_name} does not match "
                    "the EK certificate in NV; this TPM's endorsement data is inconsistent",
                    Reason.BACKEND_FAILURE,
                )
            yield handle, public
        finally:
            self._flush(esapi, handle)

    def ek_certificate(self) -> bytes:
        """The EK certificate (DER) from NV: ECC P-256, ECC P-384, then RSA 2048 index."""
        with self._tpm("EK certificate read") as esapi:
            choice = self._select_ek(esapi)
        if choice.certificate is None:
            wanted = ", ".join(f"0x{i:08x}" for i, _, _ in EK_CERT_INDICES)
            raise KeyBackendError(
                f"this TPM has no EK certificate in NV (looked at {wanted}); "
                "for swtpm run swtpm_setup with --create-ek-cert",
                Reason.KEY_NOT_FOUND,
            )
        return choice.certificate

    def ek_public(self) -> bytes:
        """Marshalled TPM2B_PUBLIC of the EK that matches :meth:`ek_certificate`."""
        with self._tpm("EK read") as esapi, self._ek_handle(esapi) as (_, public):
            return bytes(public.marshal())

    def ek_public_key(self) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
        return _public_key(TPM2B_PUBLIC.unmarshal(self.ek_public())[0].publicArea)

    def _ek_policy_session(self, esapi: ESAPI, public: TPM2B_PUBLIC) -> ESYS_TR:
        area = public.publicArea
        hash_name = _HASH_NAMES.get(int(area.nameAlg))
        policy = bytes(area.authPolicy)
        branches: list[bytes] | None = None
        if hash_name is not None:
            policy_a = _policy_secret_endorsement(hash_name)
            policy_c = _EK_POLICY_C.get(hash_name)
            if policy == policy_a:
                branches = []
            elif policy_c is not None and policy == _policy_or(hash_name, [policy_a, policy_c]):
                branches = [policy_a, policy_c]
        if branches is None:
            raise KeyBackendError(
                f"the EK's authorization policy {policy.hex()} is not a TCG EK policy this "
                "backend knows (PolicySecret(endorsement), alone or in PolicyB)",
                Reason.BACKEND_FAILURE,
            )
        session = esapi.start_auth_session(
            ESYS_TR.NONE,
            ESYS_TR.NONE,
            TPM2_SE.POLICY,
            TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
            area.nameAlg,
        )
        try:
            esapi.policy_secret(ESYS_TR.ENDORSEMENT, session, expiration=0)
            if branches:
                esapi.policy_or(session, TPML_DIGEST(branches))
        except BaseException:
            with contextlib.suppress(Exception):
                esapi.flush_context(session)
            raise
        return session

    def activate_credential(
        self, ak_name: str, credential_blob: bytes, encrypted_secret: bytes
    ) -> bytes:
        """TPM2_ActivateCredential: recover the secret a verifier sealed to our EK + AK.

        ``credential_blob`` and ``encrypted_secret`` are the marshalled TPM2B_ID_OBJECT and
        TPM2B_ENCRYPTED_SECRET from MakeCredential (e.g. ``tpm2_pytss.utils.make_credential``
        on :meth:`ek_public` and the AK's TPM name). The TPM only releases the secret if the
        EK is its own and the AK named in the credential is loaded in it.
        """
        try:
            blob, used_blob = TPM2B_ID_OBJECT.unmarshal(bytes(credential_blob))
            secret, used_secret = TPM2B_ENCRYPTED_SECRET.unmarshal(bytes(encrypted_secret))
        except Exception:
            raise StateError(
                "credential blob / encrypted secret are not marshalled TPM2B structures",
                Reason.BAD_PARAMETERS,
            ) from None
        if used_blob != len(credential_blob) or used_secret != len(encrypted_secret):
            raise StateError(
                "trailing bytes after the credential structures", Reason.BAD_PARAMETERS
            )
        ak = self._read_keyfile(ak_name, _KIND_ATTESTATION)
        with (
            self._tpm(f"credential activation with {ak_name!r}") as esapi,
            self._transient(esapi, ak, ak_name) as ak_handle,
            self._ek_handle(esapi) as (ek_handle, ek_public),
        ):
            session = self._ek_policy_session(esapi, ek_public)
            try:
                out = esapi.activate_credential(
                    ak_handle,
                    ek_handle,
                    blob,
                    secret,
                    session1=ESYS_TR.PASSWORD,
                    session2=session,
                )
            except TSS2_Exception as exc:
                error = self._translate(exc, "credential activation")
                if error.reason != Reason.BACKEND_FAILURE:
                    raise error from exc
                raise KeyBackendError(
                    f"the TPM could not activate the credential ({exc}): it was made for "
                    f"another TPM's EK or for an AK other than {ak_name!r}",
                    Reason.BAD_PARAMETERS,
                ) from exc
            finally:
                with contextlib.suppress(Exception):
                    esapi.flush_context(session)
            return bytes(out)
