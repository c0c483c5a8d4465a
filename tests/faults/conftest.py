"""Fixtures of the fault-injection suite: fault grids (killed at teardown), private Redis servers
a test may kill, callers in threads, and the session's recovery figures."""

from __future__ import annotations

import pytest

from girder_celery.testing import RedisServer
from tests.conftest import _check_broker
from tests.faults.support import Callers, Figures, fault_grid


@pytest.fixture(scope="session")
def figures():
    """The session's recovery figures; printed (``-s``) and written as JSON at the end."""
    collected = Figures()
    yield collected
    collected.report()


@pytest.fixture
def callers():
    c = Callers()
    yield c
    c.close()


@pytest.fixture
def make_fault_grid(redis_server):
    """``make_fault_grid(broker, lease=, check=, store=, broker_server=, reoffer=)``: see
    ``support.fault_grid``. Its workers are killed at teardown (a warm shutdown would wait for
    whatever a failed test left running)."""
    made = []

    def make(broker: str = "redis", **options):
        _check_broker(broker)
        grid = fault_grid(redis_server, broker, **options)
        made.append(grid)
        return grid

    yield make
    for grid in made:
        grid.kill()
        grid.close()


@pytest.fixture
def private_redis():
    """``private_redis(persistent=False)``: a started RedisServer of the test's own, which it may
    kill, freeze and restart; closed at teardown."""
    servers: list[RedisServer] = []

    def make(persistent: bool = False) -> RedisServer:
        server = RedisServer(persistent=persistent).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()  # SIGKILL reaches a frozen server too
