"""An offer taken while the state store is unreachable is not lost (issue 11, hole 1).

The broker lets go of a girder message as a node takes it (early acks), and the store still
records the request as queued and freshly offered. Before the fix, a node whose claim failed
dropped the message and waiters got "queued" until ``girder_reoffer_after`` (300 s). Now the
node rides out the outage and claims when the store returns, and a waiter that rode out an
outage offers again what is still queued, for the node that could not.

The store and the broker are separate servers here, so the store can go down (and come back
with its data, from a snapshot) while the broker carries on.
"""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import Future

import pytest

from girder_celery.testing import RedisServer
from tests.harness import Grid, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.invariant1]

#: Seconds from the store's return to the answer that pass: a claim retry or a waiter's check
#: (every 0.5 s here) and the run, with room for a loaded machine; girder_reoffer_after is 300 s.
RECOVERY_BOUND = 10.0


@pytest.fixture
def outage_grid(broker):
    """A grid whose state store is a server of its own (``grid.store_server``), apart from the
    broker, result backend and ready lists, with a short lease and check interval."""
    bus, store = RedisServer().start(), RedisServer().start()
    grid = Grid(bus, broker, lease=1.0, check=0.5)
    grid.env["GIRDER_TEST_STORE"] = store.url(0)
    grid.load_app()
    grid.store_server = store
    yield grid
    grid.kill()
    grid.close()
    store.close()
    bus.close()


def in_thread(call, *args) -> Future:
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(call(*args))
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, daemon=True).start()
    return future


def take_store_down_holding(grid: Grid, node, tag: str):
    """Keep ``node`` busy, queue ``add(x, 1)`` behind it, snapshot the store and stop it, and
    wait until the node has taken the offer while the store is down. Returns the key, ``x``,
    the future of the waiting caller, and the future of the caller that kept the node busy."""
    m = grid.app_module
    busy = in_thread(m.girder.request, m.slow.s(1.5, tag), 30)
    wait_until(lambda: m.girder.state(m.slow.s(1.5, tag))["state"] == "running", 10, "the node to be busy")
    x = uuid.uuid4().int % 10**9
    waiter = in_thread(m.girder.request, m.add.s(x, 1), 30)
    key = m.add.key(x, 1)
    wait_until(lambda: m.girder.state(key)["state"] == "queued", 10, "the request to be queued")
    store = grid.store_server
    store.client().save()  # comes back with the request queued and freshly offered
    store.stop()
    wait_until(lambda: f"cannot claim grid.add[{key}]" in node.output(), 15, "the node to take the offer")
    return key, x, waiter, busy


def test_a_node_holding_an_offer_rides_out_the_outage_and_runs_it(outage_grid):
    """The node that took the offer claims it once the store is back, and the caller is answered."""
    node, tag = outage_grid.worker("w1", "solo", 1), uuid.uuid4().hex[:8]
    key, x, waiter, busy = take_store_down_holding(outage_grid, node, tag)
    outage_grid.store_server.start()
    back = time.monotonic()
    assert waiter.result(RECOVERY_BOUND + 5) == x + 1
    assert time.monotonic() - back < RECOVERY_BOUND
    assert outage_grid.app_module.girder.state(key)["node"] == node.hostname
    assert busy.result(RECOVERY_BOUND + 5)["tag"] == tag  # its completion met the outage: it ran again


def test_a_waiter_offers_again_what_a_node_dropped_in_the_outage(outage_grid):
    """A node that dies holding the offer takes it along; the waiter, back from the outage,
    offers the request again at once instead of after girder_reoffer_after."""
    grid = outage_grid
    node, tag = grid.worker("w1", "solo", 1), uuid.uuid4().hex[:8]
    key, x, waiter, busy = take_store_down_holding(grid, node, tag)
    node.kill()  # the broker has let go of the message: only the waiter can offer it again
    grid.store_server.start()
    back = time.monotonic()
    other = grid.worker("w2", "solo", 1)
    assert waiter.result(RECOVERY_BOUND + 15) == x + 1
    assert time.monotonic() - back < RECOVERY_BOUND + 10  # the new node's start is in it
    assert grid.app_module.girder.state(key)["node"] == other.hostname
    assert busy.result(RECOVERY_BOUND + 5)["tag"] == tag
