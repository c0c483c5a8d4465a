"""Fixtures: a private Redis per session, grids of real workers on each broker (and ``grids``,
those a test makes itself, killed at teardown), and blocking callers in threads.

Under ``CI=true`` a missing RabbitMQ fails the AMQP tests instead of skipping them.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from girder_celery.testing import RedisServer, amqp_unreachable
from tests.faults.support import Callers
from tests.harness import Grid

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def redis_server():
    server = RedisServer().start()
    yield server
    server.close()


def _check_broker(kind: str) -> None:
    why = amqp_unreachable() if kind == "amqp" else None
    if why is not None:
        if IN_CI:
            pytest.fail(f"RabbitMQ is not reachable at $GIRDER_TEST_AMQP_URL ({why}); CI needs it")
        pytest.skip(f"RabbitMQ not reachable: {why}")


@pytest.fixture(params=["redis", "amqp"])
def broker(request):
    _check_broker(request.param)
    return request.param


@pytest.fixture
def grids():
    """The grids a test makes (``grids.append(grid)``), killed at teardown: a warm shutdown would
    wait for whatever a failed test left running."""
    made: list[Grid] = []
    yield made
    for g in made:
        g.kill()
        g.close()


@pytest.fixture
def callers():
    """Blocking calls in threads (``tests.faults.support.Callers``)."""
    c = Callers()
    yield c
    c.close()


@pytest.fixture
def grid(redis_server, broker):
    """An empty grid (no workers yet) on each broker; ``grid.worker(...)`` adds real workers."""
    g = Grid(redis_server, broker)
    g.load_app()
    yield g
    g.close()


# -- core suite: worker pools, a shared live grid, and grids with custom timing

#: The worker pools end-to-end tests run on, with their concurrency.
POOLS = {"prefork": 2, "solo": 1}


@pytest.fixture(params=list(POOLS))
def worker_pool(request):
    """A worker pool for end-to-end tests: ``(pool, concurrency)``."""
    return request.param, POOLS[request.param]


@pytest.fixture(scope="session", params=[(b, p) for b in ("redis", "amqp") for p in POOLS], ids=lambda p: "-".join(p))
def _live_grid(request, redis_server):
    broker, pool = request.param
    _check_broker(broker)
    g = Grid(redis_server, broker)
    g.load_app()
    g.pool = pool
    g.node = g.worker("live", pool, POOLS[pool])
    yield g
    _fast_stop(g)


@pytest.fixture
def live(_live_grid):
    """A grid with one running worker, shared by the tests of each (broker, pool) pair.

    Tests on it use arguments of their own (keys never collide) and leave the worker idle.
    ``tests.gridapp`` is re-pointed at this grid if another grid reconfigured it since.
    """
    g = _live_grid
    if g.node.proc.poll() is not None:
        pytest.fail(f"the shared worker died:\n{g.node.output()[-5000:]}")
    if os.environ.get("GIRDER_TEST_PREFIX") != g.key_prefix:
        g.load_app()
    return g


@pytest.fixture
def make_grid(redis_server, broker):
    """Build grids on ``broker`` with their own lease and check interval:
    ``make_grid(lease=1.0, check=0.5)``; stopped at teardown."""
    made = []

    def make(**timing):
        g = Grid(redis_server, broker, **timing)
        g.load_app()
        made.append(g)
        return g

    yield make
    for g in made:
        _fast_stop(g)


def _fast_stop(g: Grid) -> None:
    """Close a grid after killing its workers: a warm shutdown would wait for requests a test left
    running (some sleep for seconds), and teardown checks nothing."""
    g.kill()
    g.close()


@pytest.fixture
def bg():
    """Run blocking calls (client waits) in threads: ``bg(fn, *args)`` gives a Future of
    ``(ok, value_or_exception, finished_at)``. Every such call has its own timeout."""
    pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="test-bg")

    def timed(fn, args, kwargs):
        try:
            return True, fn(*args, **kwargs), time.monotonic()
        except BaseException as exc:
            return False, exc, time.monotonic()

    yield lambda fn, *args, **kwargs: pool.submit(timed, fn, args, kwargs)
    pool.shutdown(wait=True, cancel_futures=True)
