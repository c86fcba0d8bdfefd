"""A small, robust timer shared by the benchmarks.

Every figure is measured the same way:

* the operation runs in *batches* of ``per_batch`` operations; each batch is timed
  with :func:`time.perf_counter_ns` and divided by its operation count;
* a few warm-up batches run first and are thrown away (caches, lazy imports, the
  specialising interpreter);
* the garbage collector is paused while batches run (as :mod:`timeit` does), so a
  collection triggered by one benchmark's garbage is not billed to another;
* the result is the **median** per-operation time over all batches, with the 10th and
  90th percentiles to show the spread.

A batch is a callable ``batch(n) -> elapsed_ns`` that performs ``n`` operations and
returns the nanoseconds it wants billed. Most batches time their whole loop (see
:func:`loop_batch`); a batch that must exclude part of its work (the TLS client in a
handshake, say) times only the part it measures and returns that sum.

Operations that may run only once per input (a sequence number verifies once, a
handshake nonce is accepted once) draw their inputs from a :class:`Feed` of
pre-generated inputs, sliced *before* the clock starts.
"""

from __future__ import annotations

import gc
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import repeat
from time import perf_counter_ns
from typing import Any, Generic, TypeVar

T = TypeVar("T")

Batch = Callable[[int], int]


@dataclass(frozen=True)
class Plan:
    """How many batches, of how many operations, with how much warm-up."""

    batches: int
    per_batch: int
    warmup: int = 3

    def scaled(self, quick: bool) -> Plan:
        """The plan for ``--quick``: few, short batches (CI smoke run, not a figure)."""
        if not quick:
            return self
        return Plan(
            batches=max(5, self.batches // 6),
            per_batch=max(1, self.per_batch // 10),
            warmup=1,
        )

    @property
    def total(self) -> int:
        """Operations this plan performs, warm-up included (inputs to pre-generate)."""
        return (self.batches + self.warmup) * self.per_batch


@dataclass(frozen=True)
class Stats:
    """Per-operation times in microseconds over the batches of one measurement."""

    median_us: float
    p10_us: float
    p90_us: float
    batches: int
    per_batch: int

    def as_dict(self) -> dict[str, float | int]:
        return {
            "median_us": round(self.median_us, 4),
            "p10_us": round(self.p10_us, 4),
            "p90_us": round(self.p90_us, 4),
            "batches": self.batches,
            "per_batch": self.per_batch,
        }


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` (0..100) of already sorted values."""
    if not sorted_values:
        raise ValueError("no values")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    frac = pos - lo
    return sorted_values[lo] * (1.0 - frac) + sorted_values[hi] * frac


def measure(batch: Batch, plan: Plan) -> Stats:
    """Run ``plan.warmup`` discarded batches, then ``plan.batches`` timed ones."""
    n = plan.per_batch
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(plan.warmup):
            batch(n)
        per_op_ns = [batch(n) / n for _ in range(plan.batches)]
    finally:
        if was_enabled:
            gc.enable()
    per_op_ns.sort()
    return Stats(
        median_us=statistics.median(per_op_ns) / 1000.0,
        p10_us=percentile(per_op_ns, 10) / 1000.0,
        p90_us=percentile(per_op_ns, 90) / 1000.0,
        batches=plan.batches,
        per_batch=n,
    )


def loop_batch(op: Callable[[], Any]) -> Batch:
    """A batch that calls ``op()`` ``n`` times and bills the whole loop."""

    def batch(n: int) -> int:
        t0 = perf_counter_ns()
        for _ in repeat(None, n):
            op()
        return perf_counter_ns() - t0

    return batch


class Feed(Generic[T]):
    """Pre-generated single-use inputs, handed out in slices outside the timed region."""

    def __init__(self, items: Sequence[T]) -> None:
        self._items = items
        self._next = 0

    def take(self, n: int) -> Sequence[T]:
        start = self._next
        end = start + n
        if end > len(self._items):
            raise RuntimeError(
                f"feed exhausted: {len(self._items)} inputs pre-generated, {end} needed"
            )
        self._next = end
        return self._items[start:end]

    def __len__(self) -> int:
        return len(self._items) - self._next


def loop_overhead(plan: Plan) -> Stats:
    """The cost of the timing loop itself with a no-op body (for the reader's scale)."""
    return measure(loop_batch(_noop), plan)


def _noop() -> None:
    return None
