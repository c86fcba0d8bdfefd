"""A small test fleet: an authority and members with software keys (core tests only;
hardware tests use swtpm and SoftHSM2 keys through the same helpers)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from hw.software import InsecureSoftwareSigner
from provisioning.certificates import issue_credential, make_authority
from structauth.credentials import Credential, Identity, TimePolicy, TrustStore
from structauth.keys import Signer

TRUST_DOMAIN = "fleet.test"
T0 = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
NOW = TimePolicy.trusted(T0 + dt.timedelta(days=1))


@dataclass
class Member:
    signer: Signer
    credential: Credential

    @property
    def identity(self) -> Identity:
        return self.credential.identity


@dataclass
class Fleet:
    trust_domain: str = TRUST_DOMAIN
    seed: bytes = b"fleet"
    key: ec.EllipticCurvePrivateKey = field(init=False)
    root: x509.Certificate = field(init=False)
    trust: TrustStore = field(init=False)

    def __post_init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.root = make_authority(
            self.trust_domain, self.key, not_before=T0, not_after=T0 + dt.timedelta(days=3650)
        )
        self.trust = TrustStore([self.root], self.trust_domain)

    def credential_for(
        self,
        public_key: ec.EllipticCurvePublicKey,
        kind: str,
        name: str,
        *,
        days: int = 30,
        not_before: dt.datetime = T0,
    ) -> Credential:
        identity = Identity.parse(f"spiffe://{self.trust_domain}/{kind}/{name}")
        cert = issue_credential(
            self.root,
            self.key,
            public_key,
            identity,
            not_before=not_before,
            not_after=not_before + dt.timedelta(days=days),
        )
        return Credential.from_der_chain([cert.public_bytes(Encoding.DER)])

    def member(self, kind: str, name: str, signer: Signer | None = None, **kw: object) -> Member:
        signer = signer or InsecureSoftwareSigner.generate()
        return Member(signer, self.credential_for(signer.public_key(), kind, name, **kw))  # type: ignore[arg-type]
