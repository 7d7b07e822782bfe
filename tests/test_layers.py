"""The import layers, read from the source with ``ast`` (nothing is imported to check it).

Layers, bottom up:
- the core, ``hakuriver/*.py``: what every process imports (messages, topology, broker, config, ...);
- beside each other on top of it: the host service ``hakuriver.host``, the admin tools
  ``hakuriver.admin``, the runner ``runner``, the client ``client``, and ``hakurun``.

Rules:
- the core imports nothing above it (runner, client, hakurun, hakuriver.host, hakuriver.admin);
- the client imports no runner and no host; the runner imports no client and no host;
- no import cycle between modules through module-level imports (the ones that run when a
  module is first imported; imports inside functions and under ``TYPE_CHECKING`` are left out).

Layer rules count every import, wherever it stands: an import inside a function still
runs back up a layer when it runs.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("hakuriver", "runner", "client", "hakurun")


@dataclass(frozen=True)
class Import:
    module: str       # the project module imported (a submodule where ``from pkg import sub`` names one)
    line: int
    top_level: bool   # runs when the importing module is imported


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str, path: Path) -> list[Import]:
    """The project modules ``name`` imports, each with its line and whether it runs at import time."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[Import] = []

    def visit(node: ast.AST, top_level: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend(Import(alias.name, node.lineno, top_level) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = _resolve(name, path.name == "__init__.py", node)
            for alias in node.names:
                submodule = f"{module}.{alias.name}"
                found.append(Import(submodule if submodule in MODULES else module, node.lineno, top_level))
        elif isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child, top_level)
            return  # what only type checkers read never runs
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            top_level = False
        for child in ast.iter_child_nodes(node):
            visit(child, top_level)

    visit(tree, True)
    return [item for item in found if item.module.split(".")[0] in PACKAGES]


GRAPH = {name: imports_of(name, path) for name, path in MODULES.items()}


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def is_core(module: str) -> bool:
    return module.startswith("hakuriver") and not (_under(module, "hakuriver.host") or
                                                    _under(module, "hakuriver.admin"))


RULES = [
    # (who, description, may it import this module?)
    ("the core", is_core, ("runner", "client", "hakurun", "hakuriver.host", "hakuriver.admin")),
    ("the client", lambda m: _under(m, "client"), ("runner", "hakuriver.host")),
    ("the runner", lambda m: _under(m, "runner"), ("client", "hakuriver.host")),
]


def violations(graph: dict[str, list[Import]]) -> list[str]:
    found = []
    for who, belongs, forbidden in RULES:
        for module, imports in graph.items():
            if not belongs(module):
                continue
            for item in imports:
                if any(_under(item.module, layer) for layer in forbidden):
                    found.append(f"{module}:{item.line} ({who}) imports {item.module}")
    return found


def cycles(graph: dict[str, list[Import]]) -> list[list[str]]:
    """Every cycle of module-level imports, each as the modules on it (one per strongly connected group)."""
    edges = {module: sorted({item.module for item in imports if item.top_level and item.module in graph})
             for module, imports in graph.items()}
    # Tarjan's strongly connected components: a group of two or more, or a module importing itself, is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def connect(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in edges[module]:
            if target not in index:
                connect(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1 or module in edges[module]:
                groups.append(sorted(group))

    for module in edges:
        if module not in index:
            connect(module)
    return groups


def test_every_package_is_read():
    assert {name.split(".")[0] for name in MODULES} == set(PACKAGES)
    assert {"hakuriver.topology", "hakuriver.host.service", "runner.runner", "client.cli", "hakurun.span"} <= set(MODULES)
    # The reader sees relative, lazy and "from pkg import submodule" imports alike.
    service = {item.module for item in GRAPH["hakuriver.host.service"]}
    assert {"hakuriver.broker", "hakuriver.host.ingest", "hakuriver.topology"} <= service


def test_no_import_runs_back_up_a_layer():
    assert violations(GRAPH) == []


def test_no_module_level_import_cycle():
    assert cycles(GRAPH) == []


# -- the checks themselves catch what they are for ----------------------------------------

def _graph(**edges: list[tuple[str, bool]]) -> dict[str, list[Import]]:
    return {name.replace("__", "."): [Import(target, 1, top) for target, top in targets]
            for name, targets in edges.items()}


def test_the_layer_check_catches_an_import_up_a_layer():
    graph = _graph(hakuriver__topology=[("runner.store", False)], client__api=[("hakuriver.host.ledger", True)],
                   runner__runner=[("client", True)], hakuriver__host__service=[("runner.store", True)])
    assert violations(graph) == ["hakuriver.topology:1 (the core) imports runner.store",
                                 "client.api:1 (the client) imports hakuriver.host.ledger",
                                 "runner.runner:1 (the runner) imports client"]


@pytest.mark.parametrize("top_level, expected", [(True, [["client.cli", "client.session"]]), (False, [])])
def test_the_cycle_check_catches_a_module_level_cycle(top_level, expected):
    graph = _graph(client__cli=[("client.session", top_level)], client__session=[("client.cli", True)],
                   client__api=[("client.cli", True)])
    assert cycles(graph) == expected
