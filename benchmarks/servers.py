"""Real servers for the benchmarks: a private ``redis-server`` and real ``celery worker`` processes.

Self-contained on purpose (it does not import ``tests``): a benchmark run owns its Redis on a free
port, starts ``celery -A benchmarks.benchapp worker`` subprocesses with the flags it prints, and
uses the machine's RabbitMQ (``$GIRDER_TEST_AMQP_URL``) with a queue of its own, deleted at the end.
"""

from __future__ import annotations

from pathlib import Path

from girder_celery.testing import CeleryWorker

ROOT = Path(__file__).resolve().parent.parent


class Worker(CeleryWorker):
    """A real ``celery -A benchmarks.benchapp worker`` subprocess; ready when it says so in Redis."""

    def __init__(
        self, env: dict[str, str], hostname: str, flags: list[str], logdir: Path, python_args: tuple[str, ...] = ()
    ) -> None:
        log = logdir / f"{hostname.split('@')[0]}.log"
        super().__init__("benchmarks.benchapp", hostname, flags, env, log, ROOT, python_args)
