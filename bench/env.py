"""What the numbers were measured on: recorded with every benchmark run."""

from __future__ import annotations

import os
import platform
import ssl
import sys
from importlib import metadata
from typing import Any


def cpu_model() -> str:
    """The ``model name`` line of /proc/cpuinfo, or what platform knows elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cryptography_openssl() -> str:
    from cryptography.hazmat.backends.openssl.backend import backend

    return str(backend.openssl_version_text())


def describe() -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cryptography": _version("cryptography"),
        "cryptography_openssl": cryptography_openssl(),
        "ssl_openssl": ssl.OPENSSL_VERSION,
        "pyjwt": _version("PyJWT"),
        "aiocoap": _version("aiocoap"),
    }
