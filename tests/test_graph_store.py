"""What the scripts record for the reports (issue 14), called directly on the private redis-server:
graph edges (``r``/``c``), the ``subs`` count and ``parent``, the graph's TTL and its reset,
per-task stats, and the reads of ``graph.py`` and ``records.py`` over them. No workers: the
transitions are made here, as an executor makes them.
"""

from __future__ import annotations

import uuid

import pytest

from girder_celery.errors import GirderNoGraph
from girder_celery.graph import progress_of, read_graph
from girder_celery.keys import encode_payload, request_key
from girder_celery.records import active, forget_task, reset_stats, stats
from girder_celery.store import Claimant, StateStore
from tests.harness import wait_until

HOUR = 3_600_000


@pytest.fixture
def store(redis_server):
    s = StateStore(redis_server.client(), prefix=f"gs-{uuid.uuid4().hex[:8]}", graph_ttl_ms=HOUR)
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
