"""The waits-for graph on a Redis Cluster: a requester's edges written first, then walked from
the client, so that a request cycle fails fast there too (invariant 5).

On a single Redis submit.lua writes the edge requester -> request and walks the graph in the
same atomic step. On a cluster the edges of different requests are in different slots, so a
submit made by a running request goes in three steps:

1. ``write_edges``: edge.lua, in the requester's slot, adds the edge requester -> each request,
   and each to the requester's graph (or answers that the requester's run was cancelled, and
   nothing is requested);
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

A submit of one request (a running request asking for the next sub-request it needs, the
common case) sends step 1 without awaiting it, beside step 2, so that the two round trips
overlap (``send_edges``): the submit then costs one round trip, as on a single Redis. Both
replies are read before anything else is done, so the edge is written before the sub-request
can run inline and before step 3's walk, but step 2 may read the sub-request's state before the
edge is written. The argument above still holds for whatever step 2 answers then: ``claimed``
by the requester means the sub-request's own edges come from a run that starts after both
replies, so later than this edge; ``running`` is walked in step 3, after the edge; a settled
request is in no cycle. Only ``queued`` (or ``offer``) could hide a cycle: another executor may
claim the sub-request, and write its edges, between step 2's read and this edge's write. So a
sub-request answered that way has its state read again once the edge is known to be written
(``running_now``), and is walked if it runs: still queued then, any run of it comes later than
the edge. A requester's cancelled run (edge.lua answers so, and writes nothing) gives back
what step 2 did: the claim, the waiter, the offer (``give_back``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import redis
from redis.commands.core import Script

from .layout import Layout
from .slots import Slots
from .verdicts import Outcome, Verdict

__all__ = ["MAX_WALK", "give_back", "graph_effects", "refuse_cycles", "running_now", "send_edges", "write_edges"]

#: Most requests one walk reads (as submit.lua's own walk).
MAX_WALK = 10_000


def write_edges(
    slots: Slots, script: Script, layout: Layout, requester: str, keys: list[str], owner: str, ttl_ms: int
) -> str | None:
    """Step 1: the edges ``requester -> keys``, and each key in the requester's graph: which keys
    are new there ("1" or "0" for each, for ``graph_effects``), or None if the requester's run
    (``owner``) was cancelled, and nothing was written."""
    return _written(slots.link_for(layout.record_key(requester)).call(script, *_edge_call(layout, requester, keys,
                                                                                          owner, ttl_ms)))  # fmt: skip


def _edge_call(layout: Layout, requester: str, keys: list[str], owner: str, ttl_ms: int) -> tuple[tuple, tuple]:
    own = layout.record_key(requester), layout.edges_key(requester), layout.graph_key(requester)
    return own, (owner, ttl_ms, *keys)


def _written(reply: Any) -> str | None:
    return reply[1] if isinstance(reply, list) and reply[0] == "ok" else None


def send_edges(
    slots: Slots,
    script: Script,
    layout: Layout,
    requester: str,
    keys: list[str],
    owner: str,
    ttl_ms: int,
    on_reply: Callable[[str | None], Any],
) -> None:
    """Step 1, unawaited: ``on_reply`` gets what ``write_edges`` returns once its reply is read,
    by the thread's next call (step 2's, ``Slots.call_many``) at the latest."""
    keys_, args = _edge_call(layout, requester, keys, owner, ttl_ms)
    slots.send(script, keys_, args, lambda reply: on_reply(_written(reply)))


def give_back(
    store: Any, items: list[tuple], replies: list[Any], mailbox: str, claimant: Any, unreachable: bool
) -> list[Outcome]:
    """A submit of one request whose edges were not written beside it (``send_edges``): the
    requester's run was cancelled, or the edges' master was unreachable (raised, as the edges'
    own call would be). What the transition did is given back, through ``store`` (the
    ``StateStore``): a claim, an offer not yet sent (so the next submit of it offers it at
    once), the waiter; and each is answered ``cancelled``."""
    for (key, _, _, _, pool), (verdict, *_) in zip(items, replies):
        if verdict == Verdict.CLAIMED:
            store.release(key, claimant.owner, offered=False)
        elif verdict == Verdict.OFFER:
            store.unoffer(key, pool)
        if mailbox and verdict not in (Verdict.DONE, Verdict.FAILED, Verdict.CLAIMED):
            store.client.srem(store.waiters_key(key), mailbox)
    if unreachable:
        raise redis.ConnectionError("the master of the requester's waits-for edges did not answer")
    return [Outcome(item[0], Verdict.CANCELLED, "") for item in items]


def running_now(client: Any, layout: Layout, outcomes: list[Outcome]) -> set[str]:
    """Of ``outcomes``, the requests answered ``queued`` or ``offer`` whose records say they run
    now: read once step 1's edge is written, when step 2 may have read them before it."""
    queued = [o.key for o in outcomes if o.verdict is Verdict.QUEUED or o.verdict is Verdict.OFFER]
    if not queued:
        return set()
    pipe = client.pipeline(transaction=False)
    for key in queued:
        pipe.hget(layout.record_key(key), "state")
    return {key for key, state in zip(queued, pipe.execute(raise_on_error=False)) if state == "running"}


def refuse_cycles(
    client: Any, layout: Layout, requester: str, outcomes: list[Outcome], mailbox: str, running: Collection[str] = ()
) -> tuple[list[Outcome], list[tuple]]:
    """Step 3: ``outcomes`` with each request that waits, transitively, for ``requester``
    answered ``cycle`` (its data: the cycle's keys, requester first and last, as submit.lua
    answers); and the commands that withdraw such a request's edge and waiter. Walked from each
    answered ``running``, and from those in ``running`` (``running_now``)."""
    walked = {o.key for o in outcomes if o.verdict is Verdict.RUNNING or o.key in running}
    edges = _edges_from(client, layout, list(walked), requester) if walked else {}
    answered, withdraw = [], []
    for outcome in outcomes:
        path = _path(edges, outcome.key, requester) if outcome.key in walked else None
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


def graph_effects(layout: Layout, requester: str, outcomes: list[Outcome], new: str) -> list[tuple]:
    """What the requester's keys get once its requests answered, so that they end as submit.lua
    writes them on a single Redis: each request in its graph as its first submit was answered,
    ``c`` from the store, else ``r`` (step 1 wrote ``r`` where ``new`` says it added the
    entry), a refused cycle or a corrupt record not at all; and no waits-for edge to a request
    that is settled, corrupt or refused (step 1 wrote one to each)."""
    graph, edges, effects = layout.graph_key(requester), layout.edges_key(requester), []
    for outcome, added in zip(outcomes, new):
        refused = outcome.verdict is Verdict.CYCLE or outcome.verdict is Verdict.CORRUPT
        if added == "1" and refused:
            effects.append(("HDEL", graph, outcome.key))
        elif added == "1" and outcome.settled:
            effects.append(("HSET", graph, outcome.key, "c"))
        if outcome.settled or outcome.verdict is Verdict.CORRUPT:
            effects.append(("SREM", edges, outcome.key))
    return effects
