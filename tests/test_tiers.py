"""Every test has exactly one tier marker (tests/conftest.py), the tiers' lists name tests that
exist, and the fast tier holds no multi-rank or real-model test."""

import ast
import os

from conftest import INTEGRATION_FILES, MULTIRANK

HERE = os.path.dirname(os.path.abspath(__file__))


def _tests(file: str) -> set:
    tree = ast.parse(open(os.path.join(HERE, file)).read())
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name[:5] == "test_"}


def test_tier_lists_name_existing_tests():
    for file in INTEGRATION_FILES:
        assert os.path.isfile(os.path.join(HERE, file)), file
    for entry in MULTIRANK:
        file, name = entry.split("::")
        assert name in _tests(file), entry


def test_each_collected_test_has_one_tier(request):
    tiers = {"unit", "multirank", "integration"}
    for item in request.session.items:
        marks = {m.name for m in item.iter_markers()} & tiers
        assert len(marks) == 1, (item.nodeid, marks)


def test_no_test_spawning_ranks_is_in_the_fast_tier():
    """A test that calls run_distributed or starts torchrun (directly or through a helper of
    its file) is listed in MULTIRANK or lives in an integration file."""
    for file in sorted(f for f in os.listdir(HERE) if f.startswith("test_") and f[-3:] == ".py"):
        if file in INTEGRATION_FILES or file == "test_tiers.py":
            continue
        tree = ast.parse(open(os.path.join(HERE, file)).read())
        funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}

        def spawns(fn, seen, funcs=funcs):
            for node in ast.walk(fn):
                if isinstance(node, ast.Name) and node.id == "run_distributed":
                    return True
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    if "--nproc-per-node" in node.value or node.value == "torchrun.py":
                        return True
                if isinstance(node, ast.Name) and node.id in funcs and node.id not in seen:
                    seen.add(node.id)
                    if spawns(funcs[node.id], seen, funcs):
                        return True
            return False

        for name, fn in funcs.items():
            if name.startswith("test_") and spawns(fn, {name}):
                assert f"{file}::{name}" in MULTIRANK, f"{file}::{name} spawns ranks: list it"
