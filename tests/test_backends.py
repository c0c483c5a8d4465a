"""Every Celery result backend (issue 10): Redis, ``rpc://``, SQLAlchemy on SQLite, and none.

Each on real workers and both brokers: ``call``, cold and done ``delay().get()``, ``AsyncResult``
after ``call`` and for a child run inline, and after ``forget`` plus a changed outcome, an
uncached failure then a success, and ``result_expires`` (invariant 1: the state store is the
truth, and the backend's copy tells its current outcome, never an older one).
"""

from __future__ import annotations

import pytest
from celery.exceptions import TimeoutError as CeleryTimeout

from girder_celery import GirderError
from tests.conftest import _check_broker, _fast_stop
from tests.core_support import tag
from tests.harness import Grid, wait_until

BACKENDS = ["redis", "rpc", "db", "none"]
#: Bounded waits for answers the backend has, or must have soon.
GET = 15


def backend_url(kind: str, redis_server, tmp_path_factory) -> str:
    if kind == "redis":
        return redis_server.url(2)
    if kind == "rpc":
        return "rpc://"
    if kind == "db":
        return f"db+sqlite:///{tmp_path_factory.mktemp('results') / 'results.sqlite'}"
    return "disabled://"


@pytest.fixture(scope="module", params=[(k, b) for k in BACKENDS for b in ("redis", "amqp")], ids="-".join)
def bgrid(request, redis_server, tmp_path_factory):
    """A grid of one solo worker whose Celery result backend is the parameter's."""
    kind, broker = request.param
    _check_broker(broker)
    g = Grid(redis_server, broker, backend_url=backend_url(kind, redis_server, tmp_path_factory))
    g.env["GIRDER_TEST_RESULT_EXPIRES"] = "3"  # the redis and db copies expire (db: by Celery's cleanup)
    g.load_app()
    g.kind = kind
    g.node = g.worker("backends", "solo", 1)
    yield g
    _fast_stop(g)


@pytest.fixture
def bg(bgrid):
    if bgrid.node.proc.poll() is not None:
        pytest.fail(f"the worker died:\n{bgrid.node.output()[-5000:]}")
    bgrid.load_app()  # re-point tests.gridapp at this grid
    return bgrid


def tasks(g):
    return g.app_module.backend_tasks


def async_value(g, key: str):
    return g.app_module.app.AsyncResult(key).get(timeout=GET)


@pytest.mark.invariant1
def test_call_and_cold_and_done_delay_get(bg):
    """call() answers on every backend; cold and done delay().get() answer too, or, with no
    backend, raise Celery's own error at once."""
    m, t = tasks(bg), tag()
    assert m.counted.call(f"{t}.call") == 1
    if bg.kind == "none":
        for _ in range(2):  # cold, then done
            with pytest.raises(NotImplementedError, match="No result backend is configured"):
                m.counted.delay(t).get(timeout=GET)
            wait_until(lambda: bg.app_module.girder.state(m.counted.s(t))["state"] == "done", GET, "the run")
        return
    assert m.counted.delay(t).get(timeout=GET) == 1  # cold
    assert m.counted.delay(t).get(timeout=GET) == 1  # done: not run again
    assert m.counted.delay(f"{t}.call").get(timeout=GET) == 1  # done by call()


@pytest.mark.invariant1
def test_async_result_after_call_and_for_an_inline_child(bg):
    """AsyncResult(key).get() answers after call() and for a child run inline, wherever the
    backend can serve it: rpc answers only the sender, and no backend raises Celery's error."""
    m, t = tasks(bg), tag()
    assert m.counted_parent.call(t) == [1]
    parent, child = m.counted_parent.key(t), m.counted.key(t)
    if bg.kind == "none":
        with pytest.raises(NotImplementedError, match="No result backend is configured"):
            async_value(bg, parent)
    elif bg.kind == "rpc":  # nobody sent these runs a reply queue: there is no answer to read
        for key in (parent, child):
            with pytest.raises(CeleryTimeout):
                bg.app_module.app.AsyncResult(key).get(timeout=0.5)
        assert m.counted_parent.delay(t).get(timeout=GET) == [1]  # the sender of a done request is
    else:
        assert async_value(bg, parent) == [1]
        assert async_value(bg, child) == 1


@pytest.mark.invariant1
@pytest.mark.parametrize("how", ["call", "delay"])
def test_forget_then_a_changed_outcome_is_what_is_answered(bg, how):
    """After girder.forget and a re-run with a new value (by call or delay), AsyncResult(key)
    and delay().get() answer the new value, never the forgotten one."""
    if bg.kind == "none":
        pytest.skip("no backend: nothing is answered (test_call_and_cold_and_done_delay_get)")
    m, t = tasks(bg), tag()
    girder, key = bg.app_module.girder, m.counted.key(t)
    assert m.counted.delay(t).get(timeout=GET) == 1
    if bg.kind != "rpc":
        assert async_value(bg, key) == 1
    assert girder.forget(m.counted.s(t)) is True
    if how == "call":
        assert m.counted.call(t) == 2
    else:
        assert m.counted.delay(t).get(timeout=GET) == 2
    assert m.counted.delay(t).get(timeout=GET) == 2
    if bg.kind != "rpc":
        assert async_value(bg, key) == 2


@pytest.mark.invariant1
def test_a_forgotten_inline_child_rerun_is_what_is_answered(bg):
    """A child run inline again after forget (its parent forgotten too) answers its new value."""
    if bg.kind in ("none", "rpc"):
        pytest.skip("an inline child's copy is readable only with a backend that keeps copies")
    m, t = tasks(bg), tag()
    girder = bg.app_module.girder
    assert m.counted_parent.call(t) == [1]
    assert async_value(bg, m.counted.key(t)) == 1
    girder.forget(m.counted.s(t))
    girder.forget(m.counted_parent.s(t))
    assert m.counted_parent.call(t) == [2]
    assert async_value(bg, m.counted.key(t)) == 2
    assert async_value(bg, m.counted_parent.key(t)) == [2]


@pytest.mark.invariant1
@pytest.mark.parametrize("how", ["call", "delay"])
def test_an_uncached_failure_then_a_success_is_what_is_answered(bg, how):
    """An uncached failure, then a success of the same request: the success is answered."""
    if bg.kind == "none":
        pytest.skip("no backend: nothing is answered")
    m, t = tasks(bg), tag()
    key = m.fails_once.key(t)
    if how == "call":
        with pytest.raises(GirderError, match="first run"):
            m.fails_once.call(t)
        if bg.kind != "rpc":
            with pytest.raises(ValueError, match="first run"):
                async_value(bg, key)
        assert m.fails_once.call(t) == 2
    else:
        with pytest.raises(Exception, match="first run"):
            m.fails_once.delay(t).get(timeout=GET)
        assert m.fails_once.delay(t).get(timeout=GET) == 2
    assert m.fails_once.delay(t).get(timeout=GET) == 2
    if bg.kind != "rpc":
        assert async_value(bg, key) == 2


@pytest.mark.invariant1
def test_after_result_expires_delay_stores_the_value_again(bg):
    """Once the backend's copy has expired (result_expires) while the store keeps the value,
    delay().get() answers it and AsyncResult(key) reads it again."""
    if bg.kind != "redis":
        pytest.skip("only Redis expires a copy by itself (db copies go by Celery's cleanup task)")
    m, t = tasks(bg), tag()
    key = m.counted.key(t)
    assert m.counted.call(t) == 1
    backend = bg.redis_server.client(2)  # the grid's result backend (backend_url)
    name = bg.app_module.app.backend.get_key_for_task(key)
    wait_until(lambda: not backend.exists(name), 10, "the copy to expire")
    assert m.counted.delay(t).get(timeout=GET) == 1
    assert async_value(bg, key) == 1


@pytest.mark.invariant1
def test_a_publication_of_an_older_copy_unread_on_the_subscription_does_not_answer_the_rerun(bg):
    """Older runs' publications that reached this process's subscription after its get() was
    answered, and were never read, are not what the re-run's delay().get() answers (Redis backend:
    its result consumer reads the socket as the next get() waits, and would hand them over)."""
    if bg.kind != "redis":
        pytest.skip("only Redis's result consumer reads publications")
    m, t = tasks(bg), tag()
    app, girder, key = bg.app_module.app, bg.app_module.girder, m.counted_briefly.key(t)
    assert m.counted_briefly.delay(t).get(timeout=GET) == 1
    wait_until(lambda: girder.state(m.counted_briefly.s(t))["state"] == "absent", 10, "the value to expire")
    consumer = app.backend.result_consumer
    consumer.consume_from(key)  # as a subscription not yet cancelled when the older copy was published
    wait_until(lambda: consumer._pubsub.subscribed, 5, "the subscription")
    stale = app.backend.encode({"status": "SUCCESS", "result": 1, "traceback": None, "children": [],
                                "date_done": "2026-01-01T00:00:00", "task_id": key})  # fmt: skip
    for _ in range(2):  # the older run's own publication may be buffered already: two of them
        assert app.backend.client.publish(app.backend.get_key_for_task(key), stale) == 1
    wait_until(lambda: consumer._pubsub.connection.can_read(timeout=0), 5, "the publications to arrive")
    assert m.counted_briefly.delay(t).get(timeout=GET) == 2


@pytest.mark.invariant1
@pytest.mark.parametrize("how", ["call", "delay"])
def test_after_the_store_lets_a_value_expire_the_rerun_is_what_is_answered(bg, how):
    """Once the store's value expires (cache_ttl) and the request runs again with a new value,
    AsyncResult(key) and delay().get() answer the new one, not the backend's older copy."""
    if bg.kind == "none":
        pytest.skip("no backend: nothing is answered")
    m, t = tasks(bg), tag()
    girder, key = bg.app_module.girder, m.counted_briefly.key(t)
    assert m.counted_briefly.delay(t).get(timeout=GET) == 1
    wait_until(lambda: girder.state(m.counted_briefly.s(t))["state"] == "absent", 10, "the value to expire")
    current = 2
    if how == "call":
        assert m.counted_briefly.call(t) == 2
        # With Redis the re-run's copy is written unawaited after call() returns (mirror.py), so
        # this process reads it by delay(), which stores the store's value again (or, once that
        # has expired too, runs a third time: either way the store's current value).
        current = m.counted_briefly.delay(t).get(timeout=GET)
        assert current in (2, 3)
    else:
        assert m.counted_briefly.delay(t).get(timeout=GET) == 2
    if bg.kind != "rpc":
        assert async_value(bg, key) == current
