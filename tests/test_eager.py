"""Eager mode (``task_always_eager``): girder requests run in this process, memoized in memory.

No worker, no Redis, no broker: the app's broker, result backend and state store all point at a
port that listens and counts connections (it never answers, so any client would hang), and
every test checks that nothing connected. Tasks count their executions in memory.
"""

from __future__ import annotations

import datetime as dt
import socket
import time
import uuid

import pytest
from celery import Celery
from celery.result import EagerResult

from girder_celery import Girder, GirderError
from girder_celery.errors import GirderConnectionError
from tests.eager_app import (
    LISTENER,
    RUNS,
    add,
    app,
    bottom,
    context,
    depth,
    divide,
    fresh,
    girder,
    kinds,
    memo_fail,
    parent,
    ping,
    plain_get,
    ratio,
    record,
    retrying,
    runs,
    selfcycle,
    short_lived,
    top,
    unserializable,
)  # fmt: skip


@pytest.fixture(autouse=True)
def eager():
    """Every test starts with an empty memo, and ends with nothing having connected anywhere."""
    app.conf.task_always_eager = True
    girder.clear_eager()
    yield
    assert LISTENER.accepted == [], "eager mode connected to the broker, result backend or state store"


# -- nesting and memoization -------------------------------------------------------------------


def test_nested_requests_run_in_process_depth_first_newest_first():
    """A parent's children and grandchildren run here, depth-first, newest child first."""
    n = fresh()
    assert parent.call(n) == (n * 100 + 10) + (n * 100 + 1 + 10)
    assert RUNS[-5:] == [
        f"parent{(n,)}", f"child{(n, 1)}", f"grandchild{(n, 1)}", f"child{(n, 0)}", f"grandchild{(n, 0)}",
    ]  # fmt: skip


def test_the_diamonds_shared_request_runs_once_and_all_is_memoized():
    """In a diamond the shared grandchild runs once; asked again, nothing runs."""
    x = fresh()
    assert top.call(x) == [x * 10 + 1, x * 10 + 2]
    assert [runs(name, x) for name in ("top", "left", "right", "bottom")] == [1, 1, 1, 1]
    assert top.call(x) == [x * 10 + 1, x * 10 + 2] and bottom.call(x) == x * 10
    assert [runs(name, x) for name in ("top", "left", "right", "bottom")] == [1, 1, 1, 1]


def test_call_request_requests_delay_and_apply_async_agree_and_run_once():
    """call, request, requests, delay().get() and apply_async().get() give one value, run once."""
    x = fresh()
    key = add.key(x, 1)
    result = add.delay(x, 1)
    assert isinstance(result, EagerResult) and result.id == key and result.get() == x + 1
    assert add.apply_async((x,), {"y": 1}).get() == x + 1
    assert add.call(x, y=1) == x + 1
    assert girder.request(add.s(x, 1)) == x + 1
    assert girder.requests([add.s(x, 1), add.s(x), add.s(x, 1)]) == [x + 1, x, x + 1]
    assert add.apply((x, 1)).get() == x + 1
    assert runs("add", x, 1) == 1 and runs("add", x, 0) == 1


@pytest.mark.invariant6
def test_the_request_runs_under_its_grid_key():
    """An eager run's task id is the request key, the same as a grid's for every spelling."""
    x = fresh()
    got = context.call(x)
    assert got == {"id": context.key(x), "is_eager": True}
    assert context.delay(x=x).id == context.key(x) == girder.key_of(context.s(x))


def test_a_deep_chain_of_requests_does_not_exhaust_the_stack():
    """A chain of 400 nested requests runs eagerly without a RecursionError."""
    assert depth.call(400) == 400


# -- errors ------------------------------------------------------------------------------------


def _assert_ratio_chain(err: GirderError) -> None:
    chain = err.chain()
    assert [e.request for e in chain] == ["eager.ratio(1)", "eager.divide(1, 0)"]
    assert [e.key for e in chain] == [ratio.key(1), divide.key(1, 0)]
    assert [e.exc_type for e in chain] == ["girder_celery.errors.GirderError", "ZeroDivisionError"]
    assert chain[0].message == "a sub-request failed" and chain[1].message == "division by zero"
    assert "return x / y" in chain[1].remote_traceback
    lines = str(err).splitlines()
    assert lines[0] == "eager.ratio(1) failed: girder_celery.errors.GirderError: a sub-request failed"
    assert lines[1] == "  caused by eager.divide(1, 0) failed: ZeroDivisionError: division by zero"


def test_errors_carry_the_grids_chain_and_are_not_memoized():
    """ratio(1) -> divide(1, 0) fails with the grid's chain through call, request and delay; reruns."""
    with pytest.raises(GirderError) as called:
        ratio.call(1)
    _assert_ratio_chain(called.value)
    with pytest.raises(GirderError) as requested:
        girder.request(ratio.s(1))
    _assert_ratio_chain(requested.value)
    result = ratio.delay(1)
    assert result.failed() and result.id == ratio.key(1)
    with pytest.raises(GirderError) as got:
        result.get()
    _assert_ratio_chain(got.value)
    assert runs("ratio", 1) == 3 and runs("divide", 1, 0) == 3  # failures are not memoized
    assert girder.request(ratio.s(5)) == 1.25


def test_task_eager_propagates_raises_from_delay():
    """With task_eager_propagates, delay() of a failing request raises its GirderError at once."""
    app.conf.task_eager_propagates = True
    try:
        with pytest.raises(GirderError) as info:
            ratio.delay(1)
    finally:
        app.conf.task_eager_propagates = False
    _assert_ratio_chain(info.value)


def test_return_exceptions_puts_each_failure_in_its_place():
    """requests(return_exceptions=True) returns values and GirderErrors in order; without, raises."""
    sigs = [ratio.s(5), ratio.s(1), add.s(2, 3)]
    results = girder.requests(sigs, return_exceptions=True)
    assert results[0] == 1.25 and results[2] == 5
    assert isinstance(results[1], GirderError)
    _assert_ratio_chain(results[1])
    with pytest.raises(GirderError) as info:
        girder.requests(sigs)
    _assert_ratio_chain(info.value)


@pytest.mark.invariant5
@pytest.mark.parametrize(
    "sig, path",
    [
        (selfcycle.s(7), "eager.selfcycle(7) -> eager.selfcycle(7)"),
        (ping.s(7), "eager.pong(7) -> eager.ping(7) -> eager.pong(7)"),
    ],
    ids=["self", "two-step"],
)
def test_a_cycle_fails_fast_with_the_grids_error(sig, path):
    """A request needing its own ancestor fails at once, naming the cycle as a grid does."""
    started = time.monotonic()
    with pytest.raises(GirderError) as info:
        girder.request(sig)
    assert time.monotonic() - started < 2
    innermost = info.value.chain()[-1]
    assert innermost.exc_type == "girder_celery.RequestCycle"
    assert innermost.message == f"request cycle: {path}"
    assert innermost.key == (ping.key(7) if sig.task == "eager.ping" else selfcycle.key(7))
    assert info.value.request == f"{sig.task}(7)"


def test_a_plain_result_get_inside_a_task_is_refused_as_on_a_grid():
    """AsyncResult.get() inside an eager girder task fails with Celery's guard, as on a worker."""
    with pytest.raises(GirderError) as info:
        plain_get.call(fresh())
    innermost = info.value.chain()[-1]
    assert innermost.exc_type == "RuntimeError" and "Never call result.get() within a task!" in innermost.message


def test_celerys_eager_retry_runs_the_request_again_under_its_key():
    """autoretry_for retries an eager girder request in place; its value is memoized once."""
    tag = uuid.uuid4().hex
    assert retrying.call(tag) == 1
    assert retrying.call(tag) == 1 and runs("retrying", tag) == 2
    assert girder.state(retrying.s(tag))["attempts"] == 1


# -- arguments and results ---------------------------------------------------------------------


@pytest.mark.invariant6
def test_bad_arguments_are_refused_at_the_call_site_with_nothing_run():
    """An unsupported argument or a call not fitting the signature is a TypeError before anything runs."""
    before = list(RUNS)
    for attempt in (
        lambda: add.call({1, 2}),
        lambda: add.delay(object()),
        lambda: add.apply_async(({"a": {1}},)),
        lambda: girder.requests([add.s(1), add.s(1, z=2)]),
        lambda: add.call(),
        lambda: add.apply((1, 2, 3)),
    ):
        with pytest.raises(TypeError, match=r"args\[0\]|add\(\)"):
            attempt()
    assert before == RUNS


@pytest.mark.invariant7
def test_a_result_json_cannot_encode_fails_the_request():
    """A set result fails the request with a GirderError naming it, through call and delay."""
    x = fresh()
    with pytest.raises(GirderError, match="not JSON-serializable") as info:
        unserializable.call(x)
    assert (info.value.request, info.value.exc_type) == (f"eager.unserializable({x})", "TypeError")
    with pytest.raises(GirderError, match="not JSON-serializable"):
        unserializable.delay(x).get()
    assert girder.state(unserializable.s(x))["state"] == "failed"


def test_arguments_arrive_as_a_worker_sees_them():
    """Arguments arrive decoded from the canonical payload: tuples as lists, types kept."""
    when = dt.datetime(2026, 1, 2, 3, 4, 5)
    got = kinds.call((1, 2), b"raw", when, {1: "int key"}, flag=(True,))
    assert got == [
        ["list", "bytes", "datetime", "dict"],
        {"flag": "list"},
        ["int"],  # an int dict key arrives as an int
        [[1, 2], b"raw", when, {"1": "int key"}],  # the value as kombu's JSON returns it
    ]


# -- state, forget, the memo and its TTLs ------------------------------------------------------


def test_state_forget_and_clear_eager_work_on_the_in_process_memo():
    """state() reports the memo, forget() drops one request, clear_eager() all of them."""
    x = fresh()
    sig = add.s(x, 2)
    assert girder.state(sig)["state"] == "absent"
    assert add.call(x, 2) == x + 2
    state = girder.state(sig)
    assert (state["state"], state["request"], state["name"], state["placement"]) == (
        "done", f"eager.add({x}, 2)", "eager.add", "eager",
    )  # fmt: skip
    assert state["attempts"] == 1 and state["finished_at"] >= state["started_at"]
    assert girder.forget(sig) is True and girder.forget(sig) is False
    assert add.call(x, 2) == x + 2 and runs("add", x, 2) == 2
    add.call(x, 3)
    assert girder.clear_eager() == 2
    assert girder.state(sig)["state"] == "absent"
    assert add.call(x, 2) == x + 2 and runs("add", x, 2) == 3


def test_cache_errors_memoizes_a_failure_and_forget_clears_it():
    """With cache_errors a failure answers again without running; forget() lets it rerun."""
    x = fresh()
    with pytest.raises(GirderError) as first:
        memo_fail.call(x)
    with pytest.raises(GirderError) as second:
        memo_fail.delay(x).get()
    assert first.value.to_dict() == second.value.to_dict() and runs("memo_fail", x) == 1
    assert girder.forget(memo_fail.s(x)) is True
    with pytest.raises(GirderError):
        memo_fail.call(x)
    assert runs("memo_fail", x) == 2


def test_cache_ttl_expires_a_value_in_the_memo():
    """A value older than its task's cache_ttl is gone: the next request runs again."""
    x = fresh()
    assert short_lived.call(x) == x and short_lived.call(x) == x and runs("short_lived", x) == 1
    deadline = time.monotonic() + 5
    while girder.state(short_lived.s(x))["state"] == "done":  # the memo's own clock, bounded
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert short_lived.call(x) == x and runs("short_lived", x) == 2


def test_link_fires_for_a_run_and_for_a_memoized_value():
    """apply_async(link=...) calls the callback with the value, whether the request ran or was memoized."""
    x = fresh()
    add.apply_async((x, 5), link=record.s("cold"))
    add.apply_async((x, 5), link=record.s("memo"))
    assert f"record{(x + 5, 'cold')}" in RUNS and f"record{(x + 5, 'memo')}" in RUNS
    assert runs("add", x, 5) == 1


# -- no connection, and the setting read per call ----------------------------------------------


def test_with_closed_ports_eager_mode_answers_at_once_and_off_it_tries_the_store():
    """Broker, backend and store on closed ports: eager answers in well under a second; off, the store is tried."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    closed = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    closed_app = Celery(
        "eagerclosed",
        broker=f"amqp://guest:guest@127.0.0.1:{closed}//",
        backend=f"redis://127.0.0.1:{closed}/1",
        set_as_current=False,
    )
    closed_app.conf.update(girder_url=f"redis://127.0.0.1:{closed}/0", task_always_eager=True)
    closed_girder = Girder(closed_app)

    @closed_girder.task(name="closed.twice")
    def twice(x):
        return 2 * closed_girder.request(half.s(x))

    @closed_girder.task(name="closed.half")
    def half(x):
        return x / 2

    started = time.monotonic()
    assert twice.call(3) == 3.0 and twice.delay(4).get() == 4.0 and closed_girder.requests([half.s(8)]) == [4.0]
    assert time.monotonic() - started < 1.0
    closed_app.conf.task_always_eager = False  # read at every call: now the store is tried, and is not there
    with pytest.raises(GirderConnectionError):
        twice.call(3)
    closed_app.conf.task_always_eager = True
    assert twice.call(5) == 5.0


def test_canvas_chains_and_groups_run_eagerly_through_the_memo():
    """Eager chain and group steps are girder requests: memoized values, each request run once."""
    from celery import chain, group

    x = fresh()
    assert chain(add.s(x, 1), add.s(2)).delay().get() == x + 3
    assert group(add.s(x, 1), add.s(x + 1, 2)).delay().get() == [x + 1, x + 3]
    assert runs("add", x, 1) == 1 and runs("add", x + 1, 2) == 1


def test_canvas_chords_maps_chunks_and_links_run_eagerly_through_the_memo():
    """Eager chords, map, starmap and chunks make each step or item a request, memoized in process;
    link fires on a cold and on a memoized request alike."""
    from celery import chord

    from tests.eager_app import record, total

    x, t = fresh(), fresh()
    assert chord([add.s(x, 1), add.s(x, 1), add.s(x, 0)])(total.s()).get() == 3 * x + 2
    assert runs("total", [x + 1, x + 1, x]) == 1
    assert add.starmap([(x, 1), (x, 3)]).delay().get() == [x + 1, x + 3]
    assert add.map([x, x]).delay().get() == [x, x]
    assert add.chunks([(x, 1), (x, 3), (x, 4)], 2).delay().get() == [[x + 1, x + 3], [x + 4]]
    assert runs("add", x, 1) == runs("add", x, 3) == runs("add", x, 4) == runs("add", x, 0) == 1
    for _ in range(2):  # cold, then memoized
        assert add.apply_async((x, 9), link=record.s(t)).get() == x + 9
    assert runs("record", x + 9, t) == 2 and runs("add", x, 9) == 1


@pytest.mark.parametrize("style", ["conf", "object", "namespace"])
def test_the_eager_switch_is_read_as_celery_reads_it_at_every_call(style):
    """Runtime.eager_mode() gives Celery's task_always_eager however it is set, and sees it change."""

    class Source:
        CELERY_GIRDER_URL = girder_url = f"redis://127.0.0.1:{LISTENER.port}/2"

    probe_app = Celery(f"eagerprobe{style}", broker=app.conf.broker_url, set_as_current=False)
    if style == "object":
        probe_app.config_from_object(Source)
    elif style == "namespace":
        probe_app.config_from_object(Source, namespace="CELERY")
    runtime = Girder(probe_app, url=Source.girder_url).runtime
    seen = []
    for value in (False, True, False):
        if style == "conf":
            probe_app.conf.task_always_eager = value
        else:  # a live source, as a Django settings object is
            Source.CELERY_TASK_ALWAYS_EAGER = Source.task_always_eager = value
        seen.append((runtime.eager_mode(), probe_app.conf.task_always_eager))
    assert seen == [(False, False), (True, True), (False, False)]
