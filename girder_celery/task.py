"""The girder Task base class: keys, ``call``, deduplicated ``apply_async``, and execution.

A girder task is a Celery task whose task id is its request key (invariant 6). Calling it through
girder (``call``, ``delay``, ``apply_async``) goes through the state store first, so a memoized
request sends no message and an identical one in flight is joined rather than repeated
(invariant 1). When a worker receives its message, ``__call__`` hands it to the runner, which
claims the key before running. A canvas step's id is an *alias* of the key: its message is
answered with the request's outcome, which runs once, under its key. With Celery's
``task_always_eager``, ``call``, ``apply_async`` and ``apply`` run the request in this process
instead (``eager.py``). ``validate_options`` checks ``@girder.task``'s options.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import cached_property
from typing import Any

import celery
from celery.exceptions import Ignore

from . import keys
from .errors import CORRUPT
from .execute import Answer
from .frame import current_frame
from .keys import Request
from .runtime import Runtime
from .store import Verdict

__all__ = ["GIRDER_OPTIONS", "GirderTask", "refuse_timing", "validate_options"]

#: Celery's builtin tasks that call a task directly for each item of a list.
_MAP_TASKS = ("celery.map", "celery.starmap")
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


class GirderTask(celery.Task):
    """Base class of ``@girder.task`` tasks (``Girder`` binds a subclass to its runtime)."""

    runtime: Runtime
    #: Part of every key: bump it when the function's meaning changes.
    version: str | None = None
    #: Seconds a done value is kept; None falls back to ``girder_result_ttl``.
    cache_ttl: float | None = None
    #: Memoize failures too; by default they reach every waiter in flight, then are forgotten.
    cache_errors: bool = False
    #: Girder messages are JSON whatever the app's task_serializer (invariant 7).
    serializer = "json"
    #: Each message's shape is checked before Celery's default strategy unpacks it: a malformed
    #: one is refused and logged, never fatal to the node (messages.py).
    Strategy = "girder_celery.messages:strategy"

    @cached_property
    def _bind(self) -> Callable[[tuple | list, dict], tuple[tuple, dict]]:
        try:
            signature = inspect.signature(self.run)
        except (TypeError, ValueError):
            signature = None
        return keys.binder(signature)

    def prepare(self, args: tuple | list = (), kwargs: dict | None = None, pool: str | None = None) -> Request:
        """Bind, validate and encode a call; ``TypeError`` before anything is sent."""
        if not isinstance(args, (tuple, list)):
            raise TypeError(f"{self.name}: args must be a tuple or list, not {type(args).__name__}")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise TypeError(f"{self.name}: kwargs must be a dict, not {type(kwargs).__name__}")
        try:
            bargs, bkwargs = self._bind(args, kwargs or {})
        except TypeError as exc:
            raise TypeError(f"{self.name}(): {exc}") from None
        payload = keys.encode_payload(bargs, bkwargs)
        return Request(self, keys.key_of_payload(self.name, self.version, payload), payload, bargs, bkwargs, pool)

    def key(self, *args: Any, **kwargs: Any) -> str:
        """The request key of ``self(*args, **kwargs)``; also its Celery task id."""
        return self.prepare(args, kwargs).key

    def call(self, *args: Any, **kwargs: Any) -> Any:
        """Request ``self(*args, **kwargs)`` on the grid and return its value.

        Raises ``GirderError`` if it failed, ``GirderTimeout`` past ``girder_request_timeout``.
        """
        return self.runtime.wait([self.prepare(args, kwargs)])[0]

    def apply_async(
        self,
        args=None,
        kwargs=None,
        task_id=None,
        producer=None,
        link=None,
        link_error=None,
        shadow=None,
        **options,
    ):
        """Celery's ``apply_async`` with the key as task id, deduplicated through the store.

        A done request publishes nothing and its value is (re)stored in the result backend; a
        request already in flight publishes nothing; only a new one sends a message. With
        ``rpc://`` a request in flight was sent by someone else, who alone hears its answer.
        Callbacks (``link``, ``link_error``, a chain, a chord) need a message to fire from: one
        is sent for a request done or in flight too, and its node answers it with the outcome.
        A ``task_id`` that is not a key is an alias (a canvas step's id): its message is sent
        as it is, and its node answers it (``Runtime.answer``).
        """
        app = self._get_app()
        if app.conf.task_always_eager:  # run here, memoized in process (eager.py); no broker
            return self.runtime.eager.apply(self, args, kwargs, task_id, link=link, link_error=link_error, **options)
        request = self.prepare(args or (), kwargs, options.get("queue"))
        runtime = self.runtime
        frame = current_frame()
        if options.get("retries") and frame is not None and frame.key == request.key:
            if getattr(self.request, "girder_inline", None) is not None:
                # Celery's retry of an inline run: its waiter runs it again once due, under its
                # claim (inline.py); there is no message to send.
                return self.AsyncResult(request.key)
            # Celery's retry of the request running here: give the claim back, so the retry
            # message is the request's next offer, not a duplicate of this run.
            runtime.store.release(request.key, frame.owner)
            return super().apply_async(args, kwargs, request.key, producer, link, link_error, shadow, **options)
        refuse_timing(self.name, options)
        if task_id is not None and task_id != request.key:
            if keys.is_key(task_id):  # another request's key: it must answer only its own value
                raise ValueError(
                    f"{self.name}: task_id {task_id} is a girder key, not this request's {request.key}; "
                    "a girder task's id is its request key, or an alias that is no key"
                )
            # An alias (a canvas step's id): its message is answered with the request's outcome by
            # the node that takes it, which runs the request (once, under its key) if nobody has.
            return super().apply_async(args, kwargs, task_id, producer, link, link_error, shadow, **options)
        outcome = runtime.offers.submit([request], mailbox="", offer=False)[0]
        if outcome.verdict is Verdict.OFFER:
            # The backend may hold an older run's copy (forgotten, expired): Celery's worker would
            # not write over its SUCCESS, and this run's outcome must be what get() answers.
            runtime.mirror.forget(self.backend, request.key)
            with runtime.offers.offering(request):
                return super().apply_async(args, kwargs, request.key, producer, link, link_error, shadow, **options)
        self._store_settled(request, outcome)
        if link or link_error or options.get("chain") or options.get("chord"):
            # Callbacks fire as a message is answered: this one's node answers it with the outcome
            # (settled, or when the run going on ends) instead of skipping it as a duplicate.
            return super().apply_async(args, kwargs, request.key, producer, link, link_error, shadow, **options)
        return self.AsyncResult(request.key)

    def _store_settled(self, request: Request, outcome: Any) -> None:
        # A settled request's outcome is stored again, over whatever copy the backend holds (an
        # older value, or none after result_expires), so AsyncResult(key) tells the store's.
        if outcome.verdict is Verdict.DONE:
            self.runtime.mirror.answer(self, request.key, outcome.value(request))
        elif outcome.verdict is Verdict.FAILED or outcome.verdict is Verdict.CORRUPT:
            error = outcome.error(request)
            if error.exc_type == CORRUPT:  # the store's fault, not the request's: the caller hears of it
                raise error
            self.runtime.mirror.answer(self, request.key, error=error)

    def apply(self, args=None, kwargs=None, link=None, link_error=None, task_id=None, **options):
        """Celery's local run; with ``task_always_eager``, a girder request run here and memoized
        in process (eager.py), as canvas primitives and ``apply_async`` run it in eager mode."""
        if not self._get_app().conf.task_always_eager:
            return super().apply(args, kwargs, link, link_error, task_id, **options)
        return self.runtime.eager.apply(self, args, kwargs, task_id, link=link, link_error=link_error, **options)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        context = self.request
        if context.is_eager and (run := self.runtime.eager.running(context.id)) is not None:
            return self.runtime.eager.body(run, self, args, kwargs)
        if context.called_directly or context.is_eager:
            worker_task = self.app.current_worker_task if context.called_directly else None
            if worker_task is not None and worker_task.name in _MAP_TASKS:
                # Celery's map and starmap (and chunks, made of starmaps) call the task directly,
                # item by item, in their own task: each call is a request instead.
                return self.runtime.answer(self.prepare(args, kwargs), worker_task.request)
            return super().__call__(*args, **kwargs)
        result = self.runtime.runner.take_offer(self, context, args, kwargs)
        if result is None:
            # Stale or duplicate offer: the function did not run; leave Celery's state alone.
            raise Ignore()
        if isinstance(result, Answer):
            # The request's outcome is what Celery stores under this message's id and hands to
            # its callbacks (a failure raises its GirderError, stored and handed on likewise).
            return self.runtime.answer(result.request, context)
        return result[0]


#: ``apply_async`` options a girder request refuses (see ``refuse_timing``).
_REFUSED_TIMING = ("expires", "countdown", "eta")


def refuse_timing(name: str, options: dict[str, Any]) -> None:
    """Refuse ``expires``, ``countdown`` and ``eta`` for a girder request: it is memoized and
    shared, so one caller's expiry or delay would drop or hold every caller's request, and its
    offers are copied and sent again (hoisted, re-offered, claimed inline) with no delay."""
    for option in _REFUSED_TIMING:
        if options.get(option) is not None:
            raise ValueError(
                f"{name}: a girder request takes no {option}= (it is shared by every caller of the same "
                "request): use girder.cancel(key) or revoke() to stop one, and timeout= to bound a wait"
            )


def validate_options(options: dict[str, Any]) -> None:
    """Refuse an unknown ``@girder.task`` option, or a bad value of one of girder's own."""
    if options.get("expires") is not None:
        raise TypeError("girder.task takes no expires=: a girder request never expires (girder.cancel stops one)")
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
