"""Tasks that request other tasks while they run (the re-entrant suite)."""

import time

from celery import signals

from tests import gridapp
from tests.gridapp import count_run, girder, slow


@girder.task(bind=True, name="grid.ratio")
def ratio(self, i):
    count_run(self)
    from tests.gridapp import divide

    return divide.call(i, i - 1)


@girder.task(bind=True, name="grid.chain")
def chain(self, n):
    count_run(self)
    return 0 if n == 0 else chain.call(n - 1) + 1


@girder.task(bind=True, name="grid.fib")
def fib(self, n):
    return n if n < 2 else fib.call(n - 1) + fib.call(n - 2)


@girder.task(bind=True, name="grid.then_hold")
def then_hold(self, tag):
    """Asks for ``gated(tag)`` (run inline here, as a rule), then holds until the test opens the
    gate ``tag + ":hold"`` (at most 20 s): a task computing after its sub-request."""
    count_run(self)
    value = gridapp.gated.call(tag)
    gridapp._counter.blpop([gridapp.gate_key(f"{tag}:hold")], timeout=20)
    return value


@girder.task(bind=True, name="grid.fanout")
def fanout(self, n, grandchildren=0, tag=""):
    count_run(self)
    if grandchildren:
        sigs = [fanout.s(grandchildren, 0, f"{tag}.{i}") for i in range(n)]
    else:
        sigs = [leaf.s(f"{tag}.{i}") for i in range(n)]
    return sum(girder.requests(sigs))


@girder.task(bind=True, name="grid.leaf")
def leaf(self, tag):
    count_run(self)
    return 1


@girder.task(bind=True, name="grid.selfcycle")
def selfcycle(self, x):
    return selfcycle.call(x)


@girder.task(bind=True, name="grid.cycle_a")
def cycle_a(self, x):
    return cycle_b.call(x)


@girder.task(bind=True, name="grid.cycle_b")
def cycle_b(self, x):
    return cycle_a.call(x)


@girder.task(bind=True, name="grid.context")
def context(self, depth):
    r = self.request
    mine = {"id": r.id, "parent_id": r.parent_id, "root_id": r.root_id, "hostname": r.hostname}
    if depth == 0:
        return [mine]
    return [mine, *context.call(depth - 1)]


@girder.task(bind=True, name="grid.many_children")
def many_children(self, n, tag=""):
    """Requests n trivial children one by one (the inline-overhead benchmark's shape)."""
    total = 0
    for i in range(n):
        total += leaf.call(f"{tag}.{i}")
    return total


@girder.task(name="grid.bare_leaf")
def bare_leaf(tag):
    return 1


# -- helpers shared by tasks and tests ---------------------------------------------------------
#
# Gates let a test hold a task at a known point and release it when the test has seen what it
# waits for (no sleeps as synchronisation). A gate is a Redis list: a task blocks on BLPOP (bounded)
# and puts the token back, so one release opens the gate for every task waiting on it.

GATE_TIMEOUT = 30
#: Seconds of one BLPOP at a gate: less than redis-py's default socket timeout (5 s), which would
#: otherwise end a longer BLPOP with a TimeoutError.
GATE_SLICE = 1


def gate_key(name: str) -> str:
    return f"{gridapp.PREFIX}:test:rgate:{name}"


def open_gate(name: str) -> None:
    gridapp._counter.rpush(gate_key(name), "open")


def pass_gate(name: str) -> None:
    deadline = time.monotonic() + GATE_TIMEOUT
    while (item := gridapp._counter.blpop([gate_key(name)], timeout=GATE_SLICE)) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {name!r} was not opened within {GATE_TIMEOUT}s")
    gridapp._counter.rpush(gate_key(name), item[1])


def signals_key(task_id: str) -> str:
    return f"{gridapp.PREFIX}:test:signals:{task_id}"


#: Tasks whose task_prerun/task_postrun signals are counted (by task id) in Redis.
SIGNALLED = {"grid.context"}


def _on_prerun(sender=None, task_id=None, **_):
    if getattr(sender, "name", None) in SIGNALLED:
        gridapp._counter.hincrby(signals_key(task_id), "prerun", 1)


def _on_postrun(sender=None, task_id=None, state=None, **_):
    if getattr(sender, "name", None) in SIGNALLED:
        gridapp._counter.hincrby(signals_key(task_id), "postrun", 1)
        gridapp._counter.hset(signals_key(task_id), "state", str(state))


# dispatch_uid: this module is reloaded with tests.gridapp; the handlers must be connected once.
# (A reload re-executes in the same module dict, so the first-connected handlers see new globals.)
signals.task_prerun.connect(_on_prerun, weak=False, dispatch_uid="girder-tests-prerun")
signals.task_postrun.connect(_on_postrun, weak=False, dispatch_uid="girder-tests-postrun")


# -- the seed's bogosity workload --------------------------------------------------------------


@girder.task(bind=True, name="grid.bogosity")
def bogosity(self, msec, jobnum, reclevel, numrecjobs, args):
    """The Clojure post's bogosity, transcribed: request ``reclevel`` sub-jobs one level down."""
    count_run(self)
    vs = girder.requests([bogosity.s(msec, k, reclevel - 1, numrecjobs, args) for k in range(reclevel)])
    time.sleep(msec / 1000)
    return f"Bogosity:{self.request.hostname}:{jobnum}:{msec}:{reclevel}:{args}:[{','.join(map(str, vs))}]"


# -- tasks that hold at a gate -----------------------------------------------------------------


@girder.task(bind=True, name="grid.held")
def held(self, gate, tag=""):
    """Runs until the test opens ``gate``; returns where it ran."""
    count_run(self)
    pass_gate(gate)
    return {"tag": tag, "node": self.request.hostname}


@girder.task(bind=True, name="grid.requests_held")
def requests_held(self, gate, who=""):
    """Requests ``held(gate)``: several of these with different ``who`` share that one child."""
    count_run(self)
    return {"who": who, "child": held.call(gate)}


@girder.task(bind=True, name="grid.requests_requests_held")
def requests_requests_held(self, gate):
    """Requests ``requests_held(gate)``: the Clojure deadlock's C, when A is requests_held."""
    count_run(self)
    return requests_held.call(gate)


@girder.task(bind=True, name="grid.outlives")
def outlives(self, gate, tag):
    """Requests ``fanout(2, 0, tag)`` (which requests two leaves), then runs on until the test
    opens ``gate``: a root that outlives its sub-request's settle by as long as the test likes."""
    count_run(self)
    total = fanout.call(2, 0, tag)
    pass_gate(gate)
    return total


@girder.task(bind=True, name="grid.sleepy_parent")
def sleepy_parent(self, n, seconds, tag):
    """Requests ``n`` distinct children that each sleep ``seconds``."""
    count_run(self)
    return girder.requests([slow.s(seconds, tag=f"{tag}.{i}") for i in range(n)])


@girder.task(bind=True, name="grid.cross_a")
def cross_a(self, tag):
    """Waits at gate ``<tag>:a``, then requests cross_b(tag), which requests cross_a(tag)."""
    count_run(self)
    pass_gate(f"{tag}:a")
    return cross_b.call(tag)


@girder.task(bind=True, name="grid.cross_b")
def cross_b(self, tag):
    count_run(self)
    pass_gate(f"{tag}:b")
    return cross_a.call(tag)


# -- Celery's guard against AsyncResult.get() in a task ----------------------------------------


@girder.task(bind=True, name="grid.plain_get")
def plain_get(self, task_id):
    """Waits the plain Celery way, which Celery forbids inside a task."""
    count_run(self)
    return self.app.AsyncResult(task_id).get(timeout=2)


@girder.task(bind=True, name="grid.requests_plain_get")
def requests_plain_get(self, task_id):
    count_run(self)
    return plain_get.call(task_id)


@girder.task(bind=True, name="grid.tagged_context")
def tagged_context(self, depth, tag):
    """Like ``grid.context``, but ``tag`` makes its keys (its Celery task ids) unique to a test:
    the result backend is shared by the session's grids, and Celery never overwrites a SUCCESS."""
    mine = [self.request.id, self.request.hostname, tag]
    return [mine] if depth == 0 else [mine, *tagged_context.call(depth - 1, tag)]
