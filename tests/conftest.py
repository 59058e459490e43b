import os
import shutil
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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.when == "call":
        item.call_passed = report.passed


@pytest.fixture(autouse=True)
def _free_disk_after_passing_test(request):
    """Delete a passed test's tmp_path at once: the example tests write GBs of checkpoints, and the
    suite's peak disk use would otherwise be the sum of all of them."""
    tmp = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    if tmp is not None and getattr(request.node, "call_passed", False):
        shutil.rmtree(tmp, ignore_errors=True)
