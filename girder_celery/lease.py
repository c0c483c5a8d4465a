"""Lease renewal: a process keeps the leases of the requests its executors are running.

One daemon thread per process (a greenlet under gevent) renews every held lease each third of
the lease in a single script call, so a live executor never loses its claim and a dead process
(killed, OOM, power loss) leaves leases that expire and are reclaimed (invariant 1). The thread
starts on the first claim in a process, so prefork children each get their own after the fork,
and it survives Redis errors: it logs them and tries again at the next tick.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from .store import StateStore

__all__ = ["LeaseKeeper"]

logger = logging.getLogger(__name__)


class LeaseKeeper:
    """The leases held in this process, ``{key: owner}``, and the thread that renews them."""

    def __init__(self, store: StateStore, lease_ms: int, edge_ttl_ms: int) -> None:
        self.store = store
        self.lease_ms = lease_ms
        self.edge_ttl_ms = edge_ttl_ms
        self.interval = lease_ms / 3000
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
        # A forked child inherits the parent's table but not its thread: start afresh.
        self._pid = os.getpid()
        self._held = {}
        threading.Thread(target=self._run, name="girder-lease-keeper", daemon=True).start()

    def _run(self) -> None:
        pid = os.getpid()
        while self._pid == pid:
            time.sleep(self.interval)
            self.renew_once()

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
