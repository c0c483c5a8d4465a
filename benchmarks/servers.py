"""Real servers for the benchmarks: a private ``redis-server`` and real ``celery worker`` processes.

Self-contained on purpose (it does not import ``tests``): a benchmark run owns its Redis on a free
port, starts ``celery -A benchmarks.benchapp worker`` subprocesses with the flags it prints, and
uses the machine's RabbitMQ (``$GIRDER_TEST_AMQP_URL``) with a queue of its own, deleted at the end.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from girder_celery.testing import CeleryWorker

ROOT = Path(__file__).resolve().parent.parent
AMQP_URL = os.environ.get("GIRDER_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


def amqp_reachable(url: str = AMQP_URL) -> str | None:
    """None if RabbitMQ answers at ``url``, else why not."""
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=1)
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def delete_amqp_queue(url: str, queue: str) -> None:
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=2) as conn:
            conn.default_channel.queue_delete(queue)
    except Exception as exc:
        print(f"  (could not delete RabbitMQ queue {queue}: {exc})", file=sys.stderr)


class Worker(CeleryWorker):
    """A real ``celery -A benchmarks.benchapp worker`` subprocess; ready when it says so in Redis."""

    def __init__(
        self, env: dict[str, str], hostname: str, flags: list[str], logdir: Path, python_args: tuple[str, ...] = ()
    ) -> None:
        log = logdir / f"{hostname.split('@')[0]}.log"
        super().__init__("benchmarks.benchapp", hostname, flags, env, log, ROOT, python_args)
