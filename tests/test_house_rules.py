"""The package's shape, read from its source: imports run down the layers, no cycle outside typing, small files
and functions, capabilities declared rather than probed. A change that breaks one names the module to fix."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hssl_cli"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60  # from the first line of the body: a command's Typer option declarations do not count
# a lower layer never imports a higher one (render and the top-level helpers sit beside the layers)
LAYERS = {"recipe": 0, "losses": 0, "data": 0, "models": 0, "methods": 1, "engine": 2, "evaluate": 3, "sweep": 4,
          "cli": 5, "cli_options": 5}
# the one hasattr left: torch's only re-initialisation interface is the reset_parameters convention
ALLOWED_HASATTR = {"models/scale_lifted.py"}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _is_typing_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement outside `if TYPE_CHECKING:` blocks, at any depth (functions import lazily)."""
    found, pending = [], [tree]
    while pending:
        node = pending.pop()
        if _is_typing_block(node):
            pending.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        pending.extend(ast.iter_child_nodes(node))
    return found


def _import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets = set()
        for node in _runtime_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base
                                                                                                   else []))
                candidates = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            targets |= {candidate for candidate in candidates if candidate in modules and candidate != name}
        graph[name] = targets
    return graph


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_imports_run_down_the_layers():
    upward = [f"{module} -> {target}" for module, targets in _import_graph().items() for target in sorted(targets)
              if _layer(module) is not None and _layer(target) is not None and _layer(target) > _layer(module)]
    assert upward == []


def test_no_import_cycle_at_run_time():
    graph = _import_graph()
    cycles, visiting, done = [], [], set()

    def visit(module: str) -> None:
        visiting.append(module)
        for target in graph[module]:
            if target in visiting:
                cycles.append(visiting[visiting.index(target):] + [target])
            elif target not in done:
                visit(target)
        visiting.pop()
        done.add(module)

    for module in sorted(graph):
        if module not in done:
            visit(module)
    assert cycles == []


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda path: str(path.relative_to(PACKAGE)))
def test_files_and_functions_stay_small(path):
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_FILE_LINES
    long = [f"{node.name} ({node.end_lineno - node.body[0].lineno + 1} lines)" for node in ast.walk(ast.parse(text))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno - node.body[0].lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []


def test_capabilities_are_declared_not_probed():
    probing = [str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
               if any(isinstance(node, ast.Call) and ast.unparse(node.func) == "hasattr"
                      for node in ast.walk(ast.parse(path.read_text())))]
    assert set(probing) <= ALLOWED_HASATTR


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    """The rules above can fail: a toy package with an upward import and a run-time cycle trips both."""
    package = tmp_path / "hssl_cli"
    for folder in ("data", "engine"):
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "data" / "reader.py").write_text("def read():\n    from hssl_cli.engine import loop\n")
    (package / "engine" / "loop.py").write_text("from hssl_cli.data.reader import read\n")
    (package / "engine" / "typed.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                                  "    from hssl_cli.engine import loop\n")
    monkeypatch.setitem(globals(), "PACKAGE", package)
    graph = _import_graph()
    assert "hssl_cli.engine.loop" in graph["hssl_cli.data.reader"]  # a lazy import inside a function counts
    assert graph["hssl_cli.engine.typed"] == set()  # typing-only imports are not run-time edges
    with pytest.raises(AssertionError):
        test_imports_run_down_the_layers()
    with pytest.raises(AssertionError):
        test_no_import_cycle_at_run_time()
