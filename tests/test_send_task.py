"""``send_task`` by name from a client without the girder app (issue 10, item 4), on both brokers.

The client is a plain Celery app on the grid's broker and result backend: its message's id is
a fresh uuid of its own, not a girder key, so the answer belongs under that id whether the
request is cold, in flight elsewhere or memoized, and the function runs once (invariant 1).
"""

from __future__ import annotations

import uuid

import pytest
from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeout

from tests.conftest import _check_broker, _fast_stop
from tests.core_support import open_gate, runs, tag, wait_state
from tests.harness import Grid, wait_until

GET = 15


@pytest.fixture(scope="module", params=["redis", "amqp"])
def sgrid(request, redis_server):
    """A grid of one prefork worker of two executors: one may wait while the other runs."""
    _check_broker(request.param)
    g = Grid(redis_server, request.param)
    g.load_app()
    g.node = g.worker("sender", "prefork", 2)
    yield g
    _fast_stop(g)


@pytest.fixture
def sg(sgrid):
    if sgrid.node.proc.poll() is not None:
        pytest.fail(f"the worker died:\n{sgrid.node.output()[-5000:]}")
    sgrid.load_app()
    return sgrid


@pytest.fixture
def plain(sg):
    """A client app with the grid's broker, backend and queue, and no girder."""
    app = Celery("plain", broker=sg.env["GIRDER_TEST_BROKER"], backend=sg.env["GIRDER_TEST_BACKEND"])
    app.conf.task_default_queue = sg.queue
    yield app
    app.close()


def num() -> int:
    return uuid.uuid4().int % 10**9


@pytest.mark.invariant1
def test_send_task_of_a_cold_request_is_answered_under_its_id(sg, plain):
    """A cold request sent by name runs once, under its key (its ``self.request.id``), and is
    answered under the message's own id as well as its key."""
    m, x = sg.app_module, num()
    result = plain.send_task("grid.add", (x, 1))
    assert result.get(timeout=GET) == x + 1
    assert m.add.call(x, 1) == x + 1  # memoized under its key
    assert runs(sg, "grid.add", m.add.key(x, 1)) == 1
    assert runs(sg, "grid.add", result.id) == 0
    assert plain.AsyncResult(m.add.key(x, 1)).get(timeout=GET) == x + 1


@pytest.mark.invariant1
def test_send_task_of_a_memoized_request_is_answered_without_running(sg, plain):
    """A memoized request sent by name is answered under the message's id, and not run again."""
    m, x = sg.app_module, num()
    assert m.add.call(x, 2) == x + 2
    result = plain.send_task("grid.add", (x, 2))
    assert result.get(timeout=GET) == x + 2
    assert runs(sg, "grid.add", m.add.key(x, 2)) == 1
    assert runs(sg, "grid.add", result.id) == 0


@pytest.mark.invariant1
def test_send_task_of_a_memoized_failure_is_answered_with_it(sg, plain):
    """A memoized failure sent by name is answered under the message's id with its error."""
    m, x = sg.app_module, num()
    with pytest.raises(Exception, match=f"bad {x}"):
        m.memo_fail.call(x)
    result = plain.send_task("grid.flaky", (x,))
    with pytest.raises(Exception, match=f"bad {x}"):
        result.get(timeout=GET)
    assert runs(sg, "grid.flaky", m.memo_fail.key(x)) == 1


@pytest.mark.invariant1
def test_send_task_of_a_request_in_flight_joins_it(sg, plain):
    """A request running on one executor, sent by name, is answered under the message's id
    when that run ends, by the other executor, without a second run."""
    m, t = sg.app_module, tag()
    key = m.gated.key(t)
    first = m.gated.delay(t)
    wait_state(sg, key, "running")
    result = plain.send_task("grid.gated", (t,))
    received = f"Task grid.gated[{result.id}] received"
    wait_until(lambda: received in sg.node.output(), 10, "the other executor to take the message")
    with pytest.raises(CeleryTimeout):  # not answered while the run goes on
        result.get(timeout=1)
    open_gate(sg, t)
    assert result.get(timeout=GET) == t
    assert first.get(timeout=GET) == t
    assert runs(sg, "grid.gated", key) == 1
    assert runs(sg, "grid.gated", result.id) == 0
