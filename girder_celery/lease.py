"""Lease renewal: a process keeps the leases of the requests its executors are running.

One daemon thread per process (a greenlet under gevent) renews every held lease each third of
the lease in a single script call, so a live executor never loses its claim and a dead process
(killed, OOM, power loss) leaves leases that expire and are reclaimed (invariant 1). A second one
keeps, at the same pace, the graphs of the top-level requests among them whole
(``graph.GraphKeeper``), and those of the top-level requests that settled here as they settle,
on a thread of its own, so that walking a large graph never delays a renewal nor an executor's
next message. Both start on the first claim in a process, so prefork children each get their own
after the fork, and both survive Redis errors: they log them and try again at the next tick.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections.abc import Callable

from .graph import GraphKeeper
from .store import StateStore

__all__ = ["LeaseKeeper"]

logger = logging.getLogger(__name__)

#: Seconds a process's exit may spend keeping the graphs of the requests that settled just before.
EXIT_WALK_SECONDS = 5.0


class LeaseKeeper:
    """The leases held in this process, ``{key: owner}``, and the thread that renews them."""

    def __init__(self, store: StateStore, lease_ms: int, edge_ttl_ms: int) -> None:
        self.store = store
        self.lease_ms = lease_ms
        self.edge_ttl_ms = edge_ttl_ms
        self.interval = lease_ms / 3000
        self.graphs = GraphKeeper(store)
        self._held: dict[str, str] = {}
        self._lock = threading.Lock()
        self._pid: int | None = None

    def hold(self, key: str, owner: str) -> None:
        with self._lock:
            if self._pid != os.getpid():
                self._start()
            self._held[key] = owner

    def release(self, key: str) -> None:
        with self._lock:
            self._held.pop(key, None)

    def held(self) -> dict[str, str]:
        with self._lock:
            return dict(self._held)

    def _start(self) -> None:
        # A forked child inherits the parent's table but not its threads: start afresh.
        self._pid = os.getpid()
        self._held = {}
        threading.Thread(target=self._run, args=(self.renew_once,), name="girder-lease-keeper", daemon=True).start()
        threading.Thread(target=self._keep_graphs, name="girder-graph-keeper", daemon=True).start()
        # A daemon thread dies with its process: what settled just before exit is walked then
        # (a prefork child skips Python's exit handlers: its worker_process_shutdown does it).
        atexit.register(self.finish_walks)

    def finish_walks(self) -> None:
        """This process exits: keep the graphs of the requests that settled here and are not
        walked yet, for at most ``EXIT_WALK_SECONDS``."""
        if self._pid == os.getpid():
            self.graphs.walk_settled(time.monotonic() + EXIT_WALK_SECONDS)

    def _run(self, tick: Callable[[], None]) -> None:
        pid = os.getpid()
        while self._pid == pid:
            time.sleep(self.interval)
            tick()

    def _keep_graphs(self) -> None:
        pid, due = os.getpid(), time.monotonic() + self.interval
        while self._pid == pid:
            self.graphs.wake.wait(max(0.0, due - time.monotonic()))
            self.graphs.wake.clear()
            try:
                self.graphs.walk_settled()
            except Exception:
                logger.warning("girder: could not keep the graphs of the requests settled here", exc_info=True)
            if time.monotonic() >= due:
                self.keep_graphs_once()
                due = time.monotonic() + self.interval

    def renew_once(self) -> None:
        """Renew every held lease now; a Redis error is logged and retried at the next tick."""
        leases = self.held()
        if not leases:
            return
        try:
            renewed = self.store.renew(leases, self.lease_ms, self.edge_ttl_ms)
        except Exception:
            logger.warning("girder: could not renew %d lease(s); will retry", len(leases), exc_info=True)
            return
        for key, ours in renewed.items():
            if not ours:
                logger.warning(
                    "girder: lost the lease on %s (it expired and was reclaimed, or settled); "
                    "the result of this run is still stored if it is first",
                    key,
                )

    def keep_graphs_once(self) -> None:
        """Keep the graphs due of the top-level requests held here; an error is logged and the
        next tick tries again."""
        try:
            self.graphs.running(self.held())
        except Exception:
            logger.warning("girder: could not keep the graphs of the requests running here; will retry", exc_info=True)
