"""Stages 2 and 3 for mixtures of experts: expert and neuron orders, applied to a canonical state.

Function-preserving: expert i of the permuted layer is the old expert ``expert_orders[l][i]``
(its router row, its routing-bias entry and all its tensors move together: softmax, sigmoid and
top-k are permutation-equivariant over experts); inside every expert the neurons follow that
expert's order (fc1 gate and up rows, fc2 columns), as do the shared expert's. After it, a
sub-network of e experts of f neurons is the e most important experts, each on its f most
important neurons.
"""

from __future__ import annotations

import re
from typing import Mapping, Optional, Sequence

import torch

from megatron_flextron.checkpoint.state import LazyState, lazy_view
from megatron_flextron.config import ModelConfig

_MOE = re.compile(
    r"^decoder\.layers\.(\d+)\.mlp\.(router\.weight|router\.expert_bias"
    r"|experts\.local_experts\.(\d+)\.(linear_fc1\.weight|linear_fc1\.bias|linear_fc2\.weight)"
    r"|shared_experts\.(linear_fc1\.weight|linear_fc1\.bias|linear_fc2\.weight))$"
)


def changes_with_expert_orders(name: str) -> bool:
    """Whether an expert or expert-neuron order can change this tensor (router, experts,
    shared expert; the shared expert's gate never)."""
    return bool(_MOE.match(name))


def order_by(scores: torch.Tensor) -> torch.Tensor:
    """[..., N] scores -> indices by descending score along the last axis (stable on ties)."""
    return torch.argsort(-scores.double(), dim=-1, stable=True)


def _permute_neurons(x: torch.Tensor, order: torch.Tensor, fc1: bool, gated: bool) -> torch.Tensor:
    if not fc1:  # fc2 [h, F]: columns
        return x[:, order].contiguous()
    blocks = x.reshape(2 if gated else 1, -1, *x.shape[1:])  # gate and up rows cut together
    return blocks[:, order].reshape(x.shape).contiguous()


def permute_moe_state(
    state: Mapping[str, torch.Tensor],
    m: ModelConfig,
    expert_orders: Optional[Sequence[torch.Tensor]] = None,
    neuron_orders: Optional[Sequence[torch.Tensor]] = None,
    shared_orders: Optional[Sequence[torch.Tensor]] = None,
) -> LazyState:
    """A view of ``state`` with experts reordered per layer (``expert_orders[l]`` [E]), each
    expert's neurons reordered (``neuron_orders[l]`` [E, F], indexed by the *source* expert) and
    the shared expert's (``shared_orders[l]`` [Fs]); None leaves that axis as it is. Every
    tensor is permuted when read."""
    names = {}
    for name in state:
        match = _MOE.match(name)
        if match and match.group(3) is not None and expert_orders is not None:
            layer, expert = int(match.group(1)), int(match.group(3))
            source = int(expert_orders[layer][expert])
            names[name] = name.replace(f".local_experts.{expert}.", f".local_experts.{source}.", 1)
        else:
            names[name] = name

    def permute(name: str, x: torch.Tensor) -> torch.Tensor:
        match = _MOE.match(name)
        if not match:
            return x
        layer, part = int(match.group(1)), match.group(2)
        if part.startswith("router.") and expert_orders is not None:
            return x[expert_orders[layer]].contiguous()
        if match.group(3) is not None and neuron_orders is not None:
            expert = int(match.group(3))
            source = expert if expert_orders is None else int(expert_orders[layer][expert])
            order = neuron_orders[layer][source]
            return _permute_neurons(x, order, "fc1" in match.group(4), m.gated)
        if match.group(5) is not None and shared_orders is not None:
            return _permute_neurons(x, shared_orders[layer], "fc1" in match.group(5), m.gated)
        return x

    return lazy_view(state, permute, names=names, same_spec=True)
