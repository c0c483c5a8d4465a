"""Broker faults: offers lost with requests queued (invariant 1: a broker message is only an offer,
and a lost one is recovered by whoever waits for it, after ``girder_reoffer_after``).

A private Redis broker is killed and restarted empty; on RabbitMQ the grid's queue is purged
instead. The suite cannot restart the machine's RabbitMQ, which other grids share: a real
RabbitMQ restart (connections dropped, non-durable queues gone) is not tested here.

Each test runs one single-executor node with request A (``grid.gated``) running and three requests
(``grid.add``) queued behind it when their offers are lost; ``girder_reoffer_after`` is short
(``REOFFER``), so their waiters offer them again soon. Every caller must get its value within the
bound, every function run once, and the node serve afterwards.
"""

from __future__ import annotations

import time
import uuid

import pytest
from kombu import Connection

from girder_celery.testing import AMQP_URL
from tests.faults.support import answer, assert_runs, assert_serving, record, runs, tag
from tests.harness import wait_until

pytestmark = pytest.mark.faults

LEASE, CHECK, REOFFER = 1.0, 0.5, 2.0
#: From the loss of the offers to every answer: the re-offer, a check or two, and the node's
#: reconnection to a restarted broker (Celery's first retry comes 2 s after it notices).
BOUND = REOFFER + 2 * CHECK + 5.0
QUEUED = 3


class Backlog:
    """Request A running on the grid's only node, ``QUEUED`` requests offered behind it."""

    def __init__(self, grid, callers) -> None:
        m = grid.app_module
        self.grid, self.a = grid, tag()
        self.a_key = m.gated.key(self.a)
        self.xs = [int(uuid.uuid4().int % 10**9) for _ in range(QUEUED)]
        self.keys = [m.add.key(x, 1) for x in self.xs]
        self.fa = callers.call(m.girder.request, m.gated.s(self.a), BOUND + 20)
        wait_until(lambda: runs(grid, "grid.gated", self.a_key) == 1, 20, "A to start")
        self.fs = [callers.call(m.girder.request, m.add.s(x, 1), BOUND + 20) for x in self.xs]
        wait_until(lambda: all(record(grid, k).get("state") == "queued" for k in self.keys), 10, "the backlog")

    def after_loss(self, lost_at: float) -> float:
        """Every caller answered right within ``BOUND``, each function run once; how long after
        the loss the last answer came."""
        self.grid.redis_server.client().rpush(self.grid.app_module.gate_key(self.a), "open")
        assert answer(self.fa, 60)[0] == self.a
        done = [answer(f, 60) for f in self.fs]
        assert [v for v, _ in done] == [x + 1 for x in self.xs]
        recovered = max(t for _, t in done) - lost_at
        assert recovered < BOUND, f"answered {recovered:.2f}s after the offers were lost (bound {BOUND}s)"
        assert_runs(self.grid, {("grid.gated", self.a_key): (1, 1), **{("grid.add", k): (1, 1) for k in self.keys}})
        return recovered


@pytest.mark.invariant1
def test_a_redis_broker_restarted_empty_with_requests_queued(make_fault_grid, private_redis, callers, figures):
    """The grid's Redis broker killed and restarted empty with offers queued: the waiters offer
    again, and every request runs once."""
    broker = private_redis()
    grid = make_fault_grid("redis", lease=LEASE, check=CHECK, broker_server=broker, reoffer=REOFFER)
    node = grid.worker("n1", "solo", 1)
    assert_serving(grid, [node])
    backlog = Backlog(grid, callers)
    queue = broker.client(1)
    wait_until(lambda: queue.llen(grid.queue) == QUEUED, 10, "the offers on the broker")
    broker.stop()
    broker.start()
    lost_at = time.monotonic()
    assert queue.llen(grid.queue) == 0  # the offers are gone

    figures.add("redis broker restarted empty -> answer", backlog.after_loss(lost_at))
    assert_serving(grid, [node])


def ready_messages(queue: str) -> int:
    with Connection(AMQP_URL, connect_timeout=5) as conn:
        return conn.default_channel.queue_declare(queue, passive=True).message_count


@pytest.mark.invariant1
def test_the_rabbitmq_queue_purged_with_requests_queued(make_fault_grid, callers, figures):
    """The grid's RabbitMQ queue purged with offers queued (what a restart would lose): the
    waiters offer again, and every request runs once."""
    grid = make_fault_grid("amqp", lease=LEASE, check=CHECK, reoffer=REOFFER)
    node = grid.worker("n1", "solo", 1)
    assert_serving(grid, [node])
    backlog = Backlog(grid, callers)
    wait_until(lambda: ready_messages(grid.queue) == QUEUED, 10, "the offers on RabbitMQ")
    with Connection(AMQP_URL, connect_timeout=5) as conn:
        assert conn.default_channel.queue_purge(grid.queue) == QUEUED
    lost_at = time.monotonic()

    figures.add("rabbitmq queue purged -> answer", backlog.after_loss(lost_at))
    assert_serving(grid, [node])
