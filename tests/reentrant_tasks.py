"""Tasks that request other tasks while they run (the re-entrant suite)."""

from tests.gridapp import count_run, girder


@girder.task(bind=True, name="grid.ratio")
def ratio(self, i):
    count_run(self)
    from tests.gridapp import divide

    return divide.call(i, i - 1)
