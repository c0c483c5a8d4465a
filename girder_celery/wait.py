"""Waiting for requests: register, then block on one mailbox until every answer is in.

A waiter submits its requests with its mailbox registered in the same atomic step that reads
their state (invariant 4), then blocks on a single ``BLPOP`` of that mailbox: completions push
the outcome there, so the value arrives with the wake-up. Every block is bounded: each
``check_interval`` the waiter re-submits what is still pending, which re-offers a request that
was lost (absent, an expired lease, an offer older than ``reoffer_after``) and re-registers it
after a Redis restart. A Redis error mid-wait is retried for a bounded window, never hangs.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from typing import TYPE_CHECKING, Any

import redis

from .errors import GirderConnectionError, GirderError, GirderTimeout
from .store import Outcome

if TYPE_CHECKING:
    from .girder import Girder
    from .task import Request

__all__ = ["Wait"]

#: Longest single BLPOP, kept below the client's socket timeout.
MAX_BLOCK = 10.0
#: How long a waiter rides out an unreachable Redis before raising.
RECONNECT_WINDOW = 30.0


class Wait:
    """One caller waiting for a list of requests."""

    def __init__(self, girder: Girder, requests: list[Request], timeout: float | None) -> None:
        self.girder = girder
        self.requests = requests
        self.unique = list({r.key: r for r in requests}.values())
        self.timeout = girder.settings.request_timeout if timeout is None else timeout
        self.mailbox = girder.store.mailbox_key(uuid.uuid4().hex)
        self.settled: dict[str, Outcome] = {}
        self.pending: dict[str, str] = {}

    def run(self, return_exceptions: bool = False) -> list[Any]:
        """Values in request order; a failure raises its ``GirderError`` unless
        ``return_exceptions``, which puts it in place instead."""
        self.fail_fast = not return_exceptions
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        try:
            self._absorb(self.girder.submit(self.unique, self.mailbox))
            self._wait_pending(deadline)
        finally:
            if self.pending:
                self._withdraw()
        return [self._result(self.settled[r.key]) for r in self.requests]

    def _wait_pending(self, deadline: float | None) -> None:
        interval = self.girder.settings.check_interval
        next_check = time.monotonic() + interval
        failing_since: float | None = None
        while self.pending:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise self._timeout()
            until = next_check if deadline is None else min(next_check, deadline)
            try:
                if now < until:
                    self._pop(min(until - now, MAX_BLOCK))
                if self.pending and time.monotonic() >= next_check:
                    self._absorb(self.girder.submit([r for r in self.unique if r.key in self.pending], self.mailbox))
                    next_check = time.monotonic() + interval
                failing_since = None
            except (redis.ConnectionError, redis.TimeoutError, GirderConnectionError) as exc:
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since > RECONNECT_WINDOW:
                    raise self.girder.connection_error(exc) from exc
                time.sleep(min(1.0, interval))
                next_check = time.monotonic()  # re-submit as soon as Redis is back

    def _pop(self, block: float) -> None:
        item = self.girder.store.client.blpop([self.mailbox], timeout=max(block, 0.01))
        if item is not None:
            verdict, key, data = item[1].split(":", 2)
            if key in self.pending:
                self._settle(Outcome(key, verdict, data))

    def _absorb(self, outcomes: list[Outcome]) -> None:
        for outcome in outcomes:
            if outcome.settled:
                self._settle(outcome)
            else:
                self.pending[outcome.key] = outcome.verdict

    def _settle(self, outcome: Outcome) -> None:
        self.pending.pop(outcome.key, None)
        self.settled[outcome.key] = outcome
        if self.fail_fast and outcome.verdict == "failed":
            raise self._error(outcome)

    def _result(self, outcome: Outcome) -> Any:
        if outcome.verdict == "done":
            return self.girder.decode_value(outcome.data)
        return self._error(outcome)

    def _error(self, outcome: Outcome) -> GirderError:
        return GirderError.from_dict(self.girder.decode_json(outcome.data))

    def _timeout(self) -> GirderTimeout:
        key, state = next(iter(self.pending.items()))
        request = next(r for r in self.unique if r.key == key)
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
