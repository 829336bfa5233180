"""The plan of the house: no import cycle among expertsim's modules, no arrow against the layers
declared in docs/architecture.md, the real runner never reaches the simulator, and no module over
600 lines (no exceptions: a module that grows past it is split by concern).

Imports are read from the source (``ast``), not by importing: module-level imports, imports inside
functions, ``from . import x``, relative imports, and ``importlib.import_module("expertsim....")``
with a literal string all count. An edge goes to the module a statement names: ``from
expertsim.sim import fast`` goes to ``expertsim.sim.fast`` (a submodule), ``from expertsim.sim
import Simulation`` to the package ``expertsim.sim`` (its ``__init__``). The parent packages Python
runs first on ``import a.b.c`` are not edges for the cycle check (every submodule would otherwise
form a cycle with its package's ``__init__``), but they are followed for "what does importing X
load" (the real runner's reach).
"""
from __future__ import annotations

import ast
import re
from functools import lru_cache
from pathlib import Path

import pytest

import expertsim

PACKAGE_DIR = Path(expertsim.__file__).resolve().parent
DESIGN = PACKAGE_DIR.parent / "docs" / "architecture.md"
MAX_LINES = 600


def _module_files() -> dict[str, Path]:
    """Module name -> file for every module of the package (``__init__.py`` is the package)."""
    out = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _module_files()


def _resolve(name: str) -> str | None:
    """The longest expertsim module that ``name`` starts with (``a.b.Class`` -> ``a.b``)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in MODULES:
            return candidate
        parts.pop()
    return None


def _import_targets(module: str, path: Path) -> list[tuple[str, int]]:
    """(imported expertsim module, line) for every import in ``path``, wherever it stands."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append((alias.name, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                found.append((sub if sub in MODULES else source, node.lineno))
        elif isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if (called == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)):
                found.append((node.args[0].value, node.lineno))
    out = []
    for name, line in found:
        target = _resolve(name) if name == "expertsim" or name.startswith("expertsim.") else None
        if target is not None and target != module:
            out.append((target, line))
    return out


@lru_cache(maxsize=None)
def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported module: first line that imports it}."""
    graph = {}
    for module, path in MODULES.items():
        edges: dict[str, int] = {}
        for target, line in _import_targets(module, path):
            edges.setdefault(target, line)
        graph[module] = edges
    return graph


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _a_cycle(graph, component: list[str]) -> list[str]:
    """One concrete cycle inside a strongly connected component, as a path a -> b -> ... -> a."""
    members = set(component)
    start = component[0]
    parent = {start: None}
    queue = [start]
    while queue:  # breadth-first from start; the first edge back to start closes a shortest cycle
        v = queue.pop(0)
        for w in sorted(graph[v]):
            if w == start:
                path = [v]
                while parent[path[-1]] is not None:
                    path.append(parent[path[-1]])
                return path[::-1] + [start]  # start -> ... -> v -> start
            if w in members and w not in parent:
                parent[w] = v
                queue.append(w)
    return component


def _describe(graph, path: list[str]) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(path, path[1:])) + f" -> {path[-1]}"


def read_layers() -> tuple[dict[str, str], dict[str, set[str]]]:
    """From the table in docs/architecture.md: (module prefix -> layer, layer -> layers it may
    import, itself included)."""
    text = DESIGN.read_text()
    marker = text.index("<!-- layers:")
    prefixes, allowed = {}, {}
    for line in text[marker:].splitlines()[1:]:
        if not line.startswith("|"):
            if allowed:
                break
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] in ("layer", "") or set(cells[0]) <= {"-"}:
            continue
        layer, modules, may = cells
        for prefix in re.findall(r"`([\w.]+)`", modules):
            prefixes[prefix] = layer
        allowed[layer] = {layer} | {m.strip() for m in may.split(",") if m.strip() not in ("", "-")}
    return prefixes, allowed


def layer_of(module: str, prefixes: dict[str, str]) -> str | None:
    best = None
    for prefix in prefixes:
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best):
                best = prefix
    return prefixes[best] if best is not None else None


# --- the checks ---------------------------------------------------------------------------------
def test_the_walker_sees_every_kind_of_import():
    """The walker itself: a function-level import, a relative import, ``from . import module`` and
    an importlib string each give an edge (checked on modules that use them)."""
    graph = import_graph()
    assert len(MODULES) > 50
    assert sum(len(e) for e in graph.values()) > 150
    for module, path in MODULES.items():
        source = path.read_text()
        if 'import_module("expertsim.' in source:
            literal = re.search(r'import_module\("(expertsim[\w.]+)"\)', source).group(1)
            assert _resolve(literal) in graph[module], (module, literal)


def test_layer_table_is_read_and_covers_every_module():
    prefixes, allowed = read_layers()
    assert {"errors", "specs", "traces", "policies", "sim", "analysis", "cli", "real_runner"} <= set(allowed)
    for layer, may in allowed.items():
        unknown = may - set(allowed)
        assert not unknown, f"docs/architecture.md: layer {layer} may import unknown layers {unknown}"
    stale = [p for p in prefixes if not any(m == p or m.startswith(p + ".") for m in MODULES)]
    assert not stale, f"docs/architecture.md's layer table names modules that do not exist: {stale}"
    missing = [m for m in MODULES if layer_of(m, prefixes) is None]
    assert not missing, (f"modules in no layer of docs/architecture.md's table: {missing}; add them to "
                         f"the row of the layer they belong to")


def test_no_import_cycles():
    graph = import_graph()
    cycles = [f"{', '.join(c)}; e.g. {_describe(graph, _a_cycle(graph, c))}" for c in _cycles(graph)]
    assert not cycles, "import cycles among expertsim's modules (counting imports inside functions):\n" + \
        "\n".join(cycles)


def test_no_arrow_against_the_layers():
    prefixes, allowed = read_layers()
    graph = import_graph()
    bad = []
    for module, edges in sorted(graph.items()):
        layer = layer_of(module, prefixes)
        for target, line in sorted(edges.items()):
            target_layer = layer_of(target, prefixes)
            if layer is not None and target_layer not in allowed[layer]:
                bad.append(f"{MODULES[module].relative_to(PACKAGE_DIR.parent)}:{line}: {module} ({layer}) "
                           f"imports {target} ({target_layer})")
    assert not bad, "imports against docs/architecture.md's layers:\n" + "\n".join(bad)


def _loads(module: str) -> set[str]:
    """Every expertsim module that importing ``module`` and calling all its functions may load:
    its imports, transitively, with the parent packages Python runs first."""
    graph = import_graph()
    seen, todo = set(), [module]
    while todo:
        v = todo.pop()
        if v in seen:
            continue
        seen.add(v)
        parts = v.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        todo.extend(graph[v])
    return seen


def test_real_runner_never_reaches_the_simulator():
    bad = {}
    for module in MODULES:
        if module.startswith("expertsim.real_runner"):
            reached = sorted(m for m in _loads(module)
                             if m.split(".")[1:2] in (["sim"], ["analysis"], ["cli"], ["validate"]))
            if reached:
                bad[module] = reached
    assert not bad, f"the real runner reaches the simulator or the layers above it: {bad}"


def test_reach_follows_parent_packages():
    """``_loads`` is what importing does: a submodule brings its package's ``__init__``."""
    assert "expertsim.sim" in _loads("expertsim.sim.cost")
    assert "expertsim.sim.engine" in _loads("expertsim.sim.cost")  # through sim/__init__.py


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_length(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, (f"{module} has {lines} lines (limit {MAX_LINES}): split it by concern "
                                f"into a package of modules (as expertsim/sim/fast/)")


def test_public_api_faces():
    """The package faces the README and plug-ins import from keep working (issue 15)."""
    from expertsim.errors import ExpertSimError
    from expertsim.policies import (CacheConfig, EvictionPolicy, System, make_policy, make_system,
                                    register_eviction)
    from expertsim.sim import SimOptions, Simulation, lru_mrc, replay_cache
    from expertsim.specs import load_hardware, load_model
    from expertsim.traces import RoutingTrace, read_trace, write_trace

    assert issubclass(ExpertSimError, Exception)
    assert callable(lru_mrc) and callable(replay_cache) and callable(read_trace) and callable(write_trace)
    assert {CacheConfig, EvictionPolicy, System, SimOptions, Simulation, RoutingTrace}
    assert make_policy("lru").eviction.name == "lru"
    assert callable(make_system) and callable(register_eviction) and callable(load_model) and callable(load_hardware)
