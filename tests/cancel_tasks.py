"""Tasks of the cancellation suite (``tests/test_cancel.py``): a tree whose requests the test holds
at Redis gates, and marks of how far each run got, so "never ran" and "stopped" are read from
side effects."""

from tests import gridapp
from tests.gridapp import girder


def mark_key(name: str, tag: str, what: str) -> str:
    return f"{gridapp.PREFIX}:test:cancel:{name}:{tag}:{what}"


def mark(name: str, tag: str, what: str) -> None:
    gridapp._counter.incr(mark_key(name, tag, what))


def marks(name: str, tag: str, what: str) -> int:
    """How many runs of ``name`` (of test ``tag``) got to ``what``: start, end or after."""
    return int(gridapp._counter.get(mark_key(name, tag, what)) or 0)


def gate(tag: str, name: str) -> str:
    return gridapp.gate_key(f"{tag}:{name}")


def hold(tag: str, name: str) -> None:
    """Wait (at most 30 s) until the test opens the gate of ``name``."""
    gridapp._counter.blpop([gate(tag, name)], timeout=30)


@girder.task(name="grid.c_leaf")
def leaf(tag, name):
    mark(name, tag, "start")
    hold(tag, name)
    mark(name, tag, "end")
    return name


@girder.task(name="grid.c_after")
def after(tag, name):
    mark(name, tag, "after")
    return name


@girder.task(name="grid.c_step")
def step(tag, name):
    """Held at its gate, then makes a girder call (where a cancelled run stops at the latest)."""
    mark(name, tag, "start")
    hold(tag, name)
    after.call(tag, name)
    mark(name, tag, "end")
    return name


@girder.task(name="grid.c_root")
def root(tag):
    """Requests a leaf shared with ``sibling``, one queued, and a step it runs inline first (newest first)."""
    mark("root", tag, "start")
    return girder.requests([leaf.s(tag, "shared"), leaf.s(tag, "queued"), step.s(tag, "running")])


@girder.task(name="grid.c_sibling")
def sibling(tag):
    return leaf.call(tag, "shared")


@girder.task(name="grid.c_parent")
def parent(tag):
    """Requests one gated leaf, run inline."""
    mark("parent", tag, "start")
    return leaf.call(tag, "child")
