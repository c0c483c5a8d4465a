"""A state store that may evict girder's keys (issue 11, item 4): a worker warns as it starts.

An evicted running record makes its request run twice (invariant 1), so a worker reads the
store's ``maxmemory-policy`` at start and warns, naming the policy, what it puts at risk and what
to set instead; a store that refuses to say (an ACL, a managed Redis) is logged, never fatal.
The policies are tried on a private ``redis-server``, and end to end with real workers; and a
store that does evict (maxmemory, allkeys-random, filled until a running record goes) still
answers its caller.
"""

from __future__ import annotations

import logging
import threading
import time

import pytest
import redis
from celery import Celery

from girder_celery import Girder, GirderConnectionError, GirderError
from girder_celery.testing import RedisServer
from girder_celery.worker import check_eviction
from tests.core_support import open_gate, runs, tag
from tests.harness import Grid, wait_until

pytestmark = pytest.mark.faults

URL = "redis://store.example:6379/0"


@pytest.fixture(scope="module")
def server():
    s = RedisServer().start()
    yield s
    s.close()


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "girder_celery.worker" and r.levelno == logging.WARNING]


@pytest.mark.parametrize("policy", ["allkeys-lru", "allkeys-lfu", "allkeys-random"])
def test_an_allkeys_policy_warns_that_a_running_record_may_be_evicted(server, caplog, policy):
    """allkeys-* warns: any key, a running request's record too (it would run twice); set noeviction."""
    client = server.client()
    client.config_set("maxmemory-policy", policy)
    client.config_set("maxmemory", "100mb")
    check_eviction(client, URL)
    (warning,) = warnings_of(caplog)
    assert f"the state store {URL} has maxmemory-policy {policy}" in warning
    assert "when it reaches maxmemory (104857600 bytes)" in warning
    assert "a running request's record too: that request then runs twice" in warning
    assert "Set maxmemory-policy noeviction" in warning and "a Redis server of its own" in warning


@pytest.mark.parametrize("policy", ["volatile-lru", "volatile-lfu", "volatile-random", "volatile-ttl"])
def test_a_volatile_policy_warns_which_of_girders_keys_have_a_ttl(server, caplog, policy):
    """volatile-* warns naming what has a TTL (done values with a result TTL, failures, mailboxes,
    edges) and that queued and running records are never evicted."""
    client = server.client()
    client.config_set("maxmemory-policy", policy)
    client.config_set("maxmemory", "0")
    check_eviction(client, URL)
    (warning,) = warnings_of(caplog)
    assert (
        f"maxmemory-policy {policy}: once a maxmemory is set Redis may evict girder's keys that have a TTL" in warning
    )
    for at_risk in ("result TTL", "failed records", "mailboxes", "waits-for edges", "queued and running records"):
        assert at_risk in warning


def test_noeviction_does_not_warn(server, caplog):
    """noeviction is safe: no warning."""
    client = server.client()
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", "100mb")
    check_eviction(client, URL)
    assert warnings_of(caplog) == []


def test_a_store_that_refuses_config_is_logged_and_not_fatal(server, caplog):
    """A user whose ACL refuses CONFIG: the check says it could not read the policy, and goes on."""
    caplog.set_level(logging.INFO, logger="girder_celery.worker")
    admin = server.client()
    admin.acl_setuser("girder-no-config", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-config"])
    limited = redis.Redis(port=server.port, username="girder-no-config", password="pw", decode_responses=True)
    check_eviction(limited, URL)
    assert warnings_of(caplog) == []
    assert "could not read the state store's maxmemory-policy" in caplog.text and "noeviction" in caplog.text


def eviction_warnings(worker) -> list[str]:
    return [line for line in worker.output().splitlines() if "maxmemory-policy" in line]


def test_a_worker_on_an_allkeys_lru_store_warns_in_its_log():
    """A real worker whose state store runs with --maxmemory-policy allkeys-lru logs the warning."""
    evicting = RedisServer(args=["--maxmemory-policy", "allkeys-lru"]).start()
    grid = Grid(evicting, "redis")
    try:
        grid.load_app()
        worker = grid.worker("evict", "solo", 1)
        (line,) = eviction_warnings(worker)
        assert "WARNING" in line and "has maxmemory-policy allkeys-lru" in line and "noeviction" in line
    finally:
        grid.close()
        evicting.close()


def test_a_worker_on_a_noeviction_store_does_not_warn(redis_server):
    """A real worker whose state store has the default noeviction logs no eviction warning."""
    grid = Grid(redis_server, "redis")
    try:
        grid.load_app()
        worker = grid.worker("safe", "solo", 1)
        assert "girder: state store" in worker.output()  # the start-up check ran
        assert eviction_warnings(worker) == []
    finally:
        grid.close()


def test_a_store_that_evicts_a_running_record_still_answers_the_right_value(redis_server):
    """A state store under maxmemory with allkeys-random evicts girder's keys while a request runs
    (its record among them): the caller still gets the request's value, and the node serves on.
    An evicted running record explains one more run of the request, no more."""
    evicting = RedisServer(args=["--maxmemory", "8mb", "--maxmemory-policy", "allkeys-random"]).start()
    # Broker, result backend, run counters and gates stay on a server that keeps them.
    grid = Grid(redis_server, "redis", check=0.5, store_url=evicting.url(0))
    answers: list = []
    try:
        m = grid.load_app()
        worker = grid.worker("evicted", "solo", 1)
        t, store = tag(), m.girder.store
        record_key = store.record_key(m.gated.key(t))
        caller = threading.Thread(target=lambda: answers.append(_outcome(m.girder.request, m.gated.s(t), timeout=60)))
        caller.start()
        wait_until(lambda: store.client.hget(record_key, "state") == "running", 10, "the request to run")
        evicted = _fill_until_gone(evicting, store.client, record_key)
        assert evicted, "the running record was never evicted"
        evicting.client(3).flushdb()  # room again, for girder's own writes
        open_gate(grid, t)
        caller.join(30)
        assert answers == [t], str(answers[0])
        assert 1 <= runs(grid, "grid.gated", m.gated.key(t)) <= 2
        assert worker.proc.poll() is None
        assert m.girder.request(m.add.s(7, 1), timeout=20) == 8
    finally:
        grid.kill()
        grid.close()
        evicting.close()


def _fill_until_gone(server: RedisServer, client: redis.Redis, record_key: str, most_mb: int = 400) -> bool:
    """Write 64 KiB values to database 3 (the evictions go round the databases, so girder's keys
    in database 0 go at half their rate) until the running record is gone or re-queued, at most
    ``most_mb``: whether it went."""
    filler, blob = server.client(3), "x" * 65536
    for i in range(most_mb * 16):
        filler.set(f"fill:{i}", blob)
        if client.hget(record_key, "state") != "running":
            return True
    return False


def _outcome(call, *args, **kwargs):
    try:
        return call(*args, **kwargs)
    except Exception as exc:  # handed to the test's thread
        return exc


def test_a_full_store_that_evicts_nothing_is_a_clear_error_at_once():
    """A store at maxmemory under noeviction refuses girder's writes: the caller gets a GirderError
    saying the store is full and naming it, at once, instead of Redis's raw OOM error or a hang."""
    server = RedisServer().start()
    try:
        client = server.client()
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", str(int(client.info("memory")["used_memory"]) + 2 * 1024 * 1024))
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            for i in range(1000):  # at most ~100 MB: the limit is a couple of MB away
                client.set(f"filler:{i}", "x" * 100_000)
        app = Celery("full-store", broker="memory://", set_as_current=False)
        girder = Girder(app, url=server.url(0))

        @girder.task(name="full_store.add")
        def add(x, y):
            return x + y

        started = time.monotonic()
        with pytest.raises(
            GirderError,
            match=r"state store at redis://127\.0\.0\.1:\d+/0 is full: command not allowed when used memory",
        ) as caught:
            girder.request(add.s(1, 2), timeout=30)
        assert time.monotonic() - started < 5
        assert not isinstance(caught.value, GirderConnectionError)  # trying again at once cannot help
    finally:
        server.close()
