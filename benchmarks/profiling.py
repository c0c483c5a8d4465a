"""Profile girder's hot paths on real servers, client side and worker side, with cProfile.

    python -m benchmarks.profiling                     # Redis broker
    python -m benchmarks.profiling --broker amqp --out /tmp/girder-prof

Client side: the cache-hit ``inc.call(x)``, the cold ``inc.call(x)`` and stock
``plain_inc.delay(x).get()``, each profiled on its own in this process. Worker side: the same
worker command as ``python -m benchmarks``, run under ``python -m cProfile``: once serving only
girder cold calls, once serving only stock calls, so the two profiles compare per task. Prints
the wall time per call of each path, the top functions by own time, and girder's own functions;
``--out`` keeps the ``.prof`` files for ``python -m pstats`` or snakeviz.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import itertools
import pstats
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from girder_celery.testing import AMQP_URL, RedisServer, amqp_unreachable

from .grid import BROKER_DB, Grid


def _profile(fn: Callable[[], object], n: int) -> tuple[pstats.Stats, float]:
    """Profile ``n`` calls of ``fn``: the stats and the wall time per call (us, profiled)."""
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(n):
        fn()
    prof.disable()
    return pstats.Stats(prof), (time.perf_counter() - t0) / n * 1e6


def _client_phase(phase: str, m, args: argparse.Namespace) -> dict[str, tuple[pstats.Stats, float | None]]:
    """Profile the client side of one phase: girder (hits, then cold calls) or stock."""
    if phase == "stock":
        fresh = itertools.count(2 * 10**9)
        return {"client stock": _profile(lambda: m.plain_inc.delay(next(fresh)).get(timeout=30), args.cold)}
    for x in range(64):
        m.inc.call(x)
    hits = itertools.cycle(range(64))
    cold = itertools.count(10**9)
    return {
        "client girder hit": _profile(lambda: m.inc.call(next(hits)), args.hits),
        "client girder cold": _profile(lambda: m.inc.call(next(cold)), args.cold),
    }


def _show(stats: pstats.Stats, top: int, calls: int, girder_only: bool = True) -> None:
    out = io.StringIO()
    stats.stream = out
    stats.sort_stats("tottime").print_stats(top)
    if girder_only:
        stats.sort_stats("cumulative").print_stats(r"girder_celery|benchmarks/benchapp|celery/app/(trace|task|amqp)")
    text = out.getvalue()
    print("\n".join(line for line in text.splitlines() if line.strip() and "Ordered by" not in line))
    print(f"(per call: divide the times by {calls})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profiling", description=__doc__.split("\n\n")[0])
    p.add_argument("--broker", choices=["redis", "amqp"], default="redis")
    p.add_argument("--pool", default="solo")
    p.add_argument("--hits", type=int, default=3000)
    p.add_argument("--cold", type=int, default=1000)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", help="directory to keep the .prof files in")
    args = p.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="girder-prof-"))
    out.mkdir(parents=True, exist_ok=True)

    redis_server = RedisServer().start()
    try:
        if args.broker == "amqp":
            why = amqp_unreachable(AMQP_URL)
            if why:
                print(f"RabbitMQ unreachable: {why}")
                return 1
            url = AMQP_URL
        else:
            url = redis_server.url(BROKER_DB)
        stats: dict[str, tuple[pstats.Stats, float | None]] = {}
        for phase in ("girder", "stock"):
            grid = Grid(redis_server, args.broker, url, args.pool, 1)
            try:
                prof_file = out / f"worker-{phase}.prof"
                grid.start_nodes(1, python_args=("-m", "cProfile", "-o", str(prof_file)))
                stats.update(_client_phase(phase, grid.app_module, args))
            finally:
                grid.close()  # SIGTERM: the worker's cProfile writes its file as it exits
            stats[f"worker {phase}"] = (pstats.Stats(str(prof_file)), None)
    finally:
        redis_server.close()

    for name, (st, per_call) in stats.items():
        calls = args.hits if name == "client girder hit" else args.cold
        if per_call is None:
            print(f"\n=== {name}: whole worker process (idle polling included), {calls} tasks (+64 warm-up for girder)")
        else:
            print(f"\n=== {name}: {calls} calls, {per_call:.1f} us per call under the profiler")
        st.dump_stats(str(out / f"{name.replace(' ', '-')}.prof"))
        _show(st, args.top, calls)
    print(f"\nprofiles kept in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
