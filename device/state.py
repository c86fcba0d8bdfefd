"""What an enrolled device keeps in its state directory, and how to open it.

    <state_dir>/agent.json        how to reach the key (TPM TCTI + key dir, or PKCS#11)
    <state_dir>/operational.pem   the short-lived operational credential
    <state_dir>/enrollment.pem    the long-lived enrollment credential
    <state_dir>/bundle.pem        the fleet's trust bundle
    <state_dir>/identity          the device's SPIFFE identity

Written by ``tessera-agent enroll`` (or the enrollment endpoint) and by renewals.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from structauth.credentials import Credential, TrustStore
from structauth.errors import ConfigurationError

DEVICE_KEY_NAME = "tessera-device"


@dataclass(frozen=True)
class DeviceState:
    directory: Path
    settings: dict[str, Any]

    @classmethod
    def load(cls, directory: Path) -> DeviceState:
        path = directory / "agent.json"
        try:
            settings: dict[str, Any] = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigurationError(
                f"{path} missing: enroll this device first ('tessera-agent enroll')"
            ) from None
        except ValueError as exc:
            raise ConfigurationError(f"{path} is not valid JSON: {exc}") from None
        if settings.get("backend") not in ("tpm", "pkcs11"):
            raise ConfigurationError(f"{path}: backend must be 'tpm' or 'pkcs11'")
        return cls(directory, settings)

    @property
    def serial(self) -> str:
        return str(self.settings["serial"])

    @property
    def provisioner(self) -> str | None:
        value = self.settings.get("provisioner")
        return str(value) if value else None

    def signer(self) -> Any:
        """The device's hardware key (a Signer; close() it when done)."""
        from hw import open_signer

        if self.settings["backend"] == "tpm":
            return open_signer(f"tpm:{self.settings['tcti']}#{DEVICE_KEY_NAME}",
                               key_dir=self.settings["key_dir"])
        return open_signer(f"pkcs11:{self.settings['pkcs11']}")

    def _read(self, name: str) -> bytes:
        try:
            return (self.directory / name).read_bytes()
        except FileNotFoundError:
            raise ConfigurationError(f"no {name} in {self.directory}: enroll first") from None

    def credential(self) -> Credential:
        return Credential.from_pem(self._read("operational.pem"))

    def trust(self) -> TrustStore:
        bundle = x509.load_pem_x509_certificates(self._read("bundle.pem"))
        return TrustStore(bundle, self.credential().identity.trust_domain)
