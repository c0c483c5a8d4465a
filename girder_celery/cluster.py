"""The state store on a Redis Cluster: ``girder_url = "redis+cluster://host:port[,host:port...]"``.

The client is redis-py's ``RedisCluster``, bootstrapped from the seed nodes the URL names: it
reads the cluster's slot map from the first seed that answers and routes each command to the
master of its key's hash slot, following ``MOVED`` and ``ASK`` after a failover or a resharding.
Girder's keys are laid out so that each script call touches one slot (``slots.py``).

A cluster URL pointing at a server that is not a cluster node, and seeds none of which can be
reached, are a ``GirderConnectionError`` saying what each seed answered, raised where the client
is first built: a worker's start, or a caller's first call.
"""

from __future__ import annotations

from typing import Any

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException

from .errors import GirderConnectionError, safe_url
from .settings import Settings, cluster_url

__all__ = ["cluster_client"]


def cluster_client(settings: Settings, **kwargs: Any) -> RedisCluster:
    """A client of the Redis Cluster whose seed nodes ``settings.url`` names; ``kwargs`` are the
    connection arguments of every node's connections (``decode_responses``, timeouts)."""
    seeds, options = cluster_url(settings.url)
    kwargs = {**kwargs, **{k: v for k, v in options.items() if v is not None}}
    try:
        return RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in seeds], **kwargs)
    except (RedisClusterException, redis.RedisError) as exc:
        raise GirderConnectionError(
            f"cannot reach girder's state store at {safe_url(settings.url)}: no seed node serves a Redis Cluster ("
            + "; ".join(_answer(host, port, kwargs) for host, port in seeds)
            + f"; redis-py: {exc})",
            url=safe_url(settings.url),
        ) from exc


def _answer(host: str, port: int, kwargs: dict[str, Any]) -> str:
    """What the seed at ``host:port`` is, for the error: unreachable, not a cluster node, or a
    node of a cluster that is not up."""
    where = f"{host}:{port}"
    try:
        with redis.Redis(host=host, port=port, **kwargs) as seed:
            info = seed.info("cluster")
            if not info.get("cluster_enabled"):
                return f"{where} is not a cluster node (cluster mode is off: a single Redis takes a redis:// URL)"
            state = seed.execute_command("CLUSTER", "INFO")
    except redis.AuthenticationError as exc:
        return f"{where} refused the login ({exc})"
    except redis.RedisError as exc:
        return f"{where} cannot be reached ({exc})"
    text = state if isinstance(state, str) else str(state)
    ok = "cluster_state:ok" in text
    return f"{where} is a cluster node" + ("" if ok else " of a cluster that is not up (cluster_state is not ok)")
