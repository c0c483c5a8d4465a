"""Cancelling a request tree, from a client or from Celery's revoke (invariant 1: the store is the truth).

``cancel`` fails a request in flight and every sub-request of it that no other live request
waits for (the walk of ``tree.py``, each request failed by ``lua/cancelled.lua``): their waiters
get a ``GirderCancelled`` at once, a claim of a cancelled record refuses, so queued ones never
run, and nothing is memoized, so an identical request made afterwards runs at once. A cancelled
run stops at its next girder call at the latest (its submit is answered ``cancelled``) or as its
wait wakes; a run from its own message on a pool that can end a job (prefork) is terminated
there, by Celery's own ``Request.terminate`` (the ``girder_terminate`` control command, sent to
the nodes that run them), and the pool replaces the process: the node lives on.

Celery's revoke (``AsyncResult(key).revoke()``, ``app.control.revoke``, Flower's button) reaches
every worker as the ``revoke`` control command, which would put the id in the worker's revoked
set for hours: since a girder id is the request key, every identical request made meanwhile
would be dropped unrun while the store says it is queued. ``install_revoke`` handles a girder
key on both ends, other ids going on to Celery as before:

- in the process that revokes (a client, Flower, ``celery control``: any process that built the
  app's ``Girder``), ``app.control.revoke`` cancels it at once, with no revoke broadcast: a busy
  solo worker handles control commands only between tasks, and the cancel must not wait for it;
- in every worker, the ``revoke`` command (sent by a process without girder) cancels it instead,
  and the key never enters the revoked set (it is taken out, should a statedb have restored it).

The set is not needed for girder keys: what it does for Celery (drop a revoked task's messages)
the store does, since a cancelled record refuses every claim.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

import redis
from celery import Celery
from celery.utils.functional import maybe_list
from celery.utils.imports import symbol_by_name
from celery.worker import state as worker_state
from celery.worker.control import Panel, control_command

from .errors import GirderError
from .graph import keep_graph
from .keys import is_key
from .runtime import Runtime

__all__ = ["TERMINATE", "cancel", "install_revoke"]

logger = logging.getLogger(__name__)

#: The control command that terminates cancelled runs on the nodes that run them.
TERMINATE = "girder_terminate"


def cancel(runtime: Runtime, key: str, how: str = "girder.cancel") -> list[str]:
    """Cancel request ``key`` and its sub-requests that no other live request waits for: the
    keys cancelled, ``key`` first (none if it is not in flight). ``how`` names who cancelled."""
    store, settings = runtime.store, runtime.settings
    ttl_ms = settings.error_ttl_ms(None, False)
    with store.reachable():
        _, cancelled, running = store.cancel(
            key, f"cancelled ({how})", f"cancelled with the request {key} that needed it ({how})", ttl_ms
        )
    if running:
        _terminate(runtime.app, running)
    for done in cancelled:  # AsyncResult(key).get() says so instead of waiting
        try:
            runtime.app.backend.mark_as_revoked(done, reason=f"girder: cancelled ({how})")
        except Exception:
            logger.info("girder: could not mark %s revoked in the result backend", done, exc_info=True)
    if cancelled:  # its run, if any, may be terminated (or its node gone) before it keeps its graph
        keep_graph(store, key)
    return cancelled


def _terminate(app: Celery, running: list[tuple[str, str]]) -> None:
    nodes = sorted({node for _, node in running if node})
    try:
        app.control.broadcast(TERMINATE, arguments={"keys": [key for key, _ in running]}, destination=nodes or None)
    except Exception:  # they stop at their next girder call anyway
        logger.warning("girder: could not ask %s to terminate cancelled runs", nodes, exc_info=True)


@control_command(args=[("keys", list)], signature="[key ...]")
def girder_terminate(state: Any, keys: list[str] | tuple[str, ...] = (), **kwargs: Any) -> dict[str, str]:
    """Terminate this node's runs of cancelled girder requests, where its pool can (prefork)."""
    wanted, ended = set(keys), []
    for request in list(worker_state.active_requests):
        if request.id in wanted and getattr(request.task, "runtime", None) is not None:
            try:
                request.terminate(state.consumer.pool, signal=signal.SIGTERM)
            except NotImplementedError:  # solo, threads, gevent: it stops at its next girder call
                break
            ended.append(request.id)
            logger.info("girder: terminated the cancelled run of %s[%s]", request.task.name, request.id)
    return {"ok": f"terminated {', '.join(ended) or 'nothing'}"}


def _split(ids: Any) -> tuple[list[str], list[Any]]:
    """The girder keys among revoked ``ids`` (one or a list), and the others."""
    given = maybe_list(ids) or []
    keys = [i for i in given if isinstance(i, str) and is_key(i)]
    return keys, [i for i in given if not (isinstance(i, str) and is_key(i))]


def _control_class(runtime: Runtime, base: type) -> type:
    class GirderControl(base):  # type: ignore[misc, valid-type]
        def revoke(self, task_id: Any, destination: Any = None, terminate: bool = False, **kwargs: Any) -> Any:
            keys, others = _split(task_id)
            for key in keys:
                _cancel_revoked(runtime, key)
            if others or not keys:
                return super().revoke(others, destination=destination, terminate=terminate, **kwargs)
            return None

    return GirderControl


def _cancel_revoked(runtime: Runtime, key: str) -> None:
    try:
        cancelled = cancel(runtime, key, "revoked")
    except (GirderError, redis.RedisError):
        logger.warning("girder: could not cancel revoked request %s", key, exc_info=True)
    else:
        if cancelled:
            logger.info("girder: revoked request %s cancelled (%d request(s))", key, len(cancelled))


def install_revoke(runtime: Runtime) -> None:
    """Make a revoke of a girder key cancel it: ``runtime.app.control.revoke`` here (its class
    is subclassed, so the app's configuration is not read yet), and Celery's ``revoke`` control
    command in workers (wrapped once per process, for every app)."""
    app = runtime.app
    if "control" in app.__dict__:  # built already
        app.control.__class__ = _control_class(runtime, type(app.control))
    else:
        app.control_cls = _control_class(runtime, symbol_by_name(app.control_cls))
    celery_revoke = Panel.data["revoke"]
    if getattr(celery_revoke, "girder", False):
        return

    def revoke(state: Any, task_id: Any, terminate: bool = False, signal: Any = None, **kwargs: Any) -> Any:
        found = getattr(state.app, "girder_runtime", None)
        keys, others = _split(task_id) if found is not None else ([], maybe_list(task_id) or [])
        for key in keys:
            _cancel_revoked(found, key)
            worker_state.revoked.discard(key)
        if others or not keys:
            return celery_revoke(state, others, terminate, signal, **kwargs)
        return {"ok": f"girder requests {', '.join(keys)} cancelled"}

    revoke.girder = True  # type: ignore[attr-defined]
    Panel.data["revoke"] = revoke
