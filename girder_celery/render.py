"""Pictures of a request's graph (``girder.graph``'s dict): Graphviz text, and one HTML page.

``to_dot`` writes Graphviz's DOT language (``dot -Tsvg`` draws it); ``to_html`` one self-contained
page, no network needed: ``page/graph.html`` with the graph's JSON in it, whose script lays the
requests out by depth and draws them as SVG, coloured by state, with where and how each ran and
how long it took, and a table of every request below. Neither needs anything but the dict.
"""

from __future__ import annotations

import html
import importlib.resources
import json
from typing import Any

__all__ = ["to_dot", "to_html"]

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


def to_html(graph: dict[str, Any]) -> str:
    """One self-contained HTML page drawing the graph (no network needed)."""
    data = json.dumps(graph).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    title = html.escape(f"girder graph of {_root_request(graph)}")
    page = (importlib.resources.files("girder_celery") / "page" / "graph.html").read_text()
    return page.replace("%TITLE%", title).replace("%COLOURS%", json.dumps(COLOURS)).replace("%DATA%", data)


def _root_request(graph: dict[str, Any]) -> str:
    root = next((n for n in graph["nodes"] if n["key"] == graph["root"]), None)
    return (root and root["request"]) or graph["root"]
