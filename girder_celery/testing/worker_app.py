"""The app module of the pytest plugin's workers: ``celery -A girder_celery.testing.worker_app worker``.

It imports a user's Celery app the way their tests do (the test process's ``sys.path``, the app
named as for ``celery -A``), gives it the settings the plugin gave the app in the test process, and
makes it announce that it is ready (``announce_ready``), so the user's app module needs no test
code of its own. Everything comes from the environment the plugin sets (the ``*_ENV`` names); the
app is loaded when ``celery -A`` first asks for ``app``.
"""

from __future__ import annotations

import json
import os
import sys

from celery import Celery
from celery.app.utils import find_app

from .grid import announce_ready

__all__ = ["APP_ENV", "CONF_ENV", "PATH_ENV", "load"]

#: The user's app, as for ``celery -A`` (``proj.celery_app`` or ``proj.celery_app:app``).
APP_ENV = "GIRDER_PYTEST_APP"
#: The settings to apply to it, a JSON object of ``app.conf`` names and values.
CONF_ENV = "GIRDER_PYTEST_CONF"
#: The test process's ``sys.path``, joined with ``os.pathsep``: the worker imports what the tests import.
PATH_ENV = "GIRDER_PYTEST_PATH"


def load() -> Celery:
    """The user's app, configured from the environment and set to announce that it is ready."""
    spec = os.environ.get(APP_ENV)
    if not spec:
        raise RuntimeError(f"{__name__} is the worker app of girder's pytest plugin: it needs ${APP_ENV}")
    extra = [entry for entry in os.environ.get(PATH_ENV, "").split(os.pathsep) if entry and entry not in sys.path]
    sys.path[:0] = extra
    found = find_app(spec)
    if not isinstance(found, Celery):
        raise RuntimeError(f"${APP_ENV}={spec!r} names {type(found).__name__}, not a Celery app")
    found.conf.update(json.loads(os.environ.get(CONF_ENV) or "{}"))
    announce_ready(found)
    return found


def __getattr__(name: str) -> Celery:
    # ``celery -A`` asks for ``app``: load it then, so that importing this module for its names
    # (the plugin does) loads nothing.
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()["app"] = found = load()
    return found
