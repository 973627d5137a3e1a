"""The channel-pruning wing sits below the passes: it imports nothing above it, and no circle."""
import ast
import graphlib
from pathlib import Path

import fxcompress.channels

WING = Path(fxcompress.channels.__file__).parent
ABOVE = ("fxcompress.passes", "fxcompress.compile", "fxcompress.pass_base", "fxcompress.inspection")


def _module_name(path: Path) -> str:
    parts = path.relative_to(WING.parent.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(absolute module imported, whether the import is inside a function) for every import."""
    tree, package = ast.parse(path.read_text()), _module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    inside = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f) if n is not f}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in inside) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            module = f"{base}.{node.module}" if node.level and node.module else (node.module or base)
            found.append((module, id(node) in inside))
    return found


def test_the_wing_imports_nothing_above_it_and_nothing_inside_a_function_of_the_project():
    modules = sorted(WING.rglob("*.py"))
    assert len(modules) >= 10
    for path in modules:
        for module, in_function in _imports(path):
            assert not module.startswith(ABOVE), f"{_module_name(path)} imports {module}"
            assert not (in_function and module.startswith("fxcompress")), f"{_module_name(path)} imports {module} late"


def test_the_wing_has_no_import_circle():
    imported = {}  # module -> the wing's modules it imports
    for path in WING.rglob("*.py"):
        for module, _ in _imports(path):
            if module.startswith("fxcompress.channels"):
                imported.setdefault(_module_name(path), set()).add(module)
    assert sum(map(len, imported.values())) > 10
    try:  # the standard library's topological sort: any circle, a module importing itself included, refuses
        graphlib.TopologicalSorter(imported).prepare()
    except graphlib.CycleError as circle:
        raise AssertionError(f"import circle: {' -> '.join(circle.args[1])}") from None
