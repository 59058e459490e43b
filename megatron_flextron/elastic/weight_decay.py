"""Decoupled weight decay restricted to the active sub-network.

AdamW decays every parameter each step, so a step on a sub-network would shrink the weights it did
not use (their gradient is zero, their decay is not). Run the optimizer with ``weight_decay=0`` and
call ``ElasticWeightDecay.apply`` before ``optimizer.step()``: it multiplies only the active slices
of the decayed parameters by (1 - lr * wd), which is exactly AdamW's decay for those slices.
Like megatron, biases and 1-D parameters (norms) are not decayed.
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Tuple

import torch

from megatron_flextron.elastic.linear import (
    ElasticColumnParallelLinear,
    ElasticRowParallelLinear,
    Selection,
    select,
)
from megatron_flextron.elastic.subnetwork import unwrap_model

# (dim, selection) pieces of a parameter that the active sub-network uses; None = all of it.
Region = Optional[List[Tuple[int, Selection]]]


def active_regions(model: torch.nn.Module) -> Iterator[Tuple[str, torch.nn.Parameter, Region]]:
    """Every parameter with the part of it the active sub-network uses ([] = none of it)."""
    gpt = unwrap_model(model)
    regions: Dict[int, Region] = {}
    for module in gpt.modules():
        if getattr(module, "skipped", False):
            for p in module.parameters():
                regions[id(p)] = []
        elif isinstance(module, ElasticColumnParallelLinear) and module.active_rows is not None:
            for p in (module.weight, module.bias):
                if p is not None and id(p) not in regions:
                    regions[id(p)] = [(0, rows) for rows in module.active_rows]
        elif isinstance(module, ElasticRowParallelLinear) and module.active_cols is not None:
            if id(module.weight) not in regions:
                regions[id(module.weight)] = [(1, module.active_cols)]
    for name, p in gpt.named_parameters():
        yield name, p, regions.get(id(p))


def _is_decayed(name: str, p: torch.Tensor) -> bool:
    return not name.endswith(".bias") and p.dim() > 1


class ElasticWeightDecay:
    """Apply decoupled weight decay to the active slices of a model's (fp32) parameters."""

    def __init__(self, model: torch.nn.Module, weight_decay: float):
        self.model = model
        self.weight_decay = weight_decay
        for _, p, _ in active_regions(model):
            if p.dtype != torch.float32:
                raise NotImplementedError(
                    "elastic weight decay updates the model's parameters in place and needs "
                    "fp32 parameters (megatron's FP32 optimizer); mixed-precision main params "
                    "are not supported yet"
                )

    @torch.no_grad()
    def apply(self, lr: float) -> None:
        factor = 1.0 - lr * self.weight_decay
        if factor == 1.0:
            return
        for name, p, region in active_regions(self.model):
            if not _is_decayed(name, p):
                continue
            if region is None:
                p.mul_(factor)
                continue
            for dim, selection in region:
                if isinstance(selection, slice):
                    select(p, selection, dim).mul_(factor)
                else:
                    p.index_copy_(dim, selection, p.index_select(dim, selection) * factor)
