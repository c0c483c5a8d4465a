"""``Girder(app)``: binds girder to a Celery app and is the entry point of its public API.

It builds the app's ``Runtime`` (settings, state store, offers, mirror, runner), makes the task
base class and decorator, and answers the public calls: ``request(s)``, ``state``, ``forget``,
``offers``, ``forget_task``, ``cancel``, and the reports: ``graph``, ``progress``, ``stats``, ``active``.
Installing it adds the worker bootsteps and the unknown-task handler, so ``celery -A proj worker``
needs no extra flags.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import redis
from celery import Celery, Signature

from . import graph, records
from .cancel import cancel
from .errors import GirderError, corrupt
from .keys import Request, check_key
from .runtime import Runtime
from .settings import Settings
from .store import StateStore, Verdict
from .task import GirderTask, validate_options
from .worker import install

__all__ = ["Girder"]


class Girder:
    """Girder installed on a Celery app.

    Args:
        app: the Celery app whose broker, routing and result backend girder uses.
        url: Redis URL of the state store; defaults to ``app.conf.girder_url``.
    """

    def __init__(self, app: Celery, url: str | None = None) -> None:
        if not isinstance(app, Celery):
            raise TypeError(f"Girder needs a Celery app, not {type(app).__name__}")
        if url is not None and not isinstance(url, str):
            raise TypeError(f"url must be a str, not {type(url).__name__}")
        self.app = app
        self.runtime = Runtime(app, url)
        self.Task: type[GirderTask] = type("GirderTask", (GirderTask, app.Task), {"runtime": self.runtime})
        app.girder = self
        install(self.runtime)

    @property
    def settings(self) -> Settings:
        """The app's ``girder_*`` settings, read on first use (after the app is configured)."""
        return self.runtime.settings

    @property
    def store(self) -> StateStore:
        """The state store (Redis) client."""
        return self.runtime.store

    # -- tasks ------------------------------------------------------------------------------

    def task(self, *args: Any, **options: Any) -> Any:
        """Decorator making a girder task: ``@girder.task`` or ``@girder.task(**options)``.

        Takes every Celery task option, plus ``version`` (str, part of the key), ``cache_ttl``
        (seconds a done value is kept) and ``cache_errors`` (memoize failures, default False).
        """
        validate_options(options)
        base = options.pop("base", None)
        if base is None:
            base = self.Task
        elif not issubclass(base, GirderTask):
            base = type(f"Girder{base.__name__}", (self.Task, base), {})
        options["base"] = base
        # A girder task belongs to this Girder's app: Celery's default shared=True would
        # register it on every other app too, bound to the wrong state store.
        options.setdefault("shared", False)
        if len(args) == 1 and callable(args[0]):
            return self.app.task(args[0], **options)
        if args:
            raise TypeError("girder.task takes the function or keyword options, not positional options")
        return self.app.task(**options)

    def _task_for(self, sig: Any) -> GirderTask:
        if not isinstance(sig, Signature):
            raise TypeError(f"expected a signature such as task.s(...), got {type(sig).__name__}: {sig!r}")
        task = self.app.tasks.get(sig.task)
        if task is None:
            raise GirderError(f"no task named {sig.task!r} is registered with this app")
        if not isinstance(task, GirderTask):
            raise TypeError(f"{sig.task} is not a girder task; decorate it with @girder.task")
        return task

    def _prepare(self, sig: Any, pool: str | None) -> Request:
        if pool is not None and (not isinstance(pool, str) or not pool):
            raise TypeError(f"pool must be a queue name, not {pool!r}")
        task = self._task_for(sig)
        return task.prepare(sig.args, sig.kwargs, pool or sig.options.get("queue"))

    # -- requests ---------------------------------------------------------------------------

    def request(self, sig: Signature, timeout: float | None = None, pool: str | None = None) -> Any:
        """Request ``sig`` (e.g. ``add.s(1, 2)``) and return its value.

        Args:
            sig: a signature of a girder task.
            timeout: seconds to wait; default ``girder_request_timeout``.
            pool: queue to offer it to; default ``girder_pool``, then Celery's routing.

        Raises:
            GirderError: the request failed (its chain names the failing sub-requests).
            GirderTimeout: the timeout passed first.
            GirderConnectionError: the state store cannot be reached.
        """
        return self.requests([sig], timeout=timeout, pool=pool)[0]

    def requests(
        self,
        sigs: Iterable[Signature],
        timeout: float | None = None,
        pool: str | None = None,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """Request every signature at once and return their values in order.

        With ``return_exceptions`` a failed request's ``GirderError`` takes its place in the
        list; otherwise the first failure seen is raised.
        """
        if isinstance(sigs, (Signature, str, bytes)) or not isinstance(sigs, Iterable):
            raise TypeError("requests() takes an iterable of signatures, e.g. [add.s(1, 2), add.s(3, 4)]")
        prepared = [self._prepare(sig, pool) for sig in sigs]
        return self.runtime.wait(prepared, timeout, return_exceptions)

    def node_queue(self, node: str) -> str:
        """The queue of one node (a worker's hostname), where its sub-requests are offered
        first; give it as ``pool`` to offer a request to that node."""
        return self.runtime.offers.node_queue(node)

    # -- inspection -------------------------------------------------------------------------

    def key_of(self, sig_or_key: Signature | str) -> str:
        """The key of a signature, or a key given as its 64 hex digits."""
        if isinstance(sig_or_key, str):
            return check_key(sig_or_key)
        return self._prepare(sig_or_key, None).key

    def state(self, sig_or_key: Signature | str) -> dict[str, Any]:
        """What the store knows of a request: ``state`` (absent, queued, running, done,
        failed), ``owner``, ``node``, ``ran_by``, ``attempts``, ``offers``, ``pool``,
        ``request``, the ``created_at``/``offered_at``/``started_at``/``finished_at``
        timestamps (seconds since the epoch; ``cancelled_at`` too, for a cancelled request),
        and where it ran: ``placement`` (``inline`` in a waiter, ``local`` from the queue it was
        offered on, ``hoisted`` from a copy sent up a tier), ``claimed_via`` (that queue),
        ``hoists`` (copies made) and ``parent`` (the request it was first asked for by, or
        claimed inline by; None at top level). A corrupt record raises a ``GirderError`` naming
        the key and what is wrong. In eager mode (``task_always_eager``) it reports the
        in-process memo instead (placement ``eager``)."""
        key = self.key_of(sig_or_key)
        if self.app.conf.task_always_eager:
            return self.runtime.eager.state(key)
        with self.store.reachable():
            try:
                record = self.store.record(key)
            except redis.ResponseError as exc:
                if "WRONGTYPE" not in str(exc):
                    raise
                kind = self.store.client.type(self.store.record_key(key))
                raise corrupt(key, f"its key holds a {kind}, not a hash") from None
        return _describe(key, record)

    def cancel(self, sig_or_key: Signature | str) -> list[str]:
        """Cancel a request in flight and every sub-request of it that no other live request
        waits for: the keys cancelled, the request's first (empty if it was not queued or
        running: settled, or unknown to the store).

        Their waiters get a ``GirderCancelled`` at once; queued ones never run; running ones
        stop at their next girder call at the latest, and a run from its own message on a
        prefork node is terminated (the node lives on). A sub-request another live request waits
        for goes on for it. Nothing is memoized: the same request made afterwards runs afresh.
        Celery's ``revoke`` of a girder key does the same. In eager mode nothing is in flight
        elsewhere: it cancels nothing.
        """
        key = self.key_of(sig_or_key)
        if self.app.conf.task_always_eager:
            return []
        return cancel(self.runtime, key)

    def offers(self, queue: str, limit: int = 20) -> tuple[int, int, list[tuple[str, int, str | None]]]:
        """The offers waiting on ``queue`` (a node queue or a pool): how many, Redis's clock in
        ms, and the ``limit`` oldest as ``(key, offered at ms, readable request)``."""
        if not isinstance(queue, str) or not queue:
            raise TypeError(f"queue must be a queue name, not {queue!r}")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be a positive int, not {limit!r}")
        store = self.store
        with store.reachable():
            total, now_ms, oldest = store.offers(queue, limit)
            requests = store.requests_of([key for key, _ in oldest]) if oldest else []
        return total, now_ms, [(key, at, request) for (key, at), request in zip(oldest, requests)]

    def forget(self, sig_or_key: Signature | str) -> bool:
        """Drop a settled request's memoized value or error, or a corrupt record (see
        ``state``); True if there was one, and the next request computes it afresh.

        A request still queued or running is left alone (its waiters are owed an answer).
        Otherwise the result backend's copy goes too, so ``AsyncResult(key)`` does not tell
        the forgotten outcome (Celery's backends never write over a stored SUCCESS). In eager
        mode (``task_always_eager``) it drops the request from the in-process memo.
        """
        key = self.key_of(sig_or_key)
        if self.app.conf.task_always_eager:
            return self.runtime.eager.forget(key)
        with self.store.reachable():
            verdict = self.store.forget(key)
        if verdict in _FORGOTTEN or verdict is Verdict.ABSENT:
            self.runtime.mirror.forget(self.app.backend, key)
        return verdict in _FORGOTTEN

    def forget_task(self, name: str, version: str | None = None) -> int:
        """Forget every memoized value or error of task ``name``, or of its ``version`` only,
        as ``forget`` does one (the result backend's copies too); requests in flight are left
        alone. Walks the store in bounded batches (``SCAN``). Returns how many were forgotten."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"name must be a task name, not {name!r}")
        if version is not None and (not isinstance(version, str) or not version):
            raise TypeError(f"version must be a non-empty str or None, not {version!r}")
        forgotten = records.forget_task(self.store, name, version)
        for key in forgotten:
            self.runtime.mirror.forget(self.app.backend, key)
        return len(forgotten)

    # -- reports ----------------------------------------------------------------------------

    def graph(self, sig_or_key: Signature | str) -> dict[str, Any]:
        """The graph of a request that made sub-requests, as the store recorded it: ``root``
        (its key), ``nodes`` (per distinct request: ``key``, ``request``, ``task``, ``state``,
        ``node``, ``placement``, ``attempts``, ``cached``, ``started_at``, ``finished_at``, in
        ms since the epoch or None) and ``edges`` (``[parent_key, child_key]``, one per pair).

        ``cached`` requests were answered from the store without running for this root (their
        own sub-requests are not walked). While the root runs, it shows what is known so far.
        Kept whole at least ``girder_graph_ttl`` after the root's top-level request (the root
        itself, unless another request asked for it) settles.

        Raises:
            GirderNoGraph: the store knows no such request, it made no sub-requests, or its
                graph expired.
        """
        return graph.read_graph(self.store, self.key_of(sig_or_key))

    def progress(self, sig_or_key: Signature | str) -> dict[str, int]:
        """Counts of the requests in a request's graph so far, the root included: ``done``,
        ``running``, ``queued``, ``failed``, ``cached`` and ``known`` (all of them); a request
        with no sub-requests counts itself alone. Raises ``GirderNoGraph`` for a key the store
        does not know, or whose graph expired."""
        return graph.progress_of(graph.read_graph(self.store, self.key_of(sig_or_key), require_edges=False))

    def stats(self) -> dict[str, Any]:
        """Per task since the last ``reset_stats`` (``since``: seconds since the epoch, None if
        never): ``executions``, ``cache_hits``, ``failures``, ``run_seconds`` and
        ``mean_run_seconds``; and the store's ``records`` and ``memory_bytes`` (its server's)."""
        return records.stats(self.store)

    def reset_stats(self) -> None:
        """Start ``stats``' per-task counters afresh."""
        records.reset_stats(self.store)

    def active(self) -> list[dict[str, Any]]:
        """The requests running across the grid, inline runs included, oldest first: ``key``,
        ``request``, ``task``, ``node``, ``owner``, ``parent``, ``placement``, ``started_at``,
        ``age`` and ``lease`` (seconds left; below 0 once lapsed). Walks the store (``SCAN``)."""
        return records.active(self.store)

    def clear_eager(self) -> int:
        """Empty eager mode's in-process memo (``task_always_eager``; e.g. between tests): every
        request runs afresh. Returns how many settled requests it held. The state store is not
        touched."""
        return self.runtime.eager.clear()


_FORGOTTEN = (Verdict.DONE, Verdict.FAILED, Verdict.CORRUPT)
_STATES = ("absent", "queued", "running", "done", "failed")


def _describe(key: str, record: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {"key": key, "state": record.get("state", "absent")}
    if out["state"] not in _STATES:
        raise corrupt(key, f"its state is unknown: {out['state']:.64}", record.get("request"))
    for field in ("request", "name", "owner", "node", "ran_by", "placement", "claimed_via", "parent"):
        out[field] = record.get(field) or None
    out["pool"] = record.get("pool") or None
    for field in ("attempts", "offers", "hoists"):
        out[field] = _number(key, record, field) or 0
    for field in ("created_at", "offered_at", "started_at", "finished_at", "lease_until", "cancelled_at"):
        ms = _number(key, record, field)
        out[field] = ms / 1000 if ms else None
    return out


def _number(key: str, record: dict[str, str], field: str) -> int | None:
    text = record.get(field)
    try:
        return int(text) if text else None
    except ValueError:
        raise corrupt(key, f"its {field} is not a number: {text:.64}", record.get("request")) from None
