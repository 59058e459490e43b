"""setup.py declares what megatron_flextron imports: a module-level import of a third-party
package is in ``install_requires`` (else ``pip install .`` gives a package whose modules do not
import: ``tqdm`` in checkpoint/flextron.py was missing), a function-local one there or in an
extra; and ruff's pin is the same in requirements.txt and the dev extra."""

import ast
import os
import re
import runpy
import sys

import setuptools

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# import name -> distribution name, where they differ
DISTRIBUTION = {"megatron": "megatron-core"}


def declared() -> dict:
    captured = {}
    setup, cwd = setuptools.setup, os.getcwd()
    setuptools.setup = lambda **kw: captured.update(kw)
    try:
        os.chdir(REPO)
        runpy.run_path(os.path.join(REPO, "setup.py"))
    finally:
        setuptools.setup = setup
        os.chdir(cwd)
    return captured


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower()


def third_party_imports() -> dict:
    """{distribution: "module" if any module-level import, else "function"}."""
    found = {}
    for folder, _, files in os.walk(os.path.join(REPO, "megatron_flextron")):
        for file in (f for f in files if f.endswith(".py")):
            path = os.path.join(folder, file)
            tree = ast.parse(open(path).read(), path)
            top = {id(s) for s in tree.body}
            for stmt in ast.walk(tree):
                if isinstance(stmt, ast.Import):
                    names = [a.name for a in stmt.names]
                elif isinstance(stmt, ast.ImportFrom) and stmt.level == 0:
                    names = [stmt.module]
                else:
                    continue
                for name in names:
                    root = name.split(".")[0]
                    if root in sys.stdlib_module_names or root == "megatron_flextron":
                        continue
                    dist = DISTRIBUTION.get(root, root)
                    where = "module" if id(stmt) in top else "function"
                    if found.get(dist) != "module":
                        found[dist] = where
    return found


def test_setup_declares_every_import():
    setup = declared()
    required = {_name(r) for r in setup["install_requires"]}
    extras = {_name(r) for reqs in setup["extras_require"].values() for r in reqs}
    imports = third_party_imports()
    assert {"torch", "megatron-core", "tqdm"} <= set(imports)
    module_level = sorted(d for d, where in imports.items() if where == "module")
    assert [d for d in module_level if d not in required] == []
    assert sorted(set(imports) - required - extras) == []
    ruff = [r for r in setup["extras_require"]["dev"] if _name(r) == "ruff"]
    with open(os.path.join(REPO, "requirements.txt")) as f:
        pinned = [line.split("#")[0].strip() for line in f if _name(line) == "ruff"]
    assert ruff == pinned == ["ruff==0.17.6"]
