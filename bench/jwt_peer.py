"""pyjwt as a per-message baseline: a signed token checked on every message.

The token carries about 120 bytes of claims (the same size as the Tessera payload)
plus ``iat`` and ``exp``. ``exp`` is *included and checked*: a bearer token with no
expiry is not a realistic deployment, and Tessera's verify also checks freshness (its
epoch window), so both sides pay for a freshness check. Nothing else is required or
checked (no ``aud``/``iss``: Tessera binds the message to a topic instead, which a JWT
cannot do without a claim per message).

The verification key is a parsed key object (an ``EllipticCurvePublicKey`` for ES256,
32 random bytes for HS256), built once, so no PEM parsing is billed per message.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

ALGORITHMS = ("ES256", "HS256")


def claims(payload_size: int = 120) -> dict[str, Any]:
    """Claims (iat and exp included) whose compact JSON is ``payload_size`` bytes."""
    now = int(time.time())
    body: dict[str, Any] = {
        "sub": "spiffe://fleet.example/device/pi-0042",
        "iat": now,
        "exp": now + 3600,
        "d": "",
    }
    body["d"] = "x" * max(0, payload_size - len(claims_json(body)))
    return body


def claims_json(body: dict[str, Any]) -> bytes:
    """The compact JSON pyjwt signs (it uses the same separators)."""
    return json.dumps(body, separators=(",", ":")).encode()


def verifier(algorithm: str, payload_size: int = 120) -> tuple[Callable[[], Any], str]:
    """``(verify, token)``: ``verify()`` checks one token with ``jwt.decode``."""
    if algorithm == "ES256":
        private: Any = ec.generate_private_key(ec.SECP256R1())
        public: Any = private.public_key()
    elif algorithm == "HS256":
        private = public = os.urandom(32)
    else:
        raise ValueError(f"unsupported algorithm {algorithm}")
    token = jwt.encode(claims(payload_size), private, algorithm=algorithm)
    algorithms = [algorithm]
    options: Any = {"require": ["exp"]}  # pyjwt's Options TypedDict
    decode = jwt.decode

    def verify() -> Any:
        return decode(token, public, algorithms=algorithms, options=options)

    # fail loudly now rather than inside the timer, and prove the claims come back
    if verify()["sub"] != claims(payload_size)["sub"]:
        raise AssertionError("pyjwt round trip did not return the claims")
    return verify, token
