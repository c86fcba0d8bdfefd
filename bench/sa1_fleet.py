"""A test fleet for benchmarks: an authority, a broker and a device, and real SA1 v2
handshakes (three messages).

Keys are ``hw.software.InsecureSoftwareSigner`` (in memory): the benchmarks compare
CPU cost like with like against TLS, whose server key is in memory too. A TPM or
PKCS#11 signature adds its own latency on top (the design brief measured swtpm 0.6 ms,
SoftHSM2 0.11 ms) and is measured by the hardware benchmarks, not here.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from hw.software import InsecureSoftwareSigner
from simulator.fleet import Fleet as TestFleet
from structauth.credentials import Credential, TimePolicy, TrustStore
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
            expected_peer=self.broker_credential.identity,
        )

    def session_pair(
        self, params: SessionParams | None = None, now: float = 1000.0
    ) -> tuple[Session, Session]:
        """(device session, broker session) from one real three-message SA1 handshake
        at ``now``: msg1, msg2, and the broker's session only once msg3 confirmed it."""
        responder = self.responder(params)
        initiator = self.initiator()
        msg1 = initiator.start()
        answered = responder.accept(msg1, now, self.broker_policy)
        completed = initiator.receive(answered.reply, now, self.device_policy)
        confirmed = responder.confirm(answered.pending, completed.reply, now)
        return completed.session, confirmed.session


def make_fleet() -> Fleet:
    now = dt.datetime.now(dt.UTC)
    not_before = now - dt.timedelta(hours=1)
    fleet = TestFleet(trust_domain=TRUST_DOMAIN, t0=not_before)
    broker = fleet.member("broker", "main", signer=InsecureSoftwareSigner.generate(), days=1)
    device = fleet.member("device", "pi-0042", signer=InsecureSoftwareSigner.generate(), days=1)
    assert isinstance(broker.signer, InsecureSoftwareSigner)
    assert isinstance(device.signer, InsecureSoftwareSigner)
    return Fleet(
        trust=fleet.trust,
        broker_signer=broker.signer,
        broker_credential=broker.credential,
        device_signer=device.signer,
        device_credential=device.credential,
        broker_policy=TimePolicy.trusted(now),
        device_policy=TimePolicy.unknown(floor=not_before),
    )
