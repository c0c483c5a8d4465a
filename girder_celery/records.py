"""Reports over all of the store's records: per-task stats, the requests running, a task's
memoized values forgotten in bulk.

The per-task counters cost the hot path nothing beyond the scripts it calls anyway: a run is
counted by ``lua/complete.lua`` or ``lua/fail.lua``, a cache hit by ``lua/submit.lua``, in the
``<prefix>:stats`` hash. Reading every record (the record count, ``active``, ``forget_task``)
walks the store with ``SCAN`` in bounded batches, never ``KEYS``, so a large store is never
blocked for long, each batch read in one pipelined round trip.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import redis

from .keys import key_of_payload
from .store import StateStore, Verdict, glob_escape, int_field

__all__ = ["SCAN_BATCH", "active", "forget_task", "reset_stats", "stats"]

#: Records asked for per ``SCAN`` call (and read per pipelined round trip).
SCAN_BATCH = 500
_COUNTERS = {"runs": "executions", "hits": "cache_hits", "failures": "failures", "ms": "run_ms"}
_ACTIVE = ("state", "request", "name", "node", "owner", "parent", "placement", "started_at", "lease_until")


def record_keys(store: StateStore) -> Iterator[list[str]]:
    """The keys of the store's records, a ``SCAN`` batch at a time (of every master, on a
    Redis Cluster)."""
    pattern = glob_escape(store.record_prefix) + "{*"
    names = store.client.scan_iter(match=pattern, count=SCAN_BATCH)
    while batch := list(itertools.islice(names, SCAN_BATCH)):
        yield [store.key_of(name) for name in batch]


def stats(store: StateStore) -> dict[str, Any]:
    """Per task since the last reset (``since``, seconds since the epoch, None if never reset):
    ``executions``, ``cache_hits``, ``failures``, ``run_seconds`` (total) and
    ``mean_run_seconds``; and the store's ``records`` and ``memory_bytes`` (the whole server's,
    every master's on a Redis Cluster; None where its ACL refuses ``INFO``)."""
    with store.reachable():
        counters = store.client.hgetall(store.stats_key)
        records = sum(len(batch) for batch in record_keys(store))
        memory = _memory(store)
    since = counters.pop("since", None)
    tasks: dict[str, dict[str, Any]] = {}
    for field, count in counters.items():
        kind, _, name = field.partition(":")
        if kind in _COUNTERS and name:
            tasks.setdefault(name, dict.fromkeys(_COUNTERS.values(), 0))[_COUNTERS[kind]] = int(count)
    for task in tasks.values():
        run_ms = task.pop("run_ms")
        task["run_seconds"] = run_ms / 1000
        task["mean_run_seconds"] = run_ms / 1000 / task["executions"] if task["executions"] else None
    return {
        "since": int(since) / 1000 if since else None,
        "tasks": dict(sorted(tasks.items())),
        "records": records,
        "memory_bytes": memory,
    }


def _memory(store: StateStore) -> int | None:
    try:
        if isinstance(store.client, redis.RedisCluster):  # every master's, summed
            found = store.client.info("memory", target_nodes=redis.RedisCluster.PRIMARIES)
            return sum(info.get("used_memory", 0) for info in found.values())
        return store.client.info("memory").get("used_memory")
    except redis.exceptions.NoPermissionError:  # an ACL without INFO (see the README)
        return None


def reset_stats(store: StateStore) -> None:
    """Start the per-task counters afresh, from now."""
    with store.reachable():
        seconds, micros = store.client.time()
        pipe = store.client.pipeline(transaction=True)
        pipe.delete(store.stats_key)
        pipe.hset(store.stats_key, "since", seconds * 1000 + micros // 1000)
        pipe.execute()


def active(store: StateStore) -> list[dict[str, Any]]:
    """The requests running now (inline runs included), the oldest first: ``key``, ``request``,
    ``task``, ``node``, ``owner``, ``parent`` (the request it runs for, None at top level),
    ``placement``, ``started_at`` (seconds since the epoch), ``age`` and ``lease`` (seconds
    left; below 0 once lapsed) by Redis's clock."""
    out = []
    with store.reachable():
        for batch in record_keys(store):
            records = _read(store, batch, _ACTIVE)
            # Redis's clock after the read, so no request read started after it (a negative age).
            seconds, micros = store.client.time()
            now_ms = seconds * 1000 + micros // 1000
            for key, record in zip(batch, records):
                if record.get("state") == "running":
                    out.append(_running(key, record, now_ms))
    return sorted(out, key=lambda r: -r["age"])


def forget_task(store: StateStore, name: str, version: str | None = None) -> list[str]:
    """Forget every settled request of task ``name`` (of one ``version`` only, if given: the key
    is recomputed from the record's payload), a ``SCAN`` batch at a time; requests in flight are
    left alone (``lua/forget.lua``). The keys forgotten."""
    forgotten = []
    with store.reachable():
        for batch in record_keys(store):
            mine = [
                key
                for key, record in zip(batch, _read(store, batch, ("name", "state", "payload")))
                if record.get("name") == name
                and record.get("state") in ("done", "failed")
                and (version is None or key_of_payload(name, version, record.get("payload") or "") == key)
            ]
            verdicts = store.forget_many(mine)
            forgotten += [key for key, verdict in zip(mine, verdicts) if verdict in (Verdict.DONE, Verdict.FAILED)]
    return forgotten


def _read(store: StateStore, keys: list[str], fields: tuple[str, ...]) -> list[dict[str, str]]:
    pipe = store.client.pipeline(transaction=False)
    for key in keys:
        pipe.hmget(store.record_key(key), fields)
    replies = pipe.execute(raise_on_error=False)
    return [dict(zip(fields, values)) if isinstance(values, list) else {} for values in replies]


def _running(key: str, record: dict[str, str], now_ms: int) -> dict[str, Any]:
    started, lease = int_field(record.get("started_at")), int_field(record.get("lease_until"))
    return {
        "key": key,
        "request": record.get("request"),
        "task": record.get("name"),
        "node": record.get("node"),
        "owner": record.get("owner"),
        "parent": record.get("parent") or None,
        "placement": record.get("placement"),
        "started_at": started / 1000 if started else None,
        "age": (now_ms - started) / 1000 if started else 0.0,
        "lease": (lease - now_ms) / 1000 if lease else None,
    }
