"""girder-celery benchmarks: girder side by side with stock Celery, on real servers.

Run from the repository root::

    python -m benchmarks                  # every suite, on Redis and on RabbitMQ
    python -m benchmarks --json out.json  # also write every figure as JSON
    python -m benchmarks --broker redis --hits 300 --cold 100   # quicker

What it starts
    A private ``redis-server`` on a free port (db 0: girder's state store, db 1: the Redis broker,
    db 2: Celery's result backend, for girder and stock Celery alike). For each broker, Redis
    (db 1) and RabbitMQ (``$GIRDER_TEST_AMQP_URL``, default ``amqp://guest:guest@127.0.0.1:5672//``;
    skipped with a message when unreachable), a fresh queue and key prefix, and real
    ``celery -A benchmarks.benchapp worker`` subprocesses. One worker process serves both the girder
    task ``inc(x)`` and the plain Celery task ``plain_inc(x)`` (the same function) with the same
    flags, printed with the results; the default ``-P solo -c 1`` adds no pool IPC to either side.
    The RabbitMQ queue is deleted at the end, the private Redis stopped.

What it measures (suite ``roundtrip``)
    N sequential round trips from one client process, each timed with ``perf_counter_ns``:

    - ``stock``: ``plain_inc.delay(x).get()``, a fresh x each time (the baseline);
    - ``girder cold``: ``inc.call(x)``, a fresh x each time, so nothing is memoized: submit script,
      offer message, claim and complete scripts on the worker, wake-up by BLPOP;
    - ``girder hit``: ``inc.call(x)`` for an x computed before timing: one submit script, no message.

    Every answer is checked. After an interleaved warm-up the scenarios run in rounds, each round
    a slice of every scenario in a rotated order, so drift is shared evenly. Per scenario it reports
    the median and nearest-rank p90 (ms), and the ratio of its median to the stock median, rounded
    up, against the targets: cache hit <= 0.07x stock, cold <= 0.9x stock (judged unrounded).

Adding scenarios
    A suite is a function ``(grid, options) -> list[Scenario]`` registered with ``@suite(...)`` in
    ``benchmarks/suites.py``, naming how many worker nodes it needs; ``runner.measure`` times it.

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

from .grid import BROKER_DB, Grid
from .runner import format_table, measure
from .servers import AMQP_URL, RedisServer, amqp_reachable
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
    p.add_argument("--pool", default="solo", help="worker pool, the same for girder and stock (default solo)")
    p.add_argument("--concurrency", type=int, default=1, help="worker concurrency (default 1)")
    p.add_argument("--hits", type=int, default=1000, help="timed cache-hit round trips (default 1000)")
    p.add_argument("--cold", type=int, default=300, help="timed cold and stock round trips each (default 300)")
    p.add_argument("--warmup", type=int, default=30, help="untimed round trips per scenario first (default 30)")
    p.add_argument("--rounds", type=int, default=20, help="interleaved rounds (default 20)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = p.parse_args(argv)
    for name in ("hits", "cold", "rounds", "concurrency"):
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
    redis_server = RedisServer().start()
    try:
        report["versions"] = _versions(redis_server)
        print("girder-celery benchmarks  " + "  ".join(f"{k} {v}" for k, v in report["versions"].items()))
        print(f"private redis-server on port {redis_server.port}; {os.cpu_count()} CPUs")
        for broker in brokers:
            if broker == "amqp":
                url = AMQP_URL
                why = amqp_reachable(url)
                if why is not None:
                    print(f"\n[amqp] RabbitMQ unreachable at {_safe(url)} ({why}): skipped")
                    report["runs"].append({"broker": "amqp", "skipped": why})
                    continue
            else:
                url = redis_server.url(BROKER_DB)
            for s in suites:
                report["runs"].append(run_suite(redis_server, broker, url, s, args))
    finally:
        redis_server.stop()
    return report


def run_suite(redis_server: RedisServer, broker: str, url: str, s, args: argparse.Namespace) -> dict[str, Any]:
    grid = Grid(redis_server, broker, url, args.pool, args.concurrency)
    try:
        grid.start_workers(s.nodes)
        flags = " ".join(grid.worker_flags).replace(grid.queue, "<queue>")
        print(f"\n[{broker}] suite {s.name}: {s.description}")
        print(f"  broker {_safe(url)}, backend redis db 2, state store redis db 0")
        print(f"  {s.nodes} worker(s): celery -A benchmarks.benchapp worker {flags}")
        t0 = time.monotonic()
        scenarios = s.build(grid, args)
        results = measure(scenarios, rounds=args.rounds)
        elapsed = time.monotonic() - t0
        print(format_table(f"  {broker} / {s.name}  ({elapsed:.1f}s; ratios rounded up)", results))
        return {
            "broker": broker,
            "broker_url": _safe(url),
            "suite": s.name,
            "nodes": s.nodes,
            "worker_flags": flags,
            "seconds": elapsed,
            "scenarios": {name: r.as_dict() for name, r in results.items()},
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
        for name, fig in run.get("scenarios", {}).items()
        if fig["passed"] is False
    ]
    if failed:
        print("targets missed: " + ", ".join(failed))
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
