"""The example project's Celery app, with girder installed.

Run a worker with ``celery -A example_project.celery_app worker``: no extra flags are needed.
Configured from the environment, so workers and clients agree:

- ``GIRDER_DEMO_REDIS_URL``: Redis for girder's state store, and by default also the broker and
  the result backend (default ``redis://127.0.0.1:6379/0``);
- ``GIRDER_DEMO_BROKER_URL``: another broker, e.g. ``amqp://guest:guest@127.0.0.1:5672//``;
- ``GIRDER_DEMO_BACKEND_URL``: another result backend.

A worker the demo starts (``girder_celery.testing.LocalGrid``) also says when it is ready, so the
demo waits for that instead of sleeping; ``announce_ready`` does nothing in any other worker.
"""

from __future__ import annotations

import os

from celery import Celery

from girder_celery import Girder
from girder_celery.testing import announce_ready

REDIS_URL = os.environ.get("GIRDER_DEMO_REDIS_URL", "redis://127.0.0.1:6379/0")
BROKER_URL = os.environ.get("GIRDER_DEMO_BROKER_URL", REDIS_URL)
BACKEND_URL = os.environ.get("GIRDER_DEMO_BACKEND_URL", REDIS_URL)

app = Celery("example_project", broker=BROKER_URL, backend=BACKEND_URL, include=["example_project.tasks"])
app.conf.update(
    girder_url=REDIS_URL,
    broker_connection_retry_on_startup=True,
)
girder = Girder(app)
announce_ready(app)
