"""The measuring core: scenarios, interleaved timed rounds, statistics and the report table.

A ``Scenario`` is one kind of round trip (a callable that performs one and checks its answer).
``measure`` warms every scenario up, then runs them in rounds, each round a slice of every
scenario in a rotated order, so slow drift (a growing Redis, a warming broker) spreads evenly over
all of them instead of favouring whichever ran first. Figures are medians and p90s of the
per-round-trip wall times measured with ``perf_counter_ns`` in the one client process.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Result", "Scenario", "format_table", "measure"]


@dataclass
class Scenario:
    """One kind of round trip, timed ``n`` times after ``warmup`` untimed runs.

    ``step`` performs one round trip and raises if the answer is wrong. ``baseline`` names the
    scenario this one is compared with (ratio of medians), ``target`` the largest ratio that
    meets the goal.
    """

    name: str
    n: int
    step: Callable[[], Any]
    warmup: int = 20
    baseline: str | None = None
    target: float | None = None
    note: str = ""


@dataclass
class Result:
    """The timings of one scenario, in nanoseconds, and its figures in milliseconds."""

    scenario: Scenario
    samples_ns: list[int] = field(default_factory=list)
    baseline: Result | None = None

    @property
    def name(self) -> str:
        return self.scenario.name

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ns) / 1e6

    @property
    def p90_ms(self) -> float:
        # Nearest-rank p90: an observed sample, never interpolated.
        ordered = sorted(self.samples_ns)
        return ordered[math.ceil(0.9 * len(ordered)) - 1] / 1e6

    @property
    def mean_ms(self) -> float:
        return statistics.fmean(self.samples_ns) / 1e6

    @property
    def min_ms(self) -> float:
        return min(self.samples_ns) / 1e6

    @property
    def ratio(self) -> float | None:
        """Median over the baseline's median, unrounded."""
        if self.baseline is None:
            return None
        return self.median_ms / self.baseline.median_ms

    @property
    def passed(self) -> bool | None:
        if self.scenario.target is None or self.ratio is None:
            return None
        return self.ratio <= self.scenario.target

    def as_dict(self) -> dict[str, Any]:
        return {
            "n": len(self.samples_ns),
            "median_ms": self.median_ms,
            "p90_ms": self.p90_ms,
            "mean_ms": self.mean_ms,
            "min_ms": self.min_ms,
            "baseline": self.scenario.baseline,
            "ratio": self.ratio,
            "target": self.scenario.target,
            "passed": self.passed,
            "note": self.scenario.note,
        }


def measure(scenarios: list[Scenario], rounds: int = 10) -> dict[str, Result]:
    """Warm every scenario up, then time them in ``rounds`` interleaved, rotated rounds."""
    names = [s.name for s in scenarios]
    if len(set(names)) != len(names):
        raise ValueError(f"scenario names must be unique: {names}")
    results = {s.name: Result(s) for s in scenarios}
    for r in results.values():
        if r.scenario.baseline is not None:
            r.baseline = results[r.scenario.baseline]
    # Warm-up: interleaved too, so every path (connections, scripts, pools) is hot before timing.
    for i in range(max(s.warmup for s in scenarios)):
        for s in scenarios:
            if i < s.warmup:
                s.step()
    clock = time.perf_counter_ns
    for rnd in range(rounds):
        shift = rnd % len(scenarios)
        for s in scenarios[shift:] + scenarios[:shift]:
            size = s.n * (rnd + 1) // rounds - s.n * rnd // rounds
            samples = results[s.name].samples_ns
            step = s.step
            for _ in range(size):
                t0 = clock()
                step()
                samples.append(clock() - t0)
    return results


def _ceil(value: float, places: int = 3) -> float:
    scale = 10**places
    return math.ceil(value * scale) / scale


def format_table(title: str, results: dict[str, Result]) -> str:
    """A side-by-side table; ratios are rounded up, so they never look better than measured."""
    header = ("scenario", "n", "median ms", "p90 ms", "vs baseline", "target", "")
    rows = []
    for r in results.values():
        ratio = "" if r.ratio is None else f"{_ceil(r.ratio):.3f}x {r.scenario.baseline}"
        target = "" if r.scenario.target is None else f"<= {r.scenario.target:g}x"
        verdict = {None: "", True: "PASS", False: "FAIL"}[r.passed]
        rows.append((r.name, str(len(r.samples_ns)), f"{r.median_ms:.3f}", f"{r.p90_ms:.3f}", ratio, target, verdict))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    right = {1, 2, 3}

    def line(row: tuple[str, ...]) -> str:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    rule = "-" * len(line(header))
    return "\n".join([title, rule, line(header), rule, *(line(row) for row in rows), rule])
