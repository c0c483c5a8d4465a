"""Benchmark suites: each names how many worker nodes it needs and builds its scenarios.

To add one, write a function ``(grid, options) -> list[Scenario] | Plan`` and register it with
``@suite(name, description, nodes=...)``; ``python -m benchmarks`` runs every registered suite on
every broker (or those given with ``--suite``), in registration order, starting ``nodes``
identical workers for it.

- ``roundtrip``: client round trips, girder (cache hit, cold) against stock Celery;
- ``inline``: the cost of one inline sub-request, from a parent requesting 1,000 children;
- ``fib``: memoized fib(500) as recursive sub-requests, from cold;
- ``bogosity``: the seed post's recursive workload on two nodes, against its ideal time and
  against Dask distributed running the same workload (and, extra, on gevent nodes);
- ``fanout``: one request fanning out to children of 20 ms on 1, 2 and 4 nodes;
- ``fanout-wide``: one request fanning out to 1,000 .. 100,000 trivial children on two nodes,
  per child and its growth with N, against a stock Celery group and Dask distributed;
- ``tree``: twelve nodes in a two-level pool tree: a fan-out of 2,000 children of 50 ms and a
  scaled-up bogosity, against their ideal makespans, where children ran, commands per request.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import redis

from .dag import bogosity_dag, critical_path, level_formula, optimal_slots
from .grid import BACKEND_DB, STORE_DB, Grid
from .runner import Figure, Plan, Result, Scenario

__all__ = ["SUITES", "Suite", "suite"]

#: Targets of the benchmark issue: ratios of medians against stock Celery.
HIT_TARGET = 0.07
COLD_TARGET = 0.9
#: Seconds any single round trip may take before the run is called broken.
TIMEOUT = 30.0
#: Inline suite: children per parent request, and the most one inline child may cost (ms).
CHILDREN = 1000
INLINE_TARGET_MS = 0.3
#: Fib suite: the top-level n (n + 1 distinct requests).
FIB_N = 500
#: Bogosity suite: the seed's launch, bogosity(msec, j, reclevel, numrecjobs, salt) for j < jobs,
#: and the least parallel efficiency (ideal / measured wall time) that meets the goal.
BOGOSITY = {"msec": 20, "jobs": 10, "reclevel": 3, "numrecjobs": 5}
EFFICIENCY_TARGET = 0.9
#: The extra bogosity line: nodes whose waiting requests park as greenlets.
GEVENT_CONCURRENCY = 10


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    nodes: int
    build: Callable[[Grid, argparse.Namespace], list[Scenario] | Plan]


SUITES: dict[str, Suite] = {}


def suite(name: str, description: str, nodes: int = 1):
    def register(build: Callable[[Grid, argparse.Namespace], list[Scenario] | Plan]):
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

    # For context: what one round trip to the state store costs right now (this machine's
    # loopback latency moves between runs, and a cache hit is one such round trip).
    # On a Redis Cluster: one master's (a key's) client, as a script call reaches one master.
    store = m.girder.store.client
    if isinstance(store, redis.RedisCluster):
        store = store.get_redis_connection(store.get_node_from_key(m.girder.store.record_key("0")))

    def ping() -> None:
        _check(store.ping(), True, "PING")

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
        Scenario(
            "redis PING",
            options.hits,
            ping,
            warmup=options.warmup,
            baseline="stock",
            note="a bare round trip to the state store (redis-py PING, which sleeps for its reply), for context",
        ),
    ]


def _salts(what: str):
    """Fresh arguments per run: nothing a run requests was requested before, in any run."""
    tag = uuid.uuid4().hex[:8]
    return (f"{what}-{tag}-{i}" for i in itertools.count())


def _executors_per_node(pool: str, concurrency: int) -> int:
    return 1 if pool == "solo" else concurrency


def _settler(m) -> Callable[[], None]:
    """A fresh no-op round trip through the worker, after a timed request: what the worker still
    does after answering (writing results to Celery's result backend) is then timed with the
    request that caused it rather than delaying whatever is timed next."""
    salt, args = f"settle-{uuid.uuid4().hex[:8]}", itertools.count()

    def settle() -> None:
        i = next(args)
        _check(m.leaf.call(salt, i), i, "leaf.call (no-op)")

    return settle


# -- inline ---------------------------------------------------------------------------------------


@suite("inline", f"one girder task requesting {CHILDREN:,} trivial distinct children one by one, run inline")
def inline(grid: Grid, options: argparse.Namespace) -> Plan:
    m = grid.app_module
    salts = _salts("inline")
    settle = _settler(m)

    def parent(n: int) -> Callable[[], None]:
        def step() -> None:
            _check(m.many_children.call(n, next(salts)), n * (n - 1) // 2, f"many_children.call({n}, salt)")
            settle()

        return step

    client_salt = next(salts)
    client_args = itertools.count()

    def client_cold() -> None:
        i = next(client_args)
        _check(m.leaf.call(client_salt, i), i, "leaf.call (client, cold)")

    full, empty, cold = f"parent, {CHILDREN} children", "parent, 0 children", "client cold leaf.call"
    runs = options.runs
    scenarios = [
        Scenario(full, runs, parent(CHILDREN), warmup=1, note=f"many_children.call({CHILDREN}, fresh salt) + no-op"),
        Scenario(empty, runs, parent(0), warmup=2, note="many_children.call(0, fresh salt) + no-op"),
        Scenario(cold, runs * 30, client_cold, warmup=30, note="leaf.call(salt, fresh i) from the client"),
    ]
    notes = [
        "each parent sample is the parent request then a fresh no-op leaf.call on the same worker, so work the "
        "worker does after answering (mirroring the children's results to Celery's result backend) is counted "
        "in its own sample; the no-op cancels out of the difference"
    ]

    def derive(results: dict[str, Result]) -> list[Figure]:
        per_child = (results[full].median_ms - results[empty].median_ms) / CHILDREN
        cold_ms = results[cold].median_ms
        return [
            Figure(
                "per inline child",
                per_child,
                "ms",
                target=INLINE_TARGET_MS,
                note=f"(median parent with {CHILDREN} children - median parent with 0) / {CHILDREN}",
            ),
            Figure(
                "  for context: client cold call",
                cold_ms,
                "ms",
                note="median leaf.call from the client: submit, offer message, claim, complete, wake-up",
            ),
            Figure("  inline child / client cold call", per_child / cold_ms, "x"),
        ]

    return Plan(scenarios, rounds=runs, derive=derive, notes=notes)


# -- fib ------------------------------------------------------------------------------------------


def _fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


@suite("fib", f"memoized fib({FIB_N}) as recursive sub-requests, from cold: {FIB_N + 1} distinct requests")
def fib(grid: Grid, options: argparse.Namespace) -> Plan:
    m = grid.app_module
    salts = _salts("fib")
    want = _fib(FIB_N)
    settle = _settler(m)

    def step() -> None:
        _check(m.fib.call(FIB_N, next(salts)), want, f"fib.call({FIB_N}, salt)")
        settle()

    name = f"fib({FIB_N}) cold"
    scenarios = [Scenario(name, options.runs, step, warmup=1, note=f"fib.call({FIB_N}, fresh salt) + no-op")]

    def derive(results: dict[str, Result]) -> list[Figure]:
        total = results[name].median_ms
        return [
            Figure(
                f"fib({FIB_N}) from cold",
                total,
                "ms",
                note="median wall time of the top-level request, plus a trailing no-op round trip (~1.5 ms) "
                "that times the worker's after-answer work",
            ),
            Figure(
                "per distinct request",
                total / (FIB_N + 1),
                "ms",
                note=f"/ {FIB_N + 1}; each also makes one memoized request (fib(n-2) is done by then)",
            ),
        ]

    return Plan(scenarios, rounds=options.runs, derive=derive)


# -- bogosity -------------------------------------------------------------------------------------

_BOGOSITY_RE = re.compile(r"Bogosity:([^:]*):(\d+):\d+:(\d+):")


def _bogosity_expected(msec: int, jobnum: int, reclevel: int, args: str) -> str:
    """The value of bogosity(...) with every node name replaced by ``N``."""
    subs = ",".join(_bogosity_expected(msec, k, reclevel - 1, args) for k in range(reclevel)) if reclevel > 0 else ""
    return f"Bogosity:N:{jobnum}:{msec}:{reclevel}:{args}:[{subs}]"


class BogosityCheck:
    """Checks a run's values and tallies where each distinct request ran."""

    def __init__(self, distinct: int, label: Callable[[str], str], params: dict[str, int] = BOGOSITY) -> None:
        self.distinct = distinct
        self.label = label
        self.params = params
        self.per_node: Counter[str] = Counter()
        self.runs = 0

    def __call__(self, values: list[str], salt: str, who: str) -> None:
        p = self.params
        want = [_bogosity_expected(p["msec"], j, p["reclevel"], salt) for j in range(p["jobs"])]
        got = [_BOGOSITY_RE.sub(lambda mt: f"Bogosity:N:{mt[2]}:{p['msec']}:{mt[3]}:", v) for v in values]
        _check(got, want, f"{who} bogosity (node names replaced by N)")
        ran: dict[tuple[str, str], set[str]] = {}
        for value in values:
            for node, jobnum, reclevel in _BOGOSITY_RE.findall(value):
                ran.setdefault((reclevel, jobnum), set()).add(node)
        twice = {k: v for k, v in ran.items() if len(v) > 1}
        if twice or len(ran) != self.distinct:
            raise AssertionError(f"{who}: {len(ran)} distinct requests, expected {self.distinct}; run twice: {twice}")
        self.per_node.update(self.label(next(iter(nodes))) for nodes in ran.values())
        self.runs += 1

    def split(self) -> str:
        """Requests run per node, over every run checked (warm-up included)."""
        tally = ", ".join(f"{node} {count}" for node, count in sorted(self.per_node.items()))
        return f"requests run per node over {self.runs} runs (warm-up included): {tally}"


def _girder_node(hostname: str) -> str:
    return hostname.split("-", 1)[0]  # bench1-<prefix>@localhost -> bench1


def _dask_node(name: str) -> str:
    return f"worker{name}"


def _dask_peer(nodes: int, per_node: int, notes: list[str], how: str):
    """A ``DaskPeer`` of ``nodes`` processes x ``per_node`` threads, printed with ``how`` its tasks
    request others; None, with a note saying why, when Dask is not installed or does not start."""
    try:
        from .daskpeer import DaskPeer
    except ImportError as exc:
        notes.append(f"Dask distributed not installed ({exc}): no peer run (pip install 'girder-celery[bench]')")
        return None
    try:
        peer = DaskPeer(nodes, per_node)
    except Exception as exc:
        notes.append(f"Dask LocalCluster failed to start ({type(exc).__name__}: {exc}): no peer run")
        return None
    print(
        f"  peer: Dask distributed {peer.version}, LocalCluster(n_workers={nodes}, threads_per_worker={per_node}, "
        f"processes=True, host=127.0.0.1, dashboard off); {how}"
    )
    return peer


@suite(
    "bogosity",
    "the seed's bogosity(20, j, 3, 5, salt) for j < 10, at once, on two nodes; ideal time; vs Dask distributed",
    nodes=2,
)
def bogosity(grid: Grid, options: argparse.Namespace) -> Plan:
    m = grid.app_module
    p = BOGOSITY
    msec, jobs, reclevel, numrecjobs = p["msec"], p["jobs"], p["reclevel"], p["numrecjobs"]
    dag = bogosity_dag(jobs, reclevel)
    nodes = len(grid.workers)
    per_node = _executors_per_node(options.pool, options.concurrency)
    executors = nodes * per_node
    slots = optimal_slots(dag, executors)
    ideal_ms = slots * msec
    levels, level_slots = level_formula(dag, executors)
    work_ms = len(dag) * msec / executors
    path_ms = critical_path(dag) * msec
    notes = [
        f"workload: bogosity({msec}, j, {reclevel}, {numrecjobs}, salt) for j < {jobs}, requested at once, "
        f"fresh salt per run: {len(dag)} distinct requests of {msec} ms each",
        f"ideal = {ideal_ms:g} ms: the optimal makespan of these {len(dag)} requests on {executors} executors "
        f"({nodes} nodes x {per_node}) with zero overhead, a request's own {msec} ms starting only after all its "
        "sub-requests finish; exact (search over slots). Every level needs all of the level below, so levels "
        f"run in turn: {levels} = {level_slots} slots x {msec} ms"
        + ("" if level_slots == slots else f" (the search found {slots})"),
        f"for transparency: total work / executors = {len(dag)} x {msec} / {executors} = {work_ms:g} ms, a bound "
        f"only: {slots} slots x {executors} executors hold {len(dag)} requests, leaving {slots * executors - len(dag)} "
        f"executor-slots idle where a level has too few requests; critical path {path_ms:g} ms",
        "efficiency = ideal / median measured wall time (client submit to last value)",
    ]
    salts = _salts("bogosity")
    girder_check, dask_check = BogosityCheck(len(dag), _girder_node), BogosityCheck(len(dag), _dask_node)
    runs = options.runs

    def girder_scenario(name: str, module: ModuleType, check: BogosityCheck, who: str, note: str) -> Scenario:
        """The seed's launch from the client, on the grid whose app module is ``module``."""

        def step() -> tuple[list[str], str]:
            salt = next(salts)
            sigs = [module.bogosity.s(msec, j, reclevel, numrecjobs, salt) for j in range(jobs)]
            return module.girder.requests(sigs), salt

        return Scenario(name, runs, step, warmup=1, note=note, check=lambda answer: check(*answer, who))

    def stock_step() -> list[int]:
        return [r.get(timeout=30) for r in [m.plain_sleep.delay(msec, j) for j in range(jobs)]]

    def stock_check(values: list[int]) -> None:
        _check(values, list(range(jobs)), "stock plain_sleep")

    stock_name = f"stock, {jobs} tasks"
    stock_ideal_ms = math.ceil(jobs / executors) * msec
    girder_name = f"girder, {options.pool} x{per_node}" if per_node > 1 else f"girder, {options.pool}"
    scenarios = [girder_scenario(girder_name, m, girder_check, "girder", "girder.requests([...]) from the client")]

    peer = _dask_peer(nodes, per_node, notes, "sub-requests by worker_client(), pure=True keys")
    if peer is not None:

        def dask_step() -> tuple[list[str], str]:
            salt = next(salts)
            return peer.bogosity_jobs(msec, jobs, reclevel, numrecjobs, salt), salt

        scenarios.append(
            Scenario(
                "dask",
                runs,
                dask_step,
                warmup=1,
                note="client.submit x10, gather",
                check=lambda answer: dask_check(*answer, "dask"),
            )
        )
        scenarios[0].baseline = "dask"

    def close_peer() -> None:
        if peer is not None:
            peer.close()

    gevent_name = f"girder, gevent x{GEVENT_CONCURRENCY}"
    gevent_check = BogosityCheck(len(dag), _girder_node)
    gevent_ideal = optimal_slots(dag, nodes * GEVENT_CONCURRENCY) * msec

    def stock_stage() -> Plan:
        # A stage of its own, so no stock run (nor what it leaves behind) lands between girder's.
        close_peer()
        scenario = Scenario(
            stock_name,
            runs,
            stock_step,
            warmup=1,
            note=f"plain_sleep.delay({msec}, j) for j < {jobs}, then .get() each",
            check=stock_check,
        )
        return Plan([scenario], rounds=runs, then=gevent_stage)

    def gevent_stage() -> Plan | None:
        if options.skip_gevent or options.pool == "gevent":
            return None
        grid.stop()
        gevent_grid = Grid(grid.redis_server, grid.broker, grid.broker_url, "gevent", GEVENT_CONCURRENCY)
        try:
            gevent_grid.start_nodes(nodes)
        except BaseException:
            gevent_grid.close()
            raise
        print(f"  extra: {nodes} worker(s): celery -A benchmarks.benchapp worker {gevent_grid.shown_flags()}")
        return Plan(
            [
                girder_scenario(
                    gevent_name, gevent_grid.app_module, gevent_check, "girder gevent", "the same, on gevent nodes"
                )
            ],
            rounds=runs,
            close=gevent_grid.close,
            notes=[
                f"{gevent_name}: ideal on {nodes} x {GEVENT_CONCURRENCY} executors = critical path = "
                f"{gevent_ideal:g} ms (the requests sleep, so a node's greenlets overlap; no Dask counterpart)"
            ],
        )

    def derive(results: dict[str, Result]) -> list[Figure]:
        girder_ms = results[girder_name].median_ms
        figures = [
            Figure("ideal", ideal_ms, "ms", note=f"{executors} executors; naive bound {work_ms:g} ms"),
            Figure(
                "girder efficiency",
                ideal_ms / girder_ms,
                "%",
                target=EFFICIENCY_TARGET,
                higher_is_better=True,
                note=f"{ideal_ms:g} / {girder_ms:.1f} ms; {girder_check.split()}",
            ),
        ]
        if stock_name in results:
            stock_ms = results[stock_name].median_ms
            figures.append(
                Figure(
                    "stock Celery reference",
                    stock_ideal_ms / stock_ms,
                    "%",
                    note=f"{jobs} independent plain tasks of {msec} ms on the same nodes, measured after girder "
                    f"and Dask: {stock_ideal_ms:g} / {stock_ms:.1f} ms, what Celery's own cost per message leaves "
                    "(girder's requests pay it too)",
                )
            )
        if "dask" in results:
            dask_ms = results["dask"].median_ms
            faster = girder_ms < dask_ms
            figures += [
                Figure(
                    "dask efficiency",
                    ideal_ms / dask_ms,
                    "%",
                    note=f"{ideal_ms:g} / {dask_ms:.1f} ms; {dask_check.split()}",
                ),
                Figure(
                    "girder / dask wall time",
                    girder_ms / dask_ms,
                    "x",
                    target=1.0,
                    note=f"girder {'faster' if faster else 'NOT faster'}: median {girder_ms:.1f} vs {dask_ms:.1f} ms",
                ),
            ]
        if gevent_name in results:
            gevent_ms = results[gevent_name].median_ms
            figures.append(
                Figure(
                    "girder gevent efficiency",
                    gevent_ideal / gevent_ms,
                    "%",
                    note=f"{gevent_ideal:g} / {gevent_ms:.1f} ms, ideal on {nodes * GEVENT_CONCURRENCY} executors; "
                    f"{gevent_check.split()}",
                )
            )
        return figures

    return Plan(scenarios, rounds=runs, derive=derive, notes=notes, then=stock_stage, close=close_peer)


# -- fan-out across tiers -------------------------------------------------------------------------

FANOUT = {"children": 200, "msec": 20, "nodes": (1, 2, 4)}


@suite(
    "fanout",
    f"one request fanning out to {FANOUT['children']} children of {FANOUT['msec']} ms on 1, 2 and 4 nodes of -c 1",
    nodes=1,
)
def fanout(grid: Grid, options: argparse.Namespace) -> Plan:
    """Local first, then hoisting: how much of one node's fan-out the other nodes take, and how fast."""
    m = grid.app_module
    n, msec = FANOUT["children"], FANOUT["msec"]
    salts = _salts("fanout")
    remote: dict[int, list[float]] = {}

    def stage(nodes: int) -> Plan:
        if len(grid.workers) < nodes:
            grid.start_nodes(nodes - len(grid.workers))
        name = f"{nodes} node{'s' * (nodes > 1)}"

        def step() -> None:
            value = m.fan_parent.call(n, msec, next(salts))
            _check(len(value["children"]), n, "children answered")
            remote.setdefault(nodes, []).append(sum(c != value["parent"] for c in value["children"]) / n)

        later = [k for k in FANOUT["nodes"] if k > nodes]
        return Plan(
            [Scenario(name, options.runs, step, warmup=1, note=f"fan_parent.call({n}, {msec}, salt)")],
            rounds=options.runs,
            then=(lambda: stage(later[0])) if later else None,
        )

    def derive(results: dict[str, Result]) -> list[Figure]:
        one = results["1 node"].median_ms
        figures = [Figure("serial work", n * msec, "ms", note=f"{n} x {msec} ms on one executor")]
        for nodes in FANOUT["nodes"]:
            ms = results[f"{nodes} node{'s' * (nodes > 1)}"].median_ms
            shares = sorted(remote.get(nodes, [0.0]))
            figures += [
                Figure(
                    f"{nodes} nodes: speed-up",
                    one / ms,
                    "x",
                    higher_is_better=True,
                    note=f"median {one:.1f} / {ms:.1f} ms",
                ),
                Figure(
                    f"{nodes} nodes: parallel efficiency",
                    one / ms / nodes,
                    "%",
                    target=EFFICIENCY_TARGET if nodes == 2 else None,
                    higher_is_better=True,
                    note=f"speed-up / {nodes} nodes",
                ),
                Figure(
                    f"{nodes} nodes: vs zero overhead",
                    n * msec / nodes / ms,
                    "%",
                    higher_is_better=True,
                    note=f"(serial work / nodes = {n * msec / nodes:g} ms) / median {ms:.1f} ms: girder's and "
                    "Celery's overhead and sleep overshoot included",
                ),
                Figure(f"{nodes} nodes: share run remotely", shares[len(shares) // 2], "%", note="median over runs"),
            ]
        return figures

    plan = stage(1)
    plan.derive = derive
    plan.notes = [
        "the parent runs on whichever node takes it; its children are offered on that node's queue and run there "
        "inline, until the hoister copies the ones still waiting after girder_hoist_after (100 ms) to the pool, "
        "where the other nodes volunteer"
    ]
    return plan


# -- wide fan-outs ----------------------------------------------------------------------------------

#: Fan-out sizes of the wide suite (``--wide-max`` caps them; 100,000 takes minutes), its timed runs
#: per size (fewer for the big ones), and the targets of the wide fan-out issue: per-child cost at the
#: largest size within 1.3x of 1,000's, and no more than stock Celery's per task.
WIDE_SIZES = (1_000, 10_000, 100_000)
WIDE_GROWTH_TARGET = 1.3
WIDE_STOCK_TARGET = 1.0


def _wide_runs(n: int, runs: int) -> int:
    return max(1, runs if n <= 1_000 else runs // 3 if n <= 10_000 else 1)


@suite(
    "fanout-wide",
    "one request fanning out to 1,000, 10,000 (and, with --wide-max 100000, 100,000) trivial children on two "
    "nodes, vs a stock Celery group of as many tasks and Dask distributed",
    nodes=2,
)
def fanout_wide(grid: Grid, options: argparse.Namespace) -> Plan:
    """Per-child cost as N grows: girder's waiting parent, the store's scripts and the hoister."""
    from celery import group

    m = grid.app_module
    sizes = [n for n in WIDE_SIZES if n <= options.wide_max]
    salts = _salts("wide")
    nodes = len(grid.workers)
    per_node = _executors_per_node(options.pool, options.concurrency)
    notes = [
        "girder: wide_parent.call(N, salt) from the client; the parent, on whichever node takes it, requests "
        "its N distinct children at once with girder.requests and sums them (run inline there, or hoisted to "
        "the pool for the other node)",
        "stock: group(plain_inc.s(i) for i < N)().get() from the client: N plain tasks on the same nodes",
        "per child = median wall time / N; growth = per child at N / per child at 1,000",
    ]

    def girder_step(n: int):
        def step() -> int:
            return m.girder.request(m.wide_parent.s(n, next(salts)), timeout=max(TIMEOUT, n * 0.01))

        return step

    def stock_step(n: int):
        def step() -> list[int]:
            return group(m.plain_inc.s(i) for i in range(n))().get(timeout=max(TIMEOUT, n * 0.01))

        return step

    def sum_check(n: int):
        return lambda value: _check(value, n * (n - 1) // 2, f"sum of {n} children")

    def stock_check(n: int):
        return lambda values: _check(len(values), n, f"stock group of {n}")

    scenarios: list[Scenario] = []
    for n in sizes:
        runs = _wide_runs(n, options.runs)
        scenarios.append(Scenario(f"girder, N={n:,}", runs, girder_step(n), warmup=0 if n > 1_000 else 1,
                                  check=sum_check(n), note=f"wide_parent.call({n}, salt)"))  # fmt: skip
        scenarios.append(Scenario(f"stock, N={n:,}", runs, stock_step(n), warmup=0 if n > 1_000 else 1,
                                  check=stock_check(n), note=f"group of {n} plain_inc"))  # fmt: skip
        scenarios[-2].baseline = scenarios[-1].name

    peer = _dask_peer(nodes, per_node, notes, "the parent submits its children with worker_client(), pure=True keys")
    if peer is not None:
        for n in sizes:

            def dask_step(n: int = n) -> int:
                return peer.wide(n, next(salts))

            scenarios.append(Scenario(f"dask, N={n:,}", _wide_runs(n, options.runs), dask_step,
                                      warmup=0 if n > 1_000 else 1, check=sum_check(n),
                                      note=f"client.submit(wide_parent, {n}, salt)"))  # fmt: skip

    def close_peer() -> None:
        if peer is not None:
            peer.close()

    def derive(results: dict[str, Result]) -> list[Figure]:
        figures = []
        first = sizes[0]
        for who in ("girder", "stock", "dask"):
            if f"{who}, N={first:,}" not in results:
                continue
            base = results[f"{who}, N={first:,}"].median_ms / first
            for n in sizes:
                per = results[f"{who}, N={n:,}"].median_ms / n
                figures.append(Figure(f"{who}: per child, N={n:,}", per, "ms", note=f"median / {n:,}"))
                if n != first:
                    figures.append(Figure(
                        f"{who}: growth, N={n:,}", per / base, "x",
                        target=WIDE_GROWTH_TARGET if who == "girder" and n == sizes[-1] else None,
                        note=f"per child at {n:,} / at {first:,}",
                    ))  # fmt: skip
        for n in sizes:
            ratio = results[f"girder, N={n:,}"].median_ms / results[f"stock, N={n:,}"].median_ms
            figures.append(Figure(f"girder / stock, N={n:,}", ratio, "x", target=WIDE_STOCK_TARGET,
                                  note="per child over stock Celery's per task, same nodes"))  # fmt: skip
            if f"dask, N={n:,}" in results:
                ratio = results[f"girder, N={n:,}"].median_ms / results[f"dask, N={n:,}"].median_ms
                figures.append(Figure(f"girder / dask, N={n:,}", ratio, "x", note="same number of processes"))
        return figures

    rounds = max(s.n for s in scenarios)
    return Plan(scenarios, rounds=rounds, derive=derive, notes=notes, close=close_peer)


# -- many nodes in a pool tree ----------------------------------------------------------------------

#: The tree suite's grid: ``pools`` pools of ``per_pool`` nodes under the root pool (the grid's
#: queue); its fan-out, and its bogosity (the seed's workload with more jobs and one level more).
TREE = {"pools": 4, "per_pool": 3, "children": 2000, "msec": 50}
TREE_BOGOSITY = {"msec": 50, "jobs": 120, "reclevel": 4, "numrecjobs": 5}


def _command_calls(client) -> tuple[Counter[str], int]:
    """Calls per command since the server started, and the microseconds Redis spent in them
    (``INFO commandstats``; a script's own calls count both under EVALSHA and under their names)."""
    stats = client.info("commandstats")
    return Counter({name.removeprefix("cmdstat_"): v["calls"] for name, v in stats.items()}), sum(
        v["usec"] for name, v in stats.items() if name != "cmdstat_evalsha"
    )


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of processes and their children (a prefork pool's), from ``/proc``."""
    tick, total, todo, seen = os.sysconf("SC_CLK_TCK"), 0, list(pids), set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
            for task in Path(f"/proc/{pid}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    return total / tick


class RunTally:
    """Costs per request over the runs of one scenario (``start`` in the timed step, ``stop`` in
    its untimed check): Redis commands (one server holds the state store, the result backend and
    a Redis broker alike), Redis's time in them, and the CPU the workers and Redis used."""

    def __init__(self, client, pids: Callable[[], list[int]], redis_pid: int, requests: int) -> None:
        self.client, self.pids, self.redis_pid, self.requests = client, pids, redis_pid, requests
        self.calls: Counter[str] = Counter()
        self.usec = self.runs = 0
        self.cpu = self.redis_cpu = self.wall = 0.0
        self._before: tuple[Counter[str], int, float, float, float] = (Counter(), 0, 0.0, 0.0, 0.0)

    def _read(self) -> tuple[Counter[str], int, float, float, float]:
        calls, usec = _command_calls(self.client)
        return calls, usec, _cpu_seconds(self.pids()), _cpu_seconds([self.redis_pid]), time.monotonic()

    def start(self) -> None:
        self._before = self._read()

    def stop(self) -> None:
        calls, usec, cpu, redis_cpu, wall = self._read()
        delta = calls - self._before[0]
        delta.pop("info", None)  # the tally's own
        self.calls += delta
        self.usec += usec - self._before[1]
        self.cpu += cpu - self._before[2]
        self.redis_cpu += redis_cpu - self._before[3]
        self.wall += wall - self._before[4]
        self.runs += 1

    def idle_figures(self) -> list[Figure]:
        """Per second of a grid with nothing to do: what its background loops cost the store."""
        if not self.wall:
            return []
        top = "; ".join(f"{name} {n / self.wall:.0f}/s" for name, n in self.calls.most_common(4))
        return [
            Figure("idle grid: store scripts per second", self.calls["evalsha"] / self.wall, "scripts",
                   note=f"over {self.wall:.1f} s; commands: {top}"),
            Figure("idle grid: redis-server CPU", self.redis_cpu / self.wall, "%", note="of one core"),
        ]  # fmt: skip

    def figures(self, who: str) -> list[Figure]:
        per = self.runs * self.requests
        if not per:
            return []
        top = ", ".join(f"{name} {n / per:.2f}" for name, n in self.calls.most_common(6))
        commands = sum(n for name, n in self.calls.items() if name != "evalsha")
        cores = os.cpu_count() or 1
        return [
            Figure(f"{who}: Redis commands per request", commands / per, "commands",
                   note=f"over {self.runs} runs of {self.requests:,} requests, a script's calls counted; most: {top}"),
            Figure(f"{who}: store scripts per request", self.calls["evalsha"] / per, "scripts",
                   note="EVALSHA (submit, claim, complete, hoist, ...)"),
            Figure(f"{who}: Redis time per request", self.usec / per / 1000, "ms",
                   note="INFO commandstats usec, inside commands only (not I/O)"),
            Figure(f"{who}: CPU per request", self.cpu / per * 1000, "ms",
                   note="user + system of the workers and redis-server"),
            Figure(f"{who}: redis-server CPU per request", self.redis_cpu / per * 1000, "ms",
                   note=f"its I/O included: one such server serves at most {per / max(self.redis_cpu, 1e-9):,.0f} "
                   "requests/s of this kind on a core like this one"),
            Figure(f"{who}: CPU busy", self.cpu / self.wall / cores, "%",
                   note=f"workers' and redis-server's CPU / (wall x {cores} cores); the client's not counted"),
        ]  # fmt: skip


def _median_bytes(client, names: list, sample: int = 200) -> float:
    """Median ``MEMORY USAGE`` of up to ``sample`` of ``names``."""
    sizes = sorted(client.memory_usage(name, samples=0) or 0 for name in names[:sample])
    return sizes[len(sizes) // 2] if sizes else 0.0


def _memory_figures(grid: Grid) -> list[Figure]:
    """Bytes per memoized request in the state store and in the result backend, and what else
    the store holds once every request and its waiters are done."""

    store, backend = (redis.Redis.from_url(grid.redis_server.url(db)) for db in (STORE_DB, BACKEND_DB))
    try:
        by_kind: dict[str, list] = {}
        for name in store.scan_iter(match=f"{grid.key_prefix}:*", count=1000):
            by_kind.setdefault(name.split(b":")[1].decode(), []).append(name)
        records = by_kind.pop("req", [])
        record = _median_bytes(store, records)
        metas = list(backend.scan_iter(match="celery-task-meta-*", count=1000))
        meta = _median_bytes(backend, metas)
        other = ", ".join(f"{len(names)} {kind}" for kind, names in sorted(by_kind.items())) or "none"
    finally:
        store.close()
        backend.close()
    return [
        Figure("store: bytes per memoized request", record, "B",
               note=f"median MEMORY USAGE of a record, {len(records):,} records; this grid's other keys: {other}"),
        Figure("result backend: bytes per request", meta, "B",
               note=f"median MEMORY USAGE of celery-task-meta-*, {len(metas):,} keys (girder's mirror and stock's)"),
    ]  # fmt: skip


#: Seconds the tree suite watches its grid doing nothing, per run.
IDLE_SECONDS = 5.0


def _start_tree(grid: Grid, options: argparse.Namespace) -> dict[str, int]:
    """Start the tree's nodes, each pool's side by side: node hostname -> its pool's index."""
    pools = [f"{grid.queue}.pool{i}" for i in range(TREE["pools"])]
    grid.env["GIRDER_BENCH_POOLS"] = json.dumps({grid.queue: None, **dict.fromkeys(pools, grid.queue)})
    grid.extra_queues = pools
    pool_of: dict[str, int] = {}
    for i, pool in enumerate(pools):
        names = [f"p{i}n{j}" for j in range(TREE["per_pool"])]
        for w in grid.start_workers(names, options.pool, options.concurrency, "--girder-pool", pool, timeout=180):
            pool_of[w.hostname] = i
    return pool_of


@suite(
    "tree",
    f"{TREE['pools'] * TREE['per_pool']} nodes of -c 1, {TREE['pools']} pools of {TREE['per_pool']} under a root "
    f"pool: a fan-out of {TREE['children']:,} children of {TREE['msec']} ms and a scaled-up bogosity",
    nodes=0,
)
def tree(grid: Grid, options: argparse.Namespace) -> Plan:
    """Where parallel efficiency goes as nodes are added: hoisting up two tiers, commands per request."""
    from celery import group

    m = grid.app_module
    pool_of = _start_tree(grid, options)
    nodes = len(pool_of)
    per_node = _executors_per_node(options.pool, options.concurrency)
    executors = nodes * per_node
    n, msec = TREE["children"], TREE["msec"]
    b = TREE_BOGOSITY
    dag = bogosity_dag(b["jobs"], b["reclevel"])
    levels, slots = level_formula(dag, executors)
    fan_ideal, bog_ideal = n * msec / executors, slots * b["msec"]
    jobs_ideal = math.ceil(b["jobs"] / executors) * b["msec"]
    client = redis.Redis.from_url(grid.redis_server.url(0))

    redis_pid = grid.redis_server.proc.pid

    def pids() -> list[int]:
        return [w.proc.pid for w in grid.workers if w.proc] + [redis_pid]

    fan_tally, stock_tally, bog_tally = (RunTally(client, pids, redis_pid, k) for k in (n + 1, n, len(dag)))
    idle_tally = RunTally(client, pids, redis_pid, 1)
    placed: list[tuple[float, float, float]] = []
    copies: list[float] = []  # hoisted copies per child, per run
    salts = _salts("tree")
    notes = [
        f"tree: root pool <queue>, pools <queue>.pool0..{TREE['pools'] - 1} of {TREE['per_pool']} nodes each "
        f"(--girder-pool), girder_pools = {{pool: root}}; {nodes} nodes, {executors} executors; "
        f"flags: {grid.shown_flags()} --girder-pool <pool>",
        f"fan-out: fan_parent.call({n}, {msec}, salt) to the root pool: its node runs children inline, its hoister "
        "copies offers waiting over girder_hoist_after to its pool, the pool's hoisters copy on to the root pool; "
        f"ideal = {n} x {msec} ms / {executors} executors = {fan_ideal:g} ms (the parent's own time left out)",
        f"stock: group(plain_sleep.s({msec}, i) for i < {n})().get(): the same sleeps as plain Celery tasks on the "
        "root pool, the same nodes; same ideal",
        f"bogosity: bogosity({b['msec']}, j, {b['reclevel']}, {b['numrecjobs']}, salt) for j < {b['jobs']}, at once: "
        f"{len(dag)} distinct requests; every level needs all of the level below, so levels run in turn and the "
        f"ideal is {levels} = {slots} slots x {b['msec']} ms = {bog_ideal:g} ms",
        f"stock jobs: {b['jobs']} plain tasks of {b['msec']} ms (delay each, then get), the bogosity's top level "
        f"without its sub-requests: ideal ceil({b['jobs']}/{executors}) x {b['msec']} ms = {jobs_ideal:g} ms",
        "per request: INFO commandstats and the CPU of the workers and redis-server (/proc) before and after each "
        "run; one Redis server holds the state store, the result backend and (with --broker redis) the broker",
    ]

    def fan_step() -> tuple[dict, str]:
        salt = next(salts)
        fan_tally.start()
        return m.fan_parent.call(n, msec, salt), salt

    def fan_check(answer: tuple[dict, str]) -> None:
        fan_tally.stop()
        value, salt = answer
        _check(len(value["children"]), n, "children answered")
        parent, home = value["parent"], pool_of[value["parent"]]
        same = sum(c == parent for c in value["children"])
        pool = sum(c != parent and pool_of[c] == home for c in value["children"])
        placed.append((same / n, pool / n, (n - same - pool) / n))
        pipe = client.pipeline(transaction=False)
        for i in range(n):
            pipe.hget(m.girder.store.record_key(m.girder.key_of(m.fan_child.s(msec, salt, i))), "hoists")
        copies.append(sum(int(h or 0) for h in pipe.execute()) / n)

    def stock_step() -> list[str]:
        stock_tally.start()
        return group(m.plain_sleep.s(msec, i) for i in range(n))().get(timeout=TIMEOUT * 4)

    def stock_check(values: list[int]) -> None:
        stock_tally.stop()
        _check(values, list(range(n)), "stock plain_sleep")

    bog_check = BogosityCheck(len(dag), _girder_node, b)

    def bog_step() -> tuple[list[str], str]:
        salt = next(salts)
        bog_tally.start()
        sigs = [m.bogosity.s(b["msec"], j, b["reclevel"], b["numrecjobs"], salt) for j in range(b["jobs"])]
        return m.girder.requests(sigs, timeout=TIMEOUT * 4), salt

    def bog_checked(answer: tuple[list[str], str]) -> None:
        bog_tally.stop()
        bog_check(*answer, "girder")

    def idle_step() -> None:
        idle_tally.start()
        time.sleep(IDLE_SECONDS)  # what is measured is the idle grid's background work, not a wait for it

    def idle_check(_: None) -> None:
        idle_tally.stop()

    def stock_jobs() -> list[int]:
        return [r.get(timeout=TIMEOUT) for r in [m.plain_sleep.delay(b["msec"], j) for j in range(b["jobs"])]]

    def stock_jobs_check(values: list[int]) -> None:
        _check(values, list(range(b["jobs"])), "stock plain_sleep")

    scenarios = [
        Scenario("girder fan-out", options.runs, fan_step, warmup=1, check=fan_check, baseline="stock fan-out",
                 note=f"fan_parent.call({n}, {msec}, salt)"),
        Scenario("stock fan-out", options.runs, stock_step, warmup=1, check=stock_check,
                 note=f"group of {n} plain_sleep({msec})"),
        Scenario("girder bogosity", options.runs, bog_step, warmup=1, check=bog_checked,
                 note=f"girder.requests([... {b['jobs']} jobs])"),
        Scenario("stock jobs", options.runs, stock_jobs, warmup=1, check=stock_jobs_check,
                 note=f"{b['jobs']} x plain_sleep.delay({b['msec']}), get"),
        Scenario("idle grid", options.runs, idle_step, warmup=0, check=idle_check,
                 note=f"{IDLE_SECONDS:g} s with nothing to do: the hoisters' passes"),
    ]  # fmt: skip

    def derive(results: dict[str, Result]) -> list[Figure]:
        names = ("girder fan-out", "stock fan-out", "girder bogosity", "stock jobs")
        fan, stock, bog, jobs = (results[name].median_ms for name in names)
        timed = sorted(placed[1:] or placed)  # the warm-up's left out where there are timed runs
        mid = timed[len(timed) // 2]
        figures = [
            Figure("fan-out: parallel efficiency", fan_ideal / fan, "%", target=EFFICIENCY_TARGET,
                   higher_is_better=True, note=f"ideal {fan_ideal:g} / median {fan:.1f} ms"),
            Figure("stock fan-out: parallel efficiency", fan_ideal / stock, "%", higher_is_better=True,
                   note=f"ideal {fan_ideal:g} / median {stock:.1f} ms"),
            Figure("fan-out: children on the parent's node", mid[0], "%", note="the run of median share, timed runs"),
            Figure("fan-out: children on its pool's other nodes", mid[1], "%", note="same run"),
            Figure("fan-out: children beyond its pool", mid[2], "%", note="same run, via the root pool"),
            Figure("fan-out: hoisted copies per child", sorted(copies)[len(copies) // 2], "copies",
                   note="median over runs of the records' hoists: broker messages beyond the offers"),
            Figure("bogosity: parallel efficiency", bog_ideal / bog, "%", target=EFFICIENCY_TARGET,
                   higher_is_better=True, note=f"ideal {bog_ideal:g} / median {bog:.1f} ms; {bog_check.split()}"),
            Figure("stock jobs: parallel efficiency", jobs_ideal / jobs, "%", higher_is_better=True,
                   note=f"ideal {jobs_ideal:g} / median {jobs:.1f} ms: what Celery's cost per message leaves"),
            *fan_tally.figures("fan-out"),
            *stock_tally.figures("stock fan-out"),
            *bog_tally.figures("bogosity"),
            *idle_tally.idle_figures(),
            *_memory_figures(grid),
        ]  # fmt: skip
        return figures

    return Plan(scenarios, rounds=options.runs, derive=derive, notes=notes, close=client.close)
