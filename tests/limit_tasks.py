"""Tasks with Celery's time limits and retries, run inline by a parent (the inline-controls suite).

Each child records when each of its runs started (``started``), so tests check delays and the
number of attempts on the side effects, not on the results.
"""

import time

from celery.exceptions import SoftTimeLimitExceeded

from tests import gridapp
from tests.gridapp import girder


def started_key(name: str, tag: str) -> str:
    return f"{gridapp.PREFIX}:test:started:{name}:{tag}"


def record_start(name: str, tag: str) -> int:
    """Note that a run of ``name(tag)`` starts now; returns which run it is (1, 2, ...)."""
    return gridapp._counter.rpush(started_key(name, tag), repr(time.time()))


def starts(name: str, tag: str) -> list[float]:
    """When each run of ``name(tag)`` started (epoch seconds), in order."""
    return [float(t) for t in gridapp._counter.lrange(started_key(name, tag), 0, -1)]


# -- time limits -------------------------------------------------------------------------------


def _sleeper(name: str, naps: bool = False, **limits):
    """A task ``grid.<name>(seconds, tag)`` with Celery's ``limits`` that sleeps ``seconds``: at
    once, or in 10 ms naps (``naps``: off the main thread a limit lands between two of them)."""

    @girder.task(name=f"grid.{name}", **limits)
    def sleeper(seconds, tag):
        record_start(name, tag)
        if naps:
            for _ in range(int(seconds * 100)):
                time.sleep(0.01)
        else:
            time.sleep(seconds)
        return tag

    return sleeper


soft_limited = _sleeper("soft_limited", soft_time_limit=1)
hard_limited = _sleeper("hard_limited", time_limit=1)
napping_soft_limited = _sleeper("napping_soft_limited", naps=True, soft_time_limit=1)
napping_hard_limited = _sleeper("napping_hard_limited", naps=True, time_limit=1)
unlimited = _sleeper("unlimited")


@girder.task(name="grid.stubborn", soft_time_limit=0.5, time_limit=1.5)
def stubborn(seconds, tag):
    """Ignores its soft limit: only the hard one ends it."""
    record_start("stubborn", tag)
    try:
        time.sleep(seconds)
    except SoftTimeLimitExceeded:
        time.sleep(seconds)
    return tag


@girder.task(name="grid.limited_parent", soft_time_limit=1)
def limited_parent(seconds, tag):
    """Its own soft limit passes while its child (which has none) runs inline."""
    record_start("limited_parent", tag)
    return unlimited.call(seconds, tag)


# -- retries -----------------------------------------------------------------------------------


@girder.task(bind=True, name="grid.fails_first", autoretry_for=(ValueError,), max_retries=3, default_retry_delay=1)
def fails_first(self, tag):
    if record_start("fails_first", tag) < 2:
        raise ValueError(f"first run of {tag} fails")
    return {"retries": self.request.retries, "id": self.request.id}


@girder.task(name="grid.always_fails", autoretry_for=(ValueError,), max_retries=2, default_retry_delay=0.2)
def always_fails(tag):
    run = record_start("always_fails", tag)
    raise ValueError(f"run {run} of {tag} fails")


@girder.task(bind=True, name="grid.retries_itself", max_retries=1)
def retries_itself(self, tag):
    """Calls ``self.retry(countdown=...)`` on its first run."""
    if record_start("retries_itself", tag) < 2:
        raise self.retry(countdown=0.5)
    return self.request.retries


@girder.task(name="grid.backs_off", autoretry_for=(ValueError,), max_retries=2, retry_backoff=1, retry_jitter=False)
def backs_off(tag):
    """Fails twice; Celery's backoff waits 1 s, then 2 s."""
    run = record_start("backs_off", tag)
    if run < 3:
        raise ValueError(f"run {run} of {tag} fails")
    return run


@girder.task(name="grid.outlives_its_childs_limit")
def outlives_its_childs_limit(tag):
    """Runs ``soft_limited(0.2, tag)`` inline, well within its 1 s limit, then sleeps past it."""
    value = soft_limited.call(0.2, tag)
    time.sleep(1.5)
    return value


@girder.task(name="grid.gives_up_on_a_retry")
def gives_up_on_a_retry(tag, x):
    """Runs ``fails_first(tag)`` first (newest first), which Celery retries in 1 s; meanwhile
    ``divide(x, 0)`` fails, and this request with it."""
    return girder.requests([gridapp.divide.s(x, 0), fails_first.s(tag)])


@girder.task(name="grid.deep_parent")
def deep_parent(depth, name, *args):
    """``depth`` nested inline runs, then ``name(*args)`` at the bottom (past the hop to a fresh thread)."""
    return CHILDREN[name].call(*args) if depth == 0 else deep_parent.call(depth - 1, name, *args)


CHILDREN = {
    t.name: t
    for t in (soft_limited, hard_limited, napping_soft_limited, napping_hard_limited, stubborn, unlimited)
    + (limited_parent, fails_first, always_fails, retries_itself, backs_off)
}


@girder.task(name="grid.parent_of")
def parent_of(name, *args):
    """Requests ``name(*args)``, which it runs inline (its only sub-request); its value."""
    return CHILDREN[name].call(*args)
