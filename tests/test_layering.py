"""The house's floors: a module imports only from its own floor or below, nothing imports in a
circle, and no project import hides inside a function. docs/architecture.md explains the floors."""
import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Floors, lowest first; a module's floor is the first prefix that names it (longest match wins).
FLOORS = [
    ("foundation", ["errors", "config", "execution", "memory", "batches"]),
    ("graph vocabulary", ["analysis", "layers", "rules", "tracing", "verify", "datasets", "training", "distill",
                          "frontends", "text", "zoo", "rewire"]),
    ("pass protocol", ["pass_base", "history"]),
    ("analyses and primitives", ["analyses", "pruning", "quant", "encoded", "channels", "kernels", "calibration"]),
    ("passes", ["passes"]),
    ("front door", ["compile", "fileformat", "summary", "draw", "export", "onnx", "inspection", "sensitivity",
                    "pruning.interop", "cli", "report", "integrations", "compressed_tensors", "__main__", ""]),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "passes":
        parts = ["fxcompress", *parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in [*ROOT.glob("fxcompress/**/*.py"), *ROOT.glob("passes/**/*.py")]}


# Every check reads the same files: each is read and parsed once per session (and not at collection).
@functools.cache
def _source(module: str) -> str:
    return MODULES[module].read_text()


@functools.cache
def _nodes(source: str) -> list[ast.AST]:
    """Every node of the parsed source in ast.walk's (breadth-first) order: each check reads this list
    instead of walking the tree again."""
    return list(ast.walk(ast.parse(source)))


def floor_of(module: str) -> int:
    local = module.removeprefix("fxcompress").removeprefix(".")
    matches = [(len(prefix), i) for i, (_, prefixes) in enumerate(FLOORS) for prefix in prefixes
               if local == prefix or local.startswith(prefix + ".") or (prefix == "" and local == "")]
    assert matches, f"{module} is on no floor: add it to FLOORS and to docs/architecture.md"
    return max(matches)[1]


def _runtime_nodes(nodes: list[ast.AST]):
    """Every node except those under `if TYPE_CHECKING:` (annotations only, never imported)."""
    skipped = {id(n) for node in nodes if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
               for n in ast.walk(node)}
    return [node for node in nodes if id(node) not in skipped]


def project_imports(module: str, source: str | None = None) -> dict[str, ast.AST]:
    """The project modules `module` imports at run time (from `source`, else its file), with the
    import statement."""
    return _project_imports(module, _source(module) if source is None else source)


@functools.cache
def _project_imports(module: str, source: str) -> dict[str, ast.AST]:
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = {}
    for node in _runtime_nodes(_nodes(source)):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[:len(package.split(".")) - node.level + 1], *filter(None, [base])])
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found.update({name: node for name in names if name in MODULES and name != module})
    return found


@functools.cache
def graph():
    """The import graph of the package (networkx is imported here: about 1 s that collection need not pay)."""
    import networkx as nx
    return nx.DiGraph([(m, target) for m in MODULES for target in project_imports(m)])


def test_every_module_is_on_a_floor():
    for module in MODULES:
        floor_of(module)


def imports_from_above(module: str, source: str | None = None) -> dict[str, str]:
    """{imported module: its floor} for each import of `module` from a floor above its own."""
    return {t: FLOORS[floor_of(t)][0] for t in project_imports(module, source) if floor_of(t) > floor_of(module)}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_from_a_higher_floor(module):
    above = imports_from_above(module)
    assert not above, f"{module} ({FLOORS[floor_of(module)][0]}) imports from higher floors: {above}"


def test_no_import_circle():
    import networkx as nx
    cycles = list(nx.simple_cycles(graph()))
    assert not cycles, f"import circles: {cycles}"


def _is_project_import(node: ast.AST) -> bool:
    if isinstance(node, ast.ImportFrom):
        return bool(node.level) or (node.module or "").split(".")[0] in ("fxcompress", "passes")
    return isinstance(node, ast.Import) and any(a.name.split(".")[0] in ("fxcompress", "passes") for a in node.names)


def imports_inside_functions(module: str, source: str) -> list[str]:
    """`module.function: import ...` for each project import made inside a function of `source`.
    An import statement lies under a function exactly when it lies within the function's lines
    (decorators, the only children before `def`, are expressions), so the few imports are matched
    to the functions by line instead of walking every function's subtree."""
    nodes = _nodes(source)
    imports = [node for node in nodes if _is_project_import(node)]
    return [f"{module}.{function.name}: {ast.unparse(node)}" for function in nodes
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
            for node in imports if function.lineno <= node.lineno <= function.end_lineno]


def test_no_project_import_inside_a_function():
    hidden = [line for module in MODULES for line in imports_inside_functions(module, _source(module))]
    assert not hidden, hidden


def test_no_function_over_60_lines():
    long = [f"{module}.{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for module in MODULES for node in _nodes(_source(module))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60]
    assert not long, long


def test_the_checks_see_a_planted_violation():
    """The checks are not vacuous: a real module's source with one import planted fails each of them."""
    import networkx as nx
    assert floor_of("fxcompress.errors") < floor_of("fxcompress.passes.insert_masks") < floor_of("fxcompress.compile")
    assert floor_of("fxcompress.pruning.interop") > floor_of("fxcompress.pruning.masks")
    assert any(floor_of(t) < floor_of(m) for m, t in graph().edges)  # the graph is really read
    assert graph().number_of_edges() > 100
    module = "fxcompress.channels.select"
    source = MODULES[module].read_text()
    assert not imports_from_above(module, source) and not imports_inside_functions(module, source)
    back = source + "\nfrom ..compile import compile\nimport fxcompress.passes.prune_channels\n"
    assert set(imports_from_above(module, back)) == {"fxcompress.compile", "fxcompress.passes.prune_channels"}
    late = source + "\n\ndef late():\n    from .. import compile\n    import fxcompress.summary\n"
    assert len(imports_inside_functions(module, late)) == 2
    looped = graph().copy()
    looped.add_edges_from((module, target) for target in project_imports(module, back))
    assert [module, "fxcompress.passes.prune_channels"] in [sorted(c) for c in nx.simple_cycles(looped)]
