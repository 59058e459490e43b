"""Importance ranking: collect statistics -> order units -> permute the checkpoint.

After ranking, a width k means the k most important units (at every TP size, see tp_layout), so
prefix sub-networks start out as good as the estimator makes them. Two modes (docs/ranking.md
has their cost and quality): ``fast`` (the default) ranks with fixed estimators from one pass
over all calibration sequences; ``thorough`` also scores every estimator by held-out loss over
the reduced sizes, keeps the best per axis and re-estimates heads after each cut (refine.py).
The metadata records the orders, the comparison and the CPU seconds of every stage. Runs in one
process or sharded over the current TP/PP layout (every rank returns the same ranked checkpoint).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Dict, List

import torch

from megatron_flextron.checkpoint.state import Checkpoint, CheckpointError
from megatron_flextron.importance.collect import (
    collect_statistics,
    head_ablation_scores,
)
from megatron_flextron.importance.order import head_order, identity_orders, neuron_order
from megatron_flextron.importance.permute import changes_with_orders, permute_state
from megatron_flextron.importance.select import (
    LOSS_BASED,
    choose_orders,
    held_out_loss,
    reduced_sizes,
)

HEAD_ESTIMATORS = ("activation", "taylor", "taylor_token", "ablation")
RANKING_MODES = ("fast", "thorough")
# the fast mode's estimators (no choice): measured best on both settings of docs/ranking.md
FAST_HEAD_ESTIMATOR = "taylor_token"
FAST_MLP_ESTIMATOR = "activation"


class StageClock:
    """CPU seconds of this process per stage (``time.process_time``: every thread's CPU time,
    not wall time, which on a shared machine measures the other jobs too)."""

    def __init__(self):
        self.seconds: Dict[str, float] = {}
        self._start = time.process_time()

    @contextlib.contextmanager
    def __call__(self, stage: str):
        start = time.process_time()
        try:
            yield
        finally:
            spent = time.process_time() - start
            self.seconds[stage] = round(self.seconds.get(stage, 0.0) + spent, 2)

    def report(self) -> Dict[str, float]:
        return dict(self.seconds, total=round(time.process_time() - self._start, 2))


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


def rank_and_permute(
    ckpt: Checkpoint,
    calibration_data: str,
    samples: int = 64,
    seq_length: int = 256,
    head_estimator: str = "auto",
    micro_batch_size: int = 4,
    refine: bool = True,
    mode: str = "fast",
) -> Checkpoint:
    """Rank MLP neurons and heads on calibration data and permute the checkpoint accordingly.

    ``fast``: every calibration sequence feeds the statistics (one forward and one backward
    each); heads are ranked by ``head_estimator`` ("auto": FAST_HEAD_ESTIMATOR), MLP neurons by
    their activation. ``thorough``: a quarter of the sequences (at least one micro-batch) is held
    out to choose between estimators by the mean held-out loss over every reduced head count
    (MLP: the width nearest half); the source order is always a candidate. With ``refine``, a
    loss-based head order is then re-estimated at each reduced head count in turn (see
    refine.py) and kept where it lowers the held-out loss. Collective over the model-parallel
    groups when TP/PP > 1. Statistics are collected one sequence per micro-batch (the sums are
    per sequence or per token, so the batching does not change them): backward keeps one
    sequence's activations.
    """
    from megatron.core import parallel_state

    from megatron_flextron.elastic.tp_layout import load_canonical_state_dict
    from megatron_flextron.lm_step import pad_microbatches
    from megatron_flextron.parallel import current_device

    if mode not in RANKING_MODES:
        raise ValueError(f"unknown ranking mode {mode!r}; expected one of {RANKING_MODES}")
    if ckpt.model.is_moe:  # experts and the neurons inside them: moe_ranking.py
        from megatron_flextron.importance.moe_ranking import rank_and_permute_moe

        return rank_and_permute_moe(
            ckpt, calibration_data, samples, seq_length, micro_batch_size, head_estimator, mode
        )
    if head_estimator not in ("auto",) + HEAD_ESTIMATORS:
        raise ValueError(f"unknown head estimator {head_estimator!r}")
    sharded = (
        parallel_state.get_tensor_model_parallel_world_size() > 1
        or parallel_state.get_pipeline_model_parallel_world_size() > 1
    )
    if head_estimator == "ablation" and sharded:
        raise ValueError("--head-estimator ablation runs at TP=1, PP=1 only")
    clock = StageClock()
    m, elastic = ckpt.model, ckpt.elastic
    with clock("tokenize"):
        seqs = calibration_sequences(calibration_data, ckpt.tokenizer_dir, samples, seq_length)
    held = max(micro_batch_size, len(seqs) // 4) if mode == "thorough" else 0
    if mode == "thorough" and len(seqs) <= held:
        raise CheckpointError(f"need more than {held} calibration sequences, got {len(seqs)}")
    device = current_device()  # the GPU when there is one
    calib = pad_microbatches(seqs[held:], 1, device)

    with clock("load model"):
        model = ranking_model(ckpt)
    if head_estimator == "auto" and mode == "fast":
        head_estimator = FAST_HEAD_ESTIMATOR
    with_taylor = head_estimator in ("auto",) + LOSS_BASED
    with clock("statistics"):
        stats = collect_statistics(model, calib, m, with_taylor)

    head_scores: Dict[str, List[torch.Tensor]] = {"activation": stats["activation"]}
    if with_taylor:
        head_scores["taylor"] = stats["taylor"]
        head_scores["taylor_token"] = stats["taylor_token"]
    if head_estimator == "ablation":
        with clock("ablation"):
            head_scores["ablation"] = head_ablation_scores(model, calib, m)
    head_candidates = {"original": identity_orders(m.num_layers, m.num_attention_heads)}
    for name, scores in head_scores.items():  # fast: every order computed, for comparisons
        if head_estimator in ("auto", name) or mode == "fast":
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

    if mode == "fast":
        best_head, best_mlp, heldout = head_estimator, FAST_MLP_ESTIMATOR, None
        head_orders = head_candidates[best_head]
        head_losses, refinement, mlp_losses = {}, None, {}
        full_loss = None
    else:
        heldout = pad_microbatches(seqs[:held], micro_batch_size, device)
        chosen = choose_orders(
            model, ckpt, calib, heldout, head_candidates, mlp_candidates, head_estimator,
            refine, clock,
        )  # fmt: skip
        best_head, head_orders, head_losses, refinement, best_mlp, mlp_losses = chosen
    mlp_orders = mlp_candidates[best_mlp]

    with clock("permute"):
        state = permute_state(ckpt.state, m, mlp_orders=mlp_orders, head_orders=head_orders)
        if heldout is not None:
            load_canonical_state_dict(model, state, m, only=changes_with_orders)
            full_loss = held_out_loss(model, heldout)
    metadata = dict(ckpt.metadata)
    metadata["importance"] = {
        "mode": mode,
        "calibration_data": calibration_data,
        "calibration_sequences": len(seqs) - held,
        "heldout_sequences": held,
        "seq_length": seq_length,
        "calibration_loss": stats["loss"],
        "full_loss": full_loss,
        "head_estimator": best_head,
        "head_selection": {
            "heads": head_levels,
            "loss": head_losses,
            "head_order": {k: [o.tolist() for o in v] for k, v in head_candidates.items()},
        },
        "head_refinement": refinement,
        "mlp_estimator": best_mlp,
        "mlp_selection": {"mlp": test_mlp, "loss": mlp_losses},
        "layer_scores": stats["layer"],
        # canonical unit i of layer l is source unit order[l][i]
        "mlp_order": [o.tolist() for o in mlp_orders],
        "head_order": [o.tolist() for o in head_orders],
        "cpu_seconds": clock.report(),
    }
    # the layers that change their input most first (a stable sort: ties keep layer order)
    scores = stats["layer"]
    ranking = sorted(range(len(scores)), key=lambda i: -scores[i])
    elastic = dataclasses.replace(elastic, layer_ranking=tuple(ranking))
    return Checkpoint(
        model=m, state=state, tokenizer_dir=ckpt.tokenizer_dir, elastic=elastic, metadata=metadata
    )
