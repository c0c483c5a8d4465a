"""The ``celery girder`` command: a grid's requests from the shell, as Celery's own commands do.

``celery -A proj girder state KEY`` prints what the state store knows of a request
(``Girder.state``) as JSON; ``celery -A proj girder forget KEY`` drops a memoized value or
error (``Girder.forget``); ``celery -A proj girder offers QUEUE`` lists the offers waiting on a
queue, oldest first, with their age by Redis's clock (what the hoister copies up a tier once
older than ``girder_hoist_after``). KEY is a request key, which is also the Celery task id that
Flower and ``AsyncResult`` show. Installed as a Celery command plugin (entry point group
``celery.commands``); the app ``-A`` loads must call ``Girder(app)``.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import click

from .errors import GirderError

if TYPE_CHECKING:
    from .girder import Girder

__all__ = ["girder"]


@click.group(name="girder")
def girder() -> None:
    """Inspect and forget girder requests (memoized tasks)."""


def _girder_of(ctx: click.Context) -> Girder:
    app = getattr(ctx.obj, "app", None)
    found = getattr(app, "girder", None)
    if found is None:
        raise click.UsageError("the app has no Girder: give -A the module that calls Girder(app)")
    return found


def _key(found: Girder, key: str) -> str:
    try:
        return found.key_of(key)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="KEY") from None


def _reachable(call: Any, *args: Any) -> Any:
    try:
        return call(*args)
    except GirderError as exc:  # the store is unreachable, or the record is corrupt
        raise click.ClickException(str(exc)) from None


@girder.command()
@click.argument("key")
@click.pass_context
def state(ctx: click.Context, key: str) -> None:
    """Print what the state store knows of request KEY, as JSON."""
    found = _girder_of(ctx)
    click.echo(json.dumps(_reachable(found.state, _key(found, key)), indent=2, sort_keys=True))


@girder.command()
@click.argument("key")
@click.pass_context
def forget(ctx: click.Context, key: str) -> None:
    """Drop the memoized value or error of request KEY (a request in flight is left alone)."""
    found = _girder_of(ctx)
    key = _key(found, key)
    if _reachable(found.forget, key):
        click.echo(f"forgot {key}")
    else:
        click.echo(f"{key} has no memoized value or error (absent, queued or running): nothing forgotten")


@girder.command()
@click.argument("queue")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(min=1), help="Offers to list.")
@click.pass_context
def offers(ctx: click.Context, queue: str, limit: int) -> None:
    """List the offers waiting on QUEUE (a node queue or a pool), oldest first."""
    found = _girder_of(ctx)
    total, now_ms, waiting = _reachable(found.offers, queue, limit)
    click.echo(f"{total} offer(s) waiting on {queue}" + (f"; the {len(waiting)} oldest:" if waiting else ""))
    for key, offered_ms, request in waiting:
        click.echo(f"{(now_ms - offered_ms) / 1000:10.3f} s  {key}  {request or '?'}")
