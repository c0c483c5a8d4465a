"""Re-entrant requests on real workers: tasks that request tasks and wait for them (invariants 1-3, 5).

Every test runs real ``celery worker`` subprocesses (``tests.harness``). The core scenarios
(fan-out, the Clojure deadlock, error chains, cycles, depth) run on every pool; prefork runs them on
both brokers, the other pools on the Redis broker. The rest runs on both brokers. Tasks live in
``tests/reentrant_tasks.py``; each counts its executions in Redis, so "ran exactly once" is checked
on the side effects, not inferred from results. Tests hold tasks at Redis "gates" and poll the
state store for what they wait on, instead of sleeping.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
import uuid
from concurrent.futures import Future

import pytest

from girder_celery import GirderError
from tests.harness import wait_until

#: (broker, pool) pairs of the pool matrix.
POOL_MATRIX = [
    ("redis", "prefork"),
    ("amqp", "prefork"),
    ("redis", "solo"),
    ("redis", "threads"),
    ("redis", "gevent"),
]
every_pool = pytest.mark.parametrize(
    "broker,pool", POOL_MATRIX, indirect=["broker"], ids=[f"{b}-{p}" for b, p in POOL_MATRIX]
)


# -- helpers ------------------------------------------------------------------------------------


@pytest.fixture
def gate(grid):
    """A fresh gate name ``g`` (tasks also use ``g:a`` and ``g:b``); all three are opened at teardown,
    before ``bg`` joins its callers, so a failing test leaves no task held."""
    name = tag()
    yield name
    for suffix in ("", ":a", ":b"):
        grid.app_module.reentrant_tasks.open_gate(name + suffix)


def value_of(future: Future, timeout: float = 90):
    ok, value, _ = future.result(timeout)
    if not ok:
        raise value
    return value


def error_of(future: Future, timeout: float = 90) -> tuple[BaseException, float]:
    ok, value, finished = future.result(timeout)
    assert not ok, f"expected an error, got {value!r}"
    return value, finished


def tag() -> str:
    return uuid.uuid4().hex[:8]


def state(grid, sig) -> dict:
    return grid.app_module.girder.state(sig)


def runs(grid) -> dict[tuple[str, str], int]:
    """Every execution counted on this grid: ``{(task name, key): runs}``."""
    client = grid.redis_server.client()
    prefix = f"{grid.key_prefix}:test:runs:"
    out = {}
    for rkey in client.scan_iter(match=prefix + "*", count=1000):
        name, key = rkey[len(prefix) :].rsplit(":", 1)
        out[(name, key)] = int(client.get(rkey))
    return out


def expected_runs(*sigs) -> dict[tuple[str, str], int]:
    return {(s.task, s.type.key(*s.args, **s.kwargs)): 1 for s in sigs}


def waits_on(grid, parent, child) -> bool:
    """Whether ``parent``'s waits-for edges include ``child`` (it has requested it and waits)."""
    girder = grid.app_module.girder
    edges = girder.store.edges_key(girder.key_of(parent))
    return bool(girder.store.client.sismember(edges, girder.key_of(child)))


def answered(grid, parent, child) -> bool:
    """Whether the store has answered ``parent``'s submit of ``child``: it is in the parent's graph
    (written by that submit; on a Redis Cluster after the walk for cycles, ``waitsfor.py``)."""
    girder = grid.app_module.girder
    graph = girder.store.graph_key(girder.key_of(parent))
    return bool(girder.store.client.hexists(graph, girder.key_of(child)))


def not_finished(*futures: Future) -> bool:
    """True while every caller still waits; a caller that already returned or raised fails the test
    at once (instead of a poll running into its timeout)."""
    for future in futures:
        if future.done():
            ok, value, _ = future.result()
            raise AssertionError(f"a caller finished early with {'value' if ok else 'error'} {value!r}")
    return True


def assert_workers_alive(*workers) -> None:
    for w in workers:
        assert w.proc.poll() is None, f"worker {w.hostname} died:\n{w.output()[-3000:]}"
        assert "RecursionError" not in w.output(), w.output()[-3000:]


# -- the core scenarios, on every pool ---------------------------------------------------------


@pytest.mark.invariant2
@every_pool
def test_fan_out_of_50_children_with_3_grandchildren_each_runs_every_request_once(grid, pool):
    """On one executor a fan-out of 201 requests completes, each run once (invariant 2)."""
    w = grid.worker("w1", pool, 1)
    rt, girder, t = grid.app_module.reentrant_tasks, grid.app_module.girder, tag()

    assert girder.request(rt.fanout.s(50, 3, t), timeout=90) == 150

    children = [rt.fanout.s(3, 0, f"{t}.{i}") for i in range(50)]
    leaves = [rt.leaf.s(f"{t}.{i}.{j}") for i in range(50) for j in range(3)]
    expected = expected_runs(rt.fanout.s(50, 3, t), *children, *leaves)
    assert len(expected) == 201
    assert runs(grid) == expected
    assert_workers_alive(w)


@pytest.mark.invariant2
@pytest.mark.invariant3
@every_pool
def test_the_clojure_deadlock_completes_on_one_executor(grid, pool, bg, gate):
    """A requests slow B; C, submitted while A waits, requests A. On one executor, invariant 3
    (inline work is descendant-only) keeps A from running C on top of its stack."""
    w = grid.worker("w1", pool, 1)
    rt, girder = grid.app_module.reentrant_tasks, grid.app_module.girder
    a, b, c = rt.requests_held.s(gate), rt.held.s(gate), rt.requests_requests_held.s(gate)

    fa = bg(girder.request, a, timeout=60)
    wait_until(lambda: not_finished(fa) and waits_on(grid, a, b), 20, "A waiting for B")
    assert state(grid, b)["state"] == "running"
    assert state(grid, a)["state"] == "running"
    fc = bg(girder.request, c, timeout=60)
    wait_until(lambda: not_finished(fa, fc) and state(grid, c)["state"] != "absent", 20, "C submitted")
    assert state(grid, a)["state"] == "running"  # C was submitted while A waits
    rt.open_gate(gate)

    expected = {"who": "", "child": {"tag": "", "node": w.hostname}}
    assert value_of(fa) == expected
    assert value_of(fc) == expected
    assert runs(grid) == expected_runs(a, b, c)


@every_pool
def test_ratio_errors_carry_the_chain_through_sub_requests(grid, pool):
    """A failure in a sub-request reaches the top with the chain of failed requests and its traceback."""
    grid.worker("w1", pool, 1)
    rt, girder = grid.app_module.reentrant_tasks, grid.app_module.girder

    assert girder.request(rt.ratio.s(5), timeout=30) == 1.25

    with pytest.raises(GirderError) as info:
        girder.request(rt.ratio.s(1), timeout=30)
    chain = info.value.chain()
    assert [e.request for e in chain] == ["grid.ratio(1)", "grid.divide(1, 0)"]
    assert chain[0].key == rt.ratio.key(1)
    assert chain[1].key == grid.app_module.divide.key(1, 0)
    assert chain[1].exc_type == "ZeroDivisionError"
    assert "ZeroDivisionError" in chain[1].remote_traceback
    assert "return x / y" in chain[1].remote_traceback
    assert "grid.divide(1, 0)" in str(info.value)


@pytest.mark.invariant5
@every_pool
def test_a_request_requesting_itself_fails_fast_naming_the_cycle(grid, pool):
    """A request that requests itself fails within 3 s, naming the cycle (invariant 5)."""
    grid.worker("w1", pool, 1)
    rt, girder = grid.app_module.reentrant_tasks, grid.app_module.girder

    start = time.monotonic()
    with pytest.raises(GirderError) as info:
        girder.request(rt.selfcycle.s(7), timeout=30)
    assert time.monotonic() - start < 3
    assert "grid.selfcycle(7) -> grid.selfcycle(7)" in str(info.value)
    assert "cycle" in str(info.value)


@pytest.mark.invariant5
@every_pool
def test_a_cycle_across_two_nodes_fails_fast_naming_the_cycle(grid, pool, bg, gate):
    """b runs on node 2 and requests a; then a, running on node 1, requests b: both fail fast
    naming the cycle (invariant 5)."""
    w1, w2 = grid.worker("w1", pool, 1), grid.worker("w2", pool, 1)
    rt, girder, t = grid.app_module.reentrant_tasks, grid.app_module.girder, gate
    a, b = rt.cross_a.s(t), rt.cross_b.s(t)

    fb = bg(girder.request, b, timeout=30, pool=girder.node_queue(w2.hostname))
    fa = bg(girder.request, a, timeout=30, pool=girder.node_queue(w1.hostname))
    wait_until(
        lambda: not_finished(fa, fb) and (state(grid, a)["node"], state(grid, b)["node"]) == (w1.hostname, w2.hostname),
        20,
        "a running on w1 and b on w2",
    )
    assert state(grid, a)["state"] == state(grid, b)["state"] == "running"
    rt.open_gate(f"{t}:b")
    wait_until(lambda: not_finished(fa, fb) and waits_on(grid, b, a) and answered(grid, b, a), 20, "b waiting for a")
    released = time.monotonic()
    rt.open_gate(f"{t}:a")

    path = f"grid.cross_a('{t}') -> grid.cross_b('{t}') -> grid.cross_a('{t}')"
    for future in (fa, fb):
        err, finished = error_of(future, 30)
        assert isinstance(err, GirderError)
        assert finished - released < 3, f"took {finished - released:.1f}s"
        assert path in str(err)
    assert state(grid, a)["state"] == state(grid, b)["state"] == "failed"
    assert_workers_alive(w1, w2)


@pytest.mark.invariant2
@every_pool
def test_a_chain_of_2000_nested_sub_requests_completes(grid, pool):
    """A chain of 2000 nested sub-requests completes on one executor, each run once (invariant 2)."""
    w = grid.worker("w1", pool, 1)
    rt, girder = grid.app_module.reentrant_tasks, grid.app_module.girder

    assert girder.request(rt.chain.s(2000), timeout=100) == 2000
    counted = runs(grid)
    assert len(counted) == 2001 and set(counted.values()) == {1}
    assert_workers_alive(w)


@pytest.mark.invariant2
@every_pool
def test_memoized_fib_2000_completes(grid, pool):
    """Memoized fib(2000), every level a request of its own, completes on one executor (invariant 2)."""
    w = grid.worker("w1", pool, 1)
    rt, girder = grid.app_module.reentrant_tasks, grid.app_module.girder

    a, b = 0, 1
    for _ in range(2000):
        a, b = b, a + b
    assert girder.request(rt.fib.s(2000), timeout=100) == a
    assert girder.state(rt.fib.s(1000))["state"] == "done"  # every level was a request of its own
    assert_workers_alive(w)


# -- starvation, sharing and the seed's workload, on both brokers -----------------------------


@pytest.mark.invariant2
def test_two_busy_executors_whose_children_queue_behind_them_complete(grid, bg):
    """Plain Celery starves here: both prefork executors hold parents that wait for children.
    Each parent runs its queued children itself (invariant 2)."""
    w = grid.worker("w1", "prefork", 2)
    rt, girder, t = grid.app_module.reentrant_tasks, grid.app_module.girder, tag()
    parents = [rt.sleepy_parent.s(4, 0.3, f"{t}.p{i}") for i in range(2)]

    future = bg(girder.requests, parents, timeout=60)
    wait_until(
        lambda: not_finished(future) and all(state(grid, p)["state"] == "running" for p in parents),
        20,
        "both parents running at once",
    )
    results = value_of(future)

    for i, result in enumerate(results):
        assert result == [{"tag": f"{t}.p{i}.{k}", "node": w.hostname} for k in range(4)]
    children = [grid.app_module.slow.s(0.3, tag=f"{t}.p{i}.{k}") for i in range(2) for k in range(4)]
    assert runs(grid) == expected_runs(*parents, *children)


@pytest.mark.invariant1
@pytest.mark.invariant2
def test_two_parents_requesting_the_same_child_at_once_share_one_run(grid, bg, gate):
    """Two parents requesting one running child wait for it and share its one run."""
    w = grid.worker("w1", "prefork", 2)
    rt, girder = grid.app_module.reentrant_tasks, grid.app_module.girder
    parents, child = [rt.requests_held.s(gate, "p0"), rt.requests_held.s(gate, "p1")], rt.held.s(gate)

    future = bg(girder.requests, parents, timeout=60)
    wait_until(lambda: not_finished(future) and all(waits_on(grid, p, child) for p in parents), 20, "parents waiting")
    assert state(grid, child)["state"] == "running"
    rt.open_gate(gate)

    shared = {"tag": "", "node": w.hostname}
    assert value_of(future) == [{"who": "p0", "child": shared}, {"who": "p1", "child": shared}]
    assert runs(grid) == expected_runs(*parents, child)


_BOGOSITY = re.compile(r"Bogosity:([^:\[\],]+):(\d+):(\d+):(\d+):(\d+):\[")


def parse_bogosity(text: str, pos: int = 0) -> tuple[tuple, int]:
    """``(node, jobnum, msec, reclevel, args, [children])`` and the position after it."""
    m = _BOGOSITY.match(text, pos)
    assert m, f"not a bogosity result at {pos}: {text[pos : pos + 60]!r}"
    node, *numbers = m.groups()
    pos, children = m.end(), []
    while text[pos] != "]":
        child, pos = parse_bogosity(text, pos)
        children.append(child)
        if text[pos] == ",":
            pos += 1
    return (node, *map(int, numbers), children), pos + 1


def bogosity_shape(jobnum: int, reclevel: int) -> tuple:
    """What the post's definition yields, without node names: (jobnum, msec, reclevel, args, kids)."""
    return (jobnum, 1, reclevel, 222, [bogosity_shape(k, reclevel - 1) for k in range(reclevel)])


def without_nodes(parsed: tuple, nodes: set[str]) -> tuple:
    node, *fields, children = parsed
    nodes.add(node)
    return (*fields, [without_nodes(c, nodes) for c in children])


@pytest.mark.invariant1
@pytest.mark.invariant2
def test_the_seeds_bogosity_workload_on_two_nodes(grid):
    """The seed's bogosity workload on two -c 1 nodes runs each of its 16 requests once, results shared."""
    w1, w2 = grid.worker("w1", "prefork", 1), grid.worker("w2", "prefork", 1)
    rt, girder = grid.app_module.reentrant_tasks, grid.app_module.girder

    results = girder.requests([rt.bogosity.s(1, j, 3, 5, 222) for j in range(10)], timeout=60)

    # 10 top-level jobs (reclevel 3) share 3 jobs of reclevel 2, which share 2 of reclevel 1,
    # which share 1 of reclevel 0: 16 distinct requests.
    distinct = {(1, k, level, 5, 222) for level in (3, 2, 1, 0) for k in range(10 if level == 3 else level + 1)}
    assert len(distinct) == 16
    assert runs(grid) == expected_runs(*(rt.bogosity.s(*args) for args in distinct))

    nodes: set[str] = set()
    for j, text in enumerate(results):
        parsed, end = parse_bogosity(text)
        assert end == len(text)
        assert without_nodes(parsed, nodes) == bogosity_shape(j, 3)
        # shared sub-results are one execution's value, so every top-level result embeds them verbatim
        assert text.split(":", 6)[6] == results[0].split(":", 6)[6]
    assert nodes <= {w1.hostname, w2.hostname}


# -- the API and Celery integration, on both brokers -----------------------------------------


def test_requests_with_return_exceptions_puts_errors_in_place(grid):
    """requests(return_exceptions=True) puts a sub-request's error chain in its place."""
    grid.worker("w1", "prefork", 1)
    rt, girder = grid.app_module.reentrant_tasks, grid.app_module.girder
    sigs = [rt.ratio.s(5), rt.ratio.s(1), grid.app_module.add.s(2, 3)]

    results = girder.requests(sigs, timeout=30, return_exceptions=True)

    assert results[0] == 1.25 and results[2] == 5
    assert isinstance(results[1], GirderError)
    assert [e.request for e in results[1].chain()] == ["grid.ratio(1)", "grid.divide(1, 0)"]
    with pytest.raises(GirderError):
        girder.requests(sigs, timeout=30)


def test_inline_runs_have_a_celery_request_context(grid):
    """Inline runs have Celery's request context: id (the key), parent_id, root_id and hostname."""
    w = grid.worker("w1", "prefork", 1)
    rt, girder = grid.app_module.reentrant_tasks, grid.app_module.girder
    k2, k1, k0 = (rt.context.key(d) for d in (2, 1, 0))

    got = girder.request(rt.context.s(2), timeout=30)

    assert got == [
        {"id": k2, "parent_id": None, "root_id": k2, "hostname": w.hostname},
        {"id": k1, "parent_id": k2, "root_id": k2, "hostname": w.hostname},
        {"id": k0, "parent_id": k1, "root_id": k2, "hostname": w.hostname},
    ]
    assert state(grid, rt.context.s(0))["node"] == w.hostname


def test_inline_runs_fire_task_prerun_and_postrun(grid):
    """Inline runs fire task_prerun and task_postrun."""
    grid.worker("w1", "prefork", 1)
    rt, girder = grid.app_module.reentrant_tasks, grid.app_module.girder
    client = grid.redis_server.client()

    girder.request(rt.context.s(2), timeout=30)

    # An inline run's tracer returns before its requester goes on: its signals have fired. The
    # top-level run's value reaches the caller before Celery's tracer ends, so its postrun may lag.
    for depth in (1, 0):
        fired = client.hgetall(rt.signals_key(rt.context.key(depth)))
        assert fired == {"prerun": "1", "postrun": "1", "state": "SUCCESS"}, f"context({depth}): {fired}"
    top = rt.signals_key(rt.context.key(2))
    wait_until(lambda: client.hget(top, "state"), 10, "postrun of the top-level run")  # its handler's last write
    assert client.hgetall(top) == {"prerun": "1", "postrun": "1", "state": "SUCCESS"}


def test_inline_results_are_mirrored_to_the_result_backend(grid):
    """Inline runs' values are mirrored to the result backend: AsyncResult(key).get() answers."""
    w = grid.worker("w1", "prefork", 1)
    rt, girder, app, t = grid.app_module.reentrant_tasks, grid.app_module.girder, grid.app_module.app, tag()
    k2, k1, k0 = (rt.tagged_context.key(d, t) for d in (2, 1, 0))

    value = girder.request(rt.tagged_context.s(2, t), timeout=30)

    assert value == [[k2, w.hostname, t], [k1, w.hostname, t], [k0, w.hostname, t]]
    assert app.AsyncResult(k1).get(timeout=10) == value[1:]
    assert app.AsyncResult(k0).get(timeout=10) == value[2:]
    assert app.AsyncResult(k2).get(timeout=10) == value


def test_celerys_guard_refuses_plain_result_get_in_tasks_but_not_girder_waits(grid):
    """Celery's guard refuses result.get() in a task, from a message or inline, but not girder's waits."""
    grid.worker("w1", "prefork", 1)
    rt, girder = grid.app_module.reentrant_tasks, grid.app_module.girder

    with pytest.raises(GirderError) as top:  # run from its own message
        girder.request(rt.plain_get.s(uuid.uuid4().hex), timeout=30)
    with pytest.raises(GirderError) as inline:  # run inline by its requester
        girder.request(rt.requests_plain_get.s(uuid.uuid4().hex), timeout=30)

    for err in (top.value, inline.value.chain()[-1]):
        assert err.exc_type == "RuntimeError"
        assert "Never call result.get() within a task!" in err.message
    assert [e.request.split("(")[0] for e in inline.value.chain()] == ["grid.requests_plain_get", "grid.plain_get"]
    # girder's own waits inside tasks (here ratio waiting for divide) are not refused
    assert girder.request(rt.ratio.s(5), timeout=30) == 1.25


def test_inline_runs_send_task_events(grid):
    """Inline runs send task-received, task-started and task-succeeded events."""
    w = grid.worker("w1", "prefork", 1, "-E")
    rt, girder, app = grid.app_module.reentrant_tasks, grid.app_module.girder, grid.app_module.app
    seen: dict[str, set[str]] = {"task-received": set(), "task-started": set(), "task-succeeded": set()}
    ready = threading.Event()
    receivers = []

    def on_event(event):
        if event.get("hostname") == w.hostname and event.get("type") in seen:
            seen[event["type"]].add(event["uuid"])

    def capture():
        with app.connection() as conn:
            receiver = app.events.Receiver(conn, handlers={"*": on_event})
            receiver.on_consume_ready = lambda *args, **kwargs: ready.set()
            receivers.append(receiver)
            receiver.capture(limit=None, timeout=None, wakeup=False)  # until should_stop

    thread = threading.Thread(target=capture, daemon=True)
    thread.start()
    try:
        assert ready.wait(20), "the event receiver did not start"
        # Events sent before the receiver is subscribed are lost: wait until it hears a probe's.
        probes = itertools.count()
        add = grid.app_module.add

        def probe_heard() -> bool:
            girder.request(add.s(next(probes), 1000), timeout=10)
            return bool(seen["task-succeeded"])

        wait_until(probe_heard, 30, "task events from the worker", step=0.2)

        girder.request(rt.context.s(2), timeout=30)

        inline_keys = {rt.context.key(1), rt.context.key(0)}
        wait_until(lambda: inline_keys <= seen["task-succeeded"], 15, "task-succeeded events of the inline runs")
        assert inline_keys <= seen["task-started"]
        assert inline_keys <= seen["task-received"]
    finally:
        for receiver in receivers:
            receiver.should_stop = True
        thread.join(15)
    assert not thread.is_alive()


def test_a_top_level_request_can_be_offered_to_a_node_queue(grid):
    """The scenarios above that pin work to a node (cross-node cycles, gevent parking) need this."""
    w = grid.worker("w1", "prefork", 1)
    girder, slow = grid.app_module.girder, grid.app_module.slow

    got = girder.request(slow.s(0, tag="pinned"), timeout=20, pool=girder.node_queue(w.hostname))

    assert got == {"tag": "pinned", "node": w.hostname}


@pytest.mark.invariant1
@pytest.mark.parametrize("broker", ["amqp"], indirect=True)
def test_an_offer_the_broker_refuses_does_not_strand_the_request(grid):
    """RabbitMQ refuses the offer (the pool's queue exists with other arguments); the same request
    made again must run, not wait for a message that was never sent (invariant 1)."""
    from kombu import Connection, Queue

    from girder_celery.testing import AMQP_URL

    grid.worker("w1", "prefork", 1)
    girder, add = grid.app_module.girder, grid.app_module.add
    odd = f"{grid.queue}-odd"
    with Connection(AMQP_URL, connect_timeout=5) as conn:
        Queue(odd, durable=False, auto_delete=False)(conn.default_channel).declare()
    try:
        with pytest.raises(Exception, match="PRECONDITION_FAILED"):
            girder.request(add.s(40, 2), timeout=10, pool=odd)

        assert girder.request(add.s(40, 2), timeout=20) == 42
    finally:
        with Connection(AMQP_URL, connect_timeout=5) as conn:
            conn.default_channel.queue_delete(odd)


@pytest.mark.invariant2
def test_under_gevent_a_waiting_request_parks_only_its_greenlet(grid, bg, gate):
    """Under gevent a request waiting on a child running elsewhere parks only its greenlet (invariant 2)."""
    w1 = grid.worker("w1", "gevent", 10)
    w2 = grid.worker("w2", "solo", 1)
    rt, girder, app = grid.app_module.reentrant_tasks, grid.app_module.girder, grid.app_module
    child = rt.held.s(gate)  # what requests_held(gate, ...) requests
    parents = [rt.requests_held.s(gate, f"p{i}") for i in range(3)]

    fchild = bg(girder.request, child, timeout=60, pool=girder.node_queue(w2.hostname))
    wait_until(lambda: not_finished(fchild) and state(grid, child)["node"] == w2.hostname, 20, "the child on w2")
    fparents = bg(girder.requests, parents, timeout=60, pool=girder.node_queue(w1.hostname))
    wait_until(lambda: not_finished(fparents) and all(waits_on(grid, p, child) for p in parents), 20, "parents on w1")

    # Three greenlets of w1 wait; the node keeps serving other requests meanwhile.
    t = tag()
    others = girder.requests(
        [app.slow.s(0.05, tag=f"{t}.{i}") for i in range(30)], timeout=30, pool=girder.node_queue(w1.hostname)
    )
    assert others == [{"tag": f"{t}.{i}", "node": w1.hostname} for i in range(30)]
    assert all((state(grid, p)["state"], state(grid, p)["node"]) == ("running", w1.hostname) for p in parents)

    rt.open_gate(gate)
    shared = {"tag": "", "node": w2.hostname}
    assert value_of(fchild) == shared
    assert value_of(fparents) == [{"who": f"p{i}", "child": shared} for i in range(3)]
