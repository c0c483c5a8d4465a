"""Tasks of the tier suite: fan-outs whose children report the node that ran them."""

import time

from tests.gridapp import count_run, girder


@girder.task(bind=True, name="grid.tier_child")
def tier_child(self, seconds, tag):
    count_run(self)
    time.sleep(seconds)
    return self.request.hostname


@girder.task(bind=True, name="grid.tier_fan")
def tier_fan(self, n, seconds, tag):
    """Requests ``n`` distinct children of ``seconds`` each; the nodes that ran them, in order."""
    count_run(self)
    nodes = girder.requests([tier_child.s(seconds, f"{tag}.{i}") for i in range(n)], timeout=60)
    return {"parent": self.request.hostname, "children": nodes}


@girder.task(bind=True, name="grid.tier_fan_newest_long")
def tier_fan_newest_long(self, n, seconds, tag):
    """Requests ``n`` distinct children at once, all trivial but the newest (which its waiter runs
    first), of ``seconds``; the nodes that ran them, in order."""
    count_run(self)
    nodes = girder.requests(newest_long_children(n, seconds, tag), timeout=60)
    return {"parent": self.request.hostname, "children": nodes}


def newest_long_children(n, seconds, tag):
    """``tier_fan_newest_long``'s children, in order: ``n - 1`` trivial ones, then one of ``seconds``."""
    return [tier_child.s(0, f"{tag}.{i}") for i in range(n - 1)] + [tier_child.s(seconds, f"{tag}.newest")]
