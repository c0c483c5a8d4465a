"""The ``celery girder`` command: a grid's requests from the shell, as Celery's own commands do.

``celery -A proj girder state KEY`` prints what the state store knows of a request
(``Girder.state``) as JSON; ``celery -A proj girder forget KEY`` drops a memoized value or
error (``Girder.forget``), ``forget --task NAME [--version V]`` every one of a task
(``Girder.forget_task``); ``cancel KEY`` cancels a request in flight and its sub-requests that
nobody else waits for (``Girder.cancel``: exit code 0 when it cancelled something, 1 when the
request is settled already); ``celery -A proj girder offers QUEUE`` lists the offers waiting on a
queue, oldest first, with their age by Redis's clock (what the hoister copies up a tier once
older than ``girder_hoist_after``). ``graph KEY`` prints or draws the graph of a request
(``Girder.graph``: JSON, Graphviz's DOT, one HTML page, or SVG with Graphviz's ``dot``),
``watch KEY`` shows its progress until it settles, ``stats`` the per-task counters and
``active`` the requests running. KEY is a request key, which is also the Celery task id that
Flower and ``AsyncResult`` show. Installed as a Celery command plugin (entry point group
``celery.commands``); the app ``-A`` loads must call ``Girder(app)``. Bad input exits with
code 2, an unreachable store or a corrupt record with 1.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from . import graph as graphs
from .errors import GirderError, GirderNoGraph
from .render import to_dot, to_html, to_svg

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


class BadInput(click.ClickException):
    """Bad input that is not a usage error: a key with no graph (exit code 2, as click's)."""

    exit_code = 2


def _reachable(call: Any, *args: Any) -> Any:
    try:
        return call(*args)
    except GirderNoGraph as exc:  # unknown key, no sub-requests, an expired graph
        raise BadInput(str(exc)) from None
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
@click.argument("key", required=False)
@click.option("--task", "task_name", metavar="NAME", help="Forget every memoized value or error of task NAME.")
@click.option("--version", metavar="V", help="With --task: only those of version V.")
@click.pass_context
def forget(ctx: click.Context, key: str | None, task_name: str | None, version: str | None) -> None:
    """Drop the memoized value or error of request KEY, or of every request of --task NAME
    (requests in flight are left alone)."""
    found = _girder_of(ctx)
    if version is not None and task_name is None:
        raise click.UsageError("--version needs --task NAME")
    if (key is None) == (task_name is None):
        raise click.UsageError("give a KEY or --task NAME" + (", not both" if key else ""))
    if task_name is not None:
        for value, hint in ((task_name, "--task"), (version, "--version")):
            if value is not None and not value.strip():
                raise click.BadParameter("must not be empty", param_hint=hint)
        count = _reachable(found.forget_task, task_name, version)
        of = f"{task_name}" + (f" version {version}" if version is not None else "")
        click.echo(f"forgot {count} memoized request(s) of {of}")
        return
    key = _key(found, key)
    if _reachable(found.forget, key):
        click.echo(f"forgot {key}")
    else:
        click.echo(f"{key} has no memoized value or error (absent, queued or running): nothing forgotten")


@girder.command()
@click.argument("key")
@click.pass_context
def cancel(ctx: click.Context, key: str) -> None:
    """Cancel request KEY and its sub-requests that no other live request waits for."""
    found = _girder_of(ctx)
    key = _key(found, key)
    cancelled = _reachable(found.cancel, key)
    if cancelled:
        click.echo(f"cancelled {key} and {len(cancelled) - 1} sub-request(s) of it")
        for each in cancelled:
            click.echo(f"  {each}")
        return
    known = _reachable(found.state, key)["state"]
    if known == "absent":
        raise BadInput(f"{key} is not a request the state store knows: nothing to cancel")
    click.echo(f"{key} is {known}: nothing to cancel", err=True)
    ctx.exit(1)


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


# -- the graph of a request, and its progress -----------------------------------------------


@girder.command()
@click.argument("key")
@click.option(
    "--format", "fmt", type=click.Choice(["json", "dot", "html", "svg"]), default="json", show_default=True,
    help="JSON (girder.graph), Graphviz's DOT, one self-contained HTML page, or SVG (needs Graphviz's dot).",
)  # fmt: skip
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write to FILE, not stdout.")
@click.pass_context
def graph(ctx: click.Context, key: str, fmt: str, output: Path | None) -> None:
    """Print or draw the graph of request KEY: the sub-requests it made, how and where each ran."""
    found = _girder_of(ctx)
    drawn = _reachable(found.graph, _key(found, key))
    if fmt == "json":
        text = json.dumps(drawn, indent=2) + "\n"
    elif fmt == "html":
        text = to_html(drawn)
    elif fmt == "dot":
        text = to_dot(drawn)
    else:
        text = _reachable(to_svg, drawn)
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text)
        click.echo(f"wrote the graph of {key} ({len(drawn['nodes'])} requests) to {output}")


@girder.command()
@click.argument("key")
@click.option("--interval", default=0.5, show_default=True, type=click.FloatRange(min=0.05), help="Seconds per look.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), help="Give up after this many seconds.")
@click.pass_context
def watch(ctx: click.Context, key: str, interval: float, timeout: float | None) -> None:
    """Show the progress of request KEY until it settles: exit code 0 done, 1 failed (3: --timeout)."""
    found = _girder_of(ctx)
    key = _key(found, key)
    deadline = None if timeout is None else time.monotonic() + timeout
    tty, last = sys.stdout.isatty(), ""
    while True:
        drawn = _reachable(graphs.read_graph, found.store, key, False)
        root, line = drawn["nodes"][0], _bar(graphs.progress_of(drawn))
        if line != last:
            click.echo(("\r" + line) if tty else line, nl=not tty)
            last = line
        if root["state"] in ("done", "failed", "absent"):
            break
        if deadline is not None and time.monotonic() > deadline:
            if tty:
                click.echo()
            click.echo(f"{root['request'] or key} is still {root['state']} after {timeout:g} s", err=True)
            ctx.exit(3)
        time.sleep(interval)  # a live view: one look per interval
    if tty:
        click.echo()
    click.echo(f"{root['state']}: {root['request'] or key}")
    if root["state"] == "absent":  # forgotten, or expired, while watched
        raise BadInput(f"{key} is no longer known to the state store")
    ctx.exit(0 if root["state"] == "done" else 1)


def _bar(counts: dict[str, int], width: int = 30) -> str:
    settled = counts["done"] + counts["failed"] + counts["cached"]
    filled = width * settled // max(counts["known"], 1)
    parts = "  ".join(f"{state} {counts[state]}" for state in ("done", "cached", "running", "queued", "failed"))
    return f"[{'#' * filled}{'-' * (width - filled)}] {settled}/{counts['known']} settled  {parts}"


# -- the grid at large --------------------------------------------------------------------


@girder.command()
@click.option("--reset", is_flag=True, help="Start the counters afresh (after printing them).")
@click.option("--json", "as_json", is_flag=True, help="Print girder.stats() as JSON.")
@click.pass_context
def stats(ctx: click.Context, reset: bool, as_json: bool) -> None:
    """Per task: executions, cache hits, failures, run time, since the last reset; the store's size."""
    found = _girder_of(ctx)
    counted = _reachable(found.stats)
    if as_json:
        click.echo(json.dumps(counted, indent=2))
    else:
        since = counted["since"]
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(since)) if since else "the first request"
        click.echo(f"since {when}: {len(counted['tasks'])} task(s)")
        click.echo(f"{'executions':>10} {'hits':>8} {'failures':>8} {'total s':>10} {'mean ms':>9}  task")
        for name, task in counted["tasks"].items():
            mean = task["mean_run_seconds"]
            mean_ms = f"{mean * 1000:9.1f}" if mean is not None else f"{'-':>9}"
            click.echo(
                f"{task['executions']:>10} {task['cache_hits']:>8} {task['failures']:>8} "
                f"{task['run_seconds']:>10.3f} {mean_ms}  {name}"
            )
        memory = counted["memory_bytes"]
        used = f"{memory} bytes used by its server" if memory is not None else "its memory unknown (INFO refused)"
        click.echo(f"store: {counted['records']} record(s), {used}")
    if reset:
        _reachable(found.reset_stats)
        click.echo("counters reset", err=as_json)


@girder.command()
@click.option("--json", "as_json", is_flag=True, help="Print girder.active() as JSON.")
@click.pass_context
def active(ctx: click.Context, as_json: bool) -> None:
    """List the requests running across the grid (inline runs included), oldest first."""
    running = _reachable(_girder_of(ctx).active)
    if as_json:
        click.echo(json.dumps(running, indent=2))
        return
    click.echo(f"{len(running)} request(s) running")
    for r in running:
        lease = f"{r['lease']:.1f} s" if r["lease"] is not None else "?"
        click.echo(
            f"{r['age']:9.3f} s  {r['key']}  {r['request'] or '?'}  on {r['node']} ({r['placement']})  "
            f"owner {r['owner']}  parent {r['parent'] or '-'}  lease {lease}"
        )
