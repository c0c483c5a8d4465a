"""The Celery app the benchmarks run, in the client process and in the worker processes.

One app, one worker process serving both kinds of task, so girder and stock Celery share the
broker, the queue, the result backend and the worker flags: ``inc`` is a girder task, ``plain_inc``
the same function as a plain Celery task. Configured from ``GIRDER_BENCH_*`` environment variables
set by ``benchmarks.__main__`` (the client re-imports this module per broker).
"""

from __future__ import annotations

import os

import redis
from celery import Celery, signals

from girder_celery import Girder

BROKER = os.environ.get("GIRDER_BENCH_BROKER", "redis://127.0.0.1:6379/1")
BACKEND = os.environ.get("GIRDER_BENCH_BACKEND", "redis://127.0.0.1:6379/2")
STORE = os.environ.get("GIRDER_BENCH_STORE", "redis://127.0.0.1:6379/0")
QUEUE = os.environ.get("GIRDER_BENCH_QUEUE", "girder-bench")
PREFIX = os.environ.get("GIRDER_BENCH_PREFIX", "girder-bench")
#: Where a worker announces it is ready (a list in the state store's database).
READY_KEY = f"{PREFIX}:bench:ready"

app = Celery("benchapp", broker=BROKER, backend=BACKEND)
app.conf.update(
    task_default_queue=QUEUE,
    girder_url=STORE,
    girder_key_prefix=PREFIX,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)
girder = Girder(app)


@signals.worker_ready.connect
def _announce_ready(sender=None, **_):
    client = redis.Redis.from_url(STORE, decode_responses=True)
    client.rpush(READY_KEY, sender.hostname)
    client.close()


@girder.task(name="bench.inc")
def inc(x):
    return x + 1


@app.task(name="bench.plain_inc")
def plain_inc(x):
    return x + 1
