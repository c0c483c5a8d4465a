"""The Redis state store: the single source of truth for every request (invariants 1, 4, 7).

The whole contract is here, one method per state transition, each one atomic Lua script from
``girder_celery/lua`` (loaded once per client and called by SHA; redis-py reloads a script that
a restarted Redis forgot). Values and errors are stored as JSON text; nothing is unpickled.

Keys, all under the prefix, and the hash slots they are in: ``layout.py``. On a Redis Cluster
an operation over several slots is split into calls of one slot each (``slots.py``): where it
is split, a comment says why it is still correct.

States of a record: absent -> queued -> running(owner, lease) -> done(value) | failed(error).
A cancelled request is failed, not memoized, with ``cancelled_at`` and ``cancelled_owner`` (the
run it stopped, whose late outcome is dropped).
A record answers each call with a ``Verdict`` (see there) and data; ``Outcome`` carries both.

| method | script | transition |
| --- | --- | --- |
| ``submit`` | submit.lua (edge.lua) | absent, failed (not memoized), lapsed -> queued (offer), or running (claimant) |
| ``claim``, ``claim_first`` | claim.lua | queued, lapsed -> running(owner, lease) |
| ``renew`` | renew.lua | running(owner) -> running(owner, later lease) |
| ``complete`` | complete.lua | not settled -> done(value); waiters woken |
| ``fail`` | fail.lua | not settled -> failed(error); waiters woken |
| ``release`` | release.lua | running(owner) -> queued (Celery retries it, or a run is given back unfinished) |
| ``unoffer`` | unoffer.lua | queued, offered -> queued, never offered |
| ``hoist`` (tiers.py) | hoist.lua (hoisted.lua) | queued on a tier -> queued there and on the nearest tier above it |
| ``forget`` | forget.lua | done, failed, corrupt -> absent (and its graph) |
| ``cancel`` | cancelled.lua | queued, running -> failed (cancelled, not memoized), and sub-requests nobody needs |

In parentheses: the script of a Redis Cluster's split, argued in the method that makes it.

"Lapsed" is running with an expired lease: its owner died, and anyone may take it over.

A *corrupt* record (not a hash, an unknown state, a ``lease_until`` or ``offered_at`` not a number:
the scripts answer ``corrupt``; a value or error not JSON: ``Outcome``) is a ``GirderError`` naming
the key and what is wrong; ``forget`` drops it. Mailbox entries girder never writes are skipped.
"""

from __future__ import annotations

import functools
import importlib.resources
import logging
from collections.abc import Iterator
from typing import Any

import redis

from . import waitsfor
from .errors import STORE_UNREACHABLE, GirderConnectionError, refused, unreachable
from .reads import glob_escape, int_field
from .slots import slots_of
from .tiers import HOIST_BACKLOG, HOIST_BATCH, HOIST_PRUNE, WINDOW_TTL_MS, Tiers
from .tree import CANCEL_LIMIT, cancel_tree
from .verdicts import NO_CLAIMANT, Claimant, Outcome, Verdict, verdict_of

__all__ = [
    "HOIST_BACKLOG", "HOIST_BATCH", "HOIST_PRUNE", "RECONNECT_WINDOW", "WINDOW_TTL_MS", "Claimant", "Outcome",
    "StateStore", "Verdict", "glob_escape", "int_field",
]  # fmt: skip

logger = logging.getLogger(__name__)

#: How long a notification waits in a mailbox nobody reads (a waiter that died).
MAILBOX_TTL_MS = 24 * 3600 * 1000
#: How long a waiter, or a node holding an offer, rides out an unreachable store (seconds).
RECONNECT_WINDOW = 30.0


def _load(name: str) -> str:
    return (importlib.resources.files("girder_celery") / "lua" / f"{name}.lua").read_text()


class StateStore(Tiers):
    """Atomic transitions of request records in one Redis database, or a Redis Cluster.

    Args:
        client: the Redis client (``decode_responses=True``): a ``redis.Redis``, or a
            ``redis.RedisCluster``.
        prefix: the prefix of every key (``girder_key_prefix``).
        busy_poll: seconds a thread spins for an awaited reply (see ``link.py``).
        url: the store's URL, named by ``GirderConnectionError``; default: the client's.
        graph_ttl_ms: how long a request's graph is kept after it, and its top-level request,
            settle (``girder_graph_ttl``).
    """

    SCRIPTS = (
        "submit", "claim", "renew", "complete", "fail", "forget", "hoist", "unoffer", "release", "cancelled",
        "edge", "hoisted",
    )  # fmt: skip

    def __init__(
        self,
        client: redis.Redis,
        prefix: str = "girder",
        busy_poll: float = 0.0,
        url: str = "",
        graph_ttl_ms: int = 86_400_000,
    ) -> None:
        super().__init__(client, prefix)
        self.graph_ttl_ms = graph_ttl_ms
        self.url = url or _url_of(client)
        self._scripts = {name: client.register_script(_load(name)) for name in self.SCRIPTS}
        #: The hash slots of the store: one on a single Redis, a cluster's otherwise.
        self.slots = slots_of(client, list(self._scripts.values()), busy_poll)
        #: Whether this process's sockets are green (gevent, eventlet).
        self.green = self.slots.green
        #: A single Redis's link (``link.py``); a cluster has one per master (``slots.py``).
        self.link = getattr(self.slots, "link", None)
        self._reachable = _Reachable(self.url)

    def reachable(self) -> _Reachable:
        """Around calls made for a caller (``with store.reachable():``): a Redis connection
        failure becomes a ``GirderConnectionError`` naming the store, a command refused (by the
        user's ACL, or by a full store that evicts nothing) a ``GirderError`` saying which."""
        return self._reachable

    @property
    def reached(self) -> bool:
        """Whether this process has reached the store before: an unreachable store is then an
        outage (a restart, a failover) to ride out, not a wrong ``girder_url`` to report at once."""
        return self._reachable.reached

    def connection_error(self, exc: BaseException) -> GirderConnectionError:
        return unreachable(self.url, exc)

    # -- transitions -------------------------------------------------------------------------

    def submit(
        self,
        items: list[tuple[str, str, str, str, str]],
        mailbox: str,
        reoffer_after_ms: int,
        requester: str = "",
        edge_ttl_ms: int = 0,
        claimant: Claimant | None = None,
        recheck: bool = False,
        requester_owner: str = "",
    ) -> list[Outcome]:
        """Submit requests given as ``(key, payload, name, readable, pool)``, in one round trip
        (on a Redis Cluster, see ``_submit_in_parts``).

        Registers ``mailbox`` (a full mailbox key, or ``""`` for none) as a waiter on each
        request that is not settled. A ``requester`` (the key of the running request making
        these) gets waits-for edges to each, and a cycle is answered ``cycle``, and each goes
        into its graph; ``claimant`` claims the request it names for an inline run. A done
        answer counts as a cache hit unless this is a waiter's ``recheck``. A requester whose run
        (``requester_owner``) was cancelled is answered ``cancelled``. See ``lua/submit.lua``.
        """
        hits = "" if recheck else "1"
        if not self.slots.single:
            return self._submit_in_parts(items, mailbox, reoffer_after_ms, requester, edge_ttl_ms, claimant, hits,
                                         requester_owner)  # fmt: skip
        calls = self._submit_calls(items, mailbox, reoffer_after_ms, requester, edge_ttl_ms, claimant, hits,
                                   requester_owner)  # fmt: skip
        replies = self.slots.call_many(self._scripts["submit"], calls)
        return [Outcome(item[0], verdict_of(v), d or "") for item, (v, d) in zip(items, replies)]

    def _submit_calls(self, items, mailbox, reoffer_after_ms, requester, edge_ttl_ms, claimant, hits,
                      requester_owner) -> Iterator[tuple[tuple, tuple]]:  # fmt: skip
        """submit.lua's ``(keys, args)`` for each of ``items``: every key on a single Redis (one
        slot), the request's own alone on a Redis Cluster."""
        single = self.slots.single
        waits, offers = (self.edges_prefix, self.offers_key("")) if single else ("", "")
        requesters = (self.edges_key(requester), self.graph_key(requester), self.record_key(requester))
        for key, payload, name, readable, pool in items:
            claimer = claimant if claimant is not None and claimant.key == key else NO_CLAIMANT
            own = (self.record_key(key), self.waiters_key(key), self.graph_key(key))
            yield (
                (*own, *requesters, offers + pool, self.stats_key) if single else own,
                (payload, name, readable, pool, mailbox, reoffer_after_ms, key, requester, waits, edge_ttl_ms,
                 claimer.owner, claimer.node, claimer.lease_ms, offers, hits, requester_owner),
            )  # fmt: skip

    def _submit_in_parts(self, items, mailbox, reoffer_after_ms, requester, edge_ttl_ms, claimant, hits,
                         requester_owner) -> list[Outcome]:  # fmt: skip
        """``submit`` on a Redis Cluster, where a request's keys, its requester's, the offers
        and the stats are in different slots: the requester's edges first (``waitsfor.py``),
        then each request's own transition, in its slot (submit.lua given its own keys only),
        then what follows from their answers, sent unawaited: the offers' index, the counters,
        the requester's graph, and the walk for cycles through those running.

        Split per slot, a submit of many requests is the same as many submits of one: each
        request's transition is atomic in its own slot, and nothing in one depends on another's.
        The offers' index is written after the record that it indexes: it may name a record
        that is no longer queued (the hoister drops such entries, hoist.lua and hoisted.lua) or,
        in a crash between the two, miss one that is (then that offer is not hoisted, and the
        waiter's re-check offers it again after ``girder_reoffer_after``): the record is the
        truth, and the index only says what the hoister may look at. Counters and graph edges
        are reports, written after the transition they report.

        A submit of one request sends the edges beside its transition, not before it
        (``waitsfor.send_edges`` says why that is still correct), so it costs one round trip.
        """
        keys, edge, owner = [item[0] for item in items], self._scripts["edge"], requester_owner
        overlap = bool(requester) and len(items) == 1
        edged: list[str | None] = []  # which keys are new in the requester's graph, None if cancelled
        if overlap:
            waitsfor.send_edges(self.slots, edge, self, requester, keys, owner, edge_ttl_ms, edged.append)
        elif requester:
            edged.append(waitsfor.write_edges(self.slots, edge, self, requester, keys, owner, edge_ttl_ms))
            if edged[0] is None:
                return [Outcome(key, Verdict.CANCELLED, "") for key in keys]
        calls = self._submit_calls(items, mailbox, reoffer_after_ms, requester, edge_ttl_ms, claimant, hits,
                                   requester_owner)  # fmt: skip
        replies = self.slots.call_many(self._scripts["submit"], calls)  # reads the edges' reply too
        if overlap and (not edged or edged[0] is None):
            return waitsfor.give_back(self, items, replies, mailbox, claimant, unreachable=not edged)
        outcomes, effects, counts = [], [], []
        for (key, _, name, _, pool), (verdict, data, *index) in zip(items, replies):
            outcome = Outcome(key, verdict_of(verdict), data or "")
            outcomes.append(outcome)
            offered_at, older = index or ("", "")
            if older:
                effects.append(("ZREM", self.offers_key(older), key))
            if offered_at:
                effects.append(("ZADD", self.offers_key(pool), offered_at, key))
            if outcome.settled and hits:  # summed in the process (a hit must stay one round trip)
                counts.append((self.stats_key, f"hits:{name}", 1))
        if requester:
            running = waitsfor.running_now(self.client, self, outcomes) if overlap else set()
            outcomes, withdrawn = waitsfor.refuse_cycles(self.client, self, requester, outcomes, mailbox, running)
            effects += withdrawn + waitsfor.graph_effects(self, requester, outcomes, edged[0])
        self.slots.effects(effects)
        if counts:
            self.slots.count(counts)
        return outcomes

    def claim(self, key: str, owner: str, node: str, lease_ms: int, via: str = "") -> tuple[Verdict, str, int]:
        """Claim ``key`` for ``owner``, from an offer on queue ``via`` (``""``: a waiter claiming
        its own sub-request): ``(verdict, payload or owner, attempts)``."""
        verdict, data, attempts, _ = self._claim([key], owner, node, lease_ms, via)[:4]
        return verdict_of(verdict), data, int(attempts or 0)

    def claim_first(self, keys: list[str], owner: str, node: str, lease_ms: int) -> tuple[str | None, str]:
        """Claim the first of ``keys`` (a waiter's own sub-requests) that can be claimed, in one
        round trip: ``(key, payload)``, or ``(None, "")`` if each is running, settled or lost.
        The keys must be in one slot (``claim_span``)."""
        if not keys:
            return None, ""
        verdict, data, _, index = self._claim(keys, owner, node, lease_ms, "")[:4]
        return (keys[index - 1], data) if verdict == Verdict.CLAIMED else (None, "")

    def claim_span(self, keys: list[str]) -> int:
        """How many of ``keys``, from the first, one ``claim_first`` may scan: all of them on a
        single Redis, the first and those after it in its slot on a Redis Cluster.

        A waiter's claim scan split per slot is still correct: each claim is atomic on its own
        record, which is what keeps a request from running twice (invariant 1); the scan only
        picks which to run next, and taking the slots one call at a time keeps its order of
        preference (newest first) and claims one request per step, as one call does."""
        if self.slots.single:
            return len(keys)
        first = self.slots.slot(self.record_key(keys[0]))
        return next((i for i, key in enumerate(keys) if self.slots.slot(self.record_key(key)) != first), len(keys))

    def _claim(self, keys: list[str], owner: str, node: str, lease_ms: int, via: str) -> list:
        records = tuple(self.record_key(k) for k in keys)
        offers = self.offers_key("") if self.slots.single else ""
        reply = self.slots.link_for(records[0]).call(self._scripts["claim"], records, (owner, node, lease_ms, via,
                                                                                       offers, *keys))  # fmt: skip
        if len(reply) > 4 and reply[4]:  # a cluster's claim: its offer's index entry goes after the record's move
            self.slots.effects([("ZREM", self.offers_key(reply[4]), keys[reply[3] - 1])])
        return reply

    def renew(self, leases: dict[str, str], lease_ms: int, edge_ttl_ms: int | None = None) -> dict[str, bool]:
        """Extend the leases ``{key: owner}`` and their waits-for edges (by ``edge_ttl_ms``,
        default twice the lease): ``{key: still ours}``. One call per slot (each lease is a
        record of its own: renewing them apart is the same as together)."""
        edge_ttl_ms = 2 * lease_ms if edge_ttl_ms is None else edge_ttl_ms
        renewed = {}
        for keys in self._by_slot(list(leases)):
            replies = self._scripts["renew"](
                [*(self.record_key(k) for k in keys), *(self.edges_key(k) for k in keys)],
                [lease_ms, *(leases[k] for k in keys), edge_ttl_ms],
            )
            renewed.update((k, bool(r)) for k, r in zip(keys, replies))
        return renewed

    def _by_slot(self, keys: list[str]) -> list[list[str]]:
        """``keys`` grouped by the slot of their records (one group on a single Redis)."""
        if self.slots.single:
            return [keys] if keys else []
        groups: dict[int, list[str]] = {}
        for key in keys:
            groups.setdefault(self.slots.slot(self.record_key(key)), []).append(key)
        return list(groups.values())

    def complete(self, key: str, owner: str, value: str, ttl_ms: int, skip_mailbox: str = "") -> bool:
        """Store ``value`` (JSON) and wake the waiters but ``skip_mailbox``; False if it was
        already settled (or not ``owner``'s to settle)."""
        script, keys, args = self._complete_call(key, owner, value, ttl_ms, skip_mailbox)
        return self._notify(key, "done", value, self.slots.link_for(keys[0]).call(script, keys, args))

    def complete_unawaited(self, key: str, owner: str, value: str, ttl_ms: int, skip_mailbox: str = "") -> None:
        """``complete``, with its reply read by this thread's next call (see ``link.py``): an
        executor has nothing to learn from it, and waiters are woken when Redis runs it. On a
        Redis Cluster the reply names the mailboxes to wake, which are woken once it is read:
        with the thread's next submit, or ``flush`` (see ``slots.py``)."""
        script, keys, args = self._complete_call(key, owner, value, ttl_ms, skip_mailbox)
        # On a single Redis complete.lua wakes the waiters itself: its reply leaves nothing to do.
        notify = None if self.slots.single else functools.partial(self._notify, key, "done", value)
        self.slots.send(script, keys, args, notify)

    def _complete_call(self, key, owner, value, ttl_ms, skip_mailbox) -> tuple[Any, tuple, tuple]:
        args = (key, owner, value, ttl_ms, MAILBOX_TTL_MS, skip_mailbox, self.graph_ttl_ms)
        return self._scripts["complete"], self._settle_keys(key), args

    def fail(
        self,
        key: str,
        owner: str,
        error: str,
        memoize: bool,
        ttl_ms: int,
        skip_mailbox: str = "",
        only_if_queued: bool = False,
    ) -> bool:
        """Store ``error`` (JSON) and wake the waiters but ``skip_mailbox``; False if it was
        already settled (or, with ``only_if_queued``, claimed by an executor)."""
        memo, queued_only = "1" if memoize else "0", "1" if only_if_queued else ""
        args = (key, owner, error, memo, ttl_ms, MAILBOX_TTL_MS, skip_mailbox, queued_only, self.graph_ttl_ms)
        return self._notify(key, "failed", error, self._scripts["fail"](self._settle_keys(key), args))

    def _settle_keys(self, key: str) -> tuple[str, ...]:
        own = self.record_key(key), self.waiters_key(key), self.edges_key(key), self.graph_key(key)
        return (*own, self.stats_key) if self.slots.single else own

    def _notify(self, key: str, verdict: str, data: str, reply: Any) -> bool:
        """Whether complete.lua or fail.lua stored the outcome; on a Redis Cluster, where they
        answer the waiters' mailboxes and the counts, this wakes and counts.

        Split from the transition, waking is still "write, then notify" (invariant 4): the
        outcome is stored in its record before any mailbox hears of it, and a waiter that reads
        the record meanwhile (its periodic re-check) finds it settled. Should this process die
        between the two, each waiter's next re-check (``girder_check_interval``) finds the
        outcome in the record: a wake-up is late, never lost. A mailbox is one key of its own,
        so each push is one slot."""
        if not isinstance(reply, list):
            return bool(reply)
        _, name, ran_ms, *mailboxes = reply
        entry = f"{verdict}:{key}:{data}"
        self.slots.effects([c for box in mailboxes for c in (("RPUSH", box, entry), ("PEXPIRE", box, MAILBOX_TTL_MS))])
        stats, counts = self.stats_key, []
        if name and verdict == "failed":
            counts.append((stats, f"failures:{name}", 1))
        if name and ran_ms != "":
            counts += [(stats, f"runs:{name}", 1), (stats, f"ms:{name}", int(ran_ms))]
        if counts:  # summed in the process, as cache hits are (slots.py)
            self.slots.count(counts)
        return True

    def release(self, key: str, owner: str, offered: bool = True) -> bool:
        """Give claimed ``key`` back to queued; False if not ours. ``offered``: Celery has just
        sent its retry message; else it is given back unfinished with no offer, and the next
        submit of it offers it at once."""
        return bool(self._scripts["release"]((self.record_key(key),), (owner, "1" if offered else "")))

    def unoffer(self, key: str, pool: str) -> bool:
        """Withdraw the offer of ``key`` on ``pool`` whose message was never sent. On a Redis
        Cluster the offers' index entry goes after the record's change (see ``_submit_in_parts``)."""
        if self.slots.single:
            return bool(self._scripts["unoffer"]((self.record_key(key), self.offers_key(pool)), (key,)))
        withdrawn = bool(self._scripts["unoffer"]((self.record_key(key),), (key,)))
        if withdrawn:
            self.client.zrem(self.offers_key(pool), key)
        return withdrawn

    def forget(self, key: str) -> Verdict:
        """Drop a settled request or a corrupt record: the state it had, ``absent`` or ``corrupt``."""
        return self.forget_many([key])[0]

    def forget_many(self, keys: list[str]) -> list[Verdict]:
        """``forget`` of each of ``keys``, in one round trip (one per master on a cluster)."""
        if not keys:
            return []
        calls = [((self.record_key(key), self.graph_key(key)), ()) for key in keys]
        return [verdict_of(v) for v in self.slots.call_many(self._scripts["forget"], calls)]

    def cancel(
        self, key: str, why: str, why_sub: str, ttl_ms: int, limit: int = CANCEL_LIMIT
    ) -> tuple[Verdict, list[str], list[tuple[str, str]]]:
        """Cancel ``key`` (if queued or running) and its sub-requests that no other live request
        waits for, their errors' messages ``why`` and ``why_sub``, kept ``ttl_ms``: ``(verdict,
        the keys cancelled, [(key, node)] of those running from their own messages)``, the verdict
        ``cancelled``, or the record's state (``done``, ``failed``, ``absent``) or ``corrupt``.
        See ``tree.py``."""
        script, ttls = self._scripts["cancelled"], (ttl_ms, MAILBOX_TTL_MS, self.graph_ttl_ms)
        return cancel_tree(self.client, self.slots, script, self, key, (why, why_sub), ttls, limit)

    def flush(self) -> None:
        """This thread is about to block, hand control back to its caller's code or take its next
        message: what its unread replies leave to do is done now (on a Redis Cluster, waking a
        completion's waiters)."""
        self.slots.flush()

    def idle(self) -> None:
        """This thread is about to hop or end (see ``link.py``)."""
        self.slots.idle()


class _Reachable:
    """``StateStore.reachable``: a plain class, as it is on every caller's path (a generator
    context manager costs a microsecond). ``reached``: whether a call made for a caller has
    ever succeeded in this process."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.reached = False

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc_type is None:
            self.reached = True
            return
        if issubclass(exc_type, STORE_UNREACHABLE):
            raise unreachable(self.url, exc) from exc
        if issubclass(exc_type, (redis.exceptions.NoPermissionError, redis.exceptions.OutOfMemoryError)):
            raise refused(self.url, exc) from exc


def _url_of(client: redis.Redis | redis.RedisCluster) -> str:
    if isinstance(client, redis.RedisCluster):
        return "redis+cluster://" + ",".join(f"{node.host}:{node.port}" for node in client.get_primaries())
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    return f"redis://{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"
