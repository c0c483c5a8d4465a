"""Offers: submitting requests to the state store and publishing their broker messages.

An offer is a Celery message saying a request may be claimed; it is never the truth (invariant
1). The store records each offer before it is sent, and a message the broker refuses is
withdrawn, so no request is left queued with no message. Routing decides where an offer goes:
a request's own pool, else ``girder_pool``, else Celery's routing; a sub-request is offered on
its node's own queue first, and the hoister copies an offer that waits too long up a tier.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from functools import cached_property

import redis
from celery import Celery
from kombu import Exchange, Queue

from .errors import GirderError
from .keys import Request, decode_payload, readable_args
from .settings import Settings
from .store import Claimant, Outcome, StateStore, Verdict

__all__ = ["Offers"]

logger = logging.getLogger(__name__)


class Offers:
    """Submits requests and publishes their offers for one Celery app."""

    def __init__(self, app: Celery, settings: Settings, store: StateStore) -> None:
        self.app = app
        self.settings = settings
        self.store = store
        self._node_prefix = f"{settings.key_prefix}.node."
        #: Whether the hoister's last pass failed (its next failure is logged without a traceback).
        self._hoisting_failed = False
        #: Set when offers of this process were made due early (``hoist_early``): the hoister
        #: of this process, if it runs one, passes at once instead of at its next tick.
        self.hoist_now = threading.Event()
        #: The tiers this process's hoister passes up (its node's queue, pool and the pool's
        #: ancestors), set as it starts; None where no hoister runs.
        self.hoist_tiers: list[str] | None = None

    def submit(
        self,
        requests: list[Request],
        mailbox: str,
        offer: bool = True,
        requester: str = "",
        claimant: Claimant | None = None,
        reoffer: bool = False,
        queue: str | None = None,
        recheck: bool = False,
        requester_owner: str = "",
    ) -> list[Outcome]:
        """Submit to the store in one round trip; publish an offer for each new request.

        ``requester`` (with the owner token of its run, ``requester_owner``) and ``claimant`` are
        for sub-requests, ``recheck`` for a waiter's periodic check (see ``StateStore.submit``);
        ``reoffer`` offers again at once each request still queued, however recently offered;
        ``queue`` is where requests without a pool of their own go (a waiter's node queue).
        """
        s = self.settings
        queues = [queue if queue and not r.pool else self.queue_for(r) for r in requests]
        reoffer_after_ms = 0 if reoffer else s.reoffer_after_ms
        with self.store.reachable():
            items = [(r.key, r.payload, r.task.name, r.readable, q) for r, q in zip(requests, queues)]
            outcomes = self.store.submit(
                items, mailbox, reoffer_after_ms, requester, s.edge_ttl_ms, claimant, recheck, requester_owner
            )
        if offer:
            for request, queue, outcome in zip(requests, queues, outcomes):
                if outcome.verdict is Verdict.OFFER:
                    with self.offering(request, queue):
                        self.publish(request.task.name, request.key, request.args, request.kwargs, queue)
        return outcomes

    @contextlib.contextmanager
    def offering(self, request: Request, queue: str | None = None) -> Iterator[str]:
        """Around publishing the offer the store recorded for ``request`` on ``queue`` (default
        ``queue_for(request)``): if publishing fails, the offer is withdrawn, so the request is
        not left queued with no message, and a ``GirderError`` names the queue."""
        queue = queue or self.queue_for(request)
        try:
            yield queue
        except Exception as exc:
            with contextlib.suppress(redis.RedisError):  # else re-offered after girder_reoffer_after
                self.store.unoffer(request.key, queue)
            raise GirderError(
                f"could not offer {request.readable} to queue {queue!r}: {type(exc).__name__}: {exc}",
                key=request.key,
                request=request.readable,
            ) from exc

    # -- routing -----------------------------------------------------------------------------

    def queue_for(self, request: Request) -> str:
        """The queue (pool) a request is offered on: its ``pool``, else ``girder_pool``, else
        Celery's routing for the task (``task_routes``, the task's ``queue``, the default)."""
        if request.pool:
            return request.pool
        if self.settings.pool:
            return self.settings.pool
        task = request.task
        if self._default_queue is not None:
            return getattr(task, "queue", None) or self._default_queue
        options = {k: v for k, v in task._get_exec_options().items() if v is not None}
        route = self.app.amqp.router.route(options, task.name, request.args, request.kwargs, task)
        return route["queue"].name

    @cached_property
    def _default_queue(self) -> str | None:
        """Celery's default queue where no ``task_routes`` are set (then only a task's own
        ``queue`` routes it), else None. Read once, as Celery's router reads its routes."""
        conf = self.app.conf
        return None if conf.task_routes else conf.task_default_queue

    def node_queue(self, node: str) -> str:
        """The queue of one node (worker hostname): where its sub-requests are offered first."""
        return f"{self._node_prefix}{node}"

    def queue_declaration(self, name: str) -> Queue | str:
        """How to declare queue ``name``: a node queue is auto-deleted with its node (a dead
        node's offers are recovered by their waiters), a pool is Celery's to declare."""
        if name.startswith(self._node_prefix):
            return Queue(name, Exchange(name, type="direct"), routing_key=name, auto_delete=True)
        return name

    # -- messages ----------------------------------------------------------------------------

    def publish(self, name: str, key: str, args: tuple | list, kwargs: dict, queue: str) -> None:
        """Send an offer of request ``key`` of task ``name`` to ``queue``: an original or a copy.

        This is Celery's ``send_task`` minus the result-backend subscription: girder's waiter
        hears from the state store, so no client-side result consumer is left behind.
        """
        app = self.app
        task = app.tasks.get(name)
        options = {k: v for k, v in task._get_exec_options().items() if v is not None} if task else {}
        options["queue"] = self.queue_declaration(queue)
        time_limit = options.pop("time_limit", None)
        soft_time_limit = options.pop("soft_time_limit", None)
        options.pop("expires", None)  # an expired offer would be a lost one
        options = app.amqp.router.route(options, name, args, kwargs, task)
        parent = app.current_worker_task
        root_id = parent_id = None
        if parent is not None and parent.request.id != key:  # not an offer its own run sends again
            parent_id = parent.request.id
            root_id = parent.request.root_id or parent_id
        message = app.amqp.create_task_message(
            key, name, list(args), kwargs,
            time_limit=time_limit, soft_time_limit=soft_time_limit,
            create_sent_event=app.conf.task_send_sent_event,
            root_id=root_id, parent_id=parent_id, ignore_result=True,
            argsrepr=readable_args(args), kwargsrepr=readable_args(kwargs),
        )  # fmt: skip
        # Celery does not store this offer's result; the runner mirrors it (see mirror.py).
        with app.producer_or_acquire() as producer:
            app.amqp.send_task_message(producer, name, message, headers={"girder_mirror": True}, **options)

    def hoist_early(self, tier: str, keys: list[str], here: bool = False) -> None:
        """Offers of ``keys`` on ``tier`` are expected to wait longer than ``girder_hoist_after``:
        make them due now and wake the hoister, or, ``here``, pass on the calling thread instead:
        a waiter about to submit the rest of a wide fan-out would hold the hoister off the
        interpreter (its thread needs the GIL for every copy) and Redis (a pipeline of submits)
        for as long as that takes. A Redis error is only logged: they are due as they age anyway."""
        try:
            self.store.make_due(tier, keys)
        except redis.RedisError as exc:
            logger.info("girder: could not hoist %d offer(s) early (%s); they go as they age", len(keys), exc)
            return
        if here and self.hoist_tiers:
            self.hoist(self.hoist_tiers)
        else:
            self.hoist_now.set()

    def hoist(self, tiers: list[str]) -> float:
        """One pass up ``tiers`` (node queue, pool, ancestors): copy the offers that waited
        longer than ``girder_hoist_after`` to the nearest tier above that keeps up. Returns how
        long to wait for the next pass (s): until the oldest offer left is due, but at least
        half ``girder_hoist_after`` and at most all of it, so that no offer is hoisted later
        than half ``girder_hoist_after`` after it is due, and an idle node passes ten times a
        second at the default. A Redis or broker error is logged, the first of a run of them
        with its traceback (the passes come up to twenty times a second), and the next pass
        tries again after the shortest wait."""
        after = self.settings.hoist_after
        due_in = after / 2
        try:
            hoisted = self.store.hoist(tiers, self.settings.hoist_after_ms)
            due_in = hoisted.due_in_ms / 1000
            for queue, key, name, payload in hoisted.copies:
                try:
                    args, kwargs = decode_payload(payload)
                except Exception:  # a corrupt record must not cost the rest of the pass their copies
                    logger.warning("girder: not hoisting %s[%s]: its payload does not decode", name, key)
                    continue
                self.publish(name, key, args, kwargs, queue)
        except Exception as exc:
            if self._hoisting_failed:
                logger.debug("girder: hoisting failed again: %s", exc)
            else:
                logger.warning("girder: hoisting failed; will retry every pass", exc_info=True)
            self._hoisting_failed = True
        else:
            if self._hoisting_failed:
                logger.info("girder: hoisting works again")
            self._hoisting_failed = False
        return min(max(due_in, after / 2), after)
