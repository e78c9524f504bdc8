"""Import layering of the package: low layers never import high ones, and nothing imports in a cycle.

Every module under ``mmdit/`` (and ``kernels/``, installed as ``mmdit_kernels``) is parsed with
``ast`` -- nothing is executed -- and every import is collected: top-level ones, those inside
functions (lazy imports count: they still tie the layers together) and relative ones. A module
belongs to the layer of the longest entry of :data:`LAYERS` that is a prefix of its name. The
checks:

* **layers** -- a module may import modules of its own layer or of a lower one, never a higher one;
* **cycles** -- no import cycle between modules, and none between the packages of :data:`LAYERS`
  (``mmdit.codecs`` and ``mmdit.flow`` share a layer, so they may import each other one way only);
* **placement** -- a module that matches no entry fails: add it to :data:`LAYERS` where it belongs.

A second test feeds the checker a small fake import graph, so the checks are known to bite.
"""

from __future__ import annotations

import ast
from pathlib import Path

# The allowed order, lowest first. A module may import its own layer (acyclically) and lower ones.
LAYERS: list[list[str]] = [
    ["mmdit_kernels", "mmdit.util"],
    ["mmdit.codecs", "mmdit.encoders", "mmdit.flow", "mmdit.attention"],
    ["mmdit.parallel"],
    ["mmdit.model"],
    ["mmdit.tasks"],
    ["mmdit.config_lib", "mmdit.config_spec"],
    ["mmdit.data", "mmdit.convert"],
    ["mmdit.train", "mmdit.sample"],
    ["mmdit.eval", "mmdit.serve", "mmdit.distill"],
    ["mmdit.cli"],
]
ROOT_PACKAGE = "mmdit"  # mmdit/__init__.py: the bottom layer (it must import nothing of the package)

REPO = Path(__file__).resolve().parents[1]
SOURCES = {"mmdit": REPO / "mmdit", "mmdit_kernels": REPO / "kernels"}  # import name -> folder

Graph = dict[str, dict[str, str]]  # module -> {imported module: "file:line" of the first such import}


# ------------------------------------------------------------------------------------------------
# collecting imports


def module_files(sources: dict[str, Path] = SOURCES) -> dict[str, Path]:
    """``{module name: file}`` of every ``.py`` file under the source folders."""
    out = {}
    for name, folder in sources.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([name, *parts])] = path
    return out


def _resolve(name: str, modules) -> str:
    """The longest prefix of dotted ``name`` that is a known module (``name`` itself if none is)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return name


def imports_of(module: str, path: Path, modules, tops=tuple(SOURCES)) -> dict[str, str]:
    """``{imported module: "file:line"}`` for one module's imports of ``tops`` packages (all of them,
    at any depth of the file). ``from p import x`` imports ``p.x`` when that is a module, else ``p``."""
    is_pkg = path.name == "__init__.py"
    package = module if is_pkg else module.rpartition(".")[0]
    shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    out: dict[str, str] = {}

    def add(target: str, node) -> None:
        if target.split(".")[0] in tops and target != module:
            out.setdefault(_resolve(target, modules), f"{shown}:{node.lineno}")

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if sub in modules else base, node)
    return out


def import_graph(sources: dict[str, Path] = SOURCES) -> Graph:
    files = module_files(sources)
    return {m: imports_of(m, p, files) for m, p in files.items()}


# ------------------------------------------------------------------------------------------------
# checking


def unit_of(module: str, layers: list[list[str]] = LAYERS) -> tuple[int, str] | None:
    """``(layer index, entry)`` of the longest entry of ``layers`` that is ``module`` or a dotted
    prefix of it; the root package is the bottom layer; None when nothing matches."""
    if module == ROOT_PACKAGE:
        return 0, ROOT_PACKAGE
    best = None
    for i, layer in enumerate(layers):
        for entry in layer:
            if (module == entry or module.startswith(entry + ".")) and (best is None or len(entry) > len(best[1])):
                best = (i, entry)
    return best


def _describe(i: int, layers) -> str:
    return f"layer {i} {layers[i]}"


def layer_violations(graph: Graph, layers: list[list[str]] = LAYERS) -> list[str]:
    """Unplaced modules, imports of modules that do not exist, and imports from a layer up to a higher one."""
    errors = []
    for module in sorted(graph):
        if unit_of(module, layers) is None:
            errors.append(
                f"{module} belongs to no layer: add it (or its package) to LAYERS in tests/test_layering.py, "
                f"in the lowest layer whose modules it does not import"
            )
    for module, targets in sorted(graph.items()):
        src = unit_of(module, layers)
        for target, where in sorted(targets.items()):
            if target not in graph:
                errors.append(f"{where}: {module} imports {target}, which is no module of the package")
                continue
            dst = unit_of(target, layers)
            if src is not None and dst is not None and dst[0] > src[0]:
                errors.append(
                    f"{where}: {module} ({_describe(src[0], layers)}) imports {target} "
                    f"({_describe(dst[0], layers)}): a lower layer must not import a higher one"
                )
    return errors


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components (iterative), each a list of nodes; singletons only with a self-loop."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    n = stack.pop()
                    on_stack.discard(n)
                    comp.append(n)
                    if n == node:
                        break
                if len(comp) > 1 or node in graph.get(node, ()):
                    out.append(sorted(comp))
    return out


def _cycle_through(start: str, graph: dict[str, set[str]], within: set[str]) -> list[str]:
    """A shortest path ``start -> ... -> start`` inside ``within`` (breadth first)."""
    prev, frontier = {}, [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph.get(node, ())):
                if child not in within:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if child not in prev:
                    prev[child] = node
                    nxt.append(child)
        frontier = nxt
    return [start]


def cycles(graph: Graph, layers: list[list[str]] = LAYERS) -> list[str]:
    """One cycle path per strongly connected component, among modules and among layer packages."""
    errors = []
    modules = {m: set(t) & set(graph) for m, t in graph.items()}
    for comp in _strongly_connected(modules):
        path = _cycle_through(comp[0], modules, set(comp))
        where = [graph[a][b] for a, b in zip(path, path[1:])]
        errors.append("module import cycle " + " -> ".join(path) + " (" + ", ".join(where) + ")")
    units: dict[str, set[str]] = {}
    where: dict[tuple[str, str], str] = {}
    for m, targets in graph.items():
        a = unit_of(m, layers)
        if a is None:
            continue
        units.setdefault(a[1], set())
        for t, w in targets.items():
            b = unit_of(t, layers) if t in graph else None
            if b is not None and b[1] != a[1]:
                units[a[1]].add(b[1])
                where.setdefault((a[1], b[1]), f"{m} -> {t} at {w}")
    for comp in _strongly_connected(units):
        path = _cycle_through(comp[0], units, set(comp))
        errors.append(
            "package import cycle " + " -> ".join(path) + " (" + "; ".join(where[a, b] for a, b in zip(path, path[1:])) + ")"
        )
    return errors


# ------------------------------------------------------------------------------------------------
# tests


def test_layers_are_respected_and_acyclic():
    graph = import_graph()
    assert "mmdit.model.mmdit" in graph and "mmdit_kernels.block_map" in graph, sorted(graph)[:10]
    errors = layer_violations(graph) + cycles(graph)
    assert not errors, "import layering (order: " + " < ".join(map(str, LAYERS)) + "):\n" + "\n".join(errors)


def test_checker_catches_up_imports_cycles_and_unplaced_modules():
    layers = [["low"], ["mid_a", "mid_b"], ["high"]]
    w = "x.py:1"
    ok: Graph = {"low": {}, "low.x": {"low": w}, "mid_a": {"low.x": w}, "mid_b": {"mid_a": w}, "high": {"mid_b": w, "low": w}}
    assert layer_violations(ok, layers) == [] and cycles(ok, layers) == []

    up = {**ok, "low.x": {"high": "low/x.py:7"}}
    (err,) = layer_violations(up, layers)
    assert err.startswith("low/x.py:7: low.x (layer 0 ['low']) imports high (layer 2 ['high'])"), err

    same_layer = {**ok, "mid_a": {"low.x": w, "mid_b.y": w}, "mid_b.y": {}}  # mid_a <-> mid_b: packages
    assert layer_violations(same_layer, layers) == []
    (err,) = cycles(same_layer, layers)
    assert err.startswith("package import cycle mid_a -> mid_b -> mid_a"), err

    loop = {**ok, "low": {"low.x": w}, "low.x": {"low.y": w}, "low.y": {"low": w}}
    (err,) = cycles(loop, layers)
    assert err.startswith("module import cycle low -> low.x -> low.y -> low"), err

    stray = {**ok, "elsewhere": {}, "high": {"gone": w}}
    errs = layer_violations(stray, layers)
    assert any("elsewhere belongs to no layer" in e for e in errs), errs
    assert any("imports gone, which is no module" in e for e in errs), errs


def test_collector_sees_lazy_and_relative_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import b\n")
    (pkg / "a.py").write_text("import os\n\ndef f():\n    from pkg.sub import b\n    return b\n")
    (pkg / "sub" / "b.py").write_text("from ..a import f\nfrom .. import a as _a\n")
    files = module_files({"pkg": pkg})
    assert set(files) == {"pkg", "pkg.a", "pkg.sub", "pkg.sub.b"}
    graph = {m: imports_of(m, p, files, tops=("pkg",)) for m, p in files.items()}
    assert set(graph["pkg.a"]) == {"pkg.sub.b"}
    assert set(graph["pkg.sub"]) == {"pkg.sub.b"}
    assert set(graph["pkg.sub.b"]) == {"pkg.a"}
    (err,) = cycles(graph, [["pkg"]])
    assert "pkg.a -> pkg.sub.b -> pkg.a" in err, err
