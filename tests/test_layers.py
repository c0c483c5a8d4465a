"""The package's layers (DESIGN.md, "Layers"): every module imports only its own layer or those
below, type-only and function-local imports included, and the import graph has no cycle.

Read statically from the source, so a new module must be given a layer here to pass.
"""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "girder_celery"

#: Layer of each module, ground up.
LAYERS = {
    0: ("keys", "errors", "settings", "frame", "testing"),
    1: ("link", "store", "lease", "mirror"),
    2: ("offers",),
    3: ("wait",),
    4: ("execute", "inline"),
    5: ("runtime",),
    6: ("task", "worker", "hub", "messages"),
    7: ("girder", "__init__", "cli"),
}
LAYER_OF = {module: layer for layer, modules in LAYERS.items() for module in modules}


def imports_of(path: Path) -> set[str]:
    """The package's modules that ``path`` imports, wherever the import statement is."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.update([node.module] if node.module else [alias.name for alias in node.names])
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("girder_celery"):
            found.add(node.module.removeprefix("girder_celery").lstrip(".") or "__init__")
        elif isinstance(node, ast.Import):
            found.update(
                a.name.removeprefix("girder_celery.") for a in node.names if a.name.startswith("girder_celery.")
            )
    return found - {path.stem}


def graph() -> dict[str, set[str]]:
    return {path.stem: imports_of(path) for path in sorted(PACKAGE.glob("*.py"))}


def test_every_module_has_a_layer():
    assert sorted(set(graph()) - set(LAYER_OF)) == []


@pytest.mark.parametrize("module", sorted(LAYER_OF))
def test_a_module_imports_only_its_layer_and_below(module):
    upward = {m for m in graph().get(module, set()) if LAYER_OF.get(m, 99) > LAYER_OF[module]}
    assert upward == set(), f"{module} (layer {LAYER_OF[module]}) imports higher layers: {sorted(upward)}"


def test_the_import_graph_has_no_cycle():
    try:
        tuple(TopologicalSorter(graph()).static_order())
    except CycleError as exc:
        pytest.fail(f"import cycle: {' -> '.join(exc.args[1])}")
