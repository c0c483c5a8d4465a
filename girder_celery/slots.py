"""Hash slots: which slot each of girder's keys is in, and the link that reaches its master.

Invariant: a script call touches one slot (DESIGN, "Slots"). On a single Redis everything is one
slot: ``Slots`` answers slot 0 for every key and holds one ``Link``, so nothing is ever split and
each operation costs the round trips it always did. On a Redis Cluster (``ClusterSlots``) a key's
slot is the CRC16 of its hash tag (``layout.py``), each master has a link of its own, and an
operation over several slots is split into one call per slot (see where each is written, in
``store.py`` and ``waitsfor.py``, for why each split is still correct). What a transition leaves
to do in other slots (an offer's index entry, a notification, a counter) comes back in its reply
and is sent by ``effects`` without awaiting a reply, after the transition itself: the record is
the truth, and what follows it is an index, a wake-up or a count. Cache hits, counted in the
per-task stats, are summed in the process and sent together by a thread of its own every
``COUNT_EVERY`` (and as the process ends), so a cache hit stays one script call and no send to
the stats hash's master; ``girder.stats`` reads them that much late.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import redis
from redis.commands.core import Script
from redis.crc import key_slot

from .link import Link, green_sockets

__all__ = ["COUNT_EVERY", "ClusterSlots", "Slots", "slots_of"]

logger = logging.getLogger(__name__)

#: Seconds between the sends of a process's counts, on a Redis Cluster.
COUNT_EVERY = 0.2


class Slots:
    """A single Redis: one slot, one link."""

    single = True

    def __init__(self, client: redis.Redis, scripts: list[Script], busy_poll: float) -> None:
        self.client = client
        self.link = Link(client, scripts, busy_poll)
        self.green = self.link.green

    def slot(self, name: str) -> int:
        return 0

    def link_for(self, name: str) -> Link:
        """The link to the master of key ``name``."""
        return self.link

    def call_many(self, script: Script, calls: Iterable[tuple[tuple, tuple]]) -> list[Any]:
        """``script`` once per ``(keys, args)``, each on the master of its keys, replies in order."""
        return self.link.call_many(script, calls)

    def send(self, script: Script, keys: tuple, args: tuple, on_reply: Callable[[Any], Any] | None) -> None:
        """``script`` on the master of its keys, its reply read later and handed to ``on_reply``:
        by this thread's next call on that master's link, or by ``flush``."""
        self.link.send(script, keys, args, on_reply)

    def flush(self) -> None:
        """Hand this thread's unread replies to their ``on_reply`` now, before it blocks or takes
        its next message. On a single Redis a script does all that follows from it itself, so
        nothing waits on a reply: they are read with the thread's next call."""

    def effects(self, commands: list[tuple]) -> None:
        """Send ``commands`` (each naming its one key first), unawaited (see ``Link.send_commands``)."""
        if commands:
            self.link.send_commands(commands, self._again)

    def _again(self, command: tuple) -> None:
        self.client.execute_command(*command)

    def count(self, counts: list[tuple[str, str, int]]) -> None:
        """Add each ``(hash, field, n)`` to its counter (``HINCRBY``)."""
        self.effects([("HINCRBY", name, field, n) for name, field, n in counts])

    def idle(self) -> None:
        self.link.idle()


class ClusterSlots(Slots):
    """A Redis Cluster: a link per master, found by each key's slot."""

    single = False

    def __init__(self, client: redis.RedisCluster, scripts: list[Script], busy_poll: float) -> None:
        self.client = client
        self.scripts = scripts
        self.busy_poll = busy_poll
        self._links: dict[str, Link] = {}
        self._lock = threading.Lock()
        self.green = green_sockets()
        self._counts: Counter[tuple[str, str]] = Counter()
        self._counting_pid: int | None = None
        #: Per thread: the links holding replies that an ``on_reply`` waits for.
        self._unflushed = threading.local()
        #: slot -> the link to its master, as last found: forgotten whenever a link falls back
        #: to the cluster's client (a MOVED, a master gone), which then refreshes its slot map.
        self._slot_links: dict[int, Link] = {}
        atexit.register(self._send_last_counts)

    def slot(self, name: str) -> int:
        return key_slot(name.encode())

    def link_for(self, name: str) -> Link:
        slot = key_slot(name.encode())
        link = self._slot_links.get(slot)
        if link is None:  # asking the cluster's client costs several microseconds a key
            link = self._slot_links[slot] = self._link_of(self.client.nodes_manager.get_node_from_slot(slot))
        return link

    def _link_of(self, node: Any) -> Link:
        link = self._links.get(node.name)
        if link is None:
            with self._lock:
                link = self._links.get(node.name)
                if link is None:
                    master = self.client.get_redis_connection(node)
                    link = Link(master, self.scripts, self.busy_poll, fallback=self.client,
                                on_fallback=self._slot_links.clear)  # fmt: skip
                    self._links[node.name] = link
        return link

    def call_many(self, script: Script, calls: Iterable[tuple[tuple, tuple]]) -> list[Any]:
        calls = list(calls)
        by_link: dict[int, tuple[Link, list[int]]] = {}
        for i, (keys, _) in enumerate(calls):
            link = self.link_for(keys[0])
            by_link.setdefault(id(link), (link, []))[1].append(i)
        replies: list[Any] = [None] * len(calls)
        for link, indexes in by_link.values():
            for i, reply in zip(indexes, link.call_many(script, [calls[i] for i in indexes])):
                replies[i] = reply
        self.flush()  # the replies unread on other masters' links have long arrived, as a rule
        return replies

    def send(self, script: Script, keys: tuple, args: tuple, on_reply: Callable[[Any], Any] | None) -> None:
        link = self.link_for(keys[0])
        link.send(script, keys, args, on_reply)
        unflushed = self._unflushed.__dict__.setdefault("links", {})
        unflushed[id(link)] = link

    def flush(self) -> None:
        """Here a completion's reply names the mailboxes to wake (``StateStore._notify``): read,
        and acted on, with the thread's next submit (its round trip carries the reply, as a
        rule), and at the latest before the thread blocks, before a wait hands control back to
        its caller's code (``Wait.run``), after a message's run, or as the thread pauses."""
        unflushed = self._unflushed.__dict__.pop("links", None)
        for link in (unflushed or {}).values():
            link.flush()

    def effects(self, commands: list[tuple]) -> None:
        by_link: dict[int, tuple[Link, list[tuple]]] = {}
        for command in commands:
            link = self.link_for(command[1])
            by_link.setdefault(id(link), (link, []))[1].append(command)
        for link, mine in by_link.values():
            link.send_commands(mine, self._again)

    def count(self, counts: list[tuple[str, str, int]]) -> None:
        """Sum the counts in this process, for its counting thread to send."""
        with self._lock:
            if self._counting_pid != os.getpid():  # a forked child inherits no thread: start its own
                self._counting_pid = os.getpid()
                threading.Thread(target=self._keep_counting, name="girder-counts", daemon=True).start()
            for name, field, n in counts:
                self._counts[(name, field)] += n

    def _keep_counting(self) -> None:
        pid = os.getpid()
        while self._counting_pid == pid:
            time.sleep(COUNT_EVERY)
            try:
                self._send_counts()
            except Exception:  # counts are reports: the next round sends what comes next
                logger.warning("girder: could not send the per-task counts", exc_info=True)

    def _send_last_counts(self) -> None:
        try:
            self._send_counts()
        except Exception:  # the cluster may be gone first (a test's): counts are reports
            logger.debug("girder: could not send the last per-task counts", exc_info=True)

    def _send_counts(self) -> None:
        with self._lock:
            counts, self._counts = self._counts, Counter()
        if counts:
            self.effects([("HINCRBY", name, field, n) for (name, field), n in counts.items()])

    def idle(self) -> None:
        self.flush()
        self._send_counts()
        for link in list(self._links.values()):
            link.idle()


def slots_of(client: redis.Redis | redis.RedisCluster, scripts: list[Script], busy_poll: float) -> Slots:
    """The slots of ``client``'s store: one, or a cluster's."""
    if isinstance(client, redis.RedisCluster):
        return ClusterSlots(client, scripts, busy_poll)
    return Slots(client, scripts, busy_poll)
