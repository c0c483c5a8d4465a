"""The app of the eager-mode tests (tests/test_eager.py): Celery with ``task_always_eager``.

Its broker, result backend and state store all point at ``LISTENER``, a port that accepts and
counts connections and never answers, so any client would hang and every test can check that
nothing connected. Tasks record their executions in ``RUNS``, in memory.
"""

from __future__ import annotations

import socket
import threading
import uuid

from celery import Celery

from girder_celery import Girder


class Listener:
    """A TCP port that accepts and counts connections, and never says a word."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)


LISTENER = Listener()
RUNS: list[str] = []  # request names, in the order they ran

app = Celery(
    "eagerapp",
    broker=f"redis://127.0.0.1:{LISTENER.port}/0",
    backend=f"redis://127.0.0.1:{LISTENER.port}/1",
    set_as_current=False,
)
app.conf.update(girder_url=f"redis://127.0.0.1:{LISTENER.port}/2", task_always_eager=True)
girder = Girder(app)


def ran(name: str, *args) -> None:
    RUNS.append(f"{name}{args}")


@girder.task(name="eager.add")
def add(x, y=0):
    ran("add", x, y)
    return x + y


@girder.task(name="eager.divide")
def divide(x, y):
    ran("divide", x, y)
    return x / y


@girder.task(name="eager.ratio")
def ratio(i):
    ran("ratio", i)
    return divide.call(i, i - 1)


@girder.task(name="eager.parent")
def parent(n):
    ran("parent", n)
    return sum(girder.requests([child.s(n, i) for i in range(2)]))


@girder.task(name="eager.child")
def child(n, i):
    ran("child", n, i)
    return girder.request(grandchild.s(n, i)) + 10


@girder.task(name="eager.grandchild")
def grandchild(n, i):
    ran("grandchild", n, i)
    return n * 100 + i


@girder.task(name="eager.top")
def top(x):
    ran("top", x)
    return girder.requests([left.s(x), right.s(x)])


@girder.task(name="eager.left")
def left(x):
    ran("left", x)
    return bottom.call(x) + 1


@girder.task(name="eager.right")
def right(x):
    ran("right", x)
    return bottom.call(x) + 2


@girder.task(name="eager.bottom")
def bottom(x):
    ran("bottom", x)
    return x * 10


@girder.task(name="eager.selfcycle")
def selfcycle(x):
    return selfcycle.call(x)


@girder.task(name="eager.ping")
def ping(x):
    return pong.call(x)


@girder.task(name="eager.pong")
def pong(x):
    return ping.call(x)


@girder.task(name="eager.kinds")
def kinds(*args, **kwargs):
    ran("kinds")
    keys = [type(k).__name__ for a in args if isinstance(a, dict) for k in a]
    return [[type(a).__name__ for a in args], {k: type(v).__name__ for k, v in kwargs.items()}, keys, list(args)]


@girder.task(name="eager.unserializable")
def unserializable(x):
    ran("unserializable", x)
    return {x}


@girder.task(name="eager.memo_fail", cache_errors=True)
def memo_fail(x):
    ran("memo_fail", x)
    raise ValueError(f"bad {x}")


@girder.task(name="eager.short_lived", cache_ttl=0.3)
def short_lived(x):
    ran("short_lived", x)
    return x


@girder.task(bind=True, name="eager.context")
def context(self, x):
    return {"id": self.request.id, "is_eager": self.request.is_eager}


@girder.task(name="eager.plain_get")
def plain_get(x):
    return add.delay(x).get()


@girder.task(name="eager.depth")
def depth(n):
    return 0 if n == 0 else depth.call(n - 1) + 1


@girder.task(bind=True, name="eager.retrying", autoretry_for=(ValueError,), max_retries=3, default_retry_delay=0)
def retrying(self, tag):
    ran("retrying", tag)
    if RUNS.count(f"retrying{(tag,)}") < 2:
        raise ValueError(f"first run of {tag} fails")
    return self.request.retries


@girder.task(name="eager.total")
def total(values):
    ran("total", values)
    return sum(values)


@app.task(name="eager.record")
def record(value, tag):
    RUNS.append(f"record{(value, tag)}")


def runs(name: str, *args) -> int:
    return RUNS.count(f"{name}{args}")


def fresh() -> int:
    return uuid.uuid4().int % 10**9
