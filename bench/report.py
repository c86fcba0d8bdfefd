"""Collects a benchmark's figures, ratios and targets; prints a table and JSON."""

from __future__ import annotations

import json
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .timing import Stats

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
}


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    value: float
    unit: str
    spread: str = ""


@dataclass(frozen=True)
class Target:
    key: str
    label: str
    value: float
    op: str
    threshold: float
    unit: str

    @property
    def passed(self) -> bool:
        return _OPS[self.op](self.value, self.threshold)


@dataclass
class Report:
    name: str
    quick: bool = False
    figures: dict[str, Stats] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    ratios: dict[str, float] = field(default_factory=dict)
    ratio_rows: list[Row] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    rates: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def figure(self, key: str, label: str, stats: Stats) -> Stats:
        self.figures[key] = stats
        spread = f"p10 {_fmt(stats.p10_us)} / p90 {_fmt(stats.p90_us)}"
        self.rows.append(Row(key, label, stats.median_us, "µs", spread))
        return stats

    def rate(self, key: str, label: str, value: float, unit: str, detail: str = "") -> float:
        """A throughput figure (e.g. enrollments per minute), measured over a whole run."""
        self.rates[key] = value
        self.rows.append(Row(key, label, value, unit, detail))
        return value

    def median(self, key: str) -> float:
        return self.figures[key].median_us

    def ratio(self, key: str, label: str, numerator: str, denominator: str) -> float:
        value = self.median(numerator) / self.median(denominator)
        self.ratios[key] = value
        self.ratio_rows.append(Row(key, label, value, "x"))
        return value

    def target(self, key: str, label: str, value: float, op: str, threshold: float,
               unit: str) -> None:
        if op not in _OPS:
            raise ValueError(f"unknown comparison {op}")
        self.targets.append(Target(key, label, value, op, threshold, unit))

    def note(self, text: str) -> None:
        self.notes.append(text)

    @property
    def all_passed(self) -> bool:
        return all(t.passed for t in self.targets)

    # -- output -------------------------------------------------------------------
    def table(self) -> str:
        out: list[str] = []
        title = f"Tessera benchmark: {self.name}"
        title += " (--quick: smoke run, not a figure)" if self.quick else ""
        out.append(title)
        out.append("=" * len(title))
        width = max([len(r.label) for r in self.rows + self.ratio_rows] + [20])
        out.append(f"{'figure':<{width}}  {'median':>12}  unit  spread over batches")
        out.append(f"{'-' * width}  {'-' * 12}  ----  -------------------")
        for r in self.rows:
            out.append(f"{r.label:<{width}}  {_fmt(r.value):>12}  {r.unit:<4}  {r.spread}")
        if self.ratio_rows:
            out.append("")
            out.append("ratios (medians)")
            for r in self.ratio_rows:
                out.append(f"{r.label:<{width}}  {_fmt(r.value):>12}  {r.unit}")
        if self.targets:
            out.append("")
            out.append("targets")
            for t in self.targets:
                verdict = "PASS" if t.passed else "MISS"
                out.append(
                    f"  [{verdict}] {t.label}: {_fmt(t.value)} {t.unit} "
                    f"(target {t.op} {_fmt(t.threshold)} {t.unit})"
                )
            missed = [t.label for t in self.targets if not t.passed]
            if missed:
                out.append(f"  MISSED {len(missed)} of {len(self.targets)} targets")
            else:
                out.append(f"  all {len(self.targets)} targets met")
        if self.notes:
            out.append("")
            out.append("notes")
            out.extend(f"  - {n}" for n in self.notes)
        return "\n".join(out)

    def as_json(self) -> dict[str, Any]:
        return {
            "benchmark": self.name,
            "quick": self.quick,
            "unit": "us",
            "figures": {k: s.as_dict() for k, s in self.figures.items()},
            "medians_us": {k: round(s.median_us, 4) for k, s in self.figures.items()},
            "rates": {k: round(v, 3) for k, v in self.rates.items()},
            "ratios": {k: round(v, 3) for k, v in self.ratios.items()},
            "targets": {
                t.key: {
                    "label": t.label,
                    "value": round(t.value, 4),
                    "op": t.op,
                    "threshold": t.threshold,
                    "unit": t.unit,
                    "pass": t.passed,
                }
                for t in self.targets
            },
            "all_targets_pass": self.all_passed,
            **self.info,
        }

    def json_line(self) -> str:
        return json.dumps(self.as_json(), sort_keys=False, separators=(",", ":"))


def _fmt(v: float) -> str:
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"
