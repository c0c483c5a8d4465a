"""Real servers for the benchmarks: a private ``redis-server`` and real ``celery worker`` processes.

Self-contained on purpose (it does not import ``tests``): a benchmark run owns its Redis on a free
port, starts ``celery -A benchmarks.benchapp worker`` subprocesses with the flags it prints, and
uses the machine's RabbitMQ (``$GIRDER_TEST_AMQP_URL``) with a queue of its own, deleted at the end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
AMQP_URL = os.environ.get("GIRDER_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


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
