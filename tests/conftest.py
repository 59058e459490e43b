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


# Test tiers, assigned here by file and test (not by folder, so that files never move):
#   unit        one process, seconds each: run before every commit (scripts/run_tests.sh -m unit)
#   multirank   2-4 gloo ranks or torchrun: TP/PP/DP parity with one process
#   integration the trainer end to end, the real SmolLM2 model, the example scripts, serving
# A test file not listed is unit; a test listed in MULTIRANK is multirank whatever its file.
INTEGRATION_FILES = {
    "test_trainer.py",
    "test_joint_token_routers.py",
    "test_smollm2.py",
    "test_pretrain_example.py",
    "test_reproduce_example.py",
    "test_server.py",
}
MULTIRANK = {
    "test_bad_input.py::test_torchrun_shows_one_line_for_bad_input",
    "test_convert.py::test_flextron_checkpoint_loads_at_another_tp",
    "test_generate.py::test_tp2_and_pp2_generate_what_one_process_generates",
    "test_importance.py::test_ranking_sharded_over_tp_and_pp_equals_single_process",
    "test_importance.py::test_convert_cli_under_torchrun_equals_single_process",
    "test_megatron_dist.py::test_llama_bf16_to_hf_and_flextron_tp2",
    "test_parallel.py::test_parallel_equals_single_process",
    "test_parallel.py::test_dealt_shards_round_trip_at_tp4",
    "test_sampling_distillation.py::test_kl_under_tp2_equals_unsharded",
    "test_token_routing.py::test_token_routing_under_tp2_equals_tp1",
    "test_token_routing.py::test_token_router_training_gradients_under_tp2_equal_tp1",
}
TIERS = ("unit", "multirank", "integration")


def pytest_configure(config):
    for tier, what in zip(TIERS, ("one process, fast", "gloo ranks", "end to end, real model")):
        config.addinivalue_line("markers", f"{tier}: {what} (tests/conftest.py assigns it)")


def tier_of(item) -> str:
    file = os.path.basename(str(item.path))
    if f"{file}::{item.originalname}" in MULTIRANK:
        return "multirank"
    if file in INTEGRATION_FILES or "smollm2" in item.originalname:
        return "integration"
    return "unit"


def pytest_collection_modifyitems(config, items):
    for item in items:
        item.add_marker(getattr(pytest.mark, tier_of(item)))
