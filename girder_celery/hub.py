"""Event-loop hooks: keep kombu's hub from sleeping on work a girder node has just made ready.

Three wakers the worker bootstep installs. Without them a node takes its next message late: acks
a task queued from the loop's own thread wait out the loop's poll (up to 10 s on RabbitMQ), and
under ``-P threads`` with ``worker_disable_prefetch`` an executor that fell free is not asked
for a message until the loop turns (about 1 s on Redis); and an idle node asked to shut down
stops only once its poll ends (up to 10 s on RabbitMQ).
"""

from __future__ import annotations

from typing import Any

from celery import signals

__all__ = ["wake_hub_at_shutdown", "wake_hub_for_queued_callbacks", "wake_hub_when_requests_end"]


def wake_hub_for_queued_callbacks(hub: Any) -> bool:
    """Make kombu's event loop poll without waiting while callbacks are queued for it.

    The hub runs its queued callbacks first and then polls for up to 10 s (its longest timer
    delay). A callback queued during that first phase, from the same thread, waits out the
    poll: a solo worker that runs the messages of one read chain queues each message's ack that
    way, and on RabbitMQ, with the prefetch window held by those unsent acks, no frame arrives
    to end the poll, so the next message waits up to 10 s (seen with stock Celery too). The
    tick hook runs just before the poll, so queued work wakes the loop as another thread would.
    """
    if not all(hasattr(hub, name) for name in ("on_tick", "_ready", "_ready_lock", "_waker", "_wake_pending")):
        return False

    def wake_if_ready() -> None:
        if not hub._ready:
            return
        with hub._ready_lock:
            if hub._wake_pending or hub._waker is None:
                return
            hub._wake_pending = True
        hub._waker.wake()

    hub.on_tick.add(wake_if_ready)
    return True


def wake_hub_when_requests_end(pool: Any, hub: Any) -> None:
    """Turn kombu's event loop as each request the pool ran ends, so a free executor fetches.

    With ``worker_disable_prefetch`` (a Redis broker) the loop asks for the next message only
    while an executor is free, and it asks as it turns. Under ``-P threads`` a request ends on
    a pool thread while the loop sleeps in its poll for up to its longest timer delay (about a
    second here), so each message waited that long: prefork's result pipe and solo's own thread
    wake the loop, a thread pool does not. Queueing a no-op from the ending thread wakes it.
    """
    apply_async = pool.apply_async

    def noop() -> None:
        pass

    def apply_and_wake(target: Any, args: Any = None, kwargs: Any = None, callback: Any = None, **options: Any) -> Any:
        def settle(result: Any) -> Any:
            try:
                return callback(result) if callback is not None else None
            finally:
                hub.call_soon(noop)

        return apply_async(target, args, kwargs, callback=settle, **options)

    pool.apply_async = apply_and_wake


def wake_hub_at_shutdown(hub: Any, hostname: str) -> bool:
    """Wake kombu's event loop as worker ``hostname`` is asked to shut down, so it stops at once.

    Celery's handler of SIGTERM (and SIGINT, SIGQUIT) only sets a flag, which the loop reads as it
    turns; an idle loop turns when its poll ends, up to its longest timer delay, 10 s (on RabbitMQ
    nothing else ends it, so a warm shutdown of an idle node took that long, stock Celery's too).
    The handler sends ``worker_shutting_down`` just before it sets the flag. Its receiver writes to
    the hub's waker, a socket, without a lock (it runs in a signal handler, on the loop's own
    thread, which may hold the hub's lock), so a poll under way ends as the handler returns. A
    signal that lands before the loop's first poll (RabbitMQ's first QoS round trip comes after
    the loop's first check of the flag) finds no waker yet: the next tick, just before that poll,
    wakes it instead, once. False for a hub without a waker or tick hooks.
    """
    if not (hasattr(hub, "_waker") and hasattr(hub, "on_tick")):
        return False
    asked: list[bool] = []

    def wake() -> None:
        waker = hub._waker
        if waker is not None:
            waker.wake()

    def on_shutting_down(sender: Any = None, **_: Any) -> None:
        if sender == hostname:
            asked.append(True)
            wake()

    def on_tick() -> None:
        if asked:
            asked.clear()
            wake()

    hub.on_tick.add(on_tick)
    signals.worker_shutting_down.connect(on_shutting_down, weak=False)
    return True
