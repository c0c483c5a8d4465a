"""girder-celery: memoized, deduplicated, re-entrant Celery tasks that call each other.

``Girder(app)`` installs girder on a Celery app; ``@girder.task`` makes a task whose request key
is its Celery task id. See DESIGN.md for the model and its invariants.

The public names are imported on first use (``from girder_celery import Girder`` as usual), so
that importing a submodule alone, such as the pytest plugin every pytest session loads, costs no
Celery, kombu or redis import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .errors import GirderCancelled, GirderConnectionError, GirderError, GirderNoGraph, GirderTimeout
    from .girder import Girder
    from .keys import request_key
    from .task import GirderTask

__all__ = [
    "Girder",
    "GirderCancelled",
    "GirderConnectionError",
    "GirderError",
    "GirderNoGraph",
    "GirderTask",
    "GirderTimeout",
    "request_key",
]

__version__ = "0.1.0"

#: The module each public name comes from.
_HOMES = {
    "Girder": "girder",
    "GirderCancelled": "errors",
    "GirderConnectionError": "errors",
    "GirderError": "errors",
    "GirderNoGraph": "errors",
    "GirderTask": "task",
    "GirderTimeout": "errors",
    "request_key": "keys",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
