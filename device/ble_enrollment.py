"""Enrollment over Bluetooth LE, device side: a GATT peripheral that answers the
station's steps of the same TPM enrollment as the network path
(``device.enrollment_endpoint``), bound to the code on the device's label.

The exchange (JSON messages on the enrollment service, :mod:`structauth.gatt`)::

    station -> {"op": "hello"}
    device  -> {"op": "device", "serial", "state", "nonce": device nonce (fresh per
                connection)}
    station -> {"op": "evidence", "nonce": the provisioning service's nonce,
                "station_nonce": fresh}
    device  -> {"op": "evidence", "evidence": TpmEvidence JSON (EK certificate, EK/AK/key
                public areas, TPM2_Certify of the device key over the service's nonce),
                "binding": HMAC(label key, serial, both nonces, SHA-256(evidence))}
    station -> {"op": "activate", "challenge": ActivationChallenge JSON}
    device  -> {"op": "secret", "secret": what ActivateCredential recovered}
    station -> {"op": "credentials", "station_nonce", "issued": the service's answer
                (with the station's "agent_toml" and "broker_ca" when it knows the
                broker), "binding": HMAC(label key, serial, both nonces, SHA-256(issued))}
    device  -> {"op": "stored", "identity", "agent": {"backend", "tcti", "key_dir"}}
    either  -> {"op": "error", "code": reason code, "detail"}

The label key is derived (scrypt) from the 10-character code printed on the device's
label (or shown on its display) and its serial: :func:`structauth.gatt.oob_key`.

* The station checks the device's binding before it sends the evidence to the
  service: a rogue device (or a relay to another genuine device) does not know this
  label's code, so it cannot be enrolled in this device's place.
* The device checks the station's binding before it keeps anything: a central that
  does not know the code cannot hand this device another fleet's credentials. After
  :data:`MAX_BINDING_FAILURES` wrong bindings the device refuses every delivery until
  it restarts (no online guessing).
* Both bindings cover this connection's device nonce and a fresh station nonce: a
  recorded exchange replayed to the device, or to a station, does not verify.
* The device also checks that the credentials are for its own TPM key and serial and
  chain to the bundle that came with them (``check_issued``), as on the network path.

A delivery needs no evidence step on the same connection: a station whose link dropped
after the service issued the credentials reconnects and delivers them (resume).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hashlib
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # bumble is imported where it is used, so that `tessera-agent` (which
    # lists this command) runs on a device installed without the ble extra
    from bumble import hci
    from bumble.device import Device

    from device.ble_peripheral import Advertiser, Channel

from device.attestation import ActivationChallenge
from device.ble_args import add_arguments
from device.provisioner import LocalTpm, check_issued, save_device_state
from structauth.errors import (
    ConfigurationError,
    EnrollmentError,
    MalformedMessage,
    Reason,
    TesseraError,
)
from structauth.gatt import (
    ENROLL_INFO,
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
    new_code,
    normalize_code,
    oob_key,
    station_binding,
)

log = logging.getLogger("tessera.ble.enroll")

#: wrong station bindings a device takes before it refuses deliveries until restarted
MAX_BINDING_FAILURES = 5
PROTO = 1


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(value: Any, field: str, size: int | None = None) -> bytes:
    try:
        raw = base64.b64decode(value, validate=True) if isinstance(value, str) else None
    except (binascii.Error, ValueError):
        raw = None
    if raw is None or (size is not None and len(raw) != size):
        want = f"{size} bytes of " if size else ""
        raise MalformedMessage(f"field {field!r} must be {want}base64")
    return raw


def error_message(exc: TesseraError) -> bytes:
    return encode_json({"op": "error", "code": int(exc.reason), "detail": exc.detail[:200]})


class EnrollmentDevice:
    """The device's enrollment state: one TPM, one serial, one label code, and what
    to do with the credentials (``on_enrolled(issued)``, which must store them before
    it returns: the station is told only after; what it returns, the agent.json it
    wrote, goes to the station in the "stored" reply as ``agent``: backend, TCTI and
    key directory, so that the station's copy names the key as the device does)."""

    def __init__(self, tpm: LocalTpm, serial: str, code: str,
                 on_enrolled: Callable[[dict[str, Any]], dict[str, Any] | None]) -> None:
        self.tpm = tpm
        self.serial = serial
        self._key = oob_key(code, serial)
        self.on_enrolled = on_enrolled
        self.enrolled = asyncio.Event()
        self.issued: dict[str, Any] | None = None
        self.binding_failures = 0
        self._lock = asyncio.Lock()  # one TPM: one step at a time across connections
        #: refusals sent, newest last (tests and logs)
        self.refusals: list[tuple[Reason, str]] = []

    def info(self) -> bytes:
        state = "enrolled" if self.enrolled.is_set() else "unprovisioned"
        return encode_json({"serial": self.serial, "state": state, "proto": PROTO})


class EnrollmentConnection:
    """One station's connection: its device nonce and the steps it has taken."""

    def __init__(self, device: EnrollmentDevice, channel: Channel) -> None:
        self.device = device
        self.channel = channel
        self.nonce = os.urandom(NONCE_SIZE)
        self.hello = False

    def on_disconnect(self) -> None:
        self.nonce = b""

    async def on_message(self, message: bytes) -> None:
        try:
            answer = await self._answer(decode_json(message))
        except TesseraError as exc:
            self.device.refusals.append((exc.reason, exc.detail))
            log.warning("refused a BLE enrollment step: %s", exc)
            answer = error_message(exc)
        await self.channel.send(answer)

    async def _answer(self, msg: dict[str, Any]) -> bytes:
        dev = self.device
        op = msg["op"]
        if op == "hello":
            self.hello = True
            state = "enrolled" if dev.enrolled.is_set() else "unprovisioned"
            return encode_json({"op": "device", "serial": dev.serial, "state": state,
                                "proto": PROTO, "nonce": b64(self.nonce)})
        if not self.hello:
            raise EnrollmentError("say hello first: the device nonce comes with it",
                                  Reason.INVALID_STATE)
        if dev.enrolled.is_set():
            raise EnrollmentError("this device is already enrolled", Reason.ALREADY_ENROLLED)
        if op == "evidence":
            nonce = unb64(msg.get("nonce"), "nonce")
            ctx = self._context(msg)
            async with dev._lock:
                started = time.perf_counter()
                evidence = await asyncio.to_thread(dev.tpm.evidence, nonce)
                tpm_ms = (time.perf_counter() - started) * 1000
            body = evidence.to_json()
            binding = device_binding(dev._key, ctx, digest(body))
            # tpm_ms: how long the TPM took (the station splits radio from TPM time)
            return encode_json({"op": "evidence", "evidence": body, "binding": b64(binding),
                                "tpm_ms": round(tpm_ms, 3)})
        if op == "activate":
            challenge = ActivationChallenge.from_json(msg.get("challenge"))
            async with dev._lock:
                started = time.perf_counter()
                secret = await asyncio.to_thread(dev.tpm.activate, challenge)
                tpm_ms = (time.perf_counter() - started) * 1000
            return encode_json({"op": "secret", "secret": b64(secret), "tpm_ms": round(tpm_ms, 3)})
        if op == "credentials":
            return await self._credentials(msg)
        raise MalformedMessage(f"unknown enrollment step {op[:40]!r}")

    def _context(self, msg: dict[str, Any]) -> BindingContext:
        return BindingContext(self.device.serial, self.nonce,
                              unb64(msg.get("station_nonce"), "station_nonce", NONCE_SIZE))

    async def _credentials(self, msg: dict[str, Any]) -> bytes:
        dev = self.device
        if dev.binding_failures >= MAX_BINDING_FAILURES:
            raise EnrollmentError("too many wrong label codes: restart the device to try "
                                  "again", Reason.NOT_AUTHORIZED)
        issued = msg.get("issued")
        if not isinstance(issued, dict):
            raise MalformedMessage("field 'issued' must be an object")
        expected = station_binding(dev._key, self._context(msg), digest(issued))
        given = unb64(msg.get("binding"), "binding", 32)
        if not check_binding(expected, given):
            dev.binding_failures += 1
            raise EnrollmentError("the station does not know this device's label code",
                                  Reason.NOT_AUTHORIZED)
        async with dev._lock:
            if dev.enrolled.is_set():
                raise EnrollmentError("this device is already enrolled",
                                      Reason.ALREADY_ENROLLED)
            started = time.perf_counter()
            key = await asyncio.to_thread(dev.tpm.public_key)
            tpm_ms = (time.perf_counter() - started) * 1000
            check_issued(issued, key, dev.serial)
            written = await asyncio.to_thread(dev.on_enrolled, issued)
            dev.issued = issued
            dev.enrolled.set()
        log.info("enrolled as %s over BLE", issued["identity"])
        stored: dict[str, Any] = {"op": "stored", "identity": issued["identity"],
                                  "tpm_ms": round(tpm_ms, 3)}
        if written is not None:
            stored["agent"] = {k: written[k] for k in AGENT_SETTINGS if k in written}
        return encode_json(stored)


class EnrollmentPeripheral:
    """The enrollment service on a bumble device, advertised until enrolled."""

    def __init__(self, device: Device, enrollment: EnrollmentDevice) -> None:
        self.device = device
        self.enrollment = enrollment
        self.connections: list[EnrollmentConnection] = []
        self._quiet: asyncio.Task[None] | None = None
        from device.ble_peripheral import MessageService

        self.advertiser: Advertiser | None = None
        self.service = MessageService(
            device, service_uuid=ENROLL_SERVICE, rx_uuid=ENROLL_RX, tx_uuid=ENROLL_TX,
            info_uuid=ENROLL_INFO, info=enrollment.info, handler_for=self._new)

    def _new(self, channel: Channel) -> EnrollmentConnection:
        connection = EnrollmentConnection(self.enrollment, channel)
        self.connections.append(connection)
        return connection

    async def start(self, *, max_mtu: int = 247, interval_ms: float = 100.0
                    ) -> EnrollmentPeripheral:
        from device.ble_peripheral import start as advertise

        self.advertiser = await advertise(self.device, ENROLL_SERVICE, self.enrollment.serial,
                                          max_mtu=max_mtu, interval_ms=interval_ms)
        self._quiet = asyncio.get_running_loop().create_task(self._stop_when_enrolled())
        return self

    async def _stop_when_enrolled(self) -> None:
        # an enrolled device no longer offers enrollment (a batch scan skips it)
        await self.enrollment.enrolled.wait()
        if self.advertiser is not None:
            await self.advertiser.stop()

    async def serve_until_enrolled(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self.enrollment.enrolled.wait(), timeout)
        except TimeoutError:
            return False
        finally:
            if self.advertiser is not None:
                await self.advertiser.stop()
        return True


# -- the device's files -------------------------------------------------------------------


def load_or_create_code(state_dir: Path) -> str:
    """The label code: made once (at the factory's first boot), kept in
    ``<state_dir>/ble-code`` (mode 0600), printed on the label or shown on a display."""
    path = state_dir / "ble-code"
    try:
        return normalize_code(path.read_text().strip())
    except FileNotFoundError:
        pass
    state_dir.mkdir(parents=True, exist_ok=True)
    code = new_code()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(code + "\n")
    return normalize_code(code)


#: what the "stored" reply tells the station of agent.json (how the agent reaches the key)
AGENT_SETTINGS = ("backend", "tcti", "key_dir")


def store_enrollment(state_dir: Path, *, tcti: str, key_dir: str, serial: str
                     ) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """What a device keeps after a BLE enrollment: what the network path keeps
    (:func:`device.provisioner.save_device_state`, all or nothing). Returns agent.json."""

    def save(issued: dict[str, Any]) -> dict[str, Any]:
        state = {"backend": "tpm", "tcti": tcti, "key_dir": key_dir, "serial": serial,
                 "provisioner": issued.get("provisioner"), "identity": issued["identity"]}
        save_device_state(state_dir, state, issued)
        return state

    return save


def static_address(serial: str) -> hci.Address:
    """A random static address (Core Vol 6 Part B 1.3.2.1: top two bits set) that
    stays the same for this serial across restarts."""
    raw = bytearray(hashlib.sha256(b"tessera-ble-address/" + serial.encode()).digest()[:6])
    raw[0] |= 0xC0
    from bumble import hci

    return hci.Address(":".join(f"{b:02X}" for b in raw))


def command(args: argparse.Namespace) -> None:
    """Advertise until a station enrolled this device (ConfigurationError if not within
    ``--timeout``); with ``--show-code``, print the label code."""
    from bumble.device import Device
    from bumble.transport import open_transport

    from hw.tpm import TpmBackend

    code = load_or_create_code(args.state_dir)
    if args.show_code:
        print(f"{code[:5]}-{code[5:]}")
        return
    key_dir = args.key_dir or str(args.state_dir / "keys")

    async def serve() -> bool:
        try:
            transport = await open_transport(args.hci)
        except Exception as exc:  # bumble raises a bare Exception for an unusable transport
            raise ConfigurationError(f"cannot open the Bluetooth controller {args.hci}: "
                                     f"{exc}") from None
        async with transport:
            device = Device.with_hci(args.serial, static_address(args.serial),
                                     transport.source, transport.sink)
            with TpmBackend(args.tpm, Path(key_dir)) as backend:
                enrollment = EnrollmentDevice(
                    LocalTpm(backend), args.serial, code,
                    store_enrollment(args.state_dir, tcti=args.tpm, key_dir=key_dir,
                                     serial=args.serial))
                peripheral = await EnrollmentPeripheral(device, enrollment).start()
                print(f"advertising the Tessera enrollment service as {args.serial}",
                      flush=True)
                return await peripheral.serve_until_enrolled(args.timeout)

    if not asyncio.run(serve()):
        raise ConfigurationError(f"not enrolled within {args.timeout:g} s; nothing stored")
    print(f"enrolled; credentials in {args.state_dir}")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m device.ble_enrollment``: wait for a station to enroll this device
    over BLE (bumble on the board's controller, e.g. ``--hci hci-socket:0``)."""
    p = argparse.ArgumentParser(prog="python -m device.ble_enrollment",
                                description=main.__doc__)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        command(args)
    except TesseraError as exc:
        print(f"tessera-agent: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
