"""Where the core's randomness comes from.

The core never reaches for randomness on its own: handshakes take an :class:`Entropy`.
Production uses :class:`SystemEntropy`; test vectors use :class:`DeterministicEntropy`,
which makes every ephemeral key and nonce a function of a seed so transcripts can be
committed and checked byte for byte.
"""

from __future__ import annotations

import hashlib
import os
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric import mlkem


class Entropy(Protocol):
    def random_bytes(self, n: int) -> bytes: ...

    def encapsulate(self, key: mlkem.MLKEM768PublicKey) -> tuple[bytes, bytes]:
        """ML-KEM-768 encapsulation: return (shared secret, ciphertext)."""
        ...


class SystemEntropy:
    """The operating system's CSPRNG; ML-KEM encapsulation by OpenSSL."""

    def random_bytes(self, n: int) -> bytes:
        return os.urandom(n)

    def encapsulate(self, key: mlkem.MLKEM768PublicKey) -> tuple[bytes, bytes]:
        return key.encapsulate()


class DeterministicEntropy:
    """Seeded randomness for test vectors only. Never use it to protect anything.

    OpenSSL offers no seeded ML-KEM encapsulation through ``cryptography``, so the
    encapsulation is the one place a vector records an output instead of a seed:
    ``encapsulations`` replays recorded (shared secret, ciphertext) pairs in order. When
    the list runs out a real encapsulation is made and appended, which is how vectors
    are first generated. The initiator still decapsulates the recorded ciphertext for
    real, so the vectors check ML-KEM end to end.
    """

    def __init__(self, seed: bytes, encapsulations: list[tuple[bytes, bytes]] | None = None):
        self._seed = seed
        self._counter = 0
        self.encapsulations: list[tuple[bytes, bytes]] = list(encapsulations or [])
        self._used = 0

    def random_bytes(self, n: int) -> bytes:
        self._counter += 1
        h = hashlib.shake_256(self._seed + self._counter.to_bytes(8, "big"))
        return h.digest(n)

    def encapsulate(self, key: mlkem.MLKEM768PublicKey) -> tuple[bytes, bytes]:
        if self._used == len(self.encapsulations):
            self.encapsulations.append(key.encapsulate())
        pair = self.encapsulations[self._used]
        self._used += 1
        return pair
