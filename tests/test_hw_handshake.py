"""SA1 v2 with real hardware stand-ins: the device key in swtpm, the broker key in SoftHSM2."""

from __future__ import annotations

import pytest

from hw.pkcs11 import Pkcs11Backend
from hw.tpm import TpmBackend
from simulator.fleet import NOW, Fleet, Member
from structauth.errors import CredentialError, Reason, VerificationFailed
from structauth.handshake import Initiator, Responder
from structauth.session import SessionState
from tests.support import FakeClock, SessionPair

TOPIC = b"devices/tpm-1/telemetry"


@pytest.fixture
def pair_parts(
    tpm_backend: TpmBackend, pkcs11_token: Pkcs11Backend
) -> tuple[Fleet, Member, Member]:
    fleet = Fleet()
    device_key = tpm_backend.get_or_create_signing_key("device")
    broker_key = pkcs11_token.get_or_create_signing_key("broker")
    device = fleet.member("device", "tpm-1", signer=device_key)
    broker = fleet.member("broker", "hsm-1", signer=broker_key)
    return fleet, device, broker


def test_swtpm_initiator_softhsm_responder(pair_parts: tuple[Fleet, Member, Member]) -> None:
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
    answered = res.accept(ini.start(), clock.now, NOW)  # msg1 -> msg2
    done = ini.receive(answered.reply, clock.now, NOW)  # msg2 -> msg3
    assert done.peer == broker.identity
    confirmed = res.confirm(answered.pending, done.reply, clock.now)  # msg3
    assert confirmed.peer == device.identity
    pair = SessionPair(done.session, confirmed.session, clock)
    for i in range(5):
        h, b = pair.up(TOPIC, b"%d" % i)
        assert pair.responder.verify(h, TOPIC, b, clock.now).payload == b"%d" % i
    assert pair.responder.state is SessionState.ESTABLISHED
    h, b = pair.down(b"devices/tpm-1/commands/x", b"ok")
    assert pair.initiator.verify(h, b"devices/tpm-1/commands/x", b, clock.now).payload == b"ok"


def test_msg3_forged_with_hardware_peers(pair_parts: tuple[Fleet, Member, Member]) -> None:
    """The hardware signatures made msg1 and msg2 genuine; a msg3 MAC that is not the
    initiator's still grants nothing."""
    fleet, device, broker = pair_parts
    ini = Initiator(signer=device.signer, credential=device.credential, trust=fleet.trust,
                    expected_peer=broker.identity)
    res = Responder(signer=broker.signer, credential=broker.credential, trust=fleet.trust)
    answered = res.accept(ini.start(), 0.0, NOW)
    msg3 = ini.receive(answered.reply, 0.0, NOW).reply
    with pytest.raises(VerificationFailed) as exc:
        res.confirm(answered.pending, msg3[:-1] + bytes([msg3[-1] ^ 1]), 0.0)
    assert exc.value.reason is Reason.BAD_CONFIRMATION
    assert answered.pending.expired(0.0)


def test_credential_for_other_tpm_key_refused(
    pair_parts: tuple[Fleet, Member, Member], tpm_backend: TpmBackend
) -> None:
    """A device presenting a credential issued for a different TPM key fails the
    signature check: possession of the hardware key is what the handshake proves."""
    fleet, device, broker = pair_parts
    other = tpm_backend.get_or_create_signing_key("other")
    ini = Initiator(signer=other, credential=device.credential, trust=fleet.trust,
                    expected_peer=broker.identity)
    res = Responder(signer=broker.signer, credential=broker.credential, trust=fleet.trust)
    with pytest.raises(VerificationFailed) as exc:
        res.accept(ini.start(), 0.0, NOW)
    assert exc.value.reason is Reason.BAD_SIGNATURE
    assert len(res.nonces) == 0


def test_revoked_tpm_device_refused(pair_parts: tuple[Fleet, Member, Member]) -> None:
    fleet, device, broker = pair_parts
    ini = Initiator(signer=device.signer, credential=device.credential, trust=fleet.trust,
                    expected_peer=broker.identity)
    res = Responder(signer=broker.signer, credential=broker.credential, trust=fleet.trust)
    with pytest.raises(CredentialError) as exc:
        res.accept(
            ini.start(), 0.0, NOW, revoked=lambda c: c.fingerprint == device.credential.fingerprint
        )
    assert exc.value.reason is Reason.CREDENTIAL_REVOKED
    assert len(res.nonces) == 0
