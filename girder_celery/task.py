"""The girder Task base class: keys, ``call``, deduplicated ``apply_async``, and execution.

A girder task is a Celery task whose task id is its request key (invariant 6). Calling it through
girder (``call``, ``delay``, ``apply_async``) goes through the state store first, so a memoized
request sends no message and an identical one in flight is joined rather than repeated
(invariant 1). When a worker receives its message, ``__call__`` claims the key before running.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import celery
from celery.exceptions import Ignore

from . import keys
from .errors import GirderError
from .inline import current_frame

if TYPE_CHECKING:
    from .girder import Girder

__all__ = ["GirderTask", "Request"]


@dataclass(frozen=True)
class Request:
    """A girder request ready to submit: the task, its key and its canonical payload."""

    task: GirderTask
    key: str
    payload: str
    args: tuple
    kwargs: dict
    pool: str | None = None

    @property
    def readable(self) -> str:
        return keys.readable(self.task.name, self.args, self.kwargs)


class GirderTask(celery.Task):
    """Base class of ``@girder.task`` tasks (``Girder`` binds a subclass to itself)."""

    girder: Girder
    #: Part of every key: bump it when the function's meaning changes.
    version: str | None = None
    #: Seconds a done value is kept; None falls back to ``girder_result_ttl``.
    cache_ttl: float | None = None
    #: Memoize failures too; by default they reach every waiter in flight, then are forgotten.
    cache_errors: bool = False
    #: Girder messages are JSON whatever the app's task_serializer (invariant 7).
    serializer = "json"

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
        return self.girder.wait([self.prepare(args, kwargs)])[0]

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
        request already in flight publishes nothing; only a new one sends a message.
        """
        app = self._get_app()
        if app.conf.task_always_eager:
            return super().apply_async(args, kwargs, task_id, producer, link, link_error, shadow, **options)
        request = self.prepare(args or (), kwargs, options.get("queue"))
        frame = current_frame()
        if options.get("retries") and frame is not None and frame.key == request.key:
            # Celery's retry of the request running here: give the claim back, so the retry
            # message is the request's next offer, not a duplicate of this run.
            self.girder.store.release(request.key, frame.owner)
            return super().apply_async(args, kwargs, request.key, producer, link, link_error, shadow, **options)
        if task_id is not None and task_id != request.key:
            raise ValueError(
                f"{self.name}: a girder task's id is its request key {request.key}; got task_id={task_id!r}"
            )
        outcome = self.girder.submit([request], mailbox="", offer=False)[0]
        if outcome.verdict == "offer":
            with self.girder.offering(request):
                return super().apply_async(args, kwargs, request.key, producer, link, link_error, shadow, **options)
        if outcome.verdict == "done":
            self.backend.mark_as_done(request.key, self.girder.decode_value(outcome.data))
        elif outcome.verdict == "failed":
            self.backend.mark_as_failure(request.key, GirderError.from_dict(self.girder.decode_json(outcome.data)))
        return self.AsyncResult(request.key)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        context = self.request
        if context.called_directly or context.is_eager:
            return super().__call__(*args, **kwargs)
        result = self.girder.executor.take_offer(self, context, args, kwargs)
        if result is None:
            # Stale or duplicate offer: the function did not run; leave Celery's state alone.
            raise Ignore()
        return result[0]
