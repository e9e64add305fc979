"""The package's layers depend one way: each imports only the layers below it.

Every module's imports are read with ``ast`` (function-local imports included, since they are
dependencies too) and checked for: no import cycle between modules or between layers, no
import of a higher layer, and no private name (``_x``) taken from another module.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = "fisedit_compiler"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

# The layers, lowest first: each may import itself and the layers before it. A layer is a set
# of top-level names inside the package (modules or subpackages); every name not listed here
# belongs to the last, user-facing layer (edit_flow, app, backend, inspect, bench, cli, zoo, shapes,
# pipeline_files and the package's __init__).
LAYERS = (
    ("core", ("errors", "checks", "config", "ir", "graph_keys")),
    ("execution", ("execution",)),      # mask plan, reference sparse ops, kernels, launchers
    ("passes", ("passes",)),
    ("compiler", ("compiler",)),        # capture and the pass pipeline, producing a Program
    ("engine", ("engine",)),            # record, edit and dense steps; caches; CUDA graphs
    ("user-facing", None),
)
LAYER_NAMES = [name for name, _ in LAYERS]


def layer_of(module: str) -> str:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else None
    for name, members in LAYERS:
        if members is not None and top in members:
            return name
    return LAYERS[-1][0]


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = (PACKAGE,) + path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


MODULES = _modules()


def _imports(module: str, path: Path):
    """(imported module, private names taken from it, line) for each first-party import."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    yield _known(alias.name), [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                if not is_package:
                    base = base[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not (target == PACKAGE or target.startswith(PACKAGE + ".")):
                continue
            names = []      # names defined in ``target`` (not its submodules)
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                if submodule in MODULES:
                    yield submodule, [], node.lineno
                else:
                    names.append(alias.name)
            if names:
                private = [name for name in names
                           if name.startswith("_") and not name.startswith("__")]
                yield _known(target), private, node.lineno


def _known(name: str) -> str:
    """The longest prefix of ``name`` that is a module of the package."""
    parts = name.split(".")
    while parts and ".".join(parts) not in MODULES:
        parts.pop()
    return ".".join(parts)


def _module_attributes(path: Path):
    """Attribute reads ``alias._x`` where ``alias`` is bound to a package module by an import."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    aliases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith(
                PACKAGE)):
            aliases.update(alias.asname or alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            aliases.update(alias.asname or alias.name.split(".")[0] for alias in node.names
                           if alias.name.startswith(PACKAGE))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases and node.attr.startswith("_")
                and not node.attr.startswith("__")):
            yield f"{node.value.id}.{node.attr}", node.lineno


EDGES = {module: {} for module in MODULES}   # module -> {imported module: line}
PRIVATE = []                                 # "module:line imports name from other"
for _module, _path in MODULES.items():
    for _target, _private, _line in _imports(_module, _path):
        if _target and _target != _module:
            EDGES[_module].setdefault(_target, _line)
            PRIVATE.extend(f"{_module}:{_line} imports {name} from {_target}"
                           for name in _private)


def _cycle(graph: dict) -> list | None:
    """One cycle of ``graph`` (a list of nodes, first repeated last), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_every_module_is_parsed():
    assert f"{PACKAGE}.engine.engine" in MODULES and f"{PACKAGE}.execution.plan" in MODULES
    assert sum(len(targets) for targets in EDGES.values()) > 50


def test_no_import_cycle_between_modules():
    assert _cycle(EDGES) is None, " -> ".join(_cycle(EDGES))


def test_no_import_cycle_between_layers():
    graph = {name: set() for name in LAYER_NAMES}
    for module, targets in EDGES.items():
        for target in targets:
            if layer_of(target) != layer_of(module):
                graph[layer_of(module)].add(layer_of(target))
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_no_module_imports_a_higher_layer():
    upward = [f"{module}:{line} ({layer_of(module)}) imports {target} ({layer_of(target)})"
              for module, targets in EDGES.items() for target, line in targets.items()
              if LAYER_NAMES.index(layer_of(target)) > LAYER_NAMES.index(layer_of(module))]
    assert not upward, "\n".join(upward)


def test_no_private_name_is_imported_from_another_module():
    assert not PRIVATE, "\n".join(PRIVATE)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_attribute_of_another_module_is_read(module):
    reads = list(_module_attributes(MODULES[module]))
    assert not reads, f"{module} reads " + ", ".join(f"{name} (line {line})"
                                                      for name, line in reads)


def test_the_layer_rules_catch_violations():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    assert layer_of(f"{PACKAGE}.execution.kernels.sparse_conv") == "execution"
    assert layer_of(f"{PACKAGE}.ir") == "core" and layer_of(PACKAGE) == "user-facing"
    assert LAYER_NAMES.index(layer_of(f"{PACKAGE}.engine.engine")) > \
        LAYER_NAMES.index(layer_of(f"{PACKAGE}.compiler.pipeline"))
