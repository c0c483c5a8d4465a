"""The Celery app the end-to-end tests run, in the test process and in real worker processes.

Configured from the environment (set by ``tests/harness.py``), so a ``celery -A tests.gridapp
worker`` subprocess and the test process share the broker, queue, state store and key prefix.
Tasks count their executions in Redis, so tests can assert "ran exactly once".
"""

from __future__ import annotations

import importlib
import os
import time

import redis
from celery import Celery, signals

from girder_celery import Girder

BROKER = os.environ.get("GIRDER_TEST_BROKER", "redis://127.0.0.1:6379/15")
STORE = os.environ.get("GIRDER_TEST_STORE", "redis://127.0.0.1:6379/15")
QUEUE = os.environ.get("GIRDER_TEST_QUEUE", "girder-test")
PREFIX = os.environ.get("GIRDER_TEST_PREFIX", "girder-test")

app = Celery("gridapp", broker=BROKER, backend=os.environ.get("GIRDER_TEST_BACKEND", STORE))
app.conf.update(
    task_default_queue=QUEUE,
    girder_url=STORE,
    girder_key_prefix=PREFIX,
    girder_lease_seconds=float(os.environ.get("GIRDER_TEST_LEASE", "30")),
    girder_check_interval=float(os.environ.get("GIRDER_TEST_CHECK", "5")),
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)
girder = Girder(app)
_counter = redis.Redis.from_url(STORE, decode_responses=True)


def runs_key(name: str, key: str) -> str:
    return f"{PREFIX}:test:runs:{name}:{key}"


def count_run(task) -> None:
    _counter.incr(runs_key(task.name, task.request.id))


@signals.worker_ready.connect
def _announce_ready(sender=None, **_):
    _counter.rpush(f"{PREFIX}:test:ready", sender.hostname)


@girder.task(bind=True, name="grid.add")
def add(self, x, y=0):
    count_run(self)
    return x + y


@girder.task(bind=True, name="grid.echo")
def echo(self, *args, **kwargs):
    count_run(self)
    return [list(args), kwargs]


@girder.task(bind=True, name="grid.slow")
def slow(self, seconds, tag=None):
    count_run(self)
    time.sleep(seconds)
    return {"tag": tag, "node": self.request.hostname}


@girder.task(bind=True, name="grid.divide")
def divide(self, x, y):
    count_run(self)
    return x / y


@girder.task(bind=True, name="grid.unserializable")
def unserializable(self, x):
    count_run(self)
    return {x}  # a set is not JSON


@girder.task(bind=True, name="grid.flaky", cache_errors=True)
def memo_fail(self, x):
    count_run(self)
    raise ValueError(f"bad {x}")


@girder.task(bind=True, name="grid.short_lived", cache_ttl=1)
def short_lived(self, x):
    count_run(self)
    return x


@app.task(name="grid.plain_add")
def plain_add(x, y):
    return x + y


# Tasks of the re-entrant suite live in their own module; it registers on this app (and is
# reloaded with it, so that a test process reconfiguring the app gets them on the new one).
reentrant_tasks = importlib.reload(importlib.import_module("tests.reentrant_tasks"))
