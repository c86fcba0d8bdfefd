"""Fixtures of the attack suite, and its summary line.

``world``: one real Mosquitto with the plugin, configured by `tessera broker config`,
shared by the MQTT cases; ``by``: the live device and the back-end sink beside it (a
case that disturbed them gets fresh ones for the next case, and fails itself).

At the end of a run that collected attack cases, one line sums them up:
``attack suite: N cases, R refused, G got through (K known: xfail awaiting a fix)``.
A passed case is an attack the system refused; a failed one got through; an xfail is
one that gets through today and has a fix on the way.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest

from simulator.fleet import Fleet
from tests.attacks.world import Bystanders, World

_outcomes: dict[str, str] = {}


def _is_attack(nodeid: str) -> bool:
    return "tests/attacks/" in nodeid or nodeid.startswith("attacks/")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not _is_attack(report.nodeid):
        return
    if report.when == "call" or (report.when == "setup" and not report.passed):
        if hasattr(report, "wasxfail"):
            outcome = "xfail" if report.skipped else "xpass"
        elif report.failed and "XPASS(strict)" in str(report.longrepr):
            outcome = "xpass"
        elif report.skipped:
            outcome = "skipped"
        else:
            outcome = "refused" if report.passed else "through"
        _outcomes[report.nodeid] = outcome
    elif report.when == "teardown" and report.failed:
        _outcomes[report.nodeid] = "through"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _outcomes:
        return
    counts = {k: 0 for k in ("refused", "through", "xfail", "xpass", "skipped")}
    for outcome in _outcomes.values():
        counts[outcome] += 1
    cases = sum(counts.values()) - counts["skipped"]
    through = counts["through"] + counts["xfail"]
    line = (f"attack suite: {cases} cases, {counts['refused'] + counts['xpass']} refused, "
            f"{through} got through")
    if counts["xfail"]:
        line += f" ({counts['xfail']} known: xfail awaiting a fix)"
    if counts["xpass"]:
        line += f"; {counts['xpass']} xfail now refused (remove their markers)"
    if counts["skipped"]:
        line += f"; {counts['skipped']} skipped"
    terminalreporter.write_sep("=", line)
    for nodeid, outcome in sorted(_outcomes.items()):
        if outcome in ("through", "xfail", "xpass"):
            terminalreporter.write_line(f"  {outcome:8} {nodeid}")


@pytest.fixture(scope="session")
def fleet() -> Fleet:
    return Fleet(t0=dt.datetime.now(dt.UTC) - dt.timedelta(days=1))


@pytest.fixture(scope="session")
def world(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(Path(tmp_path_factory.mktemp("broker")), fleet)
    try:
        yield w
    finally:
        w.close()


@pytest.fixture(scope="session")
def _bystanders(world: World) -> Iterator[list[Bystanders]]:
    held: list[Bystanders] = []
    yield held
    for b in held:
        with contextlib.suppress(Exception):
            b.stop()


@pytest.fixture
def by(world: World, _bystanders: list[Bystanders]) -> Iterator[Bystanders]:
    """The live device and the sink (shared while they stay undisturbed)."""
    if not _bystanders:
        _bystanders.append(Bystanders(world))
    current = _bystanders[0]
    yield current
    healthy = current.live.alive() and not current.live.unexpected and not current.sink.errors
    if not healthy:
        _bystanders.clear()
        with contextlib.suppress(Exception):
            current.stop()
