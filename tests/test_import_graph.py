"""No import cycle between the modules of ``lib``, ``assets`` and ``orchestration``.

The graph is read from the source with ``ast``: every ``import``/``from ... import`` of a module
of these packages, at module level **and inside function bodies** (a lazy import is still a
dependency, and a cycle through one breaks as soon as someone hoists it). Imports under
``if TYPE_CHECKING:`` are left out: they never run, and annotations are the usual way to name a
type without depending on its module. Importing a submodule does not count as depending on its
parent package (a package facade that re-exports its submodules is not a cycle).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("lib", "assets", "orchestration")


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, int]]:
    """(imported name, line) of every import outside ``if TYPE_CHECKING:`` blocks; ``from X
    import y`` gives ``X.y`` (a submodule, or a name the caller resolves to ``X``)."""
    out: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.extend((a.name, node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".") if is_package else module.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join([*pkg, base] if base else pkg)
            out.extend((f"{base}.{a.name}", node.lineno) for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def import_graph(root: Path = REPO, packages: tuple[str, ...] = PACKAGES) -> dict[str, dict[str, int]]:
    """module -> {imported module of the packages: first line importing it}."""
    files = {_module_name(f, root): f for p in packages for f in sorted((root / p).rglob("*.py"))}
    graph: dict[str, dict[str, int]] = {}
    for mod, f in files.items():
        edges: dict[str, int] = {}
        for name, line in _imports(ast.parse(f.read_text(), filename=str(f)), mod, f.name == "__init__.py"):
            # "from pkg import name": the submodule pkg.name when it exists, else pkg itself
            target = name if name in files else name.rpartition(".")[0] if name.rpartition(".")[0] in files else None
            if target and target != mod:
                edges.setdefault(target, line)
        graph[mod] = edges
    return graph


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0

    def connect(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sorted(out)


def _describe(comp: list[str], graph: dict[str, dict[str, int]]) -> str:
    members = set(comp)
    edges = [f"    {a} -> {b} (line {graph[a][b]})" for a in comp for b in sorted(graph[a]) if b in members]
    return "  cycle among " + ", ".join(comp) + ":\n" + "\n".join(edges)


def test_the_graph_sees_lazy_and_package_imports() -> None:
    """The reader finds imports inside functions and resolves ``from pkg import submodule``
    (a test of the test: without these the cycle check below would be vacuous)."""
    graph = import_graph()
    assert "lib.store" in graph["orchestration.resources"]
    assert "orchestration.resources" in graph["orchestration.cli"]  # imported inside functions only
    assert "orchestration.main" in graph["orchestration.cli"]
    assert "lib.screening" in graph["assets.screening"]  # "from lib import screening as scr"
    assert len(graph) >= 40


def test_a_cycle_is_found(tmp_path: Path) -> None:
    pkg = tmp_path / "lib"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from lib.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from lib import c\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from lib import b\n"
                              "import lib.a\n")
    (pkg / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from lib import a\n")
    graph = import_graph(tmp_path, ("lib",))
    assert graph["lib.c"] == {"lib.a": 4}
    assert graph["lib.d"] == {}
    assert strongly_connected(graph) == [["lib.a", "lib.b", "lib.c"]]


def test_no_import_cycles() -> None:
    graph = import_graph()
    cycles = strongly_connected(graph)
    assert not cycles, "import cycles between modules:\n" + "\n".join(_describe(c, graph) for c in cycles)
