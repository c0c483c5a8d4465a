"""Helpers of the fault-injection suite: grids whose parts a test may kill, callers in threads,
snapshots of what a fault interrupted, the checks every fault test ends with, and the recovery
figures (issue 11, item 6).

A fault grid is a ``tests.harness.Grid`` whose state store, broker, or both, may be private
``RedisServer``s that the test kills, freezes or restarts: the session's Redis keeps what must
outlive the fault (the workers' ready announcements, the run counters and gates of
``tests.gridapp``, and the result backend). Every wait is bounded and polls for the event it names.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from girder_celery.testing import CeleryWorker, RedisServer
from tests.harness import Grid, wait_until

#: Where the recovery figures of a run go (and they are printed at the end of the session).
FIGURES_PATH = Path(os.environ.get("GIRDER_FAULT_FIGURES", "/tmp/girder-fault-recovery.json"))


def tag() -> str:
    return uuid.uuid4().hex[:10]


def fault_grid(
    redis_server: RedisServer,
    broker: str,
    *,
    lease: float,
    check: float,
    store: RedisServer | None = None,
    broker_server: RedisServer | None = None,
    reoffer: float | None = None,
) -> Grid:
    """A grid of ``tests.gridapp`` on ``broker`` with short timing; its state store is ``store``
    and its Redis broker ``broker_server`` when given (else the session's ``redis_server``), and
    ``reoffer`` its ``girder_reoffer_after``. The app is loaded in this process."""
    grid = Grid(redis_server, broker, lease=lease, check=check)
    if store is not None:
        grid.env["GIRDER_TEST_STORE"] = store.url(0)
    if broker_server is not None:
        grid.env["GIRDER_TEST_BROKER"] = grid.broker_url = broker_server.url(1)
    if reoffer is not None:
        grid.env["GIRDER_TEST_REOFFER"] = str(reoffer)
    grid.load_app()
    return grid


class Callers:
    """Blocking calls run in threads: ``call(fn, *args)`` gives a Future of ``(ok, value or
    exception, monotonic time it returned)``. Every call a test makes carries its own timeout."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="fault-caller")

    def call(self, fn: Callable, *args: Any, **kwargs: Any) -> Future:
        def timed() -> tuple[bool, Any, float]:
            try:
                return True, fn(*args, **kwargs), time.monotonic()
            except BaseException as exc:
                return False, exc, time.monotonic()

        return self.pool.submit(timed)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def answer(future: Future, timeout: float = 90) -> tuple[Any, float]:
    """The value a caller got and when it returned; its exception is raised."""
    ok, value, finished = future.result(timeout)
    if not ok:
        raise value
    return value, finished


# -- the state store, read directly ----------------------------------------------------------


def record(grid: Grid, key: str) -> dict[str, str]:
    """The request record of ``key`` in the grid's own state store (empty if absent)."""
    store = grid.app_module.girder.store
    return store.client.hgetall(store.record_key(key))


def runs(grid: Grid, task_name: str, key: str) -> int:
    """How many times the function of ``key`` started (``count_run`` in tests/gridapp.py)."""
    return int(grid.redis_server.client().get(grid.app_module.runs_key(task_name, key)) or 0)


def queued_messages(grid: Grid) -> int:
    """Messages waiting in the grid's queue on its broker (either kind), by the broker."""
    app = grid.app_module.app
    with app.connection_for_write() as connection:
        return connection.default_channel.queue_declare(grid.queue, passive=True).message_count


def running_on(grid: Grid, keys: Iterable[str], node: str) -> set[str]:
    """Which of ``keys`` are running on ``node`` now, by the store."""
    return {k for k in keys if (rec := record(grid, k)).get("state") == "running" and rec.get("node") == node}


# -- faults ------------------------------------------------------------------------------------


def freeze(proc_pid: int, group: bool = False) -> None:
    """SIGSTOP a process (or its process group): it holds its sockets and answers nothing."""
    (os.killpg if group else os.kill)(proc_pid, signal.SIGSTOP)


def thaw(proc_pid: int) -> None:
    os.kill(proc_pid, signal.SIGCONT)


def kill_node(grid: Grid, worker: CeleryWorker, keys: Iterable[str]) -> tuple[set[str], float]:
    """kill -9 a node mid-request: freeze its process group first, so that what it was running
    can be read from the store before it dies and nothing starts there in between; then SIGKILL.
    The ``keys`` it was running (the only ones the fault allows to run twice) and when it died."""
    freeze(worker.proc.pid, group=True)
    interrupted = running_on(grid, keys, worker.hostname)
    worker.kill()
    return interrupted, time.monotonic()


class Dag:
    """A DAG spread over two nodes: ``grid.sleepy_parent(n, seconds)`` requested by a caller, its
    ``n`` children run inline on the parent's node and on the other node (copies hoisted to the
    pool); started once children run on every one of ``nodes`` at once."""

    def __init__(self, grid: Grid, nodes: dict[str, CeleryWorker], callers: Callers, n: int, seconds: float) -> None:
        m = grid.app_module
        self.grid, self.t, self.n = grid, tag(), n
        parent = m.reentrant_tasks.sleepy_parent
        self.key = parent.key(n, seconds, self.t)
        self.children = [m.slow.key(seconds, tag=f"{self.t}.{i}") for i in range(n)]
        self.hosts = [w.hostname for w in nodes.values()]
        self.future = callers.call(m.girder.request, parent.s(n, seconds, self.t), 60)
        self.parent_host = wait_until(lambda: record(grid, self.key).get("node"), 20, "the parent to start")
        wait_until(lambda: self.spread(), 20, "children running on both nodes")
        self.spread_at = time.monotonic()

    def spread(self) -> bool:
        return all(running_on(self.grid, self.children, h) for h in self.hosts)

    def answered(self, timeout: float) -> float:
        """The caller got the right value; when."""
        value, finished = answer(self.future, timeout)
        assert [c["tag"] for c in value] == [f"{self.t}.{i}" for i in range(self.n)]
        assert {c["node"] for c in value} <= set(self.hosts), value
        return finished

    def runs(self) -> dict[tuple[str, str], int]:
        """How many times each request of the DAG has started so far."""
        return {k: runs(self.grid, *k) for k in self.named()}

    def named(self) -> list[tuple[str, str]]:
        return [("grid.sleepy_parent", self.key), *(("grid.slow", k) for k in self.children)]

    def expected_runs(self, twice: Iterable[str] = ()) -> dict[tuple[str, str], tuple[int, int]]:
        """What a dead node explains: once each, twice for the keys it was running."""
        twice = set(twice)
        return {(name, k): (1, 2 if k in twice else 1) for name, k in self.named()}


# -- the checks every fault test ends with -----------------------------------------------------


def assert_runs(grid: Grid, expected: dict[tuple[str, str], tuple[int, int]]) -> None:
    """Each ``(task name, key)`` ran between ``lo`` and ``hi`` times: what the fault explains."""
    got = {k: runs(grid, *k) for k in expected}
    wrong = {k: (n, expected[k]) for k, n in got.items() if not expected[k][0] <= n <= expected[k][1]}
    assert not wrong, f"runs outside what the fault explains, {{(task, key): (runs, (lo, hi))}}: {wrong}"


def running_anything_on(grid: Grid, node: str) -> bool:
    """Whether the store has any request of the grid running on ``node``."""
    store = grid.app_module.girder.store
    for rkey in store.client.scan_iter(store.record_key("*"), count=1000):
        state, on = store.client.hmget(rkey, "state", "node")
        if state == "running" and on == node:
            return True
    return False


def assert_serving(grid: Grid, workers: Iterable[CeleryWorker], timeout: float = 20) -> None:
    """Every node is alive and, once done with what the fault left it (a duplicate the fault
    explains may still run after the answer), serves a fresh request offered to its own queue."""
    m = grid.app_module
    for w in workers:
        assert w.proc.poll() is None, f"node {w.hostname} died ({w.proc.returncode}):\n{w.output(80)}"
        # Else the request would wait on the busy node's queue and be hoisted to another node.
        wait_until(lambda w=w: not running_anything_on(grid, w.hostname), timeout, f"{w.hostname} to be idle")
        x = int(uuid.uuid4().int % 10**9)
        got = m.girder.request(m.add.s(x, 1), timeout=timeout, pool=m.girder.node_queue(w.hostname))
        assert got == x + 1
        assert record(grid, m.add.key(x, 1))["node"] == w.hostname


def wait_received(worker: CeleryWorker, key: str, timeout: float = 15) -> None:
    """Until the node's consumer has received a message of ``key`` (its log says so)."""
    wait_until(lambda: f"[{key}] received" in worker.output(), timeout, f"{worker.hostname} to receive {key}")


# -- recovery figures ----------------------------------------------------------------------------


#: The figures of issue 11, item 6, each over every round of the kinds it groups.
NODE_DEATH, STORE_RETURN = "ALL: node death (kill -9) -> answer", "ALL: store restarted (empty or with data) -> answer"


class Figures:
    """Recovery times by kind (seconds, one per round); summarised, printed and written as JSON."""

    def __init__(self) -> None:
        self.rounds: dict[str, list[float]] = {}

    def add(self, kind: str, seconds: float, group: str | None = None) -> None:
        """One round of ``kind``; also counted in ``group``, a figure over several kinds."""
        for name in filter(None, (kind, group)):
            self.rounds.setdefault(name, []).append(round(seconds, 3))
        print(f"\n[recovery] {kind}: {seconds:.3f} s")

    def summary(self) -> dict[str, dict[str, Any]]:
        return {
            kind: {"median_s": round(statistics.median(v), 3), "max_s": max(v), "rounds": len(v), "samples_s": v}
            for kind, v in self.rounds.items()
        }

    def report(self) -> None:
        if not self.rounds:
            return
        summary = self.summary()
        FIGURES_PATH.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"\n== recovery figures (median over rounds), also in {FIGURES_PATH}")
        for kind, s in summary.items():
            print(f"   {kind:<56} median {s['median_s']:.3f} s, max {s['max_s']:.3f} s, {s['rounds']} rounds")
