"""SA1 sessions over GATT: thin loops around :mod:`structauth.gatt_session`.

* :class:`Sa1Peripheral` answers SA1 on a bumble device (a gateway, or a device that
  another device reaches with no network): every connection gets a
  :class:`~structauth.gatt_session.ResponderConnection`; a timer re-armed to the
  session's next deadline calls ``poll`` (keys erased on schedule).
* :class:`Sa1Central` opens a session over a :class:`~device.ble_central.GattLink`
  (bleak): msg1, msg2, msg3, then proven (and, if the responder chose so, sealed)
  messages both ways.
* :class:`LastSeenRevocations` is the revocation check of a device with no network:
  the last CRL it saw, signed by a root of the bundle it holds, accepted while it is
  no older than the configured ``max_crl_age``; beyond that every peer is refused
  (reason ``backend_unavailable``: the device cannot tell who is revoked).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from bumble.device import Device
from cryptography import x509

from device.ble_central import GattLink, LinkError
from device.ble_peripheral import Advertiser, Channel, MessageService
from device.ble_peripheral import start as advertise
from structauth.credentials import Credential, Identity, RevocationCheck, TimePolicy, TrustStore
from structauth.errors import (
    ConfigurationError,
    CredentialError,
    ProtocolError,
    Reason,
    StateError,
)
from structauth.gatt import SA1_RX, SA1_SERVICE, SA1_TX
from structauth.gatt_session import (
    Authorize,
    Established,
    Event,
    InitiatorConnection,
    Outgoing,
    PeerRefused,
    PendingBudget,
    Received,
    Refused,
    ResponderConnection,
    State,
)
from structauth.handshake import Initiator, Responder

log = logging.getLogger("tessera.ble.sa1")

PolicySource = Callable[[], TimePolicy]


def _wall_policy() -> TimePolicy:
    return TimePolicy.trusted(dt.datetime.now(dt.UTC))


# -- offline revocation ----------------------------------------------------------------


class LastSeenRevocations:
    """A :data:`~structauth.credentials.RevocationCheck` from the last CRL a device
    saw. ``max_crl_age``: how old that CRL may be (its thisUpdate against the wall
    clock) before the device refuses every peer rather than trust a stale list."""

    def __init__(self, crl: x509.CertificateRevocationList, trust: TrustStore, *,
                 max_crl_age: dt.timedelta,
                 clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)) -> None:
        if not any(crl.issuer == root.subject and crl.is_signature_valid(root.public_key())  # type: ignore[arg-type]
                   for root in trust.roots):
            raise ConfigurationError("the revocation list is not signed by a root of the "
                                     "trust bundle: fetch it again from the provisioner")
        self.crl = crl
        self.max_crl_age = max_crl_age
        self.clock = clock
        self.revoked = frozenset(format(r.serial_number, "x") for r in crl)

    @classmethod
    def load(cls, data: bytes, trust: TrustStore, config: Mapping[str, Any],
             **kwargs: Any) -> LastSeenRevocations:
        """From a PEM or DER CRL and the device's config (``max_crl_age_hours``)."""
        try:
            hours = float(config["max_crl_age_hours"])
        except (KeyError, TypeError, ValueError):
            raise ConfigurationError(
                "offline peers need max_crl_age_hours in the device config (how old a "
                "revocation list this device still trusts)") from None
        if not 0 < hours <= 24 * 365:
            raise ConfigurationError("max_crl_age_hours must be between 0 and 8760")
        try:
            crl = (x509.load_pem_x509_crl(data) if data.lstrip().startswith(b"-----")
                   else x509.load_der_x509_crl(data))
        except ValueError:
            raise ConfigurationError("the revocation list is not a PEM or DER CRL") from None
        return cls(crl, trust, max_crl_age=dt.timedelta(hours=hours), **kwargs)

    def __call__(self, credential: Credential) -> bool:
        age = self.clock() - self.crl.last_update_utc
        if age > self.max_crl_age:
            raise CredentialError(
                f"the revocation list is {age} old, beyond the {self.max_crl_age} this "
                "device accepts: refresh it while online", Reason.BACKEND_UNAVAILABLE)
        return any(serial in self.revoked for serial in credential.serials)


# -- the peripheral (responder) -----------------------------------------------------------


class PeerSession:
    """One central's connection to an :class:`Sa1Peripheral`."""

    def __init__(self, owner: Sa1Peripheral, channel: Channel) -> None:
        self.owner = owner
        self.channel = channel
        self.connection = ResponderConnection(owner.responder, revoked=owner.revoked,
                                              expected_peer=owner.expected_peer,
                                              budget=owner.budget,
                                              authorize=owner.authorize)
        self.received: asyncio.Queue[Received] = asyncio.Queue()
        self.refused: list[Refused] = []
        self.established = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None

    @property
    def peer(self) -> Identity | None:
        return self.connection.peer

    async def on_message(self, message: bytes) -> None:
        now = self.owner.clock()
        await self._handle(self.connection.receive(message, now, self.owner.policy()))
        self._arm(now)

    async def _handle(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, Outgoing):
                await self.channel.send(event.message)
            elif isinstance(event, Established):
                log.info("SA1 session with %s over GATT (handshake %d on this link)",
                         event.peer, self.connection.handshakes)
                self.established.set()
            elif isinstance(event, Received):
                self.received.put_nowait(event)
                if self.owner.on_message is not None:
                    await self.owner.on_message(self, event)
            elif isinstance(event, Refused):
                self.refused.append(event)
                self.owner.refusals.append(event)
                if event.fatal:
                    await self.channel.close()

    async def send(self, topic: str, payload: bytes) -> None:
        """A proven message to the central; a topic the policy does not let it receive
        raises ProtocolError (NOT_AUTHORIZED) and nothing is sent."""
        await self.channel.send(self.connection.send(topic, payload, self.owner.clock()))

    def _arm(self, now: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        deadline = self.connection.next_deadline(now)
        if deadline == float("inf"):
            return
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(max(0.0, deadline - now), self._tick)

    def _tick(self) -> None:
        now = self.owner.clock()
        self.connection.poll(now)
        if self.connection.state is State.CLOSED:
            asyncio.get_running_loop().create_task(self.channel.close())
            return
        self._arm(now)

    def on_disconnect(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.connection.close()
        self.owner.sessions.discard(self)


class Sa1Peripheral:
    """Answers SA1 over GATT on ``device`` with ``responder`` (its signer, credential,
    trust and session parameters; ``peer_kind`` says who may connect: ``"device"`` for
    device-to-device, ``None`` for any kind). ``policy`` gives the credential time
    policy; ``revoked`` the revocation check (online feed, or
    :class:`LastSeenRevocations` offline). ``authorize`` judges topics (a gateway:
    ``broker_plugin.ble.GattPolicy``); ``max_pending`` bounds the handshakes pending
    across all its connections (one per connection in any case)."""

    def __init__(
        self,
        device: Device,
        responder: Responder,
        *,
        policy: PolicySource = _wall_policy,
        revoked: RevocationCheck | None = None,
        expected_peer: Identity | None = None,
        on_message: Callable[[PeerSession, Received], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        authorize: Authorize | None = None,
        max_pending: int = 16,
    ) -> None:
        self.device = device
        self.responder = responder
        self.authorize = authorize
        self.budget = PendingBudget(max_pending)
        self.policy = policy
        self.revoked = revoked
        self.expected_peer = expected_peer
        self.on_message = on_message
        self.clock = clock
        self.sessions: set[PeerSession] = set()
        self.refusals: list[Refused] = []
        self.advertiser: Advertiser | None = None
        self.service = MessageService(device, service_uuid=SA1_SERVICE, rx_uuid=SA1_RX,
                                      tx_uuid=SA1_TX, handler_for=self._new)

    def _new(self, channel: Channel) -> PeerSession:
        session = PeerSession(self, channel)
        self.sessions.add(session)
        return session

    async def start(self, name: str, *, max_mtu: int = 247) -> Sa1Peripheral:
        self.advertiser = await advertise(self.device, SA1_SERVICE, name, max_mtu=max_mtu)
        return self

    def established(self) -> list[PeerSession]:
        return [s for s in self.sessions if s.connection.state is State.ESTABLISHED]


# -- the central (initiator) ---------------------------------------------------------------


class PeerRefusedError(ProtocolError):
    """The peer refused (an unproven ERROR with its reason)."""


class Sa1Central:
    """An SA1 session to a peripheral over ``link`` (connected by :meth:`open`)."""

    def __init__(
        self,
        link: GattLink,
        initiator: Initiator,
        *,
        policy: PolicySource = _wall_policy,
        revoked: RevocationCheck | None = None,
        clock: Callable[[], float] = time.monotonic,
        answer_timeout: float = 10.0,
        renew: Callable[[], Initiator] | None = None,
        renew_before: float = 60.0,
    ) -> None:
        self.link = link
        self.connection = InitiatorConnection(initiator, revoked=revoked)
        #: a fresh Initiator for the same peer: with it, the session is renewed on the
        #: same link before its lifetime ends (make-before-break, as device.coap does)
        self.renew = renew
        self.renew_before = renew_before
        self._rekey_task: asyncio.Task[None] | None = None
        self.policy = policy
        self.clock = clock
        self.answer_timeout = answer_timeout
        self.received: asyncio.Queue[Received | PeerRefused] = asyncio.Queue()
        self.refused: list[Refused] = []
        self._reader: asyncio.Task[None] | None = None
        self._established = asyncio.get_running_loop().create_future()
        self._timer: asyncio.TimerHandle | None = None

    @property
    def peer(self) -> Identity | None:
        return self.connection.peer

    async def open(self, *, context: bytes = b"") -> Identity:
        """Connect (if needed), run the handshake; the peer's identity once msg2
        checked out and msg3 went out."""
        if not self.link.connected:
            await self.link.connect()
        self._reader = asyncio.get_running_loop().create_task(self._read())
        await self.link.send(self.connection.start(context=context))
        try:
            peer: Identity = await asyncio.wait_for(asyncio.shield(self._established),
                                                    self.answer_timeout)
        except TimeoutError:
            await self.close()
            raise LinkError(f"no msg2 within {self.answer_timeout:g} s") from None
        return peer

    async def _read(self) -> None:
        while True:
            try:
                message = await self.link.receive(timeout=3600)
            except (LinkError, ProtocolError) as exc:
                if not self._established.done():
                    self._established.set_exception(exc)
                return
            now = self.clock()
            for event in self.connection.receive(message, now, self.policy()):
                await self._event(event)
            self._arm(now)

    async def _event(self, event: Event) -> None:
        if isinstance(event, Outgoing):
            await self.link.send(event.message)
        elif isinstance(event, Established):
            if not self._established.done():
                self._established.set_result(event.peer)
        elif isinstance(event, (Received, PeerRefused)):
            if isinstance(event, PeerRefused) and not self._established.done():
                self._established.set_exception(
                    PeerRefusedError(f"the peer refused the handshake: {event.detail}",
                                     event.reason))
            self.received.put_nowait(event)
        elif isinstance(event, Refused):
            self.refused.append(event)
            if event.fatal:
                if not self._established.done():
                    self._established.set_exception(ProtocolError(event.detail, event.reason))
                await self.link.close()

    def renew_at(self) -> float:
        """When the current session is renewed (inf: never, or a renewal is under way):
        its end less ``renew_before``, at most a tenth of its lifetime."""
        session = self.connection.session
        if (self.renew is None or session is None or self.connection.pending
                or self.connection.state is not State.ESTABLISHED):
            return float("inf")
        return session.expires_at - min(self.renew_before, session.params.lifetime_s / 10)

    def _arm(self, now: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        deadline = min(self.connection.next_deadline(now), self.renew_at())
        if deadline != float("inf"):
            self._timer = asyncio.get_running_loop().call_later(
                max(0.0, deadline - now), self._tick)

    def _tick(self) -> None:
        self._timer = None
        task = asyncio.get_running_loop().create_task(self.maintain())
        self._rekey_task = task

    async def maintain(self) -> None:
        """Erase keys due by the clock and start the renewal if it is due; re-arms the
        timer. Runs from the timer; a test with a fake clock calls it directly."""
        now = self.clock()
        self.connection.poll(now)
        if self.connection.state is State.CLOSED:
            return
        if now >= self.renew_at():
            await self.rekey()
        self._arm(now)

    async def rekey(self) -> None:
        """Start a new handshake with the same peer on this link; the current session
        stays in use until msg2 checks out (then msg3 goes out and the new one is used)."""
        if self.renew is None:
            raise StateError("no renew= factory: this central cannot renew its session")
        await self.link.send(self.connection.rekey(self.renew()))

    async def send(self, topic: str, payload: bytes) -> None:
        await self.link.send(self.connection.send(topic, payload, self.clock()))

    async def receive(self, timeout: float = 10.0) -> Received:
        """The next proven message; a refusal from the peer raises PeerRefusedError."""
        try:
            event = await asyncio.wait_for(self.received.get(), timeout)
        except TimeoutError:
            raise LinkError(f"no message within {timeout:g} s") from None
        if isinstance(event, PeerRefused):
            raise PeerRefusedError(event.detail, event.reason)
        return event

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._rekey_task is not None and self._rekey_task is not asyncio.current_task():
            self._rekey_task.cancel()
        self.connection.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await self.link.close()


def sa1_link(target: Any, *, backends: Any = None, **kwargs: Any) -> GattLink:
    """A :class:`GattLink` to a peripheral's SA1 service."""
    return GattLink(target, rx_uuid=SA1_RX, tx_uuid=SA1_TX, service_uuid=SA1_SERVICE,
                    backends=backends, **kwargs)


__all__ = ["LastSeenRevocations", "PeerRefusedError", "PeerSession", "Sa1Central",
           "Sa1Peripheral", "sa1_link"]
