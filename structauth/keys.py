"""The one key interface the core sees.

Hardware backends (``hw/``) implement :class:`Signer`; the core never learns whether a
key lives in a TPM, a PKCS#11 token or (for development only) in process memory.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from cryptography.hazmat.primitives.asymmetric import ec


@runtime_checkable
class Signer(Protocol):
    """An ECDSA P-256 signing key whose private half the caller cannot read."""

    #: short backend name recorded in logs and registries: "tpm", "pkcs11", "insecure-software"
    backend: str

    def public_key(self) -> ec.EllipticCurvePublicKey:
        """The public half as a ``cryptography`` object."""
        ...

    def sign_digest(self, digest: bytes) -> bytes:
        """Sign a 32-byte SHA-256 digest; return a DER-encoded ECDSA signature."""
        ...
