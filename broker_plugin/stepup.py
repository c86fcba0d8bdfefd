"""Step-up building blocks for the enforcer, without IO: settings, challenges, the
network memory, the per-identity rate baseline, the circuit breaker's counters and the
TPM quote check.

Step-up asks a connected device for fresh hardware proof. MQTT 5 lets only the client
start a re-authentication, so the broker sends a proven control message (topic
``tessera/step-up``) carrying a fresh nonce, and the device answers with an AUTH packet
(reason 0x19) whose SA1 msg1 has that nonce as its signed ``context`` (and a TPM quote
over it when asked). See :mod:`broker_plugin.enforcer` for the flow.

Quote format (the msg1 ``quote`` field, signed by the device key with the rest of msg1)::

    "TQ1" || var16 attest || var16 signature || var16 ak_public

``attest`` is the TPMS_ATTEST a TPM2_Quote returned, ``signature`` the attestation key's
DER ECDSA P-256 signature over SHA-256(attest), ``ak_public`` the AK's marshalled
TPM2B_PUBLIC. :func:`verify_quote` checks, in this order:

1. the blob parses strictly (no trailing bytes, sizes in range);
2. ``ak_public`` is an ECC NIST P-256 key with ECDSA/SHA-256, nameAlg SHA-256, and the
   attributes of an attestation key: fixedTPM, fixedParent, sensitiveDataOrigin,
   restricted, sign, not decrypt;
3. when the device's enrolled AK is known to the broker (``plugin_opt_attestation_keys``),
   ``ak_public`` has exactly that TPM name;
4. the AK's signature over ``attest`` verifies;
5. ``attest`` is TPM-generated (magic ``TPM_GENERATED_VALUE``), of type
   ``TPM_ST_ATTEST_QUOTE``, parses completely, and its ``extraData`` equals the nonce
   (constant-time).

What is NOT verified: the PCR values (there are no reference values; the selection and
``pcrDigest`` are returned for the audit record); ``qualifiedSigner`` (it is the AK's
*qualified* name, which needs the parent's name to recompute); the clock, reset and
restart counters and firmware version. Without an enrolled AK (step 3) the attributes in
``ak_public`` are the device's own claim: a party holding the device key but no TPM
could fabricate a "restricted" public area and sign its own attest, so the check then
proves only freshness and the device key's endorsement of the quote (msg1's signature),
not that a TPM produced it. With the enrolled AK (bound to the device key at enrollment
by TPM2_Certify and to the EK by credential activation) the quote is proven to come from
that device's TPM.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from structauth.errors import ConfigurationError, ProtocolError, Reason, TesseraError
from structauth.mqtt_binding import StepUpRequest, decode_quote  # shared with the device
from structauth.wire import Reader

# triggers (audit field ``trigger``)
SENSITIVE_TOPIC = "sensitive_topic"
NEW_NETWORK = "new_network"
RATE_SPIKE = "rate_spike"
POLICY_CHANGE = "policy_change"
KEY_CHANGE = "key_change"

# TPM 2.0 constants (TCG TPM 2.0 Library, Part 2)
TPM_GENERATED_VALUE = 0xFF544347
TPM_ST_ATTEST_QUOTE = 0x8018
TPM_ALG_ECC = 0x0023
TPM_ALG_SHA256 = 0x000B
TPM_ALG_NULL = 0x0010
TPM_ALG_ECDSA = 0x0018
TPM_ECC_NIST_P256 = 0x0003
ATTR_FIXED_TPM = 0x00000002
ATTR_FIXED_PARENT = 0x00000010
ATTR_SENSITIVE_DATA_ORIGIN = 0x00000020
ATTR_RESTRICTED = 0x00010000
ATTR_DECRYPT = 0x00020000
ATTR_SIGN = 0x00040000
AK_REQUIRED = (ATTR_FIXED_TPM | ATTR_FIXED_PARENT | ATTR_SENSITIVE_DATA_ORIGIN
               | ATTR_RESTRICTED | ATTR_SIGN)


@dataclass(frozen=True)
class StepUpSettings:
    """Every knob of step-up, quarantine and session rotation (host.py parses them from
    ``plugin_opt_*``; the defaults are conservative: they never lock out a device that
    answers its step-ups, and a device that does not is out within a minute)."""

    #: a device has this long to answer a step-up request before it is kicked
    deadline_s: float = 30.0
    #: after the deadline (kicked), a fresh CONNECT carrying the nonce still answers it
    reconnect_window_s: float = 60.0
    #: a step-up satisfies sensitive topics for this long (on that connection)
    fresh_s: float = 300.0
    #: after a re-authentication the previous session still verifies messages that name
    #: it this long: 30 s is (w+1)*P of the default session parameters, as long as the
    #: epoch window would have accepted a message proven just before the swap
    rotation_grace_s: float = 30.0
    #: after a policy or broker key/trust change, live sessions must step up within this
    change_grace_s: float = 60.0
    #: demand step-up from a device connecting from a network it has not used before
    new_network: bool = True
    new_network_quote: bool = False
    #: networks remembered per identity, and identities remembered (both LRU)
    networks_per_identity: int = 8
    max_identities: int = 100_000
    #: rate spike: a window's count above max(factor * baseline, min_rate) per second
    rate_spike: bool = True
    rate_factor: float = 10.0
    rate_min: float = 20.0
    rate_window_s: float = 10.0
    rate_alpha: float = 0.3
    rate_warmup_windows: int = 3
    #: circuit breaker: this many failed step-ups, or rejected messages, within the
    #: window quarantine the identity for quarantine_s (0 disables that count)
    quarantine_failures: int = 3
    quarantine_rejections: int = 500
    quarantine_window_s: float = 300.0
    quarantine_s: float = 600.0
    #: at most one ``tessera/resync`` request per session this often (a device whose
    #: messages are refused for their epoch is asked to re-handshake)
    resync_interval_s: float = 1.0


#: the step-up, quarantine and rotation knobs as Mosquitto plugin options
#: (``plugin_opt_<name>``): option -> (StepUpSettings field, kind, minimum). Public:
#: ``tessera broker-config`` checks options against it before the broker reads them.
STEP_UP_OPTIONS: dict[str, tuple[str, str, float]] = {
    "step_up_deadline_s": ("deadline_s", "seconds", 0.1),
    "step_up_reconnect_window_s": ("reconnect_window_s", "seconds", 0.0),
    "step_up_fresh_s": ("fresh_s", "seconds", 0.0),
    "step_up_change_grace_s": ("change_grace_s", "seconds", 0.1),
    "rotation_grace_s": ("rotation_grace_s", "seconds", 0.0),
    "step_up_new_network": ("new_network", "switch", 0),
    "step_up_new_network_quote": ("new_network_quote", "switch", 0),
    "network_memory": ("networks_per_identity", "count", 1),
    "max_identities": ("max_identities", "count", 1),
    "step_up_rate_spike": ("rate_spike", "switch", 0),
    "rate_factor": ("rate_factor", "number", 1.0),
    "rate_min": ("rate_min", "number", 0.0),
    "rate_window_s": ("rate_window_s", "seconds", 0.1),
    "quarantine_failures": ("quarantine_failures", "count", 0),
    "quarantine_rejections": ("quarantine_rejections", "count", 0),
    "quarantine_window_s": ("quarantine_window_s", "seconds", 0.1),
    "quarantine_s": ("quarantine_s", "seconds", 0.0),
    "resync_interval_s": ("resync_interval_s", "seconds", 0.0),
}


def parse_settings(options: dict[str, str]) -> StepUpSettings:
    """StepUpSettings from ``plugin_opt_*`` values; ConfigurationError with one line."""
    values: dict[str, object] = {}
    for option, (name, kind, minimum) in STEP_UP_OPTIONS.items():
        raw = options.get(option)
        if raw is None:
            continue
        text = raw.strip().lower()
        value: object
        try:
            if kind == "switch":
                if text not in ("on", "off", "true", "false", "yes", "no", "1", "0"):
                    raise ValueError
                value = text in ("on", "true", "yes", "1")
            elif kind == "count":
                value = int(text)
                if value < minimum:
                    raise ValueError
            else:
                value = float(text)
                if not value >= minimum or value == float("inf"):
                    raise ValueError
        except ValueError:
            want = {"switch": "on or off", "count": f"a whole number >= {minimum:g}",
                    "seconds": f"seconds >= {minimum:g}",
                    "number": f"a number >= {minimum:g}"}[kind]
            raise ConfigurationError(f"plugin_opt_{option}: {raw!r} is not {want}") from None
        values[name] = value
    return StepUpSettings(**values)  # type: ignore[arg-type]


@dataclass
class Challenge:
    """One outstanding step-up request, kept per identity (it outlives a kick)."""

    nonce: bytes
    quote: bool
    trigger: str
    detail: str
    issued_at: float
    deadline: float
    #: after this (deadline + reconnect window) the challenge is forgotten
    expires: float
    #: publishes are refused until it is answered (new network)
    blocking: bool = False
    #: the proven request went out under the session of this connection
    sent: bool = False
    #: kicked at the deadline already (so a reconnect without the nonce is re-asked)
    timed_out: bool = False

    def request(self, now: float) -> StepUpRequest:
        """What goes to the device (whole seconds left, rounded up, at least 1)."""
        return StepUpRequest(self.nonce, self.quote, self.trigger,
                             max(1, int(-(-(self.deadline - now) // 1))))


class LRU(OrderedDict[str, Any]):
    """A dict that forgets its least recently used keys beyond ``limit``."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def touch(self, key: str, default: Any) -> Any:
        value = self.get(key)
        if value is None:
            value = default()
            self[key] = value
            while len(self) > self.limit:
                self.popitem(last=False)
        else:
            self.move_to_end(key)
        return value


def network_of(address: str) -> str:
    """The /24 of an IPv4 address, the /64 of an IPv6 one (IPv4-mapped IPv6 counts as
    IPv4); anything else (a unix socket, no address) is its own network."""
    host = address.strip("[]")
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = 24 if ip.version == 4 else 64
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


class NetworkMemory:
    """Networks each identity has used, bounded: at most ``per_identity`` networks per
    identity and ``identities`` identities, least recently used forgotten first. In
    memory only: after a broker restart every device's first connect is learned again."""

    def __init__(self, per_identity: int, identities: int) -> None:
        self.per_identity = per_identity
        self._known: LRU = LRU(identities)

    def seen_before(self, identity: str) -> bool:
        return identity in self._known

    def knows(self, identity: str, network: str) -> bool:
        nets = self._known.get(identity)
        return nets is not None and network in nets

    def learn(self, identity: str, network: str) -> None:
        nets: LRU = self._known.touch(identity, lambda: LRU(self.per_identity))
        nets.touch(network, lambda: True)

    def networks(self, identity: str) -> list[str]:
        return list(self._known.get(identity) or ())


class RateMeter:
    """Messages per fixed window and an EWMA of the per-second rate over past windows.

    :meth:`add` returns True once per window when the count so far exceeds
    ``max(factor * baseline, min_rate) * window``, and only after ``warmup`` complete
    windows (a new identity's baseline is not judged before). One per identity, kept
    across its connections (so reconnecting does not reset the baseline); the per
    message cost is a subtraction, two comparisons and an increment."""

    __slots__ = ("baseline", "count", "limit", "start", "windows")

    def __init__(self, now: float) -> None:
        self.start = now
        self.count = 0
        self.baseline = 0.0
        self.windows = 0
        self.limit = math.inf  # count that trips the alarm in this window

    def add(self, now: float, s: StepUpSettings) -> bool:
        if now - self.start >= s.rate_window_s:
            self._roll(now, s)
        self.count += 1
        if self.count > self.limit:
            self.limit = math.inf  # once per window
            return True
        return False

    def add_many(self, now: float, n: int, s: StepUpSettings) -> bool:
        """:meth:`add` for ``n`` messages counted elsewhere (the broker's fast lane)."""
        if now - self.start >= s.rate_window_s:
            self._roll(now, s)
        self.count += n
        if self.count > self.limit:
            self.limit = math.inf
            return True
        return False

    def _roll(self, now: float, s: StepUpSettings) -> None:
        window = s.rate_window_s
        elapsed = int((now - self.start) // window)
        rate = self.count / window
        self.baseline = rate if self.windows == 0 else (
            s.rate_alpha * rate + (1 - s.rate_alpha) * self.baseline)
        idle = min(elapsed - 1, 64)  # empty windows in between decay the baseline
        self.baseline *= (1 - s.rate_alpha) ** idle
        self.windows += elapsed
        self.start += elapsed * window
        self.count = 0
        self.limit = (math.inf if self.windows < s.rate_warmup_windows
                      else max(s.rate_factor * self.baseline, s.rate_min) * window)


@dataclass
class Counter:
    """Events in a fixed window (cheap and bounded; a burst straddling two windows can
    count up to twice the threshold before it trips)."""

    start: float = 0.0
    count: int = 0

    def add(self, now: float, window: float) -> int:
        if now - self.start >= window:
            self.start = now
            self.count = 0
        self.count += 1
        return self.count


# -- TPM quotes --------------------------------------------------------------------------


class QuoteError(ProtocolError):
    default_reason = Reason.ATTESTATION_FAILED


@dataclass(frozen=True)
class VerifiedQuote:
    ak_name: bytes
    pcr_selection: tuple[tuple[int, tuple[int, ...]], ...]  # (hash alg, PCR numbers)
    pcr_digest: bytes
    enrolled_ak: bool  # checked against the device's enrolled AK


def _tpm2b(r: Reader, what: str) -> bytes:
    return r.var16(what)


def parse_ak_public(ak_public: bytes) -> tuple[ec.EllipticCurvePublicKey, bytes]:
    """(key, TPM name) of a marshalled TPM2B_PUBLIC that must be an ECC P-256 attestation
    key; QuoteError otherwise."""
    outer = Reader(ak_public, "ak_public")
    area = outer.var16("TPMT_PUBLIC", min_len=1)
    outer.end()
    r = Reader(area, "ak_public")
    if r.u16("type") != TPM_ALG_ECC:
        raise QuoteError("the attestation key is not an ECC key")
    if r.u16("nameAlg") != TPM_ALG_SHA256:
        raise QuoteError("the attestation key's nameAlg is not SHA-256")
    attributes = r.u32("objectAttributes")
    if attributes & AK_REQUIRED != AK_REQUIRED or attributes & ATTR_DECRYPT:
        raise QuoteError(f"not an attestation key (attributes {attributes:#010x}): it must be "
                         "fixedTPM, fixedParent, sensitiveDataOrigin, restricted, sign")
    _tpm2b(r, "authPolicy")
    if r.u16("symmetric") != TPM_ALG_NULL:
        raise QuoteError("a signing key has no symmetric algorithm")
    scheme = r.u16("scheme")
    if scheme != TPM_ALG_ECDSA or r.u16("scheme hash") != TPM_ALG_SHA256:
        raise QuoteError("the attestation key's scheme is not ECDSA with SHA-256")
    if r.u16("curveID") != TPM_ECC_NIST_P256:
        raise QuoteError("the attestation key is not on NIST P-256")
    if r.u16("kdf") != TPM_ALG_NULL:
        raise QuoteError("the attestation key has a KDF")
    x = _tpm2b(r, "x")
    y = _tpm2b(r, "y")
    r.end()
    if len(x) > 32 or len(y) > 32:
        raise QuoteError("the attestation key's point is not a P-256 point")
    try:
        key = ec.EllipticCurvePublicKey.from_encoded_point(
            ec.SECP256R1(), b"\x04" + x.rjust(32, b"\0") + y.rjust(32, b"\0"))
    except ValueError:
        raise QuoteError("the attestation key's point is not on P-256") from None
    name = TPM_ALG_SHA256.to_bytes(2, "big") + hashlib.sha256(area).digest()
    return key, name


def verify_quote(blob: bytes, nonce: bytes, enrolled_ak: bytes | None = None) -> VerifiedQuote:
    """Check a quote blob against ``nonce`` (see the module docstring for exactly what is
    and is not verified); QuoteError / MalformedMessage if it does not hold."""
    try:
        return _verify_quote(blob, nonce, enrolled_ak)
    except TesseraError as exc:
        if isinstance(exc, QuoteError):
            raise
        raise QuoteError(f"malformed quote: {exc.detail}") from None


def _verify_quote(blob: bytes, nonce: bytes, enrolled_ak: bytes | None) -> VerifiedQuote:
    attest, signature, ak_public = decode_quote(blob)
    key, name = parse_ak_public(ak_public)
    if enrolled_ak is not None:
        _, enrolled_name = parse_ak_public(enrolled_ak)
        if not hmac.compare_digest(name, enrolled_name):
            raise QuoteError("the quote is signed by another attestation key than the "
                             "device's enrolled one")
    try:
        key.verify(signature, attest, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise QuoteError("the quote's signature does not verify with its AK") from None
    a = Reader(attest, "TPMS_ATTEST")
    if a.u32("magic") != TPM_GENERATED_VALUE:
        raise QuoteError("the attest structure was not generated by a TPM")
    if a.u16("type") != TPM_ST_ATTEST_QUOTE:
        raise QuoteError("the attest structure is not a quote")
    _tpm2b(a, "qualifiedSigner")
    extra = _tpm2b(a, "extraData")
    a.fixed(17, "clockInfo")
    a.fixed(8, "firmwareVersion")
    selection = []
    count = a.u32("pcrSelect count")
    if count > 16:
        raise QuoteError("too many PCR banks in the quote")
    for _ in range(count):
        alg = a.u16("pcr hash")
        bitmap = a.fixed(a.u8("sizeofSelect"), "pcrSelect")
        pcrs = tuple(i for i in range(len(bitmap) * 8) if bitmap[i // 8] >> (i % 8) & 1)
        selection.append((alg, pcrs))
    digest = _tpm2b(a, "pcrDigest")
    a.end()
    if not hmac.compare_digest(extra, nonce):
        raise QuoteError("the quote was made for another nonce (extraData)")
    return VerifiedQuote(name, tuple(selection), digest, enrolled_ak is not None)
