"""Cancelling a request tree: who waits for what, walked from the client, and each request in
it cancelled in its own slot (``lua/cancelled.lua``), on a single Redis and a Redis Cluster alike.

Who waits for what: a running request's waits-for edges name the sub-requests it waits for; a
sub-request's waiter set names the mailboxes waiting for it, and an inline waiter's mailbox is
``<prefix>:mailbox:<its request's key>/<id>`` (a caller outside any request has no key there);
a sub-request run inline is waited for by the request whose waiter claimed it, named after the
``>`` of its owner token. A sub-request is kept when a mailbox of a caller outside any request,
or of a live request (running, its lease unexpired) not cancelled here, waits for it, or when
such a request runs it inline; the walk goes on until nothing more can be cancelled (a diamond
inside the tree is cancelled too). Every cancelled request's waiters get its ``GirderCancelled``;
a cancelled request's waiter that waits for a sub-request kept for others hears of its own
request's cancellation and leaves that sub-request's waiters.

Why the walk may read from the client, one slot at a time, and still cancel only what nobody
else needs. Each request is cancelled by a script that refuses it if its record moved on since
the walk read it: settled, claimed by another owner, or joined by a waiter the walk did not
see. So a request cancelled was, at that moment, waited for by no one but those the walk judged
cancelled or dead, exactly as if the walk and its cancel had been one step; one that gained a
waiter meanwhile is kept, and goes on for it (a running one's run is not terminated then
either: only those cancelled are). The root is cancelled whoever waits for it: that is what was
asked. A request judged dead (its lease lapsed) cannot take its sub-requests back: its waiter
is withdrawn by its next check, which finds it cancelled or running again under a new claim.
Cancelled waiters are told after the records are written (write, then notify, invariant 4).
"""

from __future__ import annotations

import json
import re
from typing import Any

from .errors import CANCELLED
from .layout import Layout
from .slots import Slots
from .verdicts import Verdict, verdict_of

__all__ = ["CANCEL_LIMIT", "cancel_tree"]

#: Most requests one cancel fails (a bound on the walk; the rest go on).
CANCEL_LIMIT = 10_000
_FIELDS = ("state", "owner", "lease_until", "offered_on", "name", "request", "node")
_WAITER = re.compile(r":mailbox:([0-9a-f]+)/")
_INLINE = re.compile(r">([0-9a-f]*)$")


class _Walk:
    """What one cancel has read: records, waiter sets, and which requests are live."""

    def __init__(self, client: Any, layout: Layout, root: str) -> None:
        self.client, self.layout = client, layout
        seconds, micros = client.time()
        self.now = seconds * 1000 + micros // 1000
        self.records: dict[str, dict[str, str] | None] = {}
        self.waiters: dict[str, set[str]] = {}
        self.cancelled: list[str] = [root]
        self.candidates: dict[str, dict[str, str]] = {}

    def read(self, keys: list[str]) -> None:
        """Read the records of ``keys`` not read yet (None: not a hash, corrupt)."""
        fresh = [k for k in dict.fromkeys(keys) if k not in self.records]
        pipe = self.client.pipeline(transaction=False)
        for key in fresh:
            pipe.hmget(self.layout.record_key(key), _FIELDS)
        for key, values in zip(fresh, pipe.execute(raise_on_error=False)):
            self.records[key] = dict(zip(_FIELDS, values)) if isinstance(values, list) else None

    def smembers(self, names: list[str]) -> list[set[str]]:
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.smembers(name)
        return [found if isinstance(found, set) else set() for found in pipe.execute(raise_on_error=False)]

    def live(self, key: str) -> bool:
        g = self.records.get(key)
        return bool(g) and g["state"] == "running" and _int(g["lease_until"]) > self.now

    def waits_outside(self, key: str) -> bool:
        return key not in self.cancelled and self.live(key)

    def held(self, key: str) -> bool:
        """Whether a caller outside any request, or a live request not cancelled, needs ``key``."""
        for mailbox in self.waiters[key]:
            found = _WAITER.search(mailbox)
            if found is None or self.waits_outside(found[1]):
                return True
        g = self.candidates[key]
        inline = _INLINE.search(g["owner"] or "") if g["state"] == "running" else None
        return inline is not None and (inline[1] == "" or self.waits_outside(inline[1]))

    def grow(self, frontier: list[str], limit: int) -> list[str]:
        """One round: the sub-requests of ``frontier`` become candidates, and those nobody else
        holds are cancelled; the new frontier."""
        children = [c for found in self.smembers([self.layout.edges_key(k) for k in frontier]) for c in sorted(found)]
        children = [c for c in dict.fromkeys(children) if c not in self.cancelled and c not in self.candidates]
        self.read(children)
        for c in children:
            if _in_flight(self.records[c]):
                self.candidates[c] = self.records[c]
        fresh = [c for c in self.candidates if c not in self.waiters]
        for c, found in zip(fresh, self.smembers([self.layout.waiters_key(c) for c in fresh])):
            self.waiters[c] = found
        self.read([m[1] for c in fresh for m in map(_WAITER.search, self.waiters[c]) if m])
        self.read([m[1] for c in fresh for m in [_INLINE.search(self.candidates[c]["owner"] or "")] if m and m[1]])
        moved = [c for c in self.candidates if len(self.cancelled) < limit and not self.held(c)]
        for c in moved:
            self.cancelled.append(c)
            del self.candidates[c]
        return moved


def cancel_tree(
    client: Any, slots: Slots, script: Any, layout: Layout, key: str, why: tuple[str, str], ttls: tuple[int, int, int],
    limit: int = CANCEL_LIMIT,
) -> tuple[Verdict, list[str], list[tuple[str, str]]]:  # fmt: skip
    """Cancel ``key`` and its sub-requests nobody else needs, their errors' messages ``why``
    (the request's, its sub-requests'), ``ttls`` the cancelled records', mailboxes' and graphs'
    (ms): ``(verdict, the keys cancelled, [(key, node)] of those running from their own messages,
    to terminate)``, the verdict ``cancelled``, else the record's state, or ``corrupt``."""
    walk = _Walk(client, layout, key)
    walk.read([key])
    root = walk.records[key]
    if root is None:
        return Verdict.CORRUPT, [], []
    if not _in_flight(root):
        return verdict_of(root["state"] or "absent"), [], []
    frontier = [key]
    while frontier:
        frontier = walk.grow(frontier, limit)
    errors = {k: _error(k, walk.records[k], why[0] if k == key else why[1]) for k in walk.cancelled}

    def call(k: str) -> tuple[tuple, tuple]:
        g = walk.records[k]
        owner = g["owner"] if g["state"] == "running" else ""
        check = "" if k == key else "1"
        keys = (layout.record_key(k), layout.waiters_key(k), layout.edges_key(k), layout.graph_key(k))
        return keys, (errors[k], ttls[0], owner or "", ttls[2], check, *sorted(walk.waiters.get(k, ())))

    (first,) = slots.call_many(script, [call(key)])
    if not first[0]:  # it settled (or was claimed again) since it was read
        walk.records.pop(key)
        walk.read([key])
        return verdict_of((walk.records[key] or {"state": "corrupt"})["state"] or "absent"), [], []
    replies = [first, *slots.call_many(script, [call(k) for k in walk.cancelled[1:]])]
    done = [k for k, reply in zip(walk.cancelled, replies) if reply[0]]
    slots.effects(_effects(walk, layout, errors, dict(zip(walk.cancelled, replies)), done, ttls[1]))
    return Verdict.CANCELLED, done, _terminated(walk, done)


def _effects(walk: _Walk, layout: Layout, errors: dict, replies: dict, done: list[str], mailbox_ttl: int) -> list:
    """What follows the cancelled records: their offers' index entries dropped, their failures
    counted, their waiters told; and a cancelled request's waiter of a kept sub-request told of
    its own request's cancellation, and withdrawn from that sub-request's waiters."""
    effects: list[tuple] = []
    for k in done:
        _, queue, name, *mailboxes = replies[k]
        if queue:
            effects.append(("ZREM", layout.offers_key(queue), k))
        if name:  # a cancel is rare: counted at once, as an effect
            effects.append(("HINCRBY", layout.stats_key, f"failures:{name}", 1))
        effects += _told(mailboxes, f"failed:{k}:{errors[k]}", mailbox_ttl)
    told = set()
    kept = [c for c in [*walk.candidates, *(k for k in walk.cancelled if k not in done)]]
    for c in kept:
        for mailbox in sorted(walk.waiters.get(c, ())):
            found = _WAITER.search(mailbox)
            if found and found[1] in done:
                if mailbox not in told:
                    told.add(mailbox)
                    effects += _told([mailbox], f"failed:{found[1]}:{errors[found[1]]}", mailbox_ttl)
                effects.append(("SREM", layout.waiters_key(c), mailbox))
    return effects


def _told(mailboxes: list[str], entry: str, ttl_ms: int) -> list[tuple]:
    return [c for box in mailboxes for c in (("RPUSH", box, entry), ("PEXPIRE", box, ttl_ms))]


def _terminated(walk: _Walk, done: list[str]) -> list[tuple[str, str]]:
    """The cancelled runs to terminate, ``(key, node)``: those running from their own messages
    on a live lease, except a stack on which a kept sub-request runs inline (it goes on there)."""
    terminate = {}
    for k in done:
        g = walk.records[k]
        owner = g["owner"] or "" if g["state"] == "running" else ""
        if owner and _int(g["lease_until"]) > walk.now and ">" not in owner:
            terminate[k] = g["node"] or ""
    for g in walk.candidates.values():
        inline = _INLINE.search(g["owner"] or "") if g["state"] == "running" else None
        r = inline[1] if inline else None
        for _ in range(CANCEL_LIMIT):
            if not r or r not in done:
                break
            terminate.pop(r, None)
            found = _INLINE.search(walk.records[r]["owner"] or "")
            r = found[1] if found else None
    return [(k, terminate[k]) for k in done if k in terminate]


def _error(key: str, record: dict[str, str], message: str) -> str:
    return json.dumps({"message": message, "key": key, "request": record["request"] or key,
                       "exc_type": CANCELLED, "causes": []})  # fmt: skip


def _in_flight(record: dict[str, str] | None) -> bool:
    return record is not None and record["state"] in ("queued", "running")


def _int(text: str | None) -> int:
    try:
        return int(text or 0)
    except ValueError:
        return 0
