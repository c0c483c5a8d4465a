"""See the grid (issue 14), end to end: the seed's bogosity job on two real nodes, its graph read
back from the store (exact nodes and edges), a second job sharing its sub-requests (cached), the
DOT text parsed by Graphviz, the HTML page rendered by headless Chromium, progress, stats,
``forget --task``, ``active`` with an inline child running, ``watch``, and bad input.

Graphviz's ``dot`` and Chromium are real programs: a test that needs one is skipped, saying so,
when it is not installed, except under ``CI=true`` (``.ci/run`` installs both), where it fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid

import pytest

from girder_celery import GirderError
from girder_celery.errors import GirderNoGraph
from tests.conftest import IN_CI
from tests.harness import Grid, repointed, wait_until
from tests.test_cli import ROOT, celery

#: bogosity(msec, jobnum, reclevel, numrecjobs, salt): the seed's job, 1 ms of sleep per request.
MSEC, LEVEL, NUMREC = 1, 3, 5


def binary(*names: str) -> str:
    """The path of the first of ``names`` on PATH; skipped (failed in CI) when none is."""
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    why = f"{names[0]} is not installed (Debian: apt-get install {'graphviz' if names[0] == 'dot' else names[0]})"
    if IN_CI:
        pytest.fail(f"{why}; CI needs it (.ci/run installs it)")
    pytest.skip(why)


@pytest.fixture(scope="module")
def bogo(redis_server):
    """Two -c 1 nodes, and two bogosity jobs of one salt: job 0 from cold, then job 1, whose
    three sub-requests job 0 made already."""
    g = Grid(redis_server, "redis")
    g.load_app()
    w1, w2 = g.worker("w1", "prefork", 1), g.worker("w2", "prefork", 1)
    g.nodes = {w1.hostname, w2.hostname}
    g.salt = uuid.uuid4().hex[:8]
    bogosity = g.app_module.reentrant_tasks.bogosity
    g.app_module.girder.reset_stats()
    for job in (0, 1):
        assert bogosity.call(MSEC, job, LEVEL, NUMREC, g.salt).startswith("Bogosity:")
    yield g
    g.kill()
    g.close()


@pytest.fixture
def grid(bogo):
    return repointed(bogo)


def job_key(grid, level: int, job: int) -> str:
    return grid.app_module.reentrant_tasks.bogosity.key(MSEC, job, level, NUMREC, grid.salt)


def expected_graph(grid, job: int) -> tuple[set[str], set[tuple[str, str]]]:
    """Job ``job``'s distinct requests and edges: each request of level L asks for the L requests
    of level L - 1 (7 requests and 11 edges from level 3)."""
    nodes, edges, todo = set(), set(), [(LEVEL, job)]
    while todo:
        level, j = todo.pop()
        nodes.add(job_key(grid, level, j))
        for k in range(level):
            edges.add((job_key(grid, level, j), job_key(grid, level - 1, k)))
            todo.append((level - 1, k))
    return nodes, edges


def test_the_graph_of_a_bogosity_job_has_its_seven_requests_and_eleven_edges(grid):
    """girder.graph of bogosity(1, 0, 3, 5, salt) on two nodes: exactly its 7 requests and 11
    edges, each done, ran once on one of the nodes, none cached, with its timings."""
    girder = grid.app_module.girder
    root = job_key(grid, LEVEL, 0)
    graph = girder.graph(root)
    nodes, edges = expected_graph(grid, 0)
    assert (len(nodes), len(edges)) == (7, 11)
    assert graph["root"] == root and graph["nodes"][0]["key"] == root
    assert {n["key"] for n in graph["nodes"]} == nodes and len(graph["nodes"]) == 7
    assert {tuple(e) for e in graph["edges"]} == edges and len(graph["edges"]) == 11
    for n in graph["nodes"]:
        assert set(n) == {"key", "request", "task", "state", "node", "placement", "attempts", "cached",
                          "started_at", "finished_at"}  # fmt: skip
        assert (n["task"], n["state"], n["attempts"], n["cached"]) == ("grid.bogosity", "done", 1, False)
        assert n["node"] in grid.nodes and n["placement"] in ("inline", "local", "hoisted")
        assert n["finished_at"] - n["started_at"] >= MSEC and n["request"].startswith("grid.bogosity(1, ")
    assert girder.graph(grid.app_module.reentrant_tasks.bogosity.s(MSEC, 0, LEVEL, NUMREC, grid.salt)) == graph


def test_a_second_job_shows_the_shared_sub_requests_as_cached(grid):
    """Job 1 asks for the three level-2 requests job 0 made: answered from the store, cached,
    and not walked (they did not run for job 1)."""
    graph = grid.app_module.girder.graph(job_key(grid, LEVEL, 1))
    root, shared = job_key(grid, LEVEL, 1), {job_key(grid, 2, k) for k in range(3)}
    assert {n["key"]: n["cached"] for n in graph["nodes"]} == {root: False, **dict.fromkeys(shared, True)}
    assert {tuple(e) for e in graph["edges"]} == {(root, k) for k in shared}
    assert all(n["state"] == "done" for n in graph["nodes"])


def test_progress_at_the_end_equals_the_graph(grid):
    """girder.progress of each settled job counts exactly the graph's requests by state."""
    girder = grid.app_module.girder
    assert girder.progress(job_key(grid, LEVEL, 0)) == {
        "done": 7, "running": 0, "queued": 0, "failed": 0, "cached": 0, "known": 7,
    }  # fmt: skip
    assert girder.progress(job_key(grid, LEVEL, 1)) == {
        "done": 1, "running": 0, "queued": 0, "failed": 0, "cached": 3, "known": 4,
    }  # fmt: skip


def test_stats_count_exactly_the_executions_that_ran(grid):
    """girder.stats counts each bogosity execution (as the tasks' own run counters do): 7 for job
    0 and 1 for job 1, no failure, at least job 1's three cache hits, and a run time."""
    from tests.test_reentrant import runs

    bogosity_runs = {key: n for (name, key), n in runs(grid).items() if name == "grid.bogosity"}
    counted = grid.app_module.girder.stats()
    task = counted["tasks"]["grid.bogosity"]
    assert task["executions"] == sum(bogosity_runs.values()) == 8 and set(bogosity_runs.values()) == {1}
    assert task["failures"] == 0 and task["cache_hits"] >= 3
    assert task["run_seconds"] >= 8 * MSEC / 1000 and task["mean_run_seconds"] == task["run_seconds"] / 8
    assert counted["since"] > 0 and counted["records"] >= 8 and counted["memory_bytes"] > 0
    out = celery(grid.env, "stats")
    assert out.returncode == 0, out.stderr
    assert any(line.split()[:3] == ["8", str(task["cache_hits"]), "0"] for line in out.stdout.splitlines()), out.stdout


def test_the_cli_prints_the_graph_as_json_and_dot_that_graphviz_parses(grid, tmp_path):
    """graph --format json is girder.graph; --format dot parses with Graphviz's dot, which draws
    every request; --format svg writes the same drawing."""
    root = job_key(grid, LEVEL, 0)
    out = celery(grid.env, "graph", root)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == grid.app_module.girder.graph(root)
    dot_text = celery(grid.env, "graph", root, "--format", "dot")
    assert dot_text.returncode == 0 and dot_text.stdout.startswith("digraph girder {"), dot_text.stderr
    drawn = subprocess.run([binary("dot"), "-Tsvg"], input=dot_text.stdout, capture_output=True, text=True, timeout=60)
    assert drawn.returncode == 0, drawn.stderr
    nodes, _ = expected_graph(grid, 0)
    assert all(f"<title>{key}</title>" in drawn.stdout for key in nodes)
    assert drawn.stdout.count('class="edge"') == 11
    svg = celery(grid.env, "graph", root, "--format", "svg", "-o", str(tmp_path / "g.svg"))
    assert svg.returncode == 0, svg.stderr
    assert all(f"<title>{key}</title>" in (tmp_path / "g.svg").read_text() for key in nodes)


def test_svg_without_graphviz_says_how_to_install_it(grid, tmp_path):
    """With no dot on PATH, --format svg says how to get Graphviz, and fails."""
    root = job_key(grid, LEVEL, 0)
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "python").symlink_to(sys.executable)
    env = {**grid.env, "PATH": str(bare)}
    out = celery(env, "graph", root, "--format", "svg")
    assert out.returncode == 1 and "apt-get install graphviz" in out.stderr, out.stderr


def test_the_html_page_renders_every_node_in_headless_chromium(grid, tmp_path):
    """graph --format html writes one page with no network reference that headless Chromium
    renders with every request drawn and listed, and no script error."""
    root = job_key(grid, LEVEL, 0)
    page = tmp_path / "graph.html"
    out = celery(grid.env, "graph", root, "--format", "html", "-o", str(page))
    assert out.returncode == 0 and "(7 requests)" in out.stdout, out.stderr
    text = page.read_text()
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text
    dom, log = headless_dom(page, tmp_path)
    html_tag = re.search(r"<html[^>]*>", dom).group(0)  # the page's script marks it as it ends, and on an error
    assert 'data-rendered="7"' in html_tag and "data-errors" not in html_tag, log[-3000:]
    assert "Uncaught" not in log and "SyntaxError" not in log, log[-3000:]
    nodes, _ = expected_graph(grid, 0)
    for key in nodes:
        assert f'<g class="request done" data-key="{key}"' in dom  # drawn
        assert f'<tr data-key="{key}">' in dom  # and listed
    assert dom.count('class="edge"') == 11


def headless_dom(page, tmp_path) -> tuple[str, str]:
    """The DOM of ``page`` after its scripts ran in headless Chromium, and Chromium's log."""
    done = subprocess.run(
        [binary("chromium", "chromium-browser", "google-chrome"), "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-dev-shm-usage", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, done.stderr


def test_forget_task_drops_that_tasks_values_only(grid):
    """forget --task NAME drops every memoized value of that task and nothing else; a request
    of it in flight is left alone."""
    m, t = grid.app_module, uuid.uuid4().hex[:8]
    assert m.echo.call(t) == [[t], {}] and m.add.call(2, 3) == 5 and m.add.call(4, 5) == 9
    gate = f"forget-{t}"
    m.reentrant_tasks.held.delay(gate)
    held = m.reentrant_tasks.held.key(gate)
    wait_until(lambda: m.girder.state(held)["state"] == "running", 20, "the held request to run")
    out = celery(grid.env, "forget", "--task", "grid.add")
    assert out.returncode == 0 and out.stdout.strip() == "forgot 2 memoized request(s) of grid.add", out.stderr
    assert m.girder.state(m.add.s(2, 3))["state"] == m.girder.state(m.add.s(4, 5))["state"] == "absent"
    assert m.girder.state(m.echo.s(t))["state"] == "done"
    assert m.girder.state(job_key(grid, LEVEL, 0))["state"] == "done"
    assert m.girder.forget_task("grid.held") == 0 and m.girder.state(held)["state"] == "running"
    m.reentrant_tasks.open_gate(gate)
    assert m.reentrant_tasks.held.call(gate)["tag"] == ""
    assert m.girder.forget_task("grid.held") == 1


def test_active_lists_a_running_inline_child_with_its_parent(grid):
    """active lists a child run inline by its waiting parent, with the parent's key, its node,
    age and lease; the CLI prints it; after the gate opens nothing is left running."""
    m, gate = grid.app_module, f"active-{uuid.uuid4().hex[:8]}"
    rt = m.reentrant_tasks
    parent, child = rt.requests_held.key(gate), rt.held.key(gate)
    result = rt.requests_held.delay(gate)
    try:
        running = wait_until(
            lambda: {r["key"]: r for r in m.girder.active()}.get(child), 20, "the held child to run inline"
        )
        assert (running["parent"], running["placement"], running["task"]) == (parent, "inline", "grid.held")
        assert running["node"] in grid.nodes and running["age"] >= 0 and running["lease"] > 0
        parent_run = {r["key"]: r for r in m.girder.active()}[parent]
        assert parent_run["node"] == running["node"] and parent_run["parent"] is None
        out = celery(grid.env, "active")
        assert out.returncode == 0, out.stderr
        line = next(line for line in out.stdout.splitlines() if child in line)
        assert f"parent {parent}" in line and "(inline)" in line and "grid.held(" in line
        watch = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tests.gridapp", "girder", "watch", parent, "--interval", "0.1"],
            env={**os.environ, **grid.env, "PYTHONPATH": str(ROOT)}, cwd=ROOT, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
    finally:
        rt.open_gate(gate)
    stdout, stderr = watch.communicate(timeout=60)
    assert watch.returncode == 0, stderr
    assert stdout.splitlines()[-1].startswith("done: grid.requests_held(")
    assert "2/2 settled" in stdout.splitlines()[-2], stdout
    assert result.get(timeout=20)["child"]["tag"] == ""
    assert child not in {r["key"] for r in m.girder.active()}


def test_watch_exits_1_for_a_failed_request(grid):
    """watch of a failed request exits 1, naming it."""
    m = grid.app_module
    with pytest.raises(GirderError, match="sub-request failed"):
        m.reentrant_tasks.ratio.call(1)
    out = celery(grid.env, "watch", m.reentrant_tasks.ratio.key(1))
    assert out.returncode == 1, out.stderr
    assert out.stdout.splitlines()[-1] == "failed: grid.ratio(1)"
    assert "[" in out.stdout.splitlines()[0] and "failed 2" in out.stdout.splitlines()[0]


def test_bad_input_unknown_key_no_sub_requests_expired_graph_exit_2(grid):
    """graph, watch and progress of an unknown key, of a request that made no sub-requests, and
    of an expired graph: a clear message, and exit code 2 from the CLI."""
    m = grid.app_module
    unknown = celery(grid.env, "graph", "0" * 64)
    assert unknown.returncode == 2 and "knows no request" in unknown.stderr, unknown.stderr
    assert celery(grid.env, "watch", "0" * 64).returncode == 2
    leaf = job_key(grid, 0, 0)  # level 0 requests nothing
    none = celery(grid.env, "graph", leaf, "--format", "html")
    assert none.returncode == 2 and "made no sub-requests" in none.stderr, none.stderr
    assert m.girder.progress(leaf)["known"] == 1

    root = job_key(grid, 1, 0)  # level 1 made one sub-request; its graph lapses as if its TTL passed
    m.girder.store.client.pexpire(m.girder.store.graph_key(root), 1)
    wait_until(lambda: not m.girder.store.client.exists(m.girder.store.graph_key(root)), 10, "the graph to expire")
    expired = celery(grid.env, "graph", root)
    assert expired.returncode == 2 and "has expired" in expired.stderr and "girder_graph_ttl" in expired.stderr
    bad_format = celery(grid.env, "graph", root, "--format", "png")
    assert bad_format.returncode == 2 and "--format" in bad_format.stderr
    both = celery(grid.env, "forget", root, "--task", "grid.add")
    assert both.returncode == 2 and "not both" in both.stderr
    version_alone = celery(grid.env, "forget", "--version", "2")
    assert version_alone.returncode == 2 and "--version needs --task" in version_alone.stderr
    empty = celery(grid.env, "forget", "--task", "")
    assert empty.returncode == 2 and "--task" in empty.stderr and "Traceback" not in empty.stderr


def test_cancelling_a_top_level_request_keeps_its_graph(grid):
    """girder.cancel of a running top-level request keeps its graph then (its run may be
    terminated before it could): its settled sub-request's graph, given 5 s to live, is kept
    girder_graph_ttl (a day) from then."""
    m, tag = grid.app_module, uuid.uuid4().hex[:8]
    rt, store, gate = m.reentrant_tasks, m.girder.store, f"cancelled-{tag}"
    root, mid = rt.outlives.key(gate, tag), rt.fanout.s(2, 0, tag)
    rt.outlives.delay(gate, tag)
    try:
        wait_until(lambda: m.girder.state(mid)["state"] == "done", 30, "its sub-request to settle")
        mid_graph = store.graph_key(m.girder.key_of(mid))
        store.client.pexpire(mid_graph, 5000)
        assert m.girder.cancel(root) == [root]
        assert store.client.pttl(mid_graph) > 3_600_000
    finally:
        rt.open_gate(gate)


def test_a_prefork_child_that_exits_after_its_request_still_keeps_its_graph(redis_server):
    """A prefork child with --max-tasks-per-child 1 exits as its top-level request settles, by
    os._exit (no atexit): the walk handed to its graph keeper's thread is done all the same (by
    that thread, woken at the settle, or else by the child's worker_process_shutdown), so the
    settled sub-request's graph, given 5 s to live, is kept girder_graph_ttl (a day) from then."""
    g = Grid(redis_server, "redis")
    g.load_app()
    try:
        g.worker("w", "prefork", 1, "--max-tasks-per-child", "1")
        m, tag = g.app_module, uuid.uuid4().hex[:8]
        rt, store, gate = m.reentrant_tasks, m.girder.store, f"child-exits-{tag}"
        mid = rt.fanout.s(2, 0, tag)
        rt.outlives.delay(gate, tag)
        wait_until(lambda: m.girder.state(mid)["state"] == "done", 30, "its sub-request to settle")
        mid_graph = store.graph_key(m.girder.key_of(mid))
        store.client.pexpire(mid_graph, 5000)
        rt.open_gate(gate)
        assert m.girder.request(rt.outlives.s(gate, tag), timeout=30) == 2
        wait_until(lambda: store.client.pttl(mid_graph) > 3_600_000, 10, "its graph to be kept as the root settled")
    finally:
        g.kill()
        g.close()


#: The grid whose root outlives its graph's TTL: girder_graph_ttl and the lease (seconds). Its
#: lease keeper ticks each third of the lease, so it keeps a running root's graph well within it.
SHORT_TTL, SHORT_LEASE = 4.0, 2.0


@pytest.fixture
def short_ttl(redis_server):
    """One -c 1 node of a grid whose graphs are kept SHORT_TTL seconds."""
    g = Grid(redis_server, "redis", lease=SHORT_LEASE)
    g.env["GIRDER_TEST_GRAPH_TTL"] = str(SHORT_TTL)
    g.load_app()
    g.worker("w", "prefork", 1)
    yield g
    g.kill()
    g.close()


def store_ms(store) -> int:
    """Redis's clock (ms), by which TTLs run out."""
    seconds, micros = store.client.time()
    return seconds * 1000 + micros // 1000


def kept_as_long(store, key: str, than: str) -> bool:
    """Whether the graph of ``key`` expires no sooner than that of ``than`` (read in this order,
    so the clock moving on between the two can only shorten the second)."""
    pipe = store.client.pipeline(transaction=False)
    pipe.pttl(store.graph_key(key))
    pipe.pttl(store.graph_key(than))
    mine, theirs = pipe.execute()
    return mine >= theirs > 0


def edges_of(girder, key: str) -> set[tuple[str, str]]:
    return {tuple(edge) for edge in girder.graph(key)["edges"]}


@pytest.mark.parametrize("how", ["delay", "alias"])
def test_a_root_that_outlives_the_graph_ttl_keeps_its_sub_requests_graphs(short_ttl, how):
    """girder_graph_ttl of 4 s and a top-level root that runs past it, from its own message
    (delay) or run inline by a canvas step's alias: its sub-request fanout(2) settles with its
    two leaves, the root runs on for 1.5 TTL more, then settles. Its graph shows the grandchildren
    edges all along, just after it settles and still most of a TTL after; the sub-request's own
    graph too; then both have expired, and say so."""
    m, tag = short_ttl.app_module, uuid.uuid4().hex[:8]
    girder, rt, ttl_ms = m.girder, m.reentrant_tasks, int(SHORT_TTL * 1000)
    store, gate = girder.store, f"outlives-{tag}"
    root, mid = rt.outlives.key(gate, tag), rt.fanout.key(2, 0, tag)
    below = {(mid, rt.leaf.key(f"{tag}.{i}")) for i in range(2)}
    whole = {(root, mid), *below}
    if how == "delay":
        rt.outlives.delay(gate, tag)
    else:
        rt.outlives.apply_async((gate, tag), task_id=str(uuid.uuid4()))
    mid_settled = int(wait_until(lambda: store.record(mid).get("finished_at"), 30, "fanout(2) to settle"))
    wait_until(lambda: store_ms(store) > mid_settled + 1.5 * ttl_ms, 2 * SHORT_TTL, "1.5 TTLs to pass")
    assert girder.state(root)["state"] == "running"
    assert edges_of(girder, root) == whole  # kept while it runs, past the sub-request's own TTL
    rt.open_gate(gate)
    assert girder.request(rt.outlives.s(gate, tag), timeout=30) == 2
    settled = int(store.record(root)["finished_at"])
    assert edges_of(girder, root) == whole and edges_of(girder, mid) == below
    # As it settles, the graphs it reaches are kept as long as its own, which expires a TTL later.
    wait_until(lambda: kept_as_long(store, mid, root), 5, "its graph to be kept whole as it settled")
    wait_until(lambda: store_ms(store) > settled + ttl_ms - 1000, SHORT_TTL, "all but the last second of a TTL")
    assert edges_of(girder, root) == whole and edges_of(girder, mid) == below
    graphs = [store.graph_key(root), store.graph_key(mid)]
    wait_until(lambda: not store.client.exists(*graphs), SHORT_TTL, "the graphs to expire")
    for key in (root, mid):
        with pytest.raises(GirderNoGraph, match="has expired: a graph is kept girder_graph_ttl"):
            girder.graph(key)
