"""Fixtures: a private Redis per session, and grids of real workers on each broker.

Under ``CI=true`` a missing RabbitMQ fails the AMQP tests instead of skipping them.
"""

from __future__ import annotations

import importlib
import os

import pytest

from tests.harness import Grid, RedisServer, amqp_available

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def redis_server():
    server = RedisServer().start()
    yield server
    server.stop()


def _check_broker(kind: str) -> None:
    if kind == "amqp" and not amqp_available():
        if IN_CI:
            pytest.fail("RabbitMQ is not reachable at $GIRDER_TEST_AMQP_URL; CI needs it")
        pytest.skip("RabbitMQ not reachable")


def configure_gridapp(grid: Grid):
    """(Re)load tests.gridapp in this process with the grid's configuration."""
    os.environ.update(grid.env)
    import tests.gridapp

    return importlib.reload(tests.gridapp)


@pytest.fixture(params=["redis", "amqp"])
def broker(request):
    _check_broker(request.param)
    return request.param


@pytest.fixture
def grid(redis_server, broker):
    """An empty grid (no workers yet) on each broker; ``grid.worker(...)`` adds real workers."""
    g = Grid(redis_server, broker)
    g.app_module = configure_gridapp(g)
    yield g
    g.stop()
    g.app_module.app.close()
