"""``celery -A proj girder ...``: the command plugin, run as a real ``celery`` subprocess against
the private Redis (no workers needed: the requests are made in the state store directly)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.core_support import redis_now_ms, wait_redis_past
from tests.harness import Grid

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def grid(redis_server):
    g = Grid(redis_server, "redis")
    g.load_app()
    yield g
    g.close()


def celery(
    env: dict[str, str], *args: str, app: str = "tests.gridapp", cwd: Path = ROOT
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", app, "girder", *args],
        env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
        cwd=cwd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def done_request(grid, word: str, queue: str = "q") -> str:
    """A request of ``echo(word)`` made done in the store: its key."""
    g, m = grid.app_module.girder, grid.app_module
    request = g._prepare(m.echo.s(word), queue)
    g.runtime.offers.submit([request], "", offer=False)
    assert g.store.claim(request.key, "cli/1/a", "cli", 60_000)[0] == "claimed"
    assert g.store.complete(request.key, "cli/1/a", json.dumps([[word], {}]), 0)
    return request.key


def test_state_prints_the_record_as_json(grid):
    """celery girder state prints a request's record as JSON."""
    key = done_request(grid, "hello")
    out = celery(grid.env, "state", key)
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)
    assert (record["key"], record["state"], record["request"], record["ran_by"]) == (
        key, "done", "grid.echo('hello')", "cli/1/a",
    )  # fmt: skip


def test_forget_drops_a_memoized_value_and_says_when_there_was_none(grid):
    """celery girder forget drops a done request, and says so when there is nothing to forget."""
    key = done_request(grid, "bye")
    first = celery(grid.env, "forget", key)
    assert (first.returncode, first.stdout.strip()) == (0, f"forgot {key}"), first.stderr
    assert grid.app_module.girder.state(key)["state"] == "absent"
    again = celery(grid.env, "forget", key)
    assert again.returncode == 0 and "nothing forgotten" in again.stdout, again.stderr


def test_offers_lists_what_waits_on_a_queue_oldest_first(grid):
    """celery girder offers lists the offers waiting on a queue, oldest first, at most --limit."""
    g, m = grid.app_module.girder, grid.app_module
    queue = f"{grid.queue}-offers"
    requests = [g._prepare(m.echo.s(f"w{i}"), queue) for i in range(3)]
    for request in requests:  # each offered in a later millisecond than the one before
        g.runtime.offers.submit([request], "", offer=False)
        wait_redis_past(g.store.client, redis_now_ms(g.store.client))
    out = celery(grid.env, "offers", queue, "--limit", "2")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"3 offer(s) waiting on {queue}; the 2 oldest:"
    assert [line.split()[2] for line in lines[1:]] == [requests[0].key, requests[1].key]
    assert lines[1].endswith("grid.echo('w0')") and float(lines[1].split()[0]) >= 0
    empty = celery(grid.env, "offers", f"{queue}-none")
    assert empty.stdout.strip() == f"0 offer(s) waiting on {queue}-none"


def test_bad_input_and_an_unreachable_store_give_clear_errors(grid, tmp_path):
    """Bad input, an app without Girder and an unreachable store exit with clear errors, no traceback."""
    bad_key = celery(grid.env, "state", "not-a-key")
    assert bad_key.returncode == 2 and "not a girder key" in bad_key.stderr, bad_key.stderr
    bad_limit = celery(grid.env, "offers", "q", "--limit", "0")
    assert bad_limit.returncode == 2 and "--limit" in bad_limit.stderr, bad_limit.stderr

    (tmp_path / "plainapp.py").write_text("from celery import Celery\napp = Celery('plain')\n")
    plain = celery(grid.env, "state", "0" * 64, app="plainapp", cwd=tmp_path)
    assert plain.returncode == 2 and "has no Girder" in plain.stderr, plain.stderr

    dead = {**grid.env, "GIRDER_TEST_STORE": "redis://127.0.0.1:1/0"}
    down = celery(dead, "state", "0" * 64)
    assert down.returncode == 1 and "Traceback" not in down.stderr, down.stderr
    assert "127.0.0.1:1" in down.stderr, down.stderr
