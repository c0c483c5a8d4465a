"""Worker integration: the girder bootstep and the unknown-task handler.

``Girder(app)`` installs both, so ``celery -A proj worker`` runs girder tasks with no extra flags.
The bootstep checks the state store when the worker starts, so a wrong URL is a clear error at
start rather than a failure per task. The handler fails a girder request whose message names a
task this worker does not know, so its waiters hear of it instead of waiting (invariant 1).
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

import redis
from celery import bootsteps, signals
from kombu import Exchange, Queue

from .errors import GirderError, safe_url

if TYPE_CHECKING:
    from .girder import Girder

__all__ = ["GirderStep", "install"]

logger = logging.getLogger(__name__)

_KEY_RE = re.compile(r"^[0-9a-f]{64}$")


class GirderStep(bootsteps.StartStopStep):
    """Adds the node's own queue, and checks girder's state store as the worker starts.

    The node queue is where sub-requests made on this node are offered first (local first);
    it is added before the consumer starts, and auto-deleted on RabbitMQ when the node goes.
    """

    label = "Girder"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        girder = worker.app.girder
        girder.worker_events = bool(worker.task_events)
        name = girder.node_queue(worker.hostname)
        queues = worker.app.amqp.queues
        if name not in queues:
            queues.select_add(Queue(name, Exchange(name, type="direct"), routing_key=name, auto_delete=True))
        super().__init__(worker, **kwargs)

    def start(self, worker: Any) -> None:
        girder = worker.app.girder
        url = safe_url(girder.settings.url)
        try:
            girder.store.client.ping()
        except redis.RedisError as exc:
            raise girder.connection_error(exc) from exc
        logger.info("girder: state store %s, key prefix %r", url, girder.settings.key_prefix)


def install(girder: Girder) -> None:
    """Install girder's worker bootstep and signal handlers on ``girder.app``."""
    app = girder.app
    app.girder = girder
    app.steps["worker"].add(GirderStep)

    def on_unknown_task(sender: Any = None, message: Any = None, name: str = "", id: str = "", **_: Any) -> None:
        if getattr(sender, "app", None) is not app or not _KEY_RE.match(id or ""):
            return
        hostname = getattr(sender, "hostname", None) or "this worker"
        error = GirderError(
            f"no task named {name!r} is registered on {hostname}",
            key=id,
            request=name,
            exc_type="celery.exceptions.NotRegistered",
        )
        try:
            if girder.store.record(id):
                girder.store.fail(
                    id, "", girder.encode_json(error.to_dict()), False, int(girder.settings.error_ttl * 1000)
                )
        except redis.RedisError:
            logger.warning("girder: could not fail request %s of unknown task %r", id, name, exc_info=True)

    signals.task_unknown.connect(on_unknown_task, weak=False)
