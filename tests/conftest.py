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
