"""Key backends: TPM 2.0 (``hw.tpm``), PKCS#11 (``hw.pkcs11``) and, for development
only, an in-memory key (``hw.software``). Each hands the core a
``structauth.keys.Signer``.

:func:`open_signer` turns a configuration string into a signer::

    tpm:<tcti>#<key name>                 key_dir=... required
    pkcs11:<module path>#<token label>/<key label>
    insecure-software:<PEM path>

Backends are imported lazily, so a device with only one of tpm2-pytss / python-pkcs11
installed can still use the other. There is no default backend.
"""

from __future__ import annotations

import os
from typing import Any

from structauth.errors import ConfigurationError
from structauth.keys import Signer

__all__ = ["TSS2_LOG_DEFAULT", "open_signer"]

#: libtss2 (tpm2-tss) writes its own ERROR/WARNING lines to stderr, also for conditions
#: the TPM backend handles (a TPM that restarted, a stale handle it reloads, a TCTI it
#: reconnects). Every failure reaches the caller as a KeyBackendError saying what to
#: check, so the library's lines are silenced unless the operator set TSS2_LOG
#: (e.g. TSS2_LOG=all+WARNING, or esys+DEBUG, to see them again). Set before any TCTI or
#: ESYS context exists: libtss2 reads the variable at its first log call.
TSS2_LOG_DEFAULT = "all+NONE"
os.environ.setdefault("TSS2_LOG", TSS2_LOG_DEFAULT)

_USAGE = (
    "use 'tpm:<tcti>#<key>' (e.g. tpm:device:/dev/tpmrm0#device), "
    "'pkcs11:<module>#<token>/<key>' or 'insecure-software:<pem path>'"
)


def open_signer(spec: str, **options: Any) -> Signer:
    """Open (or, with ``create=True``, create if missing) the key named by ``spec``.

    Options: ``create`` (bool, default False); ``key_dir`` (tpm, required);
    ``pin_env`` / ``pin_file`` (pkcs11); ``deterministic`` (insecure-software).
    The returned signer's ``close()`` also closes the backend it opened.
    """
    kind, sep, rest = (spec or "").partition(":")
    if not sep or not rest:
        raise ConfigurationError(f"bad key spec {spec!r}: {_USAGE}")
    create = bool(options.pop("create", False))
    if kind == "tpm":
        return _open_tpm(spec, rest, create, options)
    if kind == "pkcs11":
        return _open_pkcs11(spec, rest, create, options)
    if kind == "insecure-software":
        return _open_software(rest, create, options)
    raise ConfigurationError(f"unknown key backend {kind!r} in {spec!r}: {_USAGE}")


def _split(spec: str, rest: str) -> tuple[str, str]:
    where, sep, key = rest.rpartition("#")
    if not sep or not where or not key:
        raise ConfigurationError(f"bad key spec {spec!r}: {_USAGE}")
    return where, key


def _reject_unknown(options: dict[str, Any], spec: str) -> None:
    if options:
        raise ConfigurationError(f"unknown option(s) {sorted(options)} for {spec!r}")


def _open_tpm(spec: str, rest: str, create: bool, options: dict[str, Any]) -> Signer:
    from hw.tpm import TpmBackend

    tcti, name = _split(spec, rest)
    key_dir = options.pop("key_dir", None)
    if key_dir is None:
        raise ConfigurationError(f"{spec!r} needs key_dir= (where the TPM key blobs live)")
    _reject_unknown(options, spec)
    backend = TpmBackend(tcti, key_dir)
    try:
        signer = (
            backend.get_or_create_signing_key(name) if create else backend.load_signing_key(name)
        )
    except BaseException:
        backend.close()
        raise
    return _Owning(signer, backend)


def _open_pkcs11(spec: str, rest: str, create: bool, options: dict[str, Any]) -> Signer:
    from hw.pkcs11 import Pkcs11Backend

    module, labels = _split(spec, rest)
    token, sep, label = labels.partition("/")
    if not sep or not token or not label:
        raise ConfigurationError(f"bad key spec {spec!r}: {_USAGE}")
    kwargs = {k: options.pop(k) for k in ("pin_env", "pin_file") if k in options}
    _reject_unknown(options, spec)
    backend = Pkcs11Backend(module, token, **kwargs)
    try:
        signer = (
            backend.get_or_create_signing_key(label) if create else backend.load_signing_key(label)
        )
    except BaseException:
        backend.close()
        raise
    return _Owning(signer, backend)


def _open_software(path: str, create: bool, options: dict[str, Any]) -> Signer:
    from pathlib import Path

    from hw.software import InsecureSoftwareSigner

    deterministic = bool(options.pop("deterministic", False))
    _reject_unknown(options, f"insecure-software:{path}")
    if create and not Path(path).exists():
        signer = InsecureSoftwareSigner.generate(deterministic=deterministic)
        signer.save(path)
        return signer
    return InsecureSoftwareSigner.load(path, deterministic=deterministic)


class _Owning:
    """A signer that closes the backend it was opened with."""

    def __init__(self, signer: Any, backend: Any) -> None:
        self._signer = signer
        self._backend = backend
        self.backend: str = signer.backend

    def public_key(self) -> Any:
        return self._signer.public_key()

    def sign_digest(self, digest: bytes) -> bytes:
        return bytes(self._signer.sign_digest(digest))

    def close(self) -> None:
        self._signer.close()
        self._backend.close()

    def __enter__(self) -> _Owning:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:  # public_area_bytes, tpm_name, key_attributes
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._signer, name)

    def __repr__(self) -> str:
        return f"<{self._signer!r} (owns its backend)>"
