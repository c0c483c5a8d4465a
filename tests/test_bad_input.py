"""Bad input, one test each: unsupported arguments, a result that is not JSON, a task the worker
does not have, an unreachable state store, a request nobody serves, and API misuse.

Each is refused or reported with a clear error, quickly, and leaves nothing behind.
"""

from __future__ import annotations

import re
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from celery import Celery

from girder_celery import Girder, GirderConnectionError, GirderError, GirderTimeout
from girder_celery.testing import free_port
from tests.core_support import (
    concurrent_failures,
    drain_ids,
    open_gate,
    received,
    record,
    runs,
    store_keys,
    tag,
    wait_state,
    waiters,
)
from tests.harness import wait_until


class Opaque:
    pass


def closed_port_url(password: str = "") -> str:
    auth = f":{password}@" if password else ""
    return f"redis://{auth}127.0.0.1:{free_port()}/0"


def offline(url: str, **conf):
    """A Girder with one task on an app whose broker is in memory: nothing leaves the process."""
    app = Celery(f"bad-{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
    app.conf.update(conf)
    girder = Girder(app, url=url)

    @girder.task(name="bad.add")
    def add(x, y=0):
        return x + y

    return girder, add


# -- refused at the call site, before anything is sent ----------------------------------------


@pytest.mark.invariant6
def test_unsupported_arguments_are_refused_before_anything_is_sent(grid):
    """Every entry point refuses an unsupported argument, naming its path, before anything is sent (invariant 6)."""
    m = grid.app_module
    bad = {"a": [1, 2, Opaque()]}
    path = re.escape("args[0]['a'][2]")
    attempts = [
        lambda: m.add.call(bad),
        lambda: m.add.delay(bad),
        lambda: m.add.apply_async((bad,)),
        lambda: m.add.s(bad).delay(),
        lambda: m.girder.request(m.add.s(bad), timeout=1),
        lambda: m.girder.requests([m.add.s(1, 2), m.add.s(bad)], timeout=1),  # nothing of the batch goes
    ]
    for attempt in attempts:
        with pytest.raises(TypeError, match=path):
            attempt()
    with pytest.raises(TypeError, match=re.escape("kwargs['z'][0]")):
        m.echo.call(1, z=[{1, 2}])
    with pytest.raises(TypeError, match=re.escape("args[0]")):
        m.add.delay({(1, 2): "a tuple key"})
    assert store_keys(grid) == []
    sentinel = m.echo.delay("sentinel", tag())
    assert drain_ids(grid, grid.queue, sentinel.id) == []


@pytest.mark.invariant6
def test_a_call_that_does_not_fit_the_function_is_refused_before_anything_is_sent(grid):
    """A call that does not fit the function gets no key and is refused before anything is sent."""
    m = grid.app_module
    with pytest.raises(TypeError, match="grid.add"):
        m.add.call(1, 2, 3)
    with pytest.raises(TypeError, match="grid.add"):
        m.add.delay(z=1)
    with pytest.raises(TypeError, match="grid.add"):
        m.girder.request(m.add.s(), timeout=1)
    assert store_keys(grid) == []
    sentinel = m.echo.delay("sentinel", tag())
    assert drain_ids(grid, grid.queue, sentinel.id) == []


def test_api_misuse_is_refused_before_the_store_is_touched():
    """Bad timeouts, pools, signatures, keys, queues and limits are refused before the store is touched."""
    girder, add = offline(closed_port_url())
    for bad_timeout in (0, -1, True, "5"):
        with pytest.raises(ValueError, match="timeout"):
            girder.request(add.s(1), timeout=bad_timeout)
    with pytest.raises(TypeError, match="pool"):
        girder.request(add.s(1), pool="")
    with pytest.raises(TypeError, match="iterable of signatures"):
        girder.requests(add.s(1))
    with pytest.raises(TypeError, match="signature"):
        girder.request(add)

    @girder.app.task(name="bad.plain", shared=False)
    def plain():
        return 1

    with pytest.raises(TypeError, match="not a girder task"):
        girder.request(plain.s())
    with pytest.raises(GirderError, match="bad.nothing"):
        girder.request(girder.app.signature("bad.nothing"))
    with pytest.raises(ValueError, match="key"):
        girder.state("0" * 63)
    with pytest.raises(TypeError, match="queue"):
        girder.offers("")
    for bad_limit in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="limit"):
            girder.offers("q", bad_limit)


# -- reported by the worker --------------------------------------------------------------------


@pytest.mark.invariant7
def test_a_result_that_is_not_json_fails_the_request_for_every_waiter(live):
    """A result that is not JSON fails the request for every waiter in flight (invariant 7)."""
    m = live.app_module
    t = tag()
    key, errors = concurrent_failures(live, t, "set")
    for err in errors:
        assert isinstance(err, GirderError) and not isinstance(err, GirderTimeout), err
        assert err.key == key and err.request == f"grid.gated({t!r}, 'set')"
        assert "not JSON-serializable" in err.message and "set" in err.message
    assert runs(live, "grid.gated", key) == 1
    assert record(live, key)["state"] == "failed"
    # the plain case, and the worker still serves
    with pytest.raises(GirderError, match="not JSON-serializable"):
        m.unserializable.call(t)
    assert m.girder.request(m.add.s(1, 2), timeout=10) == 3


def test_a_task_the_worker_does_not_have_fails_fast_naming_it(live):
    """A request of a task the worker lacks fails fast with NotRegistered, naming the task and node."""
    m = live.app_module
    name = f"grid.only_here_{tag()}"

    @m.girder.task(name=name)
    def only_here(x):
        return x

    started = time.monotonic()
    with pytest.raises(GirderError) as info:
        m.girder.request(only_here.s(1), timeout=10)
    assert time.monotonic() - started < 5
    err = info.value
    assert not isinstance(err, GirderTimeout)
    assert err.key == only_here.key(1)
    assert name in str(err) and err.exc_type == "celery.exceptions.NotRegistered"
    assert live.node.hostname in err.message
    assert m.girder.state(only_here.s(1))["state"] == "failed"
    assert m.girder.request(m.add.s(2, 2), timeout=10) == 4  # the worker is fine


@pytest.mark.invariant1
def test_a_message_of_an_unknown_task_does_not_fail_a_request_running_elsewhere(live):
    """A copy of an offer reaching a node without the task (a node of an older deploy, a
    hoisted copy) must not change the outcome of a request a live executor is running (invariant 1)."""
    m = live.app_module
    t = tag()
    key = m.gated.key(t)
    m.gated.delay(t)
    wait_state(live, key, "running")
    with ThreadPoolExecutor(1) as pool:
        waiter = pool.submit(m.girder.request, m.gated.s(t), 15)
        wait_until(lambda: len(waiters(live, key)) == 1, 10, "the waiter to register")
        m.app.send_task("grid.renamed_in_a_later_deploy", (t,), task_id=key)
        sentinel = m.echo.delay("sentinel", tag())
        if live.pool == "solo":  # its only executor is busy: the copy is handled after the run
            open_gate(live, t)
        # the consumer handles messages in order: once the sentinel is in, the copy was handled
        wait_until(lambda: received(live.node, sentinel.id), 10, "the worker to handle the copy")
        state_after_copy = record(live, key)["state"]
        open_gate(live, t)
        value = waiter.result(timeout=15)
    assert state_after_copy in ("running", "done")
    assert value == t
    assert m.girder.request(m.gated.s(t), timeout=5) == t


# -- the state store cannot be reached --------------------------------------------------------


def test_an_unreachable_store_is_a_fast_clear_error_naming_the_url():
    """Every call on an unreachable store raises GirderConnectionError naming the URL, within 2 s."""
    url = closed_port_url()
    girder, add = offline(url)
    calls = {
        "call": lambda: add.call(1, 2),
        "request": lambda: girder.request(add.s(1, 2), timeout=5),
        "requests": lambda: girder.requests([add.s(1, 2)]),
        "delay": lambda: add.delay(1, 2),
        "state": lambda: girder.state(add.s(1, 2)),
        "forget": lambda: girder.forget(add.s(1, 2)),
        "offers": lambda: girder.offers("q"),
    }
    for what, call in calls.items():
        started = time.monotonic()
        with pytest.raises(GirderConnectionError) as info:
            call()
        assert time.monotonic() - started < 2, what
        assert info.value.url == url and url in str(info.value), what
        assert isinstance(info.value, ConnectionError)


def test_an_unreachable_store_error_hides_the_password():
    """The unreachable-store error shows the URL with its password masked."""
    url = closed_port_url(password="hunter2")
    girder, add = offline(url)
    with pytest.raises(GirderConnectionError) as info:
        add.call(1)
    assert "hunter2" not in str(info.value) and "hunter2" not in info.value.url
    assert ":***@127.0.0.1" in str(info.value)


def test_a_url_that_is_not_redis_is_a_clear_error_naming_it():
    """girder_url pointing at another service (here one answering HTTP) is reported as such,
    naming the URL, not as a bare protocol error from the Redis client."""
    server = socket.create_server(("127.0.0.1", 0))
    url = f"redis://127.0.0.1:{server.getsockname()[1]}/0"
    done = threading.Event()

    def serve():
        server.settimeout(0.2)
        while not done.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    girder, add = offline(url)
    try:
        started = time.monotonic()
        with pytest.raises(GirderError) as info:
            add.call(1)
        assert time.monotonic() - started < 3
        assert url in str(info.value)
    finally:
        done.set()
        thread.join(5)
        server.close()


# -- nobody serves the request ------------------------------------------------------------------


def test_a_request_no_worker_serves_times_out_naming_key_and_state(grid):
    """A request nobody serves times out naming key and state, withdraws its waiter and stays queued."""
    m = grid.app_module
    a = uuid.uuid4().int % 10**12
    key = m.add.key(a, 1)
    started = time.monotonic()
    with pytest.raises(GirderTimeout) as info:
        m.girder.request(m.add.s(a, 1), timeout=0.5)
    assert 0.5 <= time.monotonic() - started < 2
    err = info.value
    assert (err.key, err.state, err.request) == (key, "queued", f"grid.add({a}, 1)")
    assert key in str(err) and "queued" in str(err) and "0.5" in str(err)
    assert waiters(grid, key) == set()  # withdrawn
    assert record(grid, key)["state"] == "queued"  # still offered: a worker may come later
