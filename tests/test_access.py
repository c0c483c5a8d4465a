"""Who may talk to the state store: an ACL user limited to what girder needs, TLS (``rediss://``
with certificates the test makes), and the clear, prompt refusal of every other client.

Real ``redis-server`` (``tests.access_support.AccessServer``: its default user needs a password)
and real workers, whose broker, result backend and run counters stay on the session's Redis:
only girder's own traffic goes to the guarded store. These are not fault tests (nothing breaks
mid-flight): they pin the set-up a deployment relies on, so they run in the default suite.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from celery import Celery

from girder_celery import Girder, GirderConnectionError, GirderError, GirderTimeout
from tests.access_support import AccessServer, acl_setuser_line
from tests.core_support import open_gate
from tests.harness import ROOT, Grid, wait_until

PASSWORD = "pw-" + uuid.uuid4().hex[:12]

#: A refused client hears of it within this many seconds (milliseconds, as a rule: the bound
#: leaves room for a loaded machine, not for retries).
REFUSED_WITHIN = 2.0

#: Refusals girder does without, though Redis logs them: redis-py's CLIENT SETINFO on connect
#: (Redis 7.2 and later; Redis 6, where it is unknown, logs the refusal of "client") and the
#: worker's maxmemory-policy check (CONFIG GET) at start.
TOLERATED = {"client|setinfo", "client", "config|get"}


@pytest.fixture(scope="module")
def access() -> Iterator[AccessServer]:
    server = AccessServer().start()
    yield server
    server.close()


@pytest.fixture
def tls(access: AccessServer) -> AccessServer:
    if access.certs is None:
        pytest.skip(f"no TLS: {access.no_tls}")
    return access


@pytest.fixture
def store_grid(redis_server, access, grids) -> Callable[[str], Grid]:
    """``store_grid(url)``: a grid (Redis broker) whose state store is ``url`` on ``access``, where
    user ``girder`` has exactly girder's ACL on the grid's key prefix; killed at teardown."""

    def make(url: str) -> Grid:
        g = Grid(redis_server, "redis", lease=1.5, check=0.5, store_url=url)
        access.grant("girder", g.key_prefix, PASSWORD)
        access.admin.acl_log_reset()
        g.load_app()
        grids.append(g)
        return g

    return make


def exercise(g: Grid, access: AccessServer) -> None:
    """Every flow of girder on one worker, each answered right: a request with sub-requests and
    theirs, a memoized hit, a failure with its cause, a cycle, Celery's delay().get(), a lease
    renewed, a timeout that withdraws its waiter, an offer nobody takes (then cancelled), a retry, the
    reports, state and forget."""
    m, t = g.app_module, uuid.uuid4().hex[:8]
    fanout = m.reentrant_tasks.fanout
    assert m.girder.request(fanout.s(3, 2, t), timeout=30) == 6
    assert fanout.call(3, 2, t) == 6 and m.girder.state(fanout.s(3, 2, t))["state"] == "done"
    with pytest.raises(GirderError) as failed:
        m.girder.request(m.reentrant_tasks.ratio.s(1), timeout=15)
    assert failed.value.chain()[-1].exc_type == "ZeroDivisionError"
    with pytest.raises(GirderError, match="cycle"):
        m.girder.request(m.reentrant_tasks.selfcycle.s(t), timeout=15)
    assert m.add.delay(t, "+").get(timeout=15) == f"{t}+"
    _renewed_then_answered(g, access, t)
    nobody = f"nobody-{t}"
    with pytest.raises(GirderTimeout):
        m.girder.request(m.add.s(t, "?"), pool=nobody, timeout=0.3)
    total, now_ms, oldest = m.girder.offers(nobody)
    assert total == 1 and now_ms > 0 and oldest[0][0] == m.add.key(t, "?") and "grid.add" in oldest[0][2]
    assert m.girder.cancel(m.add.s(t, "?")) == [m.add.key(t, "?")] and m.girder.offers(nobody)[0] == 0
    assert m.girder.request(m.retrying.s(t), timeout=15) == 2
    _reports(m, fanout.s(3, 2, t))
    assert m.girder.forget(fanout.s(3, 2, t)) and m.girder.state(fanout.s(3, 2, t))["state"] == "absent"


def _reports(m, root) -> None:
    """The reports of issue 14 under the ACL: a graph, progress, stats and their reset, active."""
    assert len(m.girder.graph(root)["nodes"]) == 1 + 3 + 6
    assert m.girder.progress(root)["known"] == 10
    assert m.girder.stats()["tasks"]["grid.fanout"]["executions"] >= 4
    m.girder.reset_stats()
    assert m.girder.stats()["tasks"] == {} and m.girder.active() == []
    assert m.girder.forget_task("grid.nothing-of-that-name") == 0


def _renewed_then_answered(g: Grid, access: AccessServer, t: str) -> None:
    m = g.app_module
    with pytest.raises(GirderTimeout):  # its waiter withdraws; the request runs on
        m.girder.request(m.gated.s(t), timeout=0.3)
    record = m.girder.store.record_key(m.gated.key(t))
    first = wait_until(lambda: access.admin.hget(record, "lease_until"), 10, "the gated request to start")
    wait_until(lambda: access.admin.hget(record, "lease_until") != first, 10, "its lease to be renewed")
    open_gate(g, t)
    assert m.girder.request(m.gated.s(t), timeout=15) == t


def assert_nothing_refused(g: Grid, access: AccessServer) -> None:
    """No command of girder's was refused (Redis's ACL log), and the worker is alive."""
    refused = [e for e in access.denials() if e.get("object") not in TOLERATED]
    assert refused == [], f"the ACL refused girder: {refused}"
    for worker in g.workers:
        assert worker.proc.poll() is None, worker.output()
        assert "NOPERM" not in worker.output(), worker.output()


def test_girder_runs_end_to_end_as_a_user_with_only_the_documented_acl(store_grid, access):
    """A worker and a client whose store URL names a user with exactly the README's ACL serve
    every flow of girder, and Redis refuses none of their commands."""
    g = store_grid(access.url("girder", PASSWORD))
    g.worker("acl", "prefork", 2)
    exercise(g, access)
    assert_nothing_refused(g, access)


def test_girder_runs_end_to_end_over_tls(store_grid, tls):
    """A worker and a client on rediss:// (CA, client certificate and key as URL parameters), as the
    ACL user, serve every flow of girder."""
    g = store_grid(tls.tls_url("girder", PASSWORD))
    g.worker("tls", "solo", 1)
    exercise(g, tls)
    assert_nothing_refused(g, tls)


def test_the_readme_lists_the_acl_the_tests_grant():
    """The README's ACL SETUSER line is the one these tests grant (the client's commands and every
    command the Lua scripts call), so a script calling a new command fails here until it is listed."""
    assert acl_setuser_line() in (ROOT / "README.md").read_text()


# -- refused clients -------------------------------------------------------------------------

#: Clients the store must refuse: ``(needs TLS, url)``; a refused URL carries ``PASSWORD`` when
#: it has a password, so that the error can be checked to mask it.
REFUSED: dict[str, tuple[bool, Callable[[AccessServer], str]]] = {
    "no password": (False, lambda a: a.url()),
    "wrong password": (False, lambda a: a.url("girder", "x" + PASSWORD)),
    "unknown user": (False, lambda a: a.url("nobody", PASSWORD)),
    "untrusted server certificate": (True, lambda a: a.tls_url("girder", PASSWORD, ca=a.certs.other_ca)),
    "client certificate of another CA": (True, lambda a: a.tls_url("girder", PASSWORD, cert=a.certs.stranger)),
    "no client certificate": (True, lambda a: a.tls_url("girder", PASSWORD, cert=())),
    "plain text to the TLS port": (True, lambda a: f"redis://girder:{PASSWORD}@127.0.0.1:{a.tls_port}/0"),
}


def refused_url(access: AccessServer, case: str) -> str:
    needs_tls, url = REFUSED[case]
    if needs_tls and access.certs is None:
        pytest.skip(f"no TLS: {access.no_tls}")
    return url(access)


def assert_names_the_store(message: str, url: str) -> None:
    assert PASSWORD not in message and "x" + PASSWORD not in message
    masked = url.replace(PASSWORD, "***").replace("x***", "***")
    assert masked in message, message


def client(url: str):
    """A Girder on ``url`` with one task, on an app whose broker is in memory: only the store is real."""
    app = Celery(f"access-{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
    girder = Girder(app, url=url)

    @girder.task(name="access.add")
    def add(x, y=0):
        return x + y

    return girder, add


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_refused_client_gets_a_prompt_clear_error_naming_the_store(access, case):
    """Girder.request from a client the store refuses raises GirderConnectionError naming the
    store, password masked, within REFUSED_WITHIN seconds."""
    url = refused_url(access, case)
    girder, add = client(url)
    started = time.monotonic()
    with pytest.raises(GirderConnectionError) as info:
        girder.request(add.s(1, 2), timeout=30)
    assert time.monotonic() - started < REFUSED_WITHIN
    assert_names_the_store(str(info.value), url)
    assert_names_the_store(info.value.url, url)


@pytest.mark.parametrize("case", ["no password", "wrong password", "untrusted server certificate"])
def test_a_worker_the_store_refuses_fails_at_start_naming_the_store(redis_server, access, case):
    """A worker whose store refuses it exits at start (within 30 s, else TimeoutError), its log
    naming the store (password masked)."""
    url = refused_url(access, case)
    g = Grid(redis_server, "redis", store_url=url)
    try:
        with pytest.raises(RuntimeError, match="exited"):
            g.start_workers(["refused"], "solo", 1, timeout=30)
        log = g.workers[0].output()
        assert "GirderConnectionError" in log, log
        assert_names_the_store(log, url)
    finally:
        g.close()


@pytest.mark.parametrize("missing", ["evalsha", "hgetall", "zcard"])
def test_a_user_lacking_a_command_gets_an_error_naming_the_store_and_the_command(access, missing):
    """A user whose ACL lacks a command girder needs gets at once a GirderError naming the store
    (password masked) and the command, not a bare NoPermissionError nor a connection error that
    a wait would retry."""
    user = f"narrow-{missing}"
    access.grant(user, "girder", PASSWORD, without=(missing,))
    url = access.url(user, PASSWORD)
    girder, add = client(url)
    calls = {"evalsha": lambda: girder.request(add.s(1), timeout=30), "hgetall": lambda: girder.state(add.s(1)),
             "zcard": lambda: girder.offers("celery")}  # fmt: skip
    started = time.monotonic()
    with pytest.raises(GirderError) as info:
        calls[missing]()
    assert time.monotonic() - started < REFUSED_WITHIN
    assert not isinstance(info.value, GirderConnectionError)
    assert f"'{missing}'" in str(info.value) and "refused a command" in str(info.value)
    assert_names_the_store(str(info.value), url)


def test_a_store_in_another_database_needs_select_too(access):
    """A URL naming database 3 needs +select beside girder's ACL (redis-py selects it on connect):
    without it a clear GirderError names the store and 'select', with it girder is served."""
    access.grant("girder-db3", "girder", PASSWORD)
    url = access.url("girder-db3", PASSWORD, db=3)
    girder, add = client(url)
    with pytest.raises(GirderError, match="'select'"):
        girder.state(add.s(1))
    access.admin.execute_command("ACL", "SETUSER", "girder-db3", "+select")
    assert girder.state(add.s(1))["state"] == "absent"
