"""Canonical encoding of requests and their keys (invariant 6).

A request is a task name, an optional version and the call's arguments bound to the function's
signature with defaults applied, so every spelling of the same call encodes to the same text.
The encoding is typed and exact: ``1``, ``1.0``, ``True`` and ``"1"`` differ, ``{1: x}`` and
``{"1": x}`` differ, dict order never matters, and a tuple encodes as the list with the same items.
The canonical text is both what is hashed (SHA-256) and the payload a worker decodes to call the
function, so the function receives exactly what the key describes (tuples arrive as lists).
A :class:`Request` is one such call, ready to submit. Values (results) travel and rest as kombu's
JSON (invariant 7); ``unique_id`` makes the ids of owners and mailboxes.

Supported argument types: ``None``, ``bool``, ``int``, ``float``, ``str``, ``bytes``, ``list``,
``tuple``, ``dict`` (keys of type ``str``, ``int``, ``float``, ``bool`` or ``None``),
``datetime.datetime``, ``datetime.date``, ``datetime.time``, ``decimal.Decimal`` and ``uuid.UUID``.
Anything else raises ``TypeError`` naming the argument's path, e.g. ``args[0]['a'][2]``, and so does
an argument nesting more than ``MAX_DEPTH`` (100) lists, tuples and dicts.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import hashlib
import inspect
import itertools
import json
import os
import re
import reprlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery import Task
from kombu.utils import json as kombu_json

__all__ = [
    "MAX_DEPTH", "Request", "bind_arguments", "binder", "check_key", "decode_payload", "decode_value", "encode_payload",
    "encode_value", "is_key", "readable", "readable_args", "request_key", "unique_id",
]  # fmt: skip

#: Marker of a tagged value; a user dict holding this key is itself encoded tagged.
TAG = "__girder__"

#: Most lists, tuples and dicts an argument may nest (it counts as one level itself): deeper
#: is refused with a ``TypeError`` naming the path, where Python's recursion limit would raise
#: a bare ``RecursionError`` somewhere between here and the worker.
MAX_DEPTH = 100

_SCALARS = (str, int, float, type(None))
_KEY_TYPES = (str, int, float, bool, type(None))
# ASCII escapes keep every str encodable, lone surrogates (os.fsdecode) included.
_dumps = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True).encode


def _tagged(tag: str, value: Any) -> dict:
    return {TAG: tag, "v": value}


class _Refused(Exception):
    """Raised by the encoder at an argument it cannot encode; ``_refusal`` says where and why."""


def _encode(value: Any, depth: int) -> Any:
    # ``depth``: how many lists, tuples and dicts enclose ``value`` within its argument. The
    # encoder builds no paths (every cache hit encodes its arguments); a refusal walks them again.
    t = type(value)
    if t is bool or t in _SCALARS:
        return value
    if t is list or t is tuple:
        if depth >= MAX_DEPTH:
            raise _Refused
        depth += 1
        return [_encode(v, depth) for v in value]
    if t is dict:
        if depth >= MAX_DEPTH:
            raise _Refused
        return _encode_dict(value, depth + 1)
    if t is bytes:
        return _tagged("bytes", base64.b64encode(value).decode("ascii"))
    if t is dt.datetime:
        return _tagged("datetime", value.isoformat())
    if t is dt.date:
        return _tagged("date", value.isoformat())
    if t is dt.time:
        return _tagged("time", value.isoformat())
    if t is decimal.Decimal:
        return _tagged("decimal", str(value))
    if t is uuid.UUID:
        return _tagged("uuid", str(value))
    raise _Refused


def _encode_dict(value: dict, depth: int) -> Any:
    if all(type(k) is str for k in value) and TAG not in value:
        return {k: _encode(v, depth) for k, v in value.items()}
    items = []
    for k, v in value.items():
        if type(k) not in _KEY_TYPES:
            raise _Refused
        items.append([k, _encode(v, depth)])
    items.sort(key=lambda kv: _dumps(kv[0]))
    return _tagged("dict", items)


_TAGGED_TYPES = (bytes, dt.datetime, dt.date, dt.time, decimal.Decimal, uuid.UUID)


def _refusal(args: tuple | list, kwargs: dict) -> TypeError:
    """The first argument the encoder refused, in its order, as a ``TypeError`` naming its path."""
    named = [(f"args[{i}]", v) for i, v in enumerate(args)] + [(f"kwargs[{k!r}]", v) for k, v in kwargs.items()]
    for path, value in named:
        error = _problem(value, path, 0)
        if error is not None:
            return error
    return TypeError("girder could not encode these arguments")  # the encoder and _problem disagree


def _problem(value: Any, path: str, depth: int) -> TypeError | None:
    t = type(value)
    if t is bool or t in _SCALARS or t in _TAGGED_TYPES:
        return None
    if t is list or t is tuple or t is dict:
        if depth >= MAX_DEPTH:
            shown = path if len(path) <= 80 else f"{path[:60]}...{path[-16:]}"
            return TypeError(
                f"{shown} is nested deeper than {MAX_DEPTH} levels of lists, tuples and dicts, "
                "girder's limit for arguments (girder_celery.keys.MAX_DEPTH)"
            )
        items = value.items() if t is dict else enumerate(value)
        for k, v in items:
            if t is dict and type(k) not in _KEY_TYPES:
                return TypeError(
                    f"{path} has a dict key of unsupported type {type(k).__name__} ({k!r}); "
                    "girder dict keys must be str, int, float, bool or None"
                )
            error = _problem(v, f"{path}[{k!r}]" if t is dict else f"{path}[{k}]", depth + 1)
            if error is not None:
                return error
        return None
    return TypeError(
        f"{path} has unsupported type {t.__module__}.{t.__qualname__} ({reprlib.repr(value)}); "
        "girder arguments must be JSON-family values (see girder_celery.keys)"
    )


_DECODERS: dict[str, Callable[[Any], Any]] = {
    "bytes": lambda v: base64.b64decode(v),
    "datetime": dt.datetime.fromisoformat,
    "date": dt.date.fromisoformat,
    "time": dt.time.fromisoformat,
    "decimal": decimal.Decimal,
    "uuid": uuid.UUID,
}


def _decode(value: Any) -> Any:
    t = type(value)
    if t is list:
        return [_decode(v) for v in value]
    if t is not dict:
        return value
    tag = value.get(TAG)
    if tag is None:
        return {k: _decode(v) for k, v in value.items()}
    if tag == "dict":
        return {_decode(k): _decode(v) for k, v in value["v"]}
    return _DECODERS[tag](value["v"])


def bind_arguments(signature: inspect.Signature | None, args: tuple | list, kwargs: dict) -> tuple[tuple, dict]:
    """Bind a call to ``signature`` with defaults applied: its canonical (args, kwargs).

    Raises ``TypeError`` (Python's own message) when the call does not fit the signature.
    """
    if signature is None:
        return tuple(args), dict(kwargs)
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.args, bound.kwargs


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def binder(signature: inspect.Signature | None) -> Callable[[tuple | list, dict], tuple[tuple, dict]]:
    """:func:`bind_arguments` for one signature, made once per task: a call passing only
    positional arguments to a function with only positional parameters (the common case, and
    every cache hit pays for binding) skips ``Signature.bind`` and gets the same result."""
    params = list(signature.parameters.values()) if signature is not None else []
    if signature is None or any(p.kind not in _POSITIONAL for p in params):
        return lambda args, kwargs: bind_arguments(signature, args, kwargs)
    defaults = tuple(p.default for p in params)
    required = max((i + 1 for i, p in enumerate(params) if p.default is inspect.Parameter.empty), default=0)

    def bind(args: tuple | list, kwargs: dict) -> tuple[tuple, dict]:
        if kwargs or not required <= len(args) <= len(params):
            return bind_arguments(signature, args, kwargs)
        return tuple(args) + defaults[len(args) :], {}

    return bind


def encode_payload(args: tuple | list, kwargs: dict) -> str:
    """The canonical text of bound arguments; ``TypeError`` names any unsupported argument."""
    try:
        encoded_args = [_encode(v, 0) for v in args]
        encoded_kwargs = {k: _encode(v, 0) for k, v in kwargs.items()}
    except _Refused:
        raise _refusal(args, kwargs) from None
    return _dumps([encoded_args, encoded_kwargs])


def decode_payload(payload: str) -> tuple[list, dict]:
    """The (args, kwargs) a payload from :func:`encode_payload` describes."""
    args, kwargs = json.loads(payload)
    return [_decode(v) for v in args], {k: _decode(v) for k, v in kwargs.items()}


def key_of_payload(name: str, version: str | None, payload: str) -> str:
    """SHA-256 over name, version and canonical payload: the key and the Celery task id."""
    head = _dumps([name, version])
    return hashlib.sha256(f"{head}\n{payload}".encode()).hexdigest()


def request_key(
    name: str,
    args: tuple | list = (),
    kwargs: dict | None = None,
    version: str | None = None,
    signature: inspect.Signature | None = None,
) -> str:
    """The canonical key of a request.

    Args:
        name: the task's registered name.
        args: positional arguments.
        kwargs: keyword arguments.
        version: the task's ``version`` option, part of the key.
        signature: the function's signature; when given, arguments are bound to it first so
            every spelling of the same call gives the same key (``task.key()`` passes it).
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"request name must be a non-empty str, not {name!r}")
    if version is not None and not isinstance(version, str):
        raise TypeError(f"version must be a str or None, not {version!r}")
    bargs, bkwargs = bind_arguments(signature, args, kwargs or {})
    return key_of_payload(name, version, encode_payload(bargs, bkwargs))


_repr = reprlib.Repr()
_repr.maxstring = 60
_repr.maxother = 60


def readable_args(value: tuple | list | dict) -> str:
    """A short repr of positional or keyword arguments, for Celery's argsrepr and kwargsrepr."""
    return _repr.repr(value)


def readable(name: str, args: tuple | list, kwargs: dict) -> str:
    """A short human form of a request: ``proj.tasks.divide(1, 0)``."""
    parts = [_repr.repr(a) for a in args]
    parts += [f"{k}={_repr.repr(v)}" for k, v in kwargs.items()]
    return f"{name}({', '.join(parts)})"


_KEY_RE = re.compile(r"^[0-9a-f]{64}$")


def is_key(text: Any) -> bool:
    """Whether ``text`` has the form of a request key: 64 lowercase hex digits."""
    return isinstance(text, str) and _KEY_RE.match(text) is not None


def check_key(text: Any) -> str:
    """``text`` if it is a request key, else ``ValueError`` saying what a key looks like."""
    if not is_key(text):
        raise ValueError(f"not a girder key (64 lowercase hex digits): {text!r}")
    return text


@dataclass(frozen=True, slots=True)
class Request:
    """A girder request ready to submit: the task, its key and its canonical payload, and the
    pool (queue) it is offered on when it is not the task's own."""

    task: Task
    key: str
    payload: str
    args: tuple
    kwargs: dict
    pool: str | None = None

    @property
    def readable(self) -> str:
        return readable(self.task.name, self.args, self.kwargs)


def encode_value(value: Any) -> str:
    """A result as it is stored and sent: kombu's JSON (datetime, Decimal, UUID, bytes too);
    ``TypeError`` for a value it cannot encode."""
    return kombu_json.dumps(value)


def decode_value(text: str) -> Any:
    """A result stored by :func:`encode_value`."""
    return kombu_json.loads(text)


_nonce: tuple[int, str] = (0, "")
_counter = itertools.count()


def unique_id() -> str:
    """Unique across processes and time: a random nonce drawn once per process, and a counter
    (cheaper than a uuid4 per claim or mailbox, which costs a system call)."""
    global _nonce
    if _nonce[0] != os.getpid():
        _nonce = (os.getpid(), uuid.uuid4().hex[:16])
    return f"{_nonce[1]}{next(_counter):x}"
