"""Prometheus metrics: the exposition format 0.0.4 as prometheus_client reads it, thread
safety, HTTP. (The hot path's cost is measured by ``python -m bench metrics``.)"""

from __future__ import annotations

import math
import platform
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker_plugin.metrics import (
    CONTENT_TYPE,
    VERIFY_BUCKETS,
    BrokerMetrics,
    Counter,
    Gauge,
    Histogram,
    Registry,
    format_value,
)
from structauth.errors import ConfigurationError, Reason, StateError

# -- the exposition, read by prometheus_client's own parser -----------------------------------
# (the format is Prometheus's: our output is read by the reference client library's
# parser, not by one written here; the checks below add what that parser lets pass)


@dataclass
class Family:
    name: str
    help: str = ""
    type: str = ""
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)


def parse(body: bytes) -> dict[str, Family]:
    """Parse an exposition with prometheus_client.parser; then every family must have
    HELP and TYPE and appear once, and histograms must be consistent (check_histogram).
    Families are keyed by the name in the exposition (a counter's with ``_total``)."""
    text = body.decode("utf-8")
    assert text.endswith("\n") and not text.endswith("\n\n"), "one final newline"
    families: dict[str, Family] = {}
    for metric in text_string_to_metric_families(text):
        # the parser files a sample without HELP/TYPE under a family of its own, typed
        # "unknown"; and it names a counter family without its _total suffix
        assert metric.type in ("counter", "gauge", "histogram"), f"{metric.name}: no TYPE"
        assert metric.documentation, f"{metric.name}: no HELP"
        name = metric.name + "_total" if metric.type == "counter" else metric.name
        assert name not in families, f"family {name} appears twice"
        families[name] = Family(name, metric.documentation, metric.type,
                                [(s.name, dict(s.labels), float(s.value))
                                 for s in metric.samples])
    for fam in families.values():
        if fam.type == "histogram":
            check_histogram(fam)
    return families


def check_histogram(fam: Family) -> None:
    series: dict[tuple[tuple[str, str], ...], list[tuple[str, dict[str, str], float]]] = {}
    for sample in fam.samples:
        key = tuple(sorted((k, v) for k, v in sample[1].items() if k != "le"))
        series.setdefault(key, []).append(sample)
    for samples in series.values():
        buckets = [(float(labels["le"]), v) for n, labels, v in samples if n.endswith("_bucket")]
        assert buckets and buckets[-1][0] == math.inf, "last bucket must be le=+Inf"
        bounds = [b for b, _ in buckets]
        assert bounds == sorted(bounds) and len(set(bounds)) == len(bounds)
        counts = [c for _, c in buckets]
        assert counts == sorted(counts), "buckets must be cumulative"
        (count,) = [v for n, _, v in samples if n == fam.name + "_count"]
        (_sum,) = [v for n, _, v in samples if n == fam.name + "_sum"]
        assert count == counts[-1], "_count must equal the +Inf bucket"
        names = [n for n, _, _ in samples]
        assert names[-2:] == [fam.name + "_sum", fam.name + "_count"]


def value(
    families: dict[str, Family], name: str, sample: str | None = None, **labels: str
) -> float:
    (v,) = [v for n, lab, v in families[name].samples if n == (sample or name) and lab == labels]
    return v


# -- format --------------------------------------------------------------------------------
def test_counter_gauge_and_escaping() -> None:
    reg = Registry()
    c = reg.counter("t_requests_total", 'Requests with "quotes", a \\ and a\nnewline.', ["path"])
    g = reg.gauge("t_temperature", "Plain gauge.")
    tricky = 'a\\b"c\nd'
    c.labels(path=tricky).inc()
    c.labels(tricky).inc(2.5)
    c.labels(path="/plain").inc()
    g.set(-3.5)
    g.inc(1)
    body = reg.render()
    text = body.decode()
    assert '# HELP t_requests_total Requests with "quotes", a \\\\ and a\\nnewline.\n' in text
    assert "# TYPE t_requests_total counter\n" in text
    assert 't_requests_total{path="a\\\\b\\"c\\nd"} 3.5\n' in text
    assert 't_requests_total{path="/plain"} 1\n' in text
    assert "t_temperature -2.5\n" in text
    fams = parse(body)
    assert fams["t_requests_total"].help == 'Requests with "quotes", a \\ and a\nnewline.'
    assert value(fams, "t_requests_total", path=tricky) == 3.5
    assert value(fams, "t_temperature") == -2.5
    assert [f for f in fams] == ["t_requests_total", "t_temperature"]  # registration order


def test_histogram_buckets_are_cumulative_with_inf() -> None:
    reg = Registry()
    h = reg.histogram("t_verify_seconds", "Verify time.")
    for v in (1e-6, 1e-6, 3e-6, 2e-5, 0.01, 0.5):
        h.observe(v)
    fams = parse(reg.render())
    text = reg.render().decode()
    assert 't_verify_seconds_bucket{le="1e-06"} 2\n' in text  # le is inclusive
    assert 't_verify_seconds_bucket{le="5e-06"} 3\n' in text
    assert 't_verify_seconds_bucket{le="0.01"} 5\n' in text
    assert 't_verify_seconds_bucket{le="+Inf"} 6\n' in text
    assert "t_verify_seconds_count 6\n" in text
    assert value(fams, "t_verify_seconds", "t_verify_seconds_sum") == pytest.approx(0.510025)
    assert len([s for s in fams["t_verify_seconds"].samples if s[0].endswith("_bucket")]) == (
        len(VERIFY_BUCKETS) + 1
    )
    cumulative, total, count = h.snapshot()
    assert cumulative == [2, 2, 3, 3, 4, 4, 4, 4, 4, 4, 4, 4, 5, 6] and count == 6
    assert total == pytest.approx(0.510025)
    with h.time():
        pass
    assert h.snapshot()[2] == 7


def test_labelled_histogram_puts_le_last() -> None:
    reg = Registry()
    h = reg.histogram("t_lat_seconds", "Latency.", ["op"], buckets=[0.1, 1, math.inf])
    h.labels(op="x").observe(0.5)
    h.labels(op="y").observe(5)
    text = reg.render().decode()
    assert 't_lat_seconds_bucket{op="x",le="0.1"} 0\n' in text
    assert 't_lat_seconds_bucket{op="x",le="1"} 1\n' in text
    assert 't_lat_seconds_bucket{op="y",le="+Inf"} 1\n' in text
    assert 't_lat_seconds_count{op="y"} 1\n' in text
    parse(reg.render())


def test_empty_labelled_family_renders_help_and_type_only() -> None:
    reg = Registry()
    reg.counter("t_things_total", "Things.", ["kind"])
    assert reg.render() == b"# HELP t_things_total Things.\n# TYPE t_things_total counter\n"
    parse(reg.render())


def test_format_value() -> None:
    assert [format_value(v) for v in (0, 3.0, 2.5, 1e-6, math.inf, -math.inf, math.nan)] == [
        "0", "3", "2.5", "1e-06", "+Inf", "-Inf", "NaN",
    ]  # fmt: skip


def test_misuse_is_refused() -> None:
    reg = Registry()
    c = reg.counter("t_c_total", "C.", ["a", "b"])
    for bad in (
        lambda: c.inc(),
        lambda: c.labels(a="1"),
        lambda: c.labels("1"),
        lambda: c.labels(a="1", c="2"),
        lambda: c.labels("1", b="2"),
        lambda: Counter("t_x_total", "X.").labels("v"),
        lambda: Counter("t_x_total", "X.").inc(-1),
        lambda: Gauge("t_g", "G.", ["k"]).set(1),
        lambda: Histogram("t_h", "H.", ["k"]).observe(1),
        lambda: reg.counter("t_c_total", "again"),
        lambda: Counter("bad-name", "x"),
        lambda: Counter("t_ok", "x", ["__reserved"]),
        lambda: Counter("t_ok", "x", ["a", "a"]),
        lambda: Histogram("t_h", "H.", ["le"]),
        lambda: Histogram("t_h", "H.", buckets=[1, 1]),
        lambda: Histogram("t_h", "H.", buckets=[]),
    ):
        with pytest.raises(StateError) as err:
            bad()
        assert err.value.reason is Reason.BAD_PARAMETERS
    assert c.labels("1", "2") is c.labels(a="1", b="2")


# -- broker metrics --------------------------------------------------------------------------
def test_broker_metrics_families() -> None:
    m = BrokerMetrics()
    m.handshakes_ok.inc()
    m.handshakes_refused.inc()
    m.rejected(Reason.BAD_TAG)
    m.rejected(Reason.BAD_TAG)
    m.rejected("acl_denied")
    m.active_sessions.inc()
    m.active_sessions.inc()
    m.active_sessions.dec()
    m.verify_seconds.observe(4e-6)
    m.messages_in.inc()
    m.step_ups_failed.inc()
    m.revocation_disconnects.inc()
    m.quarantined_devices.set(2)
    fams = parse(m.render())
    types = {name: fam.type for name, fam in fams.items()}
    assert types == {
        "tessera_handshakes_total": "counter",
        "tessera_rejections_total": "counter",
        "tessera_active_sessions": "gauge",
        "tessera_verify_seconds": "histogram",
        "tessera_messages_total": "counter",
        "tessera_step_ups_total": "counter",
        "tessera_revocation_disconnects_total": "counter",
        "tessera_quarantined_devices": "gauge",
        "tessera_build_info": "gauge",
    }
    assert value(fams, "tessera_handshakes_total", result="ok") == 1
    assert value(fams, "tessera_rejections_total", reason="bad_tag") == 2
    assert value(fams, "tessera_rejections_total", reason="replayed") == 0  # present from start
    assert value(fams, "tessera_rejections_total", reason="acl_denied") == 1
    assert value(fams, "tessera_active_sessions") == 1
    assert value(fams, "tessera_messages_total", direction="out") == 0
    assert value(fams, "tessera_step_ups_total", result="failed") == 1
    assert value(fams, "tessera_revocation_disconnects_total") == 1
    assert value(fams, "tessera_quarantined_devices") == 2
    from importlib.metadata import version
    assert value(fams, "tessera_build_info", version=version("tessera"),
                 python=platform.python_version()) == 1
    assert value(fams, "tessera_verify_seconds", "tessera_verify_seconds_bucket", le="5e-06") == 1


# -- threads -------------------------------------------------------------------------------------
def test_concurrent_updates_lose_nothing_and_scrapes_stay_consistent() -> None:
    m = BrokerMetrics()
    threads, n = 4, 5000
    stop = threading.Event()
    scrapes: list[bytes] = []

    def update() -> None:
        for i in range(n):
            m.messages_in.inc()
            m.rejected(Reason.REPLAYED)
            m.verify_seconds.observe(i * 1e-6)
            m.active_sessions.inc()

    def scrape() -> None:
        while not stop.is_set():
            scrapes.append(m.render())

    scraper = threading.Thread(target=scrape)
    scraper.start()
    workers = [threading.Thread(target=update) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stop.set()
    scraper.join()
    fams = parse(m.render())
    assert value(fams, "tessera_messages_total", direction="in") == threads * n
    assert value(fams, "tessera_rejections_total", reason="replayed") == threads * n
    assert value(fams, "tessera_active_sessions") == threads * n
    assert value(fams, "tessera_verify_seconds", "tessera_verify_seconds_count") == threads * n
    assert scrapes
    for body in scrapes[:: max(1, len(scrapes) // 20)]:
        parse(body)  # every scrape taken mid-update is a valid, consistent histogram


# -- HTTP ------------------------------------------------------------------------------------------
def test_scrape_over_http() -> None:
    m = BrokerMetrics()
    m.handshakes_ok.inc(3)
    with m.serve("127.0.0.1", 0) as server:
        assert server.url == f"http://127.0.0.1:{server.port}/metrics"
        with urllib.request.urlopen(server.url, timeout=5) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == CONTENT_TYPE
            body = resp.read()
        assert body == m.render()
        assert value(parse(body), "tessera_handshakes_total", result="ok") == 3
        m.handshakes_ok.inc()
        with urllib.request.urlopen(server.url + "?x=1", timeout=5) as resp:
            assert value(parse(resp.read()), "tessera_handshakes_total", result="ok") == 4
        head = urllib.request.Request(server.url, method="HEAD")
        with urllib.request.urlopen(head, timeout=5) as resp:
            assert resp.status == 200 and resp.read() == b""
        for path in ("/", "/metrics/x", "/favicon.ico"):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=5)
            assert err.value.code == 404
            err.value.close()
        with pytest.raises(ConfigurationError):
            m.serve("127.0.0.1", server.port)  # the port is taken


# -- the checks above can fail ----------------------------------------------------------------
# (the hot path's cost is a benchmark now: python -m bench metrics, beside prometheus_client)
@pytest.mark.parametrize(
    "bad",
    [
        b"# TYPE t counter\nt 1\n",  # no HELP
        b"# HELP t x\nt 1\n",  # no TYPE
        b"# HELP t x\n# TYPE t counter\nt 1",  # no final newline
        b'# HELP t x\n# TYPE t counter\nt{a="x"y"} 1\n',  # unescaped quote
        b"# HELP t x\n# TYPE t counter\nu 1\n",  # sample outside its family
        b'# HELP h x\n# TYPE h histogram\nh_bucket{le="1"} 2\nh_bucket{le="+Inf"} 1\n'
        b"h_sum 1\nh_count 1\n",  # not cumulative
        b'# HELP h x\n# TYPE h histogram\nh_bucket{le="1"} 1\nh_sum 1\nh_count 1\n',  # no +Inf
        b'# HELP h x\n# TYPE h histogram\nh_bucket{le="+Inf"} 2\nh_sum 1\nh_count 1\n',
    ],
)
def test_the_format_checker_is_strict(bad: bytes) -> None:
    with pytest.raises((AssertionError, KeyError, ValueError)):
        parse(bad)
