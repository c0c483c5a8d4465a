"""Waiting for requests, at top level or inside a running request (invariants 2, 3, 4, 5).

A waiter submits its requests with its mailbox registered in the same atomic step that reads
their state (invariant 4), then blocks on a single pop of that mailbox: completions push the
outcome there, so the value arrives with the wake-up, and one pop takes every outcome already
there (a waiter that ran sub-requests inline finds the others' piled up). Every block is
bounded: each ``check_interval`` the waiter re-submits what is still pending, which re-offers
a request that was lost (absent, an expired lease, an offer older than ``reoffer_after``) and
re-registers it after a Redis restart. A Redis error mid-wait is retried for a bounded window,
never hangs.

Inside a running request the waiter never blocks on unclaimed work (invariant 2): it claims the
newest of its own pending sub-requests that is still queued and runs it inline, and blocks only
when every one left is running on a live executor. It runs nothing but its own sub-requests
(invariant 3), and a sub-request that waits, transitively, for its requester is refused by the
submit script as a cycle (invariant 5).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import TYPE_CHECKING, Any

import redis

from .errors import STORE_UNREACHABLE, GirderConnectionError, GirderError, GirderTimeout
from .execute import unique_id
from .inline import Frame, run_inline
from .store import Claim, Outcome

if TYPE_CHECKING:
    from .girder import Girder
    from .task import Request

__all__ = ["InlineWait", "Wait"]

#: Longest single blocking pop, kept below the client's socket timeout.
MAX_BLOCK = 10.0
#: How long a waiter rides out an unreachable Redis before raising.
RECONNECT_WINDOW = 30.0


class Wait:
    """A caller outside any girder request, waiting for a list of requests."""

    def __init__(self, girder: Girder, requests: list[Request], timeout: float | None) -> None:
        self.girder = girder
        self.requests = requests
        self.unique = {r.key: r for r in requests}
        self.timeout = girder.settings.request_timeout if timeout is None else timeout
        self.mailbox = girder.store.mailbox_key(unique_id())
        self.settled: dict[str, Outcome] = {}
        self.pending: dict[str, str] = {}  # key -> last verdict seen, in request order
        self.fail_fast = True

    def run(self, return_exceptions: bool = False) -> list[Any]:
        """Values in request order; a failure raises its ``GirderError`` unless
        ``return_exceptions``, which puts it in place instead."""
        self.fail_fast = not return_exceptions
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        try:
            self._absorb(self._submit(list(self.unique.values())))
            self._wait_pending(deadline)
        finally:
            if self.pending:
                self._withdraw()
        return [self._result(self.settled[r.key]) for r in self.requests]

    # -- hooks an inline waiter overrides ----------------------------------------------------

    def _submit(self, requests: list[Request]) -> list[Outcome]:
        return self.girder.submit(requests, self.mailbox)

    def _resubmit(self) -> list[Outcome]:
        return self._submit([self.unique[k] for k in self.pending])

    def _run_one_inline(self) -> bool:
        """Run one pending request here if possible; True if it did. Top level never does."""
        return False

    # -- the loop ----------------------------------------------------------------------------

    def _wait_pending(self, deadline: float | None) -> None:
        interval = self.girder.settings.check_interval
        next_check = time.monotonic() + interval
        failing_since: float | None = None
        while self.pending:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise self._timeout()
            try:
                if self._run_one_inline():
                    continue
                until = next_check if deadline is None else min(next_check, deadline)
                if now < until:
                    self._pop(min(until - now, MAX_BLOCK))
                if self.pending and time.monotonic() >= next_check:
                    self._absorb(self._resubmit())
                    next_check = time.monotonic() + interval
                failing_since = None
            except (*STORE_UNREACHABLE, GirderConnectionError) as exc:
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since > RECONNECT_WINDOW:
                    raise self.girder.connection_error(exc) from exc
                time.sleep(min(1.0, interval))
                next_check = time.monotonic()  # re-submit as soon as Redis is back

    def _pop(self, block: float) -> None:
        self.girder.unload()  # no copy buffered here waits on this executor's block
        for entry in self.girder.store.pop_mailbox(self.mailbox, max(block, 0.01), len(self.pending)):
            verdict, key, data = entry.split(":", 2)
            if key in self.pending:
                self._settle(Outcome(key, verdict, data))

    def _absorb(self, outcomes: list[Outcome]) -> None:
        for outcome in outcomes:
            if outcome.settled:
                self._settle(outcome)
            elif outcome.verdict == "cycle":
                raise self._cycle(outcome)
            else:
                self.pending[outcome.key] = outcome.verdict

    def _settle(self, outcome: Outcome) -> None:
        self.pending.pop(outcome.key, None)
        self.settled[outcome.key] = outcome
        if self.fail_fast and outcome.verdict == "failed":
            raise self._error(outcome)

    # -- results and errors ------------------------------------------------------------------

    def _result(self, outcome: Outcome) -> Any:
        if outcome.verdict == "done":
            return self.girder.decode_value(outcome.data)
        return self._error(outcome)

    def _error(self, outcome: Outcome) -> GirderError:
        return GirderError.from_dict(self.girder.decode_json(outcome.data))

    def _cycle(self, outcome: Outcome) -> GirderError:
        keys = outcome.data.split()
        names = self.girder.store.requests_of(keys)
        path = " -> ".join(name or key for key, name in zip(keys, names))
        request = self.unique[outcome.key]
        return GirderError(
            f"request cycle: {path}", key=outcome.key, request=request.readable, exc_type="girder_celery.RequestCycle"
        )

    def _timeout(self) -> GirderTimeout:
        key, verdict = next(iter(self.pending.items()))
        state = "queued" if verdict == "offer" else verdict
        request = self.unique[key]
        more = f" (and {len(self.pending) - 1} more)" if len(self.pending) > 1 else ""
        return GirderTimeout(
            f"timed out after {self.timeout}s waiting for {request.readable} [{key}], which is {state}{more}",
            key=key,
            state=state,
            request=request.readable,
        )

    def _withdraw(self) -> None:
        with contextlib.suppress(redis.RedisError):  # else the mailbox expires on its own
            self.girder.store.unregister(list(self.pending), self.mailbox)


class InlineWait(Wait):
    """A running request waiting for its sub-requests: it runs queued ones itself, newest first."""

    def __init__(self, girder: Girder, requests: list[Request], timeout: float | None, frame: Frame) -> None:
        node_queue = girder.node_queue(frame.node)
        local = [r if r.pool else dataclasses.replace(r, pool=node_queue) for r in requests]
        super().__init__(girder, local, timeout)
        # On a node whose only executor is this waiter, a message on its own queue could only
        # ever reach the waiter itself: the offer is recorded, not sent, and the hoister copies
        # it up to the pool if it waits longer than girder_hoist_after.
        self.send_offers = girder.worker_concurrency != 1 or any(r.pool != node_queue for r in local)
        self.frame = frame
        self.owner = girder.executor.owner_token(frame.node)
        self.lease_ms = girder.executor.leases.lease_ms

    def _submit(self, requests: list[Request]) -> list[Outcome]:
        claim = Claim(requests[-1].key, self.owner, self.frame.node, self.lease_ms)
        return self.girder.submit(requests, self.mailbox, offer=self.send_offers, requester=self.frame.key, claim=claim)

    def _resubmit(self) -> list[Outcome]:
        # Whatever became claimable again (an expired lease, a lost record) is run here, not
        # offered: this executor is free for it right now.
        return self.girder.submit(
            [self.unique[k] for k in self.pending], self.mailbox, offer=False, requester=self.frame.key
        )

    def _run_one_inline(self) -> bool:
        queued, claimed = [], None
        for key in reversed(self.pending):
            verdict = self.pending[key]
            if verdict == "claimed":  # by the submit
                claimed = key
                break
            if verdict in ("queued", "offer"):
                queued.append(key)
        key = None
        if queued:  # newest first, in one round trip
            key, _ = self.girder.store.claim_first(queued, self.owner, self.frame.node, self.lease_ms)
            for other in queued[: queued.index(key) if key else None]:
                self.pending[other] = "running"  # or settled: the mailbox will tell
        key = key or claimed
        if key is None:
            return False
        outcome = run_inline(self.girder, self.unique[key], self.owner, self.mailbox, self.frame)
        self._settle(outcome)
        return True
