"""Operator authentication for the provisioning service.

Operators authenticate with a bearer token. The service stores only SHA-256 hashes
of tokens (``operators.json`` in the authority directory, mode 0600); a token is shown
once, when it is created.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
from pathlib import Path

from structauth.errors import AuthorizationError, ConfigurationError

_NAME = re.compile(r"[A-Za-z0-9._@-]{1,64}")
TOKEN_PREFIX = "tso_"


def check_operator_name(name: object) -> str:
    """The name, if it is one an operator may have; else ConfigurationError."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigurationError("operator name must be 1-64 of [A-Za-z0-9._@-]")
    return name


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Operators:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._hashes: dict[str, str] = {}
        if path.exists():
            try:
                data = json.loads(path.read_text())
                self._hashes = {str(k): str(v) for k, v in data["operators"].items()}
            except (ValueError, KeyError, TypeError, AttributeError):
                raise ConfigurationError(f"{path} is not a valid operators file") from None

    def add(self, name: str) -> str:
        """Create an operator; returns its token (shown once, never stored)."""
        check_operator_name(name)
        if name in self._hashes:
            raise ConfigurationError(f"operator {name} exists already")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        self._hashes[name] = _hash(token)
        self._save()
        return token

    def authenticate(self, header: str | None) -> str:
        """The operator's name for an ``Authorization: Bearer <token>`` header."""
        if not header or not header.startswith("Bearer "):
            raise AuthorizationError("operator authentication required (Authorization: Bearer)")
        digest = _hash(header[len("Bearer ") :].strip())
        for name, stored in self._hashes.items():
            if hmac.compare_digest(stored, digest):
                return name
        raise AuthorizationError("unknown operator token")

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".operators.")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump({"operators": self._hashes}, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)  # a full disk leaves no temporary file
            raise
