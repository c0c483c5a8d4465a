"""Waking a completion's waiters on a Redis Cluster, off the executor's path (invariant 4).

On a Redis Cluster a completion's reply names the mailboxes to wake, which are in other slots
(``StateStore._notify``). An executor must not await that reply (an inline run would cost two
round trips instead of one), nor leave it unread until its own next call (a waiter on another
node would then wait for whatever the executor's task does next, up to a check interval). So a
process sends its completions to each master over a connection of their own, shared by its
threads, and a reader thread reads the replies as they land, in order, and wakes the waiters:
write, then notify, neither on the executor's path.

A reply that is an error (``NOSCRIPT``, a ``MOVED``) or a connection that breaks makes the call
again through the cluster's client. Completing a settled request is a no-op that names nobody,
so a wake-up whose reply was lost is left to the waiters' next check: late, never lost. The
reader survives any error. A forked child starts a connection and a reader of its own. At exit a
process waits a bounded while for the replies still to come (``drain``).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import redis
from redis.commands.core import Script

from .errors import STORE_UNREACHABLE
from .link import pack

__all__ = ["Notifier"]

logger = logging.getLogger(__name__)

#: Seconds the reader rides out an unreachable master to make a call again.
RETRY_FOR = 30.0
#: A call sent: the connection it went on, how to make it again, what its reply is for.
_Sent = tuple[Any, Callable[[], Any], Callable[[Any], Any]]


class Notifier:
    """Calls to one master whose replies a reader thread of this process reads and hands on.

    Args:
        client: the master's client, whose pool lends the connection.
        scripts: the scripts called, loaded on the master before the first call on a connection.
        fallback: the cluster's client, whose own path makes a call again.
        on_fallback: called whenever a call goes the fallback's way (the slots may have moved).
        on_idle: called in the reader once no reply is due: it confirms what the replies' hand-ons
            sent (the wake-ups), which this thread, making no call of its own after them, would
            otherwise never learn were lost on a broken connection.
    """

    def __init__(
        self,
        client: redis.Redis,
        scripts: list[Script],
        fallback: Any,
        on_fallback: Callable[[], Any],
        on_idle: Callable[[], Any],
    ) -> None:
        self.client = client
        self.scripts = scripts
        self.fallback = fallback
        self.on_fallback = on_fallback
        self.on_idle = on_idle
        self._forked()
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: (n := ref()) is not None and n._forked())

    def _forked(self) -> None:
        """A fresh state: at first, and in a forked child (the parent's socket and reader are
        not the child's)."""
        self._lock = threading.Condition()
        self._sent: collections.deque[_Sent] = collections.deque()
        #: Calls sent whose reply is not handed on yet (``drain`` waits for none).
        self._unfinished = 0
        self._connection: Any = None
        self._reader: threading.Thread | None = None

    def send(self, script: Script, keys: tuple, args: tuple, on_reply: Callable[[Any], Any]) -> bool:
        """Run ``script``; the reader hands its reply to ``on_reply``. False if it could not be
        sent (the master unreachable): the caller makes it its own way."""
        again = functools.partial(script, keys, args, client=self.fallback)
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        with self._lock:
            try:
                connection = self._connected()
                connection.send_packed_command(pack(connection, command), check_health=False)
            except (*STORE_UNREACHABLE, OSError):
                self._drop(self._connection)
                return False
            self._sent.append((connection, again, on_reply))
            self._unfinished += 1
            self._lock.notify_all()
            return True

    def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until every reply sent for has been handed on."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._unfinished and (left := deadline - time.monotonic()) > 0:
                self._lock.wait(left)
            return not self._unfinished

    # -- internals ---------------------------------------------------------------------------

    def _connected(self) -> Any:
        if self._reader is None:
            self._reader = threading.Thread(target=self._read, name="girder-notifier", daemon=True)
            self._reader.start()
        if self._connection is None:
            for known in self.scripts:  # a reply read later must not be NOSCRIPT, as a rule
                self.client.script_load(known.script)
            self._connection = self.client.connection_pool.get_connection()
        return self._connection

    def _read(self) -> None:
        while True:
            with self._lock:
                idle = not self._sent
            if idle:
                self._hand_on(lambda _: self.on_idle(), None)
            with self._lock:
                while not self._sent:
                    self._lock.wait()
                connection, again, on_reply = self._sent[0]
            try:
                reply = connection.read_response()
            except redis.exceptions.ResponseError as exc:
                reply = exc  # the call failed as a whole: made again below
            except Exception:  # a broken connection: whatever went on it is made again
                self._broken(connection)
                continue
            with self._lock:
                self._sent.popleft()
            if isinstance(reply, redis.exceptions.ResponseError):
                logger.debug("girder: a completion's reply was an error (%s); calling again", reply)
                self.on_fallback()
                self._made_again(again, on_reply)
            else:
                self._hand_on(on_reply, reply)
            self._finished(1)

    def _broken(self, connection: Any) -> None:
        with self._lock:
            self._drop(connection)
            lost = [sent for sent in self._sent if sent[0] is connection]
            self._sent = collections.deque(sent for sent in self._sent if sent[0] is not connection)
        for _, again, on_reply in lost:
            self._made_again(again, on_reply)
        self._finished(len(lost))

    def _drop(self, connection: Any) -> None:
        """Called holding the lock: the next send takes a fresh connection. Only the current
        connection is given back, once (a connection given back twice could be lent twice)."""
        if connection is None or connection is not self._connection:
            return
        self._connection = None
        self.on_fallback()
        with contextlib.suppress(Exception):
            connection.disconnect()
            self.client.connection_pool.release(connection)

    def _finished(self, n: int) -> None:
        with self._lock:
            self._unfinished -= n
            self._lock.notify_all()

    def _made_again(self, again: Callable[[], Any], on_reply: Callable[[Any], Any]) -> None:
        """Make a call again through the cluster's client, riding out an outage (a failover)
        for up to ``RETRY_FOR`` seconds: a completion that never lands leaves its request to its
        lease, and a rerun."""
        deadline = time.monotonic() + RETRY_FOR
        while True:
            try:
                reply = again()
            except STORE_UNREACHABLE:
                if time.monotonic() < deadline:
                    time.sleep(0.5)
                    continue
                logger.warning("girder: could not make a completion; it is left to its lease", exc_info=True)
                return
            except Exception:
                logger.warning("girder: a completion failed; it is left to its lease", exc_info=True)
                return
            self._hand_on(on_reply, reply)
            return

    @staticmethod
    def _hand_on(on_reply: Callable[[Any], Any], reply: Any) -> None:
        try:
            on_reply(reply)
        except Exception:  # a wake-up not sent is late, never lost (the waiters' next check)
            logger.warning("girder: could not wake a completion's waiters", exc_info=True)
