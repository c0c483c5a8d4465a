"""Benchmark suites: each names how many worker nodes it needs and builds its scenarios.

To add one, write a function ``(grid, options) -> list[Scenario]`` and register it with
``@suite(name, description, nodes=...)``; ``python -m benchmarks`` runs every registered suite on
every broker (or those given with ``--suite``), starting ``nodes`` identical workers for it.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable
from dataclasses import dataclass

from .grid import Grid
from .runner import Scenario

__all__ = ["SUITES", "Suite", "suite"]

#: Targets of the benchmark issue: ratios of medians against stock Celery.
HIT_TARGET = 0.07
COLD_TARGET = 0.9
#: Seconds any single round trip may take before the run is called broken.
TIMEOUT = 30.0


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    nodes: int
    build: Callable[[Grid, argparse.Namespace], list[Scenario]]


SUITES: dict[str, Suite] = {}


def suite(name: str, description: str, nodes: int = 1):
    def register(build: Callable[[Grid, argparse.Namespace], list[Scenario]]):
        SUITES[name] = Suite(name, description, nodes, build)
        return build

    return register


def _check(got, want, what: str) -> None:
    if got != want:
        raise AssertionError(f"{what} returned {got!r}, expected {want!r}")


@suite("roundtrip", "one client, sequential round trips: girder cache hit / cold call vs stock Celery")
def roundtrip(grid: Grid, options: argparse.Namespace) -> list[Scenario]:
    m = grid.app_module
    inc, plain_inc = m.inc, m.plain_inc

    # Cache hits cycle over a set of requests computed (untimed) before any measuring.
    memoized = list(range(64))
    for x in memoized:
        _check(inc.call(x), x + 1, f"inc.call({x})")
    hit_args = itertools.cycle(memoized)

    def hit() -> None:
        x = next(hit_args)
        _check(inc.call(x), x + 1, "inc.call (hit)")

    # Cold calls and stock calls draw fresh, disjoint arguments: nothing is ever memoized.
    cold_args = itertools.count(1_000_000_000)
    stock_args = itertools.count(2_000_000_000)

    def cold() -> None:
        x = next(cold_args)
        _check(inc.call(x), x + 1, "inc.call (cold)")

    def stock() -> None:
        x = next(stock_args)
        _check(plain_inc.delay(x).get(timeout=TIMEOUT), x + 1, "plain_inc.delay().get()")

    return [
        Scenario("stock", options.cold, stock, warmup=options.warmup, note="plain_inc.delay(x).get()"),
        Scenario(
            "girder cold",
            options.cold,
            cold,
            warmup=options.warmup,
            baseline="stock",
            target=COLD_TARGET,
            note="inc.call(x), fresh x",
        ),
        Scenario(
            "girder hit",
            options.hits,
            hit,
            warmup=options.warmup,
            baseline="stock",
            target=HIT_TARGET,
            note="inc.call(x), x memoized",
        ),
    ]
