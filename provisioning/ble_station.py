"""The factory station's side of BLE enrollment, on bleak's public API.

The station runs the same TPM enrollment as for a device on the network
(``device.provisioner.enroll_attested``: service nonce, TPM evidence checked against
the TPM makers' roots, credential activation, credentials), with the device's two TPM
answers fetched over GATT instead of HTTP, and two more checks on the way
(``device.ble_enrollment`` describes the exchange):

* the device's answer to the evidence step carries an HMAC under the label code the
  operator typed or scanned; it is checked *before* the evidence goes to the service,
  so a device that does not know this label's code (a rogue device in range, or a relay
  to another device) is never enrolled in its place;
* the credentials go to the device with the station's own HMAC under the same code.

Timeouts, retries, resume: every write has a timeout and is retried
(``device.ble_central.GattLink``); every step waits at most ``step_timeout`` for the
device. Once the service has issued the credentials they are kept in
``resume_dir/<serial>.json`` until the device confirms it stored them; a dropped link
is reconnected (``retries`` times) and the delivery repeated, and a later run with the
same ``resume_dir`` delivers what an interrupted run could not.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bleak.backends.device import BLEDevice

from device.ble_central import Backends, GattLink, LinkError, scan
from device.ble_enrollment import b64, unb64
from device.provisioner import ProvisionerClient, enroll_attested
from hw.tpm_evidence import ActivationChallenge, TpmEvidence
from structauth.errors import EnrollmentError, ProtocolError, Reason, TesseraError
from structauth.gatt import (
    ENROLL_RX,
    ENROLL_SERVICE,
    ENROLL_TX,
    NONCE_SIZE,
    BindingContext,
    check_binding,
    decode_json,
    device_binding,
    digest,
    encode_json,
    oob_key,
    station_binding,
)

CodeLookup = Callable[[str], str | None]
ClassLookup = Callable[[str], str | None]


def serial_of(exc: BaseException) -> str:
    """The serial of the device that an enrollment failure is about ("" if unknown)."""
    return str(getattr(exc, "ble_serial", ""))


class DeviceRefused(EnrollmentError):
    """The device answered a step with an error (its reason is the device's)."""


@dataclass
class Timing:
    """Where an enrollment's time went (seconds): ``device_tpm`` as the device
    measured it, ``radio`` the rest of the device steps' round trips (GATT, framing,
    waiting on connection events), ``service`` the provisioning service's calls,
    ``connect`` making the connection (LE connection, MTU exchange, service discovery,
    subscribing), ``queue`` waiting for another device's connection attempt."""

    total: float = 0.0
    queue: float = 0.0
    connect: float = 0.0
    radio: float = 0.0
    device_tpm: float = 0.0
    service: float = 0.0
    fragments: int = 0

    def to_json(self) -> dict[str, float | int]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in vars(self).items()}


@dataclass
class Enrolled:
    serial: str
    issued: dict[str, Any]
    address: str
    mtu: int
    resumed: bool = False
    timing: Timing = field(default_factory=Timing)
    #: the "stored" reply's ``agent`` (backend, tcti, key_dir of the device's agent.json)
    #: as the device sent it, unchecked; None from a device that does not send it
    device_agent: Any = None


class DeviceSession:
    """One connection to one device's enrollment service."""

    def __init__(self, link: GattLink, step_timeout: float, timing: Timing) -> None:
        self.link = link
        self.step_timeout = step_timeout
        self.timing = timing
        self.serial = ""
        self.state = ""
        self.device_nonce = b""
        self.key = b""
        self.station_nonce = b""
        self.stored: dict[str, Any] = {}

    async def step(self, message: dict[str, Any], answer: str) -> dict[str, Any]:
        started = time.perf_counter()
        await self.link.send(encode_json(message))
        reply = decode_json(await self.link.receive(self.step_timeout))
        took = time.perf_counter() - started
        tpm = reply.get("tpm_ms")
        tpm_s = float(tpm) / 1000 if isinstance(tpm, (int, float)) and 0 <= tpm < 1e7 else 0.0
        self.timing.device_tpm += min(tpm_s, took)
        self.timing.radio += max(0.0, took - tpm_s)
        if reply["op"] == "error":
            code = reply.get("code")
            reason = (Reason(code) if isinstance(code, int) and code in Reason._value2member_map_
                      else Reason.MALFORMED)
            raise DeviceRefused(f"the device refused: {str(reply.get('detail'))[:200]}", reason)
        if reply["op"] != answer:
            raise ProtocolError(f"the device answered {reply['op'][:20]!r}, expected {answer!r}",
                                Reason.MALFORMED)
        return reply

    async def hello(self) -> None:
        reply = await self.step({"op": "hello"}, "device")
        serial = reply.get("serial")
        if not isinstance(serial, str) or not 0 < len(serial) <= 64:
            raise ProtocolError("the device sent no serial", Reason.MALFORMED)
        self.serial = serial
        self.state = str(reply.get("state"))
        self.device_nonce = unb64(reply.get("nonce"), "nonce")

    def bind(self, code: str) -> None:
        self.key = oob_key(code, self.serial)

    def _context(self) -> BindingContext:
        return BindingContext(self.serial, self.device_nonce, self.station_nonce)

    async def evidence(self, nonce: bytes) -> TpmEvidence:
        self.station_nonce = os.urandom(NONCE_SIZE)
        reply = await self.step({"op": "evidence", "nonce": b64(nonce),
                                 "station_nonce": b64(self.station_nonce)}, "evidence")
        body = reply.get("evidence")
        binding = unb64(reply.get("binding"), "binding", 32)
        if not check_binding(device_binding(self.key, self._context(), digest(body)), binding):
            raise EnrollmentError(
                f"the device in range answering as {self.serial} does not know the code on "
                f"{self.serial}'s label: not enrolled (a rogue device, a relay, or a typo in "
                "the code)", Reason.WRONG_IDENTITY)
        return TpmEvidence.from_json(body)

    async def activate(self, challenge: ActivationChallenge) -> bytes:
        reply = await self.step({"op": "activate", "challenge": challenge.to_json()}, "secret")
        return unb64(reply.get("secret"), "secret")

    async def deliver(self, issued: dict[str, Any]) -> str:
        self.station_nonce = os.urandom(NONCE_SIZE)
        binding = station_binding(self.key, self._context(), digest(issued))
        reply = await self.step({"op": "credentials", "station_nonce": b64(self.station_nonce),
                                 "issued": issued, "binding": b64(binding)}, "stored")
        self.stored = reply
        return str(reply.get("identity"))


class _Attester:
    """``device.provisioner.Attester`` for enroll_attested, which runs in a worker
    thread (its HTTP client blocks): each TPM question goes to the event loop that owns
    the radio."""

    def __init__(self, session: DeviceSession, loop: asyncio.AbstractEventLoop,
                 timeout: float) -> None:
        self.session = session
        self.loop = loop
        self.timeout = timeout

    def evidence(self, nonce: bytes) -> TpmEvidence:
        future = asyncio.run_coroutine_threadsafe(self.session.evidence(nonce), self.loop)
        return future.result(self.timeout)

    def activate(self, challenge: ActivationChallenge) -> bytes:
        future = asyncio.run_coroutine_threadsafe(self.session.activate(challenge), self.loop)
        return future.result(self.timeout)


class BleStation:
    """Enrolls devices over BLE with ``client`` (the provisioning service, operator
    token set). ``backends``: bleak backend classes (None: the platform's, BlueZ)."""

    def __init__(
        self,
        client: ProvisionerClient,
        *,
        backends: Backends = None,
        step_timeout: float = 60.0,
        write_timeout: float = 5.0,
        retries: int = 3,
        resume_dir: Path | None = None,
        provisioner_url: str | None = None,
        agent_broker: dict[str, Any] | None = None,
    ) -> None:
        self.client = client
        self.backends = backends
        self.step_timeout = step_timeout
        self.write_timeout = write_timeout
        self.retries = retries
        self.resume_dir = resume_dir
        self.provisioner_url = provisioner_url or client.url
        #: the broker facts (provisioning.station_out._agent_broker) the device gets as
        #: agent.toml (and the broker's CA) with its credentials; None: none sent
        self.agent_broker = agent_broker
        self._connecting: asyncio.Lock | None = None

    async def scan(self, timeout: float = 3.0, stop_after: int | None = None
                   ) -> list[BLEDevice]:
        """Unprovisioned devices in range (advertising the enrollment service)."""
        found = await scan(ENROLL_SERVICE, timeout=timeout, backends=self.backends,
                           stop_after=stop_after)
        return [device for device, _ in found]

    def _link(self, target: BLEDevice | str) -> GattLink:
        return GattLink(target, rx_uuid=ENROLL_RX, tx_uuid=ENROLL_TX,
                        service_uuid=ENROLL_SERVICE, backends=self.backends,
                        write_timeout=self.write_timeout, retries=self.retries)

    async def _open(self, target: BLEDevice | str, timing: Timing) -> DeviceSession:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        started = time.perf_counter()
        # one connection attempt at a time: a controller (bumble's, and most real ones
        # behind BlueZ) creates LE connections one after the other
        async with self._connecting:
            connecting = time.perf_counter()
            timing.queue += connecting - started
            link = await self._link(target).connect()
        timing.connect += time.perf_counter() - connecting
        session = DeviceSession(link, self.step_timeout, timing)
        try:
            await session.hello()
        except BaseException:
            await link.close()
            raise
        return session

    async def identify(self, target: BLEDevice | str) -> tuple[str, str]:
        """(serial, state) of a device in range."""
        session = await self._open(target, Timing())
        try:
            return session.serial, session.state
        finally:
            await session.link.close()

    # -- resume files ------------------------------------------------------------------
    def _resume_path(self, serial: str) -> Path | None:
        return None if self.resume_dir is None else self.resume_dir / f"{serial}.json"

    def _keep(self, serial: str, issued: dict[str, Any]) -> None:
        path = self._resume_path(serial)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(issued, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def _kept(self, serial: str) -> dict[str, Any] | None:
        path = self._resume_path(serial)
        if path is None or not path.exists():
            return None
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else None

    def _forget(self, serial: str) -> None:
        path = self._resume_path(serial)
        if path is not None:
            path.unlink(missing_ok=True)

    # -- one device ---------------------------------------------------------------------
    async def enroll(
        self,
        target: BLEDevice | str,
        *,
        code: str | CodeLookup,
        serial: str | None = None,
        kind: str = "device",
        device_class: str | ClassLookup = "default",
        reenroll: bool = False,
    ) -> Enrolled:
        """Enroll the device at ``target``. ``serial``: the one the operator means
        (refused if the device is another); ``code``: its label code, or a lookup from
        serial to code (batch mode)."""
        timing = Timing()
        started = time.perf_counter()
        session = await self._open(target, timing)
        try:
            return await self._enroll(session, target, timing, started, code=code,
                                      serial=serial, kind=kind, device_class=device_class,
                                      reenroll=reenroll)
        except TesseraError as exc:
            # which device refused (batch reports name it); exceptions carry no serial
            exc.ble_serial = session.serial  # type: ignore[attr-defined]
            raise
        finally:
            await session.link.close()

    async def _enroll(self, session: DeviceSession, target: BLEDevice | str, timing: Timing,
                      started: float, *, code: str | CodeLookup, serial: str | None,
                      kind: str, device_class: str | ClassLookup, reenroll: bool) -> Enrolled:
        if serial is not None and session.serial != serial:
            raise EnrollmentError(f"the device at {session.link.address} is "
                                  f"{session.serial}, not {serial}", Reason.WRONG_IDENTITY)
        label = code(session.serial) if callable(code) else code
        if label is None:
            raise EnrollmentError(f"{session.serial} is not on the manifest: skipped",
                                  Reason.NOT_AUTHORIZED)
        try:
            session.bind(label)
        except ValueError as exc:
            raise EnrollmentError(f"{session.serial}: {exc}", Reason.BAD_PARAMETERS) from None
        issued = self._kept(session.serial)
        resumed = issued is not None
        if issued is None:
            if session.state == "enrolled":
                raise EnrollmentError(f"{session.serial} says it is already enrolled",
                                      Reason.ALREADY_ENROLLED)
            attester = _Attester(session, asyncio.get_running_loop(),
                                 self.step_timeout * 2)
            service_started = time.perf_counter()
            device_before = timing.radio + timing.device_tpm
            chosen = (device_class(session.serial) if callable(device_class)
                      else device_class) or "default"
            issued = await asyncio.to_thread(
                enroll_attested, self.client, attester, session.serial, kind=kind,
                device_class=chosen, reenroll=reenroll)
            timing.service += (time.perf_counter() - service_started) - (
                timing.radio + timing.device_tpm - device_before)
            issued = {**issued, "provisioner": self.provisioner_url}
            self._keep(session.serial, issued)
        delivered = await self._deliver(session, target, {**issued, **self._agent_files()})
        try:
            self._forget(session.serial)
            timing.total = time.perf_counter() - started
            links = {id(session.link): session.link, id(delivered.link): delivered.link}
            timing.fragments = sum(x.fragments_in + x.fragments_out for x in links.values())
            return Enrolled(session.serial, issued, delivered.link.address,
                            delivered.link.mtu, resumed, timing,
                            delivered.stored.get("agent"))
        finally:
            if delivered is not session:
                await delivered.link.close()

    def _agent_files(self) -> dict[str, str]:
        """What the device writes as agent.toml and broker-ca.pem, in the delivery (the
        station binding covers it), as the network path sends them; nothing when the
        station does not know the broker."""
        if self.agent_broker is None:
            return {}
        from provisioning.station_out import _delivery_fields

        return _delivery_fields(self.agent_broker)

    async def _deliver(self, session: DeviceSession, target: BLEDevice | str,
                       issued: dict[str, Any]) -> DeviceSession:
        """Deliver, reconnecting on a dropped link (the device takes a delivery on any
        connection whose nonce the binding covers). The caller closes ``session``."""
        first = session
        for attempt in range(self.retries + 1):
            try:
                await session.deliver(issued)
                return session
            except LinkError:
                if attempt == self.retries:
                    raise
                if session is not first:
                    await session.link.close()
                fresh = await self._open(target, session.timing)
                fresh.key = session.key
                session = fresh
        raise AssertionError("unreachable")  # pragma: no cover


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


__all__ = ["BleStation", "DeviceRefused", "DeviceSession", "Enrolled", "Timing", "one_line",
           "serial_of"]
