"""The benchmark runs end to end and emits a well-formed JSON report.

Only the shape is checked here. Timing targets are the benchmark's business: a slow or
busy CI machine must not fail the test suite, so no figure is compared to a target.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FIGURES = {
    "tessera_tag",
    "tessera_verify",
    "tessera_tag_sealed",
    "tessera_verify_sealed",
    "tessera_replay_reject",
    "jwt_es256_verify",
    "jwt_hs256_verify",
    "oscore_unprotect",
    "oscore_protect",
    "sa1_responder_handshake",
    "sa1_initiator_handshake",
    "tls13_server_handshake",
}
RATIOS = {
    "es256_over_verify",
    "hs256_over_verify",
    "oscore_unprotect_over_verify",
    "tls_over_sa1_responder",
}
TARGETS = {"verify_median", "es256_ratio", "oscore_ratio", "tls_ratio"}
ENV = {"python", "cryptography", "cryptography_openssl", "ssl_openssl", "cpu_model"}


@pytest.fixture(scope="module")
def quick_run() -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench", "sessions", "--quick", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_exits_cleanly(quick_run: subprocess.CompletedProcess[str]) -> None:
    assert quick_run.returncode == 0, quick_run.stderr[-4000:]


def test_last_line_is_the_json_report(quick_run: subprocess.CompletedProcess[str]) -> None:
    last = quick_run.stdout.strip().splitlines()[-1]
    report = json.loads(last)
    assert report["benchmark"] == "sessions"
    assert report["quick"] is True

    assert report["figures"].keys() >= FIGURES
    for key in FIGURES:
        fig = report["figures"][key]
        assert fig["median_us"] > 0
        assert fig["p10_us"] <= fig["median_us"] <= fig["p90_us"]
        assert report["medians_us"][key] == fig["median_us"]

    assert report["ratios"].keys() >= RATIOS
    assert all(v > 0 for v in report["ratios"].values())

    assert report["targets"].keys() >= TARGETS
    for target in report["targets"].values():
        assert isinstance(target["pass"], bool)  # a MISS is allowed; it is reported
    assert isinstance(report["all_targets_pass"], bool)

    assert report["env"].keys() >= ENV


def test_table_marks_every_target(quick_run: subprocess.CompletedProcess[str]) -> None:
    out = quick_run.stdout
    verdicts = out.count("[PASS]") + out.count("[MISS]")
    assert verdicts == len(TARGETS)


@pytest.mark.hardware
def test_enrollment_quick_run_reports_rates() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "enrollment", "--quick", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["benchmark"] == "enrollment" and report["quick"] is True
    assert set(report["rates"]) == {
        "enrollments_per_minute", "enrollment_latency_ms", "renewals_per_second"
    }
    assert all(v > 0 for v in report["rates"].values())
    assert "enrollments_over_azure_dps" in report["ratios"]
    assert "azure_dps" in report["targets"]


BROKER_RATES = {
    "plain_msgs_per_s", "plugin_msgs_per_s", "plain_broker_cpu_us_per_msg",
    "plugin_broker_cpu_us_per_msg", "host_python_us_per_msg", "plugin_rest_us_per_msg",
    "plain_msgs_per_s_idle_fleet", "plugin_msgs_per_s_idle_fleet",
    "sealed_fanout_msgs_per_s", "sealed_fanout_broker_cpu_us_per_msg",
    "handshakes_per_s", "handshake_latency_median_ms", "handshake_latency_p99_ms",
    "handshake_broker_cpu_us", "handshakes_per_s_returning", "plain_connects_per_s",
    "revocation_latency_median_ms", "revocation_latency_max_ms", "revoke_call_median_ms",
}
BROKER_FIGURES = {
    "host_acl_write", "host_on_message", "host_acl_read", "host_on_tick", "host_handshake",
    "host_on_tick_idle_fleet", "fast_lane_route",
}


@pytest.mark.broker
def test_broker_quick_run_reports_rates() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "broker", "--quick", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["benchmark"] == "broker" and report["quick"] is True
    assert set(report["rates"]) == BROKER_RATES
    assert all(isinstance(v, float | int) and v >= 0 for v in report["rates"].values())
    assert set(report["figures"]) == BROKER_FIGURES
    assert set(report["ratios"]) == {
        "plugin_over_plain_throughput", "plugin_over_plain_throughput_idle_fleet",
        "sealed_fanout_over_plain_throughput"
    }
    assert set(report["targets"]) == {"throughput_ratio", "sealed_fanout_ratio", "revocation_max"}
    for target in report["targets"].values():
        assert isinstance(target["pass"], bool)  # a MISS is allowed; it is reported
    assert report["env"].keys() >= {"python", "cpu_model", "mosquitto", "paho_mqtt"}
    rounds = report["throughput"]["rounds_detail"]
    assert {r["mode"] for r in rounds} == {"plain", "plugin"}
    assert report["storm"]["first_contact"] and report["revocation"]["devices"] > 0
    assert done.stdout.count("[PASS]") + done.stdout.count("[MISS]") == 3
