"""``python -m bench metrics``: the cost of the broker's metrics on the message path.

The broker counts every message and times every verify (``broker_plugin.metrics``), so
``Counter.inc()`` and ``Histogram.observe()`` sit on the hot path. Measured beside the
same calls on prometheus_client (the ecosystem's client library, the peer) in the
same run. Targets (moved here from the unit tests, where a wall-clock bound fails on a
loaded machine): inc at most 2 µs, observe at most 5 µs.
"""

from __future__ import annotations

import argparse

from broker_plugin.metrics import VERIFY_BUCKETS, BrokerMetrics

from .report import Report
from .timing import Plan, loop_batch, measure

TARGET_INC_US = 2.0
TARGET_OBSERVE_US = 5.0


def collect(quick: bool) -> Report:
    report = Report("metrics", quick=quick)
    plan = Plan(batches=30, per_batch=20_000).scaled(quick)
    ours = BrokerMetrics()
    inc = report.figure("tessera_inc", "tessera Counter.inc()",
                        measure(loop_batch(ours.messages_in.inc), plan))
    observe = report.figure("tessera_observe", "tessera Histogram.observe()",
                            measure(loop_batch(lambda: ours.verify_seconds.observe(3.3e-5)),
                                    plan))
    try:
        import prometheus_client
    except ImportError:
        report.note("prometheus_client is not installed: no peer figures")
    else:
        registry = prometheus_client.CollectorRegistry()
        counter = prometheus_client.Counter("peer_messages", "peer", registry=registry)
        histogram = prometheus_client.Histogram("peer_verify_seconds", "peer",
                                                buckets=VERIFY_BUCKETS, registry=registry)
        report.figure("prometheus_client_inc", "prometheus_client Counter.inc()",
                      measure(loop_batch(counter.inc), plan))
        report.figure("prometheus_client_observe", "prometheus_client Histogram.observe()",
                      measure(loop_batch(lambda: histogram.observe(3.3e-5)), plan))
        report.ratio("inc_vs_prometheus_client", "tessera inc / prometheus_client inc",
                     "tessera_inc", "prometheus_client_inc")
        report.ratio("observe_vs_prometheus_client",
                     "tessera observe / prometheus_client observe",
                     "tessera_observe", "prometheus_client_observe")
    report.target("inc_us", "Counter.inc()", inc.median_us, "<=", TARGET_INC_US, "µs")
    report.target("observe_us", "Histogram.observe()", observe.median_us, "<=",
                  TARGET_OBSERVE_US, "µs")
    return report


def run(args: argparse.Namespace) -> int:
    report = collect(quick=args.quick)
    print(report.table())
    if args.json:
        print(report.json_line())
    return 0
