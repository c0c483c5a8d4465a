"""Real servers for the tests: a private redis-server and real ``celery worker`` processes.

No fakes: each test session runs its own ``redis-server`` on a free port (so tests may kill and
restart it), workers are ``celery -A tests.gridapp worker`` subprocesses, and brokers are that
Redis or the machine's RabbitMQ (``$GIRDER_TEST_AMQP_URL``), each with queues of its own.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from pathlib import Path

from girder_celery.testing import AMQP_URL, CeleryWorker, RedisServer, delete_amqp_queue

ROOT = Path(__file__).resolve().parent.parent


def wait_until(predicate, timeout: float, what: str, step: float = 0.05):
    """Poll ``predicate`` until truthy, at most ``timeout`` seconds; for waits no event exists for."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


class Grid:
    """One test grid: a broker, a state store, a queue and key prefix, and its workers.

    ``env`` configures ``tests.gridapp`` identically in the test process and in workers.
    """

    def __init__(self, redis_server: RedisServer, broker: str, lease: float = 30, check: float = 5) -> None:
        self.redis_server = redis_server
        self.broker_kind = broker
        tag = uuid.uuid4().hex[:8]
        self.queue = f"girder-test-{tag}"
        self.prefix = f"gt-{tag}"
        broker_url = redis_server.url(1) if broker == "redis" else AMQP_URL
        self.env = {
            "GIRDER_TEST_BROKER": broker_url,
            "GIRDER_TEST_STORE": redis_server.url(0),
            "GIRDER_TEST_BACKEND": redis_server.url(2),
            "GIRDER_TEST_QUEUE": self.queue,
            "GIRDER_TEST_PREFIX": self.prefix,
            "GIRDER_TEST_LEASE": str(lease),
            "GIRDER_TEST_CHECK": str(check),
            # Every setting a test may change, at its default: os.environ carries the last grid's.
            "GIRDER_TEST_POOLS": "{}",
            "GIRDER_TEST_VOLUNTEER": "1",
            "GIRDER_TEST_HOIST_AFTER": "0.1",
            "GIRDER_TEST_ACKS_LATE": "0",
        }
        self.workers: list[Worker] = []
        self.logdir = Path(tempfile.mkdtemp(prefix="girder-workers-"))

    def worker(self, name: str = "w1", pool: str = "prefork", concurrency: int = 2, *extra: str) -> Worker:
        worker = Worker(self, name, pool, concurrency, extra)
        self.workers.append(worker)
        return worker.start()

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.workers.clear()
        if self.broker_kind == "amqp":
            delete_amqp_queue(self.queue)


class Worker(CeleryWorker):
    """A real ``celery -A tests.gridapp worker`` subprocess of a grid."""

    def __init__(self, grid: Grid, name: str, pool: str, concurrency: int, extra: tuple[str, ...]) -> None:
        flags = [
            "-P", pool, "-c", str(concurrency), "-Q", grid.queue, "-l", "info",
            "--without-heartbeat", "--without-mingle", "--without-gossip", *extra,
        ]  # fmt: skip
        hostname = f"{name}-{grid.prefix}@localhost"
        super().__init__("tests.gridapp", hostname, flags, grid.env, grid.logdir / f"{name}.log", ROOT)
        self.grid = grid

    def start(self, timeout: float = 60) -> Worker:
        super().start(self.grid.redis_server.client(), f"{self.grid.prefix}:test:ready", timeout)
        return self
