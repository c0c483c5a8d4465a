"""The Redis state store: the single source of truth for every request (invariants 1, 4, 7).

The whole contract is here, one method per state transition, each one atomic Lua script from
``girder_celery/lua`` (loaded once per client and called by SHA; redis-py reloads a script that
a restarted Redis forgot). Values and errors are stored as JSON text; nothing is unpickled.

Keys, all under the prefix:

- ``<prefix>:req:<key>``: the request record, a hash: ``state``, ``payload``, ``name``,
  ``request`` (readable), ``pool``, ``owner``, ``node``, ``lease_until``, ``value`` or
  ``error`` and ``memo``, the ``*_at`` times (ms), ``attempts``, ``offers``, ``offered_on``,
  ``placement``, ``claimed_via``, ``hoists``, ``ran_by``;
- ``<prefix>:waiters:<key>``: the mailboxes to notify when it settles, a set;
- ``<prefix>:waits:<key>``: the waits-for edges of a running request, the set of keys it
  waits for, which expires with its lease (a cycle is refused by walking them);
- ``<prefix>:graph:<key>``: the sub-requests a request made, a hash ``child -> "r"`` (requested)
  or ``"c"`` (answered from the store), kept ``graph_ttl_ms`` after it settles and after its
  top-level request settles (``keep_graphs``; ``graph.py`` reads and keeps it); a settled
  record's ``subs`` counts them, and each record names its ``parent`` ("" at top level);
- ``<prefix>:stats``: per-task counters since a reset, a hash of ``runs:<name>``, ``ms:<name>``,
  ``failures:<name>``, ``hits:<name>`` and ``since`` (ms);
- ``<prefix>:offers:<queue>``: the offers waiting on a queue, a zset of keys by offer time;
- ``<prefix>:mailbox:<id>``: one waiter's notifications, a list of ``<verdict>:<key>:<data>``;
  a running request's waiter's ``<id>`` is ``<its key>/<nonce>``, and the owner token of the
  sub-requests it claims ends in ``><its key>``, so cancel.lua tells who waits for what.

States of a record: absent -> queued -> running(owner, lease) -> done(value) | failed(error).
A cancelled request is failed, not memoized, with ``cancelled_at`` and ``cancelled_owner`` (the
run it stopped, whose late outcome is dropped).
A record answers each call with a ``Verdict`` (see there) and data; ``Outcome`` carries both.

| method | script | transition |
| --- | --- | --- |
| ``submit`` | submit.lua | absent, failed (not memoized), lapsed -> queued (offer); or -> running for a claimant |
| ``claim``, ``claim_first`` | claim.lua | queued, lapsed -> running(owner, lease) |
| ``renew`` | renew.lua | running(owner) -> running(owner, later lease) |
| ``complete`` | complete.lua | not settled -> done(value); waiters woken |
| ``fail`` | fail.lua | not settled -> failed(error); waiters woken |
| ``release`` | release.lua | running(owner) -> queued (Celery retries it, or a run is given back unfinished) |
| ``unoffer`` | unoffer.lua | queued, offered -> queued, never offered |
| ``hoist`` | hoist.lua | queued on a tier -> queued there and on the nearest tier above that can take it |
| ``forget`` | forget.lua | done, failed, corrupt -> absent (and its graph) |
| ``cancel`` | cancel.lua | queued, running -> failed (cancelled, not memoized), and sub-requests nobody else awaits |

"Lapsed" is running with an expired lease: its owner died, and anyone may take it over.

A *corrupt* record (not a hash, an unknown state, a ``lease_until`` or ``offered_at`` not a number:
the scripts answer ``corrupt``; a value or error not JSON: ``Outcome``) is a ``GirderError`` naming
the key and what is wrong; ``forget`` drops it. Mailbox entries girder never writes are skipped.
"""

from __future__ import annotations

import importlib.resources
import logging
from dataclasses import dataclass
from enum import Enum
from typing import Any

import redis

from .errors import STORE_UNREACHABLE, GirderConnectionError, GirderError, corrupt, refused, unreachable
from .keys import Request, decode_value
from .link import Link

__all__ = ["RECONNECT_WINDOW", "Claimant", "Outcome", "StateStore", "Verdict", "glob_escape", "int_field"]

logger = logging.getLogger(__name__)

#: How long a notification waits in a mailbox nobody reads (a waiter that died).
MAILBOX_TTL_MS = 24 * 3600 * 1000
#: How long a waiter, or a node holding an offer, rides out an unreachable store (seconds).
RECONNECT_WINDOW = 30.0
#: A hoisting pass moves at most ``HOIST_BATCH`` offers out of each tier, and passes over a tier
#: holding ``HOIST_BACKLOG`` offers that waited longer than ``girder_hoist_after`` (not keeping
#: up), or a pool below the top whose window is full. The batch bounds a pass's script and the
#: copies one pass can send to a tier that is about to fall behind; it is well above what a
#: tier's consumers take per pass, so that the copies keep pace with a wide pool (issue 12: 16
#: starved the nine nodes of a root pool). A pool's window starts at ``HOIST_BACKLOG`` and is
#: at most ``HOIST_BATCH``.
HOIST_BATCH = 64
HOIST_BACKLOG = 16
#: Of a tier whose offers cannot move (the top, or no tier above keeps up), a pass looks at only
#: the oldest, to drop an entry whose record was lost (such entries are the oldest, and every
#: node's hoister passes): a saturated grid's hoisters would otherwise read a batch of records
#: per tier per pass, to move none of them (4 per pass were half the reads of a 12-node fan-out).
HOIST_PRUNE = 1
#: How long a pool's hoisting window is kept once no pass adjusts it (see hoist.lua).
WINDOW_TTL_MS = 24 * 3600 * 1000
#: Most requests one cancel fails (a bound on its script's run; the rest go on).
CANCEL_LIMIT = 10_000
#: A batch of more graphs than this is first asked ``EXISTS`` by ``keep_graphs``: a wide level of
#: leaves (1,000 children that made no sub-requests) then costs one command, not two per child.
EXISTS_FIRST = 16


class Verdict(str, Enum):
    """What the store answers for a request: its state, or what the caller must do next."""

    #: submit: it is queued now and nothing was offered; the caller must publish an offer.
    OFFER = "offer"
    #: submit: already queued and offered. A record's state: waiting for an executor.
    QUEUED = "queued"
    #: A live executor holds it (data: the owner token).
    RUNNING = "running"
    #: submit with a claimant, claim: the caller holds it now and must run it (data: payload).
    CLAIMED = "claimed"
    #: Settled with a value (data: the value's JSON).
    DONE = "done"
    #: Settled with an error (data: the error's JSON); a submit restarts it unless memoized.
    FAILED = "failed"
    #: submit: refused, it (transitively) waits for its requester (data: the cycle's keys).
    CYCLE = "cycle"
    #: submit: refused, the requester's run was cancelled. cancel: it cancelled (data: the keys).
    CANCELLED = "cancelled"
    #: claim, forget: the store has no record of it (forgotten, expired or lost).
    ABSENT = "absent"
    #: submit, claim, forget: a record girder never writes (data: what is wrong); forget drops it.
    CORRUPT = "corrupt"

    def __str__(self) -> str:
        return self.value


_VERDICTS = {v.value: v for v in Verdict}
_SETTLED = (Verdict.DONE, Verdict.FAILED)


def _verdict(text: str) -> Verdict:
    try:
        return _VERDICTS[text]
    except KeyError:
        raise GirderError(f"the state store answered an unknown verdict {text!r}") from None


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the store answered for one request: a ``Verdict`` and its data."""

    key: str
    verdict: Verdict
    data: str

    @property
    def settled(self) -> bool:
        return self.verdict in _SETTLED

    def value(self, request: Request | None = None) -> Any:
        """The value of a ``done`` outcome; raises a ``GirderError`` naming the key if it does not decode."""
        try:
            return decode_value(self.data)
        except Exception as exc:  # not JSON, or kombu's type tags broken: girder never wrote it
            raise corrupt(self.key, f"its value is not JSON ({exc!r:.200})", request and request.readable) from None

    def error(self, request: Request | None = None) -> GirderError:
        """The error of a ``failed`` or ``corrupt`` outcome (naming the key if it does not decode)."""
        readable = request and request.readable
        if self.verdict is Verdict.CORRUPT:
            return corrupt(self.key, self.data, readable)
        try:
            return GirderError.from_dict(decode_value(self.data))
        except Exception as exc:
            return corrupt(self.key, f"its error is not a girder error in JSON ({exc!r:.200})", readable)


@dataclass(frozen=True)
class Claimant:
    """Who claims request ``key`` in the same step that submits it, to run it inline."""

    key: str
    owner: str
    node: str
    lease_ms: int


_NO_CLAIMANT = Claimant("", "", "", 0)


def _load(name: str) -> str:
    return (importlib.resources.files("girder_celery") / "lua" / f"{name}.lua").read_text()


class StateStore:
    """Atomic transitions of request records in one Redis database.

    Args:
        client: the Redis client (``decode_responses=True``).
        prefix: the prefix of every key (``girder_key_prefix``).
        busy_poll: seconds a thread spins for an awaited reply (see ``link.py``).
        url: the store's URL, named by ``GirderConnectionError``; default: the client's.
        graph_ttl_ms: how long a request's graph is kept after it, and its top-level request,
            settle (``girder_graph_ttl``).
    """

    SCRIPTS = ("submit", "claim", "renew", "complete", "fail", "forget", "hoist", "unoffer", "release", "cancel")

    def __init__(
        self,
        client: redis.Redis,
        prefix: str = "girder",
        busy_poll: float = 0.0,
        url: str = "",
        graph_ttl_ms: int = 86_400_000,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.graph_ttl_ms = graph_ttl_ms
        self.stats_key = f"{prefix}:stats"
        self.url = url or _url_of(client)
        self._scripts = {name: client.register_script(_load(name)) for name in self.SCRIPTS}
        self.link = Link(client, list(self._scripts.values()), busy_poll)
        self._blmpop = True  # until the server says it has no BLMPOP (Redis < 7)
        self._expire_gt = True  # until it says it has no PEXPIRE ... GT (Redis < 7)
        self._reachable = _Reachable(self.url)

    def record_key(self, key: str) -> str:
        return f"{self.prefix}:req:{key}"

    def waiters_key(self, key: str) -> str:
        return f"{self.prefix}:waiters:{key}"

    def offers_key(self, queue: str) -> str:
        return f"{self.prefix}:offers:{queue}"

    def window_key(self, queue: str) -> str:
        return f"{self.prefix}:window:{queue}"

    def edges_key(self, key: str) -> str:
        return f"{self.prefix}:waits:{key}"

    def graph_key(self, key: str) -> str:
        return f"{self.prefix}:graph:{key}"

    def mailbox_key(self, mailbox_id: str) -> str:
        return f"{self.prefix}:mailbox:{mailbox_id}"

    def reachable(self) -> _Reachable:
        """Around calls made for a caller (``with store.reachable():``): a Redis connection
        failure becomes a ``GirderConnectionError`` naming the store, a command refused (by the
        user's ACL, or by a full store that evicts nothing) a ``GirderError`` saying which."""
        return self._reachable

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
        """Submit requests given as ``(key, payload, name, readable, pool)``, in one round trip.

        Registers ``mailbox`` (a full mailbox key, or ``""`` for none) as a waiter on each
        request that is not settled. A ``requester`` (the key of the running request making
        these) gets waits-for edges to each, and a cycle is answered ``cycle``, and each goes
        into its graph; ``claimant`` claims the request it names for an inline run. A done
        answer counts as a cache hit unless this is a waiter's ``recheck``. A requester whose run
        (``requester_owner``) was cancelled is answered ``cancelled``. See ``lua/submit.lua``.
        """
        waits, offers, graphs = self.edges_key(""), self.offers_key(""), self.graph_key("")
        edges, graph = self.edges_key(requester), self.graph_key(requester)
        requester_record = self.record_key(requester)
        hits = "" if recheck else "1"

        def call(key: str, payload: str, name: str, readable: str, pool: str) -> tuple[tuple, tuple]:
            claimer = claimant if claimant is not None and claimant.key == key else _NO_CLAIMANT
            return (
                (self.record_key(key), self.waiters_key(key), edges, offers + pool, graph, self.stats_key,
                 requester_record),
                (payload, name, readable, pool, mailbox, reoffer_after_ms, key, requester, waits, edge_ttl_ms,
                 claimer.owner, claimer.node, claimer.lease_ms, offers, graphs, hits, requester_owner),
            )  # fmt: skip

        replies = self.link.call_many(self._scripts["submit"], (call(*item) for item in items))
        return [Outcome(item[0], _verdict(v), d or "") for item, (v, d) in zip(items, replies)]

    def claim(self, key: str, owner: str, node: str, lease_ms: int, via: str = "") -> tuple[Verdict, str, int]:
        """Claim ``key`` for ``owner``, from an offer on queue ``via`` (``""``: a waiter claiming
        its own sub-request): ``(verdict, payload or owner, attempts)``."""
        verdict, data, attempts, _ = self._claim([key], owner, node, lease_ms, via)
        return _verdict(verdict), data, int(attempts or 0)

    def claim_first(self, keys: list[str], owner: str, node: str, lease_ms: int) -> tuple[str | None, str]:
        """Claim the first of ``keys`` (a waiter's own sub-requests) that can be claimed, in one
        round trip: ``(key, payload)``, or ``(None, "")`` if each is running, settled or lost."""
        if not keys:
            return None, ""
        verdict, data, _, index = self._claim(keys, owner, node, lease_ms, "")
        return (keys[index - 1], data) if verdict == Verdict.CLAIMED else (None, "")

    def _claim(self, keys: list[str], owner: str, node: str, lease_ms: int, via: str) -> list:
        return self.link.call(
            self._scripts["claim"],
            tuple(self.record_key(k) for k in keys),
            (owner, node, lease_ms, via, self.offers_key(""), *keys),
        )

    def renew(self, leases: dict[str, str], lease_ms: int, edge_ttl_ms: int | None = None) -> dict[str, bool]:
        """Extend the leases ``{key: owner}`` and their waits-for edges (by ``edge_ttl_ms``,
        default twice the lease): ``{key: still ours}``."""
        keys = list(leases)
        edge_ttl_ms = 2 * lease_ms if edge_ttl_ms is None else edge_ttl_ms
        replies = self._scripts["renew"](
            [*(self.record_key(k) for k in keys), *(self.edges_key(k) for k in keys)],
            [lease_ms, *(leases[k] for k in keys), edge_ttl_ms],
        )
        return {k: bool(r) for k, r in zip(keys, replies)}

    def complete(self, key: str, owner: str, value: str, ttl_ms: int, skip_mailbox: str = "") -> bool:
        """Store ``value`` (JSON) and wake the waiters but ``skip_mailbox``; False if it was
        already settled (or not ``owner``'s to settle)."""
        return bool(self.link.call(*self._complete_call(key, owner, value, ttl_ms, skip_mailbox)))

    def complete_unawaited(self, key: str, owner: str, value: str, ttl_ms: int, skip_mailbox: str = "") -> None:
        """``complete``, with its reply read by this thread's next call (see ``link.py``): an
        executor has nothing to learn from it, and waiters are woken when Redis runs it."""
        self.link.send(*self._complete_call(key, owner, value, ttl_ms, skip_mailbox))

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
        return bool(self._scripts["fail"](self._settle_keys(key), args))

    def _settle_keys(self, key: str) -> tuple[str, ...]:
        return self.record_key(key), self.waiters_key(key), self.edges_key(key), self.graph_key(key), self.stats_key

    def release(self, key: str, owner: str, offered: bool = True) -> bool:
        """Give claimed ``key`` back to queued; False if not ours. ``offered``: Celery has just
        sent its retry message; else it is given back unfinished with no offer, and the next
        submit of it offers it at once."""
        return bool(self._scripts["release"]((self.record_key(key),), (owner, "1" if offered else "")))

    def unoffer(self, key: str, pool: str) -> bool:
        """Withdraw the offer of ``key`` on ``pool`` whose message was never sent."""
        return bool(self._scripts["unoffer"]((self.record_key(key), self.offers_key(pool)), (key,)))

    def forget(self, key: str) -> Verdict:
        """Drop a settled request or a corrupt record: the state it had, ``absent`` or ``corrupt``."""
        return self.forget_many([key])[0]

    def forget_many(self, keys: list[str]) -> list[Verdict]:
        """``forget`` of each of ``keys``, in one round trip."""
        if not keys:
            return []
        calls = [((self.record_key(key), self.graph_key(key)), ()) for key in keys]
        return [_verdict(v) for v in self.link.call_many(self._scripts["forget"], calls)]

    def cancel(
        self, key: str, why: str, why_sub: str, ttl_ms: int, limit: int = CANCEL_LIMIT
    ) -> tuple[Verdict, list[str], list[tuple[str, str]]]:
        """Cancel ``key`` (if queued or running) and its sub-requests that no other live request
        waits for, their errors' messages ``why`` and ``why_sub``, kept ``ttl_ms``: ``(verdict,
        the keys cancelled, [(key, node)] of those running from their own messages)``, the verdict
        ``cancelled``, or the record's state (``done``, ``failed``, ``absent``) or ``corrupt``."""
        args = (key, f"{self.prefix}:", ttl_ms, MAILBOX_TTL_MS, self.graph_ttl_ms, why, why_sub, limit)
        verdict, cancelled, running = self._scripts["cancel"]((self.record_key(key),), args)
        return _verdict(verdict), list(cancelled), list(zip(running[::2], running[1::2]))

    def hoist(self, tiers: list[str], after_ms: int) -> list[tuple[str, str, str, str]]:
        """One pass up ``tiers`` (a node's queue, its pool, the pool's ancestors): move up to
        ``HOIST_BATCH`` offers per tier, queued there for over ``after_ms``, to the nearest tier
        above that can take them: one with fewer than ``HOIST_BACKLOG`` offers that waited as
        long and, below the top, room in its window (none: they stay); at the top only drop
        stale entries. The ``(queue, key, name, payload)`` to publish."""
        reply = self._scripts["hoist"](
            [*(self.offers_key(tier) for tier in tiers), *(self.window_key(tier) for tier in tiers)],
            (after_ms, self.record_key(""), HOIST_BATCH, HOIST_BACKLOG, HOIST_PRUNE, WINDOW_TTL_MS, *tiers),
        )
        return [tuple(reply[i : i + 4]) for i in range(0, len(reply), 4)]

    def idle(self) -> None:
        """This thread is about to hop or end (see ``link.py``)."""
        self.link.idle()

    # -- reads and housekeeping -------------------------------------------------------------

    def record(self, key: str) -> dict[str, Any]:
        """The request record as stored (empty when absent; Redis's WRONGTYPE if not a hash)."""
        return self.client.hgetall(self.record_key(key))

    def offers(self, queue: str, limit: int) -> tuple[int, int, list[tuple[str, int]]]:
        """The offers waiting on ``queue``: how many, Redis's clock (ms) and the ``limit``
        oldest as ``(key, offered at ms)``, in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        pipe.zcard(self.offers_key(queue))
        pipe.time()
        pipe.zrange(self.offers_key(queue), 0, limit - 1, withscores=True)
        total, (seconds, micros), oldest = pipe.execute()
        return total, seconds * 1000 + micros // 1000, [(key, int(at)) for key, at in oldest]

    def requests_of(self, keys: list[str]) -> list[str | None]:
        """The readable request of each key (None where unknown), for messages."""
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.hget(self.record_key(key), "request")
        return pipe.execute()

    def keep_graphs(self, keys: list[str]) -> list[dict[str, str]]:
        """Extend the graphs of requests ``keys`` to ``graph_ttl_ms`` from now and read them
        (``{child: "r" or "c"}`` each, empty where there is none): one pipelined round trip,
        after one ``EXISTS`` of them all when there are more than ``EXISTS_FIRST``. A TTL is only
        ever lengthened, and the graph of a request in flight, which has none until it settles,
        is given none (``PEXPIRE ... GT``; before Redis 7, ``PTTL`` and then ``PEXPIRE``)."""
        names = [self.graph_key(key) for key in keys]
        if len(names) > EXISTS_FIRST and not self.client.exists(*names):
            return [{} for _ in names]
        if self._expire_gt:
            found = self._keep_gt(names)
            if found is not None:
                return found
        return self._keep_by_pttl(names)

    def _keep_gt(self, names: list[str]) -> list[dict[str, str]] | None:
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.pexpire(name, self.graph_ttl_ms, gt=True)
            pipe.hgetall(name)
        replies = pipe.execute(raise_on_error=False)
        refused = next((r for r in replies[::2] if isinstance(r, redis.ResponseError)), None)
        if isinstance(refused, redis.exceptions.NoPermissionError):
            raise refused
        if refused is not None:  # Redis < 7: "wrong number of arguments"
            self._expire_gt = False
            return None
        return [_graph_of(reply) for reply in replies[1::2]]

    def _keep_by_pttl(self, names: list[str]) -> list[dict[str, str]]:
        # Before Redis 7, a second round trip lengthens the TTLs read by the first. A graph that a
        # new run of its request drops and starts afresh in between gets a TTL while it runs
        # (its settle sets one again): a window of one round trip, after a restart of a request
        # reached by a top-level request's graph.
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.pttl(name)
            pipe.hgetall(name)
        replies = pipe.execute(raise_on_error=False)
        pipe = self.client.pipeline(transaction=False)
        for name, ttl in zip(names, replies[::2]):
            if isinstance(ttl, int) and 0 <= ttl < self.graph_ttl_ms:
                pipe.pexpire(name, self.graph_ttl_ms)
        pipe.execute()
        return [_graph_of(reply) for reply in replies[1::2]]

    def pop_mailbox(self, mailbox: str, block: float, most: int) -> list[Outcome]:
        """The outcomes notified to ``mailbox``, up to ``most``, waiting up to ``block`` seconds
        for the first: one round trip however many are there (``BLMPOP``; before Redis 7,
        ``BLPOP`` and one each). A waiter that ran sub-requests inline finds the others' piled up."""
        notified = [_notified(mailbox, entry) for entry in self._pop(mailbox, block, most)]
        return [outcome for outcome in notified if outcome is not None]

    def _pop(self, mailbox: str, block: float, most: int) -> list[str]:
        if self._blmpop:
            try:
                reply = self.client.blmpop(block, 1, mailbox, direction="LEFT", count=most)
            except redis.ResponseError:  # unknown before Redis 7 (or refused by an ACL): pop one at a time
                self._blmpop = False
            else:
                return reply[1] if reply else []
        item = self.client.blpop([mailbox], timeout=block)
        return [item[1]] if item else []

    def unregister(self, keys: list[str], mailbox: str) -> None:
        """Withdraw a waiter that gives up: drop its mailbox from ``keys`` and delete it."""
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.srem(self.waiters_key(key), mailbox)
        pipe.delete(mailbox)
        pipe.execute()


class _Reachable:
    """``StateStore.reachable``: a plain class, as it is on every caller's path (a generator
    context manager costs a microsecond)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc_type is None:
            return
        if issubclass(exc_type, STORE_UNREACHABLE):
            raise unreachable(self.url, exc) from exc
        if issubclass(exc_type, (redis.exceptions.NoPermissionError, redis.exceptions.OutOfMemoryError)):
            raise refused(self.url, exc) from exc


def glob_escape(text: str) -> str:
    """``text`` matched literally by Redis's glob patterns (``SCAN MATCH``)."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def int_field(text: str | None) -> int | None:
    """A record's number field as read (ms, counts), or None where missing or not a number (a
    report shows a corrupt field as unknown)."""
    try:
        return int(text) if text else None
    except ValueError:
        return None


def _graph_of(reply: Any) -> dict[str, str]:
    """A graph as a pipeline read it: empty where its key holds no hash (girder never writes one)."""
    return reply if isinstance(reply, dict) else {}


def _notified(mailbox: str, entry: str) -> Outcome | None:
    # complete.lua and fail.lua push "<verdict>:<key>:<data>" (data may hold colons); else None.
    parts = entry.split(":", 2)
    if len(parts) == 3 and parts[0] in ("done", "failed"):
        return Outcome(parts[1], _VERDICTS[parts[0]], parts[2])
    logger.warning("girder: skipped an entry of mailbox %s that girder never writes: %.80r", mailbox, entry)
    return None


def _url_of(client: redis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    return f"redis://{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"
