"""Django-style settings: ``app.config_from_object('django.conf:settings', namespace='CELERY')``
gives girder its ``CELERY_GIRDER_*`` settings, found by Celery's namespace lookup like Celery's own.

``settings`` below is what ``django.conf.settings`` is to Celery: an object whose upper-case
attributes are the project's settings, named by a ``module:attribute`` string.
"""

from __future__ import annotations

import uuid
from dataclasses import fields

import pytest
from celery import Celery

from girder_celery import Girder
from girder_celery.settings import Settings

#: A value other than the default for every girder setting.
NOT_DEFAULT = {
    "url": "sentinel://127.0.0.1:26390/3;sentinel://127.0.0.1:26391",  # the sentinel settings need one
    "sentinel_master": "dj-master",
    "sentinel_options": {"sentinel_kwargs": {"password": "dj"}, "min_other_sentinels": 1},
    "key_prefix": "dj",
    "pool": "desk",
    "request_timeout": 42.0,
    "lease_seconds": 12.5,
    "result_ttl": 3600.0,
    "error_ttl": 60.0,
    "check_interval": 1.5,
    "reoffer_after": 30.0,
    "connect_timeout": 2.0,
    "hoist_after": 0.25,
    "pools": {"desk": "region", "region": None},
    "volunteer": False,
    "busy_poll": 0.0,
    "graph_ttl": 3600.0,
}


class DjangoStyleSettings:
    """A Django project's settings: Celery's and girder's under ``CELERY_``, and some of Django's own."""

    DEBUG = True
    INSTALLED_APPS = ["django.contrib.contenttypes"]
    CELERY_BROKER_URL = "memory://"
    CELERY_TASK_DEFAULT_QUEUE = "django-queue"


settings = DjangoStyleSettings()


def django_app(monkeypatch, **girder) -> Celery:
    """An app configured as a Django project's is, with ``CELERY_GIRDER_<NAME>`` for each of ``girder``."""
    for name, value in girder.items():
        monkeypatch.setattr(settings, f"CELERY_GIRDER_{name.upper()}", value, raising=False)
    app = Celery("django_project", set_as_current=False)
    app.config_from_object(f"{__name__}:settings", namespace="CELERY")
    return app


def test_every_girder_setting_is_read_from_its_celery_girder_name(monkeypatch):
    """Each Settings field is read from CELERY_GIRDER_<FIELD> of a Django-style settings object."""
    assert sorted(NOT_DEFAULT) == sorted(f.name for f in fields(Settings)), "give every new setting a value here"
    assert all(NOT_DEFAULT[f.name] != f.default for f in fields(Settings))
    app = django_app(monkeypatch, **NOT_DEFAULT)
    assert Girder(app).settings == Settings(**NOT_DEFAULT)
    assert app.conf.task_default_queue == "django-queue"  # Celery's own names, read alike


def test_unset_girder_names_keep_their_defaults(monkeypatch):
    """With only CELERY_GIRDER_URL set, every other setting keeps its default."""
    app = django_app(monkeypatch, url="redis://127.0.0.1:6390/3")
    assert Girder(app).settings == Settings(url="redis://127.0.0.1:6390/3")


def test_a_bad_celery_girder_value_is_refused_by_its_girder_name(monkeypatch):
    """A bad CELERY_GIRDER_LEASE_SECONDS is refused with the usual error naming the setting."""
    girder = Girder(django_app(monkeypatch, url="redis://x", lease_seconds=-1))
    with pytest.raises(ValueError, match="girder_lease_seconds must be a positive number"):
        girder.settings  # noqa: B018


def test_a_request_goes_where_the_django_settings_say(monkeypatch, redis_server):
    """A delay() records the request in CELERY_GIRDER_URL's store under CELERY_GIRDER_KEY_PREFIX and
    offers it on CELERY_TASK_DEFAULT_QUEUE of CELERY_BROKER_URL."""
    tag = uuid.uuid4().hex[:8]
    prefix, queue = f"dj-{tag}", f"django-{tag}"
    monkeypatch.setattr(settings, "CELERY_BROKER_URL", redis_server.url(1))
    monkeypatch.setattr(settings, "CELERY_TASK_DEFAULT_QUEUE", queue)
    app = django_app(monkeypatch, url=redis_server.url(0), key_prefix=prefix)
    girder = Girder(app)

    @girder.task(name="django_project.double")
    def double(x):
        return 2 * x

    store, broker = redis_server.client(0), redis_server.client(1)
    try:
        result = double.delay(21)
        assert result.id == double.key(21)
        assert girder.state(double.s(21))["state"] == "queued"
        assert store.exists(girder.store.record_key(result.id))
        assert broker.llen(queue) == 1
    finally:
        for key in [*store.keys(f"{prefix}:*"), queue]:
            (broker if key == queue else store).delete(key)
        app.close()
