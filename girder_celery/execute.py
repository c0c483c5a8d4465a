"""Running a request: claim, run with a renewed lease, complete or fail (invariants 1, 4, 7).

A worker that receives an offer claims the key first; only a successful claim runs the function,
so a duplicate, stale or hoisted copy of a message never runs it twice. The value is written to
the state store (waking every waiter) before Celery mirrors it into its result backend.
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import TYPE_CHECKING, Any

from celery.exceptions import Ignore, Reject, Retry

from . import keys
from .errors import GirderError
from .lease import LeaseKeeper

if TYPE_CHECKING:
    from .girder import Girder
    from .task import GirderTask

__all__ = ["Executor"]

logger = logging.getLogger(__name__)

#: Exceptions that are Celery control flow, not a failure of the function.
_CONTROL_FLOW = (Ignore, Reject, Retry)


class Executor:
    """Claims and runs girder requests in this process."""

    def __init__(self, girder: Girder) -> None:
        self.girder = girder
        self.leases = LeaseKeeper(lambda: girder.store, girder.settings.lease_seconds)

    def owner_token(self, node: str) -> str:
        return f"{node}/{os.getpid()}/{uuid.uuid4().hex[:12]}"

    def take_offer(self, task: GirderTask, context: Any, args: tuple, kwargs: dict) -> tuple[Any] | None:
        """Claim and run the request a message offers: ``(value,)``, or None if it was skipped."""
        key, node = context.id, context.hostname or "unknown"
        owner = self.owner_token(node)
        store = self.girder.store
        verdict, data, _ = store.claim(key, owner, node, self.leases.lease_ms)
        if verdict == "absent":
            key, verdict, data = self._adopt(task, key, args, kwargs, owner, node)
        if verdict != "claimed":
            logger.info("girder: skipping offer of %s[%s]: %s", task.name, key, verdict)
            return None
        call_args, call_kwargs = keys.decode_payload(data)
        return (self.run_claimed(task, key, owner, call_args, call_kwargs),)

    def _adopt(self, task, key, args, kwargs, owner, node) -> tuple[str, str, str]:
        # The store has no record (lost, expired, or sent by plain send_task): the message's
        # own arguments are the request. It runs under its canonical key.
        request = task.prepare(args, kwargs)
        if request.key != key:
            logger.warning("girder: message id %s of %s is not its request key %s", key, task.name, request.key)
        self.girder.submit([request], mailbox="", offer=False)
        verdict, data, _ = self.girder.store.claim(request.key, owner, node, self.leases.lease_ms)
        return request.key, verdict, data

    def run_claimed(self, task: GirderTask, key: str, owner: str, args: list, kwargs: dict) -> Any:
        """Run a claimed request and settle it in the store; returns the value or raises."""
        girder, store = self.girder, self.girder.store
        self.leases.hold(key, owner)
        try:
            try:
                value = task.run(*args, **kwargs)
            except _CONTROL_FLOW:
                raise
            except Exception as exc:
                error = GirderError.from_exception(exc, key=key, request=keys.readable(task.name, args, kwargs))
                store.fail(
                    key,
                    owner,
                    girder.encode_json(error.to_dict()),
                    task.cache_errors,
                    girder.error_ttl_ms(task),
                )
                raise
            try:
                encoded = girder.encode_value(value)
            except TypeError as exc:
                error = GirderError(
                    f"its result is not JSON-serializable: {exc}",
                    key=key,
                    request=keys.readable(task.name, args, kwargs),
                    exc_type="TypeError",
                )
                store.fail(
                    key,
                    owner,
                    girder.encode_json(error.to_dict()),
                    task.cache_errors,
                    girder.error_ttl_ms(task),
                )
                raise error from exc
            store.complete(key, owner, encoded, girder.result_ttl_ms(task))
            return value
        finally:
            self.leases.release(key)
