"""The thorough mode's choice: candidate orders scored by held-out loss, then head refinement.

Every candidate (the source order, each estimator's order) is loaded into the ranking model and
run on the held-out calibration sequences at every reduced head count (MLP: the width nearest
half); the lowest mean wins. A loss-based head order is then re-estimated after each cut
(refine.py) and kept only where it lowers the held-out loss. This costs a forward pass of the
held-out set per candidate and size, plus a second statistics pass: docs/ranking.md measures
what it buys.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from megatron_flextron.importance.collect import progress
from megatron_flextron.importance.permute import changes_with_orders, permute_state
from megatron_flextron.importance.refine import refine_head_orders

LOSS_BASED = ("taylor", "taylor_token")


def held_out_loss(model, batches) -> float:
    from megatron_flextron.lm_step import forward_backward

    with torch.no_grad():
        out = forward_backward(model, batches, forward_only=True)
    return out["nll_sum"] / out["tokens"]


def reduced_sizes(full: int, choices: Sequence[int]) -> List[int]:
    """The elastic choices below full size, largest first."""
    return sorted({c for c in choices if c < full}, reverse=True)


def _scorer(model, ckpt, heldout):
    """score(spec, **orders): the held-out loss of the sub-network ``spec`` of the source state
    permuted by ``orders`` (permute_state's), loaded into the ranking model."""
    from megatron_flextron.elastic import set_subnetwork
    from megatron_flextron.elastic.tp_layout import load_canonical_state_dict

    m, elastic = ckpt.model, ckpt.elastic

    def score(spec, **orders):
        load_canonical_state_dict(
            model, permute_state(ckpt.state, m, **orders), m, only=changes_with_orders
        )
        set_subnetwork(model, spec, m, elastic)
        try:
            return held_out_loss(model, heldout)
        finally:
            set_subnetwork(model, None, m, elastic)

    return score


def choose_head_orders(model, ckpt, calib, heldout, head_candidates, head_estimator, refine, clock):
    """-> (head estimator, head orders, its candidates' held-out losses per head count, the
    refinement record or None). Only the attention tensors are reloaded: the rest of the
    ranking model (MLP, experts) stays as it is, at full size."""
    m, elastic = ckpt.model, ckpt.elastic
    head_levels = reduced_sizes(m.num_attention_heads, elastic.head_choices)
    score = _scorer(model, ckpt, heldout)

    def head_losses(orders) -> Dict[int, float]:
        return {h: score({"heads": h}, head_orders=orders) for h in head_levels}

    with clock("head selection"):
        head_selection = {
            k: head_losses(head_candidates[k])
            for k in progress(list(head_candidates), "importance: head estimators")
        }
    mean = {k: sum(v.values()) / max(1, len(v)) for k, v in head_selection.items()}
    best_head = head_estimator if head_estimator != "auto" else min(mean, key=mean.get)
    head_orders = head_candidates[best_head]
    refinement = None
    if refine and best_head in LOSS_BASED and len(head_levels) > 1:
        with clock("refinement"):
            refined = refine_head_orders(
                model, ckpt, calib, head_orders, head_levels[:-1], best_head
            )
            refined_losses = head_losses(refined)
        refinement = {
            "loss": refined_losses,
            "kept": False,
            "head_order": [o.tolist() for o in refined],
        }
        if sum(refined_losses.values()) < sum(head_selection[best_head].values()):
            head_orders, refinement["kept"] = refined, True
    return best_head, head_orders, head_selection, refinement


def choose_mlp_order(model, ckpt, heldout, mlp_candidates, test_mlp, clock):
    """-> (MLP estimator, the MLP candidates' held-out losses at width ``test_mlp``)."""
    score = _scorer(model, ckpt, heldout)
    with clock("MLP selection"):
        mlp_losses = {
            k: score({"mlp": test_mlp}, mlp_orders=mlp_candidates[k])
            for k in progress(list(mlp_candidates), "importance: MLP estimators")
        }
    return min(mlp_losses, key=mlp_losses.get), mlp_losses
