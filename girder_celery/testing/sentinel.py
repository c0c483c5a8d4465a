"""A Sentinel group for tests: a Redis master, its replica (``--replicaof``) and one
``redis-server --sentinel`` watching them, each a private process on a free loopback port.

With ``TlsFiles`` the master and replica serve TLS too, replicate over it, and are watched (and
named to clients) at their TLS ports. The sentinel's ``down-after-milliseconds`` and
``failover-timeout`` are low, so a master killed with SIGKILL is replaced by its replica within
about a second. ``kill_master`` kills it and returns a ``Failover``, whose ``wait`` awaits the
sentinel's ``+switch-master`` announcement (subscribed to before the kill, so it cannot be missed).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from .servers import RedisServer, answers_ping, free_port, redis_server_binary

__all__ = ["Failover", "SentinelGroup", "TlsFiles"]


@dataclass(frozen=True)
class TlsFiles:
    """A TLS set-up: ``ca`` signed ``server`` (certificate, key), which master and replica
    present, and ``client``, which the replica and the sentinel present to them."""

    ca: Path
    server: tuple[Path, Path]
    client: tuple[Path, Path]


class Failover:
    """A master just killed; ``wait`` returns once the sentinel has promoted another."""

    def __init__(self, group: SentinelGroup, pubsub: redis.client.PubSub, old: RedisServer) -> None:
        self.group = group
        self.old = old
        self.started = time.monotonic()
        self._pubsub = pubsub

    def wait(self, timeout: float = 15.0) -> RedisServer:
        """The new master, once the sentinel announces it (``RuntimeError`` past ``timeout``)."""
        deadline = self.started + timeout
        try:
            while (left := deadline - time.monotonic()) > 0:
                message = self._pubsub.get_message(ignore_subscribe_messages=True, timeout=left)
                if message is not None and message["data"].split()[0] == self.group.master_name:
                    self.seconds = time.monotonic() - self.started
                    return self.group.master()
        finally:
            self._pubsub.close()
        raise RuntimeError(f"the sentinel promoted no replica of {self.group.master_name!r} within {timeout}s")


class SentinelGroup:
    """A master, a replica and a sentinel watching them as ``master_name``.

    ``password`` protects master and replica (the sentinel is told it: ``auth-pass``), and
    ``sentinel_password`` the sentinel itself (``requirepass``, which ``sentinel_kwargs`` carries);
    ``tls`` adds a TLS port to master and replica, the one the sentinel watches.
    """

    def __init__(
        self,
        master_name: str = "girder-master",
        password: str | None = None,
        sentinel_password: str | None = None,
        down_after_ms: int = 200,
        failover_timeout_ms: int = 1000,
        tls: TlsFiles | None = None,
    ) -> None:
        self.master_name = master_name
        self.password = password
        self.sentinel_password = sentinel_password
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.tls = tls
        self.servers: list[RedisServer] = []
        #: Each server by the port the sentinel knows it at (its TLS port, with ``tls``).
        self.by_port: dict[int, RedisServer] = {}
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="girder-sentinel-"))
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20) -> SentinelGroup:
        """Start master, replica and sentinel, and wait until the sentinel knows the replica."""
        # No delay before a full sync (5 s by default, waiting for more replicas); either may be
        # master, so both are set alike.
        args = ["--repl-diskless-sync-delay", "0", *(["--masterauth", self.password] if self.password else [])]
        master_port = self._start_server(args, timeout)
        self._start_server([*args, "--replicaof", "127.0.0.1", str(master_port)], timeout)
        conf = self.dir / "sentinel.conf"
        lines = [
            f"port {self.port}", "bind 127.0.0.1", f"dir {self.dir}", *self._sentinel_tls(),
            f"sentinel monitor {self.master_name} 127.0.0.1 {master_port} 1",
            f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}",
            f"sentinel failover-timeout {self.master_name} {self.failover_timeout_ms}",
            *([f"sentinel auth-pass {self.master_name} {self.password}"] if self.password else []),
            *([f"requirepass {self.sentinel_password}"] if self.sentinel_password else []),
        ]  # fmt: skip
        conf.write_text("\n".join(lines) + "\n")  # the sentinel rewrites it as it learns
        self.proc = subprocess.Popen(
            [redis_server_binary(), str(conf), "--sentinel"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        if not answers_ping(self.proc, self.port, self.sentinel_password, timeout):
            self.close()
            raise RuntimeError(f"redis-server --sentinel did not start on port {self.port} in {timeout}s")
        self._await_replica(timeout)
        return self

    def _start_server(self, args: list[str], timeout: float) -> int:
        """Start master or replica: the port the sentinel is to know it at."""
        tls_port, tls = free_port(), self.tls
        if tls is not None:
            args = [*args, "--tls-port", str(tls_port), "--tls-replication", "yes",
                    "--tls-ca-cert-file", str(tls.ca), "--tls-cert-file", str(tls.server[0]),
                    "--tls-key-file", str(tls.server[1]), "--tls-client-cert-file", str(tls.client[0]),
                    "--tls-client-key-file", str(tls.client[1])]  # fmt: skip
        server = RedisServer(self.password, args).start(timeout)
        self.servers.append(server)
        port = tls_port if tls is not None else server.port
        self.by_port[port] = server
        return port

    def _sentinel_tls(self) -> list[str]:
        # The sentinel serves no TLS itself; it talks TLS to master and replica, as a client.
        if self.tls is None:
            return []
        t = self.tls
        return ["tls-replication yes", f"tls-ca-cert-file {t.ca}", f"tls-cert-file {t.client[0]}",
                f"tls-key-file {t.client[1]}"]  # fmt: skip

    def _await_replica(self, timeout: float) -> None:
        # The sentinel learns of replicas from the master's INFO, which it reads every 10 s (at
        # once on connecting); the replica must be linked first. Nothing announces it: polled.
        deadline = time.monotonic() + timeout
        with self.sentinel() as sentinel:
            while time.monotonic() < deadline:
                replicas = sentinel.sentinel_slaves(self.master_name)
                if any(r["master-link-status"] == "ok" and not r["is_sdown"] for r in replicas):
                    return
                time.sleep(0.05)
        self.close()
        raise RuntimeError(f"the sentinel saw no linked replica of {self.master_name!r} in {timeout}s")

    def url(self, db: int = 0) -> str:
        """``sentinel://`` naming the sentinel, with the master's password and database."""
        auth = f":{self.password}@" if self.password else ""
        return f"sentinel://{auth}127.0.0.1:{self.port}/{db}"

    def sentinel(self) -> redis.Redis:
        """A client of the sentinel itself."""
        return redis.Redis(port=self.port, password=self.sentinel_password, decode_responses=True)

    def master(self) -> RedisServer:
        """The server the sentinel names master now."""
        with self.sentinel() as sentinel:
            _, port = sentinel.sentinel_get_master_addr_by_name(self.master_name)
        return self.by_port[int(port)]

    def kill_master(self) -> Failover:
        """SIGKILL the master; ``Failover.wait`` awaits its replacement."""
        old = self.master()
        pubsub = self.sentinel().pubsub()
        pubsub.subscribe("+switch-master")
        pubsub.get_message(timeout=5)  # the subscription is confirmed: no announcement is missed
        old.stop()
        return Failover(self, pubsub, old)

    def close(self) -> None:
        """Stop every process and remove their directories."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for server in self.servers:
            server.close()
        shutil.rmtree(self.dir, ignore_errors=True)
