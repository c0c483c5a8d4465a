"""Hostile and malformed broker messages (issue 11, holes 2 and 3), on real workers and both brokers.

Each message is published straight to the grid's queue with kombu, as anyone who can write to the
broker could: valid JSON of the wrong shape, undecodable bytes, pickle, bad headers, arguments
nested too deep, and arguments that disagree with the message's girder key. After each one the
node must be alive and answer a normal request (invariant 1: a message is only an offer), and no
key may ever answer another key's value, in the state store or in Celery's result backend.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from kombu import Connection

from girder_celery.keys import MAX_DEPTH
from tests.core_support import broker_url, record, runs, wait_state
from tests.harness import wait_until

pytestmark = pytest.mark.faults

JSON = "application/json"


def num() -> int:
    return uuid.uuid4().int % 10**12


def publish(grid, body, task_id: str, *, task: str = "grid.add", content_type: str = JSON, **headers) -> None:
    """Publish ``body`` (bytes, or a value sent as JSON text) as a task message to the grid's queue."""
    if not isinstance(body, bytes):
        body = json.dumps(body).encode()
    message_headers = {"lang": "py", "task": task, "id": task_id, "root_id": task_id, "parent_id": None}
    message_headers.update(headers)
    with Connection(broker_url(grid), connect_timeout=5) as conn:
        conn.Producer().publish(
            body, exchange="", routing_key=grid.queue, headers=message_headers,
            content_type=content_type, content_encoding="binary" if content_type != JSON else "utf-8",
        )  # fmt: skip


def well_formed(args, kwargs=None) -> list:
    return [list(args), kwargs or {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]


def node_log(grid) -> str:
    """The node's log so far; fails at once if the node died."""
    assert grid.node.proc.poll() is None, f"the node died:\n{grid.node.output()[-5000:]}"
    return grid.node.output()


def refused(grid, task_id: str) -> str:
    """The worker's log line refusing the malformed message ``task_id``, once it is written."""
    marker = f"girder: refused message {task_id!r}"
    return wait_until(
        lambda: next((ln for ln in node_log(grid).splitlines() if marker in ln), None),
        10,
        f"the worker to refuse message {task_id}",
    )


def handled(grid, task_id: str, name: str = "grid.add") -> str:
    """Wait until the worker has handled message ``task_id`` (run, ignored or failed); its log."""
    done = re.compile(rf"Task {re.escape(name)}\[{re.escape(task_id)}\] (succeeded|ignored|raised)")
    return wait_until(
        lambda: done.search(out := node_log(grid)) and out,
        10,
        f"the worker to handle message {task_id}",
    )


def assert_serving(grid) -> None:
    """The node is alive and answers a fresh request."""
    assert grid.node.proc.poll() is None, grid.node.output()[-5000:]
    x = num()
    assert grid.app_module.girder.request(grid.app_module.add.s(x, 1), timeout=15) == x + 1


class Evil:
    """Unpickling this creates ``path``: the proof that a pickle body was never unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


#: Bodies of valid JSON but the wrong shape, each with the reason the log must give.
WRONG_SHAPES = {
    "a list of one": ([1], "its body is not [args, kwargs, embed] but a list of length 1"),
    "a string": ("a string", "its body is not [args, kwargs, embed] but a str"),
    "a dict": ({"a": 1}, "its body is not [args, kwargs, embed] but a dict"),
    "null": (None, "its body is not [args, kwargs, embed] but null"),
    "a number": (7, "its body is not [args, kwargs, embed] but an int"),
    "args not a list": (["abc", {}, {}], "its args are not a list but a str"),
    "kwargs not a dict": ([[], [1], {}], "its kwargs are not a dict"),
    "embed not a dict": ([[1], {}, 5], "its embed (callbacks, errbacks, chain, chord) is not a dict"),
    "embed overriding the id": ([[1], {}, {"id": "other"}], "its embed has a key 'id'"),
    "callbacks not a list": ([[1], {}, {"callbacks": "x"}], "its embed's callbacks is not a list"),
}


@pytest.mark.invariant1
@pytest.mark.parametrize("with_key", [False, True], ids=["uuid-id", "key-id"])
def test_wrong_shaped_json_bodies_are_refused_and_the_node_goes_on(live, with_key):
    """Valid JSON of the wrong shape for a girder task is rejected and logged with its id and
    why, and the node goes on serving after each (Celery alone stops the worker)."""
    m = live.app_module
    for name, (body, why) in WRONG_SHAPES.items():
        task_id = m.add.key(num(), 1) if with_key else str(uuid.uuid4())
        publish(live, body, task_id)
        line = refused(live, task_id)
        assert why in line, (name, line)
        assert_serving(live)
        assert m.app.AsyncResult(task_id).state == "PENDING"  # nothing stored under the id


@pytest.mark.invariant1
@pytest.mark.parametrize(
    "headers, why",
    [
        ({"id": None}, "its id is not a non-empty string but null"),
        ({"id": ["x"]}, "its id is not a non-empty string but a list"),
        ({"timelimit": "ab"}, "its timelimit is not [soft, hard] seconds"),
        ({"timelimit": [1, 2, 3]}, "its timelimit is not [soft, hard] seconds"),
    ],
    ids=["no-id", "list-id", "str-timelimit", "long-timelimit"],
)
def test_bad_headers_are_refused_and_the_node_goes_on(live, headers, why):
    """A well-formed body under a missing id or a bad time limit is refused; the node goes on."""
    x = num()
    publish(live, well_formed([x, 1]), "placeholder", **headers)
    shown = headers.get("id", "placeholder")
    assert why in refused(live, shown)
    assert_serving(live)
    assert runs(live, "grid.add", live.app_module.add.key(x, 1)) == 0


@pytest.mark.invariant1
@pytest.mark.invariant7
def test_undecodable_and_pickle_bodies_are_refused_never_unpickled(live, tmp_path):
    """Bytes that are not JSON, a pickle body, an unknown content type and raw bytes (which kombu
    trusts as application/data) are rejected and logged;
    the pickle is never unpickled (invariant 7) and the node goes on serving after each."""
    m = live.app_module
    proof = tmp_path / "unpickled"
    bodies = [
        (b"\xff\xfe{not json", JSON, "its body cannot be decoded (application/json)"),
        (pickle.dumps(Evil(str(proof))), "application/x-python-serialize", "ContentDisallowed"),
        (b"\x00\x01", "application/x-made-up", "ContentDisallowed"),
        (b"raw bytes", "application/data", "its body is not [args, kwargs, embed] but a bytes of length 9"),
        (b"", JSON, "its body is not [args, kwargs, embed] but a"),  # bytes or str, by transport
    ]
    for body, content_type, why in bodies:
        task_id = m.add.key(num(), 1)
        publish(live, body, task_id, content_type=content_type)
        assert why in refused(live, task_id)
        assert_serving(live)
    assert not proof.exists()


@pytest.mark.invariant1
def test_arguments_nested_too_deep_in_a_message_never_stop_the_node(live):
    """A message whose args nest deeper than MAX_DEPTH is refused under a key id (nothing stored)
    and fails with the depth TypeError under the sender's own id; the node goes on."""
    m = live.app_module
    deep: object = 1
    for _ in range(MAX_DEPTH + 50):
        deep = [deep]
    key = m.add.key(num(), 1)
    publish(live, well_formed([deep, 1]), key)
    log = handled(live, key)
    assert m.app.AsyncResult(key).state == "PENDING"
    assert f"refusing message {key} of grid.add: its arguments are refused" in log
    own_id = str(uuid.uuid4())
    publish(live, well_formed([deep, 1]), own_id)
    result = m.app.AsyncResult(own_id)
    with pytest.raises(TypeError, match=f"deeper than {MAX_DEPTH} levels"):
        result.get(timeout=10)
    assert_serving(live)


#: An argument far larger than any message girder's tests send otherwise (8 MiB of text).
OVERSIZED = 8 * 1024 * 1024


@pytest.mark.invariant1
def test_oversized_arguments_are_answered_and_never_stop_the_node(live):
    """An 8 MiB argument, requested as usual and published straight to the broker under a key it
    does not match: the request is answered exactly, once; the hostile copy runs and stores nothing."""
    m = live.app_module
    big = f"{uuid.uuid4().hex}:" + "x" * OVERSIZED
    key = m.echo.key(big)
    assert m.girder.request(m.echo.s(big), timeout=60) == [[big], {}]
    assert runs(live, "grid.echo", key) == 1
    forged = m.add.key(num(), 1)
    publish(live, well_formed([big, 1]), forged)
    assert f"refusing message {forged} of grid.add" in handled(live, forged)
    assert m.app.AsyncResult(forged).state == "PENDING"
    assert record(live, forged) == {}
    assert_serving(live)


@pytest.mark.invariant1
def test_a_message_whose_args_disagree_with_its_key_never_poisons_that_key(live):
    """A message with id add.key(x, 1) but args (x + 1000, 1) runs nothing and stores nothing under
    the key; the key answers only its own value, in the store and in the result backend."""
    m = live.app_module
    x = num()
    key, other = m.add.key(x, 1), m.add.key(x + 1000, 1)
    publish(live, well_formed([x + 1000, 1]), key)
    log = handled(live, key)
    result = m.app.AsyncResult(key)
    assert result.state == "PENDING" and result.result is None  # never x + 1001
    assert f"refusing message {key} of grid.add: its id is not the key of its arguments" in log
    assert record(live, key) == {} and record(live, other) == {}
    assert runs(live, "grid.add", other) == 0
    assert m.girder.request(m.add.s(x, 1), timeout=10) == x + 1
    assert result.get(timeout=10) == x + 1  # its own value, mirrored
    assert m.girder.state(m.add.s(x + 1000, 1))["state"] == "absent"


@pytest.mark.invariant1
def test_a_forged_copy_of_a_queued_request_runs_the_stores_payload(live):
    """While the key's request is queued, a copy with other arguments runs the store's payload:
    the waiter gets the key's own value, and so does AsyncResult(key)."""
    m = live.app_module
    x = num()
    request = m.add.prepare((x, 1))
    m.girder.runtime.offers.submit([request], mailbox="", offer=False)  # queued, its offer lost
    publish(live, well_formed([x + 1000, 1]), request.key)
    wait_state(live, request.key, "done")
    assert m.girder.request(m.add.s(x, 1), timeout=10) == x + 1
    assert runs(live, "grid.add", m.add.key(x + 1000, 1)) == 0
    assert m.app.AsyncResult(request.key).get(timeout=10) == x + 1


def test_send_task_with_an_id_of_its_own_answers_under_that_id(live):
    """A plain send_task (a fresh uuid, no girder on the client) runs the request under its own key
    and gets its answer under the message id: the id is an alias of the key."""
    m = live.app_module
    x = num()
    result = m.app.send_task("grid.add", (x, 2))
    assert result.get(timeout=10) == x + 2
    assert m.girder.state(m.add.s(x, 2))["state"] == "done"
    assert m.girder.request(m.add.s(x, 2), timeout=5) == x + 2
    assert runs(live, "grid.add", m.add.key(x, 2)) == 1  # once, under its key
    assert runs(live, "grid.add", result.id) == 0


@pytest.mark.invariant1
def test_a_message_of_a_lost_record_runs_under_its_own_key(live):
    """A message whose id is its arguments' key, with no record in the store (lost, expired), runs."""
    m = live.app_module
    x = num()
    key = m.add.key(x, 3)
    m.app.send_task("grid.add", (x, 3), task_id=key)
    assert m.app.AsyncResult(key).get(timeout=10) == x + 3
    assert record(live, key)["state"] == "done"


@pytest.mark.invariant1
def test_a_malformed_copy_of_a_queued_request_is_offered_again_at_the_next_check(make_grid):
    """A malformed message carrying a queued request's key withdraws its offer: the waiter offers
    it again at its next check (0.5 s here), not after girder_reoffer_after (300 s)."""
    g = make_grid(check=0.5)
    g.node = g.worker("n1", "solo", 1)
    m = g.app_module
    x = num()
    request = m.add.prepare((x, 1))
    m.girder.runtime.offers.submit([request], mailbox="", offer=False)  # queued, as if offered
    with ThreadPoolExecutor(1) as pool:
        waiter = pool.submit(m.girder.request, m.add.s(x, 1), 20)
        wait_until(lambda: record(g, request.key).get("offers") == "1", 5, "the request to be queued")
        publish(g, [1], request.key)
        refused(g, request.key)
        assert waiter.result(timeout=5) == x + 1
    assert record(g, request.key)["offers"] == "2"
    assert runs(g, "grid.add", request.key) == 1
    assert_serving(g)


@pytest.mark.invariant1
def test_a_malformed_message_of_a_plain_task_never_stops_a_girder_node(live):
    """A girder node refuses a wrong-shaped message of a plain Celery task too (stock Celery
    would stop), and its well-formed messages run as before."""
    m = live.app_module
    for body in ([1], "a string", {"a": 1}):
        task_id = str(uuid.uuid4())
        publish(live, body, task_id, task="grid.plain_add")
        assert "its body is not [args, kwargs, embed]" in refused(live, task_id)
        assert_serving(live)
    task_id = str(uuid.uuid4())
    publish(live, well_formed([2, 3]), task_id, task="grid.plain_add")
    assert m.app.AsyncResult(task_id).get(timeout=10) == 5
    publish(live, [[2, 3], {}, {"stamped": "yes"}], task_id + "-extra", task="grid.plain_add")
    assert m.app.AsyncResult(task_id + "-extra").get(timeout=10) == 5  # girder's embed rule is not applied


@pytest.mark.invariant1
def test_malformed_protocol_1_and_hybrid_bodies_are_refused_too(live):
    """A protocol 1 body (no task header) or Celery's hybrid form (a protocol 1 body under protocol 2
    headers) with args that are not a list is refused; the node goes on serving."""
    m = live.app_module
    proto1_id, hybrid_id = m.add.key(num(), 1), str(uuid.uuid4())
    body = json.dumps({"task": "grid.add", "id": proto1_id, "args": "abc", "kwargs": {}}).encode()
    with Connection(broker_url(live), connect_timeout=5) as conn:
        conn.Producer().publish(
            body, exchange="", routing_key=live.queue, headers={}, content_type=JSON, content_encoding="utf-8"
        )
    assert "its args are not a list but a str" in refused(live, proto1_id)
    assert_serving(live)
    publish(live, {"args": [1], "kwargs": [2]}, hybrid_id)
    assert "its kwargs are not a dict" in refused(live, hybrid_id)
    assert_serving(live)
