"""The waits-for graph on a Redis Cluster: a requester's edges written first, then walked from
the client, so that a request cycle fails fast there too (invariant 5).

On a single Redis submit.lua writes the edge requester -> request and walks the graph in the
same atomic step. On a cluster the edges of different requests are in different slots, so a
submit made by a running request goes in three steps:

1. ``write_edges``: edge.lua, in the requester's slot, adds the edge requester -> each request
   (or answers that the requester's run was cancelled, and nothing is requested);
2. each request's own submit.lua, in its slot, which answers its state;
3. ``refuse_cycles``: from each request answered ``running`` (held by a live executor), a walk
   along the edges, read from the client a level at a time; one that reaches the requester
   closes a cycle, and the submit is answered ``cycle`` (its edge and waiter withdrawn).

Why every cycle is still refused. Take a cycle r1 -> r2 -> ... -> rk -> r1: each edge ri -> ri+1
is written by ri's run, in step 1 of its submit of ri+1, and stays while ri waits (renewed with
its lease; nobody in a cycle can settle, so all wait). Let rj -> rj+1 be the edge written last.
Its writer reads rj+1's state in step 2, after that write: rj+1 has written its own edge
before, so it was claimed and runs, and is answered ``running``; rj's walk in step 3 starts
from it, after every other edge of the cycle was written, and finds them all, back to rj. So
at least one participant of any cycle is refused (maybe more, which is as safe). A request not
running when step 2 reads it has no live edges out of it: if a run of it writes them later,
that run's own submits come after this edge, and the same argument applies to whoever writes
last. The walk reads without locks, so it may also meet edges of a request that settles as it
reads: a cycle it reports has every edge present when read, as the single Redis's walk does.
"""

from __future__ import annotations

from typing import Any

from redis.commands.core import Script

from .layout import Layout
from .slots import Slots
from .verdicts import Outcome, Verdict

__all__ = ["MAX_WALK", "graph_effects", "refuse_cycles", "write_edges"]

#: Most requests one walk reads (as submit.lua's own walk).
MAX_WALK = 10_000


def write_edges(
    slots: Slots, script: Script, layout: Layout, requester: str, keys: list[str], owner: str, ttl_ms: int
) -> bool:
    """Step 1: the edges ``requester -> keys``; False if the requester's run (``owner``) was
    cancelled, and nothing was written."""
    record, edges = layout.record_key(requester), layout.edges_key(requester)
    return slots.link_for(record).call(script, (record, edges), (owner, ttl_ms, *keys)) == "ok"


def refuse_cycles(
    client: Any, layout: Layout, requester: str, outcomes: list[Outcome], mailbox: str
) -> tuple[list[Outcome], list[tuple]]:
    """Step 3: ``outcomes`` with each request that waits, transitively, for ``requester``
    answered ``cycle`` (its data: the cycle's keys, requester first and last, as submit.lua
    answers); and the commands that withdraw such a request's edge and waiter."""
    starts = [o.key for o in outcomes if o.verdict is Verdict.RUNNING]
    edges = _edges_from(client, layout, starts, requester) if starts else {}
    answered, withdraw = [], []
    for outcome in outcomes:
        path = _path(edges, outcome.key, requester) if outcome.verdict is Verdict.RUNNING else None
        if path is None:
            answered.append(outcome)
            continue
        answered.append(Outcome(outcome.key, Verdict.CYCLE, " ".join([requester, *path])))
        withdraw.append(("SREM", layout.edges_key(requester), outcome.key))
        if mailbox:
            withdraw.append(("SREM", layout.waiters_key(outcome.key), mailbox))
    return answered, withdraw


def _edges_from(client: Any, layout: Layout, starts: list[str], requester: str) -> dict[str, list[str]]:
    """The waits-for edges out of every request reachable from ``starts`` (``MAX_WALK`` at
    most), read breadth first, one pipelined read per level for all of them; the requester's own
    are not read (a path ends there)."""
    edges: dict[str, list[str]] = {}
    frontier = list(dict.fromkeys(starts))
    while frontier and len(edges) < MAX_WALK:
        pipe = client.pipeline(transaction=False)
        for node in frontier:
            pipe.smembers(layout.edges_key(node))
        reading, frontier = frontier, []
        for node, found in zip(reading, pipe.execute()):
            edges[node] = sorted(found)
            frontier += [k for k in edges[node] if k not in edges and k != requester and k not in frontier]
    return edges


def _path(edges: dict[str, list[str]], start: str, requester: str) -> list[str] | None:
    """The path from ``start`` to ``requester`` along ``edges`` (breadth first: a shortest one),
    or None if there is none."""
    came_from: dict[str, str | None] = {start: None}
    frontier = [start]
    while frontier and requester not in came_from:
        reached = []
        for node in frontier:
            for key in edges.get(node, ()):
                if key not in came_from:
                    came_from[key] = node
                    reached.append(key)
        frontier = reached
    if requester not in came_from:
        return None
    path, node = [], requester
    while node is not None:
        path.insert(0, node)
        node = came_from[node]
    return path


def graph_effects(layout: Layout, requester: str, outcomes: list[Outcome]) -> list[tuple]:
    """What the requester's keys get once its requests answered, as submit.lua writes them on a
    single Redis: each request in its graph, ``c`` if answered from the store, else ``r`` (a
    refused cycle not at all); and no waits-for edge to a request that is settled, corrupt or
    refused (step 1 wrote one to each)."""
    graph, edges, effects = layout.graph_key(requester), layout.edges_key(requester), []
    for outcome in outcomes:
        if outcome.verdict is not Verdict.CYCLE and outcome.verdict is not Verdict.CORRUPT:
            effects.append(("HSETNX", graph, outcome.key, "c" if outcome.settled else "r"))
        if outcome.settled or outcome.verdict is Verdict.CORRUPT:
            effects.append(("SREM", edges, outcome.key))
    return effects
