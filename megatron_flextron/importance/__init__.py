"""Importance ranking: collect statistics -> order units -> permute the checkpoint.

After ranking, a width k means the k most important units (at every TP size, see tp_layout), so
prefix sub-networks start out as good as the estimator makes them. Several estimators are
computed and the one with the lowest held-out loss at a reduced size is kept, per axis; the
comparison is recorded in the checkpoint metadata.
"""

from __future__ import annotations

from typing import Dict, List

import torch

from megatron_flextron.checkpoint.state import Checkpoint, CheckpointError
from megatron_flextron.importance.collect import collect_statistics, head_ablation_scores
from megatron_flextron.importance.order import head_order, identity_orders, neuron_order
from megatron_flextron.importance.permute import permute_state

HEAD_ESTIMATORS = ("activation", "taylor", "ablation")


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


def _held_out_loss(model, batches) -> float:
    from megatron_flextron.lm_step import forward_backward

    with torch.no_grad():
        out = forward_backward(model, batches, forward_only=True)
    return out["nll_sum"] / out["tokens"]


def rank_and_permute(
    ckpt: Checkpoint,
    calibration_data: str,
    samples: int = 64,
    seq_length: int = 256,
    head_estimator: str = "auto",
    micro_batch_size: int = 4,
) -> Checkpoint:
    """Rank MLP neurons and heads on calibration data and permute the checkpoint accordingly.

    A quarter of the calibration sequences (at least one micro-batch) is held out to choose
    between estimators; the source order is always a candidate.
    """
    from megatron_flextron.elastic import build_gpt_model, set_subnetwork
    from megatron_flextron.parallel import current_device
    from megatron_flextron.lm_step import pad_microbatches

    if head_estimator not in ("auto",) + HEAD_ESTIMATORS:
        raise ValueError(f"unknown head estimator {head_estimator!r}")
    m, elastic = ckpt.model, ckpt.elastic
    seqs = calibration_sequences(calibration_data, ckpt.tokenizer_dir, samples, seq_length)
    held = max(micro_batch_size, len(seqs) // 4)
    if len(seqs) <= held:
        raise CheckpointError(f"need more than {held} calibration sequences, got {len(seqs)}")
    device = current_device()  # the GPU when there is one
    calib = pad_microbatches(seqs[held:], micro_batch_size, device)
    heldout = pad_microbatches(seqs[:held], micro_batch_size, device)

    model = build_gpt_model(
        m, m.transformer_config(), elastic=True, pre_process=True, post_process=True
    ).to(device)
    model.load_state_dict(ckpt.state, strict=False)
    with_taylor = head_estimator in ("auto", "taylor")
    stats = collect_statistics(model, calib, m.num_attention_heads, with_taylor)

    head_scores: Dict[str, List[torch.Tensor]] = {"activation": stats["activation"]}
    if with_taylor:
        head_scores["taylor"] = stats["taylor"]
    if head_estimator == "ablation":
        head_scores["ablation"] = head_ablation_scores(model, calib, m.num_attention_heads)
    head_candidates = {"original": identity_orders(m.num_layers, m.num_attention_heads)}
    for name, scores in head_scores.items():
        if head_estimator in ("auto", name):
            head_candidates[name] = [head_order(s, m.num_query_groups) for s in scores]
    mlp_candidates = {
        "original": identity_orders(m.num_layers, m.ffn_hidden_size),
        "activation": [neuron_order(s) for s in stats["mlp"]],
    }

    smaller_heads = [h for h in elastic.head_choices if h < m.num_attention_heads]
    smaller_mlp = [w for w in elastic.mlp_choices if w < m.ffn_hidden_size]
    test_heads = max(smaller_heads) if smaller_heads else m.num_attention_heads
    test_mlp = min(
        smaller_mlp, key=lambda w: abs(w - m.ffn_hidden_size / 2), default=m.ffn_hidden_size
    )

    def score(spec, **orders):
        model.load_state_dict(permute_state(ckpt.state, m, **orders), strict=False)
        set_subnetwork(model, spec, m, elastic)
        loss = _held_out_loss(model, heldout)
        set_subnetwork(model, None, m, elastic)
        return loss

    head_losses = {
        k: score({"heads": test_heads}, head_orders=v) for k, v in head_candidates.items()
    }
    mlp_losses = {k: score({"mlp": test_mlp}, mlp_orders=v) for k, v in mlp_candidates.items()}
    best_head = (
        head_estimator if head_estimator != "auto" else min(head_losses, key=head_losses.get)
    )
    best_mlp = min(mlp_losses, key=mlp_losses.get)
    mlp_orders, head_orders = mlp_candidates[best_mlp], head_candidates[best_head]

    state = permute_state(ckpt.state, m, mlp_orders=mlp_orders, head_orders=head_orders)
    model.load_state_dict(state, strict=False)
    metadata = dict(ckpt.metadata)
    metadata["importance"] = {
        "calibration_data": calibration_data,
        "calibration_sequences": len(seqs) - held,
        "heldout_sequences": held,
        "seq_length": seq_length,
        "full_loss": _held_out_loss(model, heldout),
        "head_estimator": best_head,
        "head_selection": {"heads": test_heads, "loss": head_losses},
        "mlp_estimator": best_mlp,
        "mlp_selection": {"mlp": test_mlp, "loss": mlp_losses},
        "layer_scores": stats["layer"],
        # canonical unit i of layer l is source unit order[l][i]
        "mlp_order": [o.tolist() for o in mlp_orders],
        "head_order": [o.tolist() for o in head_orders],
    }
    return Checkpoint(
        model=m, state=state, tokenizer_dir=ckpt.tokenizer_dir, elastic=elastic, metadata=metadata
    )
