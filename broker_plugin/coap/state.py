"""The CoAP gateway's state: a device's session with it (:class:`CoapPeer`), every
bound on what it keeps (:class:`GatewayLimits`, docs/COAP.md "Bounds"), the remote
address inner resources see for a proven request (:class:`ProvenAddress`), and a
Block1 upload in progress. The request path is :mod:`broker_plugin.coap.site`, which
re-exports these names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiocoap import interfaces

from structauth.coap_binding import NO_PREVIOUS
from structauth.credentials import Credential, Identity
from structauth.session import Session

from .handshake import HandshakeLimits
from .limits import Limits
from .transport import DedupLimits

#: the largest request payload assembled from Block1 transfers (4.13 beyond it)
MAX_PAYLOAD = 64 * 1024


@dataclass
class CoapPeer:
    """One SA1 session of a device with this gateway (a device may hold several)."""

    session: Session
    identity: Identity
    credential: Credential
    cert_serial: str
    device_class: str
    address: str
    requests: int = 0
    rejections: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _default_block1() -> Limits:
    # Block1 transfers, every block already proven; owner: the device's identity
    return Limits(per_owner=4, per_owner_bytes=MAX_PAYLOAD, total=1024,
                  total_bytes=8 * 1024 * 1024, idle=20.0, max_age=120.0)


def _default_block2() -> Limits:
    # proven responses larger than one block, for their later blocks; owner: identity
    return Limits(per_owner=8, per_owner_bytes=256 * 1024, total=2048,
                  total_bytes=16 * 1024 * 1024, idle=20.0, max_age=120.0)


@dataclass(frozen=True)
class GatewayLimits:
    """Every bound of the gateway's state (docs/COAP.md "Bounds")."""

    handshake: HandshakeLimits = field(default_factory=HandshakeLimits)
    block1: Limits = field(default_factory=_default_block1)
    block2: Limits = field(default_factory=_default_block2)
    dedup: DedupLimits = field(default_factory=DedupLimits)
    #: refusal log lines per second (the rest are counted and summarized)
    log_per_second: int = 20
    #: how often the aggregated refusal counts are audited (seconds)
    audit_interval: float = 10.0
    #: distinct (reason, source) pairs counted per audit interval (the rest: "other")
    audit_keys: int = 256
    #: datagrams per second (and burst) accepted for decoding from addresses that hold
    #: no session with this gateway, in total and per source address; the rest are
    #: dropped before aiocoap spends anything on them. Keep the total below what the
    #: gateway can answer, so that devices with sessions are served during a flood.
    preauth_rate: float = 1000.0
    preauth_burst: float = 2000.0
    preauth_rate_per_source: float = 100.0
    preauth_burst_per_source: float = 200.0
    #: how long an address counts as holding a session after its last proven request
    known_for: float = 600.0


class ProvenAddress(interfaces.EndpointAddress):  # type: ignore[misc]
    """The remote of a request whose proof checked out, as the inner site sees it.

    Everything is the underlying UDP address's, except: ``peer`` (and
    ``authenticated_claims``) name the authenticated device, the blockwise key includes
    the session, and the maximum payload size is unbounded so that inner resources never
    slice a response themselves: the site proves the whole response, then slices it.
    """

    def __init__(self, underlying: Any, peer: CoapPeer) -> None:
        self.underlying = underlying
        self.peer = peer

    def __repr__(self) -> str:
        return f"<ProvenAddress {self.peer.identity} via {self.underlying!r}>"

    @property
    def hostinfo(self) -> Any:
        return self.underlying.hostinfo

    @property
    def hostinfo_local(self) -> Any:
        return self.underlying.hostinfo_local

    @property
    def uri_base(self) -> Any:
        return self.underlying.uri_base

    @property
    def uri_base_local(self) -> Any:
        return self.underlying.uri_base_local

    @property
    def is_multicast(self) -> bool:
        return bool(self.underlying.is_multicast)

    @property
    def is_multicast_locally(self) -> bool:
        return bool(self.underlying.is_multicast_locally)

    @property
    def scheme(self) -> Any:
        return self.underlying.scheme

    @property
    def maximum_block_size_exp(self) -> int:
        return int(self.underlying.maximum_block_size_exp)

    @property
    def maximum_payload_size(self) -> int:
        return MAX_PAYLOAD

    @property
    def blockwise_key(self) -> Any:
        return (self.underlying.blockwise_key, self.peer.session.session_id)

    @property
    def authenticated_claims(self) -> tuple[Identity, ...]:
        return (self.peer.identity,)

    def as_response_address(self) -> Any:
        return self.underlying.as_response_address()


class _Transfer:
    """A Block1 upload in progress: the proven (opened) bytes so far."""

    __slots__ = ("body", "next", "previous", "szx")

    def __init__(self, szx: int) -> None:
        self.body = bytearray()
        self.next = 0
        self.previous = NO_PREVIOUS
        self.szx = szx
