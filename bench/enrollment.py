"""``python -m bench enrollment``: end-to-end TPM enrollments per minute and renewals
per second, against Azure DPS's documented 1,000 registrations per minute per service
instance.

Everything is real and on this machine: swtpm devices (one per enrollment: a TPM's
EK enrolls once), the provisioning service as a child process (`tessera serve`, the
authority key in SoftHSM2, SQLite registry), HTTP on 127.0.0.1. The device side
(TPM evidence, activation) runs in this process in worker threads, so the 2 cores are
shared by the service, the devices' TPMs and their agents.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

from .report import Report

AZURE_DPS_PER_MINUTE = 1000.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--devices", type=int, default=24, help="swtpm devices to enroll")
    parser.add_argument("--workers", type=int, default=4, help="concurrent enrollments")
    parser.add_argument("--renew-seconds", type=float, default=5.0)
    parser.add_argument("--registry", choices=("sqlite", "postgresql"), default="sqlite",
                        help="registry backend (postgresql: a private server on 127.0.0.1)")


def _progress(text: str) -> None:
    print(f"  {text} ...", file=sys.stderr, flush=True)


def collect(
    devices: int, workers: int, renew_seconds: float, quick: bool, registry: str = "sqlite"
) -> Report:
    from device.provisioner import ProvisionerClient, enroll_tpm, enroll_witnessed, renew
    from hw.software import InsecureSoftwareSigner
    from hw.tpm import TpmBackend
    from simulator.postgres import PostgresServer
    from simulator.provisioner import ProvisioningServer
    from simulator.softhsm import SoftHsm
    from simulator.swtpm import Swtpm

    if quick:
        devices, renew_seconds = min(devices, 3), min(renew_seconds, 1.0)
    report = Report("enrollment", quick=quick)
    with tempfile.TemporaryDirectory(prefix="tessera-bench-") as tmp, ExitStack() as stack:
        base = Path(tmp)
        registry_url = None
        if registry == "postgresql":
            _progress("starting PostgreSQL on 127.0.0.1 (not billed)")
            registry_url = stack.enter_context(PostgresServer()).create_database()
        _progress(f"manufacturing {devices} swtpm devices (not billed)")
        tpms = [Swtpm(base / f"tpm{i}").start() for i in range(devices)]
        try:
            roots = [p for t in tpms for p in t.manufacturer_ca_paths]
            with SoftHsm(base / "hsm") as hsm, ProvisioningServer(
                base / "authority", hsm, maker_roots=roots, registry_url=registry_url,
                # every renewer comes from 127.0.0.1: lift the per-source challenge rate
                # (the default, 10 then 1/s, is what one real device needs)
                limits={"renew_burst": 100_000, "renew_per_s": 100_000.0},
            ) as server:
                client = ProvisionerClient(server.url, operator_token=server.operator_token)

                def enroll(i: int) -> float:
                    t0 = time.perf_counter()
                    with TpmBackend(tpms[i].tcti, base / f"keys{i}") as backend:
                        enroll_tpm(client, backend, f"bench-{i:04d}")
                    return time.perf_counter() - t0

                _progress(f"enrolling {devices} devices, {workers} at a time")
                t0 = time.perf_counter()
                with ThreadPoolExecutor(workers) as pool:
                    latencies = sorted(pool.map(enroll, range(devices)))
                wall = time.perf_counter() - t0
                per_minute = devices / wall * 60
                report.rate("enrollments_per_minute", "TPM enrollments per minute (end to end)",
                            per_minute, "/min", f"{devices} devices in {wall:.1f} s")
                report.rate("enrollment_latency_ms", "one enrollment, median latency",
                            latencies[len(latencies) // 2] * 1000, "ms",
                            f"max {latencies[-1] * 1000:.0f} ms")

                _progress(f"renewing for {renew_seconds:.0f} s with {workers} clients")
                signer = InsecureSoftwareSigner.generate()
                enroll_witnessed(client, signer, "bench-renewer")
                stop = time.perf_counter() + renew_seconds
                count = [0] * workers

                def renewer(w: int) -> None:
                    c = ProvisionerClient(server.url)
                    while time.perf_counter() < stop:
                        renew(c, signer, "bench-renewer")
                        count[w] += 1

                t0 = time.perf_counter()
                threads = [threading.Thread(target=renewer, args=(w,)) for w in range(workers)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                elapsed = time.perf_counter() - t0
                report.rate("renewals_per_second", "renewals per second at the service",
                            sum(count) / elapsed, "/s", f"{sum(count)} in {elapsed:.1f} s")
        finally:
            for tpm in tpms:
                tpm.stop()
    ratio = per_minute / AZURE_DPS_PER_MINUTE
    report.ratios["enrollments_over_azure_dps"] = ratio
    report.target("azure_dps", "TPM enrollments per minute vs Azure DPS (1,000/min)",
                  per_minute, ">=", AZURE_DPS_PER_MINUTE, "/min")
    report.note("Each enrollment: start (nonce) -> TPM evidence (Certify by the AK over the "
                "nonce, EK certificate chain check, attribute checks, MakeCredential) -> "
                "ActivateCredential on the device -> one registry transaction that records the "
                "device and two credentials signed by the SoftHSM2 authority key.")
    report.note("Renewal: challenge + ECDSA proof of possession + one operational credential "
                "signed in SoftHSM2 + one registry transaction, over HTTP.")
    report.note(f"Azure DPS anchor: {AZURE_DPS_PER_MINUTE:.0f} registrations/min per service "
                "instance (its documented quota); ratio = Tessera / DPS.")
    report.info["setup"] = {"devices": devices, "workers": workers,
                            "renew_seconds": renew_seconds, "registry": registry}
    return report


def run(args: argparse.Namespace) -> int:
    report = collect(args.devices, args.workers, args.renew_seconds, args.quick, args.registry)
    print(report.table())
    if args.json:
        print(report.json_line())
    return 0
