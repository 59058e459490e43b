"""Stage 2 of importance ranking: scores -> canonical unit orders (most important first)."""

from __future__ import annotations

from typing import List

import torch


def neuron_order(scores: torch.Tensor) -> torch.Tensor:
    """[F] scores -> the neuron indices sorted by descending importance (stable on ties)."""
    return torch.argsort(-scores.double(), stable=True)


def head_order(scores: torch.Tensor, groups: int) -> torch.Tensor:
    """[H] head scores -> a permutation of the H heads.

    GQA (H > groups): heads are sorted inside each KV group (the groups themselves stay put, so
    the KV cache keeps its shape). MHA (H == groups): whole heads are sorted.
    """
    heads = scores.numel()
    per_group = heads // groups
    if per_group == 1:
        return torch.argsort(-scores.double(), stable=True)
    within = torch.argsort(-scores.double().reshape(groups, per_group), dim=1, stable=True)
    return (within + torch.arange(groups).unsqueeze(1) * per_group).reshape(-1)


def identity_orders(num_layers: int, size: int) -> List[torch.Tensor]:
    return [torch.arange(size) for _ in range(num_layers)]
