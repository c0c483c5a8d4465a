"""Eager mode: with Celery's ``task_always_eager``, girder requests run in this process.

The way people unit-test Celery code. A request runs in the caller's thread, depth-first (a
waiter's sub-requests newest first, as a one-executor grid runs them inline), through Celery's
eager tracer (``Task.apply``: a request context whose id is the key, signals, ``link``), and its
outcome is memoized in this process's memory, per ``Girder``. Nothing connects to the state
store, the broker or the result backend, and nothing waits on another process, so nothing hangs.

What a grid guarantees and eager mode keeps: keys and argument checks (invariant 6: the same key,
a ``TypeError`` at the call site), arguments decoded from the canonical payload as a worker sees
them, values through kombu's JSON (invariant 7: a value it cannot encode fails the request),
``GirderError`` chains through sub-requests, fast-failing cycles with the grid's error
(invariant 5), failures memoized only with ``cache_errors``, and ``cache_ttl``/``girder_result_ttl``
(and ``girder_error_ttl`` for what ``state()`` shows of a failure). What it does not model:
dedupe across threads or processes, pools and tiers, leases, hoisting, timeouts, the result
backend's copy, ``girder.offers``.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import celery
from celery import states
from celery.exceptions import Retry
from celery.result import EagerResult, denied_join_result
from celery.utils.functional import maybe_list

from .errors import GirderError
from .execute import encode_result, error_of
from .frame import on_a_shallow_stack
from .keys import Request, decode_payload, encode_value
from .settings import Settings
from .store import Outcome, Verdict

__all__ = ["Eager"]


@dataclass
class _Entry:
    """One settled request in the memo."""

    outcome: Outcome
    name: str
    request: str
    memo: bool  # answers the next request; a failure without cache_errors is only shown by state()
    until: float | None  # time.monotonic() past which it is gone; None: kept until cleared
    started_at: float
    finished_at: float
    attempts: int


@dataclass
class _Run:
    """A request this thread is running eagerly; its outcome is left here by the task's body."""

    request: Request
    outcome: Outcome | None = None


class Eager:
    """The in-process memo and runner of one ``Girder`` in eager mode."""

    def __init__(self, settings: Callable[[], Settings]) -> None:
        self._settings = settings
        #: key -> settled request; ``clear()`` empties it (between tests).
        self.memo: dict[str, _Entry] = {}
        # The requests this thread (or greenlet) is running, outermost first: the ancestors of a
        # new request, so a cycle is seen (invariant 5) and a body knows its run.
        self._stack: contextvars.ContextVar[tuple[_Run, ...]] = contextvars.ContextVar("girder_eager", default=())

    # -- the public calls ------------------------------------------------------------------

    def wait(self, requests: list[Request], return_exceptions: bool = False) -> list[Any]:
        """``task.call`` and ``girder.request(s)``: values in order, run here, newest first."""
        unique = {r.key: r for r in requests}
        for request in unique.values():  # refused before anything runs, as a grid's submit does
            self._check_cycle(request)
        outcomes: dict[str, Outcome] = {}
        for request in reversed(unique.values()):
            outcomes[request.key] = outcome = self._outcome(request)
            if not return_exceptions and outcome.verdict is not Verdict.DONE:
                raise outcome.error(request)
        return [self._result(outcomes[r.key], r) for r in requests]

    def apply(self, task: Any, args: Any, kwargs: Any, task_id: str | None = None, **options: Any) -> EagerResult:
        """``apply_async``, ``delay`` and ``apply`` of a girder task: an ``EagerResult`` of its
        outcome, memoized. An id given is the result's id (an alias of the request key)."""
        request = task.prepare(args or (), kwargs, options.get("queue"))
        stack = self._stack.get()
        if options.get("retries") and stack and stack[-1].request.key == request.key:
            # Celery's eager retry of the request running here: it runs again, in the same run.
            options["throw"] = False  # its outcome is the run's, read by the run's caller
            return celery.Task.apply(task, *decode_payload(request.payload), task_id=request.key, **options)
        self._check_cycle(request)
        link = options.pop("link", None)
        outcome, ran = self._outcome_of(request, link, options.pop("link_error", None))
        if not ran and link:  # a memoized value: its callbacks fire as they would have
            for callback in maybe_list(link):
                celery.signature(callback, app=task.app).apply_async((self._result(outcome, request),))
        result_id = task_id or request.key
        if outcome.verdict is Verdict.DONE:
            return EagerResult(result_id, outcome.value(request), states.SUCCESS, name=task.name)
        error = outcome.error(request)
        throw = options.get("throw")
        if throw or (throw is None and task.app.conf.task_eager_propagates):
            raise error
        return EagerResult(result_id, error, states.FAILURE, traceback=error.remote_traceback, name=task.name)

    def running(self, key: str) -> _Run | None:
        """The run of ``key`` if it is the request this thread runs eagerly and has not settled."""
        stack = self._stack.get()
        if stack and stack[-1].request.key == key and stack[-1].outcome is None:
            return stack[-1]
        return None

    def state(self, key: str) -> dict[str, Any]:
        """What the memo knows of ``key``, in ``girder.state()``'s shape; placement ``eager``."""
        out: dict[str, Any] = {"key": key, "state": "absent"}
        for field in ("request", "name", "owner", "node", "ran_by", "placement", "claimed_via", "pool"):
            out[field] = None
        out.update(attempts=0, offers=0, hoists=0, created_at=None, offered_at=None)
        out.update(started_at=None, finished_at=None, lease_until=None)
        running = next((run for run in self._stack.get() if run.request.key == key), None)
        entry = self._entry(key)
        if running is not None:
            out.update(state="running", request=running.request.readable, name=running.request.task.name)
        elif entry is not None:
            out.update(state=entry.outcome.verdict.value, request=entry.request, name=entry.name)
            out.update(started_at=entry.started_at, finished_at=entry.finished_at, attempts=entry.attempts)
        if out["state"] != "absent":
            out["placement"] = "eager"
        return out

    def forget(self, key: str) -> bool:
        """Drop a settled request from the memo; True if there was one."""
        return self._entry(key) is not None and self.memo.pop(key, None) is not None

    def clear(self) -> int:
        """Empty the memo (between tests); how many requests it held."""
        count = len(self.memo)
        self.memo.clear()
        return count

    # -- running ---------------------------------------------------------------------------

    def _outcome(self, request: Request) -> Outcome:
        return self._outcome_of(request, None, None)[0]

    def _outcome_of(self, request: Request, link: Any, link_error: Any) -> tuple[Outcome, bool]:
        """The memoized outcome of ``request``, else run it here: (outcome, whether it ran)."""
        entry = self._entry(request.key)
        if entry is not None and entry.memo:
            return entry.outcome, False
        started = time.time()
        outcome = on_a_shallow_stack(self._run, request, link, link_error)
        task = request.task
        settings = self._settings()
        if outcome.verdict is Verdict.DONE:
            memo, ttl_ms = True, settings.result_ttl_ms(task.cache_ttl)
        else:
            memo, ttl_ms = task.cache_errors, settings.error_ttl_ms(task.cache_ttl, task.cache_errors)
        until = time.monotonic() + ttl_ms / 1000 if ttl_ms else None
        attempts = entry.attempts + 1 if entry is not None else 1
        finished = time.time()
        self.memo[request.key] = _Entry(outcome, task.name, request.readable, memo, until, started, finished, attempts)
        return outcome, True

    def _run(self, request: Request, link: Any, link_error: Any) -> Outcome:
        run = _Run(request)
        token = self._stack.set((*self._stack.get(), run))
        args, kwargs = decode_payload(request.payload)  # as a worker sees them: tuples as lists
        try:
            # Celery's guard against result.get() inside a task holds here as on a worker.
            with denied_join_result():
                result = celery.Task.apply(
                    request.task, args, kwargs, task_id=request.key, link=link, link_error=link_error, throw=False
                )
        finally:
            self._stack.reset(token)
        if run.outcome is not None:
            return run.outcome
        # The function never ran in our body (a signal handler or the tracer failed first), or
        # raised Celery's control flow: its failure, as an inline run on a grid counts it.
        exc = result.result if isinstance(result.result, BaseException) else None
        exc = exc or RuntimeError(f"{request.task.name} gave no outcome in eager mode (Celery state {result.state})")
        error = error_of(request.task, request.key, args, kwargs, exc)
        return Outcome(request.key, Verdict.FAILED, encode_value(error.to_dict()))

    @staticmethod
    def body(run: _Run, task: Any, args: tuple, kwargs: dict) -> Any:
        """The task's body inside Celery's eager tracer (``GirderTask.__call__``): run the
        function, and leave its outcome, encoded as a worker would store it, on ``run``."""
        key = run.request.key
        try:
            value = task.run(*args, **kwargs)
            encoded = encode_result(task, key, args, kwargs, value)
        except Retry:
            raise  # Celery's eager retry runs it again (``apply``); that run settles it
        except Exception as exc:
            error = error_of(task, key, args, kwargs, exc)
            run.outcome = Outcome(key, Verdict.FAILED, encode_value(error.to_dict()))
            raise
        run.outcome = Outcome(key, Verdict.DONE, encoded)
        return value

    # -- helpers ---------------------------------------------------------------------------

    def _entry(self, key: str) -> _Entry | None:
        entry = self.memo.get(key)
        if entry is not None and entry.until is not None and time.monotonic() >= entry.until:
            self.memo.pop(key, None)
            return None
        return entry

    def _check_cycle(self, request: Request) -> None:
        """Refuse a request that one of its own ancestors is (invariant 5), with a grid's error:
        the path from the requester through the request back to the requester."""
        stack = [run.request for run in self._stack.get()]
        keys = [r.key for r in stack]
        if request.key not in keys:
            return
        path = [stack[-1], *stack[keys.index(request.key) :]]
        raise GirderError(
            f"request cycle: {' -> '.join(r.readable for r in path)}",
            key=request.key,
            request=request.readable,
            exc_type="girder_celery.RequestCycle",
        )

    @staticmethod
    def _result(outcome: Outcome, request: Request) -> Any:
        return outcome.value(request) if outcome.verdict is Verdict.DONE else outcome.error(request)
