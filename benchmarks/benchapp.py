"""The Celery app the benchmarks run, in the client process and in the worker processes.

One app, one worker process serving both kinds of task, so girder and stock Celery share the
broker, the queue, the result backend and the worker flags: ``inc`` is a girder task, ``plain_inc``
the same function as a plain Celery task. Configured from ``GIRDER_BENCH_*`` environment variables
set by ``benchmarks.grid.Grid`` (the client re-imports this module per grid); its workers tell
their grid when they are ready (``announce_ready``).

Re-entrant workloads (suites ``inline``, ``fib`` and ``bogosity``): ``leaf``, ``many_children``,
``fib`` and ``bogosity`` are girder tasks that request other girder tasks from inside a running
request. Each takes a ``salt`` (``args`` for bogosity) that it only passes down, so every run of a
suite uses distinct requests and nothing is memoized from an earlier run.
"""

from __future__ import annotations

import json
import os
import time

from celery import Celery

from girder_celery import Girder
from girder_celery.testing import announce_ready

BROKER = os.environ.get("GIRDER_BENCH_BROKER", "redis://127.0.0.1:6379/1")
BACKEND = os.environ.get("GIRDER_BENCH_BACKEND", "redis://127.0.0.1:6379/2")
STORE = os.environ.get("GIRDER_BENCH_STORE", "redis://127.0.0.1:6379/0")
QUEUE = os.environ.get("GIRDER_BENCH_QUEUE", "girder-bench")
PREFIX = os.environ.get("GIRDER_BENCH_PREFIX", "girder-bench")
#: The pool tree (``girder_pools``) of the many-node suite, as JSON; none elsewhere.
POOLS = json.loads(os.environ.get("GIRDER_BENCH_POOLS", "{}"))

app = Celery("benchapp", broker=BROKER, backend=BACKEND)
app.conf.update(
    task_default_queue=QUEUE,
    girder_url=STORE,
    girder_key_prefix=PREFIX,
    girder_pools=POOLS,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)
girder = Girder(app)
announce_ready(app)


@girder.task(name="bench.inc")
def inc(x):
    return x + 1


@app.task(name="bench.plain_inc", shared=False)
def plain_inc(x):
    return x + 1


@girder.task(name="bench.leaf")
def leaf(salt, i):
    """A trivial child request: distinct per ``(salt, i)``."""
    return i


@girder.task(name="bench.many_children")
def many_children(n, salt):
    """Request ``n`` distinct children one by one (each waited for before the next)."""
    total = 0
    for i in range(n):
        total += leaf.call(salt, i)
    return total


@girder.task(name="bench.fib")
def fib(n, salt):
    """Memoized Fibonacci as recursive sub-requests: fib(n) makes n + 1 distinct requests."""
    if n < 2:
        return n
    return fib.call(n - 1, salt) + fib.call(n - 2, salt)


@girder.task(name="bench.bogosity", bind=True)
def bogosity(self, msec, jobnum, reclevel, numrecjobs, args):
    """The seed post's recursion test: request ``reclevel`` sub-requests one level down (all at
    once), then sleep ``msec`` and report where each request ran. ``numrecjobs`` is unused, as in
    the post; ``args`` only thwarts the cache."""
    values = []
    if reclevel > 0:
        values = girder.requests([bogosity.s(msec, k, reclevel - 1, numrecjobs, args) for k in range(reclevel)])
    time.sleep(msec / 1000)
    node = self.request.hostname
    return f"Bogosity:{node}:{jobnum}:{msec}:{reclevel}:{args}:[{','.join(values)}]"


@app.task(name="bench.plain_sleep", shared=False)
def plain_sleep(msec, j):
    """A plain Celery task of ``msec`` ms: the bogosity suite's stock reference."""
    time.sleep(msec / 1000)
    return j


@girder.task(name="bench.fan_child", bind=True)
def fan_child(self, msec, salt, i):
    time.sleep(msec / 1000)
    return self.request.hostname


@girder.task(name="bench.fan_parent", bind=True)
def fan_parent(self, n, msec, salt):
    """Requests ``n`` distinct children of ``msec`` ms at once: which node ran the parent and each child."""
    children = girder.requests([fan_child.s(msec, salt, i) for i in range(n)])
    return {"parent": self.request.hostname, "children": children}


@girder.task(name="bench.wide_parent")
def wide_parent(n, salt):
    """Requests ``n`` distinct trivial children at once (the wide fan-out suite): their sum."""
    return sum(girder.requests([leaf.s(salt, i) for i in range(n)]))
