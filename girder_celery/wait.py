"""Waiting for requests: a caller's wait (invariants 4, 5).

A waiter submits its requests with its mailbox registered in the same atomic step that reads
their state (invariant 4), then blocks on a single pop of that mailbox: completions push the
outcome there, so the value arrives with the wake-up, and one pop takes every outcome already
there (a waiter that ran sub-requests inline finds the others' piled up). Every block is
bounded: each ``check_interval`` the waiter re-submits what is still pending, which re-offers
a request that was lost (absent, an expired lease, an offer older than ``reoffer_after``) and
re-registers it after a Redis restart. A Redis error mid-wait, or at the first submit once this
process has reached the store, is retried for a bounded window, never hangs, and the first
re-submit after it offers again whatever is still queued: a node that took an offer while the
store was unreachable may have had to drop it. A sub-request that waits,
transitively, for its requester is refused by the submit script as a cycle (invariant 5), and
the waiter raises an error naming it. A corrupt record answers its ``GirderError`` (see
``store.py``) like a failure.

``Wait`` is a caller outside any girder request; ``inline.InlineWait``, a running request
waiting for its sub-requests, runs them itself through the hooks ``Wait`` leaves open.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import time
from collections.abc import Iterator
from typing import Any

import redis

from .errors import STORE_UNREACHABLE, GirderConnectionError, GirderError, GirderTimeout
from .keys import Request, unique_id
from .offers import Offers
from .store import RECONNECT_WINDOW, Outcome, Verdict

__all__ = ["Wait"]


#: Longest single blocking pop, kept below the client's socket timeout.
MAX_BLOCK = 10.0
#: Fewest pending requests a periodic check submits again while others settle (``Wait._due``).
CHECK_AT_LEAST = 100


class _Undecodable:
    """A settled value that did not decode: its error, raised when the answers are read."""

    __slots__ = ("error",)

    def __init__(self, error: GirderError) -> None:
        self.error = error


class Wait:
    """A caller outside any girder request, waiting for a list of requests."""

    def __init__(self, offers: Offers, requests: list[Request], timeout: float | None, requester: str = "") -> None:
        self.offers = offers
        self.store = offers.store
        self.requests = requests
        self.unique = {r.key: r for r in requests}
        self.timeout = offers.settings.request_timeout if timeout is None else timeout
        #: A running request's waiter's mailbox is named after it (a cancel's walk, tree.py, reads who waits).
        self.mailbox = self.store.mailbox_key(f"{requester}/{unique_id()}" if requester else unique_id())
        #: key -> its answer as it settled: the value itself, or its GirderError (an Outcome
        #: object per request would outlive the wait's need of it: issue 12).
        self.settled: dict[str, Any] = {}
        #: key -> last verdict seen, least recently checked first (``_due``).
        self.pending: dict[str, Verdict] = {}
        self.fail_fast = True
        self._settled_at_check = 0

    def run(self, return_exceptions: bool = False) -> list[Any]:
        """Values in request order; a failure raises its ``GirderError`` unless
        ``return_exceptions``, which puts it in place instead."""
        self.fail_fast = not return_exceptions
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        try:
            failing_since = self._first_submit()
            self._wait_pending(deadline, failing_since)
        finally:
            if self.pending:
                self._withdraw()
            # Before control goes back to the caller's code, which may compute for a long time: a
            # Redis Cluster's completions of the runs made here wake their other waiters now.
            self.store.flush()
        return self._answers()

    def _first_submit(self) -> float | None:
        """Submit every request; None, or when the store was found unreachable. A store this
        process has reached before is away for an outage (a restart, a failover), which a wait
        rides out like one that begins later: the submit may even have landed, its reply lost.
        Every request then counts as queued until the first check after the store's return
        submits them all again. A store never reached is reported at once: a wrong URL."""
        try:
            for part in self._parts(list(self.unique.values())):
                self._absorb(self._submit(part))
        except (*STORE_UNREACHABLE, GirderConnectionError):
            if not self.store.reached:
                raise
            self.pending = dict.fromkeys(self.unique, Verdict.QUEUED)
            return time.monotonic()
        return None

    # -- hooks an inline waiter overrides ----------------------------------------------------

    def _parts(self, requests: list[Request]) -> Iterator[list[Request]]:
        """The first submit's parts, each absorbed before the next is asked for: all at once."""
        yield requests

    def _submit(self, requests: list[Request]) -> list[Outcome]:
        return self.offers.submit(requests, self.mailbox)

    def _resubmit(self, reoffer: bool) -> list[Outcome]:
        """Submit what is due for a check again; ``reoffer`` after an outage of the store, when
        offers taken meanwhile may have been dropped by nodes that could not claim them: every
        request still queued is offered again at once (a duplicate offer is harmless)."""
        return self.offers.submit(
            [self.unique[k] for k in self._due(reoffer)], self.mailbox, reoffer=reoffer, recheck=True
        )

    def _due(self, everything: bool) -> list[str]:
        """The pending keys a periodic check submits again, moved to the back of the line. All of
        them after an outage, or when none settled since the last check (a stall: the store may
        have lost them); else the least recently checked ``max(CHECK_AT_LEAST, 2 x settled
        since)``. So while requests settle, checks cost about two submits per request in all (and
        ``CHECK_AT_LEAST`` per interval), not every pending request per interval, which made a
        wait for N requests cost O(N^2); a lost request is found within about half the time the
        rest take, or at the first interval in which nothing settles."""
        since, self._settled_at_check = len(self.settled) - self._settled_at_check, len(self.settled)
        if everything or not since:
            due = list(self.pending)
        else:
            due = list(itertools.islice(self.pending, max(CHECK_AT_LEAST, 2 * since)))
        for key in due:
            self.pending[key] = self.pending.pop(key)
        return due

    def _run_one_inline(self) -> bool:
        """Run one pending request here if possible; True if it did. Top level never does."""
        return False

    def _stray(self, outcome: Outcome) -> None:
        """A notification of a request this waiter no longer waits for (a cancel tells a
        running request's waiter of its own cancellation this way)."""

    def _before_block(self) -> None:
        """This thread is about to block on its mailbox."""

    def _wake_at(self) -> float | None:
        """When (monotonic) this waiter has something to do besides reading its mailbox, if ever."""
        return None

    # -- the loop ----------------------------------------------------------------------------

    def _wait_pending(self, deadline: float | None, failing_since: float | None = None) -> None:
        """Until nothing is pending; ``failing_since``: the store has been unreachable since
        then, so the first check is due at once."""
        interval = self.offers.settings.check_interval
        next_check = time.monotonic() + (interval if failing_since is None else 0.0)
        while self.pending:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise self._timeout()
            try:
                if self._run_one_inline():
                    continue
                until = next_check if deadline is None else min(next_check, deadline)
                wake = self._wake_at()
                if wake is not None:
                    until = min(until, wake)
                if now < until:
                    self._pop(min(until - now, MAX_BLOCK))
                if self.pending and time.monotonic() >= next_check:
                    self._absorb(self._resubmit(reoffer=failing_since is not None))
                    next_check = time.monotonic() + interval
                failing_since = None
            except (*STORE_UNREACHABLE, GirderConnectionError) as exc:
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since > RECONNECT_WINDOW:
                    raise self.store.connection_error(exc) from exc
                time.sleep(min(1.0, interval))
                next_check = time.monotonic()  # re-submit as soon as Redis is back

    def _pop(self, block: float) -> None:
        self._before_block()
        self.store.flush()  # nothing this thread left to do waits on its block
        for outcome in self.store.pop_mailbox(self.mailbox, max(block, 0.01), len(self.pending)):
            if outcome.key in self.pending:
                self._settle(outcome)
            else:
                self._stray(outcome)

    def _absorb(self, outcomes: list[Outcome]) -> None:
        for outcome in outcomes:
            if outcome.settled or outcome.verdict is Verdict.CORRUPT:  # a corrupt record answers its error
                self._settle(outcome)
            elif outcome.verdict is Verdict.CYCLE:
                raise self._cycle(outcome)
            else:
                self.pending[outcome.key] = outcome.verdict

    def _settle(self, outcome: Outcome) -> None:
        self.pending.pop(outcome.key, None)
        request = self.unique.get(outcome.key)
        if outcome.verdict is Verdict.DONE:
            try:
                self.settled[outcome.key] = outcome.value(request)
            except GirderError as exc:  # a value girder never wrote: raised, even in place of errors
                self.settled[outcome.key] = _Undecodable(exc)
            return
        error = self.settled[outcome.key] = outcome.error(request)
        if self.fail_fast:
            raise error

    # -- results and errors ------------------------------------------------------------------

    def _answers(self) -> list[Any]:
        """Values (or, with ``return_exceptions``, errors) in request order; a request asked
        for twice gets a copy of its value the second time, as if decoded apart."""
        answers, seen = [], set()
        for request in self.requests:
            answer = self.settled[request.key]
            if isinstance(answer, _Undecodable):
                raise answer.error
            answers.append(copy.deepcopy(answer) if request.key in seen else answer)
            seen.add(request.key)
        return answers

    def _cycle(self, outcome: Outcome) -> GirderError:
        keys = outcome.data.split()
        names = self.store.requests_of(keys)
        path = " -> ".join(name or key for key, name in zip(keys, names))
        request = self.unique[outcome.key]
        return GirderError(
            f"request cycle: {path}", key=outcome.key, request=request.readable, exc_type="girder_celery.RequestCycle"
        )

    def _timeout(self) -> GirderTimeout:
        key, verdict = next(iter(self.pending.items()))
        state = (Verdict.QUEUED if verdict is Verdict.OFFER else verdict).value
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
            self.store.unregister(list(self.pending), self.mailbox)
