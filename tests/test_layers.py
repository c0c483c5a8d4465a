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
    0: ("keys", "errors", "settings", "frame", "testing", "render"),
    1: ("link", "store", "lease", "mirror", "graph", "records", "sentinel", "cluster", "slots", "layout", "reads",
        "tiers", "verdicts", "waitsfor", "tree"),
    2: ("offers",),
    3: ("wait",),
    4: ("execute", "inline", "limits"),
    5: ("runtime", "eager"),
    6: ("task", "worker", "hub", "messages", "cancel"),
    7: ("girder", "__init__", "cli", "pytest_plugin"),
}  # fmt: skip
LAYER_OF = {module: layer for layer, modules in LAYERS.items() for module in modules}


def module_name(path: Path) -> str:
    """``store``, or ``testing.grid`` for a module of a subpackage (its ``__init__`` is ``testing``)."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def imports_of(path: Path) -> set[str]:
    """The package's modules that ``path`` imports, wherever the import statement is."""
    package = module_name(path).split(".")[:-1] if path.name != "__init__.py" else module_name(path).split(".")
    package = [] if package == ["__init__"] else package
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)]
            names = [node.module] if node.module else [alias.name for alias in node.names]
            found.update(".".join([*base, name]) for name in names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("girder_celery"):
            found.add(node.module.removeprefix("girder_celery").lstrip(".") or "__init__")
        elif isinstance(node, ast.Import):
            found.update(
                a.name.removeprefix("girder_celery.") for a in node.names if a.name.startswith("girder_celery.")
            )
    return found - {module_name(path)}


def layer_of(module: str) -> int:
    """A subpackage's modules share its layer."""
    return LAYER_OF.get(module.split(".")[0], 99)


def graph() -> dict[str, set[str]]:
    return {module_name(path): imports_of(path) for path in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_layer():
    assert sorted(m for m in graph() if layer_of(m) == 99) == []


@pytest.mark.parametrize("module", sorted(graph()))
def test_a_module_imports_only_its_layer_and_below(module):
    upward = {m for m in graph()[module] if layer_of(m) > layer_of(module)}
    assert upward == set(), f"{module} (layer {layer_of(module)}) imports higher layers: {sorted(upward)}"


def test_the_import_graph_has_no_cycle():
    try:
        tuple(TopologicalSorter(graph()).static_order())
    except CycleError as exc:
        pytest.fail(f"import cycle: {' -> '.join(exc.args[1])}")
