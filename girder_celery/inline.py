"""Running sub-requests inline, on the waiting executor's own stack (invariants 2, 3).

``InlineWait`` is a running request waiting for its sub-requests: it never blocks on unclaimed
work (invariant 2), it claims the newest of its own pending sub-requests that is still queued
and runs it here, and blocks only when every one left is running on a live executor. It runs
nothing but its own sub-requests (invariant 3). Its mailbox and the owner token of its claims
name the request it waits for, so a cancel's walk (``tree.py``) tells who waits for what; a cancelled run
stops here, at its next submit (answered ``cancelled``) or as its wait hears of it.

An inline run goes through Celery's own tracer, so it has a real request context
(``self.request.id`` is the key, with ``parent_id``, ``root_id`` and ``hostname``), fires
``task_prerun``/``task_postrun``, is logged, and its result is mirrored to the result backend
(by ``mirror.py``); task events are sent when the worker sends them (``-E``), so Flower shows
inline runs. The tracer calls the task, which hands the run back to the runner
(``Runner.take_offer``) with the ``InlineRun`` the context carries.

Depth: nested inline runs would exhaust the interpreter's stack long before a 2,000-deep chain
ends, so when the current thread's stack is deep the next inline run hops to a fresh thread (a
greenlet under gevent) and the waiter joins it. Python's recursion limit is per thread, so the
limit is never raised, and each thread's C stack carries only a bounded slice of the chain.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import math
import time
from collections.abc import Iterator
from typing import Any

import redis
from celery import Task
from celery.app.trace import build_tracer
from celery.exceptions import Retry
from celery.utils.saferepr import saferepr

from .errors import GirderCancelled
from .execute import InlineRun, Runner
from .frame import Frame, on_a_shallow_stack
from .keys import Request, decode_payload
from .store import Claimant, Outcome, Verdict
from .tiers import EARLY_HOIST
from .wait import Wait

__all__ = ["InlineWait", "run_inline"]

#: Most of its queued sub-requests a waiter names in one claim scan (newest first).
CLAIM_BATCH = 32
#: The least an inline run costs (s): a claim, Celery's tracer, a completion. A trivial child took
#: 0.27-0.43 ms here (one solo node, ``wide_parent`` of 50 to 2,000); a quarter of that bounds how
#: many sub-requests a waiter can run within ``girder_hoist_after`` before it has timed any.
INLINE_RUN_FLOOR = 0.0001


class InlineWait(Wait):
    """A running request waiting for its sub-requests: it runs queued ones itself, newest first."""

    def __init__(
        self, runner: Runner, requests: list[Request], timeout: float | None, frame: Frame, requester: str | None = None
    ) -> None:
        #: The request these are sub-requests of: the frame's, or "" for a message's answer
        #: (``Runtime.answer``), which no request waits for, so it records no waits-for edges.
        self.requester = frame.key if requester is None else requester
        super().__init__(runner.offers, requests, timeout, self.requester)
        #: Where sub-requests without a pool of their own are offered: this node's queue.
        self.queue = runner.offers.node_queue(frame.node)
        # On a node whose only executor is this waiter, a message on its own queue could only
        # ever reach the waiter itself: the offer is recorded, not sent, and the hoister copies
        # it up to the pool if it waits longer than girder_hoist_after.
        self.send_offers = runner.concurrency != 1 or any(r.pool and r.pool != self.queue for r in requests)
        self.runner = runner
        self.frame = frame
        #: Its claims' token names the request it runs them for (a cancel's walk, tree.py, reads who waits).
        self.owner = f"{runner.new_owner(frame.node)}>{self.requester}"
        self.lease_ms = runner.leases.lease_ms
        #: Sub-requests last seen queued, oldest first (a dict as an ordered set); a claim scan
        #: takes the newest and drops each it looks at, so N sub-requests cost O(N) in scans in
        #: all, not a scan of every pending one per sub-request run (issue 12).
        self.claimable: dict[str, None] = {}
        #: The sub-request the submit claimed for this waiter, to run first.
        self.claimed: str | None = None
        #: Whether its first inline run has been timed, for ``_hoist_early`` (done once).
        self.timed = False
        #: The offers ``_hoist_early`` made due (at most ``EARLY_HOIST``), not made due twice.
        self.made_due: set[str] = set()
        #: Sub-requests run here that Celery retries: key -> (when the retry is due, monotonic,
        #: and the retries so far). Each stays claimed by this waiter, its lease held, and runs
        #: here again once due; meanwhile the waiter runs its others and blocks no later.
        self.retrying: dict[str, tuple[float, int]] = {}

    def _parts(self, requests: list[Request]) -> Iterator[list[Request]]:
        """The first submit in two parts where, before it has run any, the waiter can tell that
        the oldest of its node's sub-requests will wait longer than ``girder_hoist_after`` even at
        ``INLINE_RUN_FLOOR`` each: those first, made due as soon as they are in (the caller absorbs
        a part before the next is asked for), so this node's hoister copies them to the pool while
        the rest are submitted, and a wide fan-out gets help within milliseconds of its submit, not
        once all of it is in (2,000 took 80 ms) and has aged (issue 12)."""
        here = sum(map(self._here, requests))
        early = min(EARLY_HOIST, here - self._kept(INLINE_RUN_FLOOR)) if self.runner.settings.hoist_after else 0
        if early <= 0:
            yield requests
            return
        split = next(i for i, n in enumerate(itertools.accumulate(map(self._here, requests))) if n == early) + 1
        yield requests[:split]
        self._hoist_early(INLINE_RUN_FLOOR, here, now=True)
        yield requests[split:]

    def _submit(self, requests: list[Request]) -> list[Outcome]:
        # Only the newest is claimed for this waiter (it runs newest first): not the last of a part.
        newest = next(reversed(self.unique))
        claimant = Claimant(newest, self.owner, self.frame.node, self.lease_ms) if requests[-1].key == newest else None
        offer, requester, owner = self.send_offers, self.requester, self.frame.owner
        try:
            return self.offers.submit(
                requests, self.mailbox, offer, requester, claimant, queue=self.queue, requester_owner=owner
            )
        except BaseException:  # it may have landed, its reply lost: its edges may say "r"
            self.frame.requested = True
            raise

    def _resubmit(self, reoffer: bool) -> list[Outcome]:
        # Whatever became claimable again (an expired lease, a lost record, an offer dropped in
        # an outage) is run here, not offered: this executor is free for it right now.
        due = self._due(reoffer)
        due_requests = [self.unique[k] for k in due]
        requester, queue, owner = self.requester, self.queue, self.frame.owner
        return self.offers.submit(
            due_requests, self.mailbox, False, requester, queue=queue, recheck=True, requester_owner=owner
        )

    def _before_block(self) -> None:
        self.runner.mirror.flush()  # no copy buffered here waits on this executor's block

    def _absorb(self, outcomes: list[Outcome]) -> None:
        super()._absorb(outcomes)
        for outcome in outcomes:
            verdict = outcome.verdict
            if not outcome.settled:  # edged "r" (a sub-request answered from the store is "c")
                self.frame.requested = True
            if verdict is Verdict.CLAIMED:  # by the submit: run it first
                self.claimed = outcome.key
            elif (verdict is Verdict.QUEUED or verdict is Verdict.OFFER) and outcome.key in self.pending:
                self.claimable[outcome.key] = None
            elif verdict is Verdict.CANCELLED:  # this run was cancelled: it stops here
                raise GirderCancelled("cancelled while it ran", key=self.requester)

    def _stray(self, outcome: Outcome) -> None:
        if outcome.key == self.requester and outcome.verdict is Verdict.FAILED:  # cancelled (cancelled.lua)
            raise outcome.error()

    def _settle(self, outcome: Outcome) -> None:
        self.claimable.pop(outcome.key, None)
        super()._settle(outcome)

    def _wake_at(self) -> float | None:
        return min(due for due, _ in self.retrying.values()) if self.retrying else None

    def _withdraw(self) -> None:
        # Given up (a failure, a timeout, an enclosing run's limit): a retry not yet run is given
        # back unfinished, and the next submit of it offers it at once.
        for key in self.retrying:
            self.runner.leases.release(key)
            with contextlib.suppress(redis.RedisError):
                self.store.release(key, self.owner, offered=False)
        super()._withdraw()

    def _due_retry(self) -> tuple[str | None, int]:
        now = time.monotonic()
        for key, (due, retries) in self.retrying.items():
            if due <= now:
                del self.retrying[key]
                return key, retries
        return None, 0

    def _run_one_inline(self) -> bool:
        key, retries = self._due_retry() if self.retrying else (None, 0)
        if key is None:
            key, self.claimed = self.claimed, None
        while key is None and self.claimable:
            # The newest few, in one round trip; those before the one claimed (or all, if none is)
            # are running, settled or lost: the mailbox or the next check says which.
            batch = list(itertools.islice(reversed(self.claimable), CLAIM_BATCH))
            batch = batch[: self.store.claim_span(batch)]  # on a Redis Cluster, one slot's
            key, _ = self.store.claim_first(batch, self.owner, self.frame.node, self.lease_ms)
            for other in batch[: batch.index(key) + 1 if key else None]:
                del self.claimable[other]
                if other != key:
                    self.pending[other] = Verdict.RUNNING
        if key is None or key not in self.pending:
            return False
        started = time.monotonic()
        run = run_inline(self.runner, self.unique[key], self.owner, self.mailbox, self.frame, retries)
        if not self.timed:
            self.timed = True
            self._hoist_early(time.monotonic() - started)
        if run.retry is not None:
            self.retrying[key] = (time.monotonic() + retry_delay(run.retry), retries + 1)
            self.runner.leases.hold(key, self.owner)
        else:
            self._settle(run.outcome)
            if run.requested and not self.requester:  # a message's answer, which no request asked for
                self.runner.leases.graphs.settled(key)
        return True

    def _hoist_early(self, took: float, count: int | None = None, now: bool = False) -> None:
        """An inline run takes ``took`` s (its first one did, or at least ``INLINE_RUN_FLOOR``):
        of the ``count`` sub-requests queued on this node's own queue (default: those still
        claimable), all but the newest its executors get to within ``girder_hoist_after`` (this
        waiter runs the newest first) are expected to wait longer than that, which is what
        hoisting waits for. The oldest ``EARLY_HOIST`` of them, less those made due already, are
        made due now, so a wide fan-out of long children gets help from the pool when its first child ends, not
        ``girder_hoist_after`` after its submit. Of short children, only those beyond the
        newest ``girder_hoist_after`` / ``took`` go early, which age would send a little later.
        ``now``: copied up on this thread at once (``Offers.hoist_early``)."""
        if not self.runner.settings.hoist_after or took <= 0 or not self.claimable:
            return
        kept = self._kept(took)
        # Counted, then the oldest taken: no list of a wide fan-out's every key (issue 12).
        if count is None:
            count = sum(map(self._offered_here, self.claimable))
        oldest = itertools.islice(filter(self._offered_here, self.claimable), min(EARLY_HOIST, max(0, count - kept)))
        due = [key for key in oldest if key not in self.made_due]
        if due:
            self.made_due.update(due)
            self.offers.hoist_early(self.queue, due, here=now)

    def _kept(self, took: float) -> int:
        """How many sub-requests of ``took`` s each this node's executors run within ``girder_hoist_after``."""
        return math.ceil(self.runner.settings.hoist_after / took * max(1, self.runner.concurrency))

    def _offered_here(self, key: str) -> bool:
        return self._here(self.unique[key])

    def _here(self, request: Request) -> bool:
        """Whether ``request`` is offered on this node's own queue (it has no pool of its own)."""
        return request.pool in ("", None, self.queue)


def retry_delay(retry: Retry) -> float:
    """Seconds until a Celery ``Retry`` is due: its countdown, or its eta (naive: UTC) from now."""
    when = retry.when
    if isinstance(when, datetime.datetime):
        utc = datetime.timezone.utc
        eta = when if when.tzinfo is not None else when.replace(tzinfo=utc)
        return max(0.0, (eta - datetime.datetime.now(utc)).total_seconds())
    return max(0.0, float(when or 0))


def run_inline(
    runner: Runner, request: Request, owner: str, mailbox: str, waiter: Frame, retries: int = 0
) -> InlineRun:
    """Run a request this executor has claimed, as a Celery task, inline: its outcome, or the
    ``Retry`` Celery asked for, on the ``InlineRun``. ``retries``: the retries run before this
    one. A deep stack hops to a fresh thread, and each thread gives its connections back around
    the hop."""
    return on_a_shallow_stack(_trace, runner, request, owner, mailbox, waiter, retries, release=runner.release_thread)


_tracers: dict[tuple[str, str], Any] = {}


def _tracer(task: Task, node: str) -> Any:
    tracer = _tracers.get((task.name, node))
    if tracer is None:
        tracer = _tracers[(task.name, node)] = build_tracer(task.name, task, hostname=node, app=task.app)
    return tracer


def _trace(runner: Runner, request: Request, owner: str, mailbox: str, waiter: Frame, retries: int) -> InlineRun:
    task, key, node = request.task, request.key, waiter.node
    run = InlineRun(owner, mailbox)
    args, kwargs = decode_payload(request.payload)
    context = {
        "id": key,
        "task": task.name,
        "root_id": waiter.root_id,
        "parent_id": waiter.key,
        "hostname": node,
        "delivery_info": {"exchange": "", "routing_key": "", "priority": None, "redelivered": False},
        "correlation_id": key,
        "retries": retries,
        "girder_inline": run,
        # The tracer must not store the result: the runner mirrors it (see mirror.py).
        "ignore_result": True,
    }
    events = runner.events
    if events:
        _send_event(task, node, "task-received", key, name=task.name, args=saferepr(args), kwargs=saferepr(kwargs),
                    root_id=waiter.root_id, parent_id=waiter.key, retries=retries)  # fmt: skip
        _send_event(task, node, "task-started", key)
    started = time.monotonic()
    _tracer(task, node)(key, args, kwargs, context)
    if run.unwind is not None:  # an enclosing run's time limit: on to that run
        raise run.unwind
    if run.retry is not None:
        if events:
            _send_event(task, node, "task-retried", key, exception=saferepr(run.retry.exc), traceback="")
        return run
    if run.outcome is None:  # the tracer failed before our code ran
        run.outcome = runner.fail_internal(task, key, owner, args, kwargs, mailbox)
    if events:
        if run.outcome.verdict is Verdict.DONE:
            result = run.outcome.data
            _send_event(task, node, "task-succeeded", key, result=result, runtime=time.monotonic() - started)
        else:
            _send_event(task, node, "task-failed", key, exception=run.outcome.error().message)
    return run


def _send_event(task: Task, node: str, type_: str, key: str, **fields: Any) -> None:
    with task.app.events.default_dispatcher(hostname=node) as dispatcher:
        dispatcher.send(type_, uuid=key, **fields)
