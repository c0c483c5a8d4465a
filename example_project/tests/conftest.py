"""Girder's pytest plugin configured for the example project, as a user configures it for theirs.

The plugin comes with the package (no ``pytest_plugins`` line needed). It is told which app to
test; a project would rather say ``girder_app = "example_project.celery_app"`` in its pytest
configuration. The plugin points that app at a private Redis, here and in the worker it starts.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def girder_app_module():
    return "example_project.celery_app"


@pytest.fixture(scope="module", params=["solo", "prefork"])
def girder_worker_pool(request):
    """Every module's tests run on a solo worker, then on a prefork one."""
    return request.param
