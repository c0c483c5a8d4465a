"""``Girder(app)``: binds girder to a Celery app and is the entry point of its public API.

It owns the settings, the state store client and this process's executor, makes the task base
class and decorator, and publishes offers for new requests. Installing it adds the worker
bootstep and the unknown-task handler, so ``celery -A proj worker`` needs no extra flags.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator
from functools import cached_property
from typing import Any

import redis
from celery import Celery, Signature
from kombu import Exchange, Queue
from kombu.utils import json as kombu_json

from .errors import STORE_UNREACHABLE, GirderConnectionError, GirderError, safe_url
from .execute import Executor
from .inline import current_frame
from .keys import readable_args
from .mirror import Mirror
from .settings import Settings
from .store import Claim, Outcome, StateStore
from .task import GirderTask, Request
from .wait import InlineWait, Wait

__all__ = ["Girder"]

_KEY_RE = re.compile(r"^[0-9a-f]{64}$")

#: ``@girder.task`` options of girder's own; everything else goes to Celery.
GIRDER_OPTIONS = ("version", "cache_ttl", "cache_errors")
#: ``app.task`` options that are not Task attributes: decorator options, and routing and
#: publishing options Celery reads from the task when it sends a message.
_DECORATOR_OPTIONS = {
    "name", "base", "bind", "shared", "lazy", "filter", "autoretry_for", "dont_autoretry_for",
    "retry_kwargs", "retry_backoff", "retry_backoff_max", "retry_jitter", "pydantic",
    "pydantic_strict", "pydantic_context", "pydantic_dump_kwargs", "queue", "routing_key",
    "exchange", "exchange_type", "delivery_mode", "compression", "immediate", "mandatory",
}  # fmt: skip


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
        self._url = url
        self.Task: type[GirderTask] = type("GirderTask", (GirderTask, app.Task), {"girder": self})
        from .worker import install

        install(self)

    # -- configuration and connections -----------------------------------------------------

    @cached_property
    def settings(self) -> Settings:
        """The app's ``girder_*`` settings, read on first use (after the app is configured)."""
        return Settings.from_conf(self.app.conf, self._url)

    @cached_property
    def store(self) -> StateStore:
        s = self.settings
        client = redis.Redis.from_url(
            s.url,
            decode_responses=True,
            socket_connect_timeout=s.connect_timeout,
            socket_timeout=30.0,
        )
        return StateStore(client, s.key_prefix, s.busy_poll)

    @cached_property
    def executor(self) -> Executor:
        return Executor(self)

    @cached_property
    def mirror(self) -> Mirror:
        return Mirror()

    def pause(self) -> None:
        """This thread is about to hop or end: send its mirror copies, read every reply it left
        unread and give its connections back to their pools."""
        self.mirror.flush()
        self.store.idle()
        self.mirror.idle()

    def unload(self) -> None:
        """This thread is about to block: its mirror copies go out now, unawaited. The replies
        it has not read wait for its next call; it keeps its connections meanwhile."""
        self.mirror.flush()

    def between_messages(self) -> None:
        """A message's request is done: unload, as before a block (the thread takes the next
        message); a greenlet ends with its message, so it pauses instead."""
        if self.store.link.green:
            self.pause()
        else:
            self.unload()

    #: Whether this worker sends task events (``-E``); set by the worker bootstep.
    worker_events: bool = False
    #: The pool this worker is a node of, and its number of executors; set by the worker bootstep.
    worker_pool: str | None = None
    worker_concurrency: int = 0

    def node_queue(self, node: str) -> str:
        """The queue of one node (worker hostname): where its sub-requests are offered first."""
        return f"{self.settings.key_prefix}.node.{node}"

    def queue_declaration(self, name: str) -> Queue | str:
        """How to declare queue ``name``: a node queue is auto-deleted with its node (a dead
        node's offers are recovered by their waiters), a pool is Celery's to declare."""
        if name.startswith(f"{self.settings.key_prefix}.node."):
            return Queue(name, Exchange(name, type="direct"), routing_key=name, auto_delete=True)
        return name

    def connection_error(self, exc: BaseException) -> GirderConnectionError:
        url = safe_url(self.settings.url)
        return GirderConnectionError(f"cannot reach girder's state store at {url}: {exc}", url=url)

    @property
    def edge_ttl_seconds(self) -> float:
        """How long a waits-for edge outlives its last refresh: renewals and re-submissions
        refresh it, so it goes only when its requester has died."""
        return 2 * self.settings.lease_seconds + self.settings.check_interval

    def result_ttl_ms(self, task: GirderTask) -> int:
        ttl = task.cache_ttl if task.cache_ttl is not None else self.settings.result_ttl
        return int(ttl * 1000) if ttl else 0

    def error_ttl_ms(self, task: GirderTask) -> int:
        return self.result_ttl_ms(task) if task.cache_errors else int(self.settings.error_ttl * 1000)

    # -- JSON-family values (invariant 7) ----------------------------------------------------

    @staticmethod
    def encode_value(value: Any) -> str:
        return kombu_json.dumps(value)

    @staticmethod
    def decode_value(text: str) -> Any:
        return kombu_json.loads(text)

    encode_json = encode_value
    decode_json = decode_value

    # -- tasks ------------------------------------------------------------------------------

    def task(self, *args: Any, **options: Any) -> Any:
        """Decorator making a girder task: ``@girder.task`` or ``@girder.task(**options)``.

        Takes every Celery task option, plus ``version`` (str, part of the key), ``cache_ttl``
        (seconds a done value is kept) and ``cache_errors`` (memoize failures, default False).
        """
        _validate_task_options(options)
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
        return self.wait(prepared, timeout, return_exceptions)

    def wait(self, requests: list[Request], timeout: float | None = None, return_exceptions: bool = False) -> list[Any]:
        """Submit prepared requests and wait for them (used by ``task.call`` and ``requests``)."""
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
            raise ValueError(f"timeout must be a positive number of seconds or None, not {timeout!r}")
        if not requests:
            return []
        frame = current_frame()
        if frame is None:
            return Wait(self, requests, timeout).run(return_exceptions)
        return InlineWait(self, requests, timeout, frame).run(return_exceptions)

    def submit(
        self,
        requests: list[Request],
        mailbox: str,
        offer: bool = True,
        requester: str = "",
        claim: Claim | None = None,
    ) -> list[Outcome]:
        """Submit to the store in one round trip; publish an offer for each new request.

        ``requester`` and ``claim`` are for sub-requests (see ``StateStore.submit``).
        """
        s = self.settings
        edge_ttl_ms = int(self.edge_ttl_seconds * 1000)
        queues = [self.queue_for(r) for r in requests]
        try:
            items = [(r.key, r.payload, r.task.name, r.readable, q) for r, q in zip(requests, queues)]
            outcomes = self.store.submit(items, mailbox, int(s.reoffer_after * 1000), requester, edge_ttl_ms, claim)
        except STORE_UNREACHABLE as exc:
            raise self.connection_error(exc) from exc
        if offer:
            for request, queue, outcome in zip(requests, queues, outcomes):
                if outcome.verdict == "offer":
                    with self.offering(request, queue):
                        self.publish_offer(request.task.name, request.key, request.args, request.kwargs, queue)
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

    def publish_offer(self, name: str, key: str, args: tuple | list, kwargs: dict, queue: str) -> None:
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
        if parent is not None:
            parent_id = parent.request.id
            root_id = parent.request.root_id or parent_id
        message = app.amqp.create_task_message(
            key, name, list(args), kwargs,
            time_limit=time_limit, soft_time_limit=soft_time_limit,
            create_sent_event=app.conf.task_send_sent_event,
            root_id=root_id, parent_id=parent_id, ignore_result=True,
            argsrepr=readable_args(args), kwargsrepr=readable_args(kwargs),
        )  # fmt: skip
        # Celery does not store this offer's result; the executor mirrors it (see mirror.py).
        with app.producer_or_acquire() as producer:
            app.amqp.send_task_message(producer, name, message, headers={"girder_mirror": True}, **options)

    # -- inspection -------------------------------------------------------------------------

    def key_of(self, sig_or_key: Signature | str) -> str:
        """The key of a signature, or a key given as its 64 hex digits."""
        if isinstance(sig_or_key, str):
            if not _KEY_RE.match(sig_or_key):
                raise ValueError(f"not a girder key (64 lowercase hex digits): {sig_or_key!r}")
            return sig_or_key
        return self._prepare(sig_or_key, None).key

    def state(self, sig_or_key: Signature | str) -> dict[str, Any]:
        """What the store knows of a request: ``state`` (absent, queued, running, done,
        failed), ``owner``, ``node``, ``ran_by``, ``attempts``, ``offers``, ``pool``,
        ``request``, the ``created_at``/``offered_at``/``started_at``/``finished_at``
        timestamps (seconds since the epoch), and where it ran: ``placement`` (``inline`` in
        a waiter, ``local`` from the queue it was offered on, ``hoisted`` from a copy sent up
        a tier), ``claimed_via`` (that queue) and ``hoists`` (copies made)."""
        key = self.key_of(sig_or_key)
        try:
            record = self.store.record(key)
        except STORE_UNREACHABLE as exc:
            raise self.connection_error(exc) from exc
        return _describe(key, record)

    def offers(self, queue: str, limit: int = 20) -> tuple[int, int, list[tuple[str, int, str | None]]]:
        """The offers waiting on ``queue`` (a node queue or a pool): how many, Redis's clock in
        ms, and the ``limit`` oldest as ``(key, offered at ms, readable request)``."""
        if not isinstance(queue, str) or not queue:
            raise TypeError(f"queue must be a queue name, not {queue!r}")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be a positive int, not {limit!r}")
        try:
            total, now_ms, oldest = self.store.offers(queue, limit)
            requests = self.store.requests_of([key for key, _ in oldest]) if oldest else []
        except STORE_UNREACHABLE as exc:
            raise self.connection_error(exc) from exc
        return total, now_ms, [(key, at, request) for (key, at), request in zip(oldest, requests)]

    def forget(self, sig_or_key: Signature | str) -> bool:
        """Drop a settled request's memoized value or error; True if there was one.

        A request still queued or running is left alone (its waiters are owed an answer).
        """
        key = self.key_of(sig_or_key)
        try:
            return self.store.forget(key) in ("done", "failed")
        except STORE_UNREACHABLE as exc:
            raise self.connection_error(exc) from exc


def _describe(key: str, record: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {"key": key, "state": record.get("state", "absent")}
    for field in ("request", "name", "owner", "node", "ran_by", "placement", "claimed_via"):
        out[field] = record.get(field) or None
    out["pool"] = record.get("pool") or None
    for field in ("attempts", "offers", "hoists"):
        out[field] = int(record.get(field, 0))
    for field in ("created_at", "offered_at", "started_at", "finished_at", "lease_until"):
        out[field] = int(record[field]) / 1000 if record.get(field) else None
    return out


def _validate_task_options(options: dict[str, Any]) -> None:
    for name in options:
        if name not in _DECORATOR_OPTIONS and name not in GIRDER_OPTIONS and not hasattr(GirderTask, name):
            raise TypeError(
                f"unknown task option {name!r}: girder.task takes Celery's task options and {GIRDER_OPTIONS}"
            )
    version = options.get("version")
    if version is not None and (not isinstance(version, str) or not version):
        raise TypeError(f"version must be a non-empty str, not {version!r}")
    ttl = options.get("cache_ttl")
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or ttl <= 0):
        raise TypeError(f"cache_ttl must be a positive number of seconds or None, not {ttl!r}")
    if "cache_errors" in options and not isinstance(options["cache_errors"], bool):
        raise TypeError(f"cache_errors must be True or False, not {options['cache_errors']!r}")
