"""Iterative re-estimation of head orders: score the surviving heads again after each cut.

A first-order (Taylor) score is exact only for removing one head from the full model. Which
head of a KV group should survive the next cut is better judged in the sub-network that the
previous cut leaves: at each reduced head count k (largest first) the kept heads are scored again
with that sub-network active and reordered among themselves. The set kept at k never changes, so
larger sub-networks keep their loss; smaller ones get heads chosen in the context they run in.
"""

from __future__ import annotations

from typing import List, Sequence

import torch

from megatron_flextron.importance.collect import collect_statistics
from megatron_flextron.importance.permute import changes_with_orders, permute_state


def reorder_kept(order: torch.Tensor, scores: torch.Tensor, kept: int, groups: int):
    """``order`` [H] with the first ``kept`` heads (GQA: per KV group) sorted by ``scores``
    (the kept heads' scores, group-major as the sub-network runs them)."""
    heads = order.numel()
    per_group = heads // groups
    if per_group == 1:  # MHA: the first `kept` heads
        first = order[:kept][torch.argsort(-scores.double(), stable=True)]
        return torch.cat([first, order[kept:]])
    k = kept // groups
    grid = order.reshape(groups, per_group)
    best = torch.argsort(-scores.double().reshape(groups, k), dim=1, stable=True)
    head = torch.gather(grid[:, :k], 1, best)
    return torch.cat([head, grid[:, k:]], dim=1).reshape(-1)


def refine_head_orders(
    model, ckpt, calib: list, orders: Sequence[torch.Tensor], levels: Sequence[int], estimator: str
) -> List[torch.Tensor]:
    """Re-score the kept heads at each head count in ``levels`` (descending) and reorder them.

    ``model`` is the ranking model (any TP/PP); it is left at full size with unspecified weights.
    """
    from megatron_flextron.elastic import set_subnetwork
    from megatron_flextron.elastic.tp_layout import load_canonical_state_dict

    m = ckpt.model
    orders = [o.clone() for o in orders]
    for heads in sorted(levels, reverse=True):
        permuted = permute_state(ckpt.state, m, head_orders=orders)
        load_canonical_state_dict(model, permuted, m, only=changes_with_orders)
        set_subnetwork(model, {"heads": heads}, m, ckpt.elastic)
        try:
            stats = collect_statistics(model, calib, m, with_taylor=True)
        finally:
            set_subnetwork(model, None, m, ckpt.elastic)
        orders = [
            reorder_kept(o, s, heads, m.num_query_groups) for o, s in zip(orders, stats[estimator])
        ]
    return orders
