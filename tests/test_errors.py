"""Errors: what a failed request tells its waiters, timeouts, and which failures are memoized.

``GirderError`` carries the failed request's key, its readable form, the remote exception type,
message and traceback, and the chain of failed sub-requests; a timeout names the key and the
state it was left in; failures reach every waiter in flight and are memoized only with
``cache_errors=True``; ``cache_ttl`` expires a value.
"""

from __future__ import annotations

import time
import uuid

import pytest

from girder_celery import GirderError, GirderTimeout
from tests.core_support import concurrent_failures, open_gate, record, runs, tag, wait_state, waiters
from tests.harness import wait_until


def num() -> int:
    return uuid.uuid4().int % 10**12


# -- GirderError itself ------------------------------------------------------------------------


def chain() -> GirderError:
    inner = GirderError(
        "division by zero",
        key="c" * 64,
        request="proj.divide(1, 0)",
        exc_type="ZeroDivisionError",
        remote_traceback=(
            'Traceback (most recent call last):\n  File "divide.py", line 2\nZeroDivisionError: division by zero\n'
        ),
    )
    middle = GirderError(
        "a sub-request failed", key="b" * 64, request="proj.ratio(1)", exc_type="girder_celery.errors.GirderError",
        remote_traceback="middle traceback", causes=[inner],
    )  # fmt: skip
    return GirderError(
        "a sub-request failed", key="a" * 64, request="proj.report()", exc_type="girder_celery.errors.GirderError",
        remote_traceback="outer traceback", causes=[middle],
    )  # fmt: skip


def test_str_shows_the_chain_outermost_first_with_the_innermost_traceback():
    """str() of an error chain lists it outermost first, with only the innermost traceback."""
    text = str(chain())
    lines = text.splitlines()
    assert lines[0] == "proj.report() failed: girder_celery.errors.GirderError: a sub-request failed"
    assert lines[1] == "  caused by proj.ratio(1) failed: girder_celery.errors.GirderError: a sub-request failed"
    assert lines[2] == "  caused by proj.divide(1, 0) failed: ZeroDivisionError: division by zero"
    assert lines[3] == "Remote traceback of proj.divide(1, 0):"
    assert text.endswith("ZeroDivisionError: division by zero")
    assert "outer traceback" not in text and "middle traceback" not in text


def test_chain_and_cause():
    """chain() lists the errors outermost first, and __cause__ is the first cause."""
    err = chain()
    assert [e.request for e in err.chain()] == ["proj.report()", "proj.ratio(1)", "proj.divide(1, 0)"]
    assert err.__cause__ is err.causes[0]


def test_to_dict_from_dict_round_trip_keeps_every_field():
    """to_dict() and from_dict() round-trip every field of an error chain."""
    err = chain()
    back = GirderError.from_dict(err.to_dict())
    assert back.to_dict() == err.to_dict()
    assert str(back) == str(err)
    inner = back.chain()[-1]
    assert (inner.key, inner.exc_type, inner.message) == ("c" * 64, "ZeroDivisionError", "division by zero")


def test_from_exception_names_the_type_and_keeps_girder_causes():
    """from_exception() names the exception's type and keeps the GirderErrors it was raised from."""
    cause = GirderError("boom", key="d" * 64, request="p.sub()", exc_type="ValueError")
    try:
        try:
            raise cause
        except GirderError as exc:
            raise RuntimeError("could not finish") from exc
    except RuntimeError as exc:
        err = GirderError.from_exception(exc, key="e" * 64, request="p.top()")
    assert (err.key, err.request) == ("e" * 64, "p.top()")
    assert (err.exc_type, err.message) == ("RuntimeError", "could not finish")
    assert err.causes == [cause]
    assert "RuntimeError: could not finish" in err.remote_traceback


# -- failures on a live worker ---------------------------------------------------------------


def test_a_remote_failure_carries_key_request_type_message_and_traceback(live):
    """A remote failure carries the key, the readable request, type, message and traceback."""
    m = live.app_module
    a = num()
    with pytest.raises(GirderError) as info:
        m.girder.request(m.divide.s(a, 0), timeout=10)
    err = info.value
    assert err.key == m.divide.key(a, 0)
    assert err.request == f"grid.divide({a}, 0)"
    assert err.exc_type == "ZeroDivisionError"
    assert err.message == "division by zero"
    assert "return x / y" in err.remote_traceback and "ZeroDivisionError" in err.remote_traceback
    assert err.causes == []
    text = str(err)
    assert text.startswith(f"grid.divide({a}, 0) failed: ZeroDivisionError: division by zero")
    assert f"Remote traceback of grid.divide({a}, 0):" in text and "return x / y" in text
    assert m.girder.state(m.divide.s(a, 0))["state"] == "failed"


def test_the_chain_names_the_failed_sub_request(live):
    """A failed sub-request is its requester's cause, named in the error's chain and text."""
    m = live.app_module
    a = num()
    with pytest.raises(GirderError) as info:
        m.girder.request(m.outer_divide.s(a), timeout=20)
    err = info.value
    assert err.request == f"grid.outer_divide({a})" and err.key == m.outer_divide.key(a)
    assert [e.request for e in err.chain()] == [f"grid.outer_divide({a})", f"grid.divide({a}, 0)"]
    inner = err.causes[0]
    assert (inner.key, inner.exc_type) == (m.divide.key(a, 0), "ZeroDivisionError")
    lines = str(err).splitlines()
    assert lines[0].startswith(f"grid.outer_divide({a}) failed:")
    assert lines[1] == f"  caused by grid.divide({a}, 0) failed: ZeroDivisionError: division by zero"
    assert lines[2] == f"Remote traceback of grid.divide({a}, 0):"
    assert "return x / y" in str(err)


def test_a_timeout_names_the_key_and_the_running_state(live):
    """A timeout names the key and its running state and withdraws its waiter; the request goes on."""
    m = live.app_module
    t = tag()
    key = m.gated.key(t)
    result = m.gated.delay(t)
    wait_state(live, key, "running")
    started = time.monotonic()
    with pytest.raises(GirderTimeout) as info:
        m.girder.request(m.gated.s(t), timeout=0.5)
    assert 0.5 <= time.monotonic() - started < 3
    err = info.value
    assert isinstance(err, GirderError) and isinstance(err, TimeoutError)
    assert (err.key, err.state, err.request) == (key, "running", f"grid.gated({t!r}, 'value')")
    assert key in str(err) and "running" in str(err)
    assert waiters(live, key) == set()  # the waiter that gave up withdrew
    open_gate(live, t)
    assert result.get(timeout=10) == t


def test_an_uncached_failure_reaches_every_waiter_then_runs_again(live):
    """A failure without cache_errors reaches every waiter in flight; the next request runs again."""
    m = live.app_module
    t = tag()
    key, errors = concurrent_failures(live, t, "raise")
    assert all(isinstance(e, GirderError) and not isinstance(e, GirderTimeout) for e in errors), errors
    assert {(e.key, e.exc_type, e.message) for e in errors} == {(key, "ValueError", f"gate {t} failed")}
    assert runs(live, "grid.gated", key) == 1
    assert m.girder.state(key)["state"] == "failed"  # visible to state(), not memoized
    open_gate(live, t)
    with pytest.raises(GirderError, match=f"gate {t} failed"):
        m.girder.request(m.gated.s(t, "raise"), timeout=10)
    assert runs(live, "grid.gated", key) == 2


def test_cache_errors_memoizes_the_failure_until_forgotten(live):
    """cache_errors=True memoizes a failure, answered without a run until it is forgotten."""
    m = live.app_module
    a = num()
    key = m.memo_fail.key(a)
    with pytest.raises(GirderError) as first:
        m.girder.request(m.memo_fail.s(a), timeout=10)
    with pytest.raises(GirderError) as second:
        m.memo_fail.call(a)
    assert first.value.to_dict() == second.value.to_dict()
    assert (second.value.key, second.value.exc_type, second.value.message) == (key, "ValueError", f"bad {a}")
    assert runs(live, "grid.flaky", key) == 1
    rec = record(live, key)
    assert (rec["state"], rec["memo"]) == ("failed", "1")
    # The run's own copy goes to the result backend after its waiters hear (mirror.py): awaited
    # here, or it could land after delay()'s copy, over it.
    wait_until(lambda: m.app.AsyncResult(key).state == "FAILURE", 10, "the run's copy in the result backend")
    with pytest.raises(GirderError, match=f"bad {a}"):
        m.memo_fail.delay(a).get(timeout=5)  # answered without a message, through the backend
    assert runs(live, "grid.flaky", key) == 1
    assert m.girder.forget(key) is True
    with pytest.raises(GirderError):
        m.memo_fail.call(a)
    assert runs(live, "grid.flaky", key) == 2


def test_cache_ttl_expires_the_value(live):
    """cache_ttl expires a value's record; the request then runs again."""
    m = live.app_module
    a = num()
    key = m.short_lived.key(a)
    client = live.redis_server.client()
    record_key = m.girder.store.record_key(key)
    assert m.girder.request(m.short_lived.s(a), timeout=10) == a
    assert 0 < client.pttl(record_key) <= 1000
    assert m.short_lived.call(a) == a and runs(live, "grid.short_lived", key) == 1
    wait_until(lambda: not client.exists(record_key), 5, "the value to expire", step=0.02)
    assert m.girder.state(key)["state"] == "absent"
    assert m.girder.request(m.short_lived.s(a), timeout=10) == a
    assert runs(live, "grid.short_lived", key) == 2


def test_values_are_kept_without_a_ttl(live):
    """Without cache_ttl a value's record never expires."""
    m = live.app_module
    a = num()
    assert m.girder.request(m.add.s(a, 3), timeout=10) == a + 3
    assert live.redis_server.client().pttl(m.girder.store.record_key(m.add.key(a, 3))) == -1
