"""Running sub-requests inline, on the waiting executor's own stack (invariants 2, 3).

A *frame* is one girder request running in this process; frames nest as requests run their
sub-requests inline. An inline run goes through Celery's own tracer, so it has a real request
context (``self.request.id`` is the key, with ``parent_id``, ``root_id`` and ``hostname``), fires
``task_prerun``/``task_postrun``, is logged, and its result is mirrored to the result backend
(asynchronously, by ``mirror.py``);
task events are sent when the worker sends them (``-E``), so Flower shows inline runs.

Depth: nested inline runs would exhaust the interpreter's stack long before a 2,000-deep chain
ends, so when the current thread's stack is deep the next inline run hops to a fresh thread (a
greenlet under gevent) and the waiter joins it. Python's recursion limit is per thread, so the
limit is never raised, and each thread's C stack carries only a bounded slice of the chain.
"""

from __future__ import annotations

import contextvars
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from celery.app.trace import build_tracer
from celery.utils.saferepr import saferepr

from .keys import decode_payload
from .store import Outcome

if TYPE_CHECKING:
    from .girder import Girder
    from .task import GirderTask, Request

__all__ = ["Frame", "InlineClaim", "current_frame", "run_inline"]


@dataclass(frozen=True)
class Frame:
    """A girder request running in this process, and the frame that runs it inline, if any."""

    key: str
    node: str
    root_id: str
    owner: str
    parent: Frame | None = None

    def ancestors(self) -> list[str]:
        """Keys from this frame outwards."""
        keys, frame = [], self
        while frame is not None:
            keys.append(frame.key)
            frame = frame.parent
        return keys


_current: contextvars.ContextVar[Frame | None] = contextvars.ContextVar("girder_frame", default=None)


def current_frame() -> Frame | None:
    """The girder request this thread (or greenlet) is running, if any."""
    return _current.get()


def enter(frame: Frame) -> contextvars.Token:
    return _current.set(frame)


def leave(token: contextvars.Token) -> None:
    _current.reset(token)


@dataclass
class InlineClaim:
    """Carried in an inline run's Celery request: the claim is held, skip claiming again."""

    owner: str
    skip_mailbox: str
    parent: Frame
    outcome: Outcome | None = field(default=None)


def _stack_is_deep() -> bool:
    try:
        sys._getframe(sys.getrecursionlimit() // 4)
    except ValueError:
        return False
    return True


def run_inline(girder: Girder, request: Request, owner: str, mailbox: str, parent: Frame) -> Outcome:
    """Run a request this executor has claimed, as a Celery task, inline; its outcome."""
    if not _stack_is_deep():
        return _trace(girder, request, owner, mailbox, parent)
    girder.pause()  # this thread waits for the hop
    result: list[Any] = []
    context = contextvars.copy_context()

    def hop() -> None:
        try:
            result.append(context.run(_trace, girder, request, owner, mailbox, parent))
        except BaseException as exc:  # handed to the waiting thread
            result.append(exc)
        finally:
            girder.pause()  # this thread ends

    thread = threading.Thread(target=hop, name=f"girder-inline-{request.key[:8]}", daemon=True)
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


_tracers: dict[tuple[str, str], Any] = {}


def _tracer(task: GirderTask, node: str) -> Any:
    tracer = _tracers.get((task.name, node))
    if tracer is None:
        tracer = _tracers[(task.name, node)] = build_tracer(task.name, task, hostname=node, app=task.app)
    return tracer


def _trace(girder: Girder, request: Request, owner: str, mailbox: str, parent: Frame) -> Outcome:
    task, key, node = request.task, request.key, parent.node
    claim = InlineClaim(owner, mailbox, parent)
    args, kwargs = decode_payload(request.payload)
    context = {
        "id": key,
        "task": task.name,
        "root_id": parent.root_id,
        "parent_id": parent.key,
        "hostname": node,
        "delivery_info": {"exchange": "", "routing_key": "", "priority": None, "redelivered": False},
        "correlation_id": key,
        "girder_inline": claim,
        # The tracer must not store the result: the executor mirrors it (see mirror.py).
        "ignore_result": True,
    }
    events = girder.worker_events
    if events:
        _send_event(task, node, "task-received", key, name=task.name, args=saferepr(args), kwargs=saferepr(kwargs),
                    root_id=parent.root_id, parent_id=parent.key, retries=0)  # fmt: skip
        _send_event(task, node, "task-started", key)
    started = time.monotonic()
    _tracer(task, node)(key, args, kwargs, context)
    outcome = claim.outcome
    if outcome is None:  # the tracer failed before our code ran
        outcome = girder.executor.fail_internal(task, key, owner, args, kwargs, mailbox)
    if events:
        if outcome.verdict == "done":
            _send_event(task, node, "task-succeeded", key, result=outcome.data, runtime=time.monotonic() - started)
        else:
            _send_event(task, node, "task-failed", key, exception=girder.decode_json(outcome.data).get("message"))
    return outcome


def _send_event(task: GirderTask, node: str, type_: str, key: str, **fields: Any) -> None:
    with task.app.events.default_dispatcher(hostname=node) as dispatcher:
        dispatcher.send(type_, uuid=key, **fields)
