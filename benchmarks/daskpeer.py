"""The peer to beat for re-entrant requests: the bogosity workload on Dask distributed.

``bogosity`` is the seed post's function written for Dask: a task requests its sub-requests with
``worker_client()`` (the worker thread secedes from the pool while it waits and rejoins, waiting
for a free slot, before it sleeps), submitted with ``pure=True`` so identical sub-requests made
by different tasks share one key and run once, as girder's do; ``wide_parent`` is the wide
fan-out suite's parent, submitting its ``n`` children the same way. ``DaskPeer`` runs it on a
``LocalCluster`` of worker processes on 127.0.0.1, the client submitting the top-level jobs.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from distributed import Client, LocalCluster, get_worker, worker_client

__all__ = ["DaskPeer", "bogosity", "wide_parent"]


def bogosity(msec: int, jobnum: int, reclevel: int, numrecjobs: int, args: Any) -> str:
    values: list[str] = []
    if reclevel > 0:
        with worker_client() as client:
            futures = [
                client.submit(bogosity, msec, k, reclevel - 1, numrecjobs, args, pure=True) for k in range(reclevel)
            ]
            values = client.gather(futures)
    time.sleep(msec / 1000)  # after rejoining: it holds one of the worker's thread slots
    node = get_worker().name
    return f"Bogosity:{node}:{jobnum}:{msec}:{reclevel}:{args}:[{','.join(values)}]"


def leaf(salt: str, i: int) -> int:
    return i


def wide_parent(n: int, salt: str) -> int:
    """The wide fan-out on Dask: one task submitting ``n`` trivial children from inside itself
    (``worker_client``: it secedes while it waits) and gathering them."""
    with worker_client() as client:
        futures = [client.submit(leaf, salt, i, pure=True) for i in range(n)]
        return sum(client.gather(futures))


class DaskPeer:
    """A ``LocalCluster(n_workers, threads_per_worker, processes=True)`` and its client."""

    def __init__(self, n_workers: int, threads_per_worker: int) -> None:
        self.cluster = LocalCluster(
            n_workers=n_workers,
            threads_per_worker=threads_per_worker,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            silence_logs=logging.ERROR,
        )
        self.client = Client(self.cluster)

    @property
    def version(self) -> str:
        import distributed

        return distributed.__version__

    def bogosity_jobs(self, msec: int, jobs: int, reclevel: int, numrecjobs: int, args: Any) -> list[str]:
        """Submit ``jobs`` top-level jobs at once and gather their values."""
        futures = [self.client.submit(bogosity, msec, j, reclevel, numrecjobs, args, pure=True) for j in range(jobs)]
        values = self.client.gather(futures)
        del futures
        return values

    def wide(self, n: int, salt: str) -> int:
        """One ``wide_parent(n, salt)`` submitted from the client; its value."""
        return self.client.submit(wide_parent, n, salt, pure=True).result()

    def close(self) -> None:
        """Stop the client and the cluster (again: a no-op)."""
        client, cluster, self.client, self.cluster = self.client, self.cluster, None, None
        try:
            if client is not None:
                client.close()
        finally:
            if cluster is not None:
                cluster.close()
