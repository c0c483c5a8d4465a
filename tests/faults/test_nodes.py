"""Node faults on real workers: kill -9 mid-DAG, warm shutdown mid-request, a duplicate storm
(invariant 1: the store is the truth, so a dead node's work is recovered from its leases, and
identical requests share one execution however many processes make them).

The DAG is ``grid.sleepy_parent``: a parent requesting ``N`` children of ``SECONDS`` each, spread
over two single-executor nodes (the parent's node runs them inline, the other takes the copies
hoisted to the pool). Each test ends with every caller answered the right value within its bound,
every function run no more often than the fault explains, and every node serving a fresh request.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.faults.support import NODE_DEATH, Dag, assert_runs, assert_serving, kill_node, record, tag
from tests.harness import ROOT, wait_until

pytestmark = pytest.mark.faults

LEASE, CHECK = 1.0, 0.5
N, SECONDS = 6, 0.4
#: Kill rounds per (broker, worker pool): each kind of victim (the parent's node, the other node) in turn.
KILL_ROUNDS = [("redis", "solo", 6), ("amqp", "solo", 4), ("redis", "prefork", 2)]


@pytest.mark.invariant1
@pytest.mark.parametrize("broker,pool,rounds", KILL_ROUNDS, ids=[f"{b}-{p}" for b, p, _ in KILL_ROUNDS])
def test_a_node_killed_mid_dag_is_recovered_round_after_round(broker, pool, rounds, make_fault_grid, callers, figures):
    """kill -9 of the parent's node, then of the other node, round after round (the killed node
    restarted between rounds): the DAG completes, and only what the dead node ran runs twice."""
    grid = make_fault_grid(broker, lease=LEASE, check=CHECK)
    nodes = dict(zip(["n1", "n2"], grid.start_workers(["n1", "n2"], pool, 1)))
    where = f"[{broker}/{pool}]"
    undisturbed = Dag(grid, nodes, callers, N, SECONDS)
    figures.add(f"undisturbed DAG, spread to answer {where}", undisturbed.answered(30) - undisturbed.spread_at)
    for i in range(rounds):
        dag = Dag(grid, nodes, callers, N, SECONDS)
        kill_parent = i % 2 == 0
        name = next(n for n, w in nodes.items() if (w.hostname == dag.parent_host) == kill_parent)
        interrupted, died = kill_node(grid, nodes[name], [dag.key, *dag.children])
        assert interrupted, "the killed node was running nothing"

        finished = dag.answered(60)

        # Within a lease and a check or two of the death, plus the work left (at most the whole DAG).
        assert finished - died < LEASE + 2 * CHECK + N * SECONDS + 3.0
        victim = "the parent's node" if kill_parent else "the other node"
        figures.add(f"kill -9 of {victim} -> answer {where}", finished - died, NODE_DEATH)
        assert_runs(grid, dag.expected_runs(interrupted))
        nodes[name] = grid.worker(name, pool, 1)
    assert_serving(grid, nodes.values())


@pytest.mark.invariant1
@pytest.mark.parametrize("pool,concurrency", [("solo", 1), ("prefork", 2)])
def test_a_warm_shutdown_mid_dag_finishes_the_request_first(pool, concurrency, make_fault_grid, callers):
    """SIGTERM to the main process of the parent's node mid-DAG: the node finishes the request,
    then exits; nothing runs twice and the restarted node serves."""
    grid = make_fault_grid("redis", lease=LEASE, check=CHECK)
    nodes = dict(zip(["n1", "n2"], grid.start_workers(["n1", "n2"], pool, concurrency)))
    dag = Dag(grid, nodes, callers, N, SECONDS)
    name = next(n for n, w in nodes.items() if w.hostname == dag.parent_host)
    os.kill(nodes[name].proc.pid, signal.SIGTERM)  # the main process only, as `kill -TERM <pid>`

    dag.answered(30)

    assert record(grid, dag.key)["node"] == dag.parent_host  # finished where it ran
    assert nodes[name].proc.wait(30) == 0, nodes[name].output(80)
    assert_runs(grid, dag.expected_runs())
    nodes[name] = grid.worker(name, pool, concurrency)
    assert_serving(grid, nodes.values())


STORM = """
import json, os, sys, threading
import redis
import tests.gridapp as m

sync, t, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
r = redis.Redis.from_url(os.environ["GIRDER_TEST_COUNTERS"])
go = threading.Event()
results = [None] * n

def call(i):
    go.wait(60)
    try:
        results[i] = ["ok", m.girder.request(m.slow.s(0.5, t), timeout=30)]
    except Exception as exc:
        results[i] = ["error", repr(exc)]

threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
for th in threads:
    th.start()
r.rpush(sync + ":ready", os.getpid())
if not r.blpop([sync + ":go"], timeout=60):
    sys.exit("never told to go")
go.set()
for th in threads:
    th.join(60)
print(json.dumps(results))
"""


@pytest.mark.invariant1
def test_a_duplicate_storm_from_four_processes_runs_once(make_fault_grid):
    """200 identical callers, 50 threads in each of 4 processes, let go at once on two nodes:
    one offer, one execution, and all 200 answered the same value."""
    procs_n, threads_n = 4, 50
    grid = make_fault_grid("redis", lease=LEASE, check=CHECK)
    m = grid.app_module
    workers = grid.start_workers(["n1", "n2"], "solo", 1)
    t = tag()
    key = m.slow.key(0.5, t)
    sync = f"{grid.key_prefix}:test:storm:{t}"
    counter = grid.redis_server.client()
    env = {**os.environ, **grid.env, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-c", STORM, sync, t, str(threads_n)]
    procs = [
        subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(procs_n)
    ]
    try:
        wait_until(lambda: counter.llen(f"{sync}:ready") == procs_n, 60, f"{procs_n} caller processes")
        counter.rpush(f"{sync}:go", *["go"] * procs_n)
        outputs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0] * procs_n, [err[-2000:] for _, err in outputs]
    results = [r for out, _ in outputs for r in json.loads(out)]
    assert len(results) == procs_n * threads_n
    ran_on = record(grid, key)["node"]
    assert all(r == ["ok", {"tag": t, "node": ran_on}] for r in results), {json.dumps(r) for r in results}
    assert_runs(grid, {("grid.slow", key): (1, 1)})
    rec = record(grid, key)
    assert (rec["offers"], rec["attempts"]) == ("1", "1")
    assert_serving(grid, workers)
