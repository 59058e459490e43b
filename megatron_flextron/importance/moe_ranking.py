"""Importance ranking of a mixture-of-experts model: heads, layers, experts, expert neurons.

The converter's ``rank_and_permute`` hands an MoE checkpoint here. One statistics pass over the
calibration sequences feeds both the dense head and layer estimators (collect.py: attention and
a block's change of its input are the same in an MoE model) and the expert ones (experts.py).
Candidates, each scored by the held-out loss of the elastic config's reduced shapes (thorough):
- head order within each KV group: the dense path's candidates and choice (heads.py); the
  layer ranking is the dense one too (a block's change of its input, nothing to choose);
- expert order: the source order, routing frequency, REAP, REAP x frequency (experts.py); scored
  at every reduced expert count of ``ElasticConfig.expert_choices`` (at least top-k), the lowest
  mean wins (REAP x frequency when no reduced count is configured);
- neuron order inside the experts (and the shared expert): the source order, the dense MLP's
  activation estimator; scored with the chosen expert order at the configured expert width
  nearest half (activation when none is configured).
Heads and experts touch disjoint tensors, so each axis is scored with the others at full size
and the two permutations compose into one function-preserving view of the state.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence

import torch

from megatron_flextron.checkpoint.state import Checkpoint
from megatron_flextron.elastic.tp_layout import load_canonical_state_dict
from megatron_flextron.importance.collect import collect_statistics, progress
from megatron_flextron.importance.expert_permute import (
    changes_with_expert_orders,
    order_by,
    permute_moe_state,
)
from megatron_flextron.importance.experts import expert_hooks
from megatron_flextron.importance.heads import (
    layer_ranking,
    needs_taylor,
    rank_heads,
    resolve_head_estimator,
)
from megatron_flextron.importance.permute import changes_with_orders, permute_state

EXPERT_ESTIMATORS = ("frequency", "reap", "reap_total")


DEFAULT_EXPERT_ESTIMATOR = "reap_total"  # with no reduced count to choose on (docs/ranking.md)


def reduced_expert_counts(m, elastic) -> List[int]:
    """The configured expert counts below the full count (and >= top-k), largest first."""
    experts, _, _ = elastic.moe_choices_with_full(m)
    return [c for c in experts if m.moe_router_topk <= c < m.num_moe_experts]


def half_expert_width(m, elastic) -> Optional[int]:
    """The configured expert width nearest half (None when only the full width is)."""
    _, widths, _ = elastic.moe_choices_with_full(m)
    full = m.moe_ffn_hidden_size
    smaller = [w for w in widths if w < full]
    return min(smaller, key=lambda w: abs(w - full / 2), default=None)


def expert_candidates(stats: Dict[str, list], m) -> Dict[str, List[torch.Tensor]]:
    identity = [torch.arange(m.num_moe_experts) for _ in range(m.num_layers)]
    out = {"original": identity}
    for name in EXPERT_ESTIMATORS:
        out[name] = [order_by(s) for s in stats[name]]
    return out


def neuron_candidates(stats: Dict[str, list], m) -> Dict[str, dict]:
    e, f, fs = m.num_moe_experts, m.moe_ffn_hidden_size, m.moe_shared_expert_intermediate_size
    identity = {
        "neuron_orders": [torch.arange(f).expand(e, f) for _ in range(m.num_layers)],
        "shared_orders": [torch.arange(fs) for _ in range(m.num_layers)] if fs else None,
    }
    ranked = {
        "neuron_orders": [order_by(s) for s in stats["expert_neurons"]],
        "shared_orders": [order_by(s) for s in stats["shared"]] if fs else None,
    }
    return {"original": identity, "activation": ranked}


def rank_and_permute_moe(
    ckpt: Checkpoint,
    calibration_data: str,
    samples: int = 64,
    seq_length: int = 256,
    micro_batch_size: int = 4,
    head_estimator: str = "auto",
    mode: str = "thorough",
    refine: bool = True,
) -> Checkpoint:
    """Rank heads, layers, experts and expert neurons on calibration data; permute the
    checkpoint. Collective over the model-parallel groups (TP, EP, PP) when sharded.
    ``thorough``: the candidates are chosen on held-out calibration sequences (a quarter);
    ``fast``: every sequence feeds the statistics and the orders are taylor_token (heads),
    REAP x frequency and activation, nothing is scored."""
    from megatron_flextron.elastic import set_subnetwork
    from megatron_flextron.importance import (
        StageClock,
        held_out_loss,
        is_sharded,
        ranking_inputs,
    )

    head_estimator = resolve_head_estimator(head_estimator, mode, is_sharded(True))
    clock = StageClock()
    m = ckpt.model
    count, held, calib, heldout, model = ranking_inputs(
        ckpt, calibration_data, samples, seq_length, micro_batch_size, mode, clock
    )
    with clock("statistics"), expert_hooks(model, m) as hooks:  # one pass: heads and experts
        dense = collect_statistics(model, calib, m, needs_taylor(head_estimator), hooks.start)
    stats = hooks.result()
    heads = rank_heads(model, ckpt, calib, heldout, dense, head_estimator, mode, refine, clock)

    def score(orders: dict, spec: dict) -> float:
        load_only(model, permute_moe_state(ckpt.state, m, **orders), m)
        set_subnetwork(model, spec, m, ckpt.elastic)
        try:
            return held_out_loss(model, heldout)
        finally:
            set_subnetwork(model, None, m, ckpt.elastic)

    levels = reduced_expert_counts(m, ckpt.elastic) if held else []
    experts = expert_candidates(stats, m)
    with clock("expert selection"):
        expert_losses = {
            name: {e: score({"expert_orders": orders}, {"experts": e}) for e in levels}
            for name, orders in progress(list(experts.items()), "importance: expert estimators")
        }
    mean = {k: sum(v.values()) / len(v) for k, v in expert_losses.items() if v}
    best_experts = min(mean, key=mean.get) if mean else DEFAULT_EXPERT_ESTIMATOR
    expert_orders = experts[best_experts]

    width = half_expert_width(m, ckpt.elastic) if held else None
    neurons = neuron_candidates(stats, m)
    neuron_losses = {}
    if width is not None:
        with clock("expert neuron selection"):
            neuron_losses = {
                name: score({"expert_orders": expert_orders, **orders}, {"moe_ffn": width})
                for name, orders in progress(list(neurons.items()), "importance: expert neurons")
            }
    best_neurons = min(neuron_losses, key=neuron_losses.get) if neuron_losses else "activation"
    orders = {"expert_orders": expert_orders, **neurons[best_neurons]}
    with clock("permute"):  # heads and experts touch disjoint tensors: the views compose
        state = permute_state(
            permute_moe_state(ckpt.state, m, **orders), m, head_orders=heads.orders
        )
        full_loss = None
        if held:
            load_canonical_state_dict(model, state, m, only=changes_with_any_order)
            full_loss = held_out_loss(model, heldout)
    metadata = dict(ckpt.metadata)
    metadata["importance"] = {
        "calibration_data": calibration_data,
        "calibration_sequences": count - held,
        "heldout_sequences": held,
        "seq_length": seq_length,
        "mode": mode,
        "calibration_loss": dense["loss"],
        "full_loss": full_loss,
        **heads.metadata(),
        "layer_scores": dense["layer"],
        "expert_estimator": best_experts,
        "expert_selection": {
            "experts": levels,
            "loss": expert_losses,
            "expert_order": {k: _lists(v) for k, v in experts.items()},
        },
        "expert_scores": {k: _lists(stats[k]) for k in EXPERT_ESTIMATORS + ("tokens",)},
        "expert_neuron_estimator": best_neurons,
        "expert_neuron_selection": {"moe_ffn": width, "loss": neuron_losses},
        # canonical expert i of layer l is source expert expert_order[l][i]; its neuron j is
        # the source neuron expert_neuron_order[l][i][j] of that expert
        "expert_order": _lists(expert_orders),
        "expert_neuron_order": [
            n[o].tolist() for n, o in zip(orders["neuron_orders"], expert_orders)
        ],
        "shared_neuron_order": _lists(orders["shared_orders"]),
        "cpu_seconds": clock.report(),
    }
    elastic = dataclasses.replace(ckpt.elastic, layer_ranking=layer_ranking(dense["layer"]))
    return Checkpoint(
        model=m, state=state, tokenizer_dir=ckpt.tokenizer_dir, elastic=elastic, metadata=metadata
    )


def changes_with_any_order(name: str) -> bool:
    """Whether a head, expert or expert-neuron order can change this tensor."""
    return changes_with_orders(name) or changes_with_expert_orders(name)


def load_only(model, state, m) -> None:
    """Copy only the tensors an expert order changes into the ranking model."""
    load_canonical_state_dict(model, state, m, only=changes_with_expert_orders)


def _lists(tensors: Optional[Sequence[torch.Tensor]]):
    return None if tensors is None else [t.tolist() for t in tensors]
