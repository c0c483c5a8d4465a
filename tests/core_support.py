"""Helpers of the core suite: run counters, bounded waits on the store, and broker inspection.

Every wait here is bounded and polls Redis or the broker for the event it names; nothing sleeps
a fixed time in place of an event. Redis key names come from the state store's own key methods
(``record_key``, ``waiters_key`` ...), never spelled out here.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import redis
from kombu import Connection

from girder_celery.store import StateStore
from girder_celery.worker import Hoister
from tests.harness import Grid, wait_until


def runs(grid: Grid, task_name: str, key: str) -> int:
    """How many times the function of ``key`` ran (``count_run`` in tests/gridapp.py)."""
    return int(grid.redis_server.client().get(grid.app_module.runs_key(task_name, key)) or 0)


def store(grid: Grid) -> StateStore:
    """The state store of the grid's app: its key methods name the Redis keys tests read."""
    return grid.app_module.girder.store


def record(grid: Grid, key: str) -> dict[str, str]:
    """The request record of ``key`` (empty if absent)."""
    return store(grid).client.hgetall(store(grid).record_key(key))


def waiters(grid: Grid, key: str) -> set[str]:
    """The mailboxes registered as waiters on ``key``."""
    return store(grid).client.smembers(store(grid).waiters_key(key))


def store_keys(grid: Grid) -> list[str]:
    """Every request record under the grid's prefix."""
    return list(store(grid).client.scan_iter(store(grid).record_key("*")))


def wait_state(grid: Grid, key: str, state: str, timeout: float = 10.0) -> dict[str, str]:
    """Poll the record of ``key`` until its state is ``state``; the record."""
    return wait_until(
        lambda: (rec := record(grid, key)).get("state") == state and rec,
        timeout,
        f"{key} to be {state} (it is {record(grid, key).get('state', 'absent')})",
        step=0.02,
    )


def redis_now_ms(client: redis.Redis) -> int:
    """Redis's clock (TIME), which the scripts use for leases and timestamps."""
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def wait_redis_past(client: redis.Redis, ms: int, timeout: float = 5.0) -> None:
    """Wait until Redis's clock is past ``ms`` (a lease or an offer time has expired)."""
    wait_until(lambda: redis_now_ms(client) > ms, timeout, f"redis time past {ms}", step=0.01)


def open_gate(grid: Grid, tag: str, times: int = 1) -> None:
    """Let ``times`` runs of ``grid.gated(tag, ...)`` finish."""
    grid.redis_server.client().rpush(grid.app_module.gate_key(tag), *["open"] * times)


def tag() -> str:
    return uuid.uuid4().hex[:10]


def concurrent_failures(grid: Grid, t: str, outcome: str, n: int = 3) -> tuple[str, list[BaseException | None]]:
    """``n`` callers request ``grid.gated(t, outcome)`` at once; once all ``n`` are registered
    as waiters its gate opens. The request's key, and what each caller's request raised."""
    m = grid.app_module
    key = m.gated.key(t, outcome)
    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(m.girder.request, m.gated.s(t, outcome), 15) for _ in range(n)]
        wait_until(lambda: len(waiters(grid, key)) == n, 10, f"{n} waiters registered")
        open_gate(grid, t)
        return key, [f.exception(timeout=15) for f in futures]


def broker_url(grid: Grid) -> str:
    return grid.env["GIRDER_TEST_BROKER"]


def dead_queue(grid: Grid) -> str:
    """A queue name no worker consumes; ``forget_queue`` deletes it afterwards."""
    return f"{grid.queue}-dead-{uuid.uuid4().hex[:6]}"


def drain_ids(grid: Grid, queue: str, until_id: str, timeout: float = 10.0) -> list[str]:
    """Take the messages off ``queue`` (no worker consumes it) until the one whose task id is
    ``until_id`` arrives; the task ids of the messages before it, in order.

    Publish a sentinel after the calls under test and drain up to it: a message those calls
    published would be on the queue before the sentinel, on either broker.
    """
    ids: list[str] = []
    deadline = time.monotonic() + timeout
    with Connection(broker_url(grid), connect_timeout=5) as conn:
        channel = conn.channel()
        while True:
            try:
                message = channel.basic_get(queue, no_ack=True)
            except Exception:  # RabbitMQ: the queue does not exist yet (404 closes the channel)
                message = None
                channel = conn.channel()
            if message is not None:
                task_id = message.headers.get("id")
                if task_id == until_id:
                    return ids
                ids.append(task_id)
                continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"sentinel {until_id} never reached {queue}; got {ids}")
            time.sleep(0.02)


def forget_queue(grid: Grid, queue: str) -> None:
    """Delete a queue made by a test (RabbitMQ keeps it; a Redis list is just deleted)."""
    try:
        with Connection(broker_url(grid), connect_timeout=2) as conn:
            conn.default_channel.queue_delete(queue)
    except Exception:
        pass


@contextmanager
def hoister_loop(grid: Grid, offers, first: float) -> Iterator[tuple[str, str]]:
    """The ``Hoister`` bootstep's loop in a thread, minus the worker, over two dead queues
    ``(source, destination)``, its first wait ``first`` s; stopped, joined and the queues deleted
    on exit. ``offers`` is the app's ``Offers``, or what stands in for it (``hoist``, ``hoist_now``)."""
    source, destination = dead_queue(grid), dead_queue(grid)
    hoister = Hoister.__new__(Hoister)
    hoister.stopping, hoister.wake = threading.Event(), offers.hoist_now
    loop = threading.Thread(target=hoister._run, args=(offers, [source, destination], first), daemon=True)
    loop.start()
    try:
        yield source, destination
    finally:
        hoister.stop(None)
        loop.join(5)
        forget_queue(grid, source)
        forget_queue(grid, destination)
    assert not loop.is_alive()


def received(worker, key: str) -> int:
    """How many messages with task id ``key`` the worker's consumer received (its log)."""
    return worker.output().count(f"[{key}] received")


def skipped(worker, task_name: str, key: str) -> list[str]:
    """The verdicts of the offers of ``key`` the worker skipped without running the function."""
    return re.findall(rf"skipping offer of {re.escape(task_name)}\[{key}\]: (\w+)", worker.output())
