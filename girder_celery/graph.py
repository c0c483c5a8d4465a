"""The emergent graph of a request, read back from the state store, and its progress.

Nobody draws the graph: it is the call stack. Each submit made by a running request records the
edge requester -> sub-request in the requester's ``<prefix>:graph:<key>`` hash, marked ``c``
when the store answered it at once with a memoized outcome, ``r`` otherwise (``lua/submit.lua``),
in the script call the submit makes anyway. The hash is kept ``girder_graph_ttl`` after its
request settles (``lua/complete.lua``, ``lua/fail.lua``).

``read_graph`` walks those hashes from a root, level by level: per level one pipelined round trip
for the hashes and one for the records of the requests they name. A request the root's graph
reached only through ``c`` edges is ``cached``: answered from the store without running for this
root; its own sub-requests ran for another root and are not walked (its graph is its own,
``girder.graph`` of its key). A request reached by one ``r`` edge at least ran, or was joined in
flight, for this root, and its sub-requests are walked too.

A sub-request settles long before its root may, so each hash reachable from a root must outlive
its own request's settle: ``keep_graph`` extends every hash that ``read_graph`` would walk from a
*top-level* request (one no request asked for: its record's ``parent`` is empty) to
``girder_graph_ttl`` from now, as it settles (``execute.py``; ``inline.py`` for a message's
answer; both walked on the graph keeper's thread, off the executor's path; ``cancel.py``) and,
while it runs, every third of ``girder_graph_ttl`` (``GraphKeeper``, at the lease keeper's
ticks). So its whole graph is kept at least ``girder_graph_ttl`` after it
settles. Any other request a user asks for as a root is covered with it: a sub-request's
``r``-descendants are among those of the top-level request whose walk reached it, which settles
after it unless it stopped waiting for it (failed, timed out, cancelled). The walk is per
top-level request, not per settle (which would cost a tree's depth times its size): each
top-level settle reads its own graph once.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Iterable
from typing import Any

import redis

from .errors import GirderNoGraph
from .store import StateStore, int_field

__all__ = ["KEEP_BATCH", "MAX_NODES", "GraphKeeper", "keep_graph", "progress_of", "read_graph"]

logger = logging.getLogger(__name__)

#: The most requests one graph is read with; a larger one is refused rather than read in full
#: (and ``keep_graph`` keeps no more of it).
MAX_NODES = 1_000_000
#: The graphs ``keep_graph`` extends and reads per pipelined round trip.
KEEP_BATCH = 1000
#: The fields of a request record a graph's node shows.
_FIELDS = ("state", "request", "name", "node", "placement", "attempts", "started_at", "finished_at", "subs")
_IN_FLIGHT = ("queued", "running")
#: The states ``progress_of`` counts (``cached`` and ``known`` besides).
PROGRESS_STATES = ("done", "running", "queued", "failed")


def read_graph(store: StateStore, key: str, require_edges: bool = True) -> dict[str, Any]:
    """The graph of request ``key``: ``root``, ``nodes`` (the root first, then in the order they
    were found) and ``edges`` (``[parent, child]``, one per distinct pair).

    Raises ``GirderNoGraph`` when the store knows no request ``key``, when its graph has expired,
    and, with ``require_edges``, when it settled without making a sub-request (one still queued or
    running has a graph of itself alone so far).
    """
    with store.reachable():
        records = {key: _records(store, [key])[0]}
        edges: dict[tuple[str, str], str] = {}
        ran, walked, frontier = {key}, set(), [key]
        while frontier:
            found = _graphs(store, frontier)
            if not walked:
                _check_root(store, key, records[key], bool(found[0]), require_edges)
            walked.update(frontier)
            fresh: list[str] = []
            for parent, children in zip(frontier, found):
                for child, how in children.items():
                    edges[(parent, child)] = how
                    if child not in records:
                        records[child] = {}
                        fresh.append(child)
                    if how != "c":
                        ran.add(child)
            if len(records) > MAX_NODES:
                raise GirderNoGraph(f"the graph of {key} has more than {MAX_NODES} requests: not read", key=key)
            for child, record in zip(fresh, _records(store, fresh)):
                records[child] = record
            frontier = [k for k in records if k in ran and k not in walked]
    nodes = [_node(k, record, k not in ran) for k, record in records.items()]
    return {"root": key, "nodes": nodes, "edges": [[parent, child] for parent, child in edges]}


def keep_graph(store: StateStore, key: str) -> bool | None:
    """If ``key`` is a top-level request, keep every graph its graph reaches ``girder_graph_ttl``
    from now (``_keep_levels``). True if it is one, False if it is a sub-request (or unknown);
    None, logged, if Redis failed it (not the caller's business: what it settled is stored)."""
    try:
        if store.client.hget(store.record_key(key), "parent") != "":
            return False
        found = _keep_levels(store, key)
    except redis.RedisError:
        logger.warning("girder: could not keep the graph of %s whole; it may expire early", key, exc_info=True)
        return None
    if found > MAX_NODES:
        logger.warning("girder: the graph of %s has more than %d requests: only part of it is kept", key, MAX_NODES)
    return True


def _keep_levels(store: StateStore, key: str) -> int:
    """Keep the graphs ``read_graph`` walks from ``key`` (through ``r`` edges), level by level,
    ``KEEP_BATCH`` per round trip, each once; past ``MAX_NODES`` requests found, no further
    level. How many it found."""
    seen, level = {key}, [key]
    while level and len(seen) <= MAX_NODES:
        below: list[str] = []
        for start in range(0, len(level), KEEP_BATCH):
            for children in store.keep_graphs(level[start : start + KEEP_BATCH]):
                fresh = [child for child, how in children.items() if how != "c" and child not in seen]
                seen.update(fresh)
                below += fresh
        level = below
    return len(seen)


class GraphKeeper:
    """Keeps the graphs of the top-level requests running in this process, every third of
    ``girder_graph_ttl``: handed the keys running here at each of the lease keeper's ticks (a
    third of a lease), so each is kept at most ``girder_graph_ttl`` / 3 plus two ticks apart,
    within ``girder_graph_ttl`` as long as that is more than a lease. And those that settled
    here (``settled``), walked at once on the keeper's thread: a walk costs a round trip per
    level of the graph, which the executor would otherwise pay before its next message (every
    node at once, where many requests waited on one sub-request)."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self.period = store.graph_ttl_ms / 3000
        #: Each key running here, and when (monotonic) its graph is kept next: infinity for a
        #: sub-request's, which its top-level request keeps.
        self._due: dict[str, float] = {}
        #: Requests that settled here with sub-requests of their own, to be walked; set wakes
        #: the keeper's thread for them.
        self._settled: collections.deque[str] = collections.deque()
        self.wake = threading.Event()

    def settled(self, key: str) -> None:
        """Request ``key``, which requested sub-requests, settled here: keep its whole graph if
        it is a top-level request, soon, on the keeper's thread."""
        self._settled.append(key)
        self.wake.set()

    def walk_settled(self, deadline: float = math.inf) -> None:
        """Keep the graphs of the requests settled here so far (the keeper's thread, or at exit
        until ``deadline``, monotonic); a Redis error is logged by ``keep_graph``, and that
        graph may expire early."""
        while self._settled and time.monotonic() < deadline:
            keep_graph(self.store, self._settled.popleft())

    def running(self, keys: Iterable[str]) -> None:
        """At a tick: ``keys`` run here now; keep the graphs due (the keeper's thread only)."""
        now = time.monotonic()
        self._due = {key: self._due.get(key, now + self.period) for key in keys}
        for key, due in self._due.items():
            if due <= now:
                top_level = keep_graph(self.store, key)
                if top_level is not None:  # else tried again at the next tick
                    self._due[key] = now + self.period if top_level else math.inf


def progress_of(graph: dict[str, Any]) -> dict[str, int]:
    """Counts of a graph's requests, the root included: ``done``, ``running``, ``queued`` and
    ``failed`` (of those that ran, or run, for this root), ``cached`` (answered from the store),
    and ``known``, all of them."""
    counts = dict.fromkeys((*PROGRESS_STATES, "cached"), 0)
    for node in graph["nodes"]:
        if node["cached"]:
            counts["cached"] += 1
        elif node["state"] in counts:
            counts[node["state"]] += 1
    counts["known"] = len(graph["nodes"])
    return counts


def _check_root(store: StateStore, key: str, record: dict[str, str], has_edges: bool, require_edges: bool) -> None:
    if has_edges:
        return
    if not record:
        raise GirderNoGraph(f"the state store knows no request {key}", key=key)
    state, readable = record.get("state"), record.get("request") or key
    if state in _IN_FLIGHT:
        return  # it has made none yet: a graph of itself so far
    if int_field(record.get("subs")):
        seconds = store.graph_ttl_ms / 1000
        raise GirderNoGraph(
            f"the graph of {readable} has expired: a graph is kept girder_graph_ttl ({seconds:g} s) after its "
            "top-level request settles",
            key=key,
        )
    if require_edges:
        raise GirderNoGraph(f"{readable} made no sub-requests: it has no graph ({state})", key=key)


def _graphs(store: StateStore, keys: list[str]) -> list[dict[str, str]]:
    pipe = store.client.pipeline(transaction=False)
    for key in keys:
        pipe.hgetall(store.graph_key(key))
    return [found if isinstance(found, dict) else {} for found in pipe.execute(raise_on_error=False)]


def _records(store: StateStore, keys: list[str]) -> list[dict[str, str]]:
    pipe = store.client.pipeline(transaction=False)
    for key in keys:
        pipe.hmget(store.record_key(key), _FIELDS)
    out = []
    for values in pipe.execute(raise_on_error=False):
        if isinstance(values, redis.ResponseError):  # not a hash: a corrupt record
            out.append({"state": "corrupt"})
        else:
            out.append({name: value for name, value in zip(_FIELDS, values) if value is not None})
    return out


def _node(key: str, record: dict[str, str], cached: bool) -> dict[str, Any]:
    return {
        "key": key,
        "request": record.get("request"),
        "task": record.get("name"),
        "state": record.get("state", "absent"),
        "node": record.get("node") or None,
        "placement": record.get("placement") or None,
        "attempts": int_field(record.get("attempts")) or 0,
        "cached": cached,
        "started_at": int_field(record.get("started_at")),
        "finished_at": int_field(record.get("finished_at")),
    }
