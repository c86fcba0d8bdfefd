"""A test fleet for benchmarks: an authority, a broker and a device, and real SA1 handshakes.

Keys are ``hw.software.InsecureSoftwareSigner`` (in memory): the benchmarks compare
CPU cost like with like against TLS, whose server key is in memory too. A TPM or
PKCS#11 signature adds its own latency on top (see DESIGN.md: swtpm 0.6 ms, SoftHSM2
0.11 ms) and is measured by the hardware benchmarks, not here.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from hw.software import InsecureSoftwareSigner
from provisioning.certificates import issue_credential, make_authority
from structauth.credentials import Credential, Identity, TimePolicy, TrustStore
from structauth.handshake import Initiator, Responder
from structauth.params import SessionParams
from structauth.session import Session

TRUST_DOMAIN = "fleet.example"
DEVICE_ID = f"spiffe://{TRUST_DOMAIN}/device/pi-0042"
BROKER_ID = f"spiffe://{TRUST_DOMAIN}/broker/main"
#: a realistic MQTT topic for device telemetry
TOPIC = b"tessera/devices/pi-0042/telemetry/environment"


@dataclass
class Fleet:
    trust: TrustStore
    broker_signer: InsecureSoftwareSigner
    broker_credential: Credential
    device_signer: InsecureSoftwareSigner
    device_credential: Credential
    #: what the broker passes for credential time checks (it knows the time)
    broker_policy: TimePolicy
    #: what the device passes (no RTC: it only knows a lower bound on the time)
    device_policy: TimePolicy

    def responder(self, params: SessionParams | None = None) -> Responder:
        return Responder(
            signer=self.broker_signer,
            credential=self.broker_credential,
            trust=self.trust,
            params=params,
        )

    def initiator(self) -> Initiator:
        return Initiator(
            signer=self.device_signer,
            credential=self.device_credential,
            trust=self.trust,
        )

    def session_pair(
        self, params: SessionParams | None = None, now: float = 1000.0
    ) -> tuple[Session, Session]:
        """(device session, broker session) from one real SA1 handshake at ``now``."""
        responder = self.responder(params)
        initiator = self.initiator()
        msg1 = initiator.start()
        answered = responder.accept(msg1, now, self.broker_policy)
        completed = initiator.receive(answered.reply, now, self.device_policy)
        return completed.session, answered.session


def make_fleet() -> Fleet:
    now = dt.datetime.now(dt.UTC)
    not_before = now - dt.timedelta(hours=1)
    authority_key = ec.generate_private_key(ec.SECP256R1())
    authority = make_authority(
        TRUST_DOMAIN, authority_key, not_before=not_before, not_after=now + dt.timedelta(days=30)
    )

    def credential(signer: InsecureSoftwareSigner, identity: str) -> Credential:
        cert = issue_credential(
            authority,
            authority_key,
            signer.public_key(),
            Identity.parse(identity),
            not_before=not_before,
            not_after=now + dt.timedelta(days=1),
        )
        return Credential.from_der_chain([cert.public_bytes(Encoding.DER)])

    broker = InsecureSoftwareSigner.generate()
    device = InsecureSoftwareSigner.generate()
    return Fleet(
        trust=TrustStore([authority], TRUST_DOMAIN),
        broker_signer=broker,
        broker_credential=credential(broker, BROKER_ID),
        device_signer=device,
        device_credential=credential(device, DEVICE_ID),
        broker_policy=TimePolicy.trusted(now),
        device_policy=TimePolicy.unknown(floor=not_before),
    )
