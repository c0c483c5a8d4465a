"""The bogosity workload as a DAG, and the ideal time against which its runs are judged.

``bogosity(msec, jobnum, reclevel, ...)`` requests ``bogosity(msec, k, reclevel - 1, ...)`` for
every ``k < reclevel`` and, once they are all done, sleeps ``msec``. Identical requests run once,
so ``jobs`` top-level jobs at level ``reclevel`` make ``jobs`` + 3 + 2 + 1 distinct requests for
``reclevel = 3``: each level needs every request of the level below.

The ideal is the optimal makespan of that DAG on ``executors`` identical executors with zero
overhead, a request's own ``msec`` starting only after all its sub-requests finish. All requests
take the same time, so some optimal schedule starts every request at a multiple of ``msec``
(round each start down to one: precedence and capacity still hold), and ``optimal_slots`` finds
the fewest such slots exactly, by breadth-first search over the sets of finished requests.
"""

from __future__ import annotations

import itertools
import math

__all__ = ["bogosity_dag", "critical_path", "level_formula", "optimal_slots"]

Node = tuple[int, int]  # (reclevel, jobnum)


def bogosity_dag(jobs: int, reclevel: int) -> dict[Node, list[Node]]:
    """Each distinct request ``(reclevel, jobnum)`` and the distinct requests it makes."""
    dag: dict[Node, list[Node]] = {}
    todo = [(reclevel, j) for j in range(jobs)]
    while todo:
        node = todo.pop()
        if node in dag:
            continue
        level = node[0]
        dag[node] = [(level - 1, k) for k in range(level)]
        todo.extend(dag[node])
    return dag


def critical_path(dag: dict[Node, list[Node]]) -> int:
    """The longest chain of requests (in requests)."""
    depth: dict[Node, int] = {}

    def walk(node: Node) -> int:
        if node not in depth:
            depth[node] = 1 + max((walk(sub) for sub in dag[node]), default=0)
        return depth[node]

    return max(walk(node) for node in dag)


def optimal_slots(dag: dict[Node, list[Node]], executors: int) -> int:
    """The fewest equal time slots running every request, ``executors`` at a time, each after
    all its sub-requests: exact. Finishing more never hurts, so a slot runs every ready request
    when they fit, else every choice of ``executors`` of them is explored."""
    names = sorted(dag)
    index = {name: i for i, name in enumerate(names)}
    needs = [sum(1 << index[sub] for sub in dag[name]) for name in names]
    everything = (1 << len(names)) - 1
    frontier, slots = {0}, 0
    while everything not in frontier:
        following = set()
        for done in frontier:
            ready = [i for i in range(len(names)) if not done >> i & 1 and needs[i] & done == needs[i]]
            groups = [ready] if len(ready) <= executors else itertools.combinations(ready, executors)
            for group in groups:
                following.add(done | sum(1 << i for i in group))
        frontier, slots = following, slots + 1
    return slots


def level_formula(dag: dict[Node, list[Node]], executors: int) -> tuple[str, int]:
    """Slots when levels run one after another (each needs all of the level below), spelled out
    as ``ceil(1/2) + ceil(2/2) + ceil(3/2) + ceil(10/2) = 1 + 1 + 2 + 5``, and its value."""
    sizes = [sum(1 for level, _ in dag if level == lv) for lv in sorted({level for level, _ in dag})]
    slots = [math.ceil(n / executors) for n in sizes]
    text = " + ".join(f"ceil({n}/{executors})" for n in sizes) + " = " + " + ".join(map(str, slots))
    return text, sum(slots)
