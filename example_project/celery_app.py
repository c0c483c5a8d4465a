"""The example project's Celery app, with girder installed.

Run a worker with ``celery -A example_project.celery_app worker``: no extra flags are needed.
Configured from the environment, so workers and clients agree:

- ``GIRDER_DEMO_REDIS_URL``: Redis for girder's state store, and by default also the broker and
  the result backend (default ``redis://127.0.0.1:6379/0``);
- ``GIRDER_DEMO_BROKER_URL``: another broker, e.g. ``amqp://guest:guest@127.0.0.1:5672//``;
- ``GIRDER_DEMO_BACKEND_URL``: another result backend;
- ``GIRDER_DEMO_READY_LIST``: if set, each worker pushes its hostname onto this Redis list when it
  is ready (the demo waits on it instead of sleeping).
"""

from __future__ import annotations

import os

import redis
from celery import Celery, signals

from girder_celery import Girder

REDIS_URL = os.environ.get("GIRDER_DEMO_REDIS_URL", "redis://127.0.0.1:6379/0")
BROKER_URL = os.environ.get("GIRDER_DEMO_BROKER_URL", REDIS_URL)
BACKEND_URL = os.environ.get("GIRDER_DEMO_BACKEND_URL", REDIS_URL)

app = Celery("example_project", broker=BROKER_URL, backend=BACKEND_URL, include=["example_project.tasks"])
app.conf.update(
    girder_url=REDIS_URL,
    broker_connection_retry_on_startup=True,
)
girder = Girder(app)


@signals.worker_ready.connect
def _announce_ready(sender=None, **_):
    ready_list = os.environ.get("GIRDER_DEMO_READY_LIST")
    if ready_list:
        redis.Redis.from_url(REDIS_URL).rpush(ready_list, sender.hostname)
