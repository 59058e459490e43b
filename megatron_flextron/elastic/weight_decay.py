"""Decoupled weight decay restricted to the parts of the model a step trained.

AdamW decays every parameter each step, so a step on a sub-network would shrink the weights it did
not use (their gradient is zero, their decay is not). Run the optimizer with ``weight_decay=0``;
call ``record()`` after each micro-batch's ``set_subnetwork`` and ``apply(lr)`` before
``optimizer.step()``: it multiplies the union of the recorded active slices of each decayed
parameter by (1 - lr * wd), which is exactly AdamW's decay for those slices. With no record it
uses the currently active sub-network. Like megatron, biases and 1-D parameters are not decayed.

Slices are not all a step can leave untrained: a soft architecture (``--router joint``) and token
routing (``--router token``) run the full-width layers with units masked to zero, and a skipped
layer's weights get no gradient either. So ``apply`` also keeps, of every elastic linear's units
(rows of a column-parallel weight, columns of a row-parallel one), only those whose gradient this
step is non-zero: a unit no micro-batch's gradient reached was not trained and is not decayed,
whichever router masked it.

The decay goes to the optimizer's main (fp32) copy of a parameter: the model parameter itself for
fp32 training (also under the distributed optimizer, whose fp32 shards are views of it), the
fp32 master copy under bf16/fp16 with megatron's Float16Optimizer.
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Tuple

import torch

from megatron_flextron.elastic.linear import (
    ElasticColumnParallelLinear,
    ElasticRowParallelLinear,
    Selection,
)
from megatron_flextron.elastic.moe import ElasticTopKRouter
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


def unit_dims(model: torch.nn.Module) -> Dict[int, int]:
    """id(weight) -> the dim of its units, for every elastic linear (rows of a column-parallel
    weight, columns of a row-parallel one) and MoE router (a row per expert): what slices,
    masks, routing and dropped experts switch off."""
    dims: Dict[int, int] = {}
    for module in unwrap_model(model).modules():
        if isinstance(module, (ElasticColumnParallelLinear, ElasticTopKRouter)):
            dims[id(module.weight)] = 0  # a router's rows are its experts
        elif isinstance(module, ElasticRowParallelLinear):
            dims[id(module.weight)] = 1
    return dims


def trained_units(p: torch.nn.Parameter, dim: int) -> torch.Tensor:
    """Boolean over ``p``'s units along ``dim``: which got a non-zero gradient (megatron DDP
    keeps it in ``main_grad``, reduced over data-parallel ranks before the optimizer step)."""
    grad = getattr(p, "main_grad", None)
    grad = p.grad if grad is None else grad
    if grad is None:
        return torch.zeros(p.size(dim), dtype=torch.bool, device=p.device)
    return grad.ne(0).any(dim=1 - dim)  # a linear's weight is [out, in]


def _is_decayed(name: str, p: torch.Tensor) -> bool:
    return not name.endswith(".bias") and p.dim() > 1


def _union(p: torch.Tensor, region: Region, previous) -> Optional[Tuple[int, torch.Tensor]]:
    """Union of a region with a previous one as (dim, boolean mask over that dim); None = all.
    A parameter's regions always lie along one dim (rows of column-, columns of row-parallel)."""
    if region is None or previous is None:
        return None
    dim = region[0][0]
    mask = torch.zeros(p.size(dim), dtype=torch.bool, device=p.device)
    for _, selection in region:
        mask[selection] = True
    if previous is not _NOTHING:
        mask |= previous[1]
    return dim, mask


_NOTHING = object()


def main_params(optimizer) -> Dict[int, torch.Tensor]:
    """id(model param) -> the tensor the optimizer steps (fp32 master copies under bf16/fp16)."""
    mapping: Dict[int, torch.Tensor] = {}
    if optimizer is None:
        return mapping
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(opt, "shard_fp32_from_float16_groups"):
            if any(len(g) for g in opt.shard_fp32_from_float16_groups):
                raise ValueError(
                    "elastic weight decay with --bf16/--fp16 and --use-distributed-optimizer is "
                    "not supported (the fp32 shards are not views of the model parameters); use "
                    "--weight-decay 0 or drop --use-distributed-optimizer"
                )
        for model_group, main_group in zip(
            getattr(opt, "float16_groups", []), getattr(opt, "fp32_from_float16_groups", [])
        ):
            for model_param, main_param in zip(model_group, main_group):
                mapping[id(model_param)] = main_param
    return mapping


class ElasticWeightDecay:
    """Decoupled weight decay on the union of the active slices recorded since the last apply."""

    def __init__(self, model: torch.nn.Module, weight_decay: float, optimizer=None):
        self.model = model
        self.weight_decay = weight_decay
        self.main = main_params(optimizer)
        for _, p, _ in active_regions(model):
            if p.dtype != torch.float32 and id(p) not in self.main:
                raise NotImplementedError(
                    "elastic weight decay needs fp32 parameters or megatron's mixed-precision "
                    "optimizer (pass it) for their fp32 master copies"
                )
        self._recorded: Dict[str, Optional[Tuple[int, torch.Tensor]]] = {}

    def record(self) -> None:
        """Add the currently active sub-network to this step's decayed region."""
        for name, p, region in active_regions(self.model):
            if not _is_decayed(name, p) or region == []:
                continue
            self._recorded[name] = _union(p, region, self._recorded.get(name, _NOTHING))

    @torch.no_grad()
    def apply(self, lr: float) -> None:
        if not self._recorded:
            self.record()
        recorded, self._recorded = self._recorded, {}
        factor = 1.0 - lr * self.weight_decay
        if factor == 1.0:
            return
        params = {name: p for name, p, _ in active_regions(self.model)}
        dims = unit_dims(self.model)
        for name, part in recorded.items():
            p = params[name]
            target = self.main.get(id(p), p)
            if id(p) in dims:  # masked or routed-out units got no gradient: not trained
                trained = trained_units(p, dims[id(p)])
                if part is not None:  # slices lie along the same dim as the units
                    trained = trained & part[1]
                part = (dims[id(p)], trained)
            if part is None or bool(part[1].all()):
                target.mul_(factor)
                continue
            dim, index = part[0], part[1].nonzero().squeeze(1)
            target.index_copy_(dim, index, target.index_select(dim, index) * factor)
