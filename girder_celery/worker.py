"""Worker integration: girder's bootsteps, its worker option and the unknown-task handler.

``Girder(app)`` installs them, so ``celery -A proj worker`` runs girder tasks with no extra flags.
``GirderStep`` makes the worker a node of its pool (``--girder-pool``, else ``girder_pool``, else
Celery's default queue): it consumes its own node queue, its pool and the pool's ancestors, and
checks the state store at start, so a wrong URL is a clear error there rather than per task,
and keeps kombu's event loop from sleeping on queued acks or on an executor that fell free.
``Hoister`` runs a thread that copies offers that waited longer than ``girder_hoist_after`` up a
tier (the seed's distributor). The handler fails a girder request whose message names a task
this worker does not know, so its waiters hear of it (invariant 1).
"""

from __future__ import annotations

import logging
import re
import threading
from typing import TYPE_CHECKING, Any

import click
import redis
from celery import bootsteps, signals

from .errors import GirderError, safe_url
from .keys import decode_payload

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

    def __init__(self, worker: Any, girder_pool: str | None = None, **kwargs: Any) -> None:
        girder = worker.app.girder
        girder.worker_events = bool(worker.task_events)
        girder.worker_concurrency = worker.concurrency
        # A busy executor must not sit on offers another could run (the prefetch hazard): one
        # message per executor, and with a Redis broker Celery fetches only when an executor is
        # free (RabbitMQ grants its window itself; see the README). Not under gevent or eventlet,
        # where a parked request frees its executor anyway (and there it stalled consumption).
        green = any(name in getattr(worker.pool_cls, "__module__", "") for name in ("gevent", "eventlet"))
        redis_broker = worker.app.connection_for_read().transport.driver_type == "redis"
        if girder.settings.volunteer and not green:
            worker.prefetch_multiplier = 1
            if redis_broker:
                worker.app.conf.worker_disable_prefetch = True
        girder.worker_pool = girder_pool or girder.settings.pool or worker.app.conf.task_default_queue
        queues = worker.app.amqp.queues
        node = girder.node_queue(worker.hostname)
        if node not in queues:
            queues.select_add(girder.queue_declaration(node))
        for pool in girder.settings.pool_chain(girder.worker_pool):
            if pool not in queues.consume_from:
                queues.select_add(pool)
        super().__init__(worker, **kwargs)

    def start(self, worker: Any) -> None:
        girder = worker.app.girder
        url = safe_url(girder.settings.url)
        try:
            girder.store.client.ping()
        except redis.RedisError as exc:
            raise girder.connection_error(exc) from exc
        logger.info("girder: state store %s, key prefix %r", url, girder.settings.key_prefix)
        hub = getattr(worker, "hub", None)
        if hub is None:
            return
        if not wake_hub_for_queued_callbacks(hub):
            logger.warning("girder: this kombu's event loop has no waker; acks queued by a task may wait up to 10 s")
        if worker.app.conf.worker_disable_prefetch and getattr(worker, "pool", None) is not None:
            wake_hub_when_requests_end(worker.pool, hub)


def wake_hub_for_queued_callbacks(hub: Any) -> bool:
    """Make kombu's event loop poll without waiting while callbacks are queued for it.

    The hub runs its queued callbacks first and then polls for up to 10 s (its longest timer
    delay). A callback queued during that first phase, from the same thread, waits out the
    poll: a solo worker that runs the messages of one read chain queues each message's ack that
    way, and on RabbitMQ, with the prefetch window held by those unsent acks, no frame arrives
    to end the poll, so the next message waits up to 10 s (seen with stock Celery too). The
    tick hook runs just before the poll, so queued work wakes the loop as another thread would.
    """
    if not all(hasattr(hub, name) for name in ("on_tick", "_ready", "_ready_lock", "_waker", "_wake_pending")):
        return False

    def wake_if_ready() -> None:
        if not hub._ready:
            return
        with hub._ready_lock:
            if hub._wake_pending or hub._waker is None:
                return
            hub._wake_pending = True
        hub._waker.wake()

    hub.on_tick.add(wake_if_ready)
    return True


def wake_hub_when_requests_end(pool: Any, hub: Any) -> None:
    """Turn kombu's event loop as each request the pool ran ends, so a free executor fetches.

    With ``worker_disable_prefetch`` (a Redis broker) the loop asks for the next message only
    while an executor is free, and it asks as it turns. Under ``-P threads`` a request ends on
    a pool thread while the loop sleeps in its poll for up to its longest timer delay (about a
    second here), so each message waited that long: prefork's result pipe and solo's own thread
    wake the loop, a thread pool does not. Queueing a no-op from the ending thread wakes it.
    """
    apply_async = pool.apply_async

    def noop() -> None:
        pass

    def apply_and_wake(target: Any, args: Any = None, kwargs: Any = None, callback: Any = None, **options: Any) -> Any:
        def settle(result: Any) -> Any:
            try:
                return callback(result) if callback is not None else None
            finally:
                hub.call_soon(noop)

        return apply_async(target, args, kwargs, callback=settle, **options)

    pool.apply_async = apply_and_wake


class Hoister(bootsteps.StartStopStep):
    """Every half ``girder_hoist_after``, copies this node's stale offers up the pool tree.

    It runs in a thread of its own (a greenlet under gevent), not on the worker's timer: under
    ``-P solo`` the timer shares the thread that runs tasks, and an overburdened node is exactly
    one whose executors are all busy.
    """

    label = "Girder hoister"
    requires = (GirderStep,)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        self.stopping = threading.Event()
        super().__init__(worker, **kwargs)

    def start(self, worker: Any) -> None:
        girder = worker.app.girder
        if not girder.settings.hoist_after:
            return
        tiers = [girder.node_queue(worker.hostname), *girder.settings.pool_chain(girder.worker_pool)]
        self.stopping.clear()
        threading.Thread(target=self._run, args=(girder, tiers), name="girder-hoister", daemon=True).start()

    def _run(self, girder: Girder, tiers: list[str]) -> None:
        while not self.stopping.wait(girder.settings.hoist_after / 2):
            hoist_once(girder, tiers)

    def stop(self, worker: Any) -> None:
        self.stopping.set()


def hoist_once(girder: Girder, tiers: list[str]) -> None:
    """One pass up ``tiers`` (node queue, pool, ancestors); a Redis or broker error is logged
    and the next tick tries again."""
    after_ms = int(girder.settings.hoist_after * 1000)
    try:
        for source, destination in zip(tiers, [*tiers[1:], None]):
            for key, name, payload in girder.store.hoist(source, destination, after_ms):
                args, kwargs = decode_payload(payload)
                girder.publish_offer(name, key, args, kwargs, destination)
    except Exception:
        logger.warning("girder: hoisting failed; will retry", exc_info=True)


def install(girder: Girder) -> None:
    """Install girder's worker bootsteps, option and signal handlers on ``girder.app``."""
    app = girder.app
    app.girder = girder
    app.steps["worker"].add(GirderStep)
    app.steps["worker"].add(Hoister)
    app.user_options["worker"].add(
        click.Option(
            ["--girder-pool"],
            default=None,
            help="The girder pool (a queue) this node belongs to; default: girder_pool, else Celery's default queue.",
        )
    )

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
            # Only a request nobody has claimed: a stale copy reaching a node deployed without the
            # task must not fail a run that is going on, or done, elsewhere.
            girder.store.fail(
                id, "", girder.encode_json(error.to_dict()), False, int(girder.settings.error_ttl * 1000),
                only_if_queued=True,
            )  # fmt: skip
        except redis.RedisError:
            logger.warning("girder: could not fail request %s of unknown task %r", id, name, exc_info=True)

    signals.task_unknown.connect(on_unknown_task, weak=False)
