"""girder-celery benchmarks: girder side by side with stock Celery and Dask, on real servers.

Run from the repository root::

    python -m benchmarks                  # every suite, on Redis and on RabbitMQ
    python -m benchmarks --json out.json  # also write every figure as JSON
    python -m benchmarks --suite bogosity --broker redis    # one suite, one broker
    python -m benchmarks --broker redis --hits 300 --cold 100 --runs 5   # quicker
    python -m benchmarks --suite roundtrip --suite bogosity --store redis --store cluster
        # each suite on a single Redis, then on a Redis Cluster of three masters, in one run

What it starts
    A private ``redis-server`` on a free port (db 0: girder's state store, db 1: the Redis broker,
    db 2: Celery's result backend, for girder and stock Celery alike). For each broker, Redis
    (db 1) and RabbitMQ (``$GIRDER_TEST_AMQP_URL``, default ``amqp://guest:guest@127.0.0.1:5672//``;
    skipped with a message when unreachable), and for each suite, a fresh queue and key prefix and
    real ``celery -A benchmarks.benchapp worker`` subprocesses, with the flags printed with the
    results (default ``-P solo -c 1``: no pool IPC). One worker process serves the girder tasks
    and the plain Celery task alike. The RabbitMQ queues are deleted at the end, the private Redis
    stopped. Every suite runs on every broker given; Dask does not use the broker, so its figures
    repeat per broker as a same-run reference.

Suite ``roundtrip``: N sequential round trips from one client process, each timed with ``perf_counter_ns``
    - ``stock``: ``plain_inc.delay(x).get()``, a fresh x each time (the baseline);
    - ``girder cold``: ``inc.call(x)``, a fresh x each time, so nothing is memoized: submit script,
      offer message, claim and complete scripts on the worker, wake-up by a blocking pop;
    - ``girder hit``: ``inc.call(x)`` for an x computed before timing: one submit script, no message.

    Every answer is checked. After an interleaved warm-up the scenarios run in rounds, each round
    a slice of every scenario in a rotated order, so drift is shared evenly. Per scenario it reports
    the median and nearest-rank p90 (ms), and the ratio of its median to the stock median, rounded
    up, against the targets: cache hit <= 0.07x stock, cold <= 0.9x stock (judged unrounded).

Suite ``inline``: the cost of an inline sub-request (one worker)
    A girder task ``many_children(n, salt)`` requests ``leaf(salt, i)`` for i < n one by one
    (``leaf.call``), each claimed and run inline by the waiting parent. Per inline child = (median
    wall time of the parent with 1,000 children - median of the otherwise identical parent with 0)
    / 1,000, target <= 0.3 ms. For context, the median cold ``leaf.call`` from the client.

Suite ``fib``: memoized recursion (one worker)
    ``fib(n, salt) = fib.call(n-1, salt) + fib.call(n-2, salt)``, n < 2 -> n. Median wall time of
    ``fib.call(500, salt)`` from cold (fresh salt per run), in ms and per distinct request (501).

Suite ``bogosity``: the seed post's workload (two worker nodes), against the ideal and against Dask
    ``bogosity(msec, jobnum, reclevel, numrecjobs, args)`` requests ``bogosity(msec, k, reclevel-1,
    numrecjobs, args)`` for k < reclevel (all at once), sleeps msec, and returns a string naming
    the node of each request. The client requests ``bogosity(20, j, 3, 5, salt)`` for j < 10 at
    once: 16 distinct requests. Ideal = the optimal makespan of that DAG on the grid's executors
    (2 for two solo nodes: 180 ms), computed exactly and explained in the output next to the naive
    bound (total work / executors, 160 ms); efficiency = ideal / median wall time, target >= 90%.
    The same workload runs on Dask distributed, interleaved run by run: a ``LocalCluster`` of as
    many worker processes and threads, sub-requests through ``worker_client()`` with ``pure=True``
    keys; girder / Dask wall time, target <= 1x (girder faster). A run's answer is checked after
    its timing. Reference line, a stage of its own: stock Celery running 10 independent plain
    tasks of 20 ms (``delay`` each, then ``get``) on the same nodes, against their 100 ms ideal:
    what Celery's cost per message leaves, which girder's requests pay too. Extra line: girder
    on ``-P gevent -c 10`` nodes (``--skip-gevent`` to leave it out).

Suite ``fanout``: tiers (one, then two, then four nodes of the same pool)
    One request (``fan_parent``) fans out to 200 children of 20 ms at once. Its node runs them
    inline; the hoister copies those still waiting after ``girder_hoist_after`` to the pool, where
    the other nodes volunteer. Per node count: median wall time, speed-up against one node,
    parallel efficiency (speed-up / nodes, target >= 90% at 2 nodes), the share of children run
    remotely, and the figure against zero-overhead work (serial work / nodes).

Suite ``tree``: many nodes (twelve ``-c 1`` nodes: four pools of three under a root pool)
    A fan-out of 2,000 children of 50 ms from the root pool, the same sleeps as a stock Celery
    ``group``, the seed's bogosity scaled up (``bogosity(50, j, 4, 5, salt)`` for 120 jobs) and 120
    plain 50 ms tasks, and 5 s of the grid idle, interleaved run by run. Per scenario: efficiency
    against the ideal makespan, where the fan-out's children ran (its parent's node, its pool,
    beyond) and how many hoisted copies each had, and per request the Redis commands and scripts
    (``INFO commandstats``), Redis's time in them, the CPU of the workers and of redis-server
    (``/proc``); idle, the hoisters' scripts per second; at the end, bytes per memoized record and
    per result-backend copy, and the grid's other keys by kind.

    Re-entrant suites time ``--runs`` runs per scenario (after an untimed warm-up run), one per
    round, each run with a fresh salt so nothing is memoized, and print every derived figure with
    how it was derived, rounded against girder (costs up, efficiencies down).

State stores (``--store``, repeatable; default ``redis``)
    ``redis``: db 0 of the private ``redis-server``. ``cluster``: a Redis Cluster of three masters
    on free loopback ports (``girder_celery.testing.ClusterGroup``), started once for the run;
    the broker and the result backend stay on the private Redis. Given both, each suite runs on
    the single Redis and then on the cluster, with fresh workers each, and a closing table gives
    each scenario's median on both, the difference per call and the ratio cluster / single.

Adding scenarios
    A suite is a function ``(grid, options) -> list[Scenario] | Plan`` registered with
    ``@suite(...)`` in ``benchmarks/suites.py``, naming how many worker nodes it needs;
    ``runner.measure`` times it, ``runner.run_plan`` also derives a plan's figures.

Profiling the hot paths: ``python -m benchmarks.profiling`` (see its docstring).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from importlib import metadata
from typing import Any

from girder_celery.testing import AMQP_URL, ClusterGroup, RedisServer, amqp_unreachable

from .grid import BROKER_DB, Grid
from .runner import Plan, format_figures, format_table, run_plan
from .suites import SUITES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", metavar="PATH", help="write every figure to PATH as JSON")
    p.add_argument(
        "--broker",
        action="append",
        choices=["redis", "amqp"],
        help="broker(s) to run on (repeatable; default both)",
    )
    p.add_argument("--suite", action="append", choices=sorted(SUITES), help="suite(s) to run (default all)")
    p.add_argument(
        "--store",
        action="append",
        choices=["redis", "cluster"],
        help="girder's state store(s): a single Redis, a Redis Cluster of 3 masters (repeatable; default redis)",
    )
    p.add_argument("--pool", default="solo", help="worker pool, the same for girder and stock (default solo)")
    p.add_argument("--concurrency", type=int, default=1, help="worker concurrency (default 1)")
    p.add_argument("--hits", type=int, default=1000, help="timed cache-hit round trips (default 1000)")
    p.add_argument("--cold", type=int, default=300, help="timed cold and stock round trips each (default 300)")
    p.add_argument("--warmup", type=int, default=30, help="untimed round trips per scenario first (default 30)")
    p.add_argument("--rounds", type=int, default=20, help="interleaved rounds (default 20)")
    p.add_argument(
        "--runs",
        type=int,
        default=7,
        help="timed runs per scenario of the inline, fib, bogosity and fanout suites (default 7)",
    )
    p.add_argument("--skip-gevent", action="store_true", help="leave out the bogosity suite's gevent line")
    p.add_argument(
        "--wide-max",
        type=int,
        default=10_000,
        help="largest fan-out of the fanout-wide suite (default 10000; 100000 takes minutes)",
    )
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = p.parse_args(argv)
    for name in ("hits", "cold", "rounds", "concurrency", "runs"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.warmup < 0:
        p.error("--warmup must be at least 0")
    return args


def _versions(redis_server: RedisServer) -> dict[str, str]:
    out = {"python": platform.python_version(), "redis-server": redis_server.version()}
    for dist in ("celery", "kombu", "redis", "girder-celery"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "?"
    return out


def _safe(url: str) -> str:
    from girder_celery.errors import safe_url

    return safe_url(url)


def run(args: argparse.Namespace) -> dict[str, Any]:
    brokers = args.broker or ["redis", "amqp"]
    suites = [SUITES[name] for name in (args.suite or list(SUITES))]
    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpus": os.cpu_count(), "runs": []}
    stores = args.store or ["redis"]
    redis_server = RedisServer().start()
    cluster = ClusterGroup().start() if "cluster" in stores else None
    try:
        report["versions"] = _versions(redis_server)
        print("girder-celery benchmarks  " + "  ".join(f"{k} {v}" for k, v in report["versions"].items()))
        print(f"private redis-server on port {redis_server.port}; {os.cpu_count()} CPUs")
        for broker in brokers:
            if broker == "amqp":
                url = AMQP_URL
                why = amqp_unreachable(url)
                if why is not None:
                    print(f"\n[amqp] RabbitMQ unreachable at {_safe(url)} ({why}): skipped")
                    report["runs"].append({"broker": "amqp", "skipped": why})
                    continue
            else:
                url = redis_server.url(BROKER_DB)
            for s in suites:
                for store in stores:
                    store_url = cluster.url() if store == "cluster" else None
                    report["runs"].append(run_suite(redis_server, broker, url, s, args, store_url))
    finally:
        if cluster is not None:
            cluster.close()
        redis_server.close()
    if len(stores) > 1:
        print(format_store_comparison(report["runs"]))
    return report


def format_store_comparison(runs: list[dict[str, Any]]) -> str:
    """Each scenario's median on the single Redis and on the cluster, per call: the difference and
    the ratio cluster / single (a scenario's median is per call: a round trip, a run)."""
    by = {(r["broker"], r["suite"], r.get("store")): r for r in runs if "scenarios" in r}
    lines = ["\nstate store: Redis Cluster (3 masters) against a single Redis, medians per call"]
    lines.append(f"  {'broker/suite/scenario':<44} {'single ms':>10} {'cluster ms':>11} {'diff ms':>9} {'ratio':>7}")
    for (broker, suite, store), single in by.items():
        other = by.get((broker, suite, "cluster"))
        if store != "redis" or other is None:
            continue
        for name, fig in single["scenarios"].items():
            theirs = other["scenarios"].get(name)
            if theirs is None:
                continue
            a, b = fig["median_ms"], theirs["median_ms"]
            ratio = f"{b / a:.2f}x" if a else "-"
            lines.append(f"  {broker + '/' + suite + '/' + name:<44} {a:>10.3f} {b:>11.3f} {b - a:>9.3f} {ratio:>7}")
    return "\n".join(lines)


def run_suite(
    redis_server: RedisServer, broker: str, url: str, s, args: argparse.Namespace, store_url: str | None = None
) -> dict[str, Any]:
    grid = Grid(redis_server, broker, url, args.pool, args.concurrency, store_url)
    store = "cluster" if store_url else "redis"
    try:
        grid.start_nodes(s.nodes)
        flags = grid.shown_flags()
        print(f"\n[{broker}, {store}] suite {s.name}: {s.description}")
        where = f"a Redis Cluster ({store_url})" if store_url else "redis db 0"
        print(f"  broker {_safe(url)}, backend redis db 2, state store {where}")
        if s.nodes:  # else the suite starts its own, and says how
            print(f"  {s.nodes} worker(s): celery -A benchmarks.benchapp worker {flags}")
        t0 = time.monotonic()
        plan = s.build(grid, args)
        if not isinstance(plan, Plan):
            plan = Plan(plan)
        results, figures, notes = run_plan(plan, args.rounds)
        elapsed = time.monotonic() - t0
        print(format_table(f"  {broker} / {store} / {s.name}  ({elapsed:.1f}s; ratios rounded up)", results))
        for note in notes:
            print(f"  {note}")
        if figures:
            print(format_figures(figures))
        return {
            "broker": broker,
            "store": store,
            "broker_url": _safe(url),
            "suite": s.name,
            "nodes": s.nodes,
            "worker_flags": flags,
            "seconds": elapsed,
            "scenarios": {name: r.as_dict() for name, r in results.items()},
            "figures": {f.name.strip(): f.as_dict() for f in figures},
            "notes": notes,
        }
    finally:
        grid.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    report = run(args)
    report["seconds"] = time.monotonic() - t0
    print(f"\ntotal {report['seconds']:.1f}s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
        print(f"figures written to {args.json}")
    failed = [
        f"{run['broker']}/{run['suite']}/{name}"
        for run in report["runs"]
        for kind in ("scenarios", "figures")
        for name, fig in run.get(kind, {}).items()
        if fig["passed"] is False
    ]
    if failed:
        print("targets missed: " + ", ".join(failed))
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
