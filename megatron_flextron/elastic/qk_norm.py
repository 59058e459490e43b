"""Q/K RMSNorms across heads (OLMoE): one norm over a token's whole q or k projection.

Qwen3's q/k norms (megatron's ``qk_layernorm``) normalise each head over its d channels with one
shared weight. OLMoE's normalise all h x d query channels of a token at once (and all G x d key
channels), with a weight per channel. Megatron-core has no such norm; Megatron-Bridge swaps in an
attention class for it. Here it is a norm module slotted into megatron's ``q_layernorm`` /
``k_layernorm`` (megatron applies them after the QKV split, before RoPE), so the stock forward
path runs it unchanged.

Tensor parallelism: a rank holds only its KV groups' channels, so the sum of squares is
all-reduced over the TP group (forward and backward: every rank's heads use the mean square) and
divided by the full width. The weight is TP-sharded like the QKV rows it scales: dealt by KV group
(tp_layout.py), split on dim 0 in megatron's checkpoints.

Elastic heads: a sub-network with fewer heads normalises over the kept heads' channels only (the
mean square of the kept channels; the weight cut per kept head, like the QKV rows). It is then the
same function as a dense model with those heads whose norm weight is the kept heads' slice. The
width that divides is the kept width on all ranks together, so it does not depend on TP.

Shapes: x [s, b, heads_l, d]; weight [G_l * u * d] viewed [G_l, u, d]: u = query heads per group
(q norm) or 1 (k norm); the active cut keeps the first ``groups`` groups and ``units`` per group.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint


class AcrossHeadsRMSNorm(torch.nn.Module):
    """RMSNorm over all heads of this rank's q (``query``) or k projection.

    Built by megatron's SelfAttention as its q/k norm (``hidden_size`` = the head dim); the
    attention then hands it the TP group (``bind``)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, *, query: bool):
        super().__init__()
        tp = config.tensor_model_parallel_size
        groups = config.num_query_groups // tp
        units = config.num_attention_heads // config.num_query_groups if query else 1
        if groups < 1 or config.num_query_groups % tp:
            raise ValueError(
                f"q/k norms across heads need num_query_groups={config.num_query_groups} "
                f"divisible by tensor-parallel size {tp}"
            )
        self.shape = (groups, units, hidden_size)
        self.eps = eps
        self.tp_size, self.tp_group = tp, None
        self.weight = torch.nn.Parameter(
            torch.ones(groups * units * hidden_size, dtype=config.params_dtype)
        )
        set_tensor_model_parallel_attributes(self.weight, True, 0, 1)
        self.active: Optional[Tuple[int, int]] = None  # (groups, units) kept on this rank

    def bind(self, tp_group, local_groups: int) -> None:
        """The attention's TP group (and its local KV group count, which must be ours)."""
        if local_groups != self.shape[0] or tp_group.size() != self.tp_size:
            raise ValueError(
                f"q/k norm across heads: built for {self.shape[0]} KV groups per rank at TP "
                f"{self.tp_size}, the attention has {local_groups} at TP {tp_group.size()}"
            )
        self.tp_group = tp_group

    def set_active(self, groups: int, units: int) -> None:
        """Keep the first ``groups`` local KV groups and ``units`` heads in each (the
        attention's active counts; all of them: the full weight)."""
        full = self.shape[:2]
        units = min(units, full[1])  # a k norm has one unit per group
        self.active = None if (groups, units) == full else (groups, units)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if self.active is not None:
            groups, units = self.active
            weight = weight.view(self.shape)[:groups, :units].reshape(-1)
        flat = x.reshape(*x.shape[:-2], -1)  # [s, b, heads_l * d]
        if flat.shape[-1] != weight.numel():
            raise ValueError(
                f"q/k norm across heads: {flat.shape[-1]} channels, weight of {weight.numel()}"
            )
        y = flat.float()
        square = y.pow(2).sum(-1, keepdim=True)
        if self.tp_size > 1 and self.tp_group is None:
            raise RuntimeError("q/k norm across heads under TP: no TP group (bind it)")
        if self.tp_size > 1:  # the other ranks' heads: sum forward, sum the gradient back
            square = copy_to_tensor_model_parallel_region(square, self.tp_group)
            square = reduce_from_tensor_model_parallel_region(square, self.tp_group)
        y = y * torch.rsqrt(square / (flat.shape[-1] * self.tp_size) + self.eps)
        return (weight * y.to(x.dtype)).view(x.shape)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """TP-sharded on dim 0, as the QKV rows it scales."""
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(
            state,
            prefix,
            {"weight": 0},
            sharded_offsets,
            tp_group=self.tp_group,
            dp_cp_group=(metadata or {}).get("dp_cp_group"),
        )
