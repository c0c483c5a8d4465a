"""Celery's canvas with girder tasks (issue 10, item 1), on real workers and both brokers.

A canvas step's id is an alias of its request's key: the request runs once, under its key, and
the alias's message is answered with its outcome, so chains, groups, chords, ``map``,
``starmap``, ``chunks`` and callbacks work, and every step is memoized and deduplicated like
``task.call`` (invariant 1, extended to aliases). Callbacks fire for every call: on a cold
request, on one joined in flight and on one already done.
"""

from __future__ import annotations

import json
import uuid

import pytest
from celery import chain, chord, group

from tests.conftest import _check_broker, _fast_stop
from tests.core_support import open_gate, runs, tag, wait_state
from tests.harness import Grid, wait_until

GET = 20


@pytest.fixture(scope="module", params=["redis", "amqp"])
def cgrid(request, redis_server):
    """One prefork worker of two executors (one may wait while the other runs)."""
    _check_broker(request.param)
    g = Grid(redis_server, request.param)
    g.load_app()
    g.node = g.worker("canvas", "prefork", 2)
    yield g
    _fast_stop(g)


@pytest.fixture
def cg(cgrid):
    if cgrid.node.proc.poll() is not None:
        pytest.fail(f"the worker died:\n{cgrid.node.output()[-5000:]}")
    cgrid.load_app()
    return cgrid


def num() -> int:
    return uuid.uuid4().int % 10**9


def recorded(g, t: str, n: int) -> list:
    """The ``n`` calls of ``grid.record`` for tag ``t``, waiting for them (and no more after)."""
    client = g.redis_server.client()
    name = g.app_module.canvas_tasks.record_key(t)
    wait_until(lambda: client.llen(name) >= n, GET, f"{n} callback(s) for {t}")
    return [json.loads(v) for v in client.lrange(name, 0, -1)]


@pytest.mark.invariant1
def test_chain_steps_are_memoized_requests(cg):
    """Each step of a chain is a request: its value is call()'s, and a second identical chain
    runs nothing again."""
    m, x = cg.app_module, num()
    for _ in range(2):
        result = chain(m.add.s(x, 1), m.add.s(2), m.add.s(3)).delay()
        assert result.get(timeout=GET) == x + 6
        assert result.parent.get(timeout=GET) == x + 3
        assert result.id != m.add.key(x + 3, 3)  # the canvas's own id: an alias
    for args in [(x, 1), (x + 1, 2), (x + 3, 3)]:
        assert m.add.call(*args) == sum(args)
        assert runs(cg, "grid.add", m.add.key(*args)) == 1
    assert m.app.AsyncResult(m.add.key(x + 3, 3)).get(timeout=GET) == x + 6


@pytest.mark.invariant1
def test_group_runs_each_distinct_request_once(cg):
    """A group with repeated steps runs each distinct request once; each alias has its value."""
    m, x = cg.app_module, num()
    steps = [m.add.s(x, i % 3) for i in range(6)]
    result = group(steps).delay()
    assert result.get(timeout=GET) == [x + i % 3 for i in range(6)]
    assert len({r.id for r in result.results}) == 6
    for i in range(3):
        assert runs(cg, "grid.add", m.add.key(x, i)) == 1
    assert group(steps)().get(timeout=GET) == [x + i % 3 for i in range(6)]  # memoized
    assert sum(runs(cg, "grid.add", m.add.key(x, i)) for i in range(3)) == 3


@pytest.mark.invariant1
def test_chord_counts_its_header_and_runs_its_body(cg):
    """A chord's header of girder requests (some identical) reaches its body once all are in."""
    m, x = cg.app_module, num()
    c = m.canvas_tasks
    header = [m.add.s(x, i % 2) for i in range(4)]
    assert chord(header)(c.total.s()).get(timeout=GET) == 4 * x + 2
    assert runs(cg, "grid.total", c.total.key([x, x + 1, x, x + 1])) == 1
    assert chord(header)(c.total.s()).get(timeout=GET) == 4 * x + 2  # all memoized
    assert runs(cg, "grid.total", c.total.key([x, x + 1, x, x + 1])) == 1
    assert runs(cg, "grid.add", m.add.key(x, 0)) == runs(cg, "grid.add", m.add.key(x, 1)) == 1


@pytest.mark.invariant1
def test_map_starmap_and_chunks_make_each_item_a_request(cg):
    """Celery's map, starmap and chunks call the task per item: each item is a memoized request."""
    m, x = cg.app_module, num()
    c = m.canvas_tasks
    assert c.square.map([x, x + 1, x]).delay().get(timeout=GET) == [x * x, (x + 1) ** 2, x * x]
    assert runs(cg, "grid.square", c.square.key(x)) == 1
    assert c.square.call(x + 1) == (x + 1) ** 2  # memoized by the map
    assert runs(cg, "grid.square", c.square.key(x + 1)) == 1
    assert m.add.starmap([(x, 5), (x, 6)]).delay().get(timeout=GET) == [x + 5, x + 6]
    pairs = [(x, i) for i in range(7)]
    chunked = [[x + i for i in range(j, min(j + 3, 7))] for j in (0, 3, 6)]
    assert m.add.chunks(pairs, 3).delay().get(timeout=GET) == chunked
    assert runs(cg, "grid.add", m.add.key(x, 5)) == 1  # starmap's run, reused by chunks


@pytest.mark.invariant1
def test_link_fires_on_a_cold_a_done_and_an_in_flight_request(cg):
    """``link`` fires with the value for every call: cold, done (nothing runs) and joined in flight."""
    m, t = cg.app_module, tag()
    c = m.canvas_tasks
    x = num()
    assert m.add.apply_async((x, 1), link=c.record.s(t)).get(timeout=GET) == x + 1  # cold
    assert recorded(cg, t, 1) == [x + 1]
    assert m.add.apply_async((x, 1), link=c.record.s(t)).get(timeout=GET) == x + 1  # done
    assert recorded(cg, t, 2) == [x + 1, x + 1]
    assert runs(cg, "grid.add", m.add.key(x, 1)) == 1
    g = tag()
    gkey = m.gated.key(g)
    first = m.gated.delay(g)
    wait_state(cg, gkey, "running")
    joined = m.gated.apply_async((g,), link=c.record.s(t))  # in flight
    open_gate(cg, g)
    assert joined.get(timeout=GET) == first.get(timeout=GET) == g
    assert recorded(cg, t, 3)[2] == g
    assert runs(cg, "grid.gated", gkey) == 1


@pytest.mark.invariant1
def test_link_error_fires_on_a_cold_and_a_memoized_failure(cg):
    """``link_error`` fires for every call of a failing request, the failure memoized or not."""
    m, t, x = cg.app_module, tag(), num()
    c = m.canvas_tasks
    for _ in range(2):  # cold, then memoized (cache_errors): the errback gets the key as task id
        with pytest.raises(Exception, match=f"bad {x}"):
            m.memo_fail.apply_async((x,), link_error=c.record.s(t)).get(timeout=GET)
    assert recorded(cg, t, 2) == [m.memo_fail.key(x)] * 2
    assert runs(cg, "grid.flaky", m.memo_fail.key(x)) == 1
    e = tag()
    with pytest.raises(Exception, match=f"gate {e} failed"):
        c_result = chain(m.gated.s(e, "raise"), m.add.s(1)).apply_async(link_error=c.record.s(t))
        open_gate(cg, e)
        c_result.get(timeout=GET)
    assert len(recorded(cg, t, 3)) == 3


@pytest.mark.invariant1
def test_a_canvas_step_in_flight_joins_the_run(cg):
    """A group step whose request is running on the other executor is answered when it ends,
    with no second run."""
    m, g = cg.app_module, tag()
    key = m.gated.key(g)
    first = m.gated.delay(g)
    wait_state(cg, key, "running")
    result = group(m.gated.s(g), m.gated.s(g)).delay()
    open_gate(cg, g)
    assert result.get(timeout=GET) == [g, g]
    assert first.get(timeout=GET) == g
    assert runs(cg, "grid.gated", key) == 1


@pytest.mark.invariant1
def test_a_canvas_of_girder_and_plain_tasks(cg):
    """Plain Celery steps and girder steps mix in one chain and one group."""
    m, x = cg.app_module, num()
    assert chain(m.plain_add.s(x, 1), m.add.s(2), m.plain_add.s(3)).delay().get(timeout=GET) == x + 6
    assert runs(cg, "grid.add", m.add.key(x + 1, 2)) == 1
    assert group(m.plain_add.s(x, 1), m.add.s(x, 1)).delay().get(timeout=GET) == [x + 1, x + 1]


def test_a_task_id_that_is_another_requests_key_is_refused(cg):
    """A task_id shaped like a key must be the request's own key: else ValueError, nothing sent."""
    m, x = cg.app_module, num()
    with pytest.raises(ValueError, match="is a girder key, not this request's"):
        m.add.apply_async((x, 1), task_id=m.add.key(x, 2))
    assert m.add.apply_async((x, 1), task_id=m.add.key(x, 1)).get(timeout=GET) == x + 1


def test_a_canvas_step_with_bad_arguments_fails_at_call_time(cg):
    """A step applied by the caller whose arguments do not bind raises TypeError naming the task:
    a chain's first step before anything is sent; a group's member as it is applied (the members
    before it are sent, as stock Celery's typing check does)."""
    m, x = cg.app_module, num()
    with pytest.raises(TypeError, match="grid.add"):
        chain(m.add.s(x, 2, 3), m.add.s(1)).delay()
    with pytest.raises(TypeError, match="grid.add"):
        group(m.add.s(x, 2), m.add.s(1, 2, 3)).delay()


def test_an_alias_run_has_its_key_as_id_and_the_alias_as_parent(cg):
    """The request an alias's message runs is run under its key, its parent the alias."""
    m = cg.app_module
    depth = 2  # the module's own grid (key prefix) has not run it before
    step = m.reentrant_tasks.context.s(depth)
    alias = step.freeze().id
    result = step.delay()
    contexts = result.get(timeout=GET)
    key = m.reentrant_tasks.context.key(depth)
    assert result.id == alias != key
    assert contexts[0]["id"] == key
    assert contexts[0]["parent_id"] == alias
    assert contexts[1]["parent_id"] == key  # its own sub-request's parent is the key


@pytest.fixture(scope="module", params=["redis", "amqp"])
def solo(request, redis_server):
    """One solo worker: its single executor answers aliases and runs everything else inline."""
    _check_broker(request.param)
    g = Grid(redis_server, request.param)
    g.load_app()
    g.node = g.worker("canvas-solo", "solo", 1)
    yield g
    _fast_stop(g)


@pytest.mark.invariant2
def test_a_chord_of_nested_requests_on_one_solo_executor(solo):
    """A chord whose header steps request sub-requests (fan-outs, a nested chain) completes on a
    single executor: every alias claims and runs its request inline, nothing waits on a queue."""
    solo.load_app()
    m, t = solo.app_module, tag()
    r = m.reentrant_tasks
    header = [r.fanout.s(4, 0, f"{t}.a"), r.fanout.s(3, 2, f"{t}.b"), r.chain.s(30), r.fanout.s(4, 0, f"{t}.a")]
    assert chord(header)(m.canvas_tasks.total.s()).get(timeout=GET) == 4 + 6 + 30 + 4
    assert runs(solo, "grid.fanout", r.fanout.key(4, 0, f"{t}.a")) == 1
    assert chain(r.fanout.s(2, 0, f"{t}.c"), m.add.s(1)).delay().get(timeout=GET) == 3
