"""The running-request frame: which girder request this thread (or greenlet) is running.

A *frame* is one girder request running in this process, set while its function runs and reset
after, whether it arrived in a message or runs inline on a waiter's stack. A wait inside a frame
is an inline wait (invariant 2: it runs its own queued sub-requests), and its sub-requests name
the frame's key as their requester (the waits-for edges of invariant 5).

``on_a_shallow_stack`` runs a nested request on a fresh thread when this one's stack is deep,
carrying the frame along: inline runs and eager runs nest one request per few dozen frames, and
a 2,000-deep chain would reach Python's recursion limit (which is per thread, so it is never
raised, and each thread's C stack carries only a bounded slice of the chain).
"""

from __future__ import annotations

import contextvars
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = ["Frame", "current_frame", "enter", "leave", "on_a_shallow_stack"]

T = TypeVar("T")


@dataclass
class Frame:
    """A girder request running in this process: its key, node, root and owner token, and
    whether it has requested sub-requests that were not answered from the store (its inline
    waits set ``requested``): only then has its graph an ``r`` edge, and graphs below its own
    to keep as it settles (``graph.keep_graph``; its own graph's TTL is set by its settle)."""

    key: str
    node: str
    root_id: str
    owner: str
    requested: bool = False


_current: contextvars.ContextVar[Frame | None] = contextvars.ContextVar("girder_frame", default=None)


def current_frame() -> Frame | None:
    """The girder request this thread (or greenlet) is running, if any."""
    return _current.get()


def enter(frame: Frame) -> contextvars.Token:
    return _current.set(frame)


def leave(token: contextvars.Token) -> None:
    _current.reset(token)


def _stack_is_deep() -> bool:
    try:
        sys._getframe(sys.getrecursionlimit() // 4)
    except ValueError:
        return False
    return True


def on_a_shallow_stack(run: Callable[..., T], *args: Any, release: Callable[[], None] | None = None) -> T:
    """``run(*args)``, here, or on a fresh thread (a greenlet under gevent) that carries this
    context when this thread's stack is deep; the caller joins it. ``release`` is called by this
    thread before it waits and by the fresh one as it ends (to give back per-thread connections)."""
    if not _stack_is_deep():
        return run(*args)
    if release is not None:
        release()
    result: list[Any] = []
    context = contextvars.copy_context()

    def hop() -> None:
        try:
            result.append(context.run(run, *args))
        except BaseException as exc:  # handed to the waiting thread
            result.append(exc)
        finally:
            if release is not None:
                release()

    thread = threading.Thread(target=hop, name="girder-hop", daemon=True)
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]
