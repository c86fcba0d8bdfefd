"""PKCS#11 key backend (python-pkcs11): HSMs, smart cards, SoftHSM2 in tests.

The user PIN is read only from an environment variable (``TESSERA_PKCS11_PIN`` by
default) or from a file, never from a command-line argument. After login only a keyed
hash of it stays in memory, to check the PIN of later backends on the same token.

PKCS#11 login state belongs to the whole process, per token: a second C_Login on a
token that is already logged in fails, and logging out in one session logs out all of
them. So every :class:`Pkcs11Backend` in a process that opens the same token shares one
logged-in session (reference-counted, guarded by one lock); a later backend must present
the same PIN as the first, or it gets WRONG_PIN.

python-pkcs11 loads a module once per process and path string; this module always
passes the real path (symlinks resolved), so code in the same process that uses
python-pkcs11 directly must call ``pkcs11.lib(os.path.realpath(module))`` too.
SoftHSM2 reads ``SOFTHSM2_CONF`` and scans its token directory when the module is
initialised, so a token created by another process (``softhsm2-util --init-token``)
becomes visible only after :func:`rescan_tokens`, which re-initialises the module and
therefore ends every open session of that module in this process. A backend that finds
no token does that re-initialisation by itself while the process has no session open.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pkcs11
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11e
from pkcs11.util.ec import encode_named_curve_parameters

from structauth.errors import (
    ConfigurationError,
    KeyBackendError,
    Reason,
    StateError,
    TesseraError,
)

__all__ = ["DEFAULT_PIN_ENV", "Pkcs11Backend", "Pkcs11Signer", "rescan_tokens"]

DEFAULT_PIN_ENV = "TESSERA_PKCS11_PIN"
_P256_PARAMS = encode_named_curve_parameters("1.2.840.10045.3.1.7")  # secp256r1

_UNAVAILABLE = (
    p11e.NoSuchToken,
    p11e.TokenNotPresent,
    p11e.TokenNotRecognised,
    p11e.DeviceRemoved,
    p11e.DeviceError,
    p11e.SlotIDInvalid,
    p11e.SessionClosed,
    p11e.SessionHandleInvalid,
)


def _translate(exc: BaseException, doing: str, where: str) -> TesseraError:
    """Map a python-pkcs11 exception to a Tessera error whose message says what to do."""
    if isinstance(exc, TesseraError):
        return exc
    detail = f"{type(exc).__name__}{': ' + str(exc) if str(exc) else ''}"
    if isinstance(exc, (p11e.PinIncorrect, p11e.PinInvalid, p11e.PinLenRange)):
        return KeyBackendError(
            f"PKCS#11 {doing} on {where}: the token rejected the user PIN ({detail}); "
            "check the PIN variable or file",
            Reason.WRONG_PIN,
        )
    if isinstance(exc, p11e.PinExpired):
        return KeyBackendError(
            f"PKCS#11 {doing} on {where}: the user PIN has expired; set a new one with the "
            "token's tools",
            Reason.WRONG_PIN,
        )
    if isinstance(exc, p11e.PinLocked):
        return KeyBackendError(
            f"PKCS#11 {doing} on {where}: the user PIN is locked after too many wrong "
            "attempts; the security officer must unblock it (C_InitPIN)",
            Reason.TOKEN_LOCKED,
        )
    if isinstance(exc, p11e.UserPinNotInitialized):
        return KeyBackendError(
            f"PKCS#11 {doing} on {where}: the token has no user PIN yet; the security "
            "officer must set one (C_InitPIN) before keys can be used",
            Reason.TOKEN_LOCKED,
        )
    if isinstance(exc, p11e.NoSuchToken):
        return KeyBackendError(
            f"PKCS#11 {doing}: no {where}; check the label (SoftHSM2: softhsm2-util "
            "--show-slots with the same SOFTHSM2_CONF). A token created by another process "
            "while this one has sessions open appears only after hw.pkcs11.rescan_tokens()",
            Reason.BACKEND_UNAVAILABLE,
        )
    if isinstance(exc, _UNAVAILABLE):
        return KeyBackendError(
            f"PKCS#11 {doing}: {where} is not available ({detail}); is the token present "
            "and the label right? (SoftHSM2: softhsm2-util --show-slots, with the same "
            "SOFTHSM2_CONF)",
            Reason.BACKEND_UNAVAILABLE,
        )
    if isinstance(exc, p11e.NoSuchKey):
        return KeyBackendError(f"PKCS#11 {doing} on {where}: {detail}", Reason.KEY_NOT_FOUND)
    return KeyBackendError(f"PKCS#11 {doing} on {where} failed: {detail}", Reason.BACKEND_FAILURE)


def _load_module(module_path: str) -> Any:
    # python-pkcs11 caches modules by path string and a second C_Initialize of the same
    # library fails, so every spelling of one module must map to one string.
    path = Path(os.path.realpath(module_path))
    if not path.is_file():
        raise KeyBackendError(
            f"PKCS#11 module {module_path} not found; install the token's module "
            "(for SoftHSM2: apt-get install softhsm2 -> /usr/lib/softhsm/libsofthsm2.so)",
            Reason.BACKEND_UNAVAILABLE,
        )
    try:
        return pkcs11.lib(str(path))
    except Exception as exc:
        raise KeyBackendError(
            f"cannot load PKCS#11 module {module_path}: {exc}", Reason.BACKEND_UNAVAILABLE
        ) from exc


class _SharedLogin:
    """One logged-in read-write session on one token, shared inside the process."""

    def __init__(self, key: tuple[str, str], session: Any, pin_tag: bytes) -> None:
        self.key = key
        self.session = session
        self.pin_tag = pin_tag
        self.lock = threading.RLock()
        self.users = 0
        self.valid = True


_registry_lock = threading.Lock()
_registry: dict[tuple[str, str], _SharedLogin] = {}
_PIN_TAG_KEY = secrets.token_bytes(32)  # per process; the PIN itself is never stored


def _pin_tag(pin: str) -> bytes:
    h = hashes.Hash(hashes.SHA256())
    h.update(_PIN_TAG_KEY + pin.encode())
    return h.finalize()


def rescan_tokens(module_path: str) -> None:
    """Re-initialise ``module_path`` so that tokens created by other processes appear.

    This ends every session this process has with the module: backends opened before
    must be reopened (their calls fail with BACKEND_UNAVAILABLE).
    """
    real = os.path.realpath(module_path)
    with _registry_lock:
        for key in [k for k in _registry if k[0] == real]:
            shared = _registry.pop(key)
            with shared.lock:
                shared.valid = False
        lib = _load_module(real)
        try:
            lib.reinitialize()
        except Exception as exc:
            raise _translate(exc, "re-initialisation", real) from exc


def _read_pin(pin_env: str, pin_file: str | os.PathLike[str] | None) -> str:
    if pin_file is not None:
        path = Path(pin_file)
        try:
            st = path.stat()
            if st.st_mode & (stat.S_IROTH | stat.S_IWOTH):
                raise ConfigurationError(
                    f"PIN file {path} is readable or writable by others; chmod 600 it"
                )
            pin = path.read_text(encoding="utf-8").rstrip("\r\n")
        except FileNotFoundError:
            raise ConfigurationError(
                f"PKCS#11 PIN file {path} does not exist; create it (mode 0600) with the "
                "token's user PIN"
            ) from None
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read PKCS#11 PIN file {path}: {exc.strerror}"
            ) from None
        if not pin:
            raise ConfigurationError(f"PKCS#11 PIN file {path} is empty")
        return pin
    pin = os.environ.get(pin_env, "")
    if not pin:
        raise ConfigurationError(
            f"no PKCS#11 user PIN: set the environment variable {pin_env} (or configure a PIN file)"
        )
    return pin


class Pkcs11Signer:
    """An EC P-256 private key on a PKCS#11 token; implements ``structauth.keys.Signer``."""

    backend = "pkcs11"

    def __init__(self, owner: Pkcs11Backend, label: str, private: Any, public: Any) -> None:
        self._owner = owner
        self.label = label
        self._private = private
        point = bytes(public[Attribute.EC_POINT])
        # CKA_EC_POINT is a DER OCTET STRING around the point; a few tokens omit the DER.
        if len(point) == 67 and point[:2] == b"\x04\x41":
            point = point[2:]
        try:
            self._public_key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
        except ValueError:
            raise KeyBackendError(
                f"PKCS#11 key {label!r} has an unreadable CKA_EC_POINT", Reason.BACKEND_FAILURE
            ) from None

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public_key

    def sign_digest(self, digest: bytes) -> bytes:
        if not isinstance(digest, (bytes, bytearray, memoryview)) or len(digest) != 32:
            raise StateError("sign_digest needs a 32-byte SHA-256 digest", Reason.BAD_PARAMETERS)
        raw = self._owner._call(
            f"signature with {self.label!r}",
            lambda _session: self._private.sign(bytes(digest), mechanism=Mechanism.ECDSA),
        )
        if len(raw) != 64:
            raise KeyBackendError(
                f"PKCS#11 token returned a {len(raw)}-byte ECDSA signature", Reason.BACKEND_FAILURE
            )
        return encode_dss_signature(
            int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
        )

    def key_attributes(self) -> dict[str, bool]:
        """The private key's protection attributes as the token reports them."""
        names = {
            "token": Attribute.TOKEN,
            "private": Attribute.PRIVATE,
            "sensitive": Attribute.SENSITIVE,
            "extractable": Attribute.EXTRACTABLE,
            "always_sensitive": Attribute.ALWAYS_SENSITIVE,
            "never_extractable": Attribute.NEVER_EXTRACTABLE,
            "local": Attribute.LOCAL,
        }
        values: dict[str, bool] = self._owner._call(
            f"attribute read of {self.label!r}",
            lambda _session: {name: bool(self._private[a]) for name, a in names.items()},
        )
        return values

    def close(self) -> None:
        """Nothing to release per key; close the backend to end the session."""

    def __enter__(self) -> Pkcs11Signer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Pkcs11Signer {self.label!r} on {self._owner.token_label!r}>"


class Pkcs11Backend:
    """A logged-in read-write session on the token labelled ``token_label``.

    The user PIN comes from the environment variable ``pin_env`` or, if ``pin_file`` is
    given, from that file (first line; must not be world-readable).
    """

    def __init__(
        self,
        module_path: str,
        token_label: str,
        pin_env: str = DEFAULT_PIN_ENV,
        pin_file: str | os.PathLike[str] | None = None,
    ) -> None:
        self.module_path = module_path
        self.token_label = token_label
        self._where = f"token {token_label!r} ({module_path})"
        self._shared: _SharedLogin | None = None
        pin = _read_pin(pin_env, pin_file)
        lib = _load_module(module_path)
        key = (os.path.realpath(module_path), token_label)
        tag = _pin_tag(pin)
        with _registry_lock:
            shared = _registry.get(key)
            if shared is not None:
                if not secrets.compare_digest(shared.pin_tag, tag):
                    raise KeyBackendError(
                        f"PKCS#11 login on {self._where}: the PIN differs from the one this "
                        "process already logged in with",
                        Reason.WRONG_PIN,
                    )
            else:
                try:
                    token = self._find_token(lib, key[0], token_label)
                    session = token.open(rw=True, user_pin=pin)
                except Exception as exc:
                    raise _translate(exc, "login", self._where) from exc
                shared = _SharedLogin(key, session, tag)
                _registry[key] = shared
            shared.users += 1
            self._shared = shared
        del pin

    @staticmethod
    def _find_token(lib: Any, module: str, token_label: str) -> Any:
        try:
            return lib.get_token(token_label=token_label)
        except (p11e.NoSuchToken, p11e.GeneralError, p11e.TokenNotPresent):
            # SoftHSM2 scans its token directory only at C_Initialize: a token created by
            # another process since then is missing, and one deleted since then makes the
            # slot scan fail (CKR_GENERAL_ERROR). A re-initialisation fixes both, but ends
            # open sessions, so do it only while this process has none on the module.
            if any(k[0] == module for k in _registry):
                raise
            lib.reinitialize()
            return lib.get_token(token_label=token_label)

    # -- lifecycle ------------------------------------------------------------------

    def close(self) -> None:
        """Release this backend's share of the session; the last one logs out."""
        shared, self._shared = self._shared, None
        if shared is None:
            return
        with _registry_lock:
            shared.users -= 1
            if shared.users > 0:
                return
            if _registry.get(shared.key) is shared:
                del _registry[shared.key]
        with shared.lock:
            if shared.valid:
                shared.valid = False
                with contextlib.suppress(Exception):  # the token may be gone already
                    shared.session.close()

    def __enter__(self) -> Pkcs11Backend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Pkcs11Backend {self._where}>"

    def _call(self, doing: str, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn(session)`` under the token's lock, translating library errors."""
        shared = self._shared
        if shared is None:
            raise StateError("the PKCS#11 backend is closed", Reason.INVALID_STATE)
        with shared.lock:
            if not shared.valid:
                raise KeyBackendError(
                    f"PKCS#11 {doing}: the session on {self._where} ended (module "
                    "re-initialised or token removed); open a new backend",
                    Reason.BACKEND_UNAVAILABLE,
                )
            try:
                return fn(shared.session)
            except Exception as exc:
                raise _translate(exc, doing, self._where) from exc

    # -- keys -----------------------------------------------------------------------

    def _find(self, session: Any, label: str, object_class: ObjectClass) -> list[Any]:
        return list(
            session.get_objects(
                {
                    Attribute.CLASS: object_class,
                    Attribute.KEY_TYPE: KeyType.EC,
                    Attribute.LABEL: label,
                }
            )
        )

    @staticmethod
    def _check_label(label: str) -> str:
        if not isinstance(label, str) or not label or len(label.encode()) > 64:
            raise StateError("PKCS#11 key label must be 1-64 bytes of text", Reason.BAD_PARAMETERS)
        return label

    def generate_signing_key(self, label: str) -> Pkcs11Signer:
        """Generate an EC P-256 key pair on the token: sensitive, never extractable."""
        self._check_label(label)

        def generate(session: Any) -> tuple[Any, Any]:
            if self._find(session, label, ObjectClass.PRIVATE_KEY):
                raise KeyBackendError(
                    f"a private key labelled {label!r} already exists on {self._where}; "
                    "load it, or pick another label",
                    Reason.BAD_PARAMETERS,
                )
            key_id = secrets.token_bytes(16)
            params = session.create_domain_parameters(
                KeyType.EC, {Attribute.EC_PARAMS: _P256_PARAMS}, local=True
            )
            public, private = params.generate_keypair(
                store=True,
                label=label,
                id=key_id,
                public_template={
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: False,
                    Attribute.VERIFY: True,
                },
                private_template={
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: True,
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.SIGN: True,
                    Attribute.DECRYPT: False,
                    Attribute.DERIVE: False,
                },
            )
            return private, public

        private, public = self._call(f"key generation of {label!r}", generate)
        return Pkcs11Signer(self, label, private, public)

    def load_signing_key(self, label: str) -> Pkcs11Signer:
        """Open the EC P-256 key pair labelled ``label``; KEY_NOT_FOUND if absent."""
        self._check_label(label)

        def load(session: Any) -> tuple[Any, Any]:
            privates = self._find(session, label, ObjectClass.PRIVATE_KEY)
            if not privates:
                raise KeyBackendError(
                    f"no EC private key labelled {label!r} on {self._where}; generate it "
                    "with generate_signing_key",
                    Reason.KEY_NOT_FOUND,
                )
            if len(privates) > 1:
                raise KeyBackendError(
                    f"{len(privates)} private keys are labelled {label!r} on {self._where}; "
                    "labels must be unique",
                    Reason.BAD_PARAMETERS,
                )
            private = privates[0]
            publics = self._find(session, label, ObjectClass.PUBLIC_KEY)
            key_id = private[Attribute.ID]
            publics = [p for p in publics if p[Attribute.ID] == key_id] or publics
            if len(publics) != 1:
                raise KeyBackendError(
                    f"expected one public key labelled {label!r} next to the private key "
                    f"on {self._where}, found {len(publics)}",
                    Reason.KEY_NOT_FOUND,
                )
            if bytes(private[Attribute.EC_PARAMS]) != _P256_PARAMS:
                raise KeyBackendError(
                    f"PKCS#11 key {label!r} is not a P-256 key", Reason.BAD_PARAMETERS
                )
            if not private[Attribute.SENSITIVE] or private[Attribute.EXTRACTABLE]:
                raise KeyBackendError(
                    f"PKCS#11 key {label!r} is exportable (CKA_SENSITIVE false or "
                    "CKA_EXTRACTABLE true); Tessera only uses keys that cannot leave the token",
                    Reason.BAD_PARAMETERS,
                )
            return private, publics[0]

        private, public = self._call(f"key lookup of {label!r}", load)
        return Pkcs11Signer(self, label, private, public)

    def get_or_create_signing_key(self, label: str) -> Pkcs11Signer:
        signer, _ = self.get_or_create_signing_key_ex(label)
        return signer

    def get_or_create_signing_key_ex(self, label: str) -> tuple[Pkcs11Signer, bool]:
        """The key labelled ``label``, generated if absent; and whether it was generated
        here (a caller that fails afterwards removes only a key it created)."""
        try:
            return self.load_signing_key(label), False
        except KeyBackendError as exc:
            if exc.reason != Reason.KEY_NOT_FOUND:
                raise
        return self.generate_signing_key(label), True

    def delete_signing_key(self, label: str) -> int:
        """Destroy the EC key pair labelled ``label`` (private and public objects): the
        undo of :meth:`generate_signing_key` when the operation it was made for failed.
        Returns how many objects were destroyed (0 if there was none)."""
        self._check_label(label)

        def destroy(session: Any) -> int:
            objects = self._find(session, label, ObjectClass.PRIVATE_KEY)
            objects += self._find(session, label, ObjectClass.PUBLIC_KEY)
            for obj in objects:
                obj.destroy()
            return len(objects)

        count: int = self._call(f"removal of key {label!r}", destroy)
        return count

    def random(self, n: int) -> bytes:
        """``n`` bytes from the token's random number generator (C_GenerateRandom)."""
        if not isinstance(n, int) or n < 0:
            raise StateError("random(n) needs n >= 0", Reason.BAD_PARAMETERS)
        if n == 0:
            return b""
        return bytes(self._call("C_GenerateRandom", lambda session: session.generate_random(n * 8)))
