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


class Reads(Layout):
    """The reads of one store: ``client`` (single Redis or cluster), keys under ``prefix``."""

    def __init__(self, client: Any, prefix: str) -> None:
        super().__init__(prefix)
        self.client = client
        self._blmpop = True  # until the server says it has no BLMPOP (Redis < 7)

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

    def pop_mailbox(self, mailbox: str, block: float, most: int) -> list[Outcome]:
        """The outcomes notified to ``mailbox``, up to ``most``, waiting up to ``block`` seconds
        for the first: one round trip however many are there (``BLMPOP``; before Redis 7,
        ``BLPOP`` and one each). A waiter that ran sub-requests inline finds the others' piled up."""
        told = [notified(mailbox, entry) for entry in self._pop(mailbox, block, most)]
        return [outcome for outcome in told if outcome is not None]

    def _pop(self, mailbox: str, block: float, most: int) -> list[str]:
        if self._blmpop:
            try:
                reply = self.client.blmpop(block, 1, mailbox, direction="LEFT", count=most)
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
