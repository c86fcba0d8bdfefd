"""An in-memory P-256 key for development and test vectors only.

:class:`InsecureSoftwareSigner` keeps its private key in process memory (and, if you
ask, in an unencrypted PEM file). Anyone who can read that memory or file can
impersonate the device. It exists so that developers can run the agent without a TPM
and so that committed test vectors can be reproduced byte for byte
(``deterministic=True`` signs with RFC 6979 nonces). Nothing in Tessera picks it by
default: a caller has to name ``insecure-software`` explicitly, and every instance
logs a warning.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from structauth.errors import ConfigurationError, KeyBackendError, Reason, StateError

__all__ = ["InsecureSoftwareSigner"]

log = logging.getLogger(__name__)

#: order of the P-256 group (SEC 2, section 2.4.2)
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_SEED_INFO = b"tessera/insecure-software/p256-from-seed/v1"


class InsecureSoftwareSigner:
    """A :class:`structauth.keys.Signer` whose private key lives in process memory.

    Development only. Build one with :meth:`generate`, :meth:`load`,
    :meth:`from_private_value` or :meth:`from_seed`; the constructor is private.
    """

    backend = "insecure-software"

    def __init__(
        self, private_key: ec.EllipticCurvePrivateKey, *, deterministic: bool, origin: str
    ) -> None:
        if not isinstance(private_key, ec.EllipticCurvePrivateKey) or not isinstance(
            private_key.curve, ec.SECP256R1
        ):
            raise StateError("InsecureSoftwareSigner needs a P-256 key", Reason.BAD_PARAMETERS)
        self._key = private_key
        self._public = private_key.public_key()
        self._algorithm = ec.ECDSA(Prehashed(hashes.SHA256()), deterministic_signing=deterministic)
        self.deterministic = deterministic
        log.warning(
            "insecure-software signer (%s): the private key is in process memory, NOT in a "
            "TPM or HSM; use it for development and test vectors only",
            origin,
        )

    # -- constructors ---------------------------------------------------------------

    @classmethod
    def generate(cls, *, deterministic: bool = False) -> InsecureSoftwareSigner:
        """A fresh random P-256 key."""
        return cls(
            ec.generate_private_key(ec.SECP256R1()), deterministic=deterministic, origin="generated"
        )

    @classmethod
    def from_private_value(
        cls, value: int, *, deterministic: bool = True
    ) -> InsecureSoftwareSigner:
        """The key with private scalar ``value`` (1 <= value < n), for fixed test keys."""
        if not isinstance(value, int) or not 1 <= value < _P256_ORDER:
            raise StateError(
                "private value must be an int in [1, n-1] for P-256", Reason.BAD_PARAMETERS
            )
        key = ec.derive_private_key(value, ec.SECP256R1())
        return cls(key, deterministic=deterministic, origin="fixed private value")

    @classmethod
    def from_seed(cls, seed: bytes, *, deterministic: bool = True) -> InsecureSoftwareSigner:
        """A key derived from ``seed`` (HKDF-SHA256, then reduced into [1, n-1]).

        The same seed always gives the same key, so test vectors can name keys by seed.
        48 bytes of HKDF output are reduced modulo n-1, which leaves a bias below 2^-128.
        """
        if not isinstance(seed, (bytes, bytearray)) or not seed:
            raise StateError("seed must be non-empty bytes", Reason.BAD_PARAMETERS)
        okm = HKDF(algorithm=hashes.SHA256(), length=48, salt=None, info=_SEED_INFO).derive(
            bytes(seed)
        )
        value = int.from_bytes(okm, "big") % (_P256_ORDER - 1) + 1
        key = ec.derive_private_key(value, ec.SECP256R1())
        return cls(key, deterministic=deterministic, origin="derived from seed")

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], *, deterministic: bool = False
    ) -> InsecureSoftwareSigner:
        """Read an unencrypted PEM (PKCS#8 or SEC1) P-256 private key."""
        p = Path(path)
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            raise KeyBackendError(
                f"no insecure-software key at {p}; create one with "
                "InsecureSoftwareSigner.generate().save(path)",
                Reason.KEY_NOT_FOUND,
            ) from None
        except OSError as exc:
            raise ConfigurationError(f"cannot read key file {p}: {exc.strerror}") from None
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise KeyBackendError(
                f"{p} is not an unencrypted PEM private key", Reason.KEY_NOT_FOUND
            ) from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(
            key.curve, ec.SECP256R1
        ):
            raise KeyBackendError(f"{p} does not hold a P-256 key", Reason.KEY_NOT_FOUND)
        return cls(key, deterministic=deterministic, origin=f"loaded from {p}")

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the key as unencrypted PKCS#8 PEM, mode 0600, atomically."""
        p = Path(path)
        if p.exists() and not overwrite:
            raise KeyBackendError(
                f"{p} already exists; refusing to overwrite a key", Reason.BAD_PARAMETERS
            )
        pem = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
        try:
            with os.fdopen(fd, "wb") as fh:  # mkstemp creates the file with mode 0600
                fh.write(pem)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return p

    # -- Signer ---------------------------------------------------------------------

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    def sign_digest(self, digest: bytes) -> bytes:
        if not isinstance(digest, (bytes, bytearray, memoryview)) or len(digest) != 32:
            raise StateError("sign_digest needs a 32-byte SHA-256 digest", Reason.BAD_PARAMETERS)
        return self._key.sign(bytes(digest), self._algorithm)

    def close(self) -> None:
        """Nothing to release; present so every signer can be closed the same way."""

    def __enter__(self) -> InsecureSoftwareSigner:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<InsecureSoftwareSigner deterministic={self.deterministic}>"
