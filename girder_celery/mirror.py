"""Mirroring outcomes into Celery's result backend, off the executor's critical path.

The state store is the truth (invariant 1) and every waiter hears from it; the copy in Celery's
result backend is for ``AsyncResult(key).get()``, Flower and other Celery tools. An inline run
buffers its copy in its own thread (or greenlet), and the buffer is sent in one write when the
executor is about to block, hop or take its next message, or when it holds ``BATCH`` copies or
has held one for ``MAX_AGE`` seconds. A Redis backend's replies are not awaited: they are read
by the thread's next write or pause (``link.py``), so the executor does not wait on the result
backend between requests. A background writer would be simpler but, holding the GIL while it
encodes, delays the executor's every socket read.

A Redis result backend storing plain JSON gets Celery's document built around the value's JSON,
which girder already has; any other backend gets ``store_result`` per result (not ``mark_as_done``,
which skips a request that ignores its result, as every request girder runs does). A copy lost in
a crash is written again by the next ``apply_async`` of the request, which re-stores a done value
(``answer``). A failure is rare and carries its traceback: it is written at once.

The copy tells the store's current outcome (invariant 1): a run completes only when the store
had no outcome, so whatever copy the backend holds is older (a value forgotten, expired, or an
uncached failure). Celery never writes over a stored SUCCESS (``store_result`` reads first and
keeps it), so every copy but the Redis fast path's plain ``SET`` first ``forget``s the old one;
``forget`` also drops Celery's per-process cache of a SUCCESS. With a backend other than Redis
the older copy is forgotten as the run starts (``before_run``), since the new copy is written
after waiters wake; with Redis it stays readable until the fast path writes over it. ``rpc://`` answers only the
sender: a run's copy has none and is not written; ``answer`` sends it to this process.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from datetime import datetime
from typing import Any

from celery import states
from celery.app.task import Context

from .link import Link

__all__ = ["Mirror"]

logger = logging.getLogger(__name__)

#: Most copies buffered before they are written.
BATCH = 256
#: Longest a copy waits in the buffer, in seconds (checked as copies are added).
MAX_AGE = 1.0


class Mirror:
    """Per-thread buffers of ``(task, key, value, value_json, request)`` to copy."""

    def __init__(self) -> None:
        self._local = threading.local()
        #: id(backend) -> whether a run first forgets its older copy (not Redis: see ``before_run``).
        self._forget_first: dict[int, bool] = {}

    def _buffer(self) -> list:
        buffer = getattr(self._local, "buffer", None)
        if buffer is None:
            buffer = self._local.buffer = []
        return buffer

    def put(self, task: Any, key: str, value: Any, value_json: str, request: Any) -> None:
        buffer = self._buffer()
        if not buffer:
            self._local.since = time.monotonic()
        buffer.append((task, key, value, value_json, request))
        if len(buffer) >= BATCH or time.monotonic() - self._local.since > MAX_AGE:
            self.flush()

    def before_run(self, task: Any, key: str) -> None:
        """A run of ``key`` is about to start: with a backend other than Redis, forget any older
        copy now, so that until this run's copy is written ``AsyncResult(key)`` waits rather
        than reading the older one. (Redis's fast path writes over it; the hot path stays as is.)"""
        backend = task.backend
        first = self._forget_first.get(id(backend))
        if first is None:
            from celery.backends.redis import RedisBackend

            first = self._forget_first[id(backend)] = _keeps_copies(backend) and not isinstance(backend, RedisBackend)
        if first:
            self.forget(backend, key)

    def put_failure(self, task: Any, key: str, exc: BaseException, request: Any) -> None:
        """Write the failure of ``key`` now; a failure to write is logged, never raised."""
        backend = task.backend
        if not _keeps_copies(backend):
            return
        try:
            backend.forget(key)  # else a stale SUCCESS stays: Celery never writes over one
            # Celery stores the traceback as text (its tracer passes ExceptionInfo.traceback).
            text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            backend.mark_as_failure(key, exc, text, request=request)
        except Exception:
            logger.warning("girder: could not mirror the failure of %s to the result backend", key, exc_info=True)

    def flush(self) -> None:
        """Send this thread's buffered copies now; a failure is logged, never raised."""
        buffer = getattr(self._local, "buffer", None)
        if not buffer:
            return
        batch = buffer[:]
        buffer.clear()
        try:
            self._write(batch)
        except Exception:
            logger.warning("girder: could not mirror %d result(s) to the result backend", len(batch), exc_info=True)

    def idle(self) -> None:
        """This thread is about to hop or end: read its replies and give its connections back."""
        for target in self._targets().values():
            target.link.idle()

    def _targets(self) -> dict[int, _Target]:
        # This thread's targets, one per Redis backend. Celery's backends (and so their clients
        # and pools) are per thread unless result_backend_thread_safe: the targets go with the
        # thread, or each thread that ended would leave its connection open.
        targets = getattr(self._local, "targets", None)
        if targets is None:
            targets = self._local.targets = {}
        return targets

    def _write(self, batch: list[tuple[Any, str, Any, str, Any]]) -> None:
        from celery.backends.redis import RedisBackend

        by_backend: dict[int, list] = {}
        for item in batch:
            by_backend.setdefault(id(item[0].backend), []).append(item)
        for items in by_backend.values():
            backend = items[0][0].backend
            if isinstance(backend, RedisBackend):
                targets = self._targets()
                target = targets.get(id(backend)) or targets.setdefault(id(backend), _Target(backend))
                target.send(items)
            elif _keeps_copies(backend):
                for _, key, value, _, request in items:
                    backend.forget(key)
                    backend.store_result(key, value, states.SUCCESS, request=request)

    def answer(self, task: Any, key: str, value: Any = None, error: BaseException | None = None) -> None:
        """Store the store's current outcome of ``key`` now (its ``value``, or ``error``) for
        this process's ``AsyncResult``: ``apply_async`` of a settled request. Over any older
        copy; to this process's reply queue with ``rpc://``; nothing without a backend."""
        backend = task.backend
        if _is_disabled(backend):
            return
        # The request this process sends, as Celery's own send_task would: rpc replies to it,
        # and not to the request a worker is running here (Celery's fallback, current_task).
        request = Context(id=key, task=task.name, reply_to=task.app.thread_oid, correlation_id=key)
        if _is_rpc(backend):
            with task.app.producer_or_acquire() as producer:
                backend.on_task_call(producer, key)  # declares this process's reply queue
        self.forget(backend, key)
        if error is None:
            backend.store_result(key, value, states.SUCCESS, request=request)
        else:
            backend.store_result(key, error, states.FAILURE, request=request)

    def forget(self, backend: Any, key: str) -> None:
        """Drop the backend's copy of ``key`` (``girder.forget``, a new offer), and this
        process's rpc replies for it; logs, never raises: the next run's copy is written over it
        anyway, and the store, not the copy, is the truth."""
        if _is_disabled(backend):
            return
        try:
            # A publication of an older copy that reached this process after its get() was
            # answered waits in Celery's buffer, or unread on its subscription's socket, and
            # would answer the next AsyncResult(key): rpc's forget drops it, Redis's does not.
            # (Read first: Redis's forget cancels the subscription the socket belongs to.)
            _read_publications(getattr(backend, "result_consumer", None))
            backend.forget(key)
            buffered = getattr(backend, "_pending_messages", None)
            if buffered is not None:  # every one buffered for the key (take hands over one at a time)
                while buffered.take(key, None) is not None:
                    pass
        except Exception:
            logger.warning("girder: could not forget %s in the result backend", key, exc_info=True)


def _read_publications(consumer: Any) -> None:
    """Let Celery's Redis result consumer read what its subscription has received, so that it
    is in Celery's buffer (where ``forget`` drops it), not read later while the next run's
    ``get()`` waits. Celery's own locked read, one message at a time, bounded; a consumer
    without them (another backend, another Celery) is left alone."""
    pubsub = getattr(consumer, "_pubsub", None)
    locked, read_one = getattr(consumer, "_locked", None), getattr(consumer, "_drain_one", None)
    if pubsub is None or locked is None or read_one is None:
        return
    with locked():
        for _ in range(_MOST_PUBLICATIONS):
            if not read_one(pubsub, 0):
                return


#: Most publications ``_read_publications`` reads in one go.
_MOST_PUBLICATIONS = 1000


def _is_disabled(backend: Any) -> bool:
    from celery.backends.base import DisabledBackend

    return isinstance(backend, DisabledBackend)


def _is_rpc(backend: Any) -> bool:
    from celery.backends.rpc import RPCBackend

    return isinstance(backend, RPCBackend)


def _keeps_copies(backend: Any) -> bool:
    """Whether a copy written by a worker can be read back: not without a backend, and not
    with ``rpc://``, whose results are messages to their sender (a worker's run has none)."""
    return not _is_disabled(backend) and not _is_rpc(backend)


class _Target:
    """One Redis result backend as this thread writes to it: its link, and what Celery's own
    writes depend on, read once (a conf lookup and a timezone cost more than the write)."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.link = Link(backend.client, [], unconfirmed="mirrored results; the backend is unreachable")
        conf = backend.app.conf
        self.plain_json = backend.serializer == "json" and not backend.compression
        self.plain_json = self.plain_json and not conf.find_value_for_key("extended", "result")
        self.timezone = backend.app.timezone  # what app.now() converts to

    def send(self, items: list[tuple[Any, str, Any, str, Any]]) -> None:
        """Send what Celery's Redis backend writes for each successful result: the document,
        then its publication to anyone subscribed for it."""
        backend, commands = self.backend, []
        for _, key, value, value_json, request in items:
            if self.plain_json:
                payload = _success_document(key, value_json, request, datetime.now(self.timezone))
            else:
                meta = backend._get_result_meta(value, states.SUCCESS, None, request)
                meta["task_id"] = key
                payload = backend.encode(meta)
            name = backend.get_key_for_task(key)
            if backend.expires:
                commands.append(("SET", name, payload, "EX", int(backend.expires)))
            else:
                commands.append(("SET", name, payload))
            commands.append(("PUBLISH", name, payload))
        self.link.send_commands(commands, self.again)

    def again(self, command: tuple) -> None:
        """Write one copy again through the backend client's own path; logs, never raises."""
        try:
            self.backend.client.execute_command(*command)
        except Exception:
            logger.warning("girder: could not mirror a result to the result backend (%s)", command[0], exc_info=True)


def _success_document(key: str, value_json: str, request: Any, done: datetime) -> str:
    """Celery's SUCCESS meta document, as its JSON serializer writes it, around ``value_json``."""
    parent = getattr(request, "parent_id", None)
    parent_field = f', "parent_id": "{parent}"' if parent else ""
    return (
        f'{{"status": "SUCCESS", "result": {value_json}, "traceback": null, "children": [], '
        f'"date_done": "{done.isoformat()}"{parent_field}, "task_id": "{key}"}}'
    )
