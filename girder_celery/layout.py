"""Where the state store keeps what: the names of girder's keys, laid out in hash slots.

Invariant: every key one script call touches is in one hash slot (DESIGN, "Slots"), so each
call runs on one Redis Cluster master, and records of different requests spread over them all.
On a single Redis the braces below are part of the names and mean nothing more.

- record, ``<prefix>:req:{<key>}``, the request's slot: a hash, ``state``, ``payload``, ``name``,
  ``request`` (readable), ``pool``, ``owner``, ``node``, ``lease_until``, ``value`` or ``error``
  and ``memo``, the ``*_at`` times (ms), ``attempts``, ``offers``, ``offered_on``,
  ``placement``, ``claimed_via``, ``hoists``, ``ran_by``, ``parent``, ``subs``;
- waiters, ``<prefix>:waiters:{<key>}``, the request's slot: the mailboxes to notify when it
  settles, a set;
- edges, ``<prefix>:waits:{<key>}``, the request's slot: the waits-for edges of a running
  request, the keys it waits for, a set that expires with its lease;
- graph, ``<prefix>:graph:{<key>}``, the request's slot: the sub-requests it made, a hash
  ``child -> "r"`` (requested) or ``"c"`` (answered from the store), kept ``graph_ttl_ms``
  after it settles;
- offers, ``<prefix>:offers:{<prefix>:tiers}:<queue>``, the tiers slot: the offers waiting on a
  queue, a zset of keys by offer time;
- window, ``<prefix>:window:{<prefix>:tiers}:<queue>``, the tiers slot: a pool's hoisting
  window, a hash ``w``, ``in``, ``over``, ``at``;
- stats, ``<prefix>:stats``, its own slot: per-task counters since a reset, ``runs:<name>``,
  ``ms:<name>``, ``failures:<name>``, ``hits:<name>``, ``since``;
- mailbox, ``<prefix>:mailbox:<id>``, its own slot: one waiter's notifications, a list of
  ``<verdict>:<key>:<data>``.

Why so: everything about one request (its record, waiter set, waits-for edges, graph) shares
the request key's slot, so each transition of it is one atomic script, as on a single Redis;
the keys are SHA-256 digests, so requests spread evenly over the slots and the masters. The
offers of every tier share one slot, the *tiers slot*, because a hoisting pass weighs a node's
whole chain of tiers (each tier's backlog, each pool's window) in one atomic step; they are an
index of the records, written beside the record's own transition (``store.py``). The stats hash
and each mailbox are one key each, in their own slot: counters and notifications follow a
transition, never take part in it. A running request's waiter's mailbox ``<id>`` is
``<its key>/<nonce>``, and the owner token of the sub-requests it claims ends in ``><its key>``,
so cancelling tells who waits for what.
"""

from __future__ import annotations

__all__ = ["Layout"]


class Layout:
    """The key names of one ``prefix`` (``girder_key_prefix``)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.stats_key = f"{prefix}:stats"
        #: What the names of records, edges and graphs begin with, before the hash tag ``{<key>}``.
        self.record_prefix = f"{prefix}:req:"
        self.edges_prefix = f"{prefix}:waits:"
        self.graph_prefix = f"{prefix}:graph:"
        self._tiers = f"{prefix}:offers:{{{prefix}:tiers}}:"
        self._windows = f"{prefix}:window:{{{prefix}:tiers}}:"

    def record_key(self, key: str) -> str:
        return f"{self.record_prefix}{{{key}}}"

    def waiters_key(self, key: str) -> str:
        return f"{self.prefix}:waiters:{{{key}}}"

    def edges_key(self, key: str) -> str:
        return f"{self.edges_prefix}{{{key}}}"

    def graph_key(self, key: str) -> str:
        return f"{self.graph_prefix}{{{key}}}"

    def offers_key(self, queue: str) -> str:
        return self._tiers + queue

    def window_key(self, queue: str) -> str:
        return self._windows + queue

    def mailbox_key(self, mailbox_id: str) -> str:
        return f"{self.prefix}:mailbox:{mailbox_id}"

    def key_of(self, name: str) -> str:
        """The request key in a record's, waiter set's, edges' or graph's ``name``."""
        return name[name.index("{") + 1 : -1]
