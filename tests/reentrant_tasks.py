"""Tasks that request other tasks while they run (the re-entrant suite)."""

from tests.gridapp import count_run, girder


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
