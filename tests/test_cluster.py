"""Girder's state store on a Redis Cluster (issue 15, item 1): ``girder_url = "redis+cluster://..."``.

One cluster of three masters for the module (``girder_celery.testing.ClusterGroup``), and every
grid of the module keeps its state store there (``Grid.default_store``): the broker, the result
backend and the run counters stay on the session's Redis. The tests of the core, re-entrant,
tiers and cancel suites named below run as they are, on the cluster; beside them: records of
different requests on every master, no CROSSSLOT (nor any other script error) on any master
after all of that, and each bad configuration a clear error at call time and at worker start.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import select
import socket
import threading
import time
import uuid

import pytest
import redis
from celery import Celery

from girder_celery import Girder, GirderConnectionError, waitsfor
from girder_celery.store import Claimant, StateStore
from girder_celery.testing import ClusterGroup, RedisServer, free_port
from tests import test_access, test_cancel, test_core_e2e, test_reentrant, test_store, test_tiers
from tests.access_support import CLUSTER_RULES, acl_rules, acl_setuser_line
from tests.conftest import POOLS, _fast_stop
from tests.core_support import open_gate
from tests.harness import Grid, repointed, wait_until

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster():
    group = ClusterGroup().start()
    yield group
    group.close()


@pytest.fixture(scope="module", autouse=True)
def _on_the_cluster(cluster):
    """Every grid of this module keeps its state store on the cluster."""
    Grid.default_store = cluster.url()
    yield
    Grid.default_store = None


@pytest.fixture
def broker():
    return "redis"


@pytest.fixture(scope="module")
def _cluster_live(redis_server, _on_the_cluster):
    g = Grid(redis_server, "redis")
    g.load_app()
    g.pool = "prefork"
    g.node = g.worker("live", "prefork", POOLS["prefork"])
    yield g
    _fast_stop(g)


@pytest.fixture
def live(_cluster_live):
    """The core suite's shared grid (one prefork worker), on the cluster, re-pointed at."""
    if _cluster_live.node.proc.poll() is not None:
        pytest.fail(f"the shared worker died:\n{_cluster_live.node.output()[-5000:]}")
    return repointed(_cluster_live)


# -- the store is a cluster's --------------------------------------------------------------------


def test_the_store_is_the_cluster_and_records_spread_over_every_master(live, cluster):
    """A client and a worker on the cluster: 60 requests, their records on each of the three
    masters, every value right."""
    m = live.app_module
    assert isinstance(m.girder.store.client, redis.RedisCluster)
    t = uuid.uuid4().hex[:8]
    assert m.girder.requests([m.echo.s(i, t) for i in range(60)], timeout=60) == [[[i, t], {}] for i in range(60)]
    prefix = m.girder.store.record_prefix
    counts = [len(list(s.client().scan_iter(match=prefix + "*", count=1000))) for s in cluster.servers]
    assert all(c > 0 for c in counts), counts
    assert sum(counts) >= 60


# -- the scripts, on the cluster ------------------------------------------------------------------

#: The script suite's tests that take a store alone, but those of a claim scan over several slots
#: (one claim_first names one slot's keys on a cluster: ``StateStore.claim_span``, below).
STORE_TESTS = [
    name
    for name, test in vars(test_store).items()
    if name.startswith("test_") and list(inspect.signature(test).parameters) == ["store"]
    and not name.startswith("test_claim_first")
]  # fmt: skip


#: The client name of the ``store`` fixture's connections (``CLIENT SETNAME``), so that a test can
#: kill those alone: not the shared worker's, whose dead connections would cost later tests seconds.
STORE_CLIENT = "girder-test-store"


@pytest.fixture
def store(cluster):
    s = StateStore(cluster.client(client_name=STORE_CLIENT), prefix=f"st-{uuid.uuid4().hex[:8]}")
    yield s
    for name in s.client.scan_iter(f"{s.prefix}:*"):
        s.client.delete(name)


@pytest.mark.parametrize("name", STORE_TESTS)
def test_script(store, name):
    """Each test of tests/test_store.py (the scripts called directly), against the cluster."""
    getattr(test_store, name)(store)


def test_a_claim_scan_names_one_slots_keys_and_claims_in_order(store):
    """On a cluster a waiter's claim scan takes the leading keys of one slot at a time: the first
    claimable in order of preference is claimed, one per call, as on a single Redis."""
    keys = [test_store.new_key() for _ in range(6)]
    store.submit([test_store.item(k) for k in keys], "", test_store.HOUR)
    test_store.claimed(store, keys[0], "n1/1/a")
    slots = [store.slots.slot(store.record_key(k)) for k in keys]
    span = store.claim_span(keys)
    assert span >= 1 and len(set(slots[:span])) == 1 and (span == len(keys) or slots[span] != slots[0])
    claimed = []
    while keys:
        span = store.claim_span(keys)
        key, _ = store.claim_first(keys[:span], "n2/1/b", "n2", test_store.HOUR)
        claimed += [key] if key else []
        keys = keys[keys.index(key) + 1 :] if key else keys[span:]
    assert len(claimed) == 5 and all(store.record(k)["owner"] == "n2/1/b" for k in claimed)


def test_a_cycle_of_three_is_refused_to_its_last_writer_and_the_others_wait(store):
    """r -> x -> y, all running; y's submit of r closes the cycle: refused, naming it, with its
    edge and waiter withdrawn; r's and x's edges stay."""
    r, x, y = (test_store.new_key() for _ in range(3))
    for parent, child in ((r, x), (x, y)):
        owner = test_store.run_of(store, parent) if parent == r else store.record(parent)["owner"]
        box = test_store.waiter_mailbox(store, parent)
        store.submit([test_store.item(child, pool="q")], box, test_store.HOUR, requester=parent,
                     edge_ttl_ms=test_store.HOUR, requester_owner=owner)  # fmt: skip
        assert store.claim(child, f"n1/1/{child[:8]}", "n1", test_store.HOUR)[0] == "claimed"
    box = test_store.waiter_mailbox(store, y)
    (refused,) = store.submit([test_store.item(r, pool="q")], box, test_store.HOUR, requester=y,
                              edge_ttl_ms=test_store.HOUR, requester_owner=store.record(y)["owner"])  # fmt: skip
    assert (refused.verdict, refused.data) == ("cycle", f"{y} {r} {x} {y}")
    assert store.client.smembers(store.edges_key(y)) == set()
    assert box not in store.client.smembers(store.waiters_key(r))
    assert store.client.smembers(store.edges_key(r)) == {x} and store.client.smembers(store.edges_key(x)) == {y}
    assert store.client.hgetall(store.graph_key(x)) == {y: "r"} and store.client.hgetall(store.graph_key(y)) == {}


def test_one_sub_request_answered_queued_beside_its_edge_is_walked_if_it_runs_now(store, monkeypatch):
    """r's submit of one sub-request c sends r's edge beside it (waitsfor.send_edges), so the
    submit may read c queued before r's edge is written, and another executor claim c and write
    c -> r in between: c's state is read again once r's edge is written, and the cycle r -> c ->
    r is refused, as if r's edge had been written first."""
    r, c = test_store.new_key(), test_store.new_key()
    r_owner = test_store.run_of(store, r)
    test_store.submit(store, c, pool="q")  # queued and offered, by someone else
    real_call_many = store.slots.call_many

    def claimed_between(script, calls):  # c's submit has answered; c is claimed, and its run asks for r
        replies = real_call_many(script, calls)
        if script is store._scripts["submit"]:
            assert [reply[0] for reply in replies] == ["queued"]
            assert store.claim(c, "n2/1/c", "n2", test_store.HOUR)[0] == "claimed"
            waitsfor.write_edges(store.slots, store._scripts["edge"], store, c, [r], "n2/1/c", test_store.HOUR)
        return replies

    monkeypatch.setattr(store.slots, "call_many", claimed_between)
    box = test_store.waiter_mailbox(store, r)
    (refused,) = store.submit([test_store.item(c, pool="q")], box, test_store.HOUR, requester=r,
                              edge_ttl_ms=test_store.HOUR, requester_owner=r_owner)  # fmt: skip
    assert (refused.verdict, refused.data) == ("cycle", f"{r} {c} {r}")
    assert store.client.smembers(store.edges_key(r)) == set()
    assert box not in store.client.smembers(store.waiters_key(c))
    assert store.client.hgetall(store.graph_key(r)) == {}


def test_a_cancelled_runs_sub_request_sent_beside_its_edge_is_given_back(store):
    """A run cancelled meanwhile asks for one sub-request: edge.lua refuses, and what the submit
    beside it did is given back: the claim it made for the run's inline wait, its waiter; the
    run's edges and graph get nothing."""
    r = test_store.new_key()
    r_owner = test_store.run_of(store, r)
    assert test_store.cancel_of(store, r)[0] == "cancelled"
    c, box = test_store.new_key(), test_store.waiter_mailbox(store, r)
    (refused,) = store.submit([test_store.item(c, pool="q")], box, test_store.HOUR, requester=r,
                              edge_ttl_ms=test_store.HOUR, claimant=Claimant(c, f"n1/1/i>{r}", "n1", test_store.HOUR),
                              requester_owner=r_owner)  # fmt: skip
    assert refused.verdict == "cancelled"
    record = store.record(c)
    assert record["state"] == "queued" and "owner" not in record and record.get("offered_at", "0") == "0"
    assert box not in store.client.smembers(store.waiters_key(c))
    assert store.client.smembers(store.edges_key(r)) == set() and store.client.hgetall(store.graph_key(r)) == {}
    assert test_store.submit(store, c, pool="q")[0] == "offer"  # the next submit of it offers it at once


def test_an_unawaited_completion_wakes_its_waiters_with_the_next_submit_or_a_flush(store):
    """On a cluster a completion's reply names the mailboxes to wake: an unawaited one wakes them
    once the thread reads it, with its next submit (an inline run's next sub-request) or as it
    flushes (before it blocks, or takes its next message), not before."""
    for wake in ("submit", "flush"):
        key, box = test_store.new_key(), store.mailbox_key(uuid.uuid4().hex)
        owner = test_store.claimed(store, key)
        store.submit([test_store.item(key)], box, test_store.HOUR)
        store.complete_unawaited(key, owner, "7", test_store.HOUR)
        assert store.client.llen(box) == 0, "woken before the reply naming it was read"
        if wake == "submit":
            store.submit([test_store.item(test_store.new_key())], "", test_store.HOUR)
        else:
            store.flush()
        assert store.pop_mailbox(box, 1.0, 5) == [test_store.Outcome(key, "done", "7")], wake


def _held_sockets(store: StateStore) -> list:
    """The sockets this thread's links to the masters hold."""
    helds = (getattr(link._local, "held", None) for link in store.slots._links.values())
    return [held.connection._sock for held in helds if held is not None and held.connection is not None]


def _all_readable(sockets: list) -> bool:
    """Whether each of ``sockets`` can be read (here: its end of file has arrived)."""
    return len(select.select(sockets, [], [], 0)[0]) == len(sockets)


def test_an_unawaited_completion_sent_on_a_killed_connection_is_made_again_and_wakes(store, cluster):
    """Every connection of the store killed (CLIENT KILL on each master, by id, of those named
    ``STORE_CLIENT``: the shared worker's are left alone) before a completion is sent on the
    thread's link, and before its wake-up is sent on the mailbox's master's link, which holds
    an earlier send's unread reply: each is found closed as it is about to send, and the call
    goes the cluster client's way at once. The waiter is woken with no later call on the links:
    a solo worker's executor, waiting for its next message, makes none (a wake-up lost so slept
    until the waiter's periodic check, 5 s)."""
    for round_ in range(3):
        key, box = test_store.new_key(), store.mailbox_key(uuid.uuid4().hex)
        owner = test_store.claimed(store, key)
        store.submit([test_store.item(key)], box, test_store.HOUR)  # the links are connected
        store.slots.effects([("PEXPIRE", box, test_store.HOUR)])  # and the mailbox's has a reply unread
        killed = 0
        for server in cluster.servers:
            with server.client() as admin:
                for client in admin.client_list():
                    if client.get("name") == STORE_CLIENT:
                        killed += admin.client_kill_filter(_id=client["id"])
        assert killed, "no connection of the store was found to kill"
        wait_until(lambda: _all_readable(_held_sockets(store)), 5, "the kills to reach the links")
        store.complete_unawaited(key, owner, str(round_), test_store.HOUR)
        store.flush()
        assert store.record(key)["value"] == str(round_)
        assert store.pop_mailbox(box, 2.0, 5) == [test_store.Outcome(key, "done", str(round_))], round_


def _local_addresses(pid: int) -> set[str]:
    """The local ``host:port`` of each IPv4 TCP socket process ``pid`` holds (/proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    addresses = set()
    with open(f"/proc/{pid}/net/tcp") as table:
        for line in list(table)[1:]:
            fields = line.split()
            if fields[9] in inodes:
                ip, port = fields[1].split(":")
                addresses.add(f"{socket.inet_ntoa(bytes.fromhex(ip)[::-1])}:{int(port, 16)}")
    return addresses


def test_a_worker_whose_store_connections_the_servers_closed_answers_without_waiting_for_a_check(redis_server, cluster):
    """A solo worker's connections to every master closed by the servers (CLIENT KILL; an idle
    ``timeout`` alike) between requests: each of the next requests is answered at once, not after
    its waiter's periodic check (5 s here), three times over. A wake-up sent on a closed link used
    to be lost until the worker's next call there, which a worker waiting for its next message
    does not make."""
    g = Grid(redis_server, "redis", check=5)
    try:
        g.load_app()
        pid = g.start_workers(["closed"], "solo", 1)[0].proc.pid
        m = g.app_module
        base = test_core_e2e.num()
        for i in range(20):  # records on every master: the worker's links to each are connected
            assert m.add.call(base + i) == base + i
        for round_ in range(3):
            theirs = _local_addresses(pid)
            killed = 0
            for server in cluster.servers:
                with server.client() as admin:
                    for client in admin.client_list():
                        if client["addr"] in theirs:
                            killed += admin.client_kill_filter(_id=client["id"])
            assert killed, "none of the worker's connections to the masters was found"
            for i in range(6):
                x = base + 100 * (round_ + 1) + i
                started = time.monotonic()
                assert m.girder.request(m.add.s(x), timeout=10) == x
                took = time.monotonic() - started
                assert took < 2.0, f"round {round_}, call {i} took {took:.1f} s: a wake-up waited for the check"
    finally:
        _fast_stop(g)


def test_a_sub_request_answered_from_the_store_is_in_its_requesters_graph_as_such(store):
    """edge.lua puts each sub-request in the requester's graph as requested; one answered from the
    store is corrected to "c", as submit.lua writes it on a single Redis, and the edge goes."""
    r, done, fresh = (test_store.new_key() for _ in range(3))
    r_owner = test_store.run_of(store, r)
    test_store.claimed(store, done)
    assert store.complete(done, "n1/1/a", "3", test_store.HOUR)
    for key in (done, fresh):
        store.submit([test_store.item(key, pool="q")], "", test_store.HOUR, requester=r, edge_ttl_ms=test_store.HOUR,
                     requester_owner=r_owner)  # fmt: skip
    assert store.client.hgetall(store.graph_key(r)) == {done: "c", fresh: "r"}
    assert store.client.smembers(store.edges_key(r)) == {fresh}
    store.submit([test_store.item(done, pool="q")], "", test_store.HOUR, requester=r, edge_ttl_ms=test_store.HOUR,
                 recheck=True, requester_owner=r_owner)  # fmt: skip
    assert store.client.hgetall(store.graph_key(r))[done] == "c"  # a later submit changes nothing


# -- the suites, on the cluster ------------------------------------------------------------------

CORE = [
    "test_every_spelling_of_a_call_runs_once",
    "test_requests_answers_in_order_with_duplicates",
    "test_requests_return_exceptions_puts_errors_in_place",
    "test_delay_uses_the_key_as_task_id_and_the_result_backend_answers",
    "test_a_done_request_is_answered_without_any_message",
    "test_state_and_forget_through_a_request_lifecycle",
    "test_identical_requests_from_many_processes_run_once",
    "test_duplicate_delivery_of_a_running_request_never_runs_it_twice",
    "test_celery_autoretry_runs_the_request_again",
]


@pytest.mark.parametrize("name", CORE)
def test_core(live, name):
    getattr(test_core_e2e, name)(live)


@pytest.mark.parametrize("pool", ["prefork", "solo"])
def test_core_a_killed_workers_request_is_reoffered_and_completed_elsewhere(make_grid, pool):
    test_core_e2e.test_a_killed_workers_request_is_reoffered_and_completed_elsewhere(make_grid, (pool, POOLS[pool]))


@pytest.mark.parametrize("pool", ["prefork", "solo", "threads"])
def test_reentrant_fan_out(grid, pool):
    test_reentrant.test_fan_out_of_50_children_with_3_grandchildren_each_runs_every_request_once(grid, pool)


@pytest.mark.parametrize("pool", ["prefork", "solo"])
def test_reentrant_the_clojure_deadlock(grid, pool, bg, gate):
    test_reentrant.test_the_clojure_deadlock_completes_on_one_executor(grid, pool, bg, gate)


def test_reentrant_error_chains(grid):
    test_reentrant.test_ratio_errors_carry_the_chain_through_sub_requests(grid, "solo")


def test_reentrant_a_request_requesting_itself_fails_fast(grid):
    test_reentrant.test_a_request_requesting_itself_fails_fast_naming_the_cycle(grid, "prefork")


@pytest.mark.parametrize("pool", ["prefork", "solo"])
def test_reentrant_a_cycle_across_two_nodes_fails_fast(grid, pool, bg, gate):
    test_reentrant.test_a_cycle_across_two_nodes_fails_fast_naming_the_cycle(grid, pool, bg, gate)


def test_reentrant_a_chain_of_2000_nested_sub_requests(grid):
    test_reentrant.test_a_chain_of_2000_nested_sub_requests_completes(grid, "solo")


def test_reentrant_two_parents_share_one_run_of_a_child(grid, bg, gate):
    test_reentrant.test_two_parents_requesting_the_same_child_at_once_share_one_run(grid, bg, gate)


def test_reentrant_the_seeds_bogosity_workload(grid):
    test_reentrant.test_the_seeds_bogosity_workload_on_two_nodes(grid)


def test_tiers_an_overburdened_node_gets_help(grid):
    test_tiers.test_an_overburdened_node_gets_help_from_an_idle_one(grid)


def test_tiers_nested_pools(tiers):
    test_tiers.test_nested_pools_a_fan_out_in_a_gets_help_from_b(tiers)


def test_tiers_no_starvation_with_two_pools(tiers):
    test_tiers.test_no_starvation_with_two_pools_the_reentrant_workloads_complete(tiers)


def test_cancel_a_tree(grid, bg):
    grid.worker("p1", "prefork", 2)
    grid.pools, grid.pool = (None, None), "prefork"
    test_cancel.test_a_cancelled_tree_stops_its_runs_keeps_a_shared_child_and_runs_afresh(grid, bg)


gate = test_reentrant.gate
tiers = test_tiers.tiers


def test_a_sub_requests_other_waiter_is_woken_while_its_requester_computes_on(live):
    """p runs c inline, then computes on (holds on a gate); a client that waits for c meanwhile
    gets c's answer as it completes: the completion's reply, which names the client's mailbox,
    is read before p's wait hands control back to p's code, not at p's next call or end, nor at
    the client's next check (5 s here)."""
    m, tag = live.app_module, uuid.uuid4().hex[:8]
    key, store = m.gated.key(tag), m.girder.store
    parent = m.reentrant_tasks.then_hold.delay(tag)
    wait_until(lambda: store.record(key).get("state") == "running", 15, "p to run c")
    answers: list = []
    client = threading.Thread(target=lambda: answers.append(m.gated.call(tag)), daemon=True)
    client.start()
    wait_until(lambda: store.client.scard(store.waiters_key(key)) >= 1, 10, "the client to wait for c")
    open_gate(live, tag)
    started = time.monotonic()
    client.join(10)
    waited = time.monotonic() - started
    open_gate(live, f"{tag}:hold")
    assert answers == [tag] and waited < 2.5, (answers, waited)
    assert parent.get(timeout=15) == tag


def test_graph_and_reports_on_the_cluster(live):
    """The reports read every master: a request's graph, its progress, stats, active, forget_task."""
    m, t = live.app_module, uuid.uuid4().hex[:8]
    assert m.reentrant_tasks.fanout.call(4, 0, t) == 4
    girder = m.girder
    key = m.reentrant_tasks.fanout.key(4, 0, t)
    graph = girder.graph(key)
    assert len(graph["nodes"]) == 5 and len(graph["edges"]) == 4
    assert girder.progress(key)["done"] == 5
    executions = lambda: girder.stats()["tasks"].get("grid.leaf", {}).get("executions", 0)  # noqa: E731
    wait_until(lambda: executions() >= 4, 5, "the runs to be counted (within COUNT_EVERY)")
    stats = girder.stats()
    assert stats["records"] >= 5
    assert stats["memory_bytes"] > 3 * 500_000  # every master's
    assert girder.active() == []
    assert m.reentrant_tasks.fanout.call(4, 0, t) == 4  # a cache hit, counted within COUNT_EVERY
    wait_until(lambda: girder.stats()["tasks"]["grid.fanout"]["cache_hits"] >= 1, 5, "the hit to be counted")
    girder.reset_stats()
    assert girder.stats()["tasks"] == {}


# -- who may talk to the cluster -----------------------------------------------------------------

PASSWORD = "girder-secret"


class ClusterAccess:
    """The cluster's masters as ``test_access.exercise`` reads them: an admin client, and the
    denials of every master's ACL log."""

    def __init__(self, cluster: ClusterGroup) -> None:
        self.cluster = cluster
        self.admin = cluster.client()

    def grant(self, prefix: str) -> None:
        """User ``girder`` with exactly the README's cluster ACL on ``prefix``, on every master."""
        for server in self.cluster.servers:
            with server.client() as client:
                rules = acl_rules(prefix, PASSWORD, server.version())
                client.execute_command("ACL", "SETUSER", "girder", *rules, *CLUSTER_RULES)
                client.acl_log_reset()

    def denials(self) -> list[dict]:
        found = []
        for server in self.cluster.servers:
            with server.client() as client:
                found += client.acl_log()
        return found


def test_girder_runs_end_to_end_as_a_user_with_only_the_documented_cluster_acl(cluster, redis_server, grids):
    """A worker and a client whose cluster URL names a user with exactly the README's ACL for a
    cluster, on every master, serve every flow of the access suite, and no master refuses any of
    their commands."""
    access = ClusterAccess(cluster)
    url = cluster.url().replace("redis+cluster://", f"redis+cluster://girder:{PASSWORD}@")
    g = Grid(redis_server, "redis", lease=1.5, check=0.5, store_url=url)
    access.grant(g.key_prefix)
    g.load_app()
    grids.append(g)
    g.worker("acl", "prefork", 2)
    test_access.exercise(g, access)
    test_access.assert_nothing_refused(g, access)


def test_the_readme_lists_the_cluster_acl_the_test_grants():
    assert acl_setuser_line(cluster=True) in (test_access.ROOT / "README.md").read_text()


def test_a_worker_checks_the_eviction_policy_of_every_master(cluster, caplog):
    """A master that may evict girder's keys is warned of, by name, among masters that do not."""
    from girder_celery.worker import check_eviction

    evicting = cluster.servers[1]
    with evicting.client() as client:
        client.config_set("maxmemory-policy", "allkeys-lru")
    try:
        with caplog.at_level("WARNING", logger="girder_celery.worker"):
            check_eviction(cluster.client(), cluster.url())
    finally:
        with evicting.client() as client:
            client.config_set("maxmemory-policy", "noeviction")
    warned = [r.getMessage() for r in caplog.records if "maxmemory-policy allkeys-lru" in r.getMessage()]
    assert len(warned) == 1 and f"127.0.0.1:{evicting.port}" in warned[0], warned


# -- nothing crossed a slot ----------------------------------------------------------------------


def test_no_master_raised_crossslot_nor_any_script_error(cluster):
    """After everything above (run last of the suites in this module): no master answered
    CROSSSLOT, every script call that failed was a NOSCRIPT (a script's first call on a master,
    before it is loaded there: a script touching a key of another slot fails its call), and no
    other command failed or was refused but those the tests cause on purpose; and no master was asked
    for a command's keys (COMMAND GETKEYS), which redis-py's cluster client does for a BLMPOP it routes."""
    for server in cluster.servers:
        with server.client() as client:
            errors, commands = client.info("errorstats"), client.info("commandstats")
        assert "errorstat_CROSSSLOT" not in errors, errors
        evalsha = commands["cmdstat_evalsha"]
        noscript = errors.get("errorstat_NOSCRIPT", {"count": 0})["count"]  # none, where a link loaded them first
        assert evalsha["failed_calls"] + evalsha["rejected_calls"] == noscript, evalsha
        failing = {name for name, stat in commands.items() if stat.get("failed_calls") or stat.get("rejected_calls")}
        # CLIENT SETINFO: redis-py's; CONFIG GET: refused to the ACL user; HMGET: of a corrupt record,
        # caught by the script (pcall) in the script suite's tests of corrupt records.
        expected = {"cmdstat_evalsha", "cmdstat_client|setinfo", "cmdstat_config|get", "cmdstat_hmget"}
        expected.add("cmdstat_client")  # CLIENT SETINFO, before Redis 7
        assert failing <= expected, {n: commands[n] for n in failing}
        # No command girder sends makes redis-py's cluster client ask for its keys (a round trip more).
        assert "cmdstat_command|getkeys" not in commands, commands["cmdstat_command|getkeys"]


# -- bad configuration ---------------------------------------------------------------------------


def client_girder(url: str) -> Girder:
    app = Celery(f"cluster-client-{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
    app.conf.update(girder_url=url, girder_connect_timeout=2.0)
    return Girder(app)


def one() -> int:
    return 1


@pytest.fixture(scope="module")
def plain_redis():
    server = RedisServer().start()
    yield server
    server.close()


BAD = {
    "a cluster URL naming a server that is not a cluster node": (
        lambda plain: f"redis+cluster://127.0.0.1:{plain.port}",
        ["is not a cluster node", "a single Redis takes a redis:// URL"],
    ),
    "seeds none of which can be reached": (
        lambda plain: f"redis+cluster://127.0.0.1:{free_port()},127.0.0.1:{free_port()}",
        ["cannot be reached", "Connection refused"],
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_configuration_is_a_clear_error_at_call_time(plain_redis, case):
    url, says = BAD[case][0](plain_redis), BAD[case][1]
    girder = client_girder(url)
    started = time.monotonic()
    with pytest.raises(GirderConnectionError) as info:
        girder.request(girder.task(name="cluster.one")(one).s(), timeout=10)
    assert time.monotonic() - started < 10
    assert all(s in str(info.value) for s in says), str(info.value)


@pytest.mark.parametrize("case", list(BAD))
def test_bad_configuration_fails_a_worker_at_start(plain_redis, redis_server, case):
    url, says = BAD[case][0](plain_redis), BAD[case][1]
    g = Grid(redis_server, "redis", store_url=url)
    try:
        with pytest.raises(RuntimeError, match="exited"):
            g.start_workers(["bad"], "solo", 1, timeout=30)
        log = g.workers[0].output()
        assert all(s in log for s in says), log
    finally:
        g.close()


@pytest.mark.parametrize(
    "url, says",
    [
        ("redis+cluster://", "is not host:port"),
        ("redis+cluster://h1:1,h2", "'h2' is not host:port"),
        ("redis+cluster://h1:1/3", "database 0 only"),
        ("redis+cluster://h1:1?ssl_ca_certs=x", "unknown parameter 'ssl_ca_certs'"),
        ("rediss+cluster://h1:1?nope=1", "unknown parameter 'nope'"),
        ("redis+clusters://h1:1", "must be a redis://"),
    ],
)
def test_settings_refuse_a_bad_cluster_url(url, says):
    with pytest.raises(ValueError) as info:
        client_girder(url).settings  # noqa: B018 - read to validate
    assert says in str(info.value), str(info.value)


def test_settings_read_the_seeds_and_their_credentials():
    from girder_celery.settings import cluster_url

    url = "rediss+cluster://girder:p%40ss@h1:7000,h2:7001/0?ssl_ca_certs=%2Fca.crt&ssl_check_hostname=false"
    assert cluster_url(url) == (
        [("h1", 7000), ("h2", 7001)],
        {"username": "girder", "password": "p@ss", "ssl": True, "ssl_ca_certs": "/ca.crt", "ssl_check_hostname": False},
    )
    assert client_girder(url).settings.cluster
