"""Fallbacks for loading megatron optimizer state over torch.optim.Adam (no Apex/TE fused Adam,
as on CPU), where megatron-core 0.16's DistributedOptimizer keeps Adam's per-parameter "step":

- building the sharded state dict for loading reads one "step" from the current state, which a
  fresh optimizer does not have yet: give every parameter a zero state first;
- loading then hands every parameter the same step tensor (torch's Adam increments it once per
  parameter per step, so bias correction would drift) and copies the parameter state over keys
  that include "step", which the checkpoint's parameter state leaves out.

Each is a no-op where the state is already right; with Apex/TE nothing here is used.
"""

from __future__ import annotations

import torch


def _inner_optimizers(optimizer):
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, torch.optim.Adam):
            yield inner


def prepare_torch_adam_for_loading(optimizer) -> None:
    """Zero Adam state (with a step) for every parameter that has none; patch the loader."""
    _patch_distributed_optimizer()
    for inner in _inner_optimizers(optimizer):
        for group in inner.param_groups:
            for p in group["params"]:
                state = inner.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state.setdefault("step", torch.zeros((), dtype=torch.float32))


def unshare_torch_adam_steps(optimizer) -> None:
    """One step tensor per parameter, as torch's Adam expects."""
    for inner in _inner_optimizers(optimizer):
        for state in inner.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


def _patch_distributed_optimizer() -> None:
    from megatron.core.optimizer import distrib_optimizer

    cls = distrib_optimizer.DistributedOptimizer
    if getattr(cls, "_flextron_step_patch", False):
        return
    original = cls._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state[main_param]
        step = state.pop("step", None) if "step" not in tensors else None
        try:
            original(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step.clone()

    cls._set_main_param_and_optimizer_states = set_states
    cls._flextron_step_patch = True
