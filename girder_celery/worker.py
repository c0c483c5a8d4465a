"""Worker integration: girder's bootsteps, its worker option and the unknown-task handler.

``Girder(app)`` installs them, so ``celery -A proj worker`` runs girder tasks with no extra flags.
``GirderStep`` makes the worker a node of its pool (``--girder-pool``, else ``girder_pool``, else
Celery's default queue): it consumes its own node queue, its pool and the pool's ancestors, and
checks the state store at start, so a wrong URL is a clear error there rather than per task,
and warns if the store may evict girder's keys (an evicted running record makes its request
run twice, against invariant 1), and installs the event-loop wakers of ``hub.py``. ``Hoister``
runs a thread that copies offers that waited longer than ``girder_hoist_after`` up a tier (the
seed's distributor), and those a waiter made due early at once. The handlers fail a girder
request whose message names a task this worker does not know, or whose run Celery's pool ended
at its hard time limit (prefork kills the process), so its waiters hear of it (invariant 1).
Celery's ``revoke`` command cancels a girder request instead of blocking its key (``cancel.py``).

``MessageCheck`` refuses malformed messages of plain tasks as girder's strategy does its own.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import click
import redis
from celery import Celery, bootsteps, signals
from celery.exceptions import TimeLimitExceeded

from .cancel import install_revoke
from .errors import safe_url
from .hub import wake_hub_at_shutdown, wake_hub_for_queued_callbacks, wake_hub_when_requests_end
from .keys import is_key
from .messages import checked
from .offers import Offers
from .runtime import Runtime

__all__ = ["GirderStep", "Hoister", "MessageCheck", "install"]

logger = logging.getLogger(__name__)


def runtime_of(app: Celery) -> Runtime:
    """The girder runtime ``install`` put on ``app``."""
    return app.girder_runtime


class GirderStep(bootsteps.StartStopStep):
    """Adds the node's own queue, and checks girder's state store as the worker starts.

    The node queue is where sub-requests made on this node are offered first (local first);
    it is added before the consumer starts, and auto-deleted on RabbitMQ when the node goes.
    """

    label = "Girder"

    def __init__(self, worker: Any, girder_pool: str | None = None, **kwargs: Any) -> None:
        runtime = runtime_of(worker.app)
        settings, offers = runtime.settings, runtime.offers
        runtime.runner.events = bool(worker.task_events)
        runtime.runner.concurrency = worker.concurrency
        runtime.runner.node = worker.hostname
        # A busy executor must not sit on offers another could run (the prefetch hazard): one
        # message per executor, and with a Redis broker Celery fetches only when an executor is
        # free (RabbitMQ grants its window itself; see the README). Not under gevent or eventlet,
        # where a parked request frees its executor anyway (and there it stalled consumption).
        green = any(name in getattr(worker.pool_cls, "__module__", "") for name in ("gevent", "eventlet"))
        redis_broker = worker.app.connection_for_read().transport.driver_type == "redis"
        if settings.volunteer and not green:
            worker.prefetch_multiplier = 1
            if redis_broker:
                worker.app.conf.worker_disable_prefetch = True
        runtime.node_pool = girder_pool or settings.pool or worker.app.conf.task_default_queue
        queues = worker.app.amqp.queues
        node = offers.node_queue(worker.hostname)
        if node not in queues:
            queues.select_add(offers.queue_declaration(node))
        for pool in settings.pool_chain(runtime.node_pool):
            if pool not in queues.consume_from:
                queues.select_add(pool)
        super().__init__(worker, **kwargs)

    def start(self, worker: Any) -> None:
        store = runtime_of(worker.app).store
        try:
            store.client.ping()
        except redis.RedisError as exc:
            raise store.connection_error(exc) from exc
        logger.info("girder: state store %s, key prefix %r", safe_url(store.url), store.prefix)
        check_eviction(store.client, safe_url(store.url))
        hub = getattr(worker, "hub", None)
        if hub is None:
            return
        if not wake_hub_for_queued_callbacks(hub):
            logger.warning("girder: this kombu's event loop has no waker; acks queued by a task may wait up to 10 s")
        wake_hub_at_shutdown(hub, worker.hostname)
        if worker.app.conf.worker_disable_prefetch and getattr(worker, "pool", None) is not None:
            wake_hub_when_requests_end(worker.pool, hub)


#: What each kind of ``maxmemory-policy`` may evict of girder's keys, and what that costs.
_EVICTS = {
    "allkeys": (
        "any of girder's keys, a running request's record too: that request then runs twice, and its "
        "waiters wait a check interval"
    ),
    "volatile": (
        "girder's keys that have a TTL: done values kept with a result TTL (recomputed when next requested), "
        "failed records, waiters' mailboxes (a waiter then hears at its next check, girder_check_interval) and "
        "waits-for edges (a request cycle may then hang instead of failing); queued and running records have "
        "no TTL and are never evicted"
    ),
}


def check_eviction(client: redis.Redis | redis.RedisCluster, url: str) -> None:
    """Warn if the state store's ``maxmemory-policy`` may evict girder's keys (each master's, on
    a Redis Cluster); a store that will not say (an ACL or a managed Redis refusing CONFIG) is
    logged, never fatal."""
    if isinstance(client, redis.RedisCluster):
        for node in client.get_primaries():
            _check_eviction(client.get_redis_connection(node), f"{url} (master {node.name})")
    else:
        _check_eviction(client, url)


def _check_eviction(client: redis.Redis, url: str) -> None:
    try:
        config = client.config_get("maxmemory*")
    except redis.RedisError as exc:
        logger.info("girder: could not read the state store's maxmemory-policy (%s); it should be noeviction", exc)
        return
    policy = config.get("maxmemory-policy", "noeviction")
    kind = policy.split("-", 1)[0]
    if kind not in _EVICTS:
        return
    limit = config.get("maxmemory", "0")
    full = f"when it reaches maxmemory ({limit} bytes)" if limit not in ("", "0") else "once a maxmemory is set"
    logger.warning(
        "girder: the state store %s has maxmemory-policy %s: %s Redis may evict %s. Set maxmemory-policy "
        "noeviction, or give girder a Redis server of its own with noeviction (a database of the same server "
        "shares its policy and memory).",
        url, policy, full, _EVICTS[kind],
    )  # fmt: skip


class MessageCheck(bootsteps.StartStopStep):
    """Puts the strategies of plain Celery tasks behind girder's message check (messages.py), so
    that a malformed message of any task is refused and logged, never fatal to the node.

    A consumer step after Celery's ``Tasks``, which builds the strategies at each (re)start.
    Girder tasks' own strategy checks already (``GirderTask.Strategy``).
    """

    label = "Girder message check"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c: Any) -> None:
        for name, handler in list(c.strategies.items()):
            if not getattr(handler, "girder_checked", False):
                c.strategies[name] = checked(c.app.tasks[name], handler)


class Hoister(bootsteps.StartStopStep):
    """Copies this node's stale offers up the pool tree: a pass when the oldest offer left is
    due, every half to whole ``girder_hoist_after`` (``Offers.hoist``), and one at once when a
    waiter of this process made some of its offers due early (``Offers.hoist_now``).

    It runs in a thread of its own (a greenlet under gevent), not on the worker's timer: under
    ``-P solo`` the timer shares the thread that runs tasks, and an overburdened node is exactly
    one whose executors are all busy.
    """

    label = "Girder hoister"
    requires = (GirderStep,)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        self.stopping = threading.Event()
        self.wake: threading.Event | None = None
        super().__init__(worker, **kwargs)

    def start(self, worker: Any) -> None:
        runtime = runtime_of(worker.app)
        settings, offers = runtime.settings, runtime.offers
        if not settings.hoist_after:
            return
        tiers = offers.hoist_tiers = [offers.node_queue(worker.hostname), *settings.pool_chain(runtime.node_pool)]
        self.stopping.clear()
        self.wake = offers.hoist_now
        args = (offers, tiers, settings.hoist_after / 2)
        threading.Thread(target=self._run, args=args, name="girder-hoister", daemon=True).start()

    def _run(self, offers: Offers, tiers: list[str], first: float) -> None:
        wait = first
        while not self.stopping.is_set():
            offers.hoist_now.wait(wait)
            offers.hoist_now.clear()
            if not self.stopping.is_set():
                wait = offers.hoist(tiers)

    def stop(self, worker: Any) -> None:
        self.stopping.set()
        if self.wake is not None:
            self.wake.set()


def install(runtime: Runtime) -> None:
    """Install girder's worker bootsteps, option and signal handlers on ``runtime.app``."""
    app = runtime.app
    app.girder_runtime = runtime
    app.steps["worker"].add(GirderStep)
    app.steps["worker"].add(Hoister)
    app.steps["consumer"].add(MessageCheck)
    install_revoke(runtime)
    app.user_options["worker"].add(
        click.Option(
            ["--girder-pool"],
            default=None,
            help="The girder pool (a queue) this node belongs to; default: girder_pool, else Celery's default queue.",
        )
    )

    def on_unknown_task(sender: Any = None, message: Any = None, name: str = "", id: str = "", **_: Any) -> None:
        if getattr(sender, "app", None) is not app or not is_key(id):
            return
        try:
            runtime.runner.refuse_unknown(id, name, getattr(sender, "hostname", None) or "this worker")
        except redis.RedisError:
            logger.warning("girder: could not fail request %s of unknown task %r", id, name, exc_info=True)

    signals.task_unknown.connect(on_unknown_task, weak=False)

    def on_task_failure(sender: Any = None, task_id: str = "", exception: Any = None, **kwargs: Any) -> None:
        # Celery's pool ended a girder request at its hard time limit (Request.on_timeout).
        if getattr(sender, "runtime", None) is not runtime or not isinstance(exception, TimeLimitExceeded):
            return
        if not is_key(task_id):
            return
        try:
            runtime.runner.fail_timed_out(
                sender, task_id, kwargs.get("args") or (), kwargs.get("kwargs") or {}, exception
            )
        except redis.RedisError:
            logger.warning("girder: could not fail request %s at its hard time limit", task_id, exc_info=True)

    signals.task_failure.connect(on_task_failure, weak=False)

    def on_process_shutdown(**_: Any) -> None:
        # A prefork child ends with os._exit, past atexit: the graphs of what it settled last.
        runtime.runner.leases.finish_walks()

    signals.worker_process_shutdown.connect(on_process_shutdown, weak=False)
