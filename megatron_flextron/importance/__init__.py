"""Importance ranking: collect statistics -> order units -> permute the checkpoint.

After ranking, a width k means the k most important units (at every TP size, see tp_layout), so
prefix sub-networks start out as good as the estimator makes them. Several estimators are
computed and the one with the lowest held-out loss over the reduced sizes is kept, per axis; the
comparison is recorded in the checkpoint metadata. Runs in one process or sharded over the
current TP/PP layout (every rank returns the same ranked checkpoint).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Sequence

import torch

from megatron_flextron.checkpoint.state import Checkpoint, CheckpointError
from megatron_flextron.importance.collect import (
    collect_statistics,
    head_ablation_scores,
    progress,
)
from megatron_flextron.importance.order import head_order, identity_orders, neuron_order
from megatron_flextron.importance.permute import changes_with_orders, permute_state
from megatron_flextron.importance.refine import refine_head_orders

HEAD_ESTIMATORS = ("activation", "taylor", "taylor_token", "ablation")
LOSS_BASED = ("taylor", "taylor_token")


def calibration_sequences(
    spec: str, tokenizer_dir, samples: int, seq_length: int
) -> List[List[int]]:
    """'wiki' (the bundled corpus, train split), a .jsonl of token-id lists, or a text file."""
    from megatron_flextron.data.corpus import token_sequences

    source = "wiki:train" if spec == "wiki" else spec
    try:
        seqs = token_sequences(source, tokenizer_dir, seq_length, samples)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"calibration data {spec}: {e}") from None
    if not seqs:
        raise CheckpointError(f"calibration data {spec} is shorter than one sequence")
    return seqs


def held_out_loss(model, batches) -> float:
    from megatron_flextron.lm_step import forward_backward

    with torch.no_grad():
        out = forward_backward(model, batches, forward_only=True)
    return out["nll_sum"] / out["tokens"]


def ranking_model(ckpt: Checkpoint, dtype: torch.dtype = torch.float32):
    """The elastic model of this rank (current TP/PP layout, current device) holding ckpt, in
    ``dtype`` (statistics in fp32; a sharded save in the checkpoint's own dtype). The state is
    read one tensor at a time and only this rank's shard is kept."""
    from megatron.core import parallel_state

    from megatron_flextron.elastic import build_elastic_model
    from megatron_flextron.elastic.tp_layout import load_canonical_state_dict
    from megatron_flextron.parallel import current_device

    m = ckpt.model
    config = m.transformer_config(
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
        params_dtype=dtype,
        perform_initialization=False,  # overwritten below
        expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
    )
    model = build_elastic_model(m, config).to(device=current_device(), dtype=dtype)
    load_canonical_state_dict(model, ckpt.state, m)
    return model


def reduced_sizes(full: int, choices: Sequence[int]) -> List[int]:
    """The elastic choices below full size, largest first."""
    return sorted({c for c in choices if c < full}, reverse=True)


def rank_and_permute(
    ckpt: Checkpoint,
    calibration_data: str,
    samples: int = 64,
    seq_length: int = 256,
    head_estimator: str = "auto",
    micro_batch_size: int = 4,
    refine: bool = True,
) -> Checkpoint:
    """Rank MLP neurons and heads on calibration data and permute the checkpoint accordingly.

    A quarter of the calibration sequences (at least one micro-batch) is held out to choose
    between estimators by the mean held-out loss over every reduced head count (MLP: the width
    nearest half); the source order is always a candidate. With ``refine``, a loss-based head
    order is re-estimated at each reduced head count in turn (see refine.py) and kept where it
    lowers the held-out loss. Collective over the model-parallel groups when TP/PP > 1.
    Statistics are collected one sequence per micro-batch (the sums are per sequence or per
    token, so the batching does not change them): backward keeps one sequence's activations.
    """
    from megatron.core import parallel_state

    from megatron_flextron.elastic import set_subnetwork
    from megatron_flextron.elastic.tp_layout import load_canonical_state_dict
    from megatron_flextron.lm_step import pad_microbatches
    from megatron_flextron.parallel import current_device

    if ckpt.model.is_moe:  # experts and the neurons inside them: moe_ranking.py
        from megatron_flextron.importance.moe_ranking import rank_and_permute_moe

        return rank_and_permute_moe(
            ckpt, calibration_data, samples, seq_length, micro_batch_size, head_estimator
        )
    if head_estimator not in ("auto",) + HEAD_ESTIMATORS:
        raise ValueError(f"unknown head estimator {head_estimator!r}")
    sharded = (
        parallel_state.get_tensor_model_parallel_world_size() > 1
        or parallel_state.get_pipeline_model_parallel_world_size() > 1
    )
    if head_estimator == "ablation" and sharded:
        raise ValueError("--head-estimator ablation runs at TP=1, PP=1 only")
    m, elastic = ckpt.model, ckpt.elastic
    seqs = calibration_sequences(calibration_data, ckpt.tokenizer_dir, samples, seq_length)
    held = max(micro_batch_size, len(seqs) // 4)
    if len(seqs) <= held:
        raise CheckpointError(f"need more than {held} calibration sequences, got {len(seqs)}")
    device = current_device()  # the GPU when there is one
    calib = pad_microbatches(seqs[held:], 1, device)
    heldout = pad_microbatches(seqs[:held], micro_batch_size, device)

    model = ranking_model(ckpt)
    with_taylor = head_estimator in ("auto",) + LOSS_BASED
    stats = collect_statistics(model, calib, m, with_taylor)

    head_scores: Dict[str, List[torch.Tensor]] = {"activation": stats["activation"]}
    if with_taylor:
        head_scores["taylor"] = stats["taylor"]
        head_scores["taylor_token"] = stats["taylor_token"]
    if head_estimator == "ablation":
        head_scores["ablation"] = head_ablation_scores(model, calib, m)
    head_candidates = {"original": identity_orders(m.num_layers, m.num_attention_heads)}
    for name, scores in head_scores.items():
        if head_estimator in ("auto", name):
            head_candidates[name] = [head_order(s, m.num_query_groups) for s in scores]
    mlp_candidates = {
        "original": identity_orders(m.num_layers, m.ffn_hidden_size),
        "activation": [neuron_order(s) for s in stats["mlp"]],
    }

    head_levels = reduced_sizes(m.num_attention_heads, elastic.head_choices)
    smaller_mlp = reduced_sizes(m.ffn_hidden_size, elastic.mlp_choices)
    test_mlp = min(
        smaller_mlp, key=lambda w: abs(w - m.ffn_hidden_size / 2), default=m.ffn_hidden_size
    )

    def score(spec, **orders):
        load_canonical_state_dict(
            model, permute_state(ckpt.state, m, **orders), m, only=changes_with_orders
        )
        set_subnetwork(model, spec, m, elastic)
        loss = held_out_loss(model, heldout)
        set_subnetwork(model, None, m, elastic)
        return loss

    def head_losses(orders) -> Dict[int, float]:
        return {h: score({"heads": h}, head_orders=orders) for h in head_levels}

    head_selection = {
        k: head_losses(head_candidates[k])
        for k in progress(list(head_candidates), "importance: head estimators")
    }
    mean = {k: sum(v.values()) / max(1, len(v)) for k, v in head_selection.items()}
    best_head = head_estimator if head_estimator != "auto" else min(mean, key=mean.get)
    head_orders = head_candidates[best_head]
    refinement = None
    if refine and best_head in LOSS_BASED and len(head_levels) > 1:
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

    mlp_losses = {
        k: score({"mlp": test_mlp}, mlp_orders=mlp_candidates[k])
        for k in progress(list(mlp_candidates), "importance: MLP estimators")
    }
    best_mlp = min(mlp_losses, key=mlp_losses.get)
    mlp_orders = mlp_candidates[best_mlp]

    state = permute_state(ckpt.state, m, mlp_orders=mlp_orders, head_orders=head_orders)
    load_canonical_state_dict(model, state, m, only=changes_with_orders)
    metadata = dict(ckpt.metadata)
    metadata["importance"] = {
        "calibration_data": calibration_data,
        "calibration_sequences": len(seqs) - held,
        "heldout_sequences": held,
        "seq_length": seq_length,
        "full_loss": held_out_loss(model, heldout),
        "head_estimator": best_head,
        "head_selection": {
            "heads": head_levels,
            "loss": head_selection,
            "head_order": {k: [o.tolist() for o in v] for k, v in head_candidates.items()},
        },
        "head_refinement": refinement,
        "mlp_estimator": best_mlp,
        "mlp_selection": {"mlp": test_mlp, "loss": mlp_losses},
        "layer_scores": stats["layer"],
        # canonical unit i of layer l is source unit order[l][i]
        "mlp_order": [o.tolist() for o in mlp_orders],
        "head_order": [o.tolist() for o in head_orders],
    }
    # the layers that change their input most first (a stable sort: ties keep layer order)
    scores = stats["layer"]
    ranking = sorted(range(len(scores)), key=lambda i: -scores[i])
    elastic = dataclasses.replace(elastic, layer_ranking=tuple(ranking))
    return Checkpoint(
        model=m, state=state, tokenizer_dir=ckpt.tokenizer_dir, elastic=elastic, metadata=metadata
    )
