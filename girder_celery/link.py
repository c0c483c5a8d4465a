"""A thread's own link to a Redis server, for the calls on the hot path (invariant 4).

The submit of a sub-request, the claim of an offer and the completion of a request run once per
request, so they go through a connection each thread (or greenlet) holds, called by SHA with
little of redis-py's per-command machinery. A completion's reply is not awaited: the script
runs as soon as Redis reads it, which is when waiters are told, and the executor has nothing to
learn from the reply, so it is read with the thread's next call. A request that runs inline
thus costs one round trip (its submit, carrying the previous completion's reply) instead of two.
The copies ``mirror.py`` writes to a Redis result backend go the same way, over a link of their
own: sent at once, their replies read by the thread's next write or pause.

Anything unusual falls back to the client's own path, which reconnects, retries and reloads
scripts: a connection error, a script Redis forgot (``NOSCRIPT``), or an unread reply that
turns out to be an error (the call is made again: completing a settled request is a no-op).
An exception raised into a call between its send and its reply (a time limit's signal) drops
the connection the same way, so no later call reads a reply that is not its own. A call whose
reply is not awaited first reads the replies still unread and then looks whether the server has
closed the connection since (``CLIENT KILL``, its idle ``timeout``): a closed connection would
take the call without a word, and its loss would be found only at the thread's next call, which
an executor waiting for its next message does not make, so the call goes the client's way. A
thread gives its connection back to the client's pool before it hops or ends; one that blocks
or takes its next message keeps it, and its unread replies, until its next call. (Should an
operator flush Redis's scripts meanwhile, that call makes the completion again; a thread that
never calls again leaves its request to its lease, which expires, and the request is rerun.)
A call the client cannot make again either, the store being unreachable (a restart, a Sentinel
failover), is owed: made before anything else the thread sends once the store is back, so a
completion sent as the store went away still lands. A broken connection is given back to the
pool and the next call takes another, which the pool connects as the client's path does (behind
Sentinel, to the master the sentinels name now). On a Redis Cluster each master has a link of its
own (``slots.py``), and its client's path is the cluster client's: a call its master answers
``MOVED`` or ``ASK`` (a failover, a resharding), or ``TRYAGAIN``/``CLUSTERDOWN``, did not run, and
is made again there alone, which follows the redirection and refreshes the slot map.

A thread awaiting a reply spins on the socket for up to ``girder_busy_poll`` seconds before it
sleeps in ``recv``: on virtual machines, waking a sleeping thread when the reply lands can cost
more than the round trip itself (about 70 against 20 microseconds on loopback here). Not done
where sockets are green (gevent, eventlet): there a spin would hold up every other greenlet.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import redis
from redis.commands.core import Script

try:
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # redis-py then packs in Python
    _hiredis_pack = None

from .errors import STORE_UNREACHABLE

__all__ = ["Link", "green_sockets"]

logger = logging.getLogger(__name__)

_FALL_BACK = (*STORE_UNREACHABLE, redis.exceptions.NoScriptError, OSError)
#: A cluster node's answer to a call it did not run: the call is made again through the cluster's
#: client, which follows it.
_REDIRECTED = (redis.exceptions.AskError, redis.exceptions.TryAgainError, redis.exceptions.ClusterDownError)
#: Most script calls ``call_many`` sends before reading their replies: a submit of 100,000
#: requests packed at once held about 2 KB per request in commands and replies (issue 12).
CALL_CHUNK = 1000


#: A call whose reply is not awaited: the way to make it again through the client's own path,
#: and what is to be done with its reply, if anything (``Link.send``'s ``on_reply``).
_Unawaited = tuple[Callable[[], Any], Callable[[Any], Any] | None]


class _Held:
    """One thread's connection, the calls whose replies it has not read yet, the calls it owes:
    those the client could not make again either, the store being unreachable (a failover,
    say), and the replies read but not yet handed to their ``on_reply``."""

    def __init__(self, pool: redis.ConnectionPool) -> None:
        self.pool = pool
        self.pid = os.getpid()
        self.unread: list[_Unawaited] = []
        self.owed: list[_Unawaited] = []
        self.replies: list[tuple[Callable[[Any], Any], Any]] = []
        self.connection = None

    def give_back(self) -> None:
        connection, self.connection = self.connection, None
        if connection is None or self.pid != os.getpid():
            return  # never connected, or a forked child's copy: the parent owns the socket
        if self.unread:
            connection.disconnect()  # never hand on a connection with replies in flight
        with contextlib.suppress(Exception):  # the pool may be gone with the interpreter
            self.pool.release(connection)

    def __del__(self) -> None:  # a thread that ended without idling first
        self.give_back()


class Link:
    """Calls over a connection held per thread, with replies that can wait.

    Args:
        client: the Redis client whose connection pool lends the connections.
        scripts: the scripts sent unawaited, loaded before the first such send.
        busy_poll: seconds to spin for an awaited reply before sleeping (0: never).
        unconfirmed: what a reply that cannot be read leaves unconfirmed, for the log.
        fallback: the client whose own path makes a call again (default ``client``; on a
            Redis Cluster, the cluster's client, ``client`` being one master's).
        on_fallback: called whenever a call goes the fallback's way (on a Redis Cluster, the
            slots may have moved: ``slots.py`` forgets which master it thought held each).
    """

    def __init__(
        self,
        client: redis.Redis,
        scripts: list[Script],
        busy_poll: float = 0.0,
        unconfirmed: str = "a completion; the state store is unreachable",
        fallback: Any = None,
        on_fallback: Callable[[], Any] | None = None,
    ) -> None:
        self.client = client
        self.fallback = client if fallback is None else fallback
        self.on_fallback = on_fallback
        self.scripts = scripts
        #: Whether this process's sockets are green (gevent, eventlet).
        self.green = green_sockets()
        self.busy_poll = 0.0 if self.green else busy_poll
        self.unconfirmed = unconfirmed
        self._local = threading.local()
        # Whether Redis is known to hold the scripts: a reply that is not read at once must not
        # be NOSCRIPT, so they are loaded before the first such call, after Redis forgot, and
        # when a thread's connection reaches another server than the one they were loaded on
        # (``_scripts_on``): a master Sentinel promoted holds none of them.
        self._loaded = False
        self._scripts_on: tuple | None = None

    def call(self, script: Script, keys: tuple, args: tuple) -> Any:
        """Run ``script`` and return its reply (after reading any replies left unread)."""
        return self.call_many(script, [(keys, args)])[0]

    def call_many(self, script: Script, calls: Iterable[tuple[tuple, tuple]]) -> list[Any]:
        """Run ``script`` once per ``(keys, args)``, sent together: one round trip per
        ``CALL_CHUNK`` calls, taken from ``calls`` as they go, so a wide submit never holds
        all its commands at once."""
        replies: list[Any] = []
        calls = iter(calls)
        while chunk := list(itertools.islice(calls, CALL_CHUNK)):
            replies += self._call_chunk(script, chunk)
        for reply in replies:
            if isinstance(reply, redis.exceptions.ResponseError):
                raise reply  # a script's error, raised once every reply has been read
        return replies

    def _redirected(self, script: Script, call: tuple[tuple, tuple], reply: Any) -> Any:
        """``reply``, or, if a cluster node did not run the call (``MOVED``, ...), the reply of
        the call made again through the cluster's client."""
        if isinstance(reply, _REDIRECTED):
            if self.on_fallback is not None:
                self.on_fallback()
            return script(*call, client=self.fallback)
        return reply

    def _call_chunk(self, script: Script, calls: list[tuple[tuple, tuple]]) -> list[Any]:
        held = self._held()
        try:
            if held.connection is None or held.owed:
                self._ready(held)
            packed = [chunk for keys, args in calls for chunk in self._pack(held, script, keys, args)]
            _send(held, packed)
            self._read_unread(held)
            if self.busy_poll:
                _await_reply(held.connection, self.busy_poll)
            replies = [self._redirected(script, call, self._read_one(held)) for call in calls]
        except _FALL_BACK:
            self._reset(held)
            replies = [script(keys, args, client=self.fallback) for keys, args in calls]
        except BaseException:
            self._interrupted(held)
            raise
        self._deliver(held)
        return replies

    def _read_one(self, held: _Held) -> Any:
        try:
            return held.connection.read_response()
        except redis.exceptions.NoScriptError:
            self._loaded = False  # Redis forgot its scripts: reload before the next send
            raise  # and every call of this batch failed alike
        except redis.exceptions.ResponseError as exc:
            return exc

    def send(self, script: Script, keys: tuple, args: tuple, on_reply: Callable[[Any], Any] | None = None) -> None:
        """Run ``script`` without waiting for its reply; the thread's next call on this link reads
        it, or ``flush``, and hands it to ``on_reply``, if given (after that call's own reply is
        read, so ``on_reply`` may send on this link)."""
        held = self._held()
        again = functools.partial(script, keys, args, client=self.fallback), on_reply
        try:
            self._ready_to_send(held)
            if not self._loaded:
                for known in self.scripts:
                    self.client.script_load(known.script)
                self._loaded, self._scripts_on = True, _server_of(held.connection)
            _send(held, self._pack(held, script, keys, args))
        except _FALL_BACK:
            self._owe(held, again)
        except BaseException:
            self._interrupted(held, again)
            raise
        else:
            held.unread.append(again)
        self._deliver(held)

    def send_commands(self, commands: list[tuple], again: Callable[[tuple], Any]) -> None:
        """Send ``commands`` together without waiting for their replies, reading first the
        replies of this thread's earlier sends (long arrived, as a rule), so none pile up.
        ``again(command)`` makes one through the client's path if its reply is an error or
        the connection breaks before the reply is read."""
        held = self._held()
        calls = [(functools.partial(again, c), None) for c in commands]
        try:
            self._ready_to_send(held)
            _send(held, [chunk for command in commands for chunk in _pack(held, command)])
        except _FALL_BACK:
            self._owe(held, *calls)
        except BaseException:
            self._interrupted(held, *calls)
            raise
        else:
            held.unread.extend(calls)
        self._deliver(held)

    def flush(self) -> None:
        """Read the replies this thread left unread, and hand them to their ``on_reply``, now
        (a Redis Cluster's completion names the waiters to wake in its reply, ``slots.py``);
        the thread keeps its connection."""
        held = getattr(self._local, "held", None)
        if held is None or held.pid != os.getpid() or not (held.unread or held.owed or held.replies):
            return  # nothing left, or a forked child's copy: the parent reads its own replies
        self._read_all(held, self._owe)

    def idle(self) -> None:
        """This thread is about to hop or end: read the replies it left unread and give its
        connection back to the pool, so only threads at work hold one (a 2,000-deep chain of
        inline runs hops through hundreds of threads that each wait for the next)."""
        held = getattr(self._local, "held", None)
        if held is None:
            return
        self._local.held = None
        try:
            self._read_all(held, self._reset)
        except STORE_UNREACHABLE:
            # Not raised at a thread's pause: a completion that never ran leaves its request
            # to its lease, which expires, and to its waiters, who offer it again.
            logger.warning("girder: could not confirm %s", self.unconfirmed, exc_info=True)
        finally:
            held.give_back()

    # -- internals ---------------------------------------------------------------------------

    def _read_all(self, held: _Held, broken: Callable[[_Held], Any]) -> None:
        """Make what ``held`` owes, read every reply it left unread, hand them on; a connection
        that breaks meanwhile goes to ``broken`` (``_owe``, or ``_reset``, which raises if the
        store is unreachable)."""
        try:
            self._make_again(held, [])
            self._read_unread(held)
        except _FALL_BACK:
            broken(held)
        self._deliver(held)

    def _held(self) -> _Held:
        held = getattr(self._local, "held", None)
        if held is None or held.pid != os.getpid():
            held = self._local.held = _Held(self.client.connection_pool)
        return held

    def _ready(self, held: _Held) -> None:
        """Make what this thread owes, then take a connection if it has none (new, or dropped
        by ``_reset``)."""
        self._make_again(held, [])
        if held.connection is None:
            held.connection = held.pool.get_connection()
            if _server_of(held.connection) != self._scripts_on:
                self._loaded = False

    def _ready_to_send(self, held: _Held) -> None:
        """``_ready``, for a call whose reply is not awaited: a connection the server closed
        while nothing was in flight on it (``CLIENT KILL``, its idle ``timeout``, a restart)
        would take the call without a word and lose it, found out only at the thread's next
        call on this link, which an executor waiting for its next message may not make: a
        waiter woken through it then slept until its periodic check. Found closed, it raises
        as a broken one does, and the call goes the client's way at once."""
        fresh = held.connection is None  # the pool looked at it as it lent it
        if fresh or held.owed:
            self._ready(held)
        self._read_unread(held)  # sent earlier, long arrived as a rule: after them, nothing is due
        if not fresh and _closed(held.connection):
            raise redis.exceptions.ConnectionError("the server closed this thread's connection to it")

    @staticmethod
    def _pack(held: _Held, script: Script, keys: tuple, args: tuple) -> Any:
        return _pack(held, ("EVALSHA", script.sha, len(keys), *keys, *args))

    def _read_unread(self, held: _Held) -> None:
        while held.unread:
            again, on_reply = held.unread[0]
            try:
                reply = held.connection.read_response()
            except redis.exceptions.ResponseError as exc:
                # The call failed as a whole (NOSCRIPT after a restart, say): the client's
                # path runs it again, loading the script if need be.
                logger.debug("girder: an unread reply was an error (%s); calling again", exc)
                self._loaded = False
                reply = again()
            held.unread.pop(0)
            if on_reply is not None:
                held.replies.append((on_reply, reply))

    @staticmethod
    def _deliver(held: _Held) -> None:
        """Hand each reply read to its ``on_reply``, once nothing is in flight on this thread's
        connection but calls in ``unread`` (an ``on_reply`` may send on it)."""
        while held.replies:
            on_reply, reply = held.replies.pop(0)
            on_reply(reply)

    def _interrupted(self, held: _Held, *unsent: _Unawaited) -> None:
        """An exception cut this thread's exchange short (a time limit's signal, raised between
        a send and its reply): a reply may be left on the socket, where the next call would take
        it for its own. The connection is dropped, and what it left unconfirmed (with ``unsent``,
        calls that may not have gone out) is made again through the client: each is idempotent
        (completing a settled request is a no-op). One that fails too is left to its lease."""
        held.unread.extend(unsent)
        with contextlib.suppress(Exception):
            self._reset(held)

    def _reset(self, held: _Held, *more: _Unawaited) -> None:
        """Drop a broken connection; whatever it had not confirmed (and ``more``) is made again
        (``_make_again``). The thread's next call takes a connection from the pool, which
        connects it as the client's own path does: behind Sentinel, to the master the sentinels
        name now (a connection reconnecting by itself would go back to the address it had, a
        dead or demoted master's)."""
        unread, held.unread = held.unread, []
        if self.on_fallback is not None:
            self.on_fallback()
        if held.connection is not None:
            held.connection.disconnect()
            held.give_back()
        # The server may have restarted, its scripts gone with it: the next send loads them
        # first, or its reply (NOSCRIPT) would only be read, and the call made, at the thread's
        # next call, which an idle node may not make before the request's lease expires.
        self._loaded = False
        self._make_again(held, [*unread, *more])

    @staticmethod
    def _make_again(held: _Held, calls: list[_Unawaited]) -> None:
        """Make what ``held`` owes, then ``calls``, in order, through the client's path. Those it
        cannot make now, the store being unreachable, stay owed, to be made before the thread's
        next call (a completion sent as a failover begins lands on the new master, instead of
        being left to its lease), and the error is raised."""
        calls, held.owed = [*held.owed, *calls], []
        for i, (again, on_reply) in enumerate(calls):
            try:
                reply = again()
            except STORE_UNREACHABLE:
                held.owed = calls[i:]
                raise
            if on_reply is not None:
                held.replies.append((on_reply, reply))

    def _owe(self, held: _Held, *calls: _Unawaited) -> None:
        """``_reset``, for calls whose replies nobody awaits: owed, not raised, if the store is
        unreachable."""
        try:
            self._reset(held, *calls)
        except STORE_UNREACHABLE:
            logger.info("girder: the state store is unreachable; %d call(s) owed to it", len(held.owed))


def _closed(connection: Any) -> bool:
    """Whether the server has closed ``connection``, on which no reply is awaited: then
    anything it can read (its end of file, as a rule) says so; a poll that returns at once."""
    try:
        return bool(connection.can_read(0))
    except (redis.exceptions.ConnectionError, OSError):
        return True


def _server_of(connection: Any) -> tuple:
    """Where ``connection`` is connected: behind Sentinel, the master it found."""
    return getattr(connection, "host", None), getattr(connection, "port", None), getattr(connection, "path", None)


def _pack(held: _Held, command: tuple) -> list:
    if _hiredis_pack is not None:  # what redis-py's packer calls, minus its per-argument checks
        return [_hiredis_pack(command)]
    return held.connection.pack_command(*command)


def _send(held: _Held, chunks: list) -> None:
    # One write for the whole batch: redis-py writes each chunk with a system call of its own,
    # and Redis then may read and run the batch piecemeal.
    held.connection.send_packed_command([b"".join(chunks)] if len(chunks) > 1 else chunks, check_health=False)


def _await_reply(connection: Any, seconds: float) -> None:
    """Spin until a reply can be read from ``connection``, for at most ``seconds``: redis-py's
    ``can_read`` looks at what its parser has buffered (the replies read just before may have
    brought this one along) and then at the socket."""
    deadline = time.perf_counter() + seconds
    while not connection.can_read(0) and time.perf_counter() < deadline:
        pass


def green_sockets() -> bool:
    """Whether gevent or eventlet has patched the socket module of this process."""
    gevent = sys.modules.get("gevent.monkey")
    if gevent is not None and gevent.is_module_patched("socket"):
        return True
    eventlet = sys.modules.get("eventlet.patcher")
    return eventlet is not None and eventlet.is_monkey_patched("socket")
