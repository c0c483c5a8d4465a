"""The state store behind Redis Sentinel: ``girder_url = "sentinel://..."`` and ``girder_sentinel_master``.

The client is redis-py's ``Sentinel(...).master_for(master)``: its connection pool asks the
sentinels for the master's address each time a connection connects, so every connection that
breaks in a failover reconnects to the new master. One breaks when its master dies, or when the
sentinel demotes it (it closes the clients of a server it turns into a replica), and a write that
a demoted master refuses (``READONLY``) is turned into a ``ConnectionError`` by redis-py's
``SentinelManagedConnection``, which drops that connection. So to girder (``link.py``, the
waiters, the runner) a failover is an outage of the store like any other: each call falls back
to the client's path and reconnects, a waiter rides it out for ``RECONNECT_WINDOW``, and nothing
is answered from a server that is not the master.

An unknown master name, sentinels that cannot be reached or refuse the login, and a master they
all see down raise ``MasterNotFoundError`` (a ``ConnectionError``, so a waiter rides out a
failover's few seconds without one) whose message says what each sentinel answered.
"""

from __future__ import annotations

from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, Sentinel

from .settings import Settings, sentinel_url

__all__ = ["master_client"]


def master_client(settings: Settings, **kwargs: Any) -> redis.Redis:
    """A client of the master that ``settings.sentinel_master`` names, found through the
    sentinels of ``settings.url``; ``kwargs`` are the connection arguments of the master's
    connections (``decode_responses``, timeouts)."""
    addresses, master = sentinel_url(settings.url)
    options = settings.sentinel_options
    # A sentinel that does not answer is passed over for the next at once (no retries of its
    # own): the sentinels are asked again as each new connection connects.
    own = {"socket_connect_timeout": settings.connect_timeout, "socket_timeout": settings.connect_timeout,
           "retry": Retry(NoBackoff(), 0)}  # fmt: skip
    tls = options.get("ssl", False)
    if tls:
        kwargs = {**kwargs, "ssl": True, **(tls if isinstance(tls, dict) else {})}
    sentinels = _Sentinel(
        addresses,
        min_other_sentinels=options.get("min_other_sentinels", 0),
        sentinel_kwargs={**own, **options.get("sentinel_kwargs", {})},
    )
    return sentinels.master_for(settings.sentinel_master, **master, **kwargs)


class _Sentinel(Sentinel):
    """redis-py's ``Sentinel``, saying why no sentinel named a master."""

    def discover_master(self, service_name: str) -> tuple[str, int]:
        try:
            return super().discover_master(service_name)
        except MasterNotFoundError:
            raise MasterNotFoundError(self._why(service_name)) from None

    def _why(self, name: str) -> str:
        answers = []
        for sentinel in self.sentinels:
            kwargs = sentinel.connection_pool.connection_kwargs
            where = f"{kwargs.get('host')}:{kwargs.get('port')}"
            try:
                masters = sentinel.sentinel_masters()
            except redis.AuthenticationError as exc:
                answers.append(
                    f"{where} refused the login ({exc}; the sentinels' own password goes in "
                    "girder_sentinel_options['sentinel_kwargs'])"
                )
                continue
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                answers.append(f"{where} cannot be reached ({exc})")
                continue
            state = masters.get(name)
            if state is None:
                known = ", ".join(repr(m) for m in sorted(masters)) or "none"
                answers.append(f"{where} watches no master named {name!r} (it watches {known})")
            else:
                answers.append(f"{where} sees {name!r} at {state['ip']}:{state['port']} as {state['flags']}")
        return f"no sentinel names a master {name!r} that is up (girder_sentinel_master): " + "; ".join(answers)
