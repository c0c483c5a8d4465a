"""Girder's settings: ``app.conf.girder_*``, read once, validated, with documented defaults.

Settings are in seconds, as Celery's are; the state store's scripts count milliseconds, and
the conversions are made here, once (``ms`` and the ``*_ms`` properties).
"""

from __future__ import annotations

from dataclasses import MISSING, Field, dataclass, field, fields
from functools import cached_property
from typing import Any
from urllib.parse import unquote, urlsplit

from .errors import safe_url

__all__ = ["CLUSTER_SCHEMES", "SENTINEL_OPTIONS", "Settings", "cluster_url", "ms", "sentinel_url"]

#: The schemes of a Redis Cluster's ``girder_url``: its seed nodes, in plain text or TLS.
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")

#: The keys ``girder_sentinel_options`` may have, and what each holds.
SENTINEL_OPTIONS = {
    "sentinel_kwargs": "the sentinels' own connections: a dict of redis-py arguments (password, username, ssl, ssl_*)",
    "ssl": "the master's TLS: True, or a dict of redis-py's ssl_* arguments (ssl_ca_certs, ssl_certfile, ...)",
    "min_other_sentinels": "an int: ignore a sentinel that sees fewer other sentinels than this",
}
#: The redis-py connection arguments ``sentinel_kwargs`` and ``ssl`` may give.
_SSL_KWARGS = (
    "ssl_ca_certs", "ssl_ca_path", "ssl_ca_data", "ssl_certfile", "ssl_keyfile", "ssl_password", "ssl_cert_reqs",
    "ssl_check_hostname", "ssl_min_version", "ssl_ciphers",
)  # fmt: skip
_SENTINEL_KWARGS = ("username", "password", "ssl", "socket_timeout", "socket_connect_timeout", *_SSL_KWARGS)


@dataclass(frozen=True)
class Settings:
    """The ``girder_`` settings of a Celery app (each field is ``app.conf.girder_<field>``)."""

    #: Redis URL of the state store; ``Girder(app, url=...)`` takes precedence. Or its
    #: sentinels: ``sentinel://[user:password@]host:port[/db][;sentinel://host:port...]``, the
    #: master's user, password and database in the first (Celery's convention). Or a Redis
    #: Cluster's seed nodes: ``redis+cluster://[user:password@]host:port[,host:port...]``
    #: (``rediss+cluster://`` for TLS, with redis-py's ``ssl_*`` URL parameters).
    url: str | None = None
    #: With a ``sentinel://`` URL, the name of the master the sentinels watch (their
    #: ``sentinel monitor NAME ...``); required there, refused with any other URL.
    sentinel_master: str | None = None
    #: With a ``sentinel://`` URL: ``SENTINEL_OPTIONS`` (the sentinels' password, TLS).
    sentinel_options: dict = field(default_factory=dict)
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
    #: after its top-level request settles (kept whole while that runs, if this is longer than a
    #: lease).
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
        if self.url.startswith("sentinel://"):
            self._validate_sentinel()
        elif not self.url.startswith(("redis://", "rediss://", "unix://", *(f"{s}://" for s in CLUSTER_SCHEMES))):
            raise ValueError(
                "girder_url must be a redis://, rediss://, unix://, sentinel:// or redis+cluster:// URL, not "
                f"{safe_url(self.url)!r}"
            )
        elif self.sentinel_master is not None or self.sentinel_options:
            name = "girder_sentinel_master" if self.sentinel_master is not None else "girder_sentinel_options"
            raise ValueError(
                f"{name} is set, but girder_url {safe_url(self.url)!r} is not a sentinel:// URL: name the "
                "sentinels (girder_url = 'sentinel://host:26379;sentinel://host2:26379'), or unset it"
            )
        if self.cluster:
            cluster_url(self.url)
        if not isinstance(self.key_prefix, str) or not self.key_prefix or set(self.key_prefix) & set("{}"):
            raise ValueError(
                f"girder_key_prefix must be a non-empty str without braces (hash tags), not {self.key_prefix!r}"
            )
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

    def _validate_sentinel(self) -> None:
        if not isinstance(self.sentinel_master, str) or not self.sentinel_master:
            raise ValueError(
                f"girder_url {safe_url(self.url)!r} names sentinels: set girder_sentinel_master to the name of "
                f"the master they watch (their 'sentinel monitor NAME ...'), not {self.sentinel_master!r}"
            )
        sentinel_url(self.url)
        options = self.sentinel_options
        if not isinstance(options, dict) or set(options) - set(SENTINEL_OPTIONS):
            raise ValueError(
                f"girder_sentinel_options must be a dict with keys among {sorted(SENTINEL_OPTIONS)}, not "
                f"{_masked_options(options)!r}; " + "; ".join(f"{k}: {v}" for k, v in SENTINEL_OPTIONS.items())
            )
        _kwargs("sentinel_kwargs", options.get("sentinel_kwargs", {}), _SENTINEL_KWARGS)
        tls = options.get("ssl", False)
        if not isinstance(tls, bool):
            _kwargs("ssl", tls, _SSL_KWARGS)
        least = options.get("min_other_sentinels", 0)
        if isinstance(least, bool) or not isinstance(least, int) or least < 0:
            raise ValueError(f"girder_sentinel_options['min_other_sentinels'] must be an int >= 0, not {least!r}")

    @property
    def cluster(self) -> bool:
        """Whether ``url`` names a Redis Cluster's seed nodes."""
        return self.url.split("://", 1)[0] in CLUSTER_SCHEMES

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


def sentinel_url(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """The sentinels a ``sentinel://`` URL names, ``[(host, port)]``, and the master's connection
    arguments it gives (``username``, ``password``, ``db``: in the first sentinel's part, and
    any other part that repeats them must agree). ``ValueError`` names a part that is wrong."""
    sentinels, master = [], None
    for part in url.split(";"):
        parts = urlsplit(part)
        try:
            port = parts.port or 26379
        except ValueError:
            port = None
        if parts.scheme != "sentinel" or not parts.hostname or port is None or parts.query:
            raise ValueError(
                f"girder_url: {safe_url(part)!r} is not sentinel://[user:password@]host:port[/db]; separate "
                "sentinels with ';' (sentinel://h1:26379;sentinel://h2:26379)"
            )
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ValueError(f"girder_url: the database of {safe_url(part)!r} must be a number, not {path!r}")
        given = {"username": unquote(parts.username or "") or None, "password": unquote(parts.password or "") or None}
        given["db"] = int(path) if path else None
        if master is None:
            master = given
        elif any(v is not None and v != master[k] for k, v in given.items()):
            raise ValueError(
                f"girder_url: {safe_url(part)!r} gives the master another user, password or database than the "
                "first sentinel's part; give them once, in the first"
            )
        sentinels.append((parts.hostname, port))
    return sentinels, {**master, "db": master["db"] or 0}


def cluster_url(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """The seed nodes a ``redis+cluster://`` (or ``rediss+cluster://``) URL names, ``[(host,
    port)]``, and the connection arguments it gives every node (``username``, ``password``,
    ``ssl`` and the ``ssl_*`` URL parameters). ``ValueError`` names what is wrong."""
    scheme, _, rest = url.partition("://")
    form = f"{scheme}://[user:password@]host:port[,host:port...]"
    netloc, _, query = rest.partition("?")
    netloc, _, path = netloc.partition("/")
    if path.strip("/") not in ("", "0"):
        raise ValueError(f"girder_url {safe_url(url)!r}: a Redis Cluster has database 0 only, not {path!r}")
    auth, _, hosts = netloc.rpartition("@")
    seeds = []
    for part in hosts.split(","):
        host, _, port = part.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"girder_url {safe_url(url)!r}: {part!r} is not host:port; the seeds go as {form}")
        seeds.append((host.strip("[]"), int(port)))
    user, _, password = auth.partition(":")
    options: dict[str, Any] = {"username": unquote(user) or None, "password": unquote(password) or None}
    if scheme == "rediss+cluster":
        options["ssl"] = True
    for pair in filter(None, query.split("&")):
        name, _, value = pair.partition("=")
        if name not in _SSL_KWARGS or scheme != "rediss+cluster":
            raise ValueError(
                f"girder_url {safe_url(url)!r}: unknown parameter {name!r}; a rediss+cluster:// URL takes "
                f"{', '.join(_SSL_KWARGS)}"
            )
        options[name] = unquote(value) if name != "ssl_check_hostname" else value.lower() in ("1", "true", "yes")
    return seeds, options


def _kwargs(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, dict) or set(value) - set(allowed):
        raise ValueError(
            f"girder_sentinel_options[{name!r}] must be a dict with keys among {sorted(allowed)}, not "
            f"{_masked_options(value)!r}"
        )


def _masked_options(value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    return {k: "***" if "password" in str(k) else _masked_options(v) for k, v in value.items()}


def ms(seconds: float) -> int:
    """Seconds as the whole milliseconds Redis and the scripts count in."""
    return int(seconds * 1000)


def _default(f: Field) -> Any:
    return f.default_factory() if f.default is MISSING else f.default


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"girder_{name} must be a positive number of seconds, not {value!r}")
