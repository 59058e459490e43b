import collections
import logging
import os
import sys
import warnings

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")


@pytest.fixture(scope="session")
def megatron_single_process():
    """megatron parallel_state for a world of one (gloo), shared by single-process tests."""
    from distributed import free_port

    from megatron_flextron.parallel import destroy_model_parallel, initialize_model_parallel

    os.environ["MASTER_PORT"] = str(free_port())
    initialize_model_parallel(1, 1, seed=1234)
    # this process holds that port now: a tool a test starts must not inherit it (it would
    # fail with EADDRINUSE), it picks a free one of its own
    del os.environ["MASTER_PORT"]
    yield
    destroy_model_parallel()


# --- upstream drift: one short table of the deprecations seen during the run -------------------

_DRIFT = collections.Counter()
_DRIFT_CATEGORIES = (DeprecationWarning, PendingDeprecationWarning, FutureWarning, UserWarning)


def _origin(filename: str) -> str:
    for package in ("megatron", "torch", "transformers"):
        marker = f"/site-packages/{package}/"
        if marker in filename:
            return package + "/" + filename.split(marker, 1)[1]
    return os.path.relpath(filename)


def pytest_warning_recorded(warning_message, when, nodeid, location):
    if issubclass(warning_message.category, _DRIFT_CATEGORIES):
        text = str(warning_message.message).strip().splitlines()[0][:140]
        where = f"{_origin(warning_message.filename)}:{warning_message.lineno}"
        _DRIFT[(warning_message.category.__name__, where, text)] += 1


class _MegatronDeprecationLog(logging.Handler):
    """megatron logs some deprecations (``GPTModel IS DEPRECATED``) instead of warning."""

    def emit(self, record):
        message = record.getMessage()
        if "deprecat" in message.lower():
            _DRIFT[("log", record.name, message.splitlines()[0][:140])] += 1


logging.getLogger("megatron").addHandler(_MegatronDeprecationLog(logging.WARNING))


def pytest_terminal_summary(terminalreporter):
    if not _DRIFT:
        return
    terminalreporter.section(f"upstream warnings ({len(_DRIFT)} distinct, in this process)")
    for (kind, where, text), count in _DRIFT.most_common():
        terminalreporter.write_line(f"{count:6d} x {kind} {where}: {text}")


# Test tiers, assigned here from each test's source (files never move):
#   unit         one process, in-process: run before every commit (scripts/run_tests.sh -m unit)
#   multirank    2-4 gloo ranks (run_distributed) or torchrun: TP/PP/DP parity with one process
#   integration  a tool's command line (tools/*.py, scripts) in a subprocess, the trainer end
#                to end, the real SmolLM2 model, the example scripts, serving
# A test is multirank or integration when it, or a function of its file that it calls, does what
# the tier names; fixtures are not followed (their cost is paid once per module).
INTEGRATION_FILES = {
    "test_trainer.py",
    "test_joint_token_routers.py",
    "test_smollm2.py",
    "test_pretrain_example.py",
    "test_reproduce_example.py",
    "test_server.py",
}
TIERS = ("unit", "multirank", "integration")
_MULTIRANK_MARKS = ("run_distributed", "--nproc-per-node", "torchrun.py")


def _runs_a_tool(word: str) -> bool:
    """A name or string of a test that runs a tool or script in a subprocess."""
    return word in ("run_tool", "tools") or word.startswith(("tools/", "examples/")) or (
        word.endswith(".sh")
    )


def pytest_configure(config):
    for tier, what in zip(TIERS, ("one process, fast", "gloo ranks", "end to end, subprocesses")):
        config.addinivalue_line("markers", f"{tier}: {what} (tests/conftest.py assigns it)")


def _words(path: str) -> dict:
    """{test function: the names and strings it uses, through the functions of its file}."""
    import ast

    with open(path) as f:
        tree = ast.parse(f.read(), path)
    funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}

    def used(name, seen):
        out = set()
        for node in ast.walk(funcs[name]):
            if isinstance(node, ast.Name) or isinstance(node, ast.Attribute):
                out.add(node.id if isinstance(node, ast.Name) else node.attr)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                out.add(node.value)
        for other in sorted(out & set(funcs) - seen):
            seen.add(other)
            out |= used(other, seen)
        return out

    return {name: used(name, {name}) for name in funcs if name.startswith("test_")}


_WORDS: dict = {}


def tier_of(path: str, name: str) -> str:
    file = os.path.basename(path)
    words = _WORDS.setdefault(path, _words(path)).get(name, set())
    if any(mark in word for word in words for mark in _MULTIRANK_MARKS):
        return "multirank"
    if file in INTEGRATION_FILES or "smollm2" in name or any(map(_runs_a_tool, words)):
        return "integration"
    return "unit"


def pytest_collection_modifyitems(config, items):
    for item in items:
        item.add_marker(getattr(pytest.mark, tier_of(str(item.path), item.originalname)))
