"""Settings: defaults on a bare app, validation with clear errors."""

from __future__ import annotations

import pytest
from celery import Celery

from girder_celery import Girder
from girder_celery.settings import Settings


def bare_app(**conf) -> Celery:
    app = Celery("bare", broker="memory://", set_as_current=False)
    app.conf.update(conf)
    return app


def test_a_bare_app_gets_every_default():
    """A bare app gets every default setting."""
    girder = Girder(bare_app(), url="redis://127.0.0.1:1/0")
    s = girder.settings
    assert s == Settings(url="redis://127.0.0.1:1/0")
    assert (s.key_prefix, s.pool, s.request_timeout, s.lease_seconds) == ("girder", None, None, 30.0)
    assert (s.hoist_after, s.pools, s.busy_poll, s.graph_ttl) == (0.1, {}, 0.0002, 86400.0)


def test_pools_give_the_ancestor_chain():
    """girder_pools gives each pool's chain of ancestors."""
    s = Girder(bare_app(girder_url="redis://x", girder_pools={"desk": "region", "region": None})).settings
    assert s.pool_chain("desk") == ["desk", "region"]
    assert s.pool_chain("region") == ["region"]
    assert s.pool_chain("elsewhere") == ["elsewhere"]


@pytest.mark.parametrize(
    ("conf", "message"),
    [
        ({}, "girder needs a Redis URL"),
        ({"girder_url": "http://x"}, "must be a redis://"),
        ({"girder_url": "redis://x", "girder_pools": {"a": "b", "b": "a"}}, "cycle"),
        ({"girder_url": "redis://x", "girder_pools": ["a"]}, "must be a dict"),
        ({"girder_url": "redis://x", "girder_lease_seconds": 0}, "girder_lease_seconds must be a positive"),
        ({"girder_url": "redis://x", "girder_hoist_after": -1}, "girder_hoist_after must be"),
        ({"girder_url": "redis://x", "girder_busy_poll": "fast"}, "girder_busy_poll must be"),
        ({"girder_url": "redis://x", "girder_graph_ttl": 0}, "girder_graph_ttl must be a positive"),
        ({"girder_url": "redis://x", "girder_graph_ttl": "1d"}, "girder_graph_ttl must be a positive"),
    ],
)
def test_bad_settings_are_refused_with_a_clear_error(conf, message):
    """Each bad setting is refused with a ValueError saying what is wrong."""
    girder = Girder(bare_app(**conf))
    with pytest.raises(ValueError, match=message):
        girder.settings  # noqa: B018
