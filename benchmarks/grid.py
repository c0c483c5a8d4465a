"""A benchmark grid: one broker, a fresh queue and key prefix, ``benchmarks.benchapp`` loaded in
this (client) process with the same configuration as its real worker subprocesses."""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
import uuid
from pathlib import Path
from types import ModuleType

from girder_celery.testing import RedisServer, delete_amqp_queue

from .servers import Worker

#: Databases of the private Redis: the broker (when it is Redis), the result backend, girder.
BROKER_DB, BACKEND_DB, STORE_DB = 1, 2, 0


class Grid:
    """Workers on one broker, and the client-side app module configured to match them."""

    def __init__(self, redis_server: RedisServer, broker: str, broker_url: str, pool: str, concurrency: int) -> None:
        self.redis_server = redis_server
        self.broker = broker
        self.broker_url = broker_url
        tag = uuid.uuid4().hex[:8]
        self.queue = f"girder-bench-{tag}"
        self.prefix = f"gb-{tag}"
        self.env = {
            "GIRDER_BENCH_BROKER": broker_url,
            "GIRDER_BENCH_BACKEND": redis_server.url(BACKEND_DB),
            "GIRDER_BENCH_STORE": redis_server.url(STORE_DB),
            "GIRDER_BENCH_QUEUE": self.queue,
            "GIRDER_BENCH_PREFIX": self.prefix,
        }
        self.worker_flags = [
            "-P", pool, "-c", str(concurrency), "-Q", self.queue, "-l", "warning",
            "--without-heartbeat", "--without-mingle", "--without-gossip",
        ]  # fmt: skip
        self.logdir = Path(tempfile.mkdtemp(prefix="girder-bench-workers-"))
        self.workers: list[Worker] = []
        self.app_module: ModuleType = self._load_app()

    def _load_app(self) -> ModuleType:
        os.environ.update(self.env)
        module = sys.modules.get("benchmarks.benchapp")
        if module is None:
            return importlib.import_module("benchmarks.benchapp")
        module.app.close()
        return importlib.reload(module)

    def start_workers(self, count: int, python_args: tuple[str, ...] = ()) -> list[Worker]:
        """Start ``count`` identical workers (``python_args`` go before ``-m celery``)."""
        ready = self.redis_server.client(STORE_DB)
        for _ in range(count):
            name = f"bench{len(self.workers) + 1}-{self.prefix}@localhost"
            worker = Worker(self.env, name, self.worker_flags, self.logdir, python_args)
            self.workers.append(worker)
            worker.start(ready, self.app_module.READY_KEY)
        return self.workers

    def stop_workers(self) -> None:
        # All at once: each warm shutdown waits for the worker's current request.
        for worker in self.workers:
            worker.terminate()
        for worker in self.workers:
            worker.stop()
        self.workers.clear()

    def close(self) -> None:
        self.stop_workers()
        self.app_module.app.close()
        if self.broker == "amqp":
            why = delete_amqp_queue(self.queue, self.broker_url)
            if why:
                print(f"  (could not delete RabbitMQ queue {self.queue}: {why})", file=sys.stderr)
