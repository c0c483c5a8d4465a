"""Cancelling a request tree, Celery's revoke of a girder key, and what girder refuses (issue 13, items 1-2).

Real workers on both brokers (``tests.harness``): a test holds the tree's requests at Redis gates
(``tests/cancel_tasks.py``), cancels while they are queued or running, then opens every gate and
reads from the runs' marks what ran, what stopped and what never started.
"""

from __future__ import annotations

import datetime
import time
import uuid
from concurrent.futures import Future

import pytest

from girder_celery import GirderCancelled, GirderError
from tests.harness import wait_until
from tests.test_cli import celery

#: Seconds within which a cancelled request's waiter must hear of it.
HEARD_WITHIN = 2.5


def tag() -> str:
    return uuid.uuid4().hex[:8]


def open_gate(grid, t: str, name: str, times: int = 1) -> None:
    grid.redis_server.client().rpush(grid.app_module.cancel_tasks.gate(t, name), *["open"] * times)


def state_of(grid, sig) -> str:
    return grid.app_module.girder.state(sig)["state"]


def value_of(future: Future, timeout: float = 60):
    ok, value, _ = future.result(timeout)
    if not ok:
        raise value
    return value


def cancelled_in_time(future: Future, since: float) -> GirderCancelled:
    ok, error, finished = future.result(30)
    assert not ok and isinstance(error, GirderCancelled), error
    assert finished - since < HEARD_WITHIN
    return error


def serves(grid, pool: str | None = None) -> None:
    """The node (of ``pool``) runs a fresh request: it survived, and is free again."""
    m, t = grid.app_module, tag()
    assert m.girder.request(m.add.s(t, "!"), pool=pool, timeout=30) == t + "!"


@pytest.fixture(params=["prefork", "solo"])
def tree_grid(request, grid):
    """Where the sibling and the tree's root run: one prefork node of 2 executors, or two solo nodes
    (the sibling on the first, the root on the second, through their node queues)."""
    if request.param == "prefork":
        grid.worker("p1", "prefork", 2)
        grid.pools = (None, None)
    else:
        grid.start_workers(["s1", "s2"], "solo", 1)
        grid.pools = tuple(grid.app_module.girder.node_queue(grid.hostname(n)) for n in ("s1", "s2"))
    grid.pool = request.param
    return grid


def test_a_cancelled_tree_stops_its_runs_keeps_a_shared_child_and_runs_afresh(tree_grid, bg):
    """root requests shared (which sibling runs inline), queued and running (run inline by root):
    cancelling root cancels root, queued and running, not shared; root's waiter hears at once; queued
    never runs; running stops (terminated on prefork, at its next girder call on solo); sibling gets
    shared's value; the same root requested again runs in full at once."""
    g, m, t = tree_grid, tree_grid.app_module, tag()
    ct, (sibling_pool, root_pool) = m.cancel_tasks, tree_grid.pools
    shared, queued, running = ct.leaf.s(t, "shared"), ct.leaf.s(t, "queued"), ct.step.s(t, "running")
    sibling = bg(m.girder.request, ct.sibling.s(t), timeout=60, pool=sibling_pool)
    wait_until(lambda: state_of(g, shared) == "running", 15, "sibling to run shared")
    root = bg(m.girder.request, ct.root.s(t), timeout=60, pool=root_pool)
    wait_until(lambda: ct.marks("running", t, "start") == 1, 15, "root to run its step inline")
    assert state_of(g, running) == "running"
    assert state_of(g, queued) == "queued"

    since = time.monotonic()
    cancelled = m.girder.cancel(ct.root.s(t))
    assert cancelled[0] == ct.root.key(t)
    assert sorted(cancelled[1:]) == sorted([queued_key := ct.leaf.key(t, "queued"), ct.step.key(t, "running")])
    error = cancelled_in_time(root, since)
    assert (error.key, error.exc_type) == (ct.root.key(t), "girder_celery.GirderCancelled")
    assert [state_of(g, s) for s in (ct.root.s(t), queued, running, shared)] == ["failed"] * 3 + ["running"]
    if g.pool == "prefork":  # its message's job is terminated, inline step and all
        wait_until(lambda: "terminated the cancelled run" in g.workers[0].output(), 10, "root's job to end")

    open_gate(g, t, "running")
    open_gate(g, t, "shared")
    assert value_of(sibling) == "shared"
    serves(g, root_pool)  # on solo: the root's node, free once its step stopped
    serves(g, sibling_pool)  # the queued leaf's offers, if taken, were skipped
    assert ct.marks("running", t, "after") == 0 and ct.marks("running", t, "end") == 0
    assert ct.marks("queued", t, "start") == 0
    assert m.girder.state(queued_key)["attempts"] == 0

    open_gate(g, t, "queued")
    open_gate(g, t, "running")
    start = time.monotonic()
    assert m.girder.request(ct.root.s(t), timeout=30, pool=root_pool) == ["shared", "queued", "running"]
    assert time.monotonic() - start < 10
    assert [ct.marks(n, t, "start") for n in ("root", "shared", "queued", "running")] == [2, 1, 1, 2]
    assert ct.marks("running", t, "after") == 1 and ct.marks("shared", t, "end") == 1


def nodes(grid) -> list[str]:
    """The grid's own workers (RabbitMQ's control exchange is shared with every other grid's)."""
    return [w.hostname for w in grid.workers]


def revoked_ids(grid) -> list[str]:
    replies = grid.app_module.app.control.inspect(destination=nodes(grid), timeout=5).revoked() or {}
    assert sorted(replies) == sorted(nodes(grid))
    return [i for ids in replies.values() for i in ids]


REVOKES = {
    "AsyncResult.revoke": lambda m, key: m.app.AsyncResult(key).revoke(),
    "control.revoke (Flower's button)": lambda m, key: m.app.control.revoke(key, terminate=True, signal="SIGTERM"),
}


@pytest.mark.parametrize("how", list(REVOKES))
def test_a_revoke_of_a_running_request_cancels_it_and_never_blocks_its_key(live, bg, how):
    """AsyncResult(key).revoke() and app.control.revoke(key, terminate=True) cancel a running request
    and its inline child; the key is in no worker's revoked set, and the same request runs afresh."""
    m, ct, t = live.app_module, live.app_module.cancel_tasks, tag()
    key = ct.parent.key(t)
    waiter = bg(m.girder.request, ct.parent.s(t), timeout=60)
    wait_until(lambda: state_of(live, ct.leaf.s(t, "child")) == "running", 15, "the child to run inline")
    since = time.monotonic()
    REVOKES[how](m, key)
    cancelled_in_time(waiter, since)
    assert state_of(live, ct.leaf.s(t, "child")) == "failed"
    open_gate(live, t, "child", 2)
    serves(live)
    assert key not in revoked_ids(live)
    assert m.girder.request(ct.parent.s(t), timeout=30) == "child"
    assert ct.marks("parent", t, "start") == 2


def test_a_revoke_broadcast_by_a_process_without_girder_cancels_in_the_worker(live, bg):
    """Celery's revoke command as any other client sends it (a raw broadcast): the worker cancels the
    request (here queued on a queue nobody consumes) instead of adding its key to its revoked set."""
    m, t = live.app_module, tag()
    nobody = f"nobody-{t}"
    waiter = bg(m.girder.request, m.add.s(t, "?"), timeout=60, pool=nobody)
    wait_until(lambda: state_of(live, m.add.s(t, "?")) == "queued", 10, "the request to be queued")
    since = time.monotonic()
    m.app.control.broadcast("revoke", arguments={"task_id": m.add.key(t, "?")}, destination=nodes(live))
    cancelled_in_time(waiter, since)
    assert m.add.key(t, "?") not in revoked_ids(live)
    assert m.girder.request(m.add.s(t, "?"), timeout=30) == t + "?"  # on the grid's own pool now


def test_expires_countdown_and_eta_are_refused_at_call_time(live):
    """A girder request is shared by every caller: none of them may expire or delay it."""
    m, t = live.app_module, tag()
    soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=5)
    for options in ({"expires": 10}, {"countdown": 1}, {"eta": soon}):
        (name,) = options
        with pytest.raises(ValueError, match=f"takes no {name}="):
            m.add.apply_async((t, "!"), **options)
        with pytest.raises(ValueError, match=f"takes no {name}="):
            m.add.s(t, "!").set(**options).delay()
    with pytest.raises(TypeError, match="takes no expires="):
        m.girder.task(name=f"grid.expiring-{t}", expires=5)(lambda: None)
    assert state_of(live, m.add.s(t, "!")) == "absent"


def test_cancel_of_what_is_not_in_flight_cancels_nothing(live):
    m, t = live.app_module, tag()
    assert m.girder.request(m.add.s(t, "="), timeout=30) == t + "="
    assert m.girder.cancel(m.add.s(t, "=")) == []
    assert m.girder.cancel(m.add.key(t, "never")) == []
    with pytest.raises(ValueError):
        m.girder.cancel("not-a-key")
    assert isinstance(GirderCancelled("x"), GirderError)


def test_the_cancel_command_exits_0_when_it_cancelled_and_2_for_a_bad_or_unknown_key(live, bg):
    m, ct, t = live.app_module, live.app_module.cancel_tasks, tag()
    key = ct.parent.key(t)
    waiter = bg(m.girder.request, ct.parent.s(t), timeout=60)
    wait_until(lambda: state_of(live, ct.leaf.s(t, "child")) == "running", 15, "the child to run")
    since = time.monotonic()
    out = celery(live.env, "cancel", key)
    assert out.returncode == 0, out.stderr
    assert key in out.stdout and ct.leaf.key(t, "child") in out.stdout
    ok, error, finished = waiter.result(30)
    assert isinstance(error, GirderCancelled) and finished - since < 10  # the command's start-up included
    open_gate(live, t, "child", 2)

    again = celery(live.env, "cancel", key)  # settled (cancelled) now: nothing to cancel
    assert again.returncode == 1 and "nothing to cancel" in again.stderr
    unknown = m.add.key(t, "unknown")
    out = celery(live.env, "cancel", unknown)
    assert out.returncode == 2 and unknown in out.stderr
    out = celery(live.env, "cancel", "zz" + key[2:])
    assert out.returncode == 2 and "zz" + key[2:] in out.stderr
    serves(live)
