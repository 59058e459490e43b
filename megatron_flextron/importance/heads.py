"""Heads and layers: orders from the statistics pass, shared by the dense and the MoE paths.

Attention is the same module in a dense and in an MoE model, and so is a block's change of its
input, so both paths rank heads (within each KV group) and layers with the same estimators
(collect.py) and the same choice (select.py); only the MLP side differs (neurons vs experts).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

import torch

from megatron_flextron.importance.collect import head_ablation_scores
from megatron_flextron.importance.order import head_order, identity_orders
from megatron_flextron.importance.select import LOSS_BASED, choose_head_orders, reduced_sizes

HEAD_ESTIMATORS = ("activation", "taylor", "taylor_token", "ablation")
# the fast mode's head estimator (no choice): measured best on both settings of docs/ranking.md
FAST_HEAD_ESTIMATOR = "taylor_token"


@dataclasses.dataclass
class HeadRanking:
    estimator: str
    orders: List[torch.Tensor]  # canonical head i of layer l is source head orders[l][i]
    candidates: Dict[str, List[torch.Tensor]]
    levels: List[int]  # the reduced head counts scored (thorough)
    losses: Dict[str, Dict[int, float]]
    refinement: Optional[dict]

    def metadata(self) -> dict:
        return {
            "head_estimator": self.estimator,
            "head_selection": {
                "heads": self.levels,
                "loss": self.losses,
                "head_order": {k: [o.tolist() for o in v] for k, v in self.candidates.items()},
            },
            "head_refinement": self.refinement,
            "head_order": [o.tolist() for o in self.orders],
        }


def resolve_head_estimator(head_estimator: str, mode: str, sharded: bool) -> str:
    """The estimator the statistics pass must serve ("auto" stays "auto" in thorough mode);
    a ValueError naming a bad one."""
    if head_estimator not in ("auto",) + HEAD_ESTIMATORS:
        raise ValueError(f"unknown head estimator {head_estimator!r}")
    if head_estimator == "ablation" and sharded:
        raise ValueError("--head-estimator ablation runs in one process only (TP=PP=EP=1)")
    return FAST_HEAD_ESTIMATOR if head_estimator == "auto" and mode == "fast" else head_estimator


def needs_taylor(head_estimator: str) -> bool:
    """Whether the statistics pass runs backward (the loss-based estimators, and "auto")."""
    return head_estimator in ("auto",) + LOSS_BASED


def rank_heads(model, ckpt, calib, heldout, stats, head_estimator, mode, refine, clock):
    """-> HeadRanking. ``stats``: collect_statistics of ``calib``; ``heldout`` None in fast
    mode (the estimator's order is taken as is), else the candidates are scored on it."""
    m = ckpt.model
    head_scores: Dict[str, List[torch.Tensor]] = {"activation": stats["activation"]}
    if stats["taylor"] is not None:
        head_scores["taylor"] = stats["taylor"]
        head_scores["taylor_token"] = stats["taylor_token"]
    if head_estimator == "ablation":
        with clock("ablation"):
            head_scores["ablation"] = head_ablation_scores(model, calib, m)
    candidates = {"original": identity_orders(m.num_layers, m.num_attention_heads)}
    for name, scores in head_scores.items():  # fast: every order computed, for comparisons
        if head_estimator in ("auto", name) or mode == "fast":
            candidates[name] = [head_order(s, m.num_query_groups) for s in scores]
    levels = reduced_sizes(m.num_attention_heads, ckpt.elastic.head_choices)
    if heldout is None:
        return HeadRanking(head_estimator, candidates[head_estimator], candidates, levels, {}, None)
    best, orders, losses, refinement = choose_head_orders(
        model, ckpt, calib, heldout, candidates, head_estimator, refine, clock
    )
    return HeadRanking(best, orders, candidates, levels, losses, refinement)


def layer_ranking(layer_scores: List[float]) -> tuple:
    """The layers that change their input most first (a stable sort: ties keep layer order)."""
    return tuple(sorted(range(len(layer_scores)), key=lambda i: -layer_scores[i]))
