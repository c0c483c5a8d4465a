"""The running-request frame: which girder request this thread (or greenlet) is running.

A *frame* is one girder request running in this process, set while its function runs and reset
after, whether it arrived in a message or runs inline on a waiter's stack. A wait inside a frame
is an inline wait (invariant 2: it runs its own queued sub-requests), and its sub-requests name
the frame's key as their requester (the waits-for edges of invariant 5).
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

__all__ = ["Frame", "current_frame", "enter", "leave"]


@dataclass(frozen=True)
class Frame:
    """A girder request running in this process: its key, node, root and owner token."""

    key: str
    node: str
    root_id: str
    owner: str


_current: contextvars.ContextVar[Frame | None] = contextvars.ContextVar("girder_frame", default=None)


def current_frame() -> Frame | None:
    """The girder request this thread (or greenlet) is running, if any."""
    return _current.get()


def enter(frame: Frame) -> contextvars.Token:
    return _current.set(frame)


def leave(token: contextvars.Token) -> None:
    _current.reset(token)
