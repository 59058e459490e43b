"""The megatron-core internals this project relies on still have the shape it relies on.

Each public-API gap is listed in docs/design.md ("megatron-core internals"); each test here fails
with a message naming the internal, the module of ours that uses it and why, so that a new
megatron-core release is diagnosed in one line instead of deep inside a forward pass.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import subprocess
import sys

import pytest


def _changed(api: str, user: str, why: str) -> str:
    return (
        f"megatron-core changed {api}: {user} relies on it ({why}); "
        "see docs/design.md, 'megatron-core internals'"
    )


def test_rng_tracker_internals():
    from megatron.core.tensor_parallel import random as mrandom

    user = "compat/cpu.py (the CPU RNG tracker)"
    tracker = mrandom.CudaRNGStatesTracker()
    for field in ("seeds_", "states_"):
        assert hasattr(tracker, field), _changed(f"CudaRNGStatesTracker.{field}", user, "add/fork")
    assert isinstance(getattr(mrandom, "_MODEL_PARALLEL_RNG_TRACKER_NAME", None), str), _changed(
        "tensor_parallel.random._MODEL_PARALLEL_RNG_TRACKER_NAME", user, "fork's default name"
    )
    for name in ("_get_cuda_rng_state", "_set_cuda_rng_state"):
        assert callable(getattr(mrandom, name, None)), _changed(
            f"tensor_parallel.random.{name}", user, "activation recomputation saves the state"
        )
    params = inspect.signature(mrandom.initialize_rng_tracker).parameters
    assert "force_reset" in params, _changed(
        "initialize_rng_tracker(force_reset=...)", user, "installs the CPU tracker"
    )


@pytest.mark.parametrize(
    "module", ["megatron.core.transformer.utils", "megatron.core.fusions.fused_softmax"]
)
def test_default_causal_mask_is_looked_up_by_module_name(module):
    mod = importlib.import_module(module)
    assert callable(getattr(mod, "get_default_causal_mask", None)), _changed(
        f"{module}.get_default_causal_mask",
        "compat/cpu.py",
        "the default causal mask is built on CUDA; the CPU one replaces it there",
    )


def test_modules_with_cuda_literals_use_a_module_level_torch():
    from megatron_flextron.compat.cpu import _CUDA_LITERAL_MODULES

    for name in _CUDA_LITERAL_MODULES:
        mod = importlib.import_module(name)
        assert hasattr(mod, "torch"), _changed(
            f"{name} (no module-level torch name)",
            "compat/cpu.py",
            'its device="cuda" literals are served by a module-local torch on CPU',
        )


def test_distributed_optimizer_state_setter():
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    setter = getattr(DistributedOptimizer, "_set_main_param_and_optimizer_states", None)
    assert setter is not None, _changed(
        "DistributedOptimizer._set_main_param_and_optimizer_states",
        "compat/torch_adam.py",
        "each parameter keeps its own Adam step when optimizer state is loaded",
    )
    assert list(inspect.signature(setter).parameters) == ["self", "model_param", "tensors"], (
        _changed(
            "the signature of DistributedOptimizer._set_main_param_and_optimizer_states",
            "compat/torch_adam.py",
            "wraps it with (self, model_param, tensors)",
        )
    )


def test_sharded_state_dict_factories():
    from megatron.core.dist_checkpointing import mapping

    assert callable(getattr(mapping, "apply_factories", None)), _changed(
        "dist_checkpointing.mapping.apply_factories",
        "checkpoint/flextron.py (views_copied_once)",
        "materializes the SwiGLU fc1 halves before copying them one parameter at a time",
    )


def test_heterogeneous_dist_checkpoint_flag():
    from megatron.core.transformer.transformer_config import TransformerConfig

    names = {f.name for f in dataclasses.fields(TransformerConfig)}
    assert "hetereogenous_dist_checkpoint" in names, _changed(
        "TransformerConfig.hetereogenous_dist_checkpoint (spelled so upstream)",
        "elastic/model.py (build_heterogeneous_gpt_model)",
        "layers of different shapes are saved under one key per layer",
    )


def test_checkpoint_writer_results_queue():
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    assert hasattr(filesystem_async, "_results_queue"), _changed(
        "dist_checkpointing.strategies.filesystem_async._results_queue",
        "compat/checkpoint_writer.py (dist_save)",
        "a synchronous save gets an in-process queue, so no Manager process outlives a SIGKILL",
    )


def test_hybrid_stack_final_norm():
    from megatron.core.models.hybrid.hybrid_block import HybridStack

    params = inspect.signature(HybridStack.__init__).parameters
    assert "post_layer_norm" in params and "layer_type_list" in params, _changed(
        "HybridStack.__init__(post_layer_norm=, layer_type_list=)",
        "elastic/hybrid.py (LocalHybridStack)",
        "the stack's TE final norm is replaced by a local one",
    )
    forward = inspect.getsource(HybridStack.forward)
    assert "self.final_norm(" in forward and "self.post_layer_norm" in forward, _changed(
        "HybridStack.forward's final norm", "elastic/hybrid.py", "it calls the local final norm"
    )


def test_moe_aux_loss_scale():
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    assert callable(getattr(MoEAuxLossAutoScaler, "set_loss_scale", None)), _changed(
        "MoEAuxLossAutoScaler.set_loss_scale",
        "routers/joint_token.py",
        "the token routers' auxiliary loss is scaled per micro-batch as megatron's MoE's is",
    )


def test_local_spec_mlp_is_an_as_mlp_submodule_builder():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.mlp import MLP

    mlp = get_gpt_layer_local_spec().submodules.mlp
    ok = isinstance(mlp, functools.partial) and getattr(mlp.func, "__func__", None) is getattr(
        MLP.as_mlp_submodule, "__func__", None
    )
    assert ok and "submodules" in mlp.keywords, _changed(
        "the local GPT layer spec's mlp (partial(MLP.as_mlp_submodule, submodules=...))",
        "elastic/specs.py (replace_in_spec)",
        "the elastic MLP is slotted in through the same builder",
    )


def test_cpu_shims_are_inert_with_cuda():
    """Where CUDA is present nothing of torch or megatron is patched (a fresh process that
    reports CUDA: the GPU path runs megatron unpatched)."""
    code = (
        "import torch\n"
        "torch.cuda.is_available = lambda: True\n"
        "before = (torch.Tensor.cuda, torch.Tensor.type, torch.cuda.synchronize,"
        " torch.cuda.current_device)\n"
        "from megatron_flextron.compat import apply_cpu_shims\n"
        "from megatron.core.transformer import utils\n"
        "mask = utils.get_default_causal_mask\n"
        "assert apply_cpu_shims() is False\n"
        "after = (torch.Tensor.cuda, torch.Tensor.type, torch.cuda.synchronize,"
        " torch.cuda.current_device)\n"
        "assert before == after, 'a CPU shim was installed although CUDA is present'\n"
        "assert utils.get_default_causal_mask is mask\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_moe_internals():
    """The elastic MoE (elastic/moe.py, linear.py, tp_layout.py) and the trainer's per-budget
    load-balancing loss (training/elastic_step.py) rely on these shapes of megatron's MoE."""
    from megatron.core.tensor_parallel import layers
    from megatron.core.transformer.moe import moe_logging, moe_utils
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_layer import BaseMoELayer
    from megatron.core.transformer.moe.router import TopKRouter

    user = "elastic/moe.py (the elastic MoE layer)"
    for name in ("gating", "routing"):
        assert callable(getattr(TopKRouter, name, None)), _changed(f"TopKRouter.{name}", user, "")
    init = inspect.getsource(TopKRouter.__init__)
    for field in ("self.topk", "'expert_bias'", "'local_tokens_per_expert'"):
        assert field in init, _changed(f"TopKRouter {field}", user, "top-k and bias per call")
    assert "self.local_tokens_per_expert +=" in inspect.getsource(TopKRouter), _changed(
        "TopKRouter.local_tokens_per_expert", user, "counts permuted per call when balanced"
    )
    saving = inspect.getsource(SequentialMLP.sharded_state_dict)
    for field in ("expert_global_idx, num_global_experts", "f'{prefix}experts.'", "dp_group"):
        assert field in saving, _changed(
            "SequentialMLP.sharded_state_dict", user, "balanced experts stored by ranked index"
        )
    assert list(inspect.signature(moe_utils.router_gating_linear).parameters) == [
        "inp", "weight", "bias", "router_dtype"
    ], _changed("moe_utils.router_gating_linear", user, "the kept experts' logits")
    params = list(inspect.signature(SequentialMLP.forward).parameters)
    assert params[1:4] == ["permuted_local_hidden_states", "tokens_per_expert", "permuted_probs"], (
        _changed("SequentialMLP.forward", user, "experts that got no token are not run")
    )
    assert "self.local_expert_indices" in inspect.getsource(BaseMoELayer.__init__), _changed(
        "BaseMoELayer.local_expert_indices", "elastic/tp_layout.py", "global expert indices"
    )
    for cls in (layers.ColumnParallelLinear, layers.RowParallelLinear):
        assert "self.explicit_expert_comm" in inspect.getsource(cls.__init__), _changed(
            f"{cls.__name__}.explicit_expert_comm", "elastic/linear.py", "experts' communication"
        )
    tracker = moe_logging.get_moe_metrics_tracker()
    assert isinstance(tracker.metrics, dict) and callable(tracker.clear), _changed(
        "moe_logging.get_moe_metrics_tracker", "training/elastic_step.py", "aux loss per budget"
    )


def test_ddp_main_grad_contract():
    """elastic/sliced_linear.py adds a slice's gradient into ``main_grad`` itself, sets
    ``grad_added_to_main_grad`` and hands autograd no weight gradient: DDP's post-accumulation
    hook must skip a None ``param.grad`` and zero_grad_buffer must reset the flag."""
    from megatron.core.distributed import DistributedDataParallel as DDP

    user, why = "elastic/sliced_linear.py", "a slice's gradient goes straight into main_grad"
    hook = inspect.getsource(DDP._make_backward_post_hook)
    assert "param.grad is not None" in hook and "grad_added_to_main_grad" in hook, _changed(
        "DistributedDataParallel._make_backward_post_hook", user, why
    )
    assert "grad_added_to_main_grad = False" in inspect.getsource(DDP.zero_grad_buffer), _changed(
        "DistributedDataParallel.zero_grad_buffer", user, why
    )
