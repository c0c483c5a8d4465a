"""Girder's settings: ``app.conf.girder_*``, read once, validated, with documented defaults.

Settings are in seconds, as Celery's are; the state store's scripts count milliseconds, and
the conversions are made here, once (``ms`` and the ``*_ms`` properties).
"""

from __future__ import annotations

from dataclasses import MISSING, Field, dataclass, field, fields
from functools import cached_property
from typing import Any

__all__ = ["Settings", "ms"]


@dataclass(frozen=True)
class Settings:
    """The ``girder_`` settings of a Celery app (each field is ``app.conf.girder_<field>``)."""

    #: Redis URL of the state store; ``Girder(app, url=...)`` takes precedence.
    url: str | None = None
    #: Prefix of every Redis key girder writes.
    key_prefix: str = "girder"
    #: Queue that top-level requests go to; None lets Celery's routing decide (task_routes,
    #: then ``task_default_queue``), so a plain ``celery -A proj worker`` serves them.
    pool: str | None = None
    #: Seconds a caller waits for a request before ``GirderTimeout``; None waits as long as the
    #: request is alive (a lost or orphaned request is re-offered, never waited on forever).
    request_timeout: float | None = None
    #: Seconds an executor's claim lasts without renewal; renewed every third of it.
    lease_seconds: float = 30.0
    #: Seconds a done value is kept; None keeps it forever. A task's ``cache_ttl`` overrides.
    result_ttl: float | None = None
    #: Seconds a failure that is not memoized stays visible to ``girder.state()``.
    error_ttl: float = 86400.0
    #: Seconds between a waiter's checks that what it waits on is still alive.
    check_interval: float = 5.0
    #: Seconds after which a request still queued gets a fresh offer (a lost message).
    reoffer_after: float = 300.0
    #: Seconds to connect to the state store before giving up with a clear error.
    connect_timeout: float = 5.0
    #: Seconds an offer may wait in a queue before it is copied up to the next tier: from a
    #: node's queue to its pool, from a pool to its parent pool (0 turns hoisting off).
    hoist_after: float = 0.1
    #: The pool tree: ``{pool: parent pool or None}``, e.g. ``{"desk": "region", "region": None}``.
    pools: dict = field(default_factory=dict)
    #: With a Redis broker, girder's workers take a message only when an executor is free
    #: (Celery's ``worker_disable_prefetch``, prefetch multiplier 1; not under gevent/eventlet).
    #: False leaves Celery's prefetch settings as the app has them.
    volunteer: bool = True
    #: Seconds a thread spins on the state store's socket for a reply before it sleeps; on VMs a
    #: sleeping thread's wake-up can cost more than the round trip. 0 turns it off; never done
    #: under gevent/eventlet.
    busy_poll: float = 0.0002
    #: Seconds the graph of a request (the sub-requests it made, ``girder.graph``) is kept
    #: after the request settles.
    graph_ttl: float = 86400.0

    @classmethod
    def from_conf(cls, conf: Any, url: str | None = None) -> Settings:
        values = {f.name: conf.get(f"girder_{f.name}", _default(f)) for f in fields(cls)}
        if url is not None:
            values["url"] = url
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if not self.url or not isinstance(self.url, str):
            raise ValueError(
                "girder needs a Redis URL for its state store: pass Girder(app, url='redis://...') "
                "or set app.conf.girder_url"
            )
        if not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"girder_url must be a redis://, rediss:// or unix:// URL, not {self.url!r}")
        if not isinstance(self.key_prefix, str) or not self.key_prefix:
            raise ValueError(f"girder_key_prefix must be a non-empty str, not {self.key_prefix!r}")
        if self.pool is not None and (not isinstance(self.pool, str) or not self.pool):
            raise ValueError(f"girder_pool must be a queue name or None, not {self.pool!r}")
        for name in ("lease_seconds", "error_ttl", "check_interval", "reoffer_after", "connect_timeout", "graph_ttl"):
            _positive(name, getattr(self, name))
        for name in ("request_timeout", "result_ttl"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        for name in ("hoist_after", "busy_poll"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"girder_{name} must be a number of seconds >= 0, not {value!r}")
        _validate_pools(self.pools)
        if not isinstance(self.volunteer, bool):
            raise ValueError(f"girder_volunteer must be True or False, not {self.volunteer!r}")

    # Cached: read on every request (the dataclass is frozen, so they never go stale).
    @cached_property
    def lease_ms(self) -> int:
        return ms(self.lease_seconds)

    @cached_property
    def edge_ttl_ms(self) -> int:
        """How long a waits-for edge outlives its last refresh: renewals and re-submissions
        refresh it, so it goes only when its requester has died."""
        return ms(2 * self.lease_seconds + self.check_interval)

    @cached_property
    def graph_ttl_ms(self) -> int:
        return ms(self.graph_ttl)

    @cached_property
    def reoffer_after_ms(self) -> int:
        return ms(self.reoffer_after)

    @cached_property
    def hoist_after_ms(self) -> int:
        return ms(self.hoist_after)

    def result_ttl_ms(self, cache_ttl: float | None) -> int:
        """How long a done value is kept (0: forever): a task's ``cache_ttl``, else ``result_ttl``."""
        return ms((cache_ttl if cache_ttl is not None else self.result_ttl) or 0)

    def error_ttl_ms(self, cache_ttl: float | None, cache_errors: bool) -> int:
        """How long a failure is kept: as long as a done value where errors are memoized."""
        return self.result_ttl_ms(cache_ttl) if cache_errors else ms(self.error_ttl)

    def pool_chain(self, pool: str) -> list[str]:
        """``pool`` and its ancestors, nearest first."""
        chain = [pool]
        while self.pools.get(chain[-1]):
            chain.append(self.pools[chain[-1]])
        return chain


def _validate_pools(pools: Any) -> None:
    if not isinstance(pools, dict):
        raise ValueError(f"girder_pools must be a dict {{pool: parent or None}}, not {pools!r}")
    for pool, parent in pools.items():
        if not isinstance(pool, str) or not pool or not (parent is None or (isinstance(parent, str) and parent)):
            raise ValueError(f"girder_pools maps queue names to a parent queue name or None, not {pool!r}: {parent!r}")
    for pool in pools:
        seen, cur = {pool}, pools.get(pool)
        while cur:
            if cur in seen:
                raise ValueError(f"girder_pools has a cycle through {cur!r}")
            seen.add(cur)
            cur = pools.get(cur)


def ms(seconds: float) -> int:
    """Seconds as the whole milliseconds Redis and the scripts count in."""
    return int(seconds * 1000)


def _default(f: Field) -> Any:
    return f.default_factory() if f.default is MISSING else f.default


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"girder_{name} must be a positive number of seconds, not {value!r}")
