"""Kombu's event loop (the hub) runs a callback queued by another queued callback at once.

Celery queues a message's ack on the hub; a solo worker running messages from a queued read
queues acks that way, and the hub then polled for up to 10 s before sending them (on RabbitMQ,
with the prefetch window held by the unsent acks, nothing else ended that poll). Girder's worker
step installs a tick hook that wakes the poll instead. This drives a real kombu ``Hub``; the last
test, a real worker, which its step wakes as a shutdown is asked for.
"""

from __future__ import annotations

import socket
import time

from kombu.asynchronous import Hub

from girder_celery.hub import wake_hub_for_queued_callbacks, wake_hub_when_requests_end


def run_until(hub: Hub, done, bound: float) -> None:
    """Turn the hub's loop until ``done()``, for at most ``bound`` seconds."""
    loop = hub.create_loop()
    started = time.monotonic()
    while not done() and time.monotonic() - started < bound:
        next(loop)


def test_a_callback_queued_by_a_queued_callback_runs_without_waiting_out_the_poll():
    """A callback queued by a queued callback runs at once, not after the hub's poll."""
    hub = Hub()
    quiet, _peer = socket.socketpair()
    hub.add_reader(quiet, lambda: None)  # a reader that never fires: the hub polls
    hub.call_later(60, lambda: None)  # a far timer: the poll may last its longest, 10 s
    assert wake_hub_for_queued_callbacks(hub)
    queued, ran = [], []
    hub.call_soon(lambda: queued.append(time.monotonic()) or hub.call_soon(lambda: ran.append(time.monotonic())))
    try:
        run_until(hub, lambda: ran, bound=15)
        assert queued and ran, "the callbacks never ran"
        waited = ran[0] - queued[0]
        assert waited < 0.5, f"the queued callback waited {waited:.1f} s for the poll"
    finally:
        hub.close()
        quiet.close()
        _peer.close()


def test_an_idle_hub_still_sleeps_in_its_poll():
    """The hook wakes the loop only while callbacks are queued: an idle worker does not spin."""
    hub = Hub()
    quiet, _peer = socket.socketpair()
    hub.add_reader(quiet, lambda: None)
    assert wake_hub_for_queued_callbacks(hub)
    turns = []
    hub.call_later(0.5, turns.append, "timer")
    try:
        loop = hub.create_loop()
        started = time.monotonic()
        iterations = 0
        while not turns and time.monotonic() - started < 5:
            next(loop)
            iterations += 1
        assert turns == ["timer"], "the timer never fired"
        assert iterations < 10, f"the idle loop turned {iterations} times in half a second"
    finally:
        hub.close()
        quiet.close()
        _peer.close()


def test_a_request_ending_on_a_pool_thread_wakes_the_loop():
    """With ``worker_disable_prefetch`` the loop fetches only as it turns with an executor free.

    Under ``-P threads`` a request ends on a pool thread; without a wake the loop slept out its
    poll (up to its next timer) before fetching again, about a second per message on Redis.
    """
    from celery.concurrency.thread import TaskPool

    hub = Hub()
    quiet, _peer = socket.socketpair()
    hub.add_reader(quiet, lambda: None)
    hub.call_later(5, lambda: None)  # the poll may last until this timer
    pool = TaskPool(limit=1)
    pool.start()
    wake_hub_when_requests_end(pool, hub)
    ended = []
    try:
        loop = hub.create_loop()
        pool.apply_async(time.sleep, (0.2,), callback=lambda result: ended.append(time.monotonic()))
        next(loop)  # one turn: it polls until something wakes it
        turned = time.monotonic()
        assert ended, "the loop turned before the request ended (nothing to wait for?)"
        assert turned - ended[0] < 0.5, f"the loop slept {turned - ended[0]:.1f} s after the request ended"
    finally:
        pool.stop()
        hub.close()
        quiet.close()
        _peer.close()


def test_an_idle_worker_stops_at_once_on_a_warm_shutdown(grid):
    """SIGTERM to an idle worker stops it well within the hub's longest poll (10 s), on either
    broker: one signalled as it is ready (before its loop's first poll, or during it), and one
    signalled a couple of seconds into its poll. On RabbitMQ nothing else ended that poll: such
    nodes took 9.4-9.7 s."""
    polling = grid.worker("w1", "solo", 1)
    just_ready = grid.worker("w2", "solo", 1)
    for worker in (just_ready, polling):
        started = time.monotonic()
        worker.terminate()
        worker.proc.wait(30)
        stopped = time.monotonic() - started
        assert stopped < 4, f"the warm shutdown took {stopped:.1f} s; its log ends:\n{worker.output(lines=20)}"
