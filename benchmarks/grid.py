"""A benchmark grid: ``benchmarks.benchapp`` workers on one broker, with a fresh queue and key prefix,
and the same app loaded in this (client) process with their configuration.

Self-contained on purpose (it does not import ``tests``): the workers are started by
``girder_celery.testing.LocalGrid`` with the flags the benchmarks print, and the RabbitMQ queue,
if any, is deleted at the end.
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

from girder_celery.testing import QUIET_FLAGS, CeleryWorker, LocalGrid, RedisServer, delete_amqp_queue

ROOT = Path(__file__).resolve().parent.parent

#: Databases of the private Redis: the broker (when it is Redis), the result backend, girder.
BROKER_DB, BACKEND_DB, STORE_DB = 1, 2, 0


class Grid(LocalGrid):
    """Identical workers (``-P pool -c concurrency``) on one broker, and the client-side app module
    (``app_module``) configured to match them."""

    def __init__(
        self,
        redis_server: RedisServer,
        broker: str,
        broker_url: str,
        pool: str,
        concurrency: int,
        store_url: str | None = None,
    ) -> None:
        tag = uuid.uuid4().hex[:8]
        queue, prefix = f"girder-bench-{tag}", f"gb-{tag}"
        env = {
            "GIRDER_BENCH_BROKER": broker_url,
            "GIRDER_BENCH_BACKEND": redis_server.url(BACKEND_DB),
            # The state store: the private Redis's db 0, or a Redis Cluster's seeds (--store cluster).
            "GIRDER_BENCH_STORE": store_url or redis_server.url(STORE_DB),
            "GIRDER_BENCH_QUEUE": queue,
            "GIRDER_BENCH_PREFIX": prefix,
        }
        super().__init__(
            "benchmarks.benchapp", redis_server.url(STORE_DB), env=env, queue=queue, key_prefix=prefix,
            broker_url=broker_url, flags=["-l", "warning", *QUIET_FLAGS], cwd=ROOT,
        )  # fmt: skip
        self.redis_server = redis_server
        self.broker = broker
        self.pool = pool
        self.concurrency = concurrency
        #: Queues a suite declared besides ``queue`` (pools of a tree), deleted with it on RabbitMQ.
        self.extra_queues: list[str] = []
        self.load_app()

    def start_nodes(self, count: int, python_args: tuple[str, ...] = ()) -> list[CeleryWorker]:
        """Start ``count`` more workers side by side (``python_args`` go before ``-m celery``): all of them."""
        first = len(self.workers) + 1
        names = [f"bench{i}" for i in range(first, first + count)]
        self.start_workers(names, self.pool, self.concurrency, python_args=python_args)
        return self.workers

    def shown_flags(self) -> str:
        """The workers' flags as the results print them, the queue's name left out."""
        return " ".join(self.worker_flags(self.pool, self.concurrency)).replace(self.queue, "<queue>")

    def close(self) -> None:
        whys = [(self.queue, super().close())]
        if self.broker == "amqp":
            whys += [(queue, delete_amqp_queue(queue, self.broker_url)) for queue in self.extra_queues]
        for queue, why in whys:
            if why:
                print(f"  (could not delete RabbitMQ queue {queue}: {why})", file=sys.stderr)
