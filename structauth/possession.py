"""Proof of possession outside a session: what a device signs with its hardware key
when it enrolls without attestation (factory-witnessed) or renews its credential.

The digest binds a purpose label, the service's fresh nonce and the device's serial,
so a signature made for one purpose, nonce or device is useless for any other.
"""

from __future__ import annotations

import hashlib

LABEL_ENROLL = b"tessera enrollment proof of possession"
LABEL_RENEW = b"tessera renewal proof of possession"


def possession_digest(label: bytes, nonce: bytes, serial: str) -> bytes:
    return hashlib.sha256(label + len(nonce).to_bytes(2, "big") + nonce + serial.encode()).digest()
