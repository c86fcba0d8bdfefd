"""``python -m bench ble``: Bluetooth LE on the virtual radio with BLE timing.

* Enrollment of one device over GATT at ATT_MTU 247 and 23 (connection interval
  ``--interval-ms``, LE 1M PHY air time), split into radio time (GATT round trips,
  fragments, waiting for connection events), the device's TPM time (as the device
  measured it), the provisioning service's time (its checks, MakeCredential, signing
  with the authority key in SoftHSM2, the registry) and connecting.
* A batch of ``--batch`` devices on one station (``--parallel`` at a time):
  enrollments per minute.
* SA1 over GATT: handshake (msg1/msg2/msg3, swtpm keys on both ends) and a proven
  message round trip (device -> gateway -> device) at MTU 23 and 247.

Target (issue 16): the station is TPM-bound, not protocol-bound: radio and framing
below 20% of an enrollment at MTU 247 and over the batch. Everything is real on this
machine (swtpm per device, the service as a child process); the radio is bumble's
virtual controllers with :class:`simulator.ble.TimedLink` delaying every packet to the
next connection event. The machine's 2 cores are shared with the service and the swtpm
processes, and with other people's work: figures are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from .report import Report

CODE = "7K3QD-M9XPA"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=20, help="devices in the batch")
    parser.add_argument("--parallel", type=int, default=4, help="batch enrollments at once")
    parser.add_argument("--interval-ms", type=float, default=30.0,
                        help="BLE connection interval (default %(default)s ms)")
    parser.add_argument("--rounds", type=int, default=20, help="SA1 round trips per MTU")


def _progress(text: str) -> None:
    print(f"  {text} ...", file=sys.stderr, flush=True)


async def _enrollments(report: Report, base: Path, tpms: list[Any], server: Any,
                       interval: float, batch: int, parallel: int) -> None:
    from device.ble_enrollment import EnrollmentDevice, EnrollmentPeripheral, store_enrollment
    from device.provisioner import LocalTpm, ProvisionerClient
    from hw.tpm import TpmBackend
    from provisioning.ble_station import BleStation, Timing
    from simulator.ble import VirtualRadio

    radio = VirtualRadio(interval)
    client = ProvisionerClient(server.url, operator_token=server.operator_token)
    backends_open: list[TpmBackend] = []

    async def device(i: int, mtu: int) -> None:
        serial = f"bench-ble-{i:03d}"
        backend = TpmBackend(tpms[i].tcti, base / f"keys{i}")
        backends_open.append(backend)
        enrollment = EnrollmentDevice(LocalTpm(backend), serial, CODE, store_enrollment(
            base / f"state{i}", tcti=tpms[i].tcti, key_dir=str(base / f"keys{i}"),
            serial=serial))
        await EnrollmentPeripheral(radio.add_device(serial), enrollment).start(
            max_mtu=mtu, interval_ms=20)

    try:
        central = radio.add_device("station")
        await central.power_on()
        station = BleStation(client, backends=radio.bleak_backends(central, mtu=247))
        for i, mtu in enumerate((247, 23)):
            await device(i, mtu)
            found = await station.scan(timeout=5, stop_after=1)
            _progress(f"one enrollment at ATT_MTU {mtu}")
            air0 = radio.link.air_time
            done = await station.enroll(found[0], serial=f"bench-ble-{i:03d}", code=CODE)
            t = done.timing
            report.rate(f"enroll_mtu{mtu}_total_s", f"enrollment at MTU {mtu}: total", t.total,
                        "s", f"{t.fragments} fragments, {radio.link.air_time - air0:.3f} s "
                        "on air")
            report.rate(f"enroll_mtu{mtu}_radio_s", f"enrollment at MTU {mtu}: radio", t.radio,
                        "s", f"connect {t.connect:.3f} s")
            report.rate(f"enroll_mtu{mtu}_device_tpm_s",
                        f"enrollment at MTU {mtu}: device TPM", t.device_tpm, "s")
            report.rate(f"enroll_mtu{mtu}_service_s", f"enrollment at MTU {mtu}: service",
                        t.service, "s")
            overhead = (t.radio + t.connect) / t.total
            report.ratios[f"enroll_mtu{mtu}_protocol_share"] = overhead
            report.info[f"enroll_mtu{mtu}"] = {**t.to_json(), "mtu": done.mtu}
            if mtu == 247:
                report.target("enroll_247_protocol_share",
                              "radio + connect share of one enrollment at MTU 247",
                              overhead * 100, "<=", 20.0, "%")
            else:
                report.note(f"At ATT_MTU 23 radio + connect is {overhead * 100:.0f}% of an "
                            "enrollment (ten times the fragments, at most 6 per connection "
                            "event): the target is stated for 247, which BLE 4.2+ "
                            "controllers negotiate.")

        _progress(f"batch of {batch} devices, {parallel} at a time")
        for i in range(2, 2 + batch):
            await device(i, 247)
        found = await station.scan(timeout=5, stop_after=batch)
        gate = asyncio.Semaphore(parallel)
        timings: list[Timing] = []

        async def one(target: Any) -> None:
            async with gate:
                done = await station.enroll(target, code=CODE)
                timings.append(done.timing)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(t) for t in found))
        wall = time.perf_counter() - t0
        per_minute = len(timings) / wall * 60
        report.rate("batch_enrollments_per_minute", f"batch of {len(timings)}: enrollments/min",
                    per_minute, "/min", f"{wall:.1f} s, {parallel} at a time")
        radio_sum = sum(t.radio + t.connect for t in timings)
        queue_sum = sum(t.queue for t in timings)
        # waiting for another device's connection attempt is the station's schedule,
        # not this enrollment's work
        total_sum = sum(t.total - t.queue for t in timings)
        tpm_sum = sum(t.device_tpm for t in timings)
        service_sum = sum(t.service for t in timings)
        share = radio_sum / total_sum
        report.ratios["batch_protocol_share"] = share
        report.info["batch"] = {"devices": len(timings), "wall_s": round(wall, 3),
                                "radio_s": round(radio_sum, 3), "device_tpm_s": round(tpm_sum, 3),
                                "service_s": round(service_sum, 3),
                                "queue_s": round(queue_sum, 3),
                                "total_s": round(total_sum, 3)}
        report.target("batch_protocol_share",
                      "radio + connect share of the batch's enrollment time", share * 100,
                      "<=", 20.0, "%")
    finally:
        for backend in backends_open:
            backend.close()


async def _sa1(report: Report, tpm: Any, base: Path, interval: float, rounds: int) -> None:
    from device.ble_central import scan
    from device.ble_session import Sa1Central, Sa1Peripheral, sa1_link
    from hw.tpm import TpmBackend
    from simulator.ble import VirtualRadio
    from simulator.fleet import NOW, Fleet
    from structauth import gatt
    from structauth.handshake import Initiator, Responder

    with TpmBackend(tpm.tcti, base / "sa1-keys") as backend:
        fleet = Fleet()
        dev = fleet.member("device", "bench", signer=backend.get_or_create_signing_key("d"))
        gw = fleet.member("broker", "gw", signer=backend.get_or_create_signing_key("g"))
        for mtu in (23, 247):
            radio = VirtualRadio(interval)
            responder = Responder(signer=gw.signer, credential=gw.credential, trust=fleet.trust,
                                  peer_kind="device")

            async def echo(session: Any, msg: Any) -> None:
                await session.send(msg.topic + "/echo", msg.payload)

            await Sa1Peripheral(radio.add_device("gw"), responder, policy=lambda: NOW,
                                on_message=echo).start("gw", max_mtu=mtu)
            central_dev = radio.add_device("device")
            await central_dev.power_on()
            backends = radio.bleak_backends(central_dev, mtu=mtu)
            found = await scan(gatt.SA1_SERVICE, timeout=5, backends=backends, stop_after=1)
            link = sa1_link(found[0][0], backends=backends)
            await link.connect()
            initiator = Initiator(signer=dev.signer, credential=dev.credential,
                                  trust=fleet.trust, expected_peer=gw.identity)
            central = Sa1Central(link, initiator, policy=lambda: NOW)
            t0 = time.perf_counter()
            await central.open()
            handshake = time.perf_counter() - t0
            rtts = []
            payload = b"21.5" * 16  # a 64-byte reading
            for _ in range(rounds):
                t0 = time.perf_counter()
                await central.send("sensors/bench/t", payload)
                await central.receive()
                rtts.append(time.perf_counter() - t0)
            await central.close()
            report.rate(f"sa1_handshake_mtu{mtu}_ms", f"SA1 handshake over GATT, MTU {mtu}",
                        handshake * 1000, "ms", "swtpm signing on both ends")
            report.rate(f"sa1_rtt_mtu{mtu}_ms", f"proven round trip over GATT, MTU {mtu}",
                        statistics.median(rtts) * 1000, "ms",
                        f"p90 {sorted(rtts)[int(len(rtts) * 0.9) - 1] * 1000:.1f} ms, "
                        f"{rounds} rounds")


def collect(batch: int, parallel: int, interval_ms: float, rounds: int, quick: bool) -> Report:
    from simulator.provisioner import ProvisioningServer
    from simulator.softhsm import SoftHsm
    from simulator.swtpm import Swtpm

    if quick:
        batch, rounds = min(batch, 3), min(rounds, 5)
    interval = interval_ms / 1000
    report = Report("ble", quick=quick)
    with tempfile.TemporaryDirectory(prefix="tessera-bench-ble-") as tmp, ExitStack():
        base = Path(tmp)
        count = 2 + batch
        _progress(f"manufacturing {count} swtpm devices (not billed)")
        tpms = [Swtpm(base / f"tpm{i}").start() for i in range(count)]
        try:
            roots = [p for t in tpms for p in t.manufacturer_ca_paths]
            with SoftHsm(base / "hsm") as hsm, ProvisioningServer(
                    base / "authority", hsm, maker_roots=roots) as server:
                asyncio.run(_enrollments(report, base, tpms, server, interval, batch, parallel))
            _progress("SA1 over GATT at MTU 23 and 247")
            asyncio.run(_sa1(report, tpms[0], base, interval, rounds))
        finally:
            for t in tpms:
                t.stop()
    report.note(f"Radio: bumble virtual controllers, connection interval {interval_ms:g} ms, "
                "LE 1M PHY air time per packet, at most 6 packets per event and direction; a "
                "message's last fragment is a write with response. Nothing else of BLE is "
                "modelled (no loss, no retransmission, no channel hopping).")
    report.note("Enrollment time split: device TPM = what the device measured around its "
                "TPM calls; radio = the rest of each device step's round trip; service = the "
                "provisioning service's HTTP calls minus the device steps inside them.")
    report.note("The device's TPM is swtpm: its Certify, key creation and "
                "ActivateCredential take tens of ms, where a discrete TPM takes hundreds; "
                "the protocol share is measured against that fast TPM.")
    report.note("2 shared cores: the service, the swtpm processes and this process compete; "
                "other people's work on the machine makes every figure noisy.")
    report.info["setup"] = {"batch": batch, "parallel": parallel, "interval_ms": interval_ms,
                            "rounds": rounds}
    return report


def run(args: argparse.Namespace) -> int:
    report = collect(args.batch, args.parallel, args.interval_ms, args.rounds, args.quick)
    print(report.table())
    if args.json:
        print(report.json_line())
    return 0
