"""Tasks of the canvas suite: girder tasks to chain, group and map, and plain Celery callbacks
that record what they were called with (so a test can count how often each fired)."""

import json

from tests.gridapp import PREFIX, _counter, app, count_run, girder


def record_key(tag: str) -> str:
    return f"{PREFIX}:test:record:{tag}"


@girder.task(bind=True, name="grid.total")
def total(self, values):
    """The sum of a list: a chord's body, or a chain's step after a group."""
    count_run(self)
    return sum(values)


@girder.task(bind=True, name="grid.square")
def square(self, x):
    count_run(self)
    return x * x


@app.task(name="grid.record")
def record(value, tag):
    """A plain callback: appends what it was given (a value, or an errback's task id)."""
    _counter.rpush(record_key(tag), json.dumps(value))
    return value
