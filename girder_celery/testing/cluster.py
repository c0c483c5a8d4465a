"""A Redis Cluster for tests: three masters (``redis-server --cluster-enabled yes``), each a
private process on a free loopback port, joined by ``redis-cli --cluster create`` with no
replicas, and awaited until every node says ``cluster_state:ok``.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import redis

from .servers import RedisServer, free_port, redis_server_binary

__all__ = ["ClusterGroup"]


def redis_cli_binary() -> str:
    """``redis-cli`` beside the ``redis-server`` in use, else on PATH."""
    beside = Path(redis_server_binary()).with_name("redis-cli")
    found = str(beside) if beside.exists() else shutil.which("redis-cli")
    if not found:
        raise RuntimeError("no redis-cli beside redis-server or on PATH: a Redis Cluster cannot be created")
    return found


def _bus_port_free() -> int:
    """A free port whose cluster bus port (itself + 10000, before Redis 7's ``cluster-port``) is
    free too, and in range."""
    for _ in range(100):
        port = free_port()
        if port <= 55535 and _free(port + 10000):
            return port
    raise RuntimeError("found no free port with a free cluster bus port (+10000)")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class ClusterGroup:
    """``masters`` cluster-enabled Redis servers joined into one cluster covering every slot.

    ``password`` protects each node's default user (``requirepass``; ``url`` carries it).
    """

    def __init__(self, masters: int = 3, password: str | None = None, node_timeout_ms: int = 1000) -> None:
        args = ["--cluster-enabled", "yes", "--cluster-node-timeout", str(node_timeout_ms)]
        self.servers = [RedisServer(password, args) for _ in range(masters)]
        for server in self.servers:
            server.port = _bus_port_free()
        self.password = password

    def start(self, timeout: float = 30) -> ClusterGroup:
        """Start the servers, create the cluster and wait until every node sees it up."""
        try:
            for server in self.servers:
                server.start(timeout)
            auth = ["-a", self.password, "--no-auth-warning"] if self.password else []
            nodes = [f"127.0.0.1:{s.port}" for s in self.servers]
            subprocess.run(
                [redis_cli_binary(), *auth, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
                check=True, capture_output=True, timeout=timeout,
            )  # fmt: skip
            self._await_ok(timeout)
        except BaseException:
            self.close()
            raise
        return self

    def _await_ok(self, timeout: float) -> None:
        # The nodes agree by gossip after create returns; nothing announces it: polled.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all("cluster_state:ok" in self._info(s) for s in self.servers):
                return
            time.sleep(0.05)
        raise RuntimeError(f"the Redis Cluster on ports {self.ports} was not up within {timeout}s")

    @staticmethod
    def _info(server: RedisServer) -> str:
        with server.client() as client:
            return client.execute_command("CLUSTER", "INFO")

    @property
    def ports(self) -> list[int]:
        return [s.port for s in self.servers]

    def url(self, seeds: int | None = None) -> str:
        """``redis+cluster://`` naming the first ``seeds`` nodes (default: all), with the password."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis+cluster://{auth}" + ",".join(f"127.0.0.1:{p}" for p in self.ports[:seeds])

    def client(self, **options: Any) -> redis.RedisCluster:
        """A client of the cluster (``options`` go to ``redis.RedisCluster``, e.g. ``client_name``)."""
        return redis.RedisCluster(
            host="127.0.0.1", port=self.ports[0], password=self.password, decode_responses=True, **options
        )

    def close(self) -> None:
        """Stop every node and remove their directories."""
        for server in self.servers:
            server.close()
