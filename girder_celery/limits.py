"""Time limits of inline runs: a child run inline honours its own soft and hard time limits.

Celery enforces a message's limits in its pool: prefork signals the child process at the soft
limit (SIGUSR1, which raises ``SoftTimeLimitExceeded`` there) and kills it at the hard one;
gevent and eventlet raise a ``Timeout`` in the greenlet at the hard limit only; solo and threads
enforce neither. An inline run has no message and no job of its own: it runs on its waiting
parent's stack, in the parent's process. So girder times it itself, where the run is on its
process's main thread (a prefork child, a solo worker), with a timer signal (``SIGALRM``, from
``setitimer``): ``SoftTimeLimitExceeded`` is raised in the run at its soft limit, and
``TimeLimitExceeded`` at its hard one. The hard limit cannot kill the process, which runs the
parent too: it is a second exception, for a run that caught the first, and the node lives on.
A run that sits in C code which does not return to Python (a blocking call that signals do not
interrupt) is not stopped by either.

A limit's exception is raised in whatever frame runs when it fires, as Celery's own are: when an
enclosing run's limit fires (an inline ancestor's here, or the message's own from the pool) while
a descendant runs inline, the exception does not belong to the descendant. ``owns`` tells the
runner which run an exception belongs to; the runner gives each run it passes through back
unfinished and lets it unwind to its own run (``execute.py``).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

__all__ = ["TIME_LIMITS", "InlineLimits", "Timing"]

logger = logging.getLogger(__name__)

#: The exceptions Celery's time limits raise.
TIME_LIMITS = (SoftTimeLimitExceeded, TimeLimitExceeded)


@dataclass
class Timing:
    """One inline run's limits while its function runs: the deadlines still to come (monotonic
    seconds, soonest first, each with its limit) and the exceptions they raised."""

    name: str
    key: str
    deadlines: list[tuple[float, str, float]]
    raised: list[BaseException] = field(default_factory=list)

    def owns(self, exc: BaseException) -> bool:
        """Whether ``exc`` is this run's own limit's exception (not an enclosing run's)."""
        return any(exc is mine for mine in self.raised)

    def fire(self, now: float) -> BaseException | None:
        if not self.deadlines or self.deadlines[0][0] > now:
            return None
        _, kind, limit = self.deadlines.pop(0)
        logger.warning("%s time limit (%ss) exceeded for %s[%s] (run inline)", kind, limit, self.name, self.key)
        exc = (
            SoftTimeLimitExceeded(f"soft time limit ({limit}s) exceeded")
            if kind == "Soft"
            else TimeLimitExceeded(f"hard time limit ({limit}s) exceeded")
        )
        self.raised.append(exc)
        return exc


class InlineLimits:
    """The time limits of the inline runs on this process's main thread, and their timer.

    ``start`` and ``stop`` bracket an inline run's function; only a task with a limit (its own
    ``soft_time_limit``/``time_limit``, else the app's ``task_soft_time_limit``/``task_time_limit``)
    costs more than a lookup. ``green``: this process runs greenlets (gevent, eventlet), which
    share the main thread, so a signal could not tell which one to stop: nothing is timed.
    """

    def __init__(self, green: bool = False) -> None:
        self.green = green
        #: The timed runs on the main thread's stack, outermost first.
        self._timed: list[Timing] = []
        self._limits: dict[str, tuple[float | None, float | None]] = {}
        self._installed = False

    def limits_of(self, task: Task) -> tuple[float | None, float | None]:
        """``(soft, hard)`` seconds of ``task``'s runs, as Celery reads them for a message."""
        limits = self._limits.get(task.name)
        if limits is None:
            conf = task.app.conf
            soft = task.soft_time_limit if task.soft_time_limit is not None else conf.task_soft_time_limit
            hard = task.time_limit if task.time_limit is not None else conf.task_time_limit
            limits = self._limits[task.name] = (soft or None, hard or None)
        return limits

    def start(self, task: Task, key: str) -> Timing | None:
        """Time the run of ``task`` that starts now; None if it has no limit or is not timed here."""
        soft, hard = self.limits_of(task)
        if (soft is None and hard is None) or not self._can_time():
            return None
        now = time.monotonic()
        deadlines = [(now + limit, kind, limit) for kind, limit in (("Soft", soft), ("Hard", hard)) if limit]
        timing = Timing(task.name, key, sorted(deadlines))
        self._timed.append(timing)
        self._arm()
        return timing

    def stop(self, timing: Timing) -> None:
        """The function of ``timing``'s run has returned or raised."""
        self._timed.remove(timing)
        self._arm()

    def _can_time(self) -> bool:
        if self.green or threading.current_thread() is not threading.main_thread():
            return False
        if not self._installed:
            current = signal.getsignal(signal.SIGALRM)
            if current not in (signal.SIG_DFL, signal.SIG_IGN, None):
                logger.warning("girder: SIGALRM has a handler of its own here; inline runs' time limits are off")
                self.green = True  # never asked again
                return False
            signal.signal(signal.SIGALRM, self._on_alarm)
            self._installed = True
        return True

    def _arm(self) -> None:
        due = min((t.deadlines[0][0] for t in self._timed if t.deadlines), default=None)
        delay = 0.0 if due is None else max(due - time.monotonic(), 0.0001)
        signal.setitimer(signal.ITIMER_REAL, delay)

    def _on_alarm(self, signum: int, frame: Any) -> None:
        # Runs on the main thread between two bytecodes of whatever runs there: the outermost
        # run whose deadline passed raises now (its descendants unwind to it).
        now = time.monotonic()
        for timing in self._timed:
            exc = timing.fire(now)
            if exc is not None:
                self._arm()
                raise exc
        self._arm()
