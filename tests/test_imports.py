"""The project's import graph: layered packages, no cycle among modules (``TYPE_CHECKING`` and function-level imports count)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("anofpdm_monai", "data_prep", "pipelines")
# A package may import only from the packages before it: the library knows nothing of the data scripts or the verbs.
LAYERS = {"anofpdm_monai": {"anofpdm_monai"}, "data_prep": {"anofpdm_monai", "data_prep"},
          "pipelines": {"anofpdm_monai", "data_prep", "pipelines"}}  # fmt: skip


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """Project modules imported anywhere in ``path`` (module level, functions, ``if TYPE_CHECKING:``)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        out.update(n for n in names if n in known and n != module)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, p, set(modules)) for m, p in modules.items()}


def test_packages_are_layered():
    wrong = [(m, d) for m, deps in _graph().items() for d in deps if d.split(".")[0] not in LAYERS[m.split(".")[0]]]
    assert wrong == [], f"imports against the layers library <- data_prep <- pipelines: {wrong}"


def test_no_import_cycle_among_modules():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert cycles == [], f"import cycles: {[' -> '.join(c) for c in cycles]}"


def test_no_private_name_is_imported_across_modules():
    private = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
                private += [f"{module}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert private == []
