"""TPM enrollment attestation, device side: build the evidence, answer the challenge.

Two round trips with the provisioning service (see ``provisioning.attestation``)::

    service -> device   qualifying data: a fresh per-enrollment nonce
    device  -> service  TpmEvidence: EK certificate (+ intermediates), EK public area,
                        AK public area, device key public area, and a TPM2_Certify of the
                        device key by the AK whose extraData is the nonce
    service -> device   ActivationChallenge: MakeCredential to the EK, bound to the AK name
    device  -> service  the secret, which only ActivateCredential in this very TPM (the one
                        holding that EK and that AK) can recover

Everything here is bytes in, records out; the only IO is the TPM behind ``TpmBackend``.
The two records are the JSON contract both ends share, defined once in
:mod:`hw.tpm_evidence` (re-exported here for the device's callers).
"""

from __future__ import annotations

from collections.abc import Sequence

from hw.tpm import TpmBackend
from hw.tpm_evidence import MAX_INTERMEDIATES, ActivationChallenge, TpmEvidence
from structauth.errors import EnrollmentError, KeyBackendError, Reason, StateError

__all__ = [
    "DEFAULT_AK_NAME",
    "DEFAULT_KEY_NAME",
    "MAX_INTERMEDIATES",
    "ActivationChallenge",
    "TpmEvidence",
    "answer_challenge",
    "build_evidence",
]

DEFAULT_KEY_NAME = "tessera-device"
DEFAULT_AK_NAME = "tessera-ak"


def build_evidence(
    backend: TpmBackend,
    *,
    key_name: str = DEFAULT_KEY_NAME,
    ak_name: str = DEFAULT_AK_NAME,
    qualifying_data: bytes,
    ek_intermediates: Sequence[bytes] = (),
) -> TpmEvidence:
    """Create the device signing key and the AK if missing, and certify the key.

    ``qualifying_data`` is the service's nonce for this enrollment (1 to 64 bytes); the
    TPM puts it in the Certify's extraData. ``ek_intermediates``: DER certificates that
    link the EK certificate to its maker's root, when the device has them (most TPM
    makers publish them; the service may also be configured with them).
    """
    if not isinstance(qualifying_data, bytes) or not 1 <= len(qualifying_data) <= 64:
        raise StateError(
            "qualifying_data must be the service's nonce, 1 to 64 bytes", Reason.BAD_PARAMETERS
        )
    key = backend.get_or_create_signing_key(key_name)
    ak = backend.get_or_create_attestation_key(ak_name)
    attest, signature = backend.certify(key_name, ak_name, qualifying_data)
    return TpmEvidence(
        ek_certificate=backend.ek_certificate(),
        ek_public=backend.ek_public(),
        ak_public=ak.public_area_bytes(),
        key_public=key.public_area_bytes(),
        certify_attest=attest,
        certify_signature=signature,
        ek_intermediates=tuple(ek_intermediates),
    )


def answer_challenge(
    backend: TpmBackend, challenge: ActivationChallenge, *, ak_name: str = DEFAULT_AK_NAME
) -> bytes:
    """ActivateCredential with the EK and AK ``ak_name``: the secret the service sealed.

    Raises ``EnrollmentError(ACTIVATION_FAILED)`` when the TPM refuses the credential (it was
    made for another TPM's EK or for another AK); backend errors (TPM unreachable, AK
    missing) propagate as ``KeyBackendError``.
    """
    if not isinstance(challenge, ActivationChallenge):
        raise StateError(
            "challenge must be an ActivationChallenge (parse JSON with "
            "ActivationChallenge.from_json)",
            Reason.BAD_PARAMETERS,
        )
    try:
        return backend.activate_credential(
            ak_name, challenge.credential_blob, challenge.encrypted_secret
        )
    except KeyBackendError as exc:
        if exc.reason != Reason.BAD_PARAMETERS:
            raise
        raise EnrollmentError(
            f"the TPM refused the activation challenge: {exc.detail}", Reason.ACTIVATION_FAILED
        ) from exc
