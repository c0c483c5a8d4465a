"""Wide fan-outs cost O(N) in all (issue 12): a waiter's claim scans and its periodic checks are
bounded per sub-request, on a real worker and a private Redis.

Speed itself is measured by the ``fanout-wide`` benchmark; these tests pin the structure that
makes it linear, from what Redis saw: no claim scan names more than ``CLAIM_BATCH`` requests (it
once named every queued sibling, for each child run), and the checks made while children settle
submit a bounded number of requests per child (they once submitted every pending one, each
``girder_check_interval``).
"""

from __future__ import annotations

import hashlib

import pytest

from girder_celery.inline import CLAIM_BATCH
from girder_celery.store import _load
from girder_celery.testing import RedisServer
from tests.conftest import _fast_stop
from tests.core_support import tag
from tests.harness import Grid

N = 3000


def sha(script: str) -> str:
    return hashlib.sha1(_load(script).encode()).hexdigest()


@pytest.fixture(scope="module")
def wide():
    """A solo worker and this process checking every 0.2 s, on a Redis of its own (its command
    log is the test's)."""
    server = RedisServer().start()
    g = Grid(server, "redis", check=0.2)
    g.load_app()
    g.node = g.worker("wide", "solo", 1)
    yield g
    _fast_stop(g)
    server.close()


def script_calls(client, script: str) -> list[int]:
    """The number of keys of each call of ``script`` in Redis's slow log (every command is logged)."""
    digest = sha(script)
    return [
        int(e["command"].split()[2])
        for e in client.slowlog_get(1_000_000)
        if e["command"].startswith(b"EVALSHA " + digest.encode())
    ]


def logged(g, call) -> tuple[list[int], list[int]]:
    """Run ``call`` with every command logged: the key counts of its claim and submit calls."""
    client = g.redis_server.client()
    client.config_set("slowlog-max-len", 1_000_000)
    client.config_set("slowlog-log-slower-than", 0)
    client.slowlog_reset()
    try:
        call()
        return script_calls(client, "claim"), script_calls(client, "submit")
    finally:
        client.config_set("slowlog-log-slower-than", 10_000)
        client.slowlog_reset()


@pytest.mark.invariant2
def test_a_wide_fan_out_run_inline_makes_bounded_claim_scans(wide):
    """A parent of N children run inline: every claim scan names at most CLAIM_BATCH keys (it
    once named every queued sibling, per child), and submits number O(N)."""
    m, t = wide.app_module, tag()
    claims, submits = logged(wide, lambda: m.reentrant_tasks.fanout.call(N, 0, t) == N or pytest.fail("value"))
    assert claims and max(claims) <= CLAIM_BATCH, f"a claim scan named {max(claims)} keys"
    assert len(submits) <= 5 * N, f"{len(submits)} submits for {N} children"


@pytest.mark.invariant4
def test_a_caller_waiting_for_many_requests_checks_a_bounded_number_per_request(wide):
    """A caller waiting for N requests the worker runs one by one: its checks (every 0.2 s) submit
    about two per request in all while they settle, not every pending one per check."""
    m, t = wide.app_module, tag()
    leaves = [m.reentrant_tasks.leaf.s(f"{t}.{i}") for i in range(N)]
    claims, submits = logged(wide, lambda: m.girder.requests(leaves) == [1] * N or pytest.fail("values"))
    assert len(claims) >= N  # one per offer the worker took: the checks ran meanwhile
    assert len(submits) <= 5 * N, f"{len(submits)} submits for {N} requests"


@pytest.mark.invariant1
def test_nothing_but_the_memoized_records_is_left_after_a_fan_out(wide):
    """Once a fan-out and its waiter are done, the store holds one record per request (the parent
    and each child), graphs kept for girder_graph_ttl and the stats, and nothing else: no waiter
    sets, edges, offers or mailboxes."""
    m, t = wide.app_module, tag()
    n = 500
    assert m.reentrant_tasks.fanout.call(n, 0, t) == n
    store = m.girder.store
    client = wide.redis_server.client()
    left = [k for k in client.scan_iter(match=f"{store.prefix}:*", count=1000) if ":test:" not in k]
    records = [k for k in left if k.startswith(store.record_prefix)]
    graphs = [k for k in left if k.startswith(store.graph_prefix)]
    assert sorted(set(left) - set(records) - set(graphs)) == [store.stats_key]
    assert all(0 < client.pttl(k) <= store.graph_ttl_ms for k in graphs)  # each expires
    assert client.hlen(store.graph_key(m.reentrant_tasks.fanout.key(n, 0, t))) == n
    keys = {m.reentrant_tasks.fanout.key(n, 0, t), *(m.reentrant_tasks.leaf.key(f"{t}.{i}") for i in range(n))}
    assert {store.record_key(k) for k in keys} <= set(records)
