"""Tessera benchmarks: ``python -m bench <subcommand> [--json] [--quick]``.

Each subcommand is a module in this package with ``add_arguments(parser)`` and
``run(args) -> int``; :data:`SUBCOMMANDS` names them so that ``__main__`` imports only
the one that runs. Benchmarks print a table (figure, value, unit), ratios against the
project's targets with PASS/MISS, and with ``--json`` a last line holding one JSON
object with every figure. A MISS is reported, never turned into a failing exit code:
timing belongs to the benchmark, pass/fail belongs to the tests.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Subcommand:
    name: str
    module: str
    help: str


SUBCOMMANDS: dict[str, Subcommand] = {
    s.name: s
    for s in (
        Subcommand(
            "sessions",
            "bench.sessions",
            "per-message tag/verify and handshake CPU vs pyjwt, OSCORE and TLS 1.3",
        ),
        Subcommand(
            "enrollment",
            "bench.enrollment",
            "end-to-end TPM enrollments per minute and renewals per second (vs Azure DPS)",
        ),
        Subcommand(
            "broker",
            "bench.broker",
            "Mosquitto with the Tessera plugin: throughput vs plain, connect storm, revocation",
        ),
        Subcommand(
            "coap",
            "bench.coap",
            "CoAP requests/s: plain vs Tessera proven/sealed vs OSCORE; first request vs EDHOC",
        ),
        Subcommand(
            "drift",
            "bench.drift",
            "agents with drifting and stepping clocks through Mosquitto: lost, duplicated, "
            "quarantined",
        ),
        Subcommand(
            "fleet",
            "bench.fleet",
            "three brokers behind HAProxy: 1,000-device soak (lost, duplicated, false "
            "rejects, memory slope), 1/2/3-broker scaling, revocation across brokers",
        ),
        Subcommand(
            "metrics",
            "bench.metrics",
            "the broker's metrics on the message path (inc, observe) vs prometheus_client",
        ),
        Subcommand(
            "service_limits",
            "bench.service_limits",
            "what hostile clients can make the provisioning service hold (100 MiB uploads, "
            "slow clients, long polls at SIGTERM)",
        ),
        Subcommand(
            "ble",
            "bench.ble",
            "Bluetooth LE on the virtual radio: enrollment (radio vs TPM time, batch per "
            "minute) and SA1 over GATT at MTU 23 and 247",
        ),
    )
}
