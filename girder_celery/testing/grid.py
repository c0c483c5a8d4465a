"""``LocalGrid``: real ``celery worker`` processes of one app module, started side by side and
awaited until each says it is ready (``announce_ready``), stopped warm or killed together.
"""

from __future__ import annotations

import importlib
import os
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

from .servers import CeleryWorker, delete_amqp_queue

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["QUIET_FLAGS", "READY_KEY_ENV", "READY_URL_ENV", "LocalGrid", "announce_ready"]

#: The environment variables through which a ``LocalGrid`` tells each worker it starts where to
#: announce that it is ready (a Redis URL, and the name of the grid's ready lists).
READY_URL_ENV, READY_KEY_ENV = "GIRDER_GRID_READY_URL", "GIRDER_GRID_READY_KEY"

#: Worker flags for a private grid: no event heartbeats, no start-up exchange with other nodes
#: (mingle waits for their replies), no gossip; a node starts sooner and minds no other grid's nodes.
QUIET_FLAGS = ("--without-heartbeat", "--without-mingle", "--without-gossip")


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
