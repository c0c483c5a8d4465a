"""Mirroring inline results into Celery's result backend, off the executor's critical path.

The state store is the truth (invariant 1) and every waiter hears from it; the copy in Celery's
result backend is for ``AsyncResult(key).get()``, Flower and other Celery tools. An inline run
buffers its copy in its own thread (or greenlet), and the buffer is written in one pipelined
round trip when the executor is about to block, when the request it serves finishes, or when it
holds ``BATCH`` copies or has held one for ``MAX_AGE`` seconds. A background writer would be
simpler but, holding the GIL while it encodes, delays the executor's every socket read.

A Redis result backend storing plain JSON gets Celery's document built around the value's JSON,
which girder already has; any other backend gets ``mark_as_done`` per result. A copy lost in a
crash is written again by the next ``apply_async`` of the request, which re-stores a done value.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery import states

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

    def flush(self) -> None:
        """Write this thread's buffered copies now; a failure is logged, never raised."""
        buffer = getattr(self._local, "buffer", None)
        if not buffer:
            return
        batch = buffer[:]
        buffer.clear()
        try:
            _write(batch)
        except Exception:
            logger.warning("girder: could not mirror %d result(s) to the result backend", len(batch), exc_info=True)


def _write(batch: list[tuple[Any, str, Any, str, Any]]) -> None:
    from celery.backends.redis import RedisBackend

    by_backend: dict[int, list] = {}
    for item in batch:
        by_backend.setdefault(id(item[0].backend), []).append(item)
    for items in by_backend.values():
        backend = items[0][0].backend
        if not isinstance(backend, RedisBackend):
            for _, key, value, _, request in items:
                backend.mark_as_done(key, value, request=request)
            continue
        plain_json = backend.serializer == "json" and not backend.compression
        plain_json = plain_json and not backend.app.conf.find_value_for_key("extended", "result")
        with backend.client.pipeline(transaction=False) as pipe:
            for _, key, value, value_json, request in items:
                if plain_json:
                    payload = _success_document(backend, key, value_json, request)
                else:
                    meta = backend._get_result_meta(value, states.SUCCESS, None, request)
                    meta["task_id"] = key
                    payload = backend.encode(meta)
                name = backend.get_key_for_task(key)
                if backend.expires:
                    pipe.setex(name, backend.expires, payload)
                else:
                    pipe.set(name, payload)
                pipe.publish(name, payload)
            pipe.execute()


def _success_document(backend: Any, key: str, value_json: str, request: Any) -> str:
    """Celery's SUCCESS meta document, as its JSON serializer writes it, around ``value_json``."""
    parent = getattr(request, "parent_id", None)
    parent_field = f', "parent_id": "{parent}"' if parent else ""
    return (
        f'{{"status": "SUCCESS", "result": {value_json}, "traceback": null, "children": [], '
        f'"date_done": "{backend.app.now().isoformat()}"{parent_field}, "task_id": "{key}"}}'
    )
