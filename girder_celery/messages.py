"""Girder's message strategy: a malformed girder message is refused and logged, never fatal (invariant 1).

Celery's default strategy unpacks a task message's body as ``(args, kwargs, embed)`` unchecked: a
body of valid JSON but the wrong shape (``[1]``, ``"a string"``, ``{"a": 1}``, ``null``) raises
in the worker's consumer and stops the node ("Unrecoverable error"), again after every restart
while the message stays queued. ``GirderTask.Strategy`` names :func:`strategy`: each message of a
girder task is decoded and its shape checked before Celery's default strategy sees it, and a
bad one is handed back to Celery as ``InvalidTaskError``, which Celery logs (the message id and
why, then the body) and rejects without requeue; the node goes on serving. Undecodable bytes and
disallowed content types (pickle when only JSON is accepted) take the same path, never unpickled
(invariant 7).

A malformed message says nothing about its request: the state store's payload is the truth. If
its id is a girder key whose request is queued, its offer is withdrawn, so the request's waiters
offer it again, well formed from their own payload, at their next check (``girder_check_interval``)
instead of after ``girder_reoffer_after``. It is not failed: any copy can be forged or corrupted,
and a bad copy must not fail a good request.

Stock Celery has the same flaw for every task, and a plain task's malformed message would stop a
girder node as well: ``worker.MessageCheck`` puts plain tasks' strategies behind the same check
(:func:`checked`), without girder's own rules (embed keys, withdrawing offers). Well-formed
messages of plain tasks are handled exactly as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery.exceptions import InvalidTaskError
from celery.worker.strategy import default

from .keys import is_key

__all__ = ["checked", "message_problem", "strategy"]

logger = logging.getLogger(__name__)

#: What Celery's protocol puts in a message's ``embed`` (the body's third item), and the
#: type each value has when set. Any other key would be merged into the request context
#: (``id`` among them), so it is refused.
EMBED_TYPES: dict[str, type] = {"callbacks": list, "errbacks": list, "chain": list, "chord": dict}


def strategy(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Callable[..., Any]:
    """Celery's default strategy for girder task ``task``, behind a check of each message."""
    return checked(task, default(task, app, consumer, **kwargs), girder=True)


def checked(task: Any, handler: Callable[..., Any], girder: bool = False) -> Callable[..., Any]:
    """``handler`` (a strategy's message handler) behind :func:`message_problem`. For a girder
    task the embed may hold only Celery's own keys, and a refused key's offer is withdrawn."""

    def on_message(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **options: Any) -> Any:
        why = message_problem(message, body, girder)
        if why is not None:
            task_id = _task_id(message, body)
            if girder:
                _withdraw(task, task_id, message)
            raise InvalidTaskError(f"girder: refused message {task_id!r} of {task.name}: {why}")
        return handler(message, body, ack, reject, callbacks, **options)

    on_message.girder_checked = True  # type: ignore[attr-defined]
    return on_message


def message_problem(message: Any, body: Any, girder: bool = True) -> str | None:
    """What is wrong with a task message (protocol 2, or 1 when ``body`` is its decoded
    payload), or None if Celery can take it; ``girder``: refuse embed keys Celery never sends."""
    if body is None:  # protocol 2: the id is a header, the body is [args, kwargs, embed]
        headers = message.headers
        why = _id_problem(headers.get("id")) or _timelimit_problem(headers.get("timelimit"))
        if why is not None:
            return why
        try:
            payload = message.payload
        except Exception as exc:  # kombu's DecodeError, ContentDisallowed
            return f"its body cannot be decoded ({message.content_type}): {type(exc).__name__}: {exc}"
        if isinstance(payload, dict) and "args" in payload:  # Celery's hybrid form: a protocol 1 body
            return _proto1_problem(payload)
        if not isinstance(payload, (list, tuple)) or len(payload) != 3:
            return f"its body is not [args, kwargs, embed] but {_shape(payload)}"
        return _call_problem(*payload, girder)
    if not isinstance(body, dict):
        return f"its body is not a task message but {_shape(body)}"
    return _id_problem(body.get("id")) or _timelimit_problem(body.get("timelimit")) or _proto1_problem(body)


def _proto1_problem(body: dict) -> str | None:
    embed = {name: body.get(name) for name in ("callbacks", "errbacks", "chord")}
    return _call_problem(body.get("args", ()), body.get("kwargs", {}), embed, True)


def _call_problem(args: Any, kwargs: Any, embed: Any, girder: bool) -> str | None:
    if not isinstance(args, (list, tuple)):
        return f"its args are not a list but {_shape(args)}"
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        return f"its kwargs are not a dict of str keys but {_shape(kwargs)}"
    if not isinstance(embed, dict):
        return f"its embed (callbacks, errbacks, chain, chord) is not a dict but {_shape(embed)}"
    for name, value in embed.items():
        expected = EMBED_TYPES.get(name)
        if expected is None:
            if not girder:
                continue
            return f"its embed has a key {name!r} that is none of {sorted(EMBED_TYPES)}"
        if value is not None and not isinstance(value, expected):
            return f"its embed's {name} is not a {expected.__name__} or null but {_shape(value)}"
    return None


def _id_problem(task_id: Any) -> str | None:
    if isinstance(task_id, str) and task_id:
        return None
    return f"its id is not a non-empty string but {_shape(task_id)}"


def _timelimit_problem(limits: Any) -> str | None:
    if limits is None:
        return None
    if isinstance(limits, (list, tuple)) and len(limits) == 2 and all(_is_limit(v) for v in limits):
        return None
    return f"its timelimit is not [soft, hard] seconds but {_shape(limits)}"


def _is_limit(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _shape(value: Any) -> str:
    """A short description of a value: its type, and its length for a container."""
    if value is None:
        return "null"
    name = type(value).__name__
    article = "an" if name[0] in "aeiou" else "a"
    if isinstance(value, (list, tuple, dict, str, bytes)):
        return f"{article} {name} of length {len(value)}"
    return f"{article} {name}"


def _task_id(message: Any, body: Any) -> Any:
    return (body if isinstance(body, dict) else message.headers).get("id")


def _withdraw(task: Any, task_id: Any, message: Any) -> None:
    """Withdraw the offer of the request ``task_id`` names, if it is queued, so its waiters
    offer it again at their next check. A store error is logged: the consumer goes on."""
    if not is_key(task_id):
        return
    store = task.runtime.store
    try:
        queue = store.record(task_id).get("offered_on") or (message.delivery_info or {}).get("routing_key") or ""
        if store.unoffer(task_id, queue):
            logger.warning("girder: withdrew the offer of %s (a malformed copy): its waiters offer it again", task_id)
    except Exception:
        logger.warning("girder: could not withdraw the offer of %s after a malformed message", task_id, exc_info=True)
