"""girder's pytest plugin (``girder_celery.pytest_plugin``), as a user's project meets it: each test
here writes a small project (an app module, ``pytest.ini``, tests) and runs pytest on it in a
subprocess, with the plugin loaded from its entry point as in any environment where girder is
installed. Plus the settings it gives an app, checked directly.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from celery import Celery

from girder_celery import pytest_plugin
from girder_celery.store import glob_escape
from girder_celery.testing import RedisServer

#: A user's app, configured for servers that do not exist: only the plugin can make it work.
USER_APP = """
from celery import Celery
from girder_celery import Girder

app = Celery("userapp", broker="redis://127.0.0.1:1/0", backend="redis://127.0.0.1:1/0")
app.conf.girder_url = "redis://127.0.0.1:1/0"
app.conf.girder_key_prefix = "user*app"  # a glob character: cleaning must match it literally
app.conf.task_always_eager = True  # for unit tests elsewhere: the plugin's still go to the worker
girder = Girder(app)


@girder.task(name="userapp.add")
def add(x, y):
    return x + y


@girder.task(name="userapp.total")
def total(n):
    return sum(girder.requests([add.s(i, i) for i in range(n)]))
"""


def run_pytest(project: Path, files: dict[str, str], *args: str, timeout: float = 240) -> str:
    """Write ``files`` into ``project`` and run pytest there; its output (``-rA``: every outcome)."""
    for name, text in files.items():
        (project / name).write_text(textwrap.dedent(text))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-rA", "-p", "no:cacheprovider", *args], cwd=project,
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    return done.stdout + done.stderr


def summary(output: str) -> str:
    """The closing line's counts, e.g. ``2 passed, 1 error``."""
    found = re.findall(r"^=+ (.*) in [\d.]+s.* =+$", output, re.MULTILINE)
    return re.sub(r",? ?\d+ warnings?", "", found[-1]) if found else f"no summary in:\n{output}"


def test_tests_asking_for_no_girder_fixture_start_and_import_nothing(tmp_path):
    """With the plugin loaded, a test that uses none of its fixtures finds no child process and
    girder_celery.testing not imported; one that needs the app unconfigured fails saying how to name it."""
    out = run_pytest(tmp_path, {
        "pytest.ini": "[pytest]\n",
        "test_plain.py": """
            import os, sys

            def test_plain(pytestconfig):
                assert pytestconfig.pluginmanager.hasplugin("girder")
                me = os.getpid()
                assert open(f"/proc/{me}/task/{me}/children").read().split() == []
                assert "girder_celery.testing" not in sys.modules

            def test_needs_an_app(girder_app):
                pass
            """,
    })  # fmt: skip
    assert summary(out) == "1 passed, 1 error", out
    assert "girder's fixtures need your Celery app: set girder_app = proj.celery_app" in out


@pytest.mark.timeout(300)
def test_a_users_app_runs_on_a_real_worker_and_each_test_gets_a_clean_store(tmp_path):
    """The ini's app is pointed at the private Redis in the tests and in a prefork worker it runs on
    (nested requests too); girder_store_clean deletes the app's keys and only those, once earlier
    offers are taken (a live worker) or gone (none); celery.contrib.pytest's fixtures work in the same session."""
    out = run_pytest(tmp_path, {
        "userapp.py": USER_APP,
        "pytest.ini": "[pytest]\ngirder_app = userapp\ngirder_worker_pool = prefork\ngirder_timeout = 45\n",
        "test_user.py": """
            import os
            from userapp import add, girder, total

            def test_on_the_worker(girder_worker, girder_store_clean, girder_redis):
                assert girder_store_clean is girder
                assert total.call(4) == 12
                assert total.call(40) == 1560  # its children's offers outlive it: cleaning waits for them
                assert {girder.state(s)["node"] for s in [total.s(4), add.s(3, 3)]} == {girder_worker.hostname}
                assert "-P prefork" in " ".join(girder_worker.command)
                assert girder.settings.request_timeout == 45  # bounded waits
                assert add.delay(1, 2).get(timeout=30) == 3
                store = girder_redis.client(0)
                store.set("other:key", "kept")
                store.set("userXXapp:key", "kept")  # what an unescaped user*app:* would match too
                assert store.exists("user*app:req:{" + add.key(1, 2) + "}")

            def test_a_clean_store(girder_store_clean, girder_redis):
                store, broker = girder_redis.client(0), girder_redis.client(1)
                assert store.keys("user[*]app:*") == []
                assert [k for k in broker.keys() if broker.type(k) == "list" and broker.llen(k)] == []
                assert girder.state(add.s(1, 2))["state"] == "absent"
                assert store.get("other:key") == store.get("userXXapp:key") == "kept"

            def test_beside_celery_contrib_pytest(celery_app, celery_worker, girder_worker):
                @celery_app.task
                def mul(x, y):
                    return x * y

                celery_worker.reload()
                assert mul.delay(4, 4).get(timeout=10) == 16
                assert add.call(20, 22) == 42
            """,
        "test_without_worker.py": """
            from userapp import add, girder

            def test_leaves_an_offer(girder_store_clean):
                add.delay(5, 5)
                assert girder.state(add.s(5, 5))["state"] == "queued"

            def test_with_no_worker_the_offer_goes_with_its_record(girder_store_clean, girder_redis):
                broker = girder_redis.client(1)
                assert [k for k in broker.keys() if broker.type(k) == "list" and broker.llen(k)] == []
                assert girder.state(add.s(5, 5))["state"] == "absent"
            """,
    }, "-p", "celery.contrib.pytest")  # fmt: skip
    assert summary(out) == "5 passed", out


@pytest.fixture
def redis():
    """A RedisServer not started: ``_settings_for`` only names its URLs."""
    server = RedisServer()
    yield server
    server.close()


def test_the_plugin_gives_the_app_its_private_servers_and_a_bounded_wait(redis):
    """girder_url, broker_url and result_backend name the private Redis; eager mode is off; a None
    request timeout becomes girder_timeout; girder_config goes on top; a broker_read_url the app sets
    follows the broker."""
    app = Celery("plain", set_as_current=False)
    conf = pytest_plugin._settings_for(app, redis, {}, 30.0)
    assert conf == {"girder_url": redis.url(0), "broker_url": redis.url(1), "result_backend": redis.url(2),
                    "task_always_eager": False, "girder_request_timeout": 30.0}  # fmt: skip
    app.conf.update(girder_request_timeout=5, broker_read_url="redis://elsewhere/0")
    conf = pytest_plugin._settings_for(app, redis, {"broker_url": "amqp://guest:guest@127.0.0.1:5672//"}, 30.0)
    assert "girder_request_timeout" not in conf
    assert conf["broker_url"] == conf["broker_read_url"] == "amqp://guest:guest@127.0.0.1:5672//"


@pytest.mark.parametrize(("config", "message"), [
    ({"girder_pools": {"a": object()}}, "girder_config must hold JSON values"),
    (["broker_url"], "girder_config must return a dict"),
])  # fmt: skip
def test_a_girder_config_the_worker_cannot_get_is_refused(redis, config, message):
    """A girder_config that is not a dict, or holds what JSON cannot carry to the worker, fails clearly."""
    with pytest.raises(pytest.fail.Exception, match=message):
        pytest_plugin._settings_for(Celery("plain", set_as_current=False), redis, config, 30.0)


def test_glob_characters_of_a_key_prefix_match_only_themselves():
    """A key prefix's *, ?, [ and ] are escaped for SCAN MATCH."""
    assert glob_escape("a*b?c[d]e") == r"a\*b\?c\[d\]e"
