"""The package's import graph has no circle: every module under src/vqkit can be read (and
imported) after the modules it names, and nothing imports back up the layers."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _module(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(nodes: list[ast.stmt], name: str, is_package: bool, modules: set[str]) -> set[str]:
    """The modules the statements ``nodes`` of module ``name`` import, blocks included."""
    edges: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.If):
            edges |= _imports(node.body + node.orelse, name, is_package, modules)
        elif isinstance(node, ast.Try):
            blocks = node.body + node.orelse + node.finalbody
            blocks += [s for h in node.handlers for s in h.body]
            edges |= _imports(blocks, name, is_package, modules)
        elif isinstance(node, ast.Import):
            edges.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                edges.add(sub if sub in modules else target)
    return edges


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """module -> the vqkit modules it imports at module level, ``if TYPE_CHECKING:`` blocks
    included (a type-only import is still a circle for a reader). Imports inside functions are
    the deliberate lazy ones (the CLI, optional dependencies) and are not edges."""
    modules = {_module(p, src): p for p in src.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        edges = _imports(tree.body, name, path.name == "__init__.py", set(modules))
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return found


def test_no_import_circle_inside_src():
    graph = import_graph()
    assert len(graph) > 40 and graph["vqkit.quantize.quantizer"]  # the graph was read
    assert cycles(graph) == []


def test_the_checker_finds_a_circle(tmp_path):
    pkg = tmp_path / "vqkit" / "quantize"
    pkg.mkdir(parents=True)
    (tmp_path / "vqkit" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from .a import A\n")
    (pkg / "a.py").write_text("from .b import B\nA = 1\n")
    (pkg / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import A\nB = 2\n"
    )
    assert cycles(import_graph(tmp_path)) == [["vqkit.quantize.a", "vqkit.quantize.b"]]


def test_strategies_need_no_quantizer_module():
    """Maintenance and regularizers see the quantizer through ``CodebookOwner`` only."""
    graph = import_graph()
    for name in ("vqkit.quantize.maintenance", "vqkit.quantize.regularizers"):
        assert "vqkit.quantize.quantizer" not in graph[name]
        assert "vqkit.quantize.interface" in graph[name]
