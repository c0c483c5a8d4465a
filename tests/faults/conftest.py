"""Fixtures of the fault-injection suite: fault grids (killed at teardown), private Redis servers
a test may kill, and the session's recovery figures (callers in threads: ``tests/conftest.py``)."""

from __future__ import annotations

import pytest

from girder_celery.testing import RedisServer
from tests.conftest import _check_broker
from tests.faults.support import Figures, fault_grid


@pytest.fixture(scope="session")
def figures():
    """The session's recovery figures; printed (``-s``) and written as JSON at the end."""
    collected = Figures()
    yield collected
    collected.report()


@pytest.fixture
def make_fault_grid(redis_server, grids):
    """``make_fault_grid(broker, lease=, check=, store=, broker_server=, reoffer=)``: see
    ``support.fault_grid``. Its workers are killed at teardown (``grids``)."""

    def make(broker: str = "redis", **options):
        _check_broker(broker)
        grid = fault_grid(redis_server, broker, **options)
        grids.append(grid)
        return grid

    return make


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
