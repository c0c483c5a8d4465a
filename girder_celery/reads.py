"""Reads of the state store that move no request (a record, a queue's offers, a waiter's mailbox),
and a waiter's withdrawal: what ``StateStore`` does besides its transitions.

Each read names one key, or pipelines reads of one key each, so it is one slot per command on a
Redis Cluster too (redis-py's cluster pipeline sends each to its master). A mailbox is read by
its waiter alone; a notification girder never writes is skipped, the record being the truth.
"""

from __future__ import annotations

from typing import Any

import redis

from .errors import STORE_UNREACHABLE
from .layout import Layout
from .verdicts import Outcome, notified

__all__ = ["Reads", "glob_escape", "int_field"]

#: A batch of more graphs than this is first asked ``EXISTS`` by ``keep_graphs``: a wide level of
#: leaves (1,000 children that made no sub-requests) then costs one command, not two per child.
EXISTS_FIRST = 16


class Reads(Layout):
    """The reads of one store: ``client`` (single Redis or cluster), keys under ``prefix``."""

    def __init__(self, client: Any, prefix: str) -> None:
        super().__init__(prefix)
        self.client = client
        self._blmpop = True  # until the server says it has no BLMPOP (Redis < 7)
        self._expire_gt = True  # until it says it has no PEXPIRE ... GT (Redis < 7)
        #: How long a request's graph is kept after it, and its top-level request, settle (ms).
        self.graph_ttl_ms = 86_400_000

    def record(self, key: str) -> dict[str, Any]:
        """The request record as stored (empty when absent; Redis's WRONGTYPE if not a hash)."""
        return self.client.hgetall(self.record_key(key))

    def offers(self, queue: str, limit: int) -> tuple[int, int, list[tuple[str, int]]]:
        """The offers waiting on ``queue``: how many, Redis's clock (ms) and the ``limit``
        oldest as ``(key, offered at ms)``, in one round trip."""
        pipe = self._master_of(self.offers_key(queue)).pipeline(transaction=False)
        pipe.zcard(self.offers_key(queue))
        pipe.time()
        pipe.zrange(self.offers_key(queue), 0, limit - 1, withscores=True)
        total, (seconds, micros), oldest = pipe.execute()
        return total, seconds * 1000 + micros // 1000, [(key, int(at)) for key, at in oldest]

    def _master_of(self, name: str) -> redis.Redis:
        """The client of the master holding key ``name``: the client itself on a single Redis
        (a cluster's pipeline refuses TIME, which names no key; its master's clock is the one
        the scripts of that slot read)."""
        if isinstance(self.client, redis.RedisCluster):
            return self.client.get_redis_connection(self.client.get_node_from_key(name))
        return self.client

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
        told = [notified(mailbox, entry) for entry in self._pop(mailbox, block, most)]
        return [outcome for outcome in told if outcome is not None]

    def _pop(self, mailbox: str, block: float, most: int) -> list[str]:
        if self._blmpop:
            try:
                reply = self.client.execute_command("BLMPOP", block, 1, mailbox, "LEFT", "COUNT", most,
                                                    **self._node_of(mailbox))  # fmt: skip
            except redis.RedisError as exc:
                # Unknown before Redis 7 (a cluster's client says so itself), or refused by an
                # ACL: pop one at a time. A store out of reach is raised.
                if isinstance(exc, STORE_UNREACHABLE):
                    raise
                self._blmpop = False
            else:
                return reply[1] if reply else []
        item = self.client.blpop([mailbox], timeout=block)
        return [item[1]] if item else []

    def _node_of(self, name: str) -> dict[str, Any]:
        """Where a cluster's client sends a command on key ``name`` that it would otherwise ask the
        server to find the keys of (``COMMAND GETKEYS``, a round trip of its own: BLMPOP, whose
        number of keys moves them); nothing on a single Redis. A redirection is still followed."""
        if isinstance(self.client, redis.RedisCluster):
            return {"target_nodes": self.client.get_node_from_key(name)}
        return {}

    def unregister(self, keys: list[str], mailbox: str) -> None:
        """Withdraw a waiter that gives up: drop its mailbox from ``keys`` and delete it."""
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.srem(self.waiters_key(key), mailbox)
        pipe.delete(mailbox)
        pipe.execute()


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
