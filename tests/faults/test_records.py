"""Corrupt state records (issue 11, hole 4): each reaches the caller as a ``GirderError`` naming the
key and what is wrong, ``girder.forget`` clears it, and the next request computes the right value.

Each corruption is planted with a plain Redis client on the grid's state store, at the name the
store's own ``record_key`` gives. A grid of one solo worker on the Redis broker serves the module
(the broker plays no part in a record's corruption); each test uses arguments of its own.
"""

from __future__ import annotations

import logging
import threading

import pytest

from girder_celery import GirderError
from girder_celery.errors import CORRUPT
from tests.core_support import dead_queue, drain_ids, forget_queue, hoister_loop, open_gate, runs, tag
from tests.harness import Grid, repointed, wait_until
from tests.test_cli import celery

pytestmark = pytest.mark.faults

PAYLOAD = "[[1,1],{}]"


def _hash(**fields: str):
    return lambda client, record_key: client.hset(record_key, mapping=fields)


#: name -> (how to plant it on the record's key, what the error says, whether ``state()`` refuses it)
CORRUPTIONS = {
    "value not JSON": (_hash(state="done", value="{oops"), "its value is not JSON", False),
    "error not JSON": (_hash(state="failed", memo="1", error="<html>"), "its error is not a girder error", False),
    "error not an object": (_hash(state="failed", memo="1", error="[1, 2]"), "its error is not a girder error", False),
    "a string": (lambda client, record_key: client.set(record_key, "x"), "its key holds a string, not a hash", True),
    "a list": (lambda client, record_key: client.rpush(record_key, "a"), "its key holds a list, not a hash", True),
    "lease not a number": (
        _hash(state="running", owner="n/1/a", lease_until="soon", payload=PAYLOAD),
        "its lease_until is not a number: soon",
        True,
    ),
    "offered_at not a number": (
        _hash(state="queued", offered_at="later", payload=PAYLOAD),
        "its offered_at is not a number: later",
        True,
    ),
    "unknown state": (_hash(state="paused", payload=PAYLOAD), "its state is unknown: paused", True),
}


@pytest.fixture(scope="module")
def _node_grid(redis_server):
    g = Grid(redis_server, "redis")
    g.load_app()
    g.worker("rec", "solo", 1)
    yield g
    g.kill()
    g.close()


@pytest.fixture
def grid(_node_grid):
    """The module's grid, ``tests.gridapp`` re-pointed at it if another grid reconfigured it."""
    return repointed(_node_grid)


_numbers = iter(range(10**6, 10**7))


def planted(grid: Grid, case: str, *args) -> tuple[str, str]:
    """Plant corruption ``case`` on the record of ``grid.add(*args)``: its key and record key."""
    m = grid.app_module
    key = m.add.key(*args)
    record_key = m.girder.store.record_key(key)
    CORRUPTIONS[case][0](grid.redis_server.client(), record_key)
    return key, record_key


def assert_names(err: GirderError, key: str, what: str) -> None:
    text = str(err)
    assert (err.key, err.exc_type) == (key, CORRUPT), text
    assert key in text and what in text and "is corrupt" in text, text


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_a_corrupt_record_is_a_girder_error_forget_clears_it_and_the_next_request_computes_it(grid, case):
    """call, request, delay and state of a corrupt record raise a GirderError naming the key and
    what is wrong; forget clears it and the next request computes the right value, once."""
    m, x = grid.app_module, next(_numbers)
    key, record_key = planted(grid, case, x, 1)
    what, state_refuses = CORRUPTIONS[case][1], CORRUPTIONS[case][2]
    for attempt in (lambda: m.add.call(x, 1), lambda: m.girder.request(m.add.s(x, 1), timeout=20)):
        with pytest.raises(GirderError) as info:
            attempt()
        assert_names(info.value, key, what)
        assert f"grid.add({x}, 1)" in str(info.value)
    with pytest.raises(GirderError) as info:
        m.add.delay(x, 1)
    assert_names(info.value, key, what)
    if state_refuses:
        with pytest.raises(GirderError) as info:
            m.girder.state(key)
        assert_names(info.value, key, what)
    assert m.girder.forget(key) is True
    assert not grid.redis_server.client().exists(record_key)
    assert m.girder.request(m.add.s(x, 1), timeout=20) == x + 1
    assert runs(grid, "grid.add", key) == 1


def test_a_corrupt_payload_fails_its_waiters_naming_the_key_and_the_next_request_rewrites_it(grid):
    """A queued record whose payload is not JSON: the worker that claims it does not run it but
    fails it with a GirderError naming the key, and the next request computes the value, once."""
    m, x = grid.app_module, next(_numbers)
    key = m.add.key(x, 1)
    fields = {"state": "queued", "offered_at": "0", "payload": "{oops", "name": "grid.add", "pool": ""}
    grid.redis_server.client().hset(m.girder.store.record_key(key), mapping=fields)
    with pytest.raises(GirderError) as info:
        m.girder.request(m.add.s(x, 1), timeout=20)
    assert_names(info.value, key, "its payload is not the arguments girder writes")
    assert runs(grid, "grid.add", key) == 0
    assert m.girder.request(m.add.s(x, 1), timeout=20) == x + 1
    assert runs(grid, "grid.add", key) == 1


def test_the_hoister_skips_a_corrupt_payload_and_copies_the_other_offers(grid):
    """A hoisting pass meeting an offer whose record's payload does not decode copies the other
    offers up a tier all the same."""
    m, x = grid.app_module, next(_numbers)
    offers, store, client = m.girder.runtime.offers, m.girder.store, grid.redis_server.client()
    source, destination = dead_queue(grid), dead_queue(grid)
    try:
        good = m.add.prepare((x, 1), {}, source)
        offers.submit([good], "", offer=False)
        bad = m.add.key(x, 2)
        fields = {"state": "queued", "offered_at": "0", "payload": "{", "name": "grid.add"}
        client.hset(store.record_key(bad), mapping=fields)
        client.zadd(store.offers_key(source), {bad: 0, good.key: 1})  # the corrupt one first, both due
        offers.hoist([source, destination])
        sentinel = m.echo.apply_async(("sentinel", tag()), queue=destination)
        assert drain_ids(grid, destination, sentinel.id) == [good.key]
    finally:
        forget_queue(grid, source)
        forget_queue(grid, destination)


def test_offers_hoisted_early_are_copied_at_once_not_at_the_hoisters_next_tick(grid):
    """A waiter that hoists offers early (Offers.hoist_early) wakes its process's hoister: a
    hoister that passes every 60 s copies them up a tier at once."""
    m = grid.app_module
    offers = m.girder.runtime.offers
    with hoister_loop(grid, offers, 60.0) as (source, destination):
        fresh = m.add.prepare((next(_numbers), 1), {}, source)
        offers.submit([fresh], "", offer=False)  # recorded on source, not yet due for a minute
        offers.hoist_early(source, [fresh.key])
        assert drain_ids(grid, destination, fresh.key, timeout=10) == []  # its copy, well within a minute
        assert m.girder.store.record(fresh.key)["hoists"] == "1"


def test_requests_with_return_exceptions_put_the_corrupt_records_error_in_its_place(grid):
    """requests(return_exceptions=True): a corrupt record's GirderError takes its place, the
    other request answers its value."""
    m, x = grid.app_module, next(_numbers)
    key, _ = planted(grid, "a string", x, 1)
    bad, good = m.girder.requests([m.add.s(x, 1), m.add.s(x, 2)], timeout=20, return_exceptions=True)
    assert isinstance(bad, GirderError)
    assert_names(bad, key, "not a hash")
    assert good == x + 2


def test_a_corrupt_sub_request_fails_its_requester_with_the_corrupt_error_as_cause(grid):
    """A task whose sub-request's record is corrupt fails, its chain naming the corrupt key;
    once forgotten, the sub-request runs (and here fails its own way, ZeroDivisionError)."""
    m, x = grid.app_module, next(_numbers)
    sub = m.divide.key(x, 0)
    grid.redis_server.client().set(m.girder.store.record_key(sub), "x")
    with pytest.raises(GirderError) as info:
        m.girder.request(m.outer_divide.s(x), timeout=20)
    corrupt = info.value.chain()[1]
    assert_names(corrupt, sub, "its key holds a string")
    assert runs(grid, "grid.divide", sub) == 0
    assert m.girder.forget(sub) is True
    with pytest.raises(GirderError) as info:
        m.girder.request(m.outer_divide.s(x), timeout=20)
    assert info.value.chain()[-1].exc_type == "ZeroDivisionError"
    assert runs(grid, "grid.divide", sub) == 1


def test_the_cli_reports_a_corrupt_record_and_forgets_it(grid):
    """celery girder state of a corrupt record exits with its error, not a traceback; celery girder
    forget clears it, and the next request computes the value."""
    m, x = grid.app_module, next(_numbers)
    key, record_key = planted(grid, "lease not a number", x, 1)
    out = celery(grid.env, "state", key)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    assert key in out.stderr and "its lease_until is not a number: soon" in out.stderr
    out = celery(grid.env, "forget", key)
    assert (out.returncode, out.stdout.strip()) == (0, f"forgot {key}"), out.stderr
    assert not grid.redis_server.client().exists(record_key)
    assert m.girder.request(m.add.s(x, 1), timeout=20) == x + 1


def test_forget_leaves_a_sound_request_in_flight_alone(grid):
    """forget refuses a running request whose record is sound: its waiters are owed an answer."""
    m, t = grid.app_module, tag()
    key = m.gated.key(t)
    result = m.gated.delay(t)
    wait_until(lambda: m.girder.state(key)["state"] == "running", 10, f"{key} to run")
    assert m.girder.forget(key) is False
    open_gate(grid, t)
    assert result.get(timeout=20) == t


def test_a_mailbox_entry_girder_never_writes_is_skipped_and_the_caller_gets_the_value(grid, caplog):
    """Entries pushed into a waiter's mailbox that girder never writes are logged and skipped;
    the caller still gets the request's value."""
    caplog.set_level(logging.WARNING, logger="girder_celery.store")
    m, t = grid.app_module, tag()
    key, client, answers = m.gated.key(t), grid.redis_server.client(), []
    caller = threading.Thread(target=lambda: answers.append(_outcome(m.girder.request, m.gated.s(t), timeout=30)))
    caller.start()
    mailboxes = wait_until(lambda: client.smembers(m.girder.store.waiters_key(key)), 10, "the caller to register")
    mailbox = next(iter(mailboxes))
    client.rpush(mailbox, "garbage", f"bogus:{key}:1")
    wait_until(lambda: client.llen(mailbox) == 0, 10, "the caller to pop the entries")
    open_gate(grid, t)
    caller.join(30)
    assert answers == [t]
    assert "skipped an entry of mailbox" in caplog.text and "garbage" in caplog.text


def _outcome(call, *args, **kwargs):
    try:
        return call(*args, **kwargs)
    except Exception as exc:  # handed to the test's thread
        return exc
