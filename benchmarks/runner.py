"""The measuring core: scenarios, interleaved timed rounds, statistics and the report table.

A ``Scenario`` is one kind of round trip (a callable that performs one and checks its answer).
``measure`` warms every scenario up, then runs them in rounds, each round a slice of every
scenario in a rotated order, so slow drift (a growing Redis, a warming broker) spreads evenly over
all of them instead of favouring whichever ran first. Figures are medians and p90s of the
per-round-trip wall times measured with ``perf_counter_ns`` in the one client process.

A suite may instead return a ``Plan``: its scenarios, how many rounds to interleave them in,
``Figure``s derived from the measured medians (a per-child cost, an efficiency), notes to print,
a further stage to measure afterwards (other workers, say) and what to close at the end.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Figure", "Plan", "Result", "Scenario", "format_figures", "format_table", "measure", "run_plan"]


@dataclass
class Scenario:
    """One kind of round trip, timed ``n`` times after ``warmup`` untimed runs.

    ``step`` performs one round trip and raises if the answer is wrong, or, with ``check``,
    returns the answer and ``check`` (untimed) raises if it is wrong: for answers that take
    longer to check than a small part of the round trip. ``baseline`` names the scenario this
    one is compared with (ratio of medians), ``target`` the largest ratio that meets the goal.
    """

    name: str
    n: int
    step: Callable[[], Any]
    warmup: int = 20
    baseline: str | None = None
    target: float | None = None
    note: str = ""
    check: Callable[[Any], None] | None = None


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
            **({"samples_ms": [ns / 1e6 for ns in self.samples_ns]} if len(self.samples_ns) <= 100 else {}),
        }


@dataclass
class Figure:
    """A figure derived from measured medians, e.g. a per-child cost or a parallel efficiency.

    ``target`` is an upper bound, or a lower bound when ``higher_is_better``; it is judged on the
    unrounded value, and the printed value is rounded against the measured side (up for a cost,
    down for an efficiency), so it never looks better than measured.
    """

    name: str
    value: float
    unit: str  # "ms", "%" (value given as a fraction), "x" (a ratio)
    target: float | None = None
    higher_is_better: bool = False
    note: str = ""

    @property
    def passed(self) -> bool | None:
        if self.target is None:
            return None
        return self.value >= self.target if self.higher_is_better else self.value <= self.target

    def _show(self, value: float) -> str:
        if self.unit == "%":
            return f"{_round_against(value * 100, 1, self.higher_is_better):.1f}%"
        if self.unit == "x":
            return f"{_round_against(value, 3, self.higher_is_better):.3f}x"
        return f"{_round_against(value, 3, self.higher_is_better):.3f} {self.unit}"

    @property
    def shown(self) -> str:
        return self._show(self.value)

    @property
    def shown_target(self) -> str:
        if self.target is None:
            return ""
        if self.unit == "%":
            target = f"{self.target * 100:g}%"
        elif self.unit == "x":
            target = f"{self.target:g}x"
        else:
            target = f"{self.target:g} {self.unit}"
        return (">= " if self.higher_is_better else "<= ") + target

    def as_dict(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "unit": "fraction" if self.unit == "%" else self.unit,
            "target": self.target,
            "higher_is_better": self.higher_is_better,
            "passed": self.passed,
            "note": self.note,
        }


@dataclass
class Plan:
    """What a suite measures: scenarios interleaved in ``rounds`` rounds (None: ``--rounds``),
    ``derive`` turning every stage's results into figures, ``notes`` printed with the table,
    ``then`` building a further stage (measured after this one) and ``close`` run at the end."""

    scenarios: list[Scenario]
    rounds: int | None = None
    derive: Callable[[dict[str, Result]], list[Figure]] | None = None
    notes: list[str] = field(default_factory=list)
    then: Callable[[], Plan | None] | None = None
    close: Callable[[], None] | None = None


def run_plan(plan: Plan, default_rounds: int) -> tuple[dict[str, Result], list[Figure], list[str]]:
    """Measure a plan and its further stages; their results, derived figures and notes."""
    results: dict[str, Result] = {}
    stages: list[Plan] = []
    try:
        stage: Plan | None = plan
        while stage is not None:
            stages.append(stage)
            measured = measure(stage.scenarios, rounds=stage.rounds or default_rounds)
            clash = set(measured) & set(results)
            if clash:
                raise ValueError(f"scenario names repeated across stages: {sorted(clash)}")
            results.update(measured)
            stage = stage.then() if stage.then is not None else None
        figures = [f for s in stages if s.derive is not None for f in s.derive(results)]
        notes = [n for s in stages for n in s.notes]
        return results, figures, notes
    finally:
        for s in reversed(stages):
            if s.close is not None:
                s.close()


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
                _checked(s, s.step())
    clock = time.perf_counter_ns
    for rnd in range(rounds):
        shift = rnd % len(scenarios)
        for s in scenarios[shift:] + scenarios[:shift]:
            size = s.n * (rnd + 1) // rounds - s.n * rnd // rounds
            samples = results[s.name].samples_ns
            step = s.step
            for _ in range(size):
                t0 = clock()
                answer = step()
                samples.append(clock() - t0)
                _checked(s, answer)
    return results


def _checked(scenario: Scenario, answer: Any) -> None:
    if scenario.check is not None:
        scenario.check(answer)


def _ceil(value: float, places: int = 3) -> float:
    scale = 10**places
    return math.ceil(value * scale) / scale


def _round_against(value: float, places: int, higher_is_better: bool) -> float:
    """Round so that the shown value is never better than the measured one."""
    scale = 10**places
    return (math.floor if higher_is_better else math.ceil)(value * scale) / scale


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


def format_figures(figures: list[Figure], indent: str = "  ") -> str:
    """Derived figures, one a line: name, value, target and verdict, then how it was derived."""
    if not figures:
        return ""
    rows = []
    for f in figures:
        verdict = {None: "", True: "PASS", False: "FAIL"}[f.passed]
        rows.append((f.name, f.shown, f.shown_target, verdict))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = []
    for f, row in zip(figures, rows):
        cells = [row[0].ljust(widths[0]), row[1].rjust(widths[1]), row[2].ljust(widths[2]), row[3].ljust(widths[3])]
        note = f"({f.note})" if f.note else ""
        lines.append((indent + "  ".join([*cells, note])).rstrip())
    return "\n".join(lines)
