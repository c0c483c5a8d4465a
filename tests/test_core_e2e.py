"""The core end to end: the public API, memoization and deduplication across processes, and the
worker side (lease renewal, a killed worker's request taken over).

Real Redis, real brokers (Redis and RabbitMQ) and real ``celery worker`` processes on the prefork
(``-c 2``) and solo pools. Tests on the shared ``live`` worker use arguments of their own.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from celery import Celery

from girder_celery import Girder, GirderError, GirderTimeout
from tests.core_support import (
    dead_queue,
    drain_ids,
    forget_queue,
    open_gate,
    received,
    record,
    redis_now_ms,
    runs,
    skipped,
    store_keys,
    tag,
    wait_state,
)
from tests.harness import ROOT, wait_until


def num() -> int:
    return uuid.uuid4().int % 10**12


def local_app(**conf) -> Celery:
    app = Celery(f"local-{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
    app.conf.update(conf)
    return app


# -- Girder(app) and @girder.task (no servers) ----------------------------------------------


def test_girder_url_argument_then_app_conf():
    """Girder reads girder_url from app.conf, and a url argument wins over it."""
    app = local_app(girder_url="redis://127.0.0.1:7001/3")
    assert Girder(app).settings.url == "redis://127.0.0.1:7001/3"
    assert Girder(local_app(girder_url="redis://x:1/0"), url="redis://y:2/0").settings.url == "redis://y:2/0"


def test_girder_without_a_url_is_a_clear_error():
    """Without a girder_url, settings and calls raise a ValueError asking for a Redis URL."""
    girder = Girder(local_app())

    @girder.task(name="nourl.add")
    def add(x, y):
        return x + y

    with pytest.raises(ValueError, match=r"girder_url"):
        girder.settings  # noqa: B018
    with pytest.raises(ValueError, match=r"Redis URL"):
        add.call(1, 2)


def test_girder_refuses_a_bad_app_or_url():
    """Girder refuses what is not a Celery app, a url that is not a str and one that is not redis://."""
    with pytest.raises(TypeError, match="Celery app"):
        Girder(object())
    with pytest.raises(TypeError, match="url"):
        Girder(local_app(), url=6379)
    with pytest.raises(ValueError, match="redis://"):
        Girder(local_app(), url="http://127.0.0.1:6379").settings  # noqa: B018


def test_task_decorator_bare_and_with_celery_options():
    """@girder.task works bare, and passes Celery's options through along with girder's own."""
    app = local_app()
    girder = Girder(app, url="redis://127.0.0.1:1/0")

    @girder.task
    def bare(x):
        return x

    @girder.task(
        name="opts.add", bind=True, queue="q-opts", acks_late=True, max_retries=7, rate_limit="10/s",
        time_limit=30, version="3", cache_ttl=2.5, cache_errors=True,
    )  # fmt: skip
    def with_options(self, x, y=0):
        return (self.name, x + y)

    assert bare.name in app.tasks and bare.cache_errors is False and bare.version is None
    assert bare(4) == 4  # calling the function directly is still just a call
    task = app.tasks["opts.add"]
    assert with_options.name == "opts.add"
    assert (task.queue, task.acks_late, task.max_retries, task.rate_limit, task.time_limit) == (
        "q-opts", True, 7, "10/s", 30,
    )  # fmt: skip
    assert (task.version, task.cache_ttl, task.cache_errors) == ("3", 2.5, True)
    assert with_options(1, 2) == ("opts.add", 3)  # bind=True passed through
    assert task.key(1, 2) != bare.key(1)


@pytest.mark.parametrize(
    "options",
    [
        {"version": 2},
        {"version": ""},
        {"cache_ttl": 0},
        {"cache_ttl": -1},
        {"cache_ttl": True},
        {"cache_ttl": "5"},
        {"cache_errors": "yes"},
        {"cache_errors": 1},
        {"frobnicate": 1},
        {"cache_error": True},  # a typo of cache_errors
    ],
    ids=repr,
)
def test_bad_task_options_are_type_errors(options):
    """A bad or unknown task option is a TypeError naming it."""
    girder = Girder(local_app(), url="redis://127.0.0.1:1/0")
    with pytest.raises(TypeError, match=next(iter(options))):

        @girder.task(name=f"bad.{uuid.uuid4().hex[:6]}", **options)
        def f(x):
            return x


def test_task_decorator_refuses_positional_options():
    """@girder.task refuses a positional argument."""
    girder = Girder(local_app(), url="redis://127.0.0.1:1/0")
    with pytest.raises(TypeError):
        girder.task("name")


# -- no worker: what is sent, and to where ---------------------------------------------------


@pytest.mark.invariant6
def test_task_id_other_than_the_key_is_refused_before_anything_is_sent(grid):
    """A task_id shaped like a key must be the request's own key: another key is refused before
    anything is sent. An id that is no key is an alias: its message goes as it is, with nothing
    written to the store by the caller (the node that takes it answers it)."""
    m = grid.app_module
    with pytest.raises(ValueError, match=m.add.key(1, 2)):
        m.add.apply_async((1, 2), task_id=m.add.key(1, 3))
    assert store_keys(grid) == []
    alias = m.add.apply_async((1, 2), task_id="my-own-id")
    assert alias.id == "my-own-id" and store_keys(grid) == []
    same = m.add.apply_async((1, 2), task_id=m.add.key(1, 2))  # the key itself is fine
    assert same.id == m.add.key(1, 2)
    assert drain_ids(grid, grid.queue, same.id) == ["my-own-id"]


@pytest.mark.invariant1
@pytest.mark.invariant6
def test_a_request_in_flight_is_offered_once(grid):
    """Four spellings of a call in flight share one key, one record and one broker message."""
    m = grid.app_module
    t = tag()
    key = m.gated.key(t)
    results = [
        m.gated.delay(t),
        m.gated.apply_async((t,)),
        m.gated.apply_async((), {"tag": t, "outcome": "value"}),
        m.gated.s(t).delay(),
    ]
    assert {r.id for r in results} == {key}
    sentinel = m.echo.delay("sentinel", t)
    assert drain_ids(grid, grid.queue, sentinel.id) == [key]
    rec = record(grid, key)
    assert (rec["state"], rec["offers"]) == ("queued", "1")


def test_celery_routing_options_reach_the_offer(grid):
    """A task's queue option and a request's pool decide the queue its offer goes to."""
    m = grid.app_module
    routed_q, pool_q = dead_queue(grid), dead_queue(grid)
    try:

        @m.girder.task(name="grid.routed", queue=routed_q)
        def routed(x):
            return x

        with pytest.raises(GirderTimeout):
            m.girder.request(routed.s(1), timeout=0.3)
        with pytest.raises(GirderTimeout):
            m.girder.request(routed.s(2), pool=pool_q, timeout=0.3)
        for queue, key in ((routed_q, routed.key(1)), (pool_q, routed.key(2))):
            sentinel = m.echo.apply_async(("sentinel", tag()), queue=queue)
            assert drain_ids(grid, queue, sentinel.id) == [key]
        assert m.girder.state(routed.s(2))["pool"] == pool_q
    finally:
        forget_queue(grid, routed_q)
        forget_queue(grid, pool_q)


# -- the API on a live worker --------------------------------------------------------------


@pytest.mark.invariant6
def test_every_spelling_of_a_call_runs_once(live):
    """Every spelling of one call, defaults filled in, runs the function once (invariant 6)."""
    m = live.app_module
    a = num()
    key = m.add.key(a, 2)
    assert m.add.call(a, 2) == a + 2
    assert m.add.call(a, y=2) == a + 2
    assert m.add.call(x=a, y=2) == a + 2
    assert m.girder.request(m.add.s(a, 2), timeout=10) == a + 2
    assert m.girder.request(m.add.s(y=2, x=a), timeout=10, pool=live.queue) == a + 2
    assert runs(live, "grid.add", key) == 1
    # defaults are part of the call: add(a) is add(a, 0)
    assert m.add.call(a) == a
    assert m.girder.request(m.add.s(a, 0), timeout=10) == a
    assert runs(live, "grid.add", m.add.key(a, 0)) == 1


@pytest.mark.invariant6
def test_requests_answers_in_order_with_duplicates(live):
    """requests() answers in order, and spellings of one call among its requests run once."""
    m = live.app_module
    a, b = num(), num()
    sigs = [m.add.s(a, 1), m.add.s(b, 2), m.add.s(a, y=1), m.echo.s(a, k=b), m.add.s(x=a, y=1)]
    assert m.girder.requests(sigs, timeout=10) == [a + 1, b + 2, a + 1, [[a], {"k": b}], a + 1]
    assert runs(live, "grid.add", m.add.key(a, 1)) == 1
    assert m.girder.requests([], timeout=1) == []
    first, again = m.girder.requests([m.echo.s(a, k=b), m.echo.s(a, k=b)], timeout=10)
    assert first == again and first is not again, "a value repeated in the answers is its own copy"


def test_requests_return_exceptions_puts_errors_in_place(live):
    """requests(return_exceptions=True) puts each error in its place; without it the error raises."""
    m = live.app_module
    a = num()
    values = m.girder.requests([m.add.s(a, 1), m.divide.s(a, 0), m.add.s(a, 2)], timeout=10, return_exceptions=True)
    assert values[0] == a + 1 and values[2] == a + 2
    assert isinstance(values[1], GirderError) and values[1].key == m.divide.key(a, 0)
    with pytest.raises(GirderError) as info:
        m.girder.requests([m.add.s(a, 1), m.divide.s(a, 0)], timeout=10)
    assert info.value.key == m.divide.key(a, 0)


@pytest.mark.invariant6
@pytest.mark.invariant7
def test_the_function_receives_exactly_the_decoded_arguments(live):
    """The function receives exactly the JSON-family values its key describes (a tuple as a list)."""
    import datetime as dt
    import decimal

    m = live.app_module
    t = tag()
    args = (
        (1, 2),
        b"\x00\xff",
        dt.datetime(2024, 1, 2, 3, 4, 5, 6),
        dt.date(2024, 1, 2),
        dt.time(1, 2, 3),
        decimal.Decimal("1.10"),
        uuid.UUID(int=5),
        {1: "int key", "s": 2.5},
        True,
        None,
    )
    got = m.girder.request(m.inspect_args.s(t, *args, when=dt.date(2000, 1, 1)), timeout=10)
    expected = [["str", repr(t)]] + [[type(a).__name__, repr(a)] for a in args]
    expected[1] = ["list", "[1, 2]"]  # a tuple arrives as the list the key describes
    # a dict arrives in canonical order: compare it as a dict
    assert got["args"][8][0] == "dict" and ast.literal_eval(got["args"][8][1]) == args[7]
    got["args"][8] = expected[8]
    assert got["args"] == expected
    assert got["kwargs"] == {"when": ["date", repr(dt.date(2000, 1, 1))]}
    # the tuple and list spellings are one request
    assert m.inspect_args.key(t, [1, 2]) == m.inspect_args.key(t, (1, 2))


@pytest.mark.invariant7
def test_results_round_trip_through_json(live):
    """A result comes back through JSON as the same lists, dicts and None (invariant 7)."""
    m = live.app_module
    a = num()
    assert m.girder.request(m.echo.s(a, [1, {"x": None}], k="v"), timeout=10) == [[a, [1, {"x": None}]], {"k": "v"}]


@pytest.mark.invariant6
def test_delay_uses_the_key_as_task_id_and_the_result_backend_answers(live):
    """delay() and apply_async() take the key as task id for any spelling, and AsyncResult answers."""
    m = live.app_module
    a = num()
    key = m.add.key(a, 5)
    result = m.add.delay(a, 5)
    assert result.id == key
    assert result.get(timeout=10) == a + 5
    assert m.app.AsyncResult(key).get(timeout=5) == a + 5
    again = m.add.apply_async((a,), {"y": 5})
    assert again.id == key and again.get(timeout=5) == a + 5
    assert runs(live, "grid.add", key) == 1


@pytest.mark.invariant1
def test_a_done_request_is_answered_without_any_message(live):
    """A done request is answered by the store without any broker message, on any queue (invariant 1)."""
    m = live.app_module
    a = num()
    key = m.add.key(a, 1)
    dead = dead_queue(live)
    try:
        assert m.girder.request(m.add.s(a, 1), timeout=10) == a + 1
        m.app.backend.forget(key)  # so that apply_async below must restore the result itself
        # offered to a queue nobody consumes: only the store can answer
        assert m.girder.request(m.add.s(a, 1), pool=dead, timeout=5) == a + 1
        result = m.add.apply_async((a, 1), queue=dead)
        assert result.id == key and result.get(timeout=5) == a + 1
        assert m.add.s(a, 1).set(queue=dead).delay().get(timeout=5) == a + 1
        sentinel = m.echo.apply_async(("sentinel", tag()), queue=dead)
        assert drain_ids(live, dead, sentinel.id) == []
        assert m.add.call(a, 1) == a + 1
        assert runs(live, "grid.add", key) == 1
        assert received(live.node, key) == 1
    finally:
        forget_queue(live, dead)


@pytest.mark.invariant1
def test_state_and_forget_through_a_request_lifecycle(live):
    """state() follows absent -> running(owner, lease) -> done; forget() drops only a settled request."""
    m = live.app_module
    t = tag()
    sig, key = m.gated.s(t), m.gated.key(t)
    absent = m.girder.state(sig)
    assert absent["key"] == key and absent["state"] == "absent"
    assert (absent["owner"], absent["node"], absent["attempts"], absent["started_at"]) == (None, None, 0, None)
    t0 = time.time()
    result = m.gated.delay(t)
    wait_state(live, key, "running")
    running = m.girder.state(key)
    hostname = live.node.hostname
    assert running["state"] == "running"
    assert running["node"] == hostname and running["owner"].startswith(f"{hostname}/")
    assert (running["name"], running["request"]) == ("grid.gated", f"grid.gated({t!r}, 'value')")
    assert (running["attempts"], running["offers"]) == (1, 1)
    assert t0 - 1 <= running["created_at"] <= running["offered_at"] <= running["started_at"] <= time.time() + 1
    assert running["finished_at"] is None and running["lease_until"] > running["started_at"]
    assert m.girder.forget(sig) is False  # in flight: its waiters are owed an answer
    assert m.girder.state(sig)["state"] == "running"
    open_gate(live, t)
    assert result.get(timeout=10) == t
    done = m.girder.state(sig)
    assert done["state"] == "done" and done["ran_by"] == running["owner"]
    assert done["started_at"] <= done["finished_at"] <= time.time() + 1
    assert done["attempts"] == 1 and done["lease_until"] is None
    assert m.girder.forget(sig) is True
    assert m.girder.state(key)["state"] == "absent"
    assert m.girder.forget(key) is False
    open_gate(live, t)
    assert m.girder.request(sig, timeout=10) == t  # forgotten: it runs again
    assert runs(live, "grid.gated", key) == 2


def test_state_and_forget_refuse_what_is_not_a_request(live):
    """state() and forget() refuse what is not a key, and a plain Celery task's signature."""
    m = live.app_module
    with pytest.raises(ValueError, match="key"):
        m.girder.state("not-a-key")
    with pytest.raises(ValueError):
        m.girder.forget("A" * 64)
    with pytest.raises(TypeError, match="girder task"):
        m.girder.state(m.plain_add.s(1, 2))


# -- memoization and deduplication across processes --------------------------------------------

CLIENT = r"""
import json, os, sys
import redis
import tests.gridapp as m
r = redis.Redis.from_url(os.environ["GIRDER_TEST_COUNTERS"])
r.rpush(sys.argv[1] + ":ready", os.getpid())
if not r.blpop([sys.argv[1] + ":go"], timeout=30):
    sys.exit("never told to go")
print(json.dumps(m.girder.request(m.slow.s(0.3, sys.argv[2]), timeout=30)))
"""


@pytest.mark.invariant1
def test_identical_requests_from_many_processes_run_once(live):
    """Eight processes making one request at once share one offer, one run and its value."""
    n, t = 8, tag()
    m = live.app_module
    key = m.slow.key(0.3, t)
    sync = f"{live.key_prefix}:test:sync:{t}"
    client = live.redis_server.client()
    env = {**os.environ, **live.env, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CLIENT, sync, t], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(n)
    ]  # fmt: skip
    try:
        wait_until(lambda: client.llen(f"{sync}:ready") == n, 30, f"{n} client processes")
        client.rpush(f"{sync}:go", *["go"] * n)  # all submit at once
        outputs = [p.communicate(timeout=30) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0] * n, [err for _, err in outputs]
    values = [json.loads(out) for out, _ in outputs]
    assert values == [{"tag": t, "node": live.node.hostname}] * n
    assert runs(live, "grid.slow", key) == 1
    rec = record(live, key)
    assert (rec["offers"], rec["attempts"]) == ("1", "1")


@pytest.mark.invariant1
def test_duplicate_delivery_of_a_done_request_never_runs_nor_overwrites(live):
    """A redelivered or forged copy of a done request's message never runs nor overwrites (invariant 1)."""
    m = live.app_module
    a = num()
    key = m.add.key(a, 1)
    assert m.girder.request(m.add.s(a, 1), timeout=10) == a + 1
    before = record(live, key)
    m.app.send_task("grid.add", (a, 1), task_id=key)  # a redelivered copy
    m.app.send_task("grid.add", (7, 7), task_id=key)  # a forged copy with other arguments
    wait_until(lambda: len(skipped(live.node, "grid.add", key)) == 2, 10, "the worker to skip both copies")
    assert skipped(live.node, "grid.add", key) == ["done", "done"]
    assert runs(live, "grid.add", key) == 1
    assert record(live, key) == before
    assert m.girder.request(m.add.s(a, 1), timeout=5) == a + 1


@pytest.mark.invariant1
def test_duplicate_delivery_of_a_running_request_never_runs_it_twice(live):
    """A copy of a running request's message is skipped: the function runs once (invariant 1)."""
    m = live.app_module
    t = tag()
    key = m.gated.key(t)
    result = m.gated.delay(t)
    wait_state(live, key, "running")
    m.app.send_task("grid.gated", (t,), task_id=key)
    if live.pool == "prefork":  # the other executor takes the copy while the first one runs
        wait_until(lambda: skipped(live.node, "grid.gated", key), 10, "the copy to be skipped")
        assert skipped(live.node, "grid.gated", key) == ["running"]
        open_gate(live, t)
    else:  # the only executor takes the copy after the first run
        open_gate(live, t)
        wait_until(lambda: skipped(live.node, "grid.gated", key), 10, "the copy to be skipped")
        assert skipped(live.node, "grid.gated", key) == ["done"]
    assert result.get(timeout=10) == t
    assert runs(live, "grid.gated", key) == 1
    assert record(live, key)["attempts"] == "1"


def test_celery_autoretry_runs_the_request_again(live):
    """``autoretry_for`` is a Celery task option: the retry must run, not be skipped as a
    duplicate of the attempt that raised."""
    m = live.app_module
    t = tag()
    assert m.girder.request(m.retrying.s(t), timeout=3) == 2
    assert runs(live, "grid.retrying", m.retrying.key(t)) == 2


# -- the worker side: leases -----------------------------------------------------------------


@pytest.mark.invariant1
def test_a_running_request_renews_its_lease(make_grid, worker_pool):
    """A running request renews its lease, so its waiter never re-offers it and it runs once."""
    pool, concurrency = worker_pool
    grid = make_grid(lease=1.0, check=0.3)  # a waiter that re-offers as soon as a lease lapses
    grid.worker("w1", pool, concurrency)
    m = grid.app_module
    t = tag()
    key = m.slow.key(2.5, t)
    client = grid.redis_server.client()
    with ThreadPoolExecutor(1) as pool_:
        future = pool_.submit(m.girder.request, m.slow.s(2.5, t), 20)
        wait_state(grid, key, "running")
        leases = set()
        deadline = time.monotonic() + 10
        while (rec := record(grid, key)).get("state") == "running" and time.monotonic() < deadline:
            now = redis_now_ms(client)
            assert int(rec["lease_until"]) > now, "the lease of a running request lapsed"
            leases.add(int(rec["lease_until"]))
            time.sleep(0.05)
        assert future.result(timeout=10)["tag"] == t
    assert len(leases) >= 4  # renewed every third of the lease over 2.5 s
    rec = record(grid, key)
    assert (rec["state"], rec["attempts"], rec["offers"]) == ("done", "1", "1")
    assert runs(grid, "grid.slow", key) == 1


@pytest.mark.invariant1
def test_a_killed_workers_request_is_reoffered_and_completed_elsewhere(make_grid, worker_pool):
    """A killed worker's request is recovered by its waiter and completed on another node (invariant 1)."""
    pool, concurrency = worker_pool
    grid = make_grid(lease=1.0, check=0.5)
    w1 = grid.worker("w1", pool, concurrency)
    m = grid.app_module
    t = tag()
    key = m.slow.key(1.5, t)
    with ThreadPoolExecutor(1) as pool_:
        future = pool_.submit(m.girder.request, m.slow.s(1.5, t), 30)
        assert wait_state(grid, key, "running")["node"] == w1.hostname
        wait_until(lambda: runs(grid, "grid.slow", key) == 1, 10, "the function to start on w1")
        w1.kill()
        w2 = grid.worker("w2", pool, concurrency)
        value = future.result(timeout=30)
    assert value == {"tag": t, "node": w2.hostname}
    rec = record(grid, key)
    assert rec["state"] == "done" and rec["attempts"] == "2"
    assert rec["ran_by"].startswith(f"{w2.hostname}/")
    assert runs(grid, "grid.slow", key) == 2
