"""SA1 with real hardware stand-ins: the device key in swtpm, the broker key in SoftHSM2."""

from __future__ import annotations

import pytest

from hw.pkcs11 import Pkcs11Backend
from hw.tpm import TpmBackend
from simulator.fleet import NOW, Fleet
from structauth.errors import CredentialError, Reason, VerificationFailed
from structauth.handshake import Initiator, Responder
from structauth.session import SessionState
from tests.support import FakeClock, SessionPair

TOPIC = b"devices/tpm-1/telemetry"


@pytest.fixture
def pair_parts(tpm_backend: TpmBackend, pkcs11_token: Pkcs11Backend):  # type: ignore[no-untyped-def]
    fleet = Fleet()
    device_key = tpm_backend.get_or_create_signing_key("device")
    broker_key = pkcs11_token.get_or_create_signing_key("broker")
    device = fleet.member("device", "tpm-1", signer=device_key)
    broker = fleet.member("broker", "hsm-1", signer=broker_key)
    return fleet, device, broker


def test_swtpm_initiator_softhsm_responder(pair_parts) -> None:  # type: ignore[no-untyped-def]
    fleet, device, broker = pair_parts
    assert device.signer.backend == "tpm" and broker.signer.backend == "pkcs11"
    clock = FakeClock()
    ini = Initiator(
        signer=device.signer,
        credential=device.credential,
        trust=fleet.trust,
        expected_peer=broker.identity,
    )
    res = Responder(signer=broker.signer, credential=broker.credential, trust=fleet.trust)
    answered = res.accept(ini.start(), clock.now, NOW)
    done = ini.receive(answered.reply, clock.now, NOW)
    pair = SessionPair(done.session, answered.session, clock)
    for i in range(5):
        h, b = pair.up(TOPIC, b"%d" % i)
        assert pair.responder.verify(h, TOPIC, b, clock.now).payload == b"%d" % i
    assert pair.responder.state is SessionState.ESTABLISHED
    h, b = pair.down(b"devices/tpm-1/commands/x", b"ok")
    assert pair.initiator.verify(h, b"devices/tpm-1/commands/x", b, clock.now).payload == b"ok"


def test_credential_for_other_tpm_key_refused(pair_parts, tpm_backend: TpmBackend) -> None:  # type: ignore[no-untyped-def]
    """A device presenting a credential issued for a different TPM key fails the
    signature check: possession of the hardware key is what the handshake proves."""
    fleet, device, broker = pair_parts
    other = tpm_backend.get_or_create_signing_key("other")
    ini = Initiator(signer=other, credential=device.credential, trust=fleet.trust)
    res = Responder(signer=broker.signer, credential=broker.credential, trust=fleet.trust)
    with pytest.raises(VerificationFailed) as exc:
        res.accept(ini.start(), 0.0, NOW)
    assert exc.value.reason is Reason.BAD_SIGNATURE


def test_revoked_tpm_device_refused(pair_parts) -> None:  # type: ignore[no-untyped-def]
    fleet, device, broker = pair_parts
    ini = Initiator(signer=device.signer, credential=device.credential, trust=fleet.trust)
    res = Responder(signer=broker.signer, credential=broker.credential, trust=fleet.trust)
    with pytest.raises(CredentialError) as exc:
        res.accept(
            ini.start(), 0.0, NOW, revoked=lambda c: c.fingerprint == device.credential.fingerprint
        )
    assert exc.value.reason is Reason.CREDENTIAL_REVOKED
