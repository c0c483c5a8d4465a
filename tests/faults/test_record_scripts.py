"""Corrupt state records, script by script, on the private redis-server (issue 11, hole 4).

A script meeting a record girder never writes answers ``corrupt`` (or leaves it, or replaces it
with the key's own outcome) instead of raising a bare Lua error, and changes nothing else; one
corrupt key in a batch never stops the others. ``Outcome`` turns what does not decode into a
``GirderError`` naming the key.
"""

from __future__ import annotations

import logging
import uuid

import pytest

from girder_celery import GirderError
from girder_celery.errors import CORRUPT
from girder_celery.store import MAILBOX_TTL_MS, Outcome, StateStore, Verdict

pytestmark = pytest.mark.faults

HOUR = 3_600_000


@pytest.fixture
def store(redis_server):
    s = StateStore(redis_server.client(), prefix=f"rs-{uuid.uuid4().hex[:8]}")
    yield s
    for name in s.client.scan_iter(f"{s.prefix}:*"):
        s.client.delete(name)


def new_key() -> str:
    return uuid.uuid4().hex + uuid.uuid4().hex


def submit(store: StateStore, key: str, mailbox: str = "", requester: str = "", pool: str = "q") -> Outcome:
    return store.submit([(key, "[[1],{}]", "t.f", "t.f(1)", pool)], mailbox, HOUR, requester, HOUR)[0]


#: name -> how to plant it on the record's key, and what ``submit`` says is wrong.
PLANTED = {
    "a string": (lambda c, rk: c.set(rk, "x"), "its key holds a string, not a hash"),
    "a set": (lambda c, rk: c.sadd(rk, "x"), "its key holds a set, not a hash"),
    "lease not a number": (
        lambda c, rk: c.hset(rk, mapping={"state": "running", "lease_until": "soon"}),
        "it is running, and its lease_until is not a number: soon",
    ),
    "no lease": (lambda c, rk: c.hset(rk, mapping={"state": "running"}), "its lease_until is not a number: none"),
    "offered_at not a number": (
        lambda c, rk: c.hset(rk, mapping={"state": "queued", "offered_at": "x", "payload": "[[],{}]"}),
        "it is queued, and its offered_at is not a number: x",
    ),
    "unknown state": (lambda c, rk: c.hset(rk, mapping={"state": "paused"}), "its state is unknown: paused"),
}


def plant(store: StateStore, case: str) -> tuple[str, str, bytes]:
    """A key with corruption ``case`` planted on its record: key, record key, the record's DUMP."""
    key = new_key()
    record_key = store.record_key(key)
    PLANTED[case][0](store.client, record_key)
    return key, record_key, store.client.dump(record_key)


@pytest.mark.parametrize("case", list(PLANTED))
def test_submit_and_claim_answer_corrupt_and_change_nothing(store, case):
    """submit and claim (of what it reads) of a corrupt record answer corrupt, saying what is
    wrong, and leave the record, the waiters and the requester's edges as they were."""
    key, record_key, before = plant(store, case)
    requester, mailbox = new_key(), store.mailbox_key("m")
    outcome = submit(store, key, mailbox, requester)
    assert outcome.verdict is Verdict.CORRUPT and PLANTED[case][1] in outcome.data
    if case != "offered_at not a number":  # claim reads no offered_at: it may take that one
        verdict, data, _ = store.claim(key, "n/1/a", "n", HOUR, "q")
        assert verdict is Verdict.CORRUPT and data
        assert store.claim_first([key], "n/1/a", "n", HOUR) == (None, "")
    assert store.client.dump(record_key) == before
    assert not store.client.exists(store.waiters_key(key), store.edges_key(requester))


@pytest.mark.parametrize("case", list(PLANTED))
def test_forget_drops_a_corrupt_record_and_the_next_submit_offers_it(store, case):
    """forget drops a corrupt record (answering corrupt); the next submit starts it afresh."""
    key, record_key, _ = plant(store, case)
    assert store.forget(key) is Verdict.CORRUPT
    assert not store.client.exists(record_key)
    assert submit(store, key).verdict is Verdict.OFFER


def test_forget_still_leaves_sound_requests_in_flight(store):
    """forget leaves a queued and a running record whose numbers are numbers alone."""
    queued, running = new_key(), new_key()
    submit(store, queued)
    submit(store, running)
    assert store.claim(running, "n/1/a", "n", HOUR)[0] is Verdict.CLAIMED
    assert (store.forget(queued), store.forget(running)) == (Verdict.QUEUED, Verdict.RUNNING)
    assert store.record(queued)["state"] == "queued" and store.record(running)["state"] == "running"


def test_complete_replaces_a_record_that_is_not_a_hash_with_the_value(store):
    """complete writes the key's own value over a key that is not a hash, and wakes nobody wrongly."""
    key, _, _ = plant(store, "a string")
    assert store.complete(key, "n/1/a", "7", 0) is True
    assert submit(store, key).data == "7"


def test_fail_replaces_a_record_that_is_not_a_hash_unless_only_if_queued(store):
    """fail writes the error over a key that is not a hash, except a fail only-if-queued, which
    leaves it (and answers nothing stored)."""
    key, record_key, before = plant(store, "a string")
    assert store.fail(key, "", '{"message": "m"}', False, HOUR, only_if_queued=True) is False
    assert store.client.dump(record_key) == before
    assert store.fail(key, "n/1/a", '{"message": "m"}', True, HOUR) is True
    assert store.record(key)["state"] == "failed"


def test_renew_loses_a_corrupt_lease_and_renews_the_others(store):
    """One key of a renewal that is not a hash is answered lost; the others are renewed."""
    good, (bad, _, _) = new_key(), plant(store, "a string")
    submit(store, good)
    assert store.claim(good, "n/1/a", "n", 1000)[0] is Verdict.CLAIMED
    before = int(store.record(good)["lease_until"])
    assert store.renew({bad: "n/1/a", good: "n/1/a"}, HOUR) == {bad: False, good: True}
    assert int(store.record(good)["lease_until"]) > before


def test_release_and_unoffer_of_a_record_that_is_not_a_hash_change_nothing(store):
    """release and unoffer answer False for a key that is not a hash, and leave it."""
    key, record_key, before = plant(store, "a string")
    assert store.release(key, "n/1/a") is False
    assert store.unoffer(key, "q") is False
    assert store.client.dump(record_key) == before


def test_hoist_drops_an_offer_whose_record_is_not_a_hash_and_moves_the_others(store):
    """The hoister drops an offer of a corrupt record and still hoists the sound ones."""
    good, (bad, _, _) = new_key(), plant(store, "a set")
    submit(store, good, pool="low")
    store.client.zadd(store.offers_key("low"), {bad: 0})
    moved = store.hoist(["low", "high"], 0).copies
    assert [entry[:2] for entry in moved] == [("high", good)]
    assert store.client.zrange(store.offers_key("low"), 0, -1) == []


@pytest.mark.parametrize(
    ("verdict", "data", "what"),
    [
        (Verdict.DONE, "{oops", "its value is not JSON"),
        (Verdict.DONE, "", "its value is not JSON"),
        (Verdict.DONE, '{"__type__": "uuid", "__value__": 5}', "its value is not JSON"),
        (Verdict.FAILED, "<html>", "its error is not a girder error in JSON"),
        (Verdict.FAILED, "[1, 2]", "its error is not a girder error in JSON"),
        (Verdict.CORRUPT, "its state is unknown: x", "its state is unknown: x"),
    ],
)
def test_an_outcome_that_does_not_decode_is_a_girder_error_naming_the_key(verdict, data, what):
    """Outcome.value raises, and Outcome.error returns, a GirderError naming the key and what is wrong."""
    key = new_key()
    outcome = Outcome(key, verdict, data)
    if verdict is Verdict.DONE:
        with pytest.raises(GirderError) as info:
            outcome.value()
        err = info.value
    else:
        err = outcome.error()
    assert (err.key, err.exc_type) == (key, CORRUPT)
    assert f"the state store's record of {key} is corrupt: {what}" in str(err)


def test_pop_mailbox_skips_entries_girder_never_writes(store, caplog):
    """Mailbox entries that do not parse, or name a verdict never notified, are logged and skipped;
    the sound one among them is answered."""
    caplog.set_level(logging.WARNING, logger="girder_celery.store")
    mailbox, key = store.mailbox_key("m"), new_key()
    store.client.rpush(mailbox, "garbage", f"running:{key}:x", f"done:{key}:5")
    store.client.pexpire(mailbox, MAILBOX_TTL_MS)
    assert store.pop_mailbox(mailbox, 1, 10) == [Outcome(key, Verdict.DONE, "5")]
    assert caplog.text.count("skipped an entry of mailbox") == 2
