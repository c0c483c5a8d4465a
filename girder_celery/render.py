"""Pictures of a request's graph (``girder.graph``'s dict): Graphviz text, SVG, one HTML page.

``to_dot`` writes Graphviz's DOT language and ``to_svg`` has Graphviz's ``dot`` draw it;
``to_html`` writes one self-contained page, no network needed: ``page/graph.html`` with the
graph's JSON in it, whose script lays the requests out by depth and draws them as SVG, coloured
by state, with where and how each ran and how long it took, and a table of every request below.
They need nothing but the dict (and SVG Graphviz).
"""

from __future__ import annotations

import html
import importlib.resources
import json
import shutil
import subprocess
from typing import Any

from .errors import GirderError

__all__ = ["to_dot", "to_html", "to_svg"]

#: Seconds Graphviz's ``dot`` may take to draw a graph.
DOT_TIMEOUT = 120

#: Fill colour of each state (and of a cached request), shared by both pictures.
COLOURS = {
    "done": "#b7e4c7",
    "running": "#ffe08a",
    "queued": "#cfe2ff",
    "failed": "#f5b7b1",
    "absent": "#e9ecef",
    "corrupt": "#e9ecef",
    "cached": "#dee2e6",
}


def _duration(node: dict[str, Any]) -> str:
    started, finished = node["started_at"], node["finished_at"]
    return f"{finished - started} ms" if started is not None and finished is not None else ""


def _colour(node: dict[str, Any]) -> str:
    return COLOURS["cached"] if node["cached"] else COLOURS.get(node["state"], COLOURS["absent"])


def _dot_text(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def to_dot(graph: dict[str, Any]) -> str:
    """The graph in Graphviz's DOT language: a box per request (its request, state, node,
    placement and run time; cached ones dashed), an arrow per edge, parent to child."""
    lines = [
        "digraph girder {",
        "  rankdir=TB;",
        '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];',
        '  edge [color="#555555"];',
    ]
    for node in graph["nodes"]:
        state = "cached" if node["cached"] else node["state"]
        where = " / ".join(part for part in (node["node"], node["placement"]) if part)
        label = "\n".join(part for part in (node["request"] or node["key"], state, where, _duration(node)) if part)
        style = ', style="rounded,filled,dashed"' if node["cached"] else ""
        lines.append(f'  "{node["key"]}" [label="{_dot_text(label)}", fillcolor="{_colour(node)}"{style}];')
    for parent, child in graph["edges"]:
        lines.append(f'  "{parent}" -> "{child}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_svg(graph: dict[str, Any]) -> str:
    """``to_dot`` drawn as SVG by Graphviz's ``dot``; a ``GirderError`` saying how to install
    Graphviz when ``dot`` is not on PATH, or what went wrong when it fails."""
    binary = shutil.which("dot")
    if binary is None:
        raise GirderError(
            "drawing SVG needs Graphviz's dot, which is not on PATH: install Graphviz (Debian/Ubuntu: "
            "apt-get install graphviz; macOS: brew install graphviz; others: https://graphviz.org/download/), "
            "or write --format dot or --format html"
        )
    try:
        done = subprocess.run(
            [binary, "-Tsvg"], input=to_dot(graph), capture_output=True, text=True, timeout=DOT_TIMEOUT
        )
    except subprocess.TimeoutExpired:
        raise GirderError(f"Graphviz's dot did not finish within {DOT_TIMEOUT} s") from None
    if done.returncode != 0:
        raise GirderError(f"Graphviz's dot failed (exit {done.returncode}): {done.stderr.strip()[:500]}")
    return done.stdout


def to_html(graph: dict[str, Any]) -> str:
    """One self-contained HTML page drawing the graph (no network needed)."""
    data = json.dumps(graph).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    title = html.escape(f"girder graph of {_root_request(graph)}")
    page = (importlib.resources.files("girder_celery") / "page" / "graph.html").read_text()
    return page.replace("%TITLE%", title).replace("%COLOURS%", json.dumps(COLOURS)).replace("%DATA%", data)


def _root_request(graph: dict[str, Any]) -> str:
    root = next((n for n in graph["nodes"] if n["key"] == graph["root"]), None)
    return (root and root["request"]) or graph["root"]
