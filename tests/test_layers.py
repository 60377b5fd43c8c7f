"""The house rules of common/: every import (module-level and inside functions) goes to the importer's own layer or
a lower one of common.LAYERS, no import cycle exists between modules, and every part says what it owns."""

import ast
from pathlib import Path

import pytest

import common

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "common"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every common.* module an import statement in `path` names, wherever the statement stands."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            pytest.fail(f"{path}: relative import (write the full common.* path)")
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "common":
            found.add(node.module)
            # `from common.x import y` may name a module y.
            found |= {f"{node.module}.{alias.name}" for alias in node.names
                      if (PACKAGE.parent / f"{node.module}.{alias.name}".replace(".", "/")).with_suffix(".py")
                      .is_file()}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "common"}
    return found


def layer_of(module: str) -> int | None:
    """Index in common.LAYERS of a common.<layer>... module; None for the package itself."""
    parts = module.split(".")
    if len(parts) < 2:
        return None
    return common.LAYERS.index(parts[1])


def import_graph() -> dict[str, set[str]]:
    return {module_name(path): imported_modules(path) for path in PACKAGE.rglob("*.py")}


def test_every_part_of_common_is_a_layer():
    parts = {path.stem if path.is_file() else path.name for path in PACKAGE.iterdir()
             if path.name != "__pycache__" and path.name != "__init__.py"}
    assert parts == set(common.LAYERS)


def test_no_import_goes_up_a_layer():
    upward = [f"{importer} imports {imported}" for importer, imports in import_graph().items()
              for imported in imports
              if layer_of(importer) is not None and layer_of(imported) is not None
              and layer_of(imported) > layer_of(importer)]
    assert not upward, "imports from a higher layer:\n" + "\n".join(sorted(upward))


def test_no_import_cycle():
    graph = import_graph()
    state, stack, cycles = {}, [], []

    def visit(module: str) -> None:
        state[module] = "open"
        stack.append(module)
        for imported in sorted(graph.get(module, ())):
            if imported not in graph:
                continue
            if state.get(imported) == "open":
                cycles.append(" -> ".join(stack[stack.index(imported):] + [imported]))
            elif imported not in state:
                visit(imported)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checks_catch_what_they_promise(tmp_path):
    """The import parser sees a function-level import and names the modules a from-import brings."""
    probe = tmp_path / "probe.py"
    probe.write_text("def later():\n    from common.report import single\n    import common.viewer\n")
    assert imported_modules(probe) == {"common.report", "common.report.single", "common.viewer"}
    assert layer_of("common.report.single") > layer_of("common.data.records")


def test_every_subpackage_says_what_it_owns():
    for package in PACKAGE.iterdir():
        if package.is_dir() and package.name != "__pycache__":
            init = package / "__init__.py"
            assert init.is_file(), f"{package} is not a package"
            assert ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))), f"{init} has no docstring"
