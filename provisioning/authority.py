"""The fleet authority: the CA that issues every device and broker credential.

An authority is a directory::

    authority.toml   trust domain and where the signing key is (never a PIN)
    root.pem         the self-signed root: the trust bundle devices and brokers get

The signing key lives in a PKCS#11 token (an HSM; SoftHSM2 in tests), generated there
as sensitive and not extractable. A PEM file key exists for development only, behind
an explicit ``insecure_file_key=True``; it logs a warning every time it is used and the
configuration says ``insecure-file-key``.

Every certificate and CRL is signed through :class:`structauth.keys.Signer` (see
:mod:`provisioning.certificates`) and verified with the root's public key before it is
returned. All times are passed in by the caller; nothing here reads a clock.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
import os
import re
import shutil
import tempfile
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from hw.software import InsecureSoftwareSigner
from provisioning.certificates import (
    PROFILES,
    issue_credential,
    make_authority,
    sign_crl,
)
from structauth.credentials import Identity, TrustStore
from structauth.errors import (
    ConfigurationError,
    CredentialError,
    Reason,
    StateError,
    TesseraError,
)
from structauth.keys import Signer

if TYPE_CHECKING:
    from hw.pkcs11 import Pkcs11Backend

__all__ = [
    "CONFIG_FILE",
    "DEFAULT_KEY_LABEL",
    "DEFAULT_PIN_ENV",
    "DEFAULT_VALIDITY",
    "FILE_KEY",
    "INSECURE_FILE_KEY",
    "ROOT_FILE",
    "AuthorityConfig",
    "FleetAuthority",
]

log = logging.getLogger(__name__)

CONFIG_FILE = "authority.toml"
ROOT_FILE = "root.pem"
FILE_KEY = "authority-key.pem"
CONFIG_VERSION = 1
DEFAULT_PIN_ENV = "TESSERA_PKCS11_PIN"  # the same default as hw.pkcs11
DEFAULT_KEY_LABEL = "tessera-authority"
DEFAULT_VALIDITY = dt.timedelta(days=3652)  # ten years
PKCS11 = "pkcs11"
INSECURE_FILE_KEY = "insecure-file-key"

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_MAX_SERIAL = 1 << 159  # RFC 5280 4.1.2.2: positive, at most 20 octets


# -- configuration -----------------------------------------------------------------


def _check_trust_domain(trust_domain: object) -> str:
    """The trust domain, if ``Identity`` would accept it; else ConfigurationError."""
    if not isinstance(trust_domain, str):
        raise ConfigurationError("the trust domain must be a string such as 'fleet.example'")
    try:
        probe = Identity.parse(f"spiffe://{trust_domain}/device/probe")
    except CredentialError:
        probe = None
    if probe is None or probe.trust_domain != trust_domain:
        raise ConfigurationError(
            f"bad trust domain {trust_domain!r}: use 1-255 of lower-case letters, digits, "
            "'.', '-', '_', not starting or ending with '.' (e.g. 'fleet.example')"
        )
    return trust_domain


def _toml_string(value: str) -> str:
    out = ['"']
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


@dataclass(frozen=True)
class AuthorityConfig:
    """What ``authority.toml`` records. It never holds a PIN or key material."""

    trust_domain: str
    root_sha256: str
    key_backend: str  # PKCS11 or INSECURE_FILE_KEY
    module: str | None = None
    token_label: str | None = None
    key_label: str | None = None
    pin_env: str | None = None
    pin_file: str | None = None
    key_file: str | None = None

    def to_toml(self) -> str:
        lines = [
            "# Tessera fleet authority (written by FleetAuthority.init; holds no secrets)",
            f"version = {CONFIG_VERSION}",
            f"trust_domain = {_toml_string(self.trust_domain)}",
            f"root_sha256 = {_toml_string(self.root_sha256)}",
            "",
            "[key]",
            f"backend = {_toml_string(self.key_backend)}",
        ]
        fields = {
            "module": self.module,
            "token_label": self.token_label,
            "key_label": self.key_label,
            "pin_env": self.pin_env,
            "pin_file": self.pin_file,
            "path": self.key_file,
        }
        lines += [f"{k} = {_toml_string(v)}" for k, v in fields.items() if v is not None]
        text = "\n".join(lines) + "\n"
        if AuthorityConfig.from_toml(text, "generated configuration") != self:
            raise ConfigurationError("authority configuration does not survive a round trip")
        return text

    @classmethod
    def from_toml(cls, text: str, where: str) -> AuthorityConfig:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigurationError(f"{where} is not valid TOML: {exc}") from None

        def text_field(table: dict[str, Any], name: str, required: bool) -> str | None:
            value = table.get(name)
            if value is None and not required:
                return None
            if not isinstance(value, str) or not value:
                raise ConfigurationError(f"{where}: {name!r} must be a non-empty string")
            return value

        if data.get("version") != CONFIG_VERSION:
            raise ConfigurationError(
                f"{where}: unsupported version {data.get('version')!r} (expected {CONFIG_VERSION})"
            )
        trust_domain = _check_trust_domain(data.get("trust_domain"))
        root_sha256 = text_field(data, "root_sha256", True)
        key = data.get("key")
        if not isinstance(key, dict):
            raise ConfigurationError(f"{where}: missing [key] table")
        backend = text_field(key, "backend", True)
        assert root_sha256 is not None
        if backend == PKCS11:
            pin_env = text_field(key, "pin_env", True)
            assert pin_env is not None
            if not _ENV_NAME.fullmatch(pin_env):
                raise ConfigurationError(f"{where}: pin_env {pin_env!r} is not a variable name")
            return cls(
                trust_domain,
                root_sha256,
                PKCS11,
                module=text_field(key, "module", True),
                token_label=text_field(key, "token_label", True),
                key_label=text_field(key, "key_label", True),
                pin_env=pin_env,
                pin_file=text_field(key, "pin_file", False),
            )
        if backend == INSECURE_FILE_KEY:
            return cls(
                trust_domain, root_sha256, INSECURE_FILE_KEY, key_file=text_field(key, "path", True)
            )
        raise ConfigurationError(
            f"{where}: key backend {backend!r} is not {PKCS11!r} or {INSECURE_FILE_KEY!r}"
        )


# -- writing an authority directory in one step ------------------------------------


def _write_file(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


Writer = bytes | Callable[[Path], object]


def _install(directory: Path, staged: Sequence[tuple[str, Writer, int]]) -> None:
    """Put files into ``directory`` all or nothing.

    ``staged`` is ``(name, bytes or a function that writes the file, mode)``; the last
    entry is
    the marker that makes the directory an authority. Each file is written in a private
    staging directory first and then hard-linked into place, which fails rather than
    replace a file that appeared meanwhile. On any error every file placed and every
    directory created is removed again.
    """
    created: list[Path] = []
    placed: list[Path] = []
    staging: Path | None = None
    try:
        missing = []
        p = directory
        while not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            d.mkdir(mode=0o700)
            created.append(d)
        staging = Path(tempfile.mkdtemp(prefix=".authority-init-", dir=directory))
        for name, data, mode in staged:
            if isinstance(data, bytes):
                _write_file(staging / name, data, mode)
            else:
                data(staging / name)
                os.chmod(staging / name, mode)
        _fsync_dir(staging)
        for name, _, _ in staged:
            target = directory / name
            try:
                os.link(staging / name, target)
            except FileExistsError:
                raise ConfigurationError(
                    f"{target} appeared while the authority was being created; nothing was "
                    "changed, check who else writes to this directory"
                ) from None
            placed.append(target)
        _fsync_dir(directory)
    except BaseException:
        for target in reversed(placed):
            target.unlink(missing_ok=True)
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        for d in reversed(created):
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    shutil.rmtree(staging, ignore_errors=True)


def _remove_key(backend: Pkcs11Backend, label: str) -> None:
    """Best effort: the undo runs while another error is on its way to the operator."""
    try:
        backend.delete_signing_key(label)
    except Exception as exc:  # the first error is the one to report
        log.warning("could not remove key %r generated by a failed init: %s", label, exc)


def _check_aware(name: str, value: object) -> dt.datetime:
    if not isinstance(value, dt.datetime) or value.utcoffset() is None:
        raise StateError(f"{name} must be a timezone-aware datetime", Reason.BAD_PARAMETERS)
    return value


def _spki(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _insecure_warning(where: str) -> None:
    log.warning(
        "fleet authority %s uses an insecure-file-key: its signing key is an unencrypted "
        "PEM file, not a PKCS#11 token; anyone who reads it can mint device identities. "
        "Development only.",
        where,
    )


# -- the authority ---------------------------------------------------------------------


class FleetAuthority:
    """An open fleet authority: its root certificate and a signer for its key.

    Build one with :meth:`init` (a new authority) or :meth:`open` (an existing one);
    :meth:`close` it (or use ``with``) to end the PKCS#11 session.
    """

    def __init__(
        self,
        directory: Path,
        config: AuthorityConfig,
        root: x509.Certificate,
        signer: Signer,
        backend: Pkcs11Backend | None,
    ) -> None:
        self._directory = directory
        self._config = config
        root_key = root.public_key()
        if not isinstance(root_key, ec.EllipticCurvePublicKey):
            raise ConfigurationError("the fleet authority root must hold an EC key")
        self._root = root
        self._root_key = root_key
        self._signer = signer
        self._backend = backend
        self._closed = False
        self._created_key = False  # set by init when it generated the token key

    # -- construction -------------------------------------------------------------

    @classmethod
    def init(
        cls,
        directory: str | os.PathLike[str],
        trust_domain: str,
        *,
        pkcs11_module: str | None,
        token_label: str | None,
        key_label: str = DEFAULT_KEY_LABEL,
        pin_env: str = DEFAULT_PIN_ENV,
        pin_file: str | os.PathLike[str] | None = None,
        insecure_file_key: bool = False,
        now: dt.datetime,
        validity: dt.timedelta = DEFAULT_VALIDITY,
        remove_new_key_on_failure: bool = False,
    ) -> FleetAuthority:
        """Create a new authority in ``directory`` (created if missing).

        The signing key is generated on the PKCS#11 token ``token_label`` of module
        ``pkcs11_module`` under ``key_label`` (an existing key with that label is used,
        so an init that failed after generating the key can simply be repeated). The
        user PIN comes from the environment variable ``pin_env`` or from ``pin_file``;
        the configuration records where, never the PIN. With ``insecure_file_key=True``
        (development only) the key is a PEM file in the directory instead.

        Nothing is written unless everything succeeded: a refused or failed init leaves
        the directory as it was. A key it generated stays on the token for a retry,
        unless ``remove_new_key_on_failure`` (``tessera init``: all or nothing, the token
        included; :meth:`discard` undoes a successful init the caller cannot complete).
        """
        trust_domain = _check_trust_domain(trust_domain)
        _check_aware("now", now)
        if not isinstance(validity, dt.timedelta) or validity <= dt.timedelta(0):
            raise StateError("validity must be a positive timedelta", Reason.BAD_PARAMETERS)
        if insecure_file_key and (pkcs11_module or token_label):
            raise ConfigurationError(
                "choose one place for the authority key: a PKCS#11 token (pkcs11_module and "
                "token_label) or insecure_file_key, not both"
            )
        if not insecure_file_key:
            if not pkcs11_module or not token_label:
                raise ConfigurationError(
                    "the authority key belongs in a PKCS#11 token: give the module path and "
                    "the token label (CLI: --pkcs11-module /usr/lib/softhsm/libsofthsm2.so "
                    f"--token <label>, PIN from ${pin_env} or --pin-file); for development "
                    "only, pass insecure_file_key=True (--insecure-file-key) to keep the key "
                    "in a PEM file"
                )
            if not _ENV_NAME.fullmatch(pin_env):
                raise ConfigurationError(f"pin_env {pin_env!r} is not an environment variable name")

        path = Path(directory)
        cls._refuse_existing(path)

        backend: Pkcs11Backend | None = None
        signer: Signer
        created_key = False
        try:
            software: InsecureSoftwareSigner | None = None
            if insecure_file_key:
                _insecure_warning(str(path))
                signer = software = InsecureSoftwareSigner.generate()
            else:
                assert pkcs11_module is not None and token_label is not None
                backend, signer, created_key = cls._open_pkcs11(
                    pkcs11_module, token_label, key_label, pin_env, pin_file, create=True
                )
            root = make_authority(trust_domain, signer, not_before=now, not_after=now + validity)
            root_pem = root.public_bytes(Encoding.PEM)
            config = AuthorityConfig(
                trust_domain=trust_domain,
                root_sha256=hashlib.sha256(root.public_bytes(Encoding.DER)).hexdigest(),
                key_backend=INSECURE_FILE_KEY if insecure_file_key else PKCS11,
                module=None if insecure_file_key else os.path.abspath(str(pkcs11_module)),
                token_label=None if insecure_file_key else token_label,
                key_label=None if insecure_file_key else key_label,
                pin_env=None if insecure_file_key else pin_env,
                pin_file=(
                    os.path.abspath(pin_file)
                    if pin_file is not None and not insecure_file_key
                    else None
                ),
                key_file=FILE_KEY if insecure_file_key else None,
            )
            staged: list[tuple[str, Writer, int]] = [(ROOT_FILE, root_pem, 0o644)]
            if software is not None:
                staged.append((FILE_KEY, software.save, 0o600))  # PKCS#8 PEM, mode 0600
            staged.append((CONFIG_FILE, config.to_toml().encode(), 0o644))
            _install(path, staged)
        except BaseException:
            if backend is not None:
                if created_key and remove_new_key_on_failure:
                    _remove_key(backend, key_label)
                backend.close()
            raise
        log.info(
            "fleet authority for %s created in %s (key: %s)", trust_domain, path, signer.backend
        )
        authority = cls(path, config, root, signer, backend)
        authority._created_key = created_key
        return authority

    @staticmethod
    def _refuse_existing(path: Path) -> None:
        if path.exists() and not path.is_dir():
            raise ConfigurationError(f"{path} exists and is not a directory")
        if (path / CONFIG_FILE).exists():
            raise ConfigurationError(
                f"{path} already holds a fleet authority ({CONFIG_FILE}); nothing was changed. "
                "Open it, or choose another directory"
            )
        for name in (ROOT_FILE, FILE_KEY):
            if (path / name).exists() or (path / name).is_symlink():
                raise ConfigurationError(
                    f"{path} holds {name} but no {CONFIG_FILE} (a foreign file, or left by "
                    "something else); nothing was changed. Move it away or choose another "
                    "directory"
                )

    @staticmethod
    def _open_pkcs11(
        module: str,
        token_label: str,
        key_label: str,
        pin_env: str,
        pin_file: str | os.PathLike[str] | None,
        *,
        create: bool,
    ) -> tuple[Pkcs11Backend, Signer, bool]:
        """The backend, the signer, and whether the key was generated just now."""
        from hw.pkcs11 import Pkcs11Backend

        backend = Pkcs11Backend(module, token_label, pin_env=pin_env, pin_file=pin_file)
        created = False
        try:
            if create:
                signer, created = backend.get_or_create_signing_key_ex(key_label)
            else:
                signer = backend.load_signing_key(key_label)
        except BaseException:
            backend.close()
            raise
        return backend, signer, created

    @classmethod
    def open(cls, directory: str | os.PathLike[str]) -> FleetAuthority:
        """Open the authority in ``directory``.

        A missing or damaged directory raises :class:`ConfigurationError`; key backend
        failures (wrong PIN, token or key missing) raise :class:`KeyBackendError`.
        """
        path = Path(directory)
        config_path = path / CONFIG_FILE
        try:
            text = config_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigurationError(
                f"{path} holds no fleet authority (no {CONFIG_FILE}); create one with "
                f"'tessera init --dir {path}'"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigurationError(f"cannot read {config_path}: {exc}") from None
        config = AuthorityConfig.from_toml(text, str(config_path))
        root = cls._load_root(path / ROOT_FILE, config)

        backend: Pkcs11Backend | None = None
        signer: Signer
        if config.key_backend == PKCS11:
            assert config.module and config.token_label and config.key_label and config.pin_env
            backend, signer, _ = cls._open_pkcs11(
                config.module,
                config.token_label,
                config.key_label,
                config.pin_env,
                config.pin_file,
                create=False,
            )
        else:
            assert config.key_file is not None
            _insecure_warning(str(path))
            signer = InsecureSoftwareSigner.load(path / config.key_file)
        try:
            root_key = root.public_key()
            assert isinstance(root_key, ec.EllipticCurvePublicKey)  # checked by _load_root
            if _spki(signer.public_key()) != _spki(root_key):
                raise ConfigurationError(
                    f"the authority key ({signer.backend}) does not match {path / ROOT_FILE}: "
                    "the configuration names the wrong key or the root was replaced"
                )
        except BaseException:
            if backend is not None:
                backend.close()
            raise
        return cls(path, config, root, signer, backend)

    @staticmethod
    def _load_root(root_path: Path, config: AuthorityConfig) -> x509.Certificate:
        try:
            pem = root_path.read_bytes()
        except FileNotFoundError:
            raise ConfigurationError(
                f"{root_path} is missing; the authority directory is damaged"
            ) from None
        except OSError as exc:
            raise ConfigurationError(f"cannot read {root_path}: {exc.strerror}") from None
        try:
            certs = x509.load_pem_x509_certificates(pem)
        except ValueError:
            raise ConfigurationError(f"{root_path} is not a PEM certificate") from None
        if len(certs) != 1:
            raise ConfigurationError(f"{root_path} must hold exactly one certificate")
        root = certs[0]
        der = root.public_bytes(Encoding.DER)
        if hashlib.sha256(der).hexdigest() != config.root_sha256:
            raise ConfigurationError(
                f"{root_path} is not the root this authority created (SHA-256 differs from "
                f"{CONFIG_FILE})"
            )
        key = root.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise ConfigurationError(f"{root_path} does not hold an EC root")
        try:
            TrustStore([root], config.trust_domain)  # an EC CA certificate
            algorithm = root.signature_hash_algorithm
            if algorithm is None:
                raise InvalidSignature
            key.verify(root.signature, root.tbs_certificate_bytes, ec.ECDSA(algorithm))
        except (TesseraError, InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
            raise ConfigurationError(f"{root_path} is not a self-signed CA certificate") from None
        return root

    # -- properties ----------------------------------------------------------------

    @property
    def directory(self) -> Path:
        return self._directory

    @property
    def config(self) -> AuthorityConfig:
        return self._config

    @property
    def trust_domain(self) -> str:
        return self._config.trust_domain

    @property
    def root(self) -> x509.Certificate:
        return self._root

    @property
    def signer(self) -> Signer:
        return self._signer

    @property
    def insecure(self) -> bool:
        """True when the key is an insecure file key (development only)."""
        return self._config.key_backend == INSECURE_FILE_KEY

    def trust_store(self) -> TrustStore:
        """A verifier that accepts credentials of this authority's trust domain."""
        return TrustStore([self._root], self.trust_domain)

    def bundle_pem(self) -> bytes:
        """The trust bundle for devices and brokers: the root certificate, plain PEM."""
        return self._root.public_bytes(Encoding.PEM)

    # -- issuing -------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StateError("the fleet authority is closed", Reason.INVALID_STATE)

    def issue(
        self,
        public_key: ec.EllipticCurvePublicKey,
        identity: Identity,
        *,
        not_before: dt.datetime,
        not_after: dt.datetime,
        serial: int | None = None,
        profile: str = "enrollment",
    ) -> x509.Certificate:
        """Issue a leaf credential naming ``identity`` for ``public_key`` (P-256).

        ``profile`` is "enrollment" (the device's long-lived identity) or "operational"
        (short-lived, renewed); it is the subject's organizational unit. A credential
        never outlives the authority: ``not_after`` is capped at the root's end of
        validity.
        """
        self._check_open()
        if not isinstance(identity, Identity):
            raise StateError("identity must be a structauth Identity", Reason.BAD_PARAMETERS)
        if identity.trust_domain != self.trust_domain:
            raise CredentialError(
                f"{identity} is outside this authority's trust domain {self.trust_domain}",
                Reason.WRONG_IDENTITY,
            )
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
            public_key.curve, ec.SECP256R1
        ):
            raise StateError("credential keys must be EC P-256 public keys", Reason.BAD_PARAMETERS)
        if profile not in PROFILES:
            raise StateError(
                f"profile must be one of {', '.join(PROFILES)}, not {profile!r}",
                Reason.BAD_PARAMETERS,
            )
        _check_aware("not_before", not_before)
        _check_aware("not_after", not_after)
        if not_after <= not_before:
            raise StateError("not_after must be after not_before", Reason.BAD_PARAMETERS)
        end = self._root.not_valid_after_utc
        if not_before >= end:
            raise StateError(
                f"the authority's root expires at {end}; it cannot issue from {not_before}",
                Reason.BAD_PARAMETERS,
            )
        if serial is not None and (
            not isinstance(serial, int) or isinstance(serial, bool) or not 0 < serial < _MAX_SERIAL
        ):
            raise StateError(
                "serial must be a positive integer below 2**159", Reason.BAD_PARAMETERS
            )
        return issue_credential(
            self._root,
            self._signer,
            public_key,
            identity,
            not_before=not_before,
            not_after=min(not_after, end),
            serial=serial,
            profile=profile,
        )

    def sign_crl(
        self,
        revoked: Sequence[tuple[int, dt.datetime]],
        *,
        now: dt.datetime,
        next_update: dt.datetime,
        crl_number: int,
    ) -> x509.CertificateRevocationList:
        """A CRL listing ``(serial, revocation time)`` pairs, signed and verified.

        A serial listed twice appears once, with its earliest revocation time.
        """
        self._check_open()
        _check_aware("now", now)
        _check_aware("next_update", next_update)
        if next_update <= now:
            raise StateError("next_update must be after now", Reason.BAD_PARAMETERS)
        if not isinstance(crl_number, int) or isinstance(crl_number, bool):
            raise StateError("crl_number must be an integer", Reason.BAD_PARAMETERS)
        if not 0 <= crl_number < _MAX_SERIAL:
            raise StateError("crl_number must be in [0, 2**159)", Reason.BAD_PARAMETERS)
        entries: dict[int, dt.datetime] = {}
        for serial, when in revoked:
            if not isinstance(serial, int) or isinstance(serial, bool) or serial <= 0:
                raise StateError(
                    f"revoked serial {serial!r} is not a positive integer", Reason.BAD_PARAMETERS
                )
            _check_aware("revocation time", when)
            if serial not in entries or when < entries[serial]:
                entries[serial] = when
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self._root.subject)
            .last_update(now)
            .next_update(next_update)
            .add_extension(x509.CRLNumber(crl_number), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._root_key),
                critical=False,
            )
        )
        for serial in sorted(entries):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(entries[serial])
                .build()
            )
        return sign_crl(builder, self._signer, issuer_public_key=self._root_key)

    # -- lifecycle -----------------------------------------------------------------

    def discard(self) -> None:
        """Undo :meth:`init` for a caller whose own later step failed (``tessera init``
        writing the registry or operators): remove the token key if this init generated
        it, then close. The caller removes the directory it staged the files in."""
        if self._created_key and self._backend is not None and not self._closed:
            label = self._config.key_label or DEFAULT_KEY_LABEL
            _remove_key(self._backend, label)
        self._created_key = False
        self.close()

    def close(self) -> None:
        """End the PKCS#11 session (the last user on the token logs out). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._backend is not None:
            self._backend.close()
        close = getattr(self._signer, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> FleetAuthority:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return (
            f"<FleetAuthority {self.trust_domain} in {self._directory} "
            f"({self._config.key_backend}){state}>"
        )
