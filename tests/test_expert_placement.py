"""Expert placement under expert parallelism (elastic/expert_placement.py): the slot formula,
the work every EP rank does for a ranked prefix of experts (counted in a real EP=2 run on gloo),
and checkpoints that are the same tensors whatever the placement.

(EP=2 balanced equals one process in loss, logits and gradients: tests/test_moe_parallel.py.)
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from distributed import run_distributed
from helpers import batch, random_canonical_state, tiny_moe

from megatron_flextron.checkpoint.flextron import (
    load_flextron_into_model,
    read_flextron,
    save_flextron_sharded,
)
from megatron_flextron.checkpoint.state import Checkpoint
from megatron_flextron.config import ElasticConfig, ModelConfig
from megatron_flextron.elastic import build_elastic_model, set_subnetwork
from megatron_flextron.elastic.expert_placement import (
    experts_per_rank,
    load_per_rank,
    slot_experts,
)
from megatron_flextron.elastic.moe import moe_layer_spec
from megatron_flextron.elastic.tp_layout import gather_canonical, load_canonical_state_dict

CHOICES = ElasticConfig(
    head_choices=(4,), expert_choices=(5, 3), moe_ffn_choices=(16,), topk_choices=(1,)
)
KEPT = (3, 5, 8)  # ranked prefixes of 8 experts
PLACEMENTS = ("contiguous", "balanced")


def test_balanced_slots_deal_ranked_experts_round_robin():
    assert slot_experts("balanced", 8, 2) == [0, 2, 4, 6, 1, 3, 5, 7]
    assert slot_experts("contiguous", 8, 2) is None  # the identity
    assert slot_experts("balanced", 8, 1) is None
    for ep in (2, 4, 8):
        slots, local = slot_experts("balanced", 8, ep), 8 // ep
        assert all(slots[(i % ep) * local + i // ep] == i for i in range(8))
        for n in range(1, 9):  # every prefix: ceil or floor of n / EP per rank
            per_rank = experts_per_rank("balanced", n, 8, ep)
            assert sum(per_rank) == n
            assert set(per_rank) <= {n // ep, math.ceil(n / ep)}, (ep, n, per_rank)
    assert experts_per_rank("contiguous", 3, 8, 2) == [3, 0]
    assert experts_per_rank("contiguous", 5, 8, 2) == [4, 1]
    assert load_per_rank("balanced", [10, 20, 30, 40], 2) == [40, 60]


def test_bad_placement_refused():
    with pytest.raises(ValueError, match="unknown expert placement 'striped'"):
        slot_experts("striped", 8, 2)
    with pytest.raises(ValueError, match="6 experts do not divide over EP size 4"):
        slot_experts("balanced", 6, 4)
    with pytest.raises(ValueError, match="'balanced' needs the elastic model"):
        moe_layer_spec(elastic=False, expert_placement="balanced")


def _model(m: ModelConfig, canonical: dict, placement: str, ep: int):
    model = build_elastic_model(
        m, m.transformer_config(expert_model_parallel_size=ep), expert_placement=placement
    )
    load_canonical_state_dict(model, canonical, m)
    return model


def _routed(model, m: ModelConfig, kept: int):
    """Tokens each local expert of every MoE layer was handed (forward, ``kept`` experts)."""
    from megatron_flextron.importance.experts import moe_layers

    set_subnetwork(model, {"experts": kept}, m, CHOICES)
    counts, handles = [], []
    for _, layer in moe_layers(model):
        counts.append(None)
        index = len(counts) - 1

        def hook(module, args, index=index):
            counts[index] = args[1].tolist()  # (hidden, tokens_per_expert, probs)

        handles.append(layer.experts.register_forward_pre_hook(hook))
    tokens, _ = batch()
    with torch.no_grad():
        model(tokens, torch.arange(tokens.size(1)).expand_as(tokens), None)
    for handle in handles:
        handle.remove()
    return counts


def _ep2_body(rank, world_size, model_dict, canonical, ref_tokens, out_dir):
    from megatron_flextron.importance.experts import moe_layers
    from megatron_flextron.parallel import initialize_model_parallel

    initialize_model_parallel(1, 1, expert_model_parallel_size=2)
    m = ModelConfig.from_dict(model_dict)
    for placement in PLACEMENTS:
        model = _model(m, canonical, placement, ep=2)
        ranked = [layer.canonical_expert_indices for _, layer in moe_layers(model)]
        for kept in KEPT:
            for layer, counts in enumerate(_routed(model, m, kept)):
                where = (placement, kept, layer, rank, counts)
                run = sorted(ranked[layer][j] for j, c in enumerate(counts) if c > 0)
                held = sorted(e for e in ranked[layer] if e < kept)  # this rank's kept experts
                assert len(held) == experts_per_rank(placement, kept, 8, 2)[rank], where
                # the experts it runs: those of its kept ones that one process routed tokens to
                assert run == [e for e in held if ref_tokens[kept][layer][e] > 0], where
                # each rank's experts get both ranks' (identical) tokens: twice one process's
                share = load_per_rank(placement, ref_tokens[kept][layer], 2)[rank]
                assert sum(counts) == 2 * share, where
        set_subnetwork(model, None, m, CHOICES)
        save_flextron_sharded(model, Checkpoint(m, canonical), os.path.join(out_dir, placement))
    for source in ("ep1", "contiguous"):  # the sharded (same TP) load into a balanced model
        model = build_elastic_model(
            m, m.transformer_config(expert_model_parallel_size=2), expert_placement="balanced"
        )
        load_flextron_into_model(model, os.path.join(out_dir, source))
        loaded = gather_canonical(model, m)
        assert set(loaded) == set(canonical)
        for name, tensor in loaded.items():
            assert torch.equal(tensor, canonical[name]), (source, name)


def test_balanced_placement_spreads_work_and_keeps_checkpoints(tmp_path, megatron_single_process):
    m = tiny_moe(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True)
    canonical = random_canonical_state(m, seed=5)
    one = _model(m, canonical, "contiguous", ep=1)
    ref_tokens = {kept: _routed(one, m, kept) for kept in KEPT}  # per ranked expert, per layer
    for layer in ref_tokens[3]:  # the 3 kept experts all get tokens (split 3 + 0 or 2 + 1)
        assert sum(c > 0 for c in layer) == 3, ref_tokens
    for name in ("ep1", *PLACEMENTS):
        os.makedirs(tmp_path / name)
    set_subnetwork(one, None, m, CHOICES)
    save_flextron_sharded(one, Checkpoint(m, canonical), str(tmp_path / "ep1"))
    run_distributed(_ep2_body, 2, m.to_dict(), canonical, ref_tokens, str(tmp_path))
    states = {name: read_flextron(str(tmp_path / name)).state for name in ("ep1", *PLACEMENTS)}
    assert set(states["balanced"]) == set(states["ep1"]) == set(canonical)
    for name in canonical:  # the same tensors, bit for bit, as the canonical state
        for source, state in states.items():
            assert torch.equal(state[name], canonical[name]), (source, name)
