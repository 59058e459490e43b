"""The package graph of megatron_flextron is acyclic, function-local imports included.

Each top-level package (or root module) is a node; ``a -> b`` when any module of ``a`` imports
from ``b``, wherever the import statement stands. A cycle means a shared piece lives in the wrong
place: move it below both users instead of deferring an import.
"""

import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "megatron_flextron")


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
            for stmt in ast.walk(tree):
                targets = []
                if isinstance(stmt, ast.ImportFrom) and stmt.module and stmt.level == 0:
                    targets = [stmt.module]
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


def test_package_graph_is_acyclic():
    graph = package_graph()
    assert {"elastic", "convert", "routers", "training"} <= set(graph), graph
    cycle = find_cycle(graph)
    assert cycle is None, "package cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}}) is None
