"""The test grid, and a bounded poll for the waits no event exists for.

No fakes: each test session runs its own ``redis-server`` on a free port (so tests may kill and
restart it), workers are ``celery -A tests.gridapp worker`` subprocesses started by
``girder_celery.testing.LocalGrid``, and brokers are that Redis or the machine's RabbitMQ
(``$GIRDER_TEST_AMQP_URL``), each grid with a queue and key prefix of its own.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

from girder_celery.testing import AMQP_URL, QUIET_FLAGS, LocalGrid, RedisServer

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


def repointed(grid: Grid) -> Grid:
    """``grid``, with ``tests.gridapp`` re-pointed at it if another grid reconfigured it since (for
    a module-scoped grid's tests)."""
    if os.environ.get("GIRDER_TEST_PREFIX") != grid.key_prefix:
        grid.load_app()
    return grid


class Grid(LocalGrid):
    """One test grid of ``tests.gridapp`` workers: a broker, the state store, a queue and a key prefix.

    ``env`` (``GIRDER_TEST_*``) configures ``tests.gridapp`` identically in the test process
    (``load_app``) and in workers; a test may change it before either. ``worker(name, pool,
    concurrency, *flags)`` adds a real worker. ``store_url`` puts girder's state store elsewhere
    than ``redis_server`` (which keeps the broker, backend, run counters and ready lists), and
    ``backend_url`` Celery's result backend; ``Grid.default_store``, where set, is the state
    store of grids that name none (``tests/test_cluster.py`` runs suites on a Redis Cluster).
    """

    #: The state store of grids that name none; None: ``redis_server``.
    default_store: str | None = None

    def __init__(
        self,
        redis_server: RedisServer,
        broker: str,
        lease: float = 30,
        check: float = 5,
        store_url: str | None = None,
        backend_url: str | None = None,
    ) -> None:
        tag = uuid.uuid4().hex[:8]
        queue, prefix = f"girder-test-{tag}", f"gt-{tag}"
        broker_url = redis_server.url(1) if broker == "redis" else AMQP_URL
        env = {
            "GIRDER_TEST_BROKER": broker_url,
            # The state store may be another server (TLS, an ACL user); run counters stay here.
            "GIRDER_TEST_STORE": store_url or self.default_store or redis_server.url(0),
            "GIRDER_TEST_COUNTERS": redis_server.url(0),
            # Celery's result backend: Redis unless a test gives another (rpc://, db+sqlite://...).
            "GIRDER_TEST_BACKEND": backend_url or redis_server.url(2),
            "GIRDER_TEST_QUEUE": queue,
            "GIRDER_TEST_PREFIX": prefix,
            "GIRDER_TEST_LEASE": str(lease),
            "GIRDER_TEST_CHECK": str(check),
            # Every setting a test may change, at its default: os.environ carries the last grid's.
            "GIRDER_TEST_POOLS": "{}",
            "GIRDER_TEST_VOLUNTEER": "1",
            "GIRDER_TEST_HOIST_AFTER": "0.1",
            "GIRDER_TEST_GRAPH_TTL": "86400",
            "GIRDER_TEST_ACKS_LATE": "0",
            "GIRDER_TEST_REOFFER": "300",
            "GIRDER_TEST_RESULT_EXPIRES": "86400",
            "GIRDER_TEST_SENTINEL_MASTER": "",
            "GIRDER_TEST_SENTINEL_OPTIONS": "{}",
        }
        super().__init__(
            "tests.gridapp", redis_server.url(0), env=env, queue=queue, key_prefix=prefix, broker_url=broker_url,
            flags=["-l", "info", *QUIET_FLAGS], cwd=ROOT,
        )  # fmt: skip
        self.redis_server = redis_server
        self.broker_kind = broker
