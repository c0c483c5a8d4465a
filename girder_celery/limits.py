"""Time limits of inline runs: a child run inline honours its own soft and hard time limits.

Celery enforces a message's limits in its pool: prefork signals the child process at the soft
limit (SIGUSR1, which raises ``SoftTimeLimitExceeded`` there) and kills it at the hard one;
gevent and eventlet raise a ``Timeout`` in the greenlet at the hard limit only; solo and threads
enforce neither. An inline run has no message and no job of its own: it runs on its waiting
parent's stack, in the parent's process. So girder times it itself: ``SoftTimeLimitExceeded`` is
raised in the run at its soft limit, and ``TimeLimitExceeded`` at its hard one. The hard limit
cannot kill the process, which runs the parent too: it is a second exception, for a run that
caught the first, and the node lives on.

- On the process's main thread (a prefork child, a solo worker) a timer signal raises it
  (``SIGALRM``, from ``setitimer``), which also interrupts a sleep or a blocking read.
- On any other thread (a threads pool's, or one an inline run hopped to from a deep stack) a
  watchdog thread raises it asynchronously (``PyThreadState_SetAsyncExc``): it lands at the
  thread's next Python instruction, so a sleep or a blocking call finishes first.
- Under gevent and eventlet nothing is timed: greenlets share one thread, and neither way can
  tell which greenlet to stop.

A limit's exception is raised in whatever frame runs when it fires, as Celery's own are: when an
enclosing run's limit fires (an inline ancestor's here, or the message's own from the pool) while
a descendant runs inline, the exception does not belong to the descendant. ``Timing.owns`` tells
the runner which run an exception belongs to; the runner gives each run it passes through back
unfinished and lets it unwind to its own run (``execute.py``).
"""

from __future__ import annotations

import ctypes
import logging
import os
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
_KINDS = {"soft": SoftTimeLimitExceeded, "hard": TimeLimitExceeded}


@dataclass(eq=False)
class Timing:
    """One inline run's limits while its function runs: the deadlines still to come (monotonic
    seconds, soonest first, each with its kind and limit) and the exceptions they raised."""

    name: str
    key: str
    deadlines: list[tuple[float, str, float]]
    thread: int = 0
    by_signal: bool = False
    raised: list[BaseException | type] = field(default_factory=list)

    def owns(self, exc: BaseException) -> bool:
        """Whether ``exc`` is this run's own limit's exception (not an enclosing run's)."""
        return any(exc is mine or type(exc) is mine for mine in self.raised)

    def due(self, now: float) -> tuple[str, float] | None:
        """The next limit passed by ``now`` (its kind and seconds), taken off; None if none is."""
        if not self.deadlines or self.deadlines[0][0] > now:
            return None
        _, kind, limit = self.deadlines.pop(0)
        logger.warning("%s time limit (%ss) exceeded for %s[%s] (run inline)", kind.title(), limit, self.name, self.key)
        return kind, limit


def _message(kind: str, limit: float) -> str:
    return f"{kind} time limit ({limit}s) exceeded"


def _async_class(kind: str, limit: float) -> type:
    # An asynchronous exception is raised from its class, with no arguments: a class of this
    # run's own carries its message and tells its owner (Timing.owns), under Celery's name.
    base = _KINDS[kind]
    cls = type(base.__name__, (base,), {"__init__": lambda self: base.__init__(self, _message(kind, limit))})
    cls.__module__, cls.__qualname__ = base.__module__, base.__qualname__
    return cls


def _raise_in(thread: int, cls: type | None) -> None:
    """Raise ``cls`` in ``thread`` at its next Python instruction (None: withdraw one pending)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread), ctypes.py_object(cls) if cls else None)


class InlineLimits:
    """The time limits of this process's inline runs: a stack of timed runs per thread, the
    main thread's timer signal and the other threads' watchdog.

    ``start`` and ``stop`` bracket an inline run's function; only a task with a limit (its own
    ``soft_time_limit``/``time_limit``, else the app's ``task_soft_time_limit``/``task_time_limit``)
    costs more than a lookup. ``green``: this process runs greenlets (gevent, eventlet): nothing
    is timed.
    """

    def __init__(self, green: bool = False) -> None:
        self.green = green
        #: thread ident -> the timed runs on its stack, outermost first.
        self._timed: dict[int, list[Timing]] = {}
        self._limits: dict[str, tuple[float | None, float | None]] = {}
        # Re-entrant: the signal handler runs on the main thread, possibly inside start or stop.
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._signal: bool | None = None  # SIGALRM is ours: None not yet asked
        #: thread ident -> the run the watchdog last raised an exception for there.
        self._pending: dict[int, Timing] = {}
        self._watchdog_pid: int | None = None

    def limits_of(self, task: Task) -> tuple[float | None, float | None]:
        """``(soft, hard)`` seconds of ``task``'s runs, as Celery reads them for a message."""
        limits = self._limits.get(task.name)
        if limits is None:
            conf = task.app.conf
            soft = task.soft_time_limit if task.soft_time_limit is not None else conf.task_soft_time_limit
            hard = task.time_limit if task.time_limit is not None else conf.task_time_limit
            limits = self._limits[task.name] = (soft or None, hard or None)
        return limits

    def timing(self, task: Task, key: str) -> Timing | None:
        """The limits of the run of ``task`` about to start, for ``start``; None if it has none."""
        soft, hard = self.limits_of(task)
        if (soft is None and hard is None) or self.green:
            return None
        return Timing(task.name, key, [(0.0, kind, limit) for kind, limit in (("soft", soft), ("hard", hard)) if limit])

    def start(self, timing: Timing) -> None:
        """Time the run whose function starts now on this thread."""
        now = time.monotonic()
        timing.deadlines = sorted((now + limit, kind, limit) for _, kind, limit in timing.deadlines)
        timing.thread = threading.get_ident()
        timing.by_signal = threading.current_thread() is threading.main_thread() and self._own_signal()
        with self._lock:
            self._timed.setdefault(timing.thread, []).append(timing)
            self._rearm(timing)

    def stop(self, timing: Timing) -> None:
        """The function of ``timing``'s run has returned or raised: it is no longer timed, nor is
        any run above it on its thread's stack (each has ended, if an exception cut its own stop
        short); an exception the watchdog raised for one of them that the thread has not yet
        seen is withdrawn."""
        with self._lock:
            stack = self._timed.get(timing.thread, [])
            at = next((i for i, t in enumerate(stack) if t is timing), len(stack))
            ended, stack[at:] = stack[at:], []
            if not stack:
                self._timed.pop(timing.thread, None)
            pending = self._pending.get(timing.thread)
            if pending is not None and any(pending is t for t in ended):
                del self._pending[timing.thread]
                _raise_in(timing.thread, None)
            self._rearm(timing)

    def clear(self) -> None:
        """This thread's message run has ended: nothing of it is timed any more."""
        stack = self._timed.get(threading.get_ident())
        if stack:
            self.stop(stack[0])

    def _rearm(self, timing: Timing) -> None:
        if timing.by_signal:
            self._arm_signal()
        else:
            self._ensure_watchdog()
            self._wake.notify()

    # -- the main thread: a timer signal -------------------------------------------------------

    def _own_signal(self) -> bool:
        if self._signal is None:
            current = signal.getsignal(signal.SIGALRM)
            self._signal = current in (signal.SIG_DFL, signal.SIG_IGN, None)
            if self._signal:
                signal.signal(signal.SIGALRM, self._on_alarm)
            else:
                logger.warning("girder: SIGALRM has a handler of its own here; the watchdog times inline runs")
        return self._signal

    def _arm_signal(self) -> None:
        stack = self._timed.get(threading.main_thread().ident or 0, [])
        due = min((t.deadlines[0][0] for t in stack if t.by_signal and t.deadlines), default=None)
        signal.setitimer(signal.ITIMER_REAL, 0.0 if due is None else max(due - time.monotonic(), 0.0001))

    def _on_alarm(self, signum: int, frame: Any) -> None:
        # Runs on the main thread between two bytecodes of whatever runs there: the outermost
        # run whose deadline passed raises now (its descendants unwind to it).
        with self._lock:
            now = time.monotonic()
            for timing in self._timed.get(threading.get_ident(), []):
                fired = timing.due(now) if timing.by_signal else None
                if fired is not None:
                    exc = _KINDS[fired[0]](_message(*fired))
                    timing.raised.append(exc)
                    self._arm_signal()
                    raise exc
            self._arm_signal()

    # -- other threads: a watchdog -------------------------------------------------------------

    def _ensure_watchdog(self) -> None:
        if self._watchdog_pid != os.getpid():  # a forked child has the table but not the thread
            self._watchdog_pid = os.getpid()
            threading.Thread(target=self._watch, name="girder-limits", daemon=True).start()

    def _watch(self) -> None:
        pid = os.getpid()
        with self._lock:
            while self._watchdog_pid == pid:
                self._wake.wait(self._fire_due())

    def _fire_due(self) -> float | None:
        """Raise the limit just passed in each thread whose outermost timed run has one due (the
        runs above it unwind to it); the seconds until the next deadline, or None if none is."""
        now, soonest = time.monotonic(), None
        for thread, stack in self._timed.items():
            fired = False
            for timing in stack:
                if timing.by_signal:
                    break
                due = None if fired else timing.due(now)
                if due is not None:
                    cls = _async_class(*due)
                    timing.raised.append(cls)
                    self._pending[thread] = timing
                    _raise_in(thread, cls)
                    fired = True
                if timing.deadlines:
                    soonest = timing.deadlines[0][0] if soonest is None else min(soonest, timing.deadlines[0][0])
        return None if soonest is None else max(soonest - time.monotonic(), 0.0)
