"""The runner: claim a request, run it with a renewed lease, complete or fail it (invariants 1, 4, 7).

A node that receives an offer claims the key first; only a successful claim runs the function,
so a duplicate, stale or hoisted copy of a message never runs it twice. An inline run arrives
already claimed, its ``InlineRun`` in the Celery request. Either way the outcome is written to
the state store (waking every waiter) before it is mirrored into Celery's result backend.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from celery import Task
from celery.exceptions import Ignore, Reject, Retry

from . import keys
from .errors import STORE_UNREACHABLE, GirderError, corrupt
from .frame import Frame, enter, leave
from .graph import keep_graph
from .lease import LeaseKeeper
from .limits import TIME_LIMITS, InlineLimits
from .mirror import Mirror
from .offers import Offers
from .settings import Settings
from .store import RECONNECT_WINDOW, Outcome, StateStore, Verdict

__all__ = ["Answer", "InlineRun", "Runner", "carries_callbacks", "encode_result", "error_of"]

logger = logging.getLogger(__name__)

#: Exceptions that are Celery control flow, not a failure of the function.
_CONTROL_FLOW = (Ignore, Reject, Retry)
#: Claim verdicts of a request that a message with callbacks is answered with (waited for).
_ANSWERED = (Verdict.DONE, Verdict.FAILED, Verdict.RUNNING)


@dataclass
class InlineRun:
    """Carried in an inline run's Celery request: its owner already holds the claim, and the
    outcome is handed back here to the waiter, whose ``mailbox`` is not notified of it.

    Instead of an outcome a run may end with ``retry``, Celery's ``Retry`` (``self.retry()``,
    ``autoretry_for``): the waiter runs it again after its delay, under the same claim; or with
    ``unwind``, an enclosing run's time limit, raised in this run's frame (``limits.py``): the run
    was given back unfinished, and the waiter re-raises it on the way to that run. ``requested``
    says whether it made sub-requests (and has a graph).
    """

    owner: str
    mailbox: str
    outcome: Outcome | None = field(default=None)
    retry: Retry | None = field(default=None)
    unwind: BaseException | None = field(default=None)
    requested: bool = field(default=False)


def encode_result(task: Task, key: str, args: list | tuple, kwargs: dict, value: Any) -> str:
    """A request's value as it is stored (kombu's JSON, invariant 7); a value it cannot encode
    fails the request with a ``GirderError`` (a ``TypeError`` remotely)."""
    try:
        return keys.encode_value(value)
    except TypeError as exc:
        raise GirderError(
            f"its result is not JSON-serializable: {exc}",
            key=key,
            request=keys.readable(task.name, args, kwargs),
            exc_type="TypeError",
        ) from exc


def error_of(task: Task, key: str, args: list | tuple, kwargs: dict, exc: BaseException) -> GirderError:
    """The ``GirderError`` of request ``key`` whose function raised ``exc``: ``exc`` itself when
    it is already that request's error, else one whose causes chain the failed sub-requests."""
    if isinstance(exc, GirderError) and exc.key == key:
        return exc
    return GirderError.from_exception(exc, key=key, request=keys.readable(task.name, args, kwargs))


@dataclass(frozen=True)
class Answer:
    """What ``take_offer`` gives for a message that must be answered with its request's outcome
    rather than skipped: one whose id is an *alias* (a canvas step's id, a ``send_task`` sender's
    own uuid), or one that carries callbacks (``link``, ``link_error``, a chain, a chord) while
    its request is done or claimed elsewhere. Celery stores the outcome under the message's id
    and fires its callbacks; the request itself runs at most once, under its key."""

    request: keys.Request


def carries_callbacks(context: Any) -> bool:
    """Whether a Celery request carries callbacks that fire only when its message is answered."""
    return bool(context.callbacks or context.errbacks or context.chain or context.chord)


class Runner:
    """Claims, runs and settles girder requests for this process's executors."""

    def __init__(self, store: StateStore, offers: Offers, mirror: Mirror, settings: Settings) -> None:
        self.store = store
        self.offers = offers
        self.mirror = mirror
        self.settings = settings
        self.leases = LeaseKeeper(store, settings.lease_ms, settings.edge_ttl_ms)
        self.limits = InlineLimits(green=store.green)
        #: Whether this node sends task events (``-E``), its number of executors and its name;
        #: set by the worker bootstep.
        self.events = False
        self.concurrency = 0
        self.node = ""

    @staticmethod
    def new_owner(node: str) -> str:
        """An owner token no other claim shares: node, process, a per-process nonce and a counter."""
        return f"{node}/{os.getpid()}/{keys.unique_id()}"

    def take_offer(self, task: Task, context: Any, args: tuple, kwargs: dict) -> tuple[Any] | Answer | None:
        """Run what a Celery request carries: ``(value,)``, None if the offer was skipped, or an
        ``Answer`` to wait for (an alias's message, or callbacks of a request settled or running)."""
        run = getattr(context, "girder_inline", None)
        if run is not None:
            return (self.run_claimed(task, context.id, run.owner, args, kwargs, context, run),)
        key, node = context.id, context.hostname or "unknown"
        if not keys.is_key(key):
            # An alias: its own arguments are the request (a TypeError is the alias's answer).
            return Answer(task.prepare(args, kwargs))
        owner = self.new_owner(node)
        via = (context.delivery_info or {}).get("routing_key") or ""
        claimed = self._claim_offer(task, key, owner, node, via, args, kwargs)
        if claimed is None:
            return None
        verdict, data, _ = claimed
        if verdict is Verdict.ABSENT:
            verdict, data = self._adopt(task, key, args, kwargs, owner, node)
        if verdict is not Verdict.CLAIMED:
            if verdict in _ANSWERED and carries_callbacks(context):
                return Answer(task.prepare(args, kwargs))
            if verdict is Verdict.CORRUPT:  # its waiters hear of it from their next submit
                logger.warning("girder: skipping offer of %s[%s]: its record is corrupt: %s", task.name, key, data)
            else:
                logger.info("girder: skipping offer of %s[%s]: %s", task.name, key, verdict)
            return None
        try:
            call_args, call_kwargs = keys.decode_payload(data)
        except Exception as exc:  # girder never wrote it: else each claim would fail alike, and waiters hear nothing
            self._refuse_payload(task, key, owner, exc)
            return None
        return (self.run_claimed(task, key, owner, call_args, call_kwargs, context),)

    def _claim_offer(self, task, key, owner, node, via, args, kwargs) -> tuple[Verdict, str, int] | None:
        """Claim an offer's key, riding out an unreachable store for ``RECONNECT_WINDOW``: the
        broker has let go of the message (early acks), so dropping it here would leave the
        request queued with a fresh offer that nobody holds. Past the window the offer is sent
        again to the queue it came from (None: skipped here)."""
        deadline = time.monotonic() + RECONNECT_WINDOW
        while True:
            try:
                return self.store.claim(key, owner, node, self.leases.lease_ms, via)
            except STORE_UNREACHABLE as exc:
                if time.monotonic() >= deadline:
                    logger.warning("girder: offering %s[%s] again: the state store is unreachable", task.name, key)
                    # The message as it came, unbound: it is an offer of ``key``, not the truth.
                    copy = keys.Request(task, key, "", tuple(args), dict(kwargs))
                    with self.offers.offering(copy, via or None) as queue:
                        self.offers.publish(task.name, key, args, kwargs, queue)
                    return None
                logger.info("girder: cannot claim %s[%s] yet (%s); retrying", task.name, key, exc)
                time.sleep(min(1.0, self.settings.check_interval))

    def _refuse_payload(self, task: Task, key: str, owner: str, exc: Exception) -> None:
        # Failed, not memoized: its waiters hear why, and the next submit rewrites the payload.
        error = corrupt(key, f"its payload is not the arguments girder writes ({exc!r:.200})")
        logger.warning("girder: not running %s[%s]: %s", task.name, key, error.message)
        encoded = keys.encode_value(error.to_dict())
        self.store.fail(key, owner, encoded, False, self.settings.error_ttl_ms(None, False))

    def _adopt(self, task, key, args, kwargs, owner, node) -> tuple[Verdict, str]:
        # The store has no record of the message's key (lost, expired, forgotten): the message's
        # own arguments are the request. Celery then stores the value under the message's id, so
        # a message whose id is a key other than its arguments' is refused (ABSENT, nothing
        # runs): a key must answer only its own value (invariant 1).
        try:
            request = task.prepare(args, kwargs)
        except TypeError as exc:
            logger.warning("girder: refusing message %s of %s: its arguments are refused: %s", key, task.name, exc)
            return Verdict.ABSENT, ""
        if request.key != key:
            logger.warning(
                "girder: refusing message %s of %s: its id is not the key of its arguments %s (%s)",
                key, task.name, request.readable, request.key,
            )  # fmt: skip
            return Verdict.ABSENT, ""
        self.offers.submit([request], mailbox="", offer=False)
        verdict, data, _ = self.store.claim(request.key, owner, node, self.leases.lease_ms)
        return verdict, data

    def run_claimed(
        self,
        task: Task,
        key: str,
        owner: str,
        args: list | tuple,
        kwargs: dict,
        context: Any,
        run: InlineRun | None = None,
    ) -> Any:
        """Run a claimed request and settle it in the store; returns the value or raises.

        With an inline ``run`` the outcome is also left on it for the waiting frame, its own
        time limits are enforced (``limits.py``), a ``Retry`` is left on it for the waiter to run
        it again, and other Celery control-flow exceptions count as failures.
        """
        frame = Frame(key, context.hostname or "unknown", context.root_id or key, owner)
        token = enter(frame)
        skip_mailbox = run.mailbox if run is not None else ""
        # Inline runs and girder's own offers leave the result backend to girder (mirror.py).
        mirror = not task.ignore_result and (run is not None or getattr(context, "girder_mirror", False))
        if mirror:
            self.mirror.before_run(task, key)
        self.leases.hold(key, owner)
        settled = False
        try:
            outcome, value = self._run(task, key, owner, args, kwargs, run, skip_mailbox)
            settled = True
        except Exception as exc:
            settled = not isinstance(exc, _CONTROL_FLOW)  # else Celery retries, ignores or rejects it
            # An inline run to be retried, or given back unfinished, has not failed.
            if mirror and not (run is not None and (run.retry is not None or run.unwind is not None)):
                self.mirror.put_failure(task, key, exc, context)
            raise
        else:
            if mirror:
                self.mirror.put(task, key, value, outcome.data, context)
            return value
        finally:
            self.leases.release(key)
            leave(token)
            if run is not None:
                run.requested = frame.requested
            else:  # the request a message brought is done
                self.limits.clear()
                self.after_message()
                if settled and frame.requested:  # its graph, if it is a top-level request's, is kept
                    self.leases.graphs.settled(key)

    def _run(self, task, key, owner, args, kwargs, run, skip_mailbox) -> tuple[Outcome, Any]:
        outcome = None
        timing = None if run is None else self.limits.timing(task, key)
        try:
            try:
                if timing is not None:
                    self.limits.start(timing)
                value = task.run(*args, **kwargs)
            finally:
                if timing is not None:
                    self.limits.stop(timing)
            encoded = self._encode(task, key, args, kwargs, value)
        except Exception as exc:
            if run is None:
                if isinstance(exc, _CONTROL_FLOW):
                    raise
            elif isinstance(exc, Retry):  # its waiter runs it again once due, under this claim
                run.retry = exc
                raise
            elif isinstance(exc, TIME_LIMITS) and not (timing is not None and timing.owns(exc)):
                # An enclosing run's limit, raised in this frame: this run is given back
                # unfinished (queued, for whoever needs it next), and the exception unwinds to
                # that run past Celery's tracer, which takes Ignore quietly (inline.py re-raises).
                self.store.release(key, owner, offered=False)
                run.unwind = exc
                raise Ignore() from exc
            outcome = self._fail(task, key, owner, args, kwargs, exc, skip_mailbox)
            raise
        else:
            ttl_ms = self.settings.result_ttl_ms(task.cache_ttl)
            self.store.complete_unawaited(key, owner, encoded, ttl_ms, skip_mailbox)
            outcome = Outcome(key, Verdict.DONE, encoded)
            return outcome, value
        finally:
            if run is not None:
                run.outcome = outcome

    _encode = staticmethod(encode_result)

    def _fail(self, task, key, owner, args, kwargs, exc: BaseException, skip_mailbox: str) -> Outcome:
        error = error_of(task, key, args, kwargs, exc)
        encoded = keys.encode_value(error.to_dict())
        ttl_ms = self.settings.error_ttl_ms(task.cache_ttl, task.cache_errors)
        self.store.fail(key, owner, encoded, task.cache_errors, ttl_ms, skip_mailbox)
        return Outcome(key, Verdict.FAILED, encoded)

    def fail_internal(self, task, key, owner, args, kwargs, skip_mailbox: str) -> Outcome:
        """Fail an inline run whose tracer broke before the function ran."""
        error = RuntimeError(f"Celery's tracer failed before running {task.name}; see the worker log")
        return self._fail(task, key, owner, args, kwargs, error, skip_mailbox)

    def fail_timed_out(self, task: Task, key: str, args: list | tuple, kwargs: dict, exc: BaseException) -> None:
        """Fail request ``key``, whose run from its message Celery's pool ended at its hard time
        limit (prefork kills the process that ran it), so its waiters hear of it instead of
        waiting for its lease to lapse and running it again, to be killed again; only while the
        record says this node runs it (an inline run that failed so has settled already)."""
        record = self.store.record(key)
        if record.get("state") == "running" and record.get("node") == self.node:
            self._fail(task, key, record.get("owner", ""), args, kwargs, exc, "")
            keep_graph(self.store, key)

    def refuse_unknown(self, key: str, name: str, node: str) -> None:
        """Fail request ``key`` whose message names task ``name``, unknown on ``node``, so its
        waiters hear of it: only while nobody has claimed it, since a stale copy reaching a node
        deployed without the task must not fail a run going on, or done, elsewhere."""
        error = GirderError(
            f"no task named {name!r} is registered on {node}",
            key=key,
            request=name,
            exc_type="celery.exceptions.NotRegistered",
        )
        encoded = keys.encode_value(error.to_dict())
        self.store.fail(key, "", encoded, False, self.settings.error_ttl_ms(None, False), only_if_queued=True)

    # -- this thread's connections -------------------------------------------------------------

    def release_thread(self) -> None:
        """This thread is about to hop or end: send its mirror copies, read every reply it left
        unread and give its connections back to their pools."""
        self.mirror.flush()
        self.store.idle()
        self.mirror.idle()

    def after_message(self) -> None:
        """The message this thread ran is done: its copies go out now, unawaited, and it keeps
        its connections for the next message. A greenlet ends with its message: it releases them."""
        if self.store.green:
            self.release_thread()
        else:
            self.store.flush()
            self.mirror.flush()
