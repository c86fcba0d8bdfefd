"""Session parameters chosen by the responder and carried in msg2."""

from __future__ import annotations

from dataclasses import dataclass

from . import wire
from .errors import MalformedMessage, Reason, StateError

#: encoded size of :class:`SessionParams` in msg2
PARAMS_SIZE = 4 + 1 + 4 + 1 + 2 + 32

FLAG_SEALED = 0x01


@dataclass(frozen=True)
class SessionParams:
    """What a session promises. Defaults suit MQTT telemetry on Pi-class devices.

    epoch_ms: length P of one epoch; keys ratchet once per epoch.
    skew_epochs: w, how many epochs either side of its own a receiver accepts; this is
        the tolerance for jitter, latency and clock drift, and also how long old keys
        are kept ((w+1)*P of history is forgeable by someone who captures memory).
    lifetime_s: L, the session ends after this; agents re-handshake before it.
    replay_window: how many sequence numbers behind the newest one are still accepted
        (once each); reordering deeper than this is rejected as a replay.
    sealed: payloads are AEAD-encrypted, not only tagged.
    policy_digest: SHA-256 of the policy the responder enforces, so a policy change is
        visible to the device and can trigger step-up.
    """

    epoch_ms: int = 10_000
    skew_epochs: int = 2
    lifetime_s: int = 3600
    replay_window: int = 1024
    sealed: bool = False
    policy_digest: bytes = bytes(32)

    def __post_init__(self) -> None:
        problem = self.problem()
        if problem:
            raise StateError(problem, Reason.BAD_PARAMETERS)

    def problem(self) -> str | None:
        if not 100 <= self.epoch_ms <= 3_600_000:
            return f"epoch_ms {self.epoch_ms} outside 100..3600000"
        if not 0 <= self.skew_epochs <= 16:
            return f"skew_epochs {self.skew_epochs} outside 0..16"
        if not 1 <= self.lifetime_s <= 7 * 86400:
            return f"lifetime_s {self.lifetime_s} outside 1..604800"
        if self.lifetime_s * 1000 // self.epoch_ms + self.skew_epochs >= 0xFFFF:
            return "lifetime_s / epoch length exceeds the 16-bit epoch counter"
        if not 32 <= self.replay_window <= 0xFFFF:
            return f"replay_window {self.replay_window} outside 32..65535"
        if len(self.policy_digest) != 32:
            return "policy_digest must be 32 bytes"
        return None

    @property
    def epoch_seconds(self) -> float:
        return self.epoch_ms / 1000.0

    def encode(self) -> bytes:
        return b"".join(
            (
                wire.u32(self.epoch_ms),
                wire.u8(self.skew_epochs),
                wire.u32(self.lifetime_s),
                wire.u8(FLAG_SEALED if self.sealed else 0),
                wire.u16(self.replay_window),
                self.policy_digest,
            )
        )

    @classmethod
    def read(cls, r: wire.Reader) -> SessionParams:
        epoch_ms = r.u32("epoch_ms")
        skew = r.u8("skew_epochs")
        lifetime = r.u32("lifetime_s")
        flags = r.u8("flags")
        window = r.u16("replay_window")
        digest = r.fixed(32, "policy_digest")
        if flags & ~FLAG_SEALED:
            raise MalformedMessage(f"msg2: unknown parameter flags {flags:#x}", Reason.MALFORMED)
        try:
            return cls(epoch_ms, skew, lifetime, window, bool(flags & FLAG_SEALED), digest)
        except StateError as exc:
            raise MalformedMessage(f"msg2: {exc.detail}", Reason.BAD_PARAMETERS) from None
