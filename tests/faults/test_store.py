"""State-store faults: the store killed and restarted empty, frozen (SIGSTOP/SIGCONT), and killed
and restarted with its data, mid-request (invariant 1: the store is the truth, and a waiter
re-submits what it waits for once the store is back, so nothing waits on a record the outage lost).

The promise pinned (issue 11): a store outage never stalls a request longer than the outage plus
a check interval or two. Each test runs one single-executor node on a state store of its own (the
session's Redis keeps the broker, the run counters and gates, which must outlive the fault), with
request A (``grid.gated``) running and request B (``grid.add``) queued behind it when the store
goes; during the outage A's function returns and the node takes B's offer. Both callers must be
answered within ``BOUND`` of the store's return, A run at most twice (its first completion may be
lost with the store), B once, and the node must serve afterwards. A call made while the store
is away, by a process that reached it before, rides the outage out the same way.
"""

from __future__ import annotations

import time
import uuid

import pytest

from tests.faults.support import (
    STORE_RETURN,
    Dag,
    answer,
    assert_runs,
    assert_serving,
    freeze,
    queued_messages,
    record,
    runs,
    tag,
    thaw,
    wait_received,
)
from tests.harness import wait_until

pytestmark = pytest.mark.faults

LEASE, CHECK = 1.0, 0.5
#: Seconds the store stays away (killed) or frozen.
OUTAGE, FROZEN = 2.0, 4.0
#: From the store's return to every answer: a check interval or two, plus slack for a loaded machine.
BOUND = 2 * CHECK + 2.0
ROUNDS_EMPTY = 5


class Scenario:
    """Request A running on the grid's only node, request B queued behind it."""

    def __init__(self, grid, node, callers, outage: float) -> None:
        m = grid.app_module
        self.grid, self.node = grid, node
        self.a, self.x = tag(), int(uuid.uuid4().int % 10**9)
        self.a_key, self.b_key = m.gated.key(self.a), m.add.key(self.x, 1)
        timeout = outage + BOUND + 5  # a stall past the bound fails as a GirderTimeout, soon
        self.fa = callers.call(m.girder.request, m.gated.s(self.a), timeout)
        wait_until(lambda: runs(grid, "grid.gated", self.a_key) == 1, 20, "A to start")
        self.fb = callers.call(m.girder.request, m.add.s(self.x, 1), timeout)
        self.b_created = wait_until(
            lambda: (rec := record(grid, self.b_key)).get("state") == "queued" and rec["created_at"], 10, "B queued"
        )
        # B's offer on the broker: its caller has read the submit's reply and published it (a
        # fault between the two is the next test's).
        wait_until(lambda: queued_messages(grid) == 1, 10, "B's offer published")

    def during_outage(self, fault_at: float, outage: float) -> None:
        """A's function returns and the node takes B's offer while the store is away; the
        outage lasts ``outage`` seconds in all (its length is the fault, not a synchronisation)."""
        m = self.grid.app_module
        self.grid.redis_server.client().rpush(m.gate_key(self.a), "open", "open")  # a rerun passes too
        wait_received(self.node, self.b_key)
        time.sleep(max(0.0, fault_at + outage - time.monotonic()))

    def after_return(self, back_at: float) -> float:
        """Both callers answered right within ``BOUND``, runs as the fault explains; the time
        from the store's return to the last answer."""
        va, a_done = answer(self.fa, 30)
        vb, b_done = answer(self.fb, 30)
        assert (va, vb) == (self.a, self.x + 1)
        recovered = max(a_done, b_done) - back_at
        assert recovered < BOUND, f"answered {recovered:.2f}s after the store returned (bound {BOUND}s)"
        assert_runs(self.grid, {("grid.gated", self.a_key): (1, 2), ("grid.add", self.b_key): (1, 1)})
        return recovered


def grid_on_private_store(make_fault_grid, store):
    grid = make_fault_grid("redis", lease=LEASE, check=CHECK, store=store)
    node = grid.worker("n1", "solo", 1)
    assert_serving(grid, [node])  # warm: the node's scripts are loaded before the fault
    return grid, node


@pytest.mark.invariant1
def test_the_store_killed_and_restarted_empty_mid_request(make_fault_grid, private_redis, callers, figures):
    """The store killed mid-request and restarted empty, round after round: the waiters submit
    again what the store lost, and every request is answered within a check or two of its return.
    The node's hoister, which fails each pass of an outage, logs each outage once with its
    traceback, and its recovery."""
    store = private_redis()
    grid, node = grid_on_private_store(make_fault_grid, store)
    for _ in range(ROUNDS_EMPTY):
        s = Scenario(grid, node, callers, OUTAGE)
        store.stop()
        s.during_outage(time.monotonic(), OUTAGE)
        store.start()
        figures.add("store restarted empty -> answer", s.after_return(time.monotonic()), STORE_RETURN)
    assert_serving(grid, [node])
    log = node.output()
    assert log.count("girder: hoisting failed; will retry") == ROUNDS_EMPTY
    assert log.count("girder: hoisting works again") == ROUNDS_EMPTY


@pytest.mark.invariant1
def test_a_call_made_while_the_store_is_away_rides_out_the_outage(make_fault_grid, private_redis, callers, figures):
    """A process that has reached the store before calls while it is away (killed): an outage,
    not a wrong URL, so the call rides it out as a wait under way does, and is answered within a
    check or two of the store's return; the request runs once."""
    store = private_redis()
    grid, node = grid_on_private_store(make_fault_grid, store)
    m, x = grid.app_module, int(uuid.uuid4().int % 10**9)
    key = m.add.key(x, 1)
    store.stop()
    called = time.monotonic()
    future = callers.call(m.girder.request, m.add.s(x, 1), OUTAGE + BOUND + 5)
    time.sleep(max(0.0, called + OUTAGE - time.monotonic()))  # the outage itself
    assert not future.done()  # still riding it out, not refused
    store.start()
    back = time.monotonic()
    value, answered = answer(future, 30)
    assert value == x + 1
    assert answered - back < BOUND, f"answered {answered - back:.2f}s after the store returned (bound {BOUND}s)"
    figures.add("call made in an outage -> answer", answered - back, STORE_RETURN)
    assert_runs(grid, {("grid.add", key): (1, 1)})
    assert_serving(grid, [node])


@pytest.mark.invariant1
def test_the_store_frozen_mid_request(make_fault_grid, private_redis, callers, figures):
    """The store frozen (SIGSTOP) for 4 s mid-request, then thawed: every request is answered
    within a check or two of the thaw."""
    store = private_redis()
    grid, node = grid_on_private_store(make_fault_grid, store)
    s = Scenario(grid, node, callers, FROZEN)
    freeze(store.proc.pid)
    try:
        s.during_outage(time.monotonic(), FROZEN)
    finally:
        thaw(store.proc.pid)
    figures.add("store frozen 4 s, thawed -> answer", s.after_return(time.monotonic()))
    assert_serving(grid, [node])


@pytest.mark.invariant1
def test_the_store_killed_and_restarted_with_its_data_mid_request(make_fault_grid, private_redis, callers, figures):
    """The store killed mid-request and restarted from its append-only file: the records it kept
    (A running under a lapsed lease, B queued with an offer the node took during the outage) are
    recovered within a check or two of its return."""
    store = private_redis(persistent=True)
    grid, node = grid_on_private_store(make_fault_grid, store)
    s = Scenario(grid, node, callers, OUTAGE)
    store.stop()
    s.during_outage(time.monotonic(), OUTAGE)
    store.start()
    assert record(grid, s.b_key).get("created_at") == s.b_created  # B's record survived the restart
    figures.add("store restarted with data -> answer", s.after_return(time.monotonic()), STORE_RETURN)
    assert_serving(grid, [node])


@pytest.mark.invariant1
def test_the_store_killed_and_restarted_empty_mid_dag(make_fault_grid, private_redis, callers, figures):
    """The store killed while a DAG runs on two nodes, restarted empty: the parent's inline wait
    and its caller ride out the outage and submit again what the store lost; the DAG completes,
    and no request runs more than once after the store's return."""
    n, seconds = 6, 0.4
    store = private_redis()
    grid = make_fault_grid("redis", lease=LEASE, check=CHECK, store=store)
    nodes = dict(zip(["n1", "n2"], grid.start_workers(["n1", "n2"], "solo", 1)))
    assert_serving(grid, nodes.values())
    dag = Dag(grid, nodes, callers, n, seconds)
    store.stop()
    time.sleep(OUTAGE)  # the outage itself; the children running finish their sleep meanwhile
    started = dag.runs()  # no claim succeeds while the store is away: these began before it went
    store.start()
    back = time.monotonic()

    finished = dag.answered(30)

    assert finished - back < BOUND + n * seconds  # a check or two, plus the work the outage lost
    figures.add("store restarted empty mid-DAG -> answer", finished - back, STORE_RETURN)
    assert_runs(grid, {k: (1, before + 1) for k, before in started.items()})
    assert_serving(grid, nodes.values())


def test_a_run_longer_than_the_stores_idle_timeout_is_answered_as_it_ends(make_fault_grid, private_redis):
    """The store closes connections idle for over a second (Redis's ``timeout 1``), and a request
    runs 2.5 s: meanwhile the server closes the connection the node claimed it on. Its completion,
    sent as the run ends, goes on a fresh connection, so the caller is answered as the run ends
    and the request runs once; sent on the closed one it was lost, and the request waited for its
    lease (30 s here) or the node's next message."""
    store = private_redis()
    grid = make_fault_grid("redis", lease=30, check=5, store=store)
    grid.worker("n1", "solo", 1)
    m = grid.app_module
    with store.client() as admin:
        admin.config_set("timeout", 1)
    for round_ in range(2):
        x = tag()
        started = time.monotonic()
        assert m.girder.request(m.slow.s(2.5, x), timeout=20)["tag"] == x
        took = time.monotonic() - started
        assert took < 2.5 + 1.5, f"round {round_}: answered {took:.1f} s after the call"
        assert runs(grid, "grid.slow", m.slow.key(2.5, x)) == 1
