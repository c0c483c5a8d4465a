"""Real servers for the tests: a private redis-server and real ``celery worker`` processes.

No fakes: each test session runs its own ``redis-server`` on a free port (so tests may kill and
restart it), workers are ``celery -A tests.gridapp worker`` subprocesses, and brokers are that
Redis or the machine's RabbitMQ (``$GIRDER_TEST_AMQP_URL``), each with queues of its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from girder_celery.testing import RedisServer

ROOT = Path(__file__).resolve().parent.parent
AMQP_URL = os.environ.get("GIRDER_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


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


def amqp_available(url: str = AMQP_URL) -> bool:
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=1)
        return True
    except Exception:
        return False


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
            _delete_amqp_queue(self.queue)


class Worker:
    """A real ``celery -A tests.gridapp worker`` subprocess."""

    def __init__(self, grid: Grid, name: str, pool: str, concurrency: int, extra: tuple[str, ...]) -> None:
        self.grid = grid
        self.hostname = f"{name}-{grid.prefix}@localhost"
        self.pool = pool
        self.concurrency = concurrency
        self.extra = extra
        self.log = grid.logdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> Worker:
        cmd = [
            sys.executable, "-m", "celery", "-A", "tests.gridapp", "worker", "-n", self.hostname,
            "-P", self.pool, "-c", str(self.concurrency), "-Q", self.grid.queue, "-l", "info",
            "--without-heartbeat", "--without-mingle", "--without-gossip", *self.extra,
        ]  # fmt: skip
        env = {**os.environ, **self.grid.env, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        ready = self.grid.redis_server.client()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.hostname} exited ({self.proc.returncode}):\n{self.output()}")
            item = ready.blpop([f"{self.grid.prefix}:test:ready"], timeout=1)
            if item and item[1] == self.hostname:
                return self
            if item:
                ready.rpush(f"{self.grid.prefix}:test:ready", item[1])  # another worker's
        raise TimeoutError(f"worker {self.hostname} not ready in {timeout}s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and pool children): a dead node."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 15) -> None:
        if not self.proc or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()


def _delete_amqp_queue(queue: str) -> None:
    from kombu import Connection

    try:
        with Connection(AMQP_URL, connect_timeout=2) as conn:
            conn.default_channel.queue_delete(queue)
    except Exception:
        pass
