"""Tasks of the result-backend and send_task suites: values that change from one run to the next."""

from tests.gridapp import PREFIX, _counter, girder


def _runs(tag: str) -> int:
    return _counter.incr(f"{PREFIX}:test:counted:{tag}")


@girder.task(bind=True, name="grid.counted")
def counted(self, tag):
    """How many times it has run for ``tag``: a re-run's value is not the last run's."""
    return _runs(tag)


@girder.task(bind=True, name="grid.fails_once")
def fails_once(self, tag):
    """Raises on its first run for ``tag`` (an uncached failure), then returns its run count."""
    runs = _runs(tag)
    if runs == 1:
        raise ValueError(f"first run of {tag} fails")
    return runs


@girder.task(bind=True, name="grid.counted_parent")
def counted_parent(self, tag):
    """Requests ``grid.counted(tag)`` (run inline by this executor) and returns its value in a list."""
    return [girder.request(counted.s(tag), timeout=15)]


@girder.task(bind=True, name="grid.counted_briefly", cache_ttl=1)
def counted_briefly(self, tag):
    """``grid.counted`` whose value the store keeps one second: it runs again, with a new value."""
    return _runs(tag)
