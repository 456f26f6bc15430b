"""Rules over the project's source: the import graph is layered and has no cycle among modules (``TYPE_CHECKING``
and function-level imports count); the library's messages speak of arguments, never of CLI flags."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
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
                private += [f"{module}: {node.module}.{a.name}" for a in node.names
                            if a.name.startswith("_") and not a.name.endswith("__")]  # dunders (__version__) are public
    assert private == []


# A CLI flag: --name, or a one-letter -x standing alone ("3-D" and "-volume" are not flags).
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*|-[a-zA-Z](?![\w-]))")


def _one_line_strings(path: Path) -> Iterator[tuple[int, str]]:
    """(line, text) of every one-line string literal in ``path`` but docstrings; an f-string's fields read as ``X``.

    A user-facing message is one line, so these are every message and every piece a message is built from; multi-line
    text (a README template, embedded JavaScript) is not a message.
    """
    tree = ast.parse(path.read_text(), str(path))
    skip = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body:
            if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                skip.add(id(body[0].value))
        if isinstance(node, ast.JoinedStr):
            skip.update(id(value) for value in node.values)
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            text = "".join(v.value if isinstance(v, ast.Constant) else "X" for v in node.values)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            text = node.value
        else:
            continue
        if "\n" not in text.strip("\n"):
            yield node.lineno, text


def test_library_messages_name_arguments_not_cli_flags():
    """Library errors name the Python argument (``batch_size=0``) and declare it (``InputError(..., arguments=...)``);
    ``pipelines.cli`` shows it as the verb's flag. A whole command to run (``anofpdm preprocess ... --size 64``) may
    name the flags of that command."""
    from pipelines.cli import VERBS

    command = re.compile(rf"anofpdm (?:{'|'.join(VERBS)})\b[^;)`']*")
    found = [
        f"{path.relative_to(ROOT)}:{line}: {FLAG.findall(command.sub('', text))} in {text!r}"
        for path in sorted((ROOT / "anofpdm_monai").rglob("*.py"))
        for line, text in _one_line_strings(path)
        if FLAG.search(command.sub("", text))
    ]
    assert found == [], "library messages naming CLI flags (name the argument, declare it in InputError(arguments=)):\n" + "\n".join(found)


def test_the_flag_rule_sees_flags_and_spares_commands_and_prose(tmp_path):
    """The scan above can fail: it finds a flag in an f-string error and in a helper string, not in prose or commands."""
    module = tmp_path / "m.py"
    module.write_text(
        '''"""Docstrings may say --steps."""
def f(n, path):
    fix = "choose another -o"
    if n < 1:
        raise ValueError(f"--steps {n} must be at least 1; {fix}")
    raise ValueError(f"{path}: a {n}-D volume; rerun anofpdm preprocess -i RAW --size 64 (the -volume methods)")
'''
    )
    hits = [FLAG.findall(re.sub(r"anofpdm preprocess\b[^;)`']*", "", text)) for _, text in _one_line_strings(module)]
    assert sorted(h for hit in hits for h in hit) == ["--steps", "-o"]

