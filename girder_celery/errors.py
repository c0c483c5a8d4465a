"""Errors: ``GirderError`` and its chain through sub-requests.

A failed request is stored as a JSON-family dict (never a pickled exception, invariant 7) and
rebuilt as a ``GirderError`` in every waiter. ``causes`` holds the failed sub-requests' errors,
so the chain from the outermost request to the innermost failure survives any number of hops.
``unreachable`` is the one place a Redis client's connection failure becomes a
``GirderConnectionError`` naming the state store (``refused``: a command its ACL refuses);
``corrupt`` makes the error for a record the state store holds in a form girder never writes.
"""

from __future__ import annotations

import re
import ssl
import traceback
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis

__all__ = [
    "CANCELLED",
    "CORRUPT",
    "GirderCancelled",
    "GirderConnectionError",
    "GirderError",
    "GirderNoGraph",
    "GirderTimeout",
    "corrupt",
]

#: The ``exc_type`` of the ``GirderError`` for a corrupt record.
CORRUPT = "girder_celery.CorruptRecord"
#: The ``exc_type`` of a cancelled request's error (``GirderCancelled``), as cancelled.lua stores it.
CANCELLED = "girder_celery.GirderCancelled"


class GirderError(Exception):
    """A girder request failed, or girder could not do what was asked.

    Attributes:
        key: the failed request's key, when there is one.
        request: the request in readable form, e.g. ``proj.tasks.divide(1, 0)``.
        exc_type: the qualified name of the exception raised remotely.
        message: that exception's message.
        remote_traceback: the traceback text from the executor that ran the request.
        causes: the ``GirderError`` of each failed sub-request this failure came from.
    """

    def __init__(
        self,
        message: str,
        *,
        key: str | None = None,
        request: str | None = None,
        exc_type: str | None = None,
        remote_traceback: str | None = None,
        causes: list[GirderError] | tuple[GirderError, ...] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.key = key
        self.request = request
        self.exc_type = exc_type
        self.remote_traceback = remote_traceback
        self.causes = list(causes)
        if self.causes:
            self.__cause__ = self.causes[0]

    def chain(self) -> list[GirderError]:
        """This error and its first cause, recursively: outermost first."""
        links, err = [self], self
        while err.causes:
            err = err.causes[0]
            links.append(err)
        return links

    def _line(self) -> str:
        what = f"{self.exc_type}: {self.message}" if self.exc_type else self.message
        return f"{self.request} failed: {what}" if self.request else what

    def __str__(self) -> str:
        links = self.chain()
        lines = [links[0]._line()] + [f"  caused by {e._line()}" for e in links[1:]]
        innermost = next((e for e in reversed(links) if e.remote_traceback), None)
        if innermost is not None:
            lines.append(f"Remote traceback of {innermost.request or innermost.key}:")
            lines.append(innermost.remote_traceback.rstrip())
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-family form stored in the state store."""
        return {
            "message": self.message,
            "key": self.key,
            "request": self.request,
            "exc_type": self.exc_type,
            "traceback": self.remote_traceback,
            "causes": [c.to_dict() for c in self.causes],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GirderError:
        """Rebuild an error stored by :meth:`to_dict` (a cancellation as a ``GirderCancelled``)."""
        kind = GirderCancelled if data.get("exc_type") == CANCELLED else cls
        return kind(
            data.get("message", ""),
            key=data.get("key"),
            request=data.get("request"),
            exc_type=data.get("exc_type"),
            remote_traceback=data.get("traceback"),
            causes=[cls.from_dict(c) for c in data.get("causes") or ()],
        )

    @classmethod
    def from_exception(cls, exc: BaseException, *, key: str, request: str) -> GirderError:
        """The error of a request whose function raised ``exc``."""
        causes = [e for e in _exception_chain(exc) if isinstance(e, GirderError)]
        exc_cls = type(exc)
        return cls(
            str(exc) if not isinstance(exc, GirderError) else "a sub-request failed",
            key=key,
            request=request,
            exc_type=f"{exc_cls.__module__}.{exc_cls.__qualname__}".removeprefix("builtins."),
            remote_traceback="".join(traceback.format_exception(exc)),
            causes=causes[:1] if isinstance(exc, GirderError) else causes,
        )


def _exception_chain(exc: BaseException) -> list[BaseException]:
    seen, out, cur = set(), [], exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


class GirderTimeout(GirderError, TimeoutError):
    """A wait ran out of time; ``key`` and ``state`` say what was still pending."""

    def __init__(self, message: str, *, key: str, state: str | None, request: str | None = None):
        super().__init__(message, key=key, request=request)
        self.state = state


class GirderCancelled(GirderError):
    """The request was cancelled (``girder.cancel``, or a revoke of its key), or the tree of a
    request it belonged to was; ``key`` and ``request`` name it. Never memoized."""

    def __init__(self, message: str, **kwargs: Any) -> None:
        kwargs.setdefault("exc_type", CANCELLED)
        super().__init__(message, **kwargs)


class GirderConnectionError(GirderError, ConnectionError):
    """The state store could not be reached; ``url`` names it (without its password)."""

    def __init__(self, message: str, *, url: str):
        super().__init__(message)
        self.url = url


class GirderNoGraph(GirderError, LookupError):
    """``girder.graph`` or ``girder.progress`` of a key that has no graph: the store knows no such
    request, it made no sub-requests, or its graph expired (``girder_graph_ttl``); ``key`` names it."""


#: What the Redis client raises when the state store is unreachable or is not a Redis server.
STORE_UNREACHABLE = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.InvalidResponse)


def unreachable(url: str, exc: BaseException) -> GirderConnectionError:
    """The error for a state store at ``url`` that could not be reached, or refused to let this
    client in (``exc`` says why)."""
    masked = safe_url(url)
    if isinstance(exc, redis.AuthenticationError):
        given = "" if urlsplit(url.split(";")[0]).password else " (the URL gives no password)"
        return GirderConnectionError(f"cannot log in to girder's state store at {masked}{given}: {exc}", url=masked)
    hint = ""
    if url.startswith("rediss://") and any(isinstance(e, ssl.SSLError) for e in _exception_chain(exc)):
        hint = " (TLS: check ssl_ca_certs, the server's CA, and ssl_certfile/ssl_keyfile, this client's certificate)"
    return GirderConnectionError(f"cannot reach girder's state store at {masked}: {exc}{hint}", url=masked)


def refused(url: str, exc: BaseException) -> GirderError:
    """The error for a command the state store at ``url`` refused: its ACL lacks it for this
    client's user, or it is out of memory and evicts nothing. Not a connection error: trying
    again at once cannot help."""
    if isinstance(exc, redis.exceptions.OutOfMemoryError):
        return GirderError(
            f"girder's state store at {safe_url(url)} is full: {exc} (raise its maxmemory or give girder a "
            "server of its own; keep maxmemory-policy noeviction, see the README)"
        )
    return GirderError(
        f"girder's state store at {safe_url(url)} refused a command: {exc} (the README's "
        "'Who may talk to the state store' lists the ACL girder needs)"
    )


def corrupt(key: str, what: str, request: str | None = None) -> GirderError:
    """The error for the record of ``key`` (``request``: readable) that is corrupt: ``what``."""
    named = f"{request} [{key}]" if request else key
    return GirderError(
        f"the state store's record of {named} is corrupt: {what}; girder.forget clears it", key=key, exc_type=CORRUPT
    )


def safe_url(url: str) -> str:
    """``url`` with any password masked (a key's ``ssl_password`` too), fit for an error
    message or a log line; each sentinel's part of a ``sentinel://`` URL too."""
    if url.startswith("sentinel://"):
        return ";".join(_safe_part(part) for part in url.split(";"))
    return _safe_part(url)


def _safe_part(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is not None:
        parts = parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1))
    if "ssl_password=" in parts.query:
        parts = parts._replace(query=re.sub(r"(^|&)ssl_password=[^&]*", r"\1ssl_password=***", parts.query))
    return urlunsplit(parts)
