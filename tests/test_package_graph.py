"""The package graph of megatron_flextron follows the documented layer order, function-local
and relative imports included.

Each top-level package (or root module) is a node; ``a -> b`` when any module of ``a`` imports
from ``b``, wherever the import statement stands. docs/design.md's package map (and README's,
the same order) lists the nodes from low to high: each imports only nodes above it. An import
against the order means a shared piece lives in the wrong place: move it below both users.
"""

import ast
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.join(REPO, "megatron_flextron")


def _node(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def package_graph() -> dict:
    graph = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
            src = _node(rel.removesuffix(".__init__"))
            if src == "__init__":
                continue  # the package's own __init__ only re-exports
            with open(path) as f:
                tree = ast.parse(f.read(), path)
            package = rel.split(".")[:-1]  # the module's package (for relative imports)
            for stmt in ast.walk(tree):
                targets = []
                if isinstance(stmt, ast.ImportFrom) and stmt.level == 0 and stmt.module:
                    targets = [stmt.module]
                elif isinstance(stmt, ast.ImportFrom):  # relative: from the module's package up
                    base = package[: len(package) - (stmt.level - 1)]
                    targets = [".".join(base + ([stmt.module] if stmt.module else []))]
                    if not stmt.module:  # ``from . import x``: x is a module of that package
                        targets = [".".join(base + [a.name]) for a in stmt.names]
                elif isinstance(stmt, ast.Import):
                    targets = [a.name for a in stmt.names]
                for target in targets:
                    if target.split(".")[0] != "megatron_flextron":
                        continue
                    dst = _node(target)
                    if dst not in ("__init__", src):
                        graph.setdefault(src, set()).add(dst)
    return graph


def find_cycle(graph: dict):
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path + [node, nxt]
            if nxt not in state:
                found = visit(nxt, path + [node])
                if found:
                    return found
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [])
            if found:
                return found[found.index(found[-1]):]
    return None


def documented_order(doc: str) -> list:
    """The nodes of a markdown package map, low to high: its rows `name/` or `name.py`."""
    with open(os.path.join(REPO, doc)) as f:
        text = f.read()
    table = text[text.index("## Package map"):]
    return re.findall(r"^\| `([a-z_]+)(?:/|\.py)` \|", table, flags=re.M)


def order_violations(graph: dict, order: list) -> list:
    """Edges ``a -> b`` where ``b`` is not above ``a`` in ``order`` (or is not listed)."""
    rank = {name: i for i, name in enumerate(order)}
    nodes = set(graph) | {b for targets in graph.values() for b in targets}
    missing = sorted(nodes - set(rank))
    bad = [f"{n} is not in the package map" for n in missing]
    for a in sorted(graph):
        for b in sorted(graph[a]):
            if a in rank and b in rank and rank[b] >= rank[a]:
                bad.append(f"{a} imports {b}, which is listed below it")
    return bad


def test_package_graph_follows_the_documented_layer_order():
    graph = package_graph()
    assert {"elastic", "convert", "routers", "training"} <= set(graph), graph
    order = documented_order("docs/design.md")
    assert order == documented_order("README.md"), "README and docs/design.md disagree"
    on_disk = {n[:-3] if n.endswith(".py") else n for n in os.listdir(ROOT)}
    assert set(order) == on_disk - {"__init__", "__pycache__"}, "package map != the packages"
    assert order_violations(graph, order) == []
    cycle = find_cycle(graph)
    assert cycle is None, "package cycle: " + " -> ".join(cycle)


def test_order_check_finds_an_upward_and_a_relative_import(tmp_path, monkeypatch):
    assert order_violations({"a": {"b"}}, ["a", "b"]) == ["a imports b, which is listed below it"]
    assert order_violations({"b": {"a"}}, ["a", "b"]) == []
    pkg = tmp_path / "megatron_flextron"
    (pkg / "low").mkdir(parents=True)
    (pkg / "high").mkdir()
    (pkg / "low" / "x.py").write_text("from ..high import y\n")
    (pkg / "high" / "y.py").write_text("from . import z\nfrom ..low.x import w\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", str(pkg))
    assert package_graph() == {"low": {"high"}, "high": {"low"}}


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}}) is None
