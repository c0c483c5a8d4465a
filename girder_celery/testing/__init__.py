"""Real servers and grids for tests, benchmarks and demos, no fakes: a private ``redis-server``,
``celery worker`` subprocesses, the machine's RabbitMQ (``servers``), a master with its replica and
a sentinel (``sentinel``), a Redis Cluster of three masters (``cluster``), and ``LocalGrid``, the
workers of one app module started side by side and awaited until each is ready, which the app
says by calling ``announce_ready(app)`` where it is defined (``grid``). ``worker_app`` is the app
module of the pytest plugin's workers: a user's app, configured from the environment.

It sits at the bottom of the package's layers: it imports none of girder_celery's other modules.
"""

from .cluster import ClusterGroup
from .grid import QUIET_FLAGS, READY_KEY_ENV, READY_URL_ENV, LocalGrid, announce_ready
from .sentinel import Failover, SentinelGroup, TlsFiles
from .servers import (
    AMQP_URL,
    CeleryWorker,
    RedisServer,
    amqp_unreachable,
    delete_amqp_queue,
    free_port,
    redis_server_binary,
)

__all__ = [
    "AMQP_URL", "QUIET_FLAGS", "READY_KEY_ENV", "READY_URL_ENV", "CeleryWorker", "ClusterGroup", "Failover",
    "LocalGrid", "RedisServer", "SentinelGroup", "TlsFiles", "amqp_unreachable", "announce_ready", "delete_amqp_queue",
    "free_port", "redis_server_binary",
]  # fmt: skip
