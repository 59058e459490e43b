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
from megatron_flextron.importance.collect import collect_statistics
from megatron_flextron.importance.heads import (
    layer_ranking,
    needs_taylor,
    rank_heads,
    resolve_head_estimator,
)
from megatron_flextron.importance.order import identity_orders, neuron_order
from megatron_flextron.importance.permute import changes_with_orders, permute_state
from megatron_flextron.importance.select import choose_mlp_order, held_out_loss, reduced_sizes

RANKING_MODES = ("fast", "thorough")
# the fast mode's MLP estimator (no choice): measured best on both settings of docs/ranking.md
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
    read one tensor at a time and only this rank's shard is kept. An MoE at TP > 1 is built
    sequence parallel (collect.py gathers the per-token statistics of the shards)."""
    from megatron.core import parallel_state

    from megatron_flextron.elastic import build_elastic_model
    from megatron_flextron.elastic.tp_layout import load_canonical_state_dict
    from megatron_flextron.parallel import current_device

    m = ckpt.model
    tp = parallel_state.get_tensor_model_parallel_world_size()
    config = m.transformer_config(
        tp,
        parallel_state.get_pipeline_model_parallel_world_size(),
        params_dtype=dtype,
        sequence_parallel=m.is_moe and tp > 1,  # megatron's MoE runs under TP only with it
        perform_initialization=False,  # overwritten below
        expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
    )
    model = build_elastic_model(m, config).to(device=current_device(), dtype=dtype)
    load_canonical_state_dict(model, ckpt.state, m)
    return model


def ranking_inputs(ckpt, calibration_data, samples, seq_length, micro_batch_size, mode, clock):
    """-> (number of sequences, held-out count, calibration micro-batches of one sequence each,
    held-out micro-batches or None, the ranking model): thorough holds out a quarter (at least
    one micro-batch)."""
    from megatron_flextron.lm_step import pad_microbatches
    from megatron_flextron.parallel import current_device

    if mode not in RANKING_MODES:
        raise ValueError(f"unknown ranking mode {mode!r}; expected one of {RANKING_MODES}")
    with clock("tokenize"):
        seqs = calibration_sequences(calibration_data, ckpt.tokenizer_dir, samples, seq_length)
    held = max(micro_batch_size, len(seqs) // 4) if mode == "thorough" else 0
    if mode == "thorough" and len(seqs) <= held:
        raise CheckpointError(f"need more than {held} calibration sequences, got {len(seqs)}")
    device = current_device()  # the GPU when there is one
    calib = pad_microbatches(seqs[held:], 1, device)
    heldout = pad_microbatches(seqs[:held], micro_batch_size, device) if held else None
    with clock("load model"):
        model = ranking_model(ckpt)
    return len(seqs), held, calib, heldout, model


def is_sharded(expert_parallel: bool = False) -> bool:
    """Whether the ranking model is split over TP or PP (or EP, when asked)."""
    from megatron.core import parallel_state

    sizes = [
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
    ]
    if expert_parallel:
        sizes.append(parallel_state.get_expert_model_parallel_world_size())
    return max(sizes) > 1


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
    each); heads are ranked by ``head_estimator`` ("auto": heads.FAST_HEAD_ESTIMATOR), MLP
    neurons by their activation. ``thorough``: a quarter of the sequences (at least one
    micro-batch) is held out to choose between estimators by the mean held-out loss over
    every reduced head count (MLP: the width nearest half); the source order is always a
    candidate. With ``refine``, a loss-based head order is then re-estimated at each reduced
    head count in turn (see refine.py) and kept where it lowers the held-out loss. Collective
    over the model-parallel groups when TP/PP > 1. Statistics are collected one sequence per
    micro-batch (the sums are per sequence or per token, so the batching does not change
    them): backward keeps one sequence's activations. An MoE checkpoint goes to
    moe_ranking.py, which ranks its heads and layers the same way.
    """
    from megatron_flextron.elastic.tp_layout import load_canonical_state_dict

    if ckpt.model.is_moe:  # experts and the neurons inside them: moe_ranking.py
        from megatron_flextron.importance.moe_ranking import rank_and_permute_moe

        return rank_and_permute_moe(
            ckpt, calibration_data, samples, seq_length, micro_batch_size, head_estimator, mode,
            refine,
        )  # fmt: skip
    head_estimator = resolve_head_estimator(head_estimator, mode, is_sharded())
    clock = StageClock()
    m, elastic = ckpt.model, ckpt.elastic
    count, held, calib, heldout, model = ranking_inputs(
        ckpt, calibration_data, samples, seq_length, micro_batch_size, mode, clock
    )
    with clock("statistics"):
        stats = collect_statistics(model, calib, m, needs_taylor(head_estimator))
    heads = rank_heads(model, ckpt, calib, heldout, stats, head_estimator, mode, refine, clock)
    mlp_candidates = {
        "original": identity_orders(m.num_layers, m.ffn_hidden_size),
        "activation": [neuron_order(s) for s in stats["mlp"]],
    }
    smaller_mlp = reduced_sizes(m.ffn_hidden_size, elastic.mlp_choices)
    test_mlp = min(
        smaller_mlp, key=lambda w: abs(w - m.ffn_hidden_size / 2), default=m.ffn_hidden_size
    )
    best_mlp, mlp_losses, full_loss = FAST_MLP_ESTIMATOR, {}, None
    if heldout is not None:
        best_mlp, mlp_losses = choose_mlp_order(
            model, ckpt, heldout, mlp_candidates, test_mlp, clock
        )
    mlp_orders = mlp_candidates[best_mlp]

    with clock("permute"):
        state = permute_state(ckpt.state, m, mlp_orders=mlp_orders, head_orders=heads.orders)
        if heldout is not None:
            load_canonical_state_dict(model, state, m, only=changes_with_orders)
            full_loss = held_out_loss(model, heldout)
    metadata = dict(ckpt.metadata)
    metadata["importance"] = {
        "mode": mode,
        "calibration_data": calibration_data,
        "calibration_sequences": count - held,
        "heldout_sequences": held,
        "seq_length": seq_length,
        "calibration_loss": stats["loss"],
        "full_loss": full_loss,
        **heads.metadata(),
        "mlp_estimator": best_mlp,
        "mlp_selection": {"mlp": test_mlp, "loss": mlp_losses},
        "layer_scores": stats["layer"],
        # canonical unit i of layer l is source unit order[l][i]
        "mlp_order": [o.tolist() for o in mlp_orders],
        "cpu_seconds": clock.report(),
    }
    elastic = dataclasses.replace(elastic, layer_ranking=layer_ranking(stats["layer"]))
    return Checkpoint(
        model=m, state=state, tokenizer_dir=ckpt.tokenizer_dir, elastic=elastic, metadata=metadata
    )
