"""Running a request: claim, run with a renewed lease, complete or fail (invariants 1, 4, 7).

A worker that receives an offer claims the key first; only a successful claim runs the function,
so a duplicate, stale or hoisted copy of a message never runs it twice. An inline run arrives
already claimed. Either way the value is written to the state store (waking every waiter) before
Celery mirrors it into its result backend.
"""

from __future__ import annotations

import itertools
import logging
import os
import uuid
from typing import TYPE_CHECKING, Any

from celery.exceptions import Ignore, Reject, Retry

from . import inline, keys
from .errors import GirderError
from .lease import LeaseKeeper
from .store import Outcome

if TYPE_CHECKING:
    from .girder import Girder
    from .task import GirderTask

__all__ = ["Executor", "unique_id"]

logger = logging.getLogger(__name__)

_nonce: tuple[int, str] = (0, "")
_counter = itertools.count()


def unique_id() -> str:
    """Unique across processes and time: a random nonce drawn once per process, and a counter
    (cheaper than a uuid4 per claim or mailbox, which costs a system call)."""
    global _nonce
    if _nonce[0] != os.getpid():
        _nonce = (os.getpid(), uuid.uuid4().hex[:16])
    return f"{_nonce[1]}{next(_counter):x}"


#: Exceptions that are Celery control flow, not a failure of the function.
_CONTROL_FLOW = (Ignore, Reject, Retry)


class Executor:
    """Claims and runs girder requests in this process."""

    def __init__(self, girder: Girder) -> None:
        self.girder = girder
        self.leases = LeaseKeeper(lambda: girder.store, girder.settings.lease_seconds, girder.edge_ttl_seconds)

    def owner_token(self, node: str) -> str:
        """A token no other claim shares: node, process, a per-process nonce and a counter."""
        return f"{node}/{os.getpid()}/{unique_id()}"

    def take_offer(self, task: GirderTask, context: Any, args: tuple, kwargs: dict) -> tuple[Any] | None:
        """Run what a Celery request carries: ``(value,)``, or None if the offer was skipped."""
        claim = getattr(context, "girder_inline", None)
        if claim is not None:
            return (self.run_claimed(task, context.id, claim.owner, args, kwargs, context, claim),)
        key, node = context.id, context.hostname or "unknown"
        owner = self.owner_token(node)
        via = (context.delivery_info or {}).get("routing_key") or ""
        verdict, data, _ = self.girder.store.claim(key, owner, node, self.leases.lease_ms, via)
        if verdict == "absent":
            key, verdict, data = self._adopt(task, key, args, kwargs, owner, node)
        if verdict != "claimed":
            logger.info("girder: skipping offer of %s[%s]: %s", task.name, key, verdict)
            return None
        call_args, call_kwargs = keys.decode_payload(data)
        return (self.run_claimed(task, key, owner, call_args, call_kwargs, context),)

    def _adopt(self, task, key, args, kwargs, owner, node) -> tuple[str, str, str]:
        # The store has no record (lost, expired, or sent by plain send_task): the message's
        # own arguments are the request. It runs under its canonical key.
        request = task.prepare(args, kwargs)
        if request.key != key:
            logger.warning("girder: message id %s of %s is not its request key %s", key, task.name, request.key)
        self.girder.submit([request], mailbox="", offer=False)
        verdict, data, _ = self.girder.store.claim(request.key, owner, node, self.leases.lease_ms)
        return request.key, verdict, data

    def run_claimed(
        self,
        task: GirderTask,
        key: str,
        owner: str,
        args: list | tuple,
        kwargs: dict,
        context: Any,
        claim: inline.InlineClaim | None = None,
    ) -> Any:
        """Run a claimed request and settle it in the store; returns the value or raises.

        With an inline ``claim`` the outcome is also left on it for the waiting frame, and
        Celery control-flow exceptions count as failures (there is no message to retry).
        """
        parent = claim.parent if claim is not None else None
        frame = inline.Frame(key, context.hostname or "unknown", context.root_id or key, owner, parent)
        skip_mailbox = claim.skip_mailbox if claim is not None else ""
        # Inline runs and girder's own offers leave the result backend to girder (mirror.py).
        mirror = not task.ignore_result and (claim is not None or getattr(context, "girder_mirror", False))
        token = inline.enter(frame)
        self.leases.hold(key, owner)
        try:
            outcome, value = self._run(task, key, owner, args, kwargs, claim, skip_mailbox)
        except Exception as exc:
            if mirror:
                self._mirror_failure(task, key, exc, context)
            raise
        else:
            if mirror:
                self.girder.mirror.put(task, key, value, outcome.data, context)
            return value
        finally:
            self.leases.release(key)
            inline.leave(token)
            if claim is None:  # the request a message brought is done
                self.girder.between_messages()

    def _run(self, task, key, owner, args, kwargs, claim, skip_mailbox) -> tuple[Outcome, Any]:
        outcome = None
        try:
            value = task.run(*args, **kwargs)
            encoded = self._encode(task, key, args, kwargs, value)
        except Exception as exc:
            if claim is None and isinstance(exc, _CONTROL_FLOW):
                raise
            outcome = self._fail(task, key, owner, args, kwargs, exc, skip_mailbox)
            raise
        else:
            self.girder.store.complete_unawaited(key, owner, encoded, self.girder.result_ttl_ms(task), skip_mailbox)
            outcome = Outcome(key, "done", encoded)
            return outcome, value
        finally:
            if claim is not None:
                claim.outcome = outcome

    def _encode(self, task, key, args, kwargs, value: Any) -> str:
        try:
            return self.girder.encode_value(value)
        except TypeError as exc:
            raise GirderError(
                f"its result is not JSON-serializable: {exc}",
                key=key,
                request=keys.readable(task.name, args, kwargs),
                exc_type="TypeError",
            ) from exc

    @staticmethod
    def _mirror_failure(task, key, exc: Exception, context: Any) -> None:
        try:
            task.backend.mark_as_failure(key, exc, exc.__traceback__, request=context)
        except Exception:
            logger.warning("girder: could not mirror the failure of %s to the result backend", key, exc_info=True)

    def _fail(self, task, key, owner, args, kwargs, exc: BaseException, skip_mailbox: str) -> Outcome:
        if isinstance(exc, GirderError) and exc.key == key:
            error = exc
        else:
            error = GirderError.from_exception(exc, key=key, request=keys.readable(task.name, args, kwargs))
        encoded = self.girder.encode_json(error.to_dict())
        self.girder.store.fail(key, owner, encoded, task.cache_errors, self.girder.error_ttl_ms(task), skip_mailbox)
        return Outcome(key, "failed", encoded)

    def fail_internal(self, task, key, owner, args, kwargs, skip_mailbox: str) -> Outcome:
        """Fail an inline run whose tracer broke before the function ran."""
        error = RuntimeError(f"Celery's tracer failed before running {task.name}; see the worker log")
        return self._fail(task, key, owner, args, kwargs, error, skip_mailbox)
