"""Girder's state store behind Redis Sentinel (issue 15, item 2): ``girder_url = "sentinel://..."``
with ``girder_sentinel_master``, against real servers.

Each test that needs servers starts its own ``SentinelGroup``: a master, its replica and one
sentinel on free loopback ports, the master and replica with a password, the sentinel with one
of its own, and a failover in about a second (``down-after-milliseconds`` 200,
``failover-timeout`` 1000). Workers are real ``celery worker`` processes whose state store is the
master the sentinel names; the session's Redis keeps the broker, the run counters and the gates,
which must outlive a failover.

Pinned: the core path (a request, inline sub-requests, ``delay().get()``) through Sentinel; the
master killed with SIGKILL mid-request, every caller answered right after the failover; a
connection held on a demoted master (``READONLY``) reconnecting to the master; a write the old
master acknowledged but never replicated, lost in the failover, costing a rerun and never a
wrong answer; and each bad configuration a clear error, at call time and at worker start.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest
from celery import Celery
from redis.sentinel import SentinelConnectionPool

from girder_celery import Girder, GirderConnectionError
from girder_celery.testing import SentinelGroup, TlsFiles, free_port, redis_server_binary
from tests.access_support import acl_rules, make_certificates, openssl_missing, tls_missing
from tests.faults.support import answer, assert_runs, assert_serving, record, runs, tag
from tests.harness import Grid, wait_until

PASSWORD, SENTINEL_PASSWORD = "master-secret", "sentinel-secret"
OPTIONS = {"sentinel_kwargs": {"password": SENTINEL_PASSWORD}}
LEASE, CHECK = 1.0, 0.5
#: From the promotion of the replica to every answer: a check interval or two, plus slack for a
#: loaded machine.
BOUND = 2 * CHECK + 2.0


@pytest.fixture
def group():
    g = SentinelGroup(password=PASSWORD, sentinel_password=SENTINEL_PASSWORD).start()
    yield g
    g.close()


@pytest.fixture
def sentinel_grid(redis_server, grids):
    """``sentinel_grid(url, master, options)``: a grid (Redis broker) whose state store is found
    through the sentinels of ``url``; its workers are killed at teardown (``grids``)."""

    def make(url: str, master: str, options: dict | None = None) -> Grid:
        g = Grid(redis_server, "redis", lease=LEASE, check=CHECK, store_url=url)
        g.env["GIRDER_TEST_SENTINEL_MASTER"] = master
        g.env["GIRDER_TEST_SENTINEL_OPTIONS"] = json.dumps(OPTIONS if options is None else options)
        g.load_app()
        grids.append(g)
        return g

    return make


def client_girder(url: str, **conf) -> Girder:
    app = Celery(f"sentinel-client-{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
    app.conf.update(girder_url=url, girder_connect_timeout=2.0, **conf)
    return Girder(app)


# -- the core path -------------------------------------------------------------------------------


def test_requests_go_through_sentinel_to_the_master(group, sentinel_grid):
    """A request, one with inline sub-requests, and Celery's ``delay().get()``, on a worker whose
    state store is the master the sentinel names: the records are on the master (and replicated)."""
    g = sentinel_grid(group.url(), group.master_name)
    g.worker("s1", "solo", 1)
    m, t = g.app_module, tag()
    assert isinstance(m.girder.store.client.connection_pool, SentinelConnectionPool)
    assert m.add.call(1, 2) == 3
    assert m.reentrant_tasks.fanout.call(3, 0, t) == 3
    leaf = m.girder.state(m.reentrant_tasks.leaf.s(f"{t}.0"))
    assert (leaf["state"], leaf["placement"]) == ("done", "inline")  # run by the waiting parent
    assert m.add.delay(5, 6).get(timeout=10) == 11
    master = group.master().client()
    assert master.exists(m.girder.store.record_key(m.add.key(1, 2)))
    assert master.wait(1, 5000) == 1  # the replica holds it too


# -- failover ------------------------------------------------------------------------------------


def test_the_master_killed_mid_request_every_caller_is_answered_after_the_failover(group, sentinel_grid, callers):
    """The master SIGKILLed with request A running and request B queued behind it on the only
    executor; A's function returns while no master is up. The sentinel promotes the replica and
    both callers get the right value within ``BOUND`` of the promotion: A runs at most twice (its
    completion may be lost with the old master, and its lease then lapses), B once."""
    g = sentinel_grid(group.url(), group.master_name)
    node = g.worker("s1", "solo", 1)
    assert_serving(g, [node])  # warm: the node's scripts are loaded before the fault
    m, a, x = g.app_module, tag(), int(uuid.uuid4().int % 10**9)
    a_key, b_key = m.gated.key(a), m.add.key(x, 1)
    fa = callers.call(m.girder.request, m.gated.s(a), 30)
    wait_until(lambda: runs(g, "grid.gated", a_key) == 1, 20, "A to start")
    fb = callers.call(m.girder.request, m.add.s(x, 1), 30)
    wait_until(lambda: record(g, b_key).get("state") == "queued", 10, "B queued")
    assert group.master().client().wait(1, 5000) == 1  # every record is on the replica: none is lost
    failover = group.kill_master()
    g.redis_server.client().rpush(m.gate_key(a), "open", "open")  # A returns with no master (a rerun passes too)
    new = failover.wait(15)
    promoted = time.monotonic()
    assert new is not failover.old
    (va, a_done), (vb, b_done) = answer(fa, 30), answer(fb, 30)
    assert (va, vb) == (a, x + 1)
    assert max(a_done, b_done) - promoted < BOUND
    assert_runs(g, {("grid.gated", a_key): (1, 2), ("grid.add", b_key): (1, 1)})
    assert new.client().hget(m.girder.store.record_key(a_key), "state") == "done"
    assert_serving(g, [node])


def test_the_master_killed_while_a_task_runs_its_sub_requests_inline(group, sentinel_grid, callers):
    """A task waiting for four sub-requests, running them inline one after the other on the only
    executor, when the master is SIGKILLed: the inline wait rides out the failover like a caller's,
    and the caller gets every child's value; each request runs at most twice (the one running at
    the kill may lose its completion and lapse), none is answered wrongly."""
    g = sentinel_grid(group.url(), group.master_name)
    node = g.worker("s1", "solo", 1)
    assert_serving(g, [node])
    m, t, n, seconds = g.app_module, tag(), 4, 0.3
    parent = m.reentrant_tasks.sleepy_parent
    key, children = parent.key(n, seconds, t), [m.slow.key(seconds, tag=f"{t}.{i}") for i in range(n)]
    future = callers.call(m.girder.request, parent.s(n, seconds, t), 30)
    wait_until(lambda: any(runs(g, "grid.slow", k) for k in children), 20, "a child to start")
    assert group.master().client().wait(1, 5000) == 1
    group.kill_master().wait(15)
    value, _ = answer(future, 30)
    assert [c["tag"] for c in value] == [f"{t}.{i}" for i in range(n)]
    assert_runs(g, {("grid.sleepy_parent", key): (1, 2), **{("grid.slow", k): (1, 2) for k in children}})
    assert_serving(g, [node])


def test_a_connection_held_on_a_demoted_master_reconnects_to_the_master(group):
    """A thread's held connection (``link.py``) left on a server that is a replica now, as after
    a failover that demoted its master: the write it sends is refused (``READONLY``), which is
    taken as 'unreachable, reconnect', not as a script's error. Both the unawaited completion and
    the awaited one land on the master, and the connection held afterwards is the master's."""
    girder = client_girder(group.url(), girder_sentinel_master=group.master_name, girder_sentinel_options=OPTIONS)
    store, master = girder.store, group.master()
    replica = next(s for s in group.servers if s is not master)
    for _ in range(2):  # the first loads the script (NOSCRIPT), the second holds a connection
        assert store.claim("0" * 64, "o", "n", 1000)[0].value == "absent"
    assert store.link._held().connection.port == master.port
    held = store.link._held()
    held.connection.disconnect()
    held.connection.connect_to(("127.0.0.1", replica.port))  # what a demoted master's connection is
    k1, k2 = "1" * 64, "2" * 64
    store.complete_unawaited(k1, "owner", '"one"', 0)
    assert store.complete(k2, "owner", '"two"', 0) is True
    for key, value in ((k1, '"one"'), (k2, '"two"')):
        assert master.client().hget(store.record_key(key), "value") == value
    store.claim("3" * 64, "o", "n", 1000)
    assert store.link._held().connection.port == master.port


def test_a_write_the_old_master_never_replicated_costs_a_rerun_not_a_wrong_answer(group, sentinel_grid):
    """Replication is asynchronous: a value the master stored and answered, but had not sent to
    its replica when it died, is gone from the new master. Here the replica's link is cut first
    (it cannot log in again), so the loss is certain: the caller got the right value from the old
    master, and the next identical request runs it again and gets the same value; a value
    replicated before the cut is still memoized."""
    g = sentinel_grid(group.url(), group.master_name)
    g.worker("s1", "solo", 1)
    m, x, y = g.app_module, *(int(uuid.uuid4().int % 10**9) + i for i in (0, 1))
    assert m.add.call(x, 1) == x + 1
    old = group.master()
    assert old.client().wait(1, 5000) == 1
    replica = next(s for s in group.servers if s is not old)
    replica.client().config_set("masterauth", "not-the-password")
    old.client().client_kill_filter(_type="replica")
    wait_until(lambda: old.client().info("replication")["connected_slaves"] == 0, 10, "the replica's link to go")
    assert m.add.call(y, 1) == y + 1  # acknowledged by the old master alone
    failover = group.kill_master()
    assert failover.wait(15) is replica
    replica.client().config_set("masterauth", PASSWORD)
    assert m.add.call(x, 1) == x + 1 and runs(g, "grid.add", m.add.key(x, 1)) == 1  # replicated: memoized
    assert m.add.call(y, 1) == y + 1 and runs(g, "grid.add", m.add.key(y, 1)) == 2  # lost: run again


#: What girder asks a sentinel: the masters it watches (redis-py's discovery, and girder's account
#: of why none was found).
SENTINEL_ACL = ("+sentinel|masters",)


def refused(client) -> list[str]:
    return [entry["object"] for entry in client.acl_log() if entry["object"] != "client|setinfo"]


def test_girders_acl_users_on_the_servers_and_the_sentinel_are_enough(sentinel_grid):
    """A user with exactly the README's ACL on master and replica (ACLs are not replicated: each
    server that may become master needs it), and a sentinel user allowed ``SENTINEL MASTERS``
    alone: requests, inline sub-requests and ``state`` work, before and after a failover."""
    group = SentinelGroup().start()
    try:
        sentinel_options = {"sentinel_kwargs": {"username": "girder-sentinel", "password": SENTINEL_PASSWORD}}
        url = group.url().replace("sentinel://", f"sentinel://girder:{PASSWORD}@")
        g = sentinel_grid(url, group.master_name, sentinel_options)
        with group.sentinel() as sentinel:
            sentinel.execute_command("ACL", "SETUSER", "girder-sentinel", "reset", "on", f">{SENTINEL_PASSWORD}",
                                     *SENTINEL_ACL)  # fmt: skip
        for server in group.servers:
            server.client().execute_command("ACL", "SETUSER", "girder", *acl_rules(g.key_prefix, PASSWORD))
        g.worker("s1", "solo", 1)
        m, t = g.app_module, tag()
        assert m.reentrant_tasks.fanout.call(2, 0, t) == 2
        assert m.girder.state(m.reentrant_tasks.fanout.s(2, 0, t))["state"] == "done"
        group.kill_master().wait(15)
        assert m.reentrant_tasks.fanout.call(2, 0, f"{t}.after") == 2
        with group.sentinel() as sentinel:  # nothing girder asked was refused (but redis-py's naming of itself)
            assert refused(sentinel) == [] and refused(group.master().client()) == []
    finally:
        group.close()


def test_tls_to_the_master_and_after_a_failover_to_the_new_one(tmp_path):
    """Master and replica serving TLS only to clients with a certificate the test CA signed,
    watched by the sentinel at their TLS ports: girder's ``ssl`` option reaches the master, and
    after a failover the new one; without it, the client's plain connection is refused with a
    clear error."""
    if why := tls_missing(redis_server_binary()) or openssl_missing():
        pytest.skip(why)
    certs = make_certificates(tmp_path)
    group = SentinelGroup(tls=TlsFiles(certs.ca, certs.server, certs.client)).start()
    try:
        tls = {"ssl_ca_certs": str(certs.ca), "ssl_certfile": str(certs.client[0]), "ssl_keyfile": str(certs.client[1])}
        store = client_girder(group.url(), girder_sentinel_master=group.master_name,
                              girder_sentinel_options={"ssl": tls}).store  # fmt: skip
        keys = ["4" * 64, "5" * 64]
        assert store.complete(keys[0], "owner", '"before"', 0) is True
        assert group.master().client().wait(1, 5000) == 1
        group.kill_master().wait(15)
        assert store.complete(keys[1], "owner", '"after"', 0) is True
        new = group.master().client()  # its plain port, for the test
        assert [new.hget(store.record_key(k), "value") for k in keys] == ['"before"', '"after"']
        plain = client_girder(group.url(), girder_sentinel_master=group.master_name)
        refused = pytest.raises(GirderConnectionError, match="cannot reach girder's state store at sentinel://")
        with refused, plain.store.reachable():
            plain.store.complete(keys[0], "owner", '"x"', 0)
    finally:
        group.close()


# -- bad configuration ---------------------------------------------------------------------------

#: Each bad configuration: ``(url of the group, girder settings)`` and what its error must say.
BAD = {
    "unknown master": (
        lambda grp: (grp.url(), {"girder_sentinel_master": "nope", "girder_sentinel_options": OPTIONS}),
        ["watches no master named 'nope'", "it watches 'girder-master'"],
    ),
    "unreachable sentinels": (
        lambda grp: (
            f"sentinel://127.0.0.1:{free_port()};sentinel://127.0.0.1:{free_port()}",
            {"girder_sentinel_master": "girder-master"},
        ),
        ["cannot be reached", "Connection refused"],
    ),
    "no sentinel password": (
        lambda grp: (grp.url(), {"girder_sentinel_master": "girder-master"}),
        ["refused the login", "girder_sentinel_options['sentinel_kwargs']"],
    ),
    "sentinel:// without a master": (
        lambda grp: (grp.url(), {}),
        ["set girder_sentinel_master"],
    ),
    "a master with a redis:// URL": (
        lambda grp: (grp.master().url(), {"girder_sentinel_master": "girder-master"}),
        ["girder_sentinel_master is set", "is not a sentinel:// URL"],
    ),
}


def one() -> int:
    return 1


@pytest.mark.parametrize("case", list(BAD))
def test_bad_configuration_is_a_clear_error_at_call_time(group, case):
    """A caller gets at once an error saying what is wrong, the password masked."""
    config, says = BAD[case]
    url, conf = config(group)
    girder = client_girder(url, **conf)
    started = time.monotonic()
    with pytest.raises((GirderConnectionError, ValueError)) as info:
        girder.request(girder.task(name="sentinel.one")(one).s(), timeout=10)
    assert time.monotonic() - started < 10
    text = str(info.value)
    assert all(s in text for s in says), text
    assert PASSWORD not in text and SENTINEL_PASSWORD not in text


@pytest.mark.parametrize("case", list(BAD))
def test_bad_configuration_fails_a_worker_at_start(group, redis_server, case):
    """A worker so configured exits at start, its log saying what is wrong, the passwords masked."""
    config, says = BAD[case]
    url, conf = config(group)
    g = Grid(redis_server, "redis", store_url=url)
    g.env["GIRDER_TEST_SENTINEL_MASTER"] = conf.get("girder_sentinel_master", "")
    g.env["GIRDER_TEST_SENTINEL_OPTIONS"] = json.dumps(conf.get("girder_sentinel_options", {}))
    try:
        with pytest.raises(RuntimeError, match="exited"):
            g.start_workers(["bad"], "solo", 1, timeout=30)
        log = g.workers[0].output()
        assert all(s in log for s in says), log
        assert PASSWORD not in log and SENTINEL_PASSWORD not in log
    finally:
        g.close()


@pytest.mark.parametrize(
    "conf, says",
    [
        ({"girder_url": "sentinel://h:1;redis://h:2", "girder_sentinel_master": "m"}, "is not sentinel://"),
        ({"girder_url": "sentinel://h:port", "girder_sentinel_master": "m"}, "is not sentinel://"),
        ({"girder_url": "sentinel://h:1/x", "girder_sentinel_master": "m"}, "database of 'sentinel://h:1/x'"),
        ({"girder_url": "sentinel://:a@h:1/0;sentinel://:b@h:2/0", "girder_sentinel_master": "m"}, "another user"),
        ({"girder_url": "sentinel://h:1", "girder_sentinel_master": ""}, "set girder_sentinel_master"),
        ({"girder_url": "sentinel://h:1", "girder_sentinel_master": "m",
          "girder_sentinel_options": {"master_name": "m"}}, "keys among ['min_other_sentinels', 'sentinel_kwargs',"),
        ({"girder_url": "sentinel://h:1", "girder_sentinel_master": "m",
          "girder_sentinel_options": {"sentinel_kwargs": {"pasword": "x"}}}, "'sentinel_kwargs'] must be a dict"),
        ({"girder_url": "sentinel://h:1", "girder_sentinel_master": "m", "girder_sentinel_options": {"ssl": "yes"}},
         "['ssl'] must be a dict"),
        ({"girder_url": "redis://h:1", "girder_sentinel_options": OPTIONS}, "girder_sentinel_options is set"),
    ],
)  # fmt: skip
def test_settings_refuse_a_bad_sentinel_configuration(conf, says):
    conf = dict(conf)
    with pytest.raises(ValueError) as info:
        client_girder(conf.pop("girder_url"), **conf).settings  # noqa: B018 - read to validate
    assert says in str(info.value), str(info.value)
    assert "secret" not in str(info.value)


def test_settings_read_the_sentinels_and_the_masters_credentials():
    from girder_celery.settings import sentinel_url

    url = "sentinel://girder:p%40ss@s1:26380/3;sentinel://girder:p%40ss@s2/3;sentinel://s3:26381"
    assert sentinel_url(url) == (
        [("s1", 26380), ("s2", 26379), ("s3", 26381)],
        {"username": "girder", "password": "p@ss", "db": 3},
    )
    s = client_girder(url, girder_sentinel_master="m", girder_sentinel_options={"ssl": True}).settings
    assert (s.sentinel_master, s.sentinel_options) == ("m", {"ssl": True})
