"""girder-celery: memoized, deduplicated, re-entrant Celery tasks that call each other.

``Girder(app)`` installs girder on a Celery app; ``@girder.task`` makes a task whose request key
is its Celery task id. See DESIGN.md for the model and its invariants.
"""

from .errors import GirderConnectionError, GirderError, GirderTimeout
from .girder import Girder
from .keys import request_key
from .task import GirderTask

__all__ = [
    "Girder",
    "GirderConnectionError",
    "GirderError",
    "GirderTask",
    "GirderTimeout",
    "request_key",
]

__version__ = "0.1.0"
