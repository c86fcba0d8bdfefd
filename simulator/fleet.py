"""A throwaway fleet for tests, benchmarks and demos: an authority whose key is in
memory, and members whose signers are whatever the caller passes (swtpm, SoftHSM2, or
insecure software keys by default). Not for production: the provisioning service keeps
the authority key in a PKCS#11 token."""

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
    #: start of validity for the authority and, by default, for member credentials
    t0: dt.datetime = T0
    key: ec.EllipticCurvePrivateKey = field(init=False)
    root: x509.Certificate = field(init=False)
    trust: TrustStore = field(init=False)

    def __post_init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.root = make_authority(
            self.trust_domain,
            self.key,
            not_before=self.t0,
            not_after=self.t0 + dt.timedelta(days=3650),
        )
        self.trust = TrustStore([self.root], self.trust_domain)

    def credential_for(
        self,
        public_key: ec.EllipticCurvePublicKey,
        kind: str,
        name: str,
        *,
        days: int = 30,
        not_before: dt.datetime | None = None,
    ) -> Credential:
        identity = Identity.parse(f"spiffe://{self.trust_domain}/{kind}/{name}")
        if not_before is None:
            not_before = self.t0
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
