"""Celery's time limits and retries on a child run inline by its waiting parent (issue 13).

Real workers on both brokers and both pools of the shared live grid (``conftest.live``): each
parent requests a single child, which it claims in its submit and runs inline on its own stack.
Children record when each run starts (``tests/limit_tasks.py``), so delays and attempts are
read from their side effects.
"""

from __future__ import annotations

import datetime
import time
import uuid

import pytest
from celery.exceptions import Retry

from girder_celery import GirderError
from girder_celery.inline import retry_delay


def tag() -> str:
    return uuid.uuid4().hex[:8]


def call_parent(live, child: str, *args, timeout: float = 30):
    """``parent_of(child, *args)``: its value, or the ``GirderError`` it raised, and the seconds it took."""
    lt = live.app_module.limit_tasks
    start = time.monotonic()
    try:
        value = live.app_module.girder.request(lt.parent_of.s(child, *args), timeout=timeout)
    except GirderError as exc:
        return exc, time.monotonic() - start
    return value, time.monotonic() - start


def innermost(error: GirderError) -> GirderError:
    return error.chain()[-1]


def child_state(live, task, *args) -> dict:
    return live.app_module.girder.state(task.s(*args))


def assert_node_serves(live) -> None:
    """The worker survived and still runs a fresh request."""
    assert live.node.proc.poll() is None, live.node.output()[-3000:]
    t = tag()
    assert live.app_module.girder.request(live.app_module.add.s(t, "!"), timeout=15) == t + "!"


# -- limits ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "child,exc_type,message",
    [
        ("grid.soft_limited", "billiard.exceptions.SoftTimeLimitExceeded", "soft time limit (1s) exceeded"),
        ("grid.hard_limited", "billiard.exceptions.TimeLimitExceeded", "hard time limit (1s) exceeded"),
    ],
    ids=["soft", "hard"],
)
def test_an_inline_childs_time_limit_fails_it_in_about_the_limit_and_the_node_lives(live, child, exc_type, message):
    """A child with a 1 s limit sleeping 4 s, run inline: its parent hears of its limit after about 1 s."""
    lt, t = live.app_module.limit_tasks, tag()
    error, took = call_parent(live, child, 4, t)
    assert isinstance(error, GirderError), error
    own = innermost(error)
    assert (own.request, own.exc_type) == (f"{child}(4, {t!r})", exc_type)
    assert message in own.message  # billiard's classes print as their repr
    assert 0.9 < took < 2.5
    state = child_state(live, lt.CHILDREN[child], 4, t)
    assert (state["state"], state["placement"]) == ("failed", "inline")
    assert_node_serves(live)


NAPPING = pytest.mark.parametrize(
    "child,exc_type",
    [
        ("grid.napping_soft_limited", "billiard.exceptions.SoftTimeLimitExceeded"),
        ("grid.napping_hard_limited", "billiard.exceptions.TimeLimitExceeded"),
    ],
    ids=["soft", "hard"],
)


def assert_limited(error, took: float, request: str, exc_type: str, limit: float = 1) -> None:
    assert isinstance(error, GirderError), error
    own = innermost(error)
    assert (own.request, own.exc_type) == (request, exc_type)
    assert f"time limit ({limit}s) exceeded" in own.message
    assert limit - 0.1 < took < limit + 1.5


@NAPPING
def test_on_a_threads_node_an_inline_childs_limit_lands_between_its_naps(grid, child, exc_type):
    """Off the main thread the watchdog raises the limit at the thread's next Python instruction."""
    grid.worker("t1", "threads", 2)
    t = tag()
    start = time.monotonic()
    with pytest.raises(GirderError) as info:
        grid.app_module.girder.request(grid.app_module.limit_tasks.parent_of.s(child, 4, t), timeout=30)
    assert_limited(info.value, time.monotonic() - start, f"{child}(4, {t!r})", exc_type)
    assert grid.app_module.girder.request(grid.app_module.add.s(t, "!"), timeout=15) == t + "!"


@NAPPING
def test_an_inline_child_past_the_hop_to_a_fresh_thread_is_timed_too(live, child, exc_type):
    """20 nested inline runs: the deepest ones run on a fresh thread (frame.py), where the watchdog times them."""
    lt, t = live.app_module.limit_tasks, tag()
    start = time.monotonic()
    with pytest.raises(GirderError) as info:
        live.app_module.girder.request(lt.deep_parent.s(20, child, 4, t), timeout=30)
    assert_limited(info.value, time.monotonic() - start, f"{child}(4, {t!r})", exc_type)
    assert len(info.value.chain()) == 22
    assert_node_serves(live)


def test_a_child_done_within_its_limit_leaves_no_timer_behind(live):
    """Its parent sleeps on past the child's deadline and is not interrupted."""
    m, lt, t = live.app_module, live.app_module.limit_tasks, tag()
    assert m.girder.request(lt.outlives_its_childs_limit.s(t), timeout=15) == t
    assert child_state(live, lt.soft_limited, 0.2, t)["state"] == "done"


def test_an_inline_child_that_ignores_its_soft_limit_is_ended_by_its_hard_one(live):
    """``grid.stubborn`` catches SoftTimeLimitExceeded (0.5 s) and sleeps on: TimeLimitExceeded at 1.5 s."""
    lt, t = live.app_module.limit_tasks, tag()
    error, took = call_parent(live, "grid.stubborn", 4, t)
    assert isinstance(error, GirderError), error
    assert innermost(error).exc_type == "billiard.exceptions.TimeLimitExceeded"
    assert 1.4 < took < 3.0
    assert len(lt.starts("stubborn", t)) == 1
    assert_node_serves(live)


def test_an_inline_parents_own_limit_counts_the_parent_and_gives_its_child_back(live):
    """``limited_parent`` (soft limit 1 s), run inline, runs ``unlimited`` (2 s) inline: its limit fires
    in the child's frame, but fails the parent, not the child, which is given back queued and runs in
    full when next requested."""
    m, lt, t = live.app_module, live.app_module.limit_tasks, tag()
    error, took = call_parent(live, "grid.limited_parent", 2, t)
    assert isinstance(error, GirderError), error
    own = innermost(error)
    assert (own.request, own.exc_type) == (
        f"grid.limited_parent(2, {t!r})",
        "billiard.exceptions.SoftTimeLimitExceeded",
    )
    assert 0.9 < took < 1.9
    assert child_state(live, lt.unlimited, 2, t)["state"] == "queued"
    assert m.app.AsyncResult(lt.unlimited.key(2, t)).state == "PENDING"  # no failure mirrored
    assert m.girder.request(lt.unlimited.s(2, t), timeout=15) == t
    assert len(lt.starts("unlimited", t)) == 2
    assert_node_serves(live)


def test_a_messages_own_soft_limit_fails_it_not_its_inline_child(live):
    """A request run from its message: prefork's own soft limit (SIGUSR1) fires while its child runs
    inline and fails the parent, the child given back; solo enforces no limit of a message's (as in
    Celery), so the parent waits for its child."""
    m, lt, t = live.app_module, live.app_module.limit_tasks, tag()
    start = time.monotonic()
    if live.pool == "solo":
        assert m.girder.request(lt.limited_parent.s(2, t), timeout=15) == t
        assert child_state(live, lt.unlimited, 2, t)["state"] == "done"
        return
    try:
        m.girder.request(lt.limited_parent.s(2, t), timeout=15)
    except GirderError as exc:
        error = exc
    took = time.monotonic() - start
    assert innermost(error).request == f"grid.limited_parent(2, {t!r})"
    assert innermost(error).exc_type == "billiard.exceptions.SoftTimeLimitExceeded"
    assert 0.9 < took < 1.9
    assert child_state(live, lt.unlimited, 2, t)["state"] == "queued"
    assert m.girder.request(lt.unlimited.s(2, t), timeout=15) == t
    assert_node_serves(live)


def test_a_messages_own_hard_limit_fails_it_and_its_waiters_hear_of_it(live):
    """Prefork kills the process at a message's hard limit (Celery's on_timeout): girder fails the
    request for its waiters, rather than leave it running to lapse and run again. Solo enforces none."""
    m, lt, t = live.app_module, live.app_module.limit_tasks, tag()
    start = time.monotonic()
    if live.pool == "solo":
        assert m.girder.request(lt.hard_limited.s(2, t), timeout=15) == t
        return
    with pytest.raises(GirderError) as info:
        m.girder.request(lt.hard_limited.s(2, t), timeout=15)
    assert time.monotonic() - start < 2.5
    assert (info.value.request, info.value.exc_type) == (
        f"grid.hard_limited(2, {t!r})",
        "billiard.exceptions.TimeLimitExceeded",
    )
    assert len(lt.starts("hard_limited", t)) == 1
    assert_node_serves(live)


# -- retries -----------------------------------------------------------------------------------


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:])]


def test_an_inline_childs_autoretry_succeeds_on_attempt_2_after_its_delay(live):
    m, lt, t = live.app_module, live.app_module.limit_tasks, tag()
    value, took = call_parent(live, "grid.fails_first", t)
    assert value == {"retries": 1, "id": lt.fails_first.key(t)}
    (gap,) = gaps(lt.starts("fails_first", t))
    assert 1.0 <= gap < 2.5  # default_retry_delay=1
    state = child_state(live, lt.fails_first, t)
    assert (state["state"], state["placement"], state["attempts"]) == ("done", "inline", 1)  # one claim
    assert m.app.AsyncResult(lt.fails_first.key(t)).get(timeout=10) == value
    assert m.girder.request(lt.parent_of.s("grid.fails_first", t), timeout=5) == value  # memoized
    assert len(lt.starts("fails_first", t)) == 2


def test_a_retry_its_parent_gave_up_on_is_given_back_and_runs_when_next_requested(live):
    m, lt, t = live.app_module, live.app_module.limit_tasks, tag()
    x = uuid.uuid4().int % 10**9
    with pytest.raises(GirderError) as info:
        m.girder.request(lt.gives_up_on_a_retry.s(t, x), timeout=15)
    assert innermost(info.value).exc_type == "ZeroDivisionError"
    assert child_state(live, lt.fails_first, t)["state"] == "queued"
    assert len(lt.starts("fails_first", t)) == 1
    assert m.girder.request(lt.fails_first.s(t), timeout=15) == {"retries": 0, "id": lt.fails_first.key(t)}


def test_an_inline_childs_autoretry_fails_its_parent_after_max_retries(live):
    lt, t = live.app_module.limit_tasks, tag()
    error, took = call_parent(live, "grid.always_fails", t)
    assert isinstance(error, GirderError), error
    assert (innermost(error).exc_type, innermost(error).message) == ("ValueError", f"run 3 of {t} fails")
    assert all(0.2 <= gap < 1.5 for gap in gaps(lt.starts("always_fails", t)))  # max_retries=2: 3 runs
    assert len(lt.starts("always_fails", t)) == 3
    assert child_state(live, lt.always_fails, t)["state"] == "failed"


def test_an_inline_childs_self_retry_runs_again_after_its_countdown(live):
    lt, t = live.app_module.limit_tasks, tag()
    value, took = call_parent(live, "grid.retries_itself", t)
    assert value == 1
    (gap,) = gaps(lt.starts("retries_itself", t))
    assert 0.5 <= gap < 2.0


def test_an_inline_childs_retry_backoff_is_honoured(live):
    lt, t = live.app_module.limit_tasks, tag()
    value, took = call_parent(live, "grid.backs_off", t)
    assert value == 3
    first, second = gaps(lt.starts("backs_off", t))
    assert 1.0 <= first < 2.0 and 2.0 <= second < 3.0  # retry_backoff=1, no jitter: 1 s, then 2 s


def test_a_retrys_delay_is_its_countdown_or_its_eta_from_now():
    """What Celery's ``Retry`` carries as ``when``: ``countdown`` seconds, or an ``eta`` (aware or naive UTC)."""
    assert retry_delay(Retry(when=1.5)) == 1.5
    assert retry_delay(Retry(when=None)) == 0.0
    soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=10)
    assert 9 < retry_delay(Retry(when=soon)) <= 10
    assert 9 < retry_delay(Retry(when=soon.replace(tzinfo=None))) <= 10
    assert retry_delay(Retry(when=soon - datetime.timedelta(seconds=60))) == 0.0
