"""The Redis state store: the single source of truth for every request (invariants 1, 4, 7).

One method per state transition, each one atomic Lua script from ``girder_celery/lua``, loaded
once per client and called by SHA (redis-py reloads a script that a restarted Redis forgot).
Every key lives under the prefix: ``<prefix>:req:<key>`` (the request record, a hash),
``<prefix>:waiters:<key>`` (the mailboxes to notify) and ``<prefix>:mailbox:<id>`` (one waiter's
notifications). Values and errors are stored as JSON text; nothing is ever unpickled.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass
from typing import Any

import redis

__all__ = ["Outcome", "StateStore"]

#: How long a notification waits in a mailbox nobody reads (a waiter that died).
MAILBOX_TTL_MS = 24 * 3600 * 1000


def _load(name: str) -> str:
    return (importlib.resources.files("girder_celery") / "lua" / f"{name}.lua").read_text()


@dataclass(frozen=True)
class Outcome:
    """What the store answered for one request: a verdict and its data.

    ``verdict`` is one of ``offer``, ``queued``, ``running``, ``done``, ``failed``; ``data`` is
    the value or error JSON for ``done``/``failed`` and the owner for ``running``.
    """

    key: str
    verdict: str
    data: str

    @property
    def settled(self) -> bool:
        return self.verdict in ("done", "failed")


class StateStore:
    """Atomic transitions of request records in one Redis database."""

    SCRIPTS = ("submit", "claim", "renew", "complete", "fail", "forget")

    def __init__(self, client: redis.Redis, prefix: str = "girder") -> None:
        self.client = client
        self.prefix = prefix
        self._scripts = {name: client.register_script(_load(name)) for name in self.SCRIPTS}

    def record_key(self, key: str) -> str:
        return f"{self.prefix}:req:{key}"

    def waiters_key(self, key: str) -> str:
        return f"{self.prefix}:waiters:{key}"

    def mailbox_key(self, mailbox_id: str) -> str:
        return f"{self.prefix}:mailbox:{mailbox_id}"

    # -- transitions -------------------------------------------------------------------------

    def submit(
        self,
        items: list[tuple[str, str, str, str, str]],
        mailbox: str,
        reoffer_after_ms: int,
    ) -> list[Outcome]:
        """Submit requests given as ``(key, payload, name, readable, pool)``, in one round trip.

        Registers ``mailbox`` (a full mailbox key, or ``""`` for none) as a waiter on each
        request that is not settled. See ``lua/submit.lua``.
        """
        script = self._scripts["submit"]
        if len(items) == 1:
            key, payload, name, readable, pool = items[0]
            replies = [
                script(
                    (self.record_key(key), self.waiters_key(key)),
                    (payload, name, readable, pool, mailbox, reoffer_after_ms),
                )
            ]
        else:
            pipe = self.client.pipeline(transaction=False)
            for key, payload, name, readable, pool in items:
                script(
                    (self.record_key(key), self.waiters_key(key)),
                    (payload, name, readable, pool, mailbox, reoffer_after_ms),
                    client=pipe,
                )
            replies = pipe.execute()
        return [Outcome(item[0], v, d or "") for item, (v, d) in zip(items, replies)]

    def claim(self, key: str, owner: str, node: str, lease_ms: int) -> tuple[str, str, int]:
        """Claim ``key`` for ``owner``: ``(verdict, payload or owner, attempts)``."""
        verdict, data, attempts = self._scripts["claim"]((self.record_key(key),), (owner, node, lease_ms))
        return verdict, data, int(attempts or 0)

    def renew(self, leases: dict[str, str], lease_ms: int) -> dict[str, bool]:
        """Extend the leases ``{key: owner}``: ``{key: still ours}``."""
        keys = list(leases)
        replies = self._scripts["renew"]([self.record_key(k) for k in keys], [lease_ms, *(leases[k] for k in keys)])
        return {k: bool(r) for k, r in zip(keys, replies)}

    def complete(self, key: str, owner: str, value: str, ttl_ms: int) -> bool:
        """Store ``value`` (JSON) and wake the waiters; False if it was already settled."""
        return bool(
            self._scripts["complete"](
                (self.record_key(key), self.waiters_key(key)),
                (key, owner, value, ttl_ms, MAILBOX_TTL_MS),
            )
        )

    def fail(self, key: str, owner: str, error: str, memoize: bool, ttl_ms: int) -> bool:
        """Store ``error`` (JSON) and wake the waiters; False if it was already settled."""
        return bool(
            self._scripts["fail"](
                (self.record_key(key), self.waiters_key(key)),
                (key, owner, error, "1" if memoize else "0", ttl_ms, MAILBOX_TTL_MS),
            )
        )

    def forget(self, key: str) -> str:
        """Drop a settled request; returns the state it had (``absent`` if none)."""
        return self._scripts["forget"]((self.record_key(key),), ())

    # -- reads and housekeeping -------------------------------------------------------------

    def record(self, key: str) -> dict[str, Any]:
        """The request record as stored (empty when absent)."""
        return self.client.hgetall(self.record_key(key))

    def unregister(self, keys: list[str], mailbox: str) -> None:
        """Withdraw a waiter that gives up: drop its mailbox from ``keys`` and delete it."""
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.srem(self.waiters_key(key), mailbox)
        pipe.delete(mailbox)
        pipe.execute()
