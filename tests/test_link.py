"""The hot-path link to the state store (``girder_celery/link.py``), on the private redis-server:
a completion wakes its waiters before its reply is read, unread replies never answer the wrong
call, and a forgotten script, a killed connection or an ended thread loses nothing.
"""

from __future__ import annotations

import gc
import json
import select
import signal
import subprocess
import sys
import threading
import time
import uuid
from typing import Any
from unittest.mock import ANY

import pytest
import redis
from celery import Celery

from girder_celery import Girder
from girder_celery.link import Link, _await_reply
from girder_celery.store import StateStore
from girder_celery.testing import RedisServer
from tests.harness import wait_until


@pytest.fixture
def store(redis_server):
    s = StateStore(redis_server.client(db=3), prefix=f"ln-{uuid.uuid4().hex[:8]}")
    yield s
    for name in s.client.scan_iter(f"{s.prefix}:*"):
        s.client.delete(name)


def new_key() -> str:
    return uuid.uuid4().hex + uuid.uuid4().hex


def running(store: StateStore, owner: str = "n1/1/a") -> tuple[str, str]:
    """A request submitted with a waiter's mailbox and claimed by ``owner``: (key, mailbox)."""
    key, mailbox = new_key(), store.mailbox_key(uuid.uuid4().hex)
    store.submit([(key, "[[1],{}]", "t.f", "t.f(1)", "")], mailbox, 3_600_000)
    assert store.claim(key, owner, "n1", 3_600_000)[0] == "claimed"
    return key, mailbox


@pytest.mark.invariant4
def test_a_completion_wakes_its_waiters_before_its_reply_is_read(store):
    """An unawaited completion stores the value and wakes its waiter before its reply is read (invariant 4)."""
    key, mailbox = running(store)
    store.complete_unawaited(key, "n1/1/a", '{"v": 1}', 0)
    woken = store.client.blpop([mailbox], timeout=5)  # another connection; nothing read on ours
    assert woken is not None, "the waiter was not woken"
    assert woken[1].startswith(f"done:{key}:")
    assert store.record(key)["state"] == "done"


def test_the_next_call_reads_the_unread_replies_and_gets_its_own(store):
    """The next call reads the replies left unread, and gets its own reply, not an earlier one's."""
    first, _ = running(store)
    second, _ = running(store)
    store.complete_unawaited(first, "n1/1/a", "1", 0)
    store.complete_unawaited(second, "n1/1/a", "2", 0)
    verdict, data, _ = store.claim(new_key(), "n1/1/b", "n1", 1000)
    assert (verdict, data) == ("absent", "")
    assert [store.record(k)["state"] for k in (first, second)] == ["done", "done"]


def test_a_script_redis_forgot_is_loaded_again_even_for_an_unread_completion(store):
    """A script Redis forgot is loaded again, even for a completion whose reply was not read yet."""
    key, _ = running(store)
    store.client.script_flush()
    store.complete_unawaited(key, "n1/1/a", '"late"', 0)  # NOSCRIPT, read below
    other = new_key()
    (outcome,) = store.submit([(other, "[[2],{}]", "t.f", "t.f(2)", "")], "", 3_600_000)
    assert outcome.verdict == "offer"
    assert store.record(key)["state"] == "done"
    assert json.loads(store.record(key)["value"]) == "late"


@pytest.mark.invariant4
def test_a_killed_connection_falls_back_and_sends_its_unconfirmed_completion_again(store):
    """A killed connection's unconfirmed completion is sent again: the value is stored and the waiter woken."""
    key, mailbox = running(store)
    store.claim(new_key(), "n1/1/a", "n1", 1000)  # this thread now holds its connection
    host, port = store.link._local.held.connection._sock.getsockname()[:2]
    store.client.execute_command("CLIENT", "KILL", "ADDR", f"{host}:{port}")
    store.complete_unawaited(key, "n1/1/a", "3", 0)
    assert store.claim(new_key(), "n1/1/a", "n1", 1000)[0] == "absent"
    assert store.record(key)["state"] == "done"
    assert store.client.blpop([mailbox], timeout=5) is not None


def _killed(client: redis.Redis, connection: Any) -> None:
    """Kill ``connection`` from the server's side and wait until its end of file has reached it."""
    host, port = connection._sock.getsockname()[:2]
    client.execute_command("CLIENT", "KILL", "ADDR", f"{host}:{port}")
    wait_until(lambda: select.select([connection._sock], [], [], 0)[0], 5, "the killed connection's end of file")


def test_an_unawaited_completion_on_a_connection_the_server_closed_lands_without_a_later_call(store):
    """A completion sent on the thread's connection after the server closed it (here CLIENT
    KILL; an idle ``timeout`` alike) lands at once, through the client's path: nothing is lost
    until a next call on the link, which an executor waiting for its next message never makes."""
    key, mailbox = running(store)
    store.claim(new_key(), "n1/1/a", "n1", 1000)  # this thread now holds its connection, nothing unread
    _killed(store.client, store.link._local.held.connection)
    store.complete_unawaited(key, "n1/1/a", "3", 0)
    assert store.client.blpop([mailbox], timeout=2) is not None, "the waiter was not woken"
    assert store.record(key)["state"] == "done"


def test_sent_commands_after_the_server_closed_the_connection_land_without_a_later_call(store):
    """Commands sent unawaited (a mirror's copy, a cluster's wake-up) after replies of earlier
    sends, on a connection the server closed since, are made through ``again`` at once."""
    link = Link(store.client, [])
    name = f"{store.prefix}:box"

    def again(command: tuple) -> None:
        store.client.execute_command(*command)

    link.send_commands([("RPUSH", name, "first")], again)  # its reply is left unread
    _killed(store.client, link._local.held.connection)
    link.send_commands([("RPUSH", name, "second")], again)
    assert store.client.lrange(name, 0, -1) == ["first", "second"]
    link.idle()


def test_threads_give_their_connection_back_when_they_end(store):
    """Threads that end give their connection back to the pool."""
    before = _connections(store)

    def one_call() -> None:
        store.claim(new_key(), "n1/1/a", "n1", 1000)

    for _ in range(20):
        thread = threading.Thread(target=one_call)
        thread.start()
        thread.join(10)
        gc.collect()
    assert _connections(store) - before <= 2, "each thread kept a connection of its own"


def _connections(store: StateStore) -> int:
    return sum(1 for c in store.client.client_list() if c.get("db") == "3")


def test_a_batch_is_one_send_and_a_script_error_leaves_the_connection_in_step(store):
    """A batch goes out in one send, and a script error in it leaves the connection's replies in step."""
    keys = [new_key() for _ in range(5)]
    outcomes = store.submit([(k, "[[1],{}]", "t.f", "t.f(1)", "") for k in keys], "", 3_600_000)
    assert [o.verdict for o in outcomes] == ["offer"] * 5
    renew = store._scripts["renew"]
    with pytest.raises(redis.exceptions.ResponseError):  # a lease of "x" ms: the script errors
        store.link.call_many(renew, [((store.record_key(k), store.edges_key(k)), ("x", "o", 1)) for k in keys[:3]])
    # Every reply of the failed batch was read: the next call gets its own.
    assert store.claim(keys[0], "n1/1/a", "n1", 1000)[0] == "claimed"


class _Interrupt(Exception):
    pass


def _interrupt(signum, frame):
    raise _Interrupt()


def test_an_exception_between_a_send_and_its_reply_leaves_no_reply_for_the_next_call(redis_server):
    """A signal's exception (an inline time limit's) raised while a call spins for its reply drops
    the connection: the next call gets its own reply, and an unconfirmed completion is made again."""
    store = StateStore(redis_server.client(db=3), prefix=f"ln-{uuid.uuid4().hex[:8]}", busy_poll=5.0)
    key, mailbox = running(store)
    store.complete_unawaited(key, "n1/1/a", "4", 0)
    slow = store.client.register_script("local n = 0 for i = 1, 100000000 do n = n + 1 end return 'slow'")
    store.client.script_load(slow.script)
    previous = signal.signal(signal.SIGALRM, _interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)  # lands in the spin: the script runs for longer
        with pytest.raises(_Interrupt):
            store.link.call(slow, (), ())
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert store.claim(new_key(), "n1/1/b", "n1", 1000) == ("absent", "", 0)
    assert store.record(key)["state"] == "done"
    assert store.client.blpop([mailbox], timeout=5) is not None


def test_pausing_with_the_store_gone_logs_and_gives_the_connection_back(caplog):
    """A thread pausing after its completion could not be confirmed does not raise: its
    request is left to its lease and its waiters (the store is the one that went away)."""
    server = RedisServer().start()
    try:
        store = StateStore(server.client(), prefix="gone")
        confirmed, _ = running(store)
        store.complete_unawaited(confirmed, "n1/1/a", "1", 0)  # loads the scripts, as a worker's first completion does
        store.idle()
        key, _ = running(store)
        # Frozen first, so no reply to the completion can reach our socket before it dies.
        server.proc.send_signal(signal.SIGSTOP)
        store.complete_unawaited(key, "n1/1/a", "1", 0)
        server.stop()
        store.idle()
        assert "could not confirm a completion" in caplog.text
        assert getattr(store.link._local, "held", None) is None
    finally:
        server.close()


def test_a_completion_the_store_could_not_take_is_made_at_the_threads_next_call():
    """A completion sent as the store goes away (a failover, a restart) is kept, not dropped: the
    thread's calls while the store is away fail (their callers ride that out), and its first call
    once the store is back makes the completion first, so the request is done rather than left
    to its lease and run again."""
    server = RedisServer().start()
    try:
        store = StateStore(server.client(), prefix="owed")
        key, _ = running(store)
        store.claim(new_key(), "n1/1/a", "n1", 1000)  # this thread holds a connection
        server.stop()
        store.complete_unawaited(key, "n1/1/a", '"kept"', 0)  # does not raise: the run is over
        with pytest.raises(redis.ConnectionError):
            store.claim(new_key(), "n1/1/a", "n1", 1000)
        assert store.link._local.held.owed  # kept for the next call
        server.start()  # empty: the completion writes the record afresh
        assert store.claim(new_key(), "n1/1/a", "n1", 1000)[0] == "absent"
        assert (store.record(key)["state"], store.record(key)["value"]) == ("done", '"kept"')
        assert not store.link._local.held.owed
    finally:
        server.close()


def test_the_first_completion_after_the_store_restarted_empty_lands_at_once():
    """A thread that loaded the scripts, then met the store restarted empty (its next call broke
    and fell back), loads them again before its next send: the completion it sends then runs at
    once, instead of failing as an unknown script and waiting for the thread's next call."""
    server = RedisServer().start()
    try:
        store = StateStore(server.client(), prefix="restart")
        confirmed, _ = running(store)
        store.complete_unawaited(confirmed, "n1/1/a", "1", 0)  # loads the scripts
        key, _ = running(store)
        server.stop()
        server.start()  # empty: no records, no scripts
        assert store.claim(new_key(), "n1/1/a", "n1", 1000)[0] == "absent"  # broke, fell back
        store.complete_unawaited(key, "n1/1/a", '"landed"', 0)  # writes the record afresh
        # Read on another connection, with no further call of this thread to make it again.
        wait_until(lambda: store.record(key).get("state") == "done", 5, "the completion to land")
        assert store.record(key)["value"] == '"landed"'
    finally:
        server.close()


def test_a_call_spins_at_most_its_busy_poll_then_sleeps_until_the_reply():
    """A reply slower than ``busy_poll`` is still read, and the wait past the spin is asleep."""
    server = RedisServer().start()
    try:
        store = StateStore(server.client(), prefix="spin", busy_poll=0.02)
        key, _ = running(store)
        server.proc.send_signal(signal.SIGSTOP)
        thaw = threading.Timer(0.5, server.proc.send_signal, (signal.SIGCONT,))
        thaw.start()
        wall, cpu = time.perf_counter(), time.thread_time()
        assert store.claim(key, "n2/1/a", "n2", 1000)[0] == "running"  # n1 holds it
        wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
        thaw.join()
        assert wall >= 0.4, "the reply came before the server was thawed"
        assert cpu < 0.25, f"the caller spun {cpu:.3f} s of a {wall:.3f} s wait"
    finally:
        server.close()


def test_green_sockets_turn_busy_polling_off():
    """Under gevent's monkey-patching the link turns busy polling off; otherwise it keeps it."""
    code = (
        "from gevent import monkey; monkey.patch_all()\n"
        "import redis\n"
        "from girder_celery.store import StateStore\n"
        "print(StateStore(redis.Redis(), busy_poll=0.001).link.busy_poll)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "0.0"
    plain = StateStore(redis.Redis(), busy_poll=0.001)
    assert plain.link.busy_poll == 0.001


def test_sent_commands_do_not_pile_up_unread_and_a_failed_one_is_made_again(store):
    """The next send reads the replies of earlier ones, and a failed command is handed to again()."""
    link = Link(store.client, [])
    made_again: list[tuple] = []
    name = f"{store.prefix}:counter"
    store.client.set(name, "not a number")
    link.send_commands([("INCR", name), ("GET", name)], made_again.append)
    link.send_commands([("SET", name, "1")], made_again.append)  # reads the two replies first
    assert made_again == [("INCR", name)], "the error reply was not handed to again()"
    assert len(link._local.held.unread) == 1, "replies of earlier sends were left unread"
    link.idle()
    assert store.client.get(name) == "1"
    assert getattr(link._local, "held", None) is None


def mirroring(redis_server, backend_db: int) -> tuple[Celery, Girder, Any]:
    """An app whose Redis result backend is ``backend_db``, its Girder, and a task to mirror."""
    app = Celery(f"mirror-{backend_db}", broker="memory://", backend=redis_server.url(backend_db), set_as_current=False)
    girder = Girder(app, url=redis_server.url(3))

    @girder.task(name=f"mirror_{backend_db}.inc")
    def inc(x):
        return x + 1

    return app, girder, inc


def test_a_mirrored_copy_is_sent_without_awaiting_the_backend(redis_server):
    """The mirror's write goes out at flush (a subscriber hears its publication) though no
    reply has been read; the thread's release reads it and gives the connection back."""
    app, girder, inc = mirroring(redis_server, 4)
    mirror, runner = girder.runtime.mirror, girder.runtime.runner
    key = uuid.uuid4().hex
    listener = redis_server.client(4).pubsub()
    listener.subscribe(app.backend.get_key_for_task(key))
    assert listener.get_message(timeout=5)["type"] == "subscribe"
    mirror.put(inc, key, 2, "2", None)
    mirror.flush()
    message = listener.get_message(timeout=5)
    assert message is not None and json.loads(message["data"])["result"] == 2
    assert [target.link._local.held.unread for target in mirror._targets().values()] == [[ANY, ANY]]
    assert app.AsyncResult(key).get(timeout=5) == 2
    runner.release_thread()
    assert all(getattr(target.link._local, "held", None) is None for target in mirror._targets().values())
    listener.close()


def test_threads_that_mirror_and_end_leave_no_connection_behind(redis_server):
    """Celery's backends are per thread, as are their clients: a thread that ends (an inline
    hop, say) takes its mirror link with it rather than leaving a connection open."""
    _, girder, inc = mirroring(redis_server, 5)
    mirror, runner = girder.runtime.mirror, girder.runtime.runner
    monitor = redis_server.client()

    def connections() -> int:
        return sum(1 for c in monitor.client_list() if c.get("db") == "5")

    def hop(i: int) -> None:
        mirror.put(inc, uuid.uuid4().hex, i, str(i), None)
        runner.release_thread()

    before = connections()
    for i in range(20):
        thread = threading.Thread(target=hop, args=(i,))
        thread.start()
        thread.join(10)
    gc.collect()
    assert connections() - before <= 2, "threads that ended left their mirror connections open"


def test_a_reply_already_buffered_ends_the_spin_at_once(redis_server):
    """Reading an unread reply can bring the next one along into the parser's buffer, where the
    socket no longer shows it: the spin must see it there rather than spin its whole budget."""
    client = redis_server.client()
    connection = client.connection_pool.get_connection()
    try:
        connection.send_packed_command(connection.pack_commands([("PING",), ("PING",)]))
        deadline = time.monotonic() + 5
        while not connection.can_read(0) and time.monotonic() < deadline:
            pass
        # Redis answers the two in one write, so this read buffers the second reply too.
        assert connection.read_response() in ("PONG", b"PONG")
        started = time.perf_counter()
        _await_reply(connection, 2.0)
        assert time.perf_counter() - started < 0.5, "the spin did not see the buffered reply"
        assert connection.read_response() in ("PONG", b"PONG")
    finally:
        client.connection_pool.release(connection)
