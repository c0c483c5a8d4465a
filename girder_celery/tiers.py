"""Hoisting: copying offers that waited too long up the pool tree, one pass per call (hoist.lua).

Invariant 1: a copy is only ever an offer; whoever claims first runs the request. Every tier's
offers and window are in one slot, the tiers slot (``layout.py``), so a pass weighs a node's whole
chain of tiers atomically; on a single Redis the pass reads the records too, on a Redis Cluster
their side follows, each in its own slot (``_hoisted``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .reads import Reads
from .slots import Slots

__all__ = ["EARLY_HOIST", "HOIST_BACKLOG", "HOIST_BATCH", "HOIST_PRUNE", "WINDOW_TTL_MS", "Pass", "Tiers"]

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
#: Most offers a waiter makes due at once (``make_due``): what two passes move out of a tier; the
#: rest are due as they age, by then.
EARLY_HOIST = 2 * HOIST_BATCH


class Pass(NamedTuple):
    """What one hoisting pass did: the ``(queue, key, name, payload)`` copies to publish, and
    the ms until the oldest offer left below the top tier is due (``after_ms`` when none is
    left; 0 or less when one is due and nothing above could take it)."""

    copies: list[tuple[str, str, str, str]]
    due_in_ms: int


class Tiers(Reads):
    """``StateStore``'s hoisting transition, with its scripts and slots."""

    slots: Slots
    _scripts: dict[str, Any]

    def hoist(self, tiers: list[str], after_ms: int) -> Pass:
        """One pass up ``tiers`` (a node's queue, its pool, the pool's ancestors): move up to
        ``HOIST_BATCH`` offers per tier, queued there for over ``after_ms``, to the nearest tier
        above that can take them: one with fewer than ``HOIST_BACKLOG`` offers that waited as
        long and, below the top, room in its window (none: they stay); at the top only drop
        stale entries."""
        records = self.record_prefix if self.slots.single else ""
        due_in, *reply = self._scripts["hoist"](
            [*(self.offers_key(tier) for tier in tiers), *(self.window_key(tier) for tier in tiers)],
            (after_ms, records, HOIST_BATCH, HOIST_BACKLOG, HOIST_PRUNE, WINDOW_TTL_MS, *tiers),
        )
        moves = [tuple(reply[i : i + 4]) for i in range(0, len(reply), 4)]
        return Pass(moves if self.slots.single else self._hoisted(moves), int(due_in))

    def make_due(self, tier: str, keys: list[str]) -> None:
        """Make the offers of ``keys`` on ``tier`` due for the next hoisting pass, as if they had
        waited since the epoch: a waiter expects them to wait longer than ``girder_hoist_after``.
        Only entries still there are changed (XX): one claimed meanwhile is not offered again."""
        if keys:
            self.client.zadd(self.offers_key(tier), dict.fromkeys(keys, 0), xx=True)

    def _hoisted(self, moves: list[tuple[str, str, str, str]]) -> list[tuple[str, str, str, str]]:
        """A cluster's hoist, the records' side: each entry hoist.lua moved up to a queue (or
        looked at, queue ``""``) is checked against its record (hoisted.lua, in the record's
        slot), and dropped from the index where the record is not queued.

        Split so, the index runs ahead of the records for a moment: an entry moved up for a
        record that a claim took meanwhile has no copy published and is dropped here; one whose
        record is queued gets its copy, as on a single Redis. A copy is only ever an offer
        (invariant 1): whoever claims first runs the request, and the others skip it. A pool's
        window counts such a moved entry as taken, which only tunes how many copies it is given."""
        calls = [((self.record_key(key),), (queue,)) for queue, key, _, _ in moves]
        copies, drops = [], []
        for (queue, key, tier, _), found in zip(moves, self.slots.call_many(self._scripts["hoisted"], calls)):
            if not found:
                drops.append(("ZREM", self.offers_key(queue or tier), key))
            elif queue:
                copies.append((queue, key, found[0], found[1]))
        self.slots.effects(drops)
        return copies
