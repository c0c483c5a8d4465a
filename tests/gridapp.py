"""The Celery app the end-to-end tests run, in the test process and in real worker processes.

Configured from the ``GIRDER_TEST_*`` environment (set by ``tests.harness.Grid``), so a ``celery -A
tests.gridapp worker`` subprocess and the test process share the broker, queue, state store and
key prefix; its workers tell their grid when they are ready (``announce_ready``). Tasks count
their executions in Redis, so tests can assert "ran exactly once".
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time

import redis
from celery import Celery

from girder_celery import Girder
from girder_celery.testing import announce_ready

BROKER = os.environ.get("GIRDER_TEST_BROKER", "redis://127.0.0.1:6379/15")
STORE = os.environ.get("GIRDER_TEST_STORE", "redis://127.0.0.1:6379/15")
QUEUE = os.environ.get("GIRDER_TEST_QUEUE", "girder-test")
PREFIX = os.environ.get("GIRDER_TEST_PREFIX", "girder-test")

app = Celery("gridapp", broker=BROKER, backend=os.environ.get("GIRDER_TEST_BACKEND", STORE))
app.conf.update(
    task_default_queue=QUEUE,
    girder_url=STORE,
    girder_sentinel_master=os.environ.get("GIRDER_TEST_SENTINEL_MASTER") or None,
    girder_sentinel_options=json.loads(os.environ.get("GIRDER_TEST_SENTINEL_OPTIONS", "{}")),
    girder_key_prefix=PREFIX,
    girder_lease_seconds=float(os.environ.get("GIRDER_TEST_LEASE", "30")),
    girder_check_interval=float(os.environ.get("GIRDER_TEST_CHECK", "5")),
    girder_reoffer_after=float(os.environ.get("GIRDER_TEST_REOFFER", "300")),
    girder_pools=json.loads(os.environ.get("GIRDER_TEST_POOLS", "{}")),
    girder_volunteer=os.environ.get("GIRDER_TEST_VOLUNTEER", "1") == "1",
    girder_hoist_after=float(os.environ.get("GIRDER_TEST_HOIST_AFTER", "0.1")),
    girder_graph_ttl=float(os.environ.get("GIRDER_TEST_GRAPH_TTL", "86400")),
    task_acks_late=os.environ.get("GIRDER_TEST_ACKS_LATE", "0") == "1",
    result_expires=int(os.environ.get("GIRDER_TEST_RESULT_EXPIRES", "86400")),
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)
girder = Girder(app)
announce_ready(app)
# Run counters and gates: on the store's server unless the grid keeps them apart (an ACL user's
# store, or a store a fault test kills).
_counter = redis.Redis.from_url(os.environ.get("GIRDER_TEST_COUNTERS", STORE), decode_responses=True)


def runs_key(name: str, key: str) -> str:
    return f"{PREFIX}:test:runs:{name}:{key}"


def count_run(task) -> None:
    _counter.incr(runs_key(task.name, task.request.id))


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


# -- core suite tasks


def gate_key(tag: str) -> str:
    return f"{PREFIX}:test:gate:{tag}"


@girder.task(bind=True, name="grid.inspect_args")
def inspect_args(self, *args, **kwargs):
    """What the function received: each argument's type name and repr."""
    count_run(self)
    return {
        "args": [[type(a).__name__, repr(a)] for a in args],
        "kwargs": {k: [type(v).__name__, repr(v)] for k, v in kwargs.items()},
    }


@girder.task(bind=True, name="grid.gated")
def gated(self, tag, outcome="value"):
    """Runs until the test opens ``tag``'s gate (at most 20 s), then returns ``tag``, raises
    (``outcome="raise"``) or returns a value that is not JSON (``outcome="set"``)."""
    count_run(self)
    _counter.blpop([gate_key(tag)], timeout=20)
    if outcome == "raise":
        raise ValueError(f"gate {tag} failed")
    if outcome == "set":
        return {tag}
    return tag


@girder.task(bind=True, name="grid.retrying", autoretry_for=(ValueError,), max_retries=3, default_retry_delay=0)
def retrying(self, tag):
    """Fails its first run with ValueError; Celery's autoretry runs it again."""
    runs = _counter.incr(runs_key(self.name, self.request.id))
    if runs < 2:
        raise ValueError(f"first run of {tag} fails")
    return runs


@girder.task(bind=True, name="grid.outer_divide")
def outer_divide(self, x):
    """Requests ``grid.divide(x, 0)``: its failure is this one's cause."""
    count_run(self)
    return girder.request(divide.s(x, 0), timeout=15)


# Tasks of the re-entrant and tier suites live in their own modules; they register on this app,
# and a test process that reconfigures (reloads) this app reloads them onto the new one.
def _task_module(name: str):
    return importlib.reload(sys.modules[name]) if name in sys.modules else importlib.import_module(name)


reentrant_tasks = _task_module("tests.reentrant_tasks")
tier_tasks = _task_module("tests.tier_tasks")
backend_tasks = _task_module("tests.backend_tasks")
canvas_tasks = _task_module("tests.canvas_tasks")
limit_tasks = _task_module("tests.limit_tasks")
cancel_tasks = _task_module("tests.cancel_tasks")
