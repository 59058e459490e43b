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
