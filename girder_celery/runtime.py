"""The runtime: girder's parts for one Celery app, built on first use and wired together.

It holds the settings, the state store client (of a Redis URL, of the master that Sentinel
names: ``sentinel.py``, or of a Redis Cluster: ``cluster.py``), offers, the result-backend
mirror and this process's runner, each handed only the collaborators it uses, and decides how a
caller waits: outside any girder request a plain wait, inside one an inline wait (invariant 2),
and with Celery's ``task_always_eager`` an eager run in this process (``eager.py``). The Celery
integration (task class, bootsteps) and the public ``Girder`` sit above it.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import redis
from celery import Celery

from .cluster import cluster_client
from .eager import Eager
from .execute import Runner
from .frame import Frame, current_frame
from .inline import InlineWait
from .keys import Request
from .mirror import Mirror
from .offers import Offers
from .sentinel import master_client
from .settings import Settings
from .store import StateStore
from .wait import Wait

__all__ = ["Runtime"]


class Runtime:
    """Girder's parts for ``app``; ``url`` (the state store) overrides ``girder_url``."""

    def __init__(self, app: Celery, url: str | None = None) -> None:
        self.app = app
        self._url = url
        #: The pool this process's node belongs to; set by the worker bootstep.
        self.node_pool: str | None = None
        self._eager_spellings: tuple[Any, str | None, tuple[str, ...]] | None = None

    @cached_property
    def settings(self) -> Settings:
        """The app's ``girder_*`` settings, read on first use (after the app is configured)."""
        return Settings.from_conf(self.app.conf, self._url)

    @cached_property
    def store(self) -> StateStore:
        s = self.settings
        kwargs = {"decode_responses": True, "socket_connect_timeout": s.connect_timeout, "socket_timeout": 30.0}
        if s.sentinel_master:
            client = master_client(s, **kwargs)
        elif s.cluster:
            client = cluster_client(s, **kwargs)
        else:
            client = redis.Redis.from_url(s.url, **kwargs)
        return StateStore(client, s.key_prefix, s.busy_poll, s.url, s.graph_ttl_ms)

    @cached_property
    def offers(self) -> Offers:
        return Offers(self.app, self.settings, self.store)

    @cached_property
    def mirror(self) -> Mirror:
        return Mirror()

    @cached_property
    def runner(self) -> Runner:
        return Runner(self.store, self.offers, self.mirror, self.settings)

    def eager_mode(self) -> bool:
        """``app.conf.task_always_eager``, now (tests switch it). Celery's own lookup costs about
        3 µs, some 4% of a cache hit, mostly in building the setting's spellings (its old name,
        the namespace's) and raising ``KeyError`` in each source that lacks them: here the
        spellings are built once per configuration and each source is asked with ``in``, in
        Celery's order, so the answer is Celery's, live sources (a Django settings object) too."""
        conf = self.app.conf
        sources, spellings = getattr(conf, "maps", None), self._eager_spellings
        if sources is None or not hasattr(conf, "_to_keys"):  # a Celery without these internals
            return conf.task_always_eager
        # Loading the configuration (config_from_object, a namespace) rebuilds it in place.
        if spellings is None or spellings[0] is not sources or spellings[1] != conf.prefix:
            names = tuple(dict.fromkeys(conf._to_keys("task_always_eager")))  # once each, in Celery's order
            spellings = self._eager_spellings = (sources, conf.prefix, names)
        for source in sources:
            for name in spellings[2]:
                if name in source:
                    return source[name]
        return conf.task_always_eager  # not found: Celery's own answer (and error)

    @cached_property
    def eager(self) -> Eager:
        """The in-process memo and runner of eager mode (``task_always_eager``)."""
        return Eager(lambda: self.settings)

    def wait(self, requests: list[Request], timeout: float | None = None, return_exceptions: bool = False) -> list[Any]:
        """Submit prepared requests and wait for their values, in order (``task.call`` and
        ``girder.requests``); inside a girder request, run its queued ones inline."""
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
            raise ValueError(f"timeout must be a positive number of seconds or None, not {timeout!r}")
        if not requests:
            return []
        if self.eager_mode():  # checked per call: tests toggle it
            return self.eager.wait(requests, return_exceptions)
        frame = current_frame()
        if frame is None:
            return Wait(self.offers, requests, timeout).run(return_exceptions)
        return InlineWait(self.runner, requests, timeout, frame).run(return_exceptions)

    def answer(self, request: Request, context: Any) -> Any:
        """The value of ``request`` for a Celery task that is not that request: an alias's
        message (``execute.Answer``) or Celery's ``map``/``starmap`` calling the task item by item.
        It is waited for like a sub-request of ``context``'s task, run here if it can be claimed
        (so it never waits on unclaimed work, invariant 2), but with no waits-for edges: no
        request waits for an alias. A failure raises its ``GirderError``."""
        if self.eager_mode():
            return self.eager.wait([request], False)[0]
        frame = Frame(context.id, context.hostname or "unknown", context.root_id or context.id, "")
        try:
            return InlineWait(self.runner, [request], None, frame, requester="").run()[0]
        finally:
            self.runner.after_message()
