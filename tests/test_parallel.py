"""Tensor and pipeline parallelism on gloo: TP=2, PP=2 and TP=2 x PP=2 equal TP=1/PP=1.

Each case loads the same canonical weights (dealt across TP ranks by tp_layout), runs one megatron
forward/backward through megatron DDP and the pipeline schedule, and compares loss, logits and the
full (un-dealt) weight gradients with a single-process run, at full size and at sub-networks.
"""

from __future__ import annotations

import pytest
import torch
from distributed import run_distributed
from helpers import (
    batch,
    elastic_choices,
    random_canonical_state,
    tiny_config,
    train_step,
    wrap_ddp,
)

from megatron_flextron.config import ModelConfig
from megatron_flextron.elastic import build_gpt_model, set_subnetwork
from megatron_flextron.elastic.hybrid import build_hybrid_model
from megatron_flextron.elastic.tp_layout import gather_canonical, load_canonical_state_dict

SPECS = [
    None,
    {"mlp": 64, "heads": 4},
    {"mlp": [32, 128, 64, 96], "heads": [8, 4, 4, 8], "layers": [0, 1, 3]},
]


BUILDERS = {"gpt": build_gpt_model, "hybrid": build_hybrid_model}


def _run(model_cfg: ModelConfig, canonical: dict, spec, tp: int = 1, pp: int = 1, model="gpt"):
    config = model_cfg.transformer_config(tp, pp)
    gpt = BUILDERS[model](model_cfg, config, elastic=True)
    load_canonical_state_dict(gpt, canonical, model_cfg)
    ddp = wrap_ddp(gpt, config)
    set_subnetwork(ddp, spec, model_cfg, elastic_choices(model_cfg))
    tokens, labels = batch()
    loss, logits = train_step(ddp, tokens, labels)
    return loss, logits, gather_canonical(ddp, model_cfg, grads=True)


def _parallel_body(rank, world_size, tp, pp, cases, model="gpt"):
    from megatron_flextron.parallel import initialize_model_parallel

    initialize_model_parallel(tp, pp)
    _compare(rank, tp, pp, cases, model)


def _compare(rank, tp, pp, cases, model):
    for model_dict, canonical, spec, ref_loss, ref_logits, ref_grads in cases:
        model_cfg = ModelConfig.from_dict(model_dict)
        loss, logits, grads = _run(model_cfg, canonical, spec, tp, pp, model)
        where = f"{model} {model_cfg.family} spec={spec} rank={rank} tp={tp} pp={pp}"
        if loss is not None:
            assert abs(loss.item() - ref_loss.item()) <= 1e-6, (where, loss, ref_loss)
            assert (logits - ref_logits).abs().max() <= 1e-5, (
                where,
                (logits - ref_logits).abs().max(),
                logits.shape,
                ref_logits.shape,
            )
        for name, grad in grads.items():
            ref = ref_grads[
                "embedding.word_embeddings.weight"
                if name == "output_layer.weight" and name not in ref_grads
                else name
            ]
            assert (grad - ref).abs().max() <= 1e-6, (where, name, (grad - ref).abs().max())
        assert len(grads) >= 4, where


@pytest.fixture(scope="module")
def cases(megatron_single_process):
    out = []
    for model_cfg in (tiny_config("gpt3"), tiny_config("llama", tie_embeddings=True)):
        canonical = random_canonical_state(model_cfg, seed=3)
        for spec in SPECS:
            loss, logits, grads = _run(model_cfg, canonical, spec)
            assert any(g.abs().max() > 0 for g in grads.values())
            out.append((model_cfg.to_dict(), canonical, spec, loss, logits, grads))
    return out


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2), (2, 2)])
def test_parallel_equals_single_process(cases, tp, pp):
    run_distributed(_parallel_body, tp * pp, tp, pp, cases)


def test_hybrid_model_in_one_process_equals_gpt_model(cases):
    """The elastic HybridModel (``*-`` per block) is the elastic GPTModel's function: loss,
    logits and every canonical gradient, at full size and at sub-networks (skips included)."""
    _compare(0, 1, 1, cases, "hybrid")


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2), (2, 2)])
def test_hybrid_model_in_parallel_equals_gpt_model(cases, tp, pp):
    run_distributed(_parallel_body, tp * pp, tp, pp, cases, "hybrid")


def _tp_invariance_body(rank, world_size, model_dict, canonical):
    """Dealing keeps a width's meaning: un-dealing the loaded shards gives back the canonical."""
    from megatron_flextron.parallel import initialize_model_parallel

    initialize_model_parallel(world_size, 1)
    model_cfg = ModelConfig.from_dict(model_dict)
    gpt = build_gpt_model(model_cfg, model_cfg.transformer_config(world_size), elastic=True)
    load_canonical_state_dict(gpt, canonical, model_cfg)
    back = gather_canonical(gpt, model_cfg)
    for name, value in back.items():
        assert torch.equal(value, canonical[name]), name
    # Width k on this rank is the first k/p neurons of its shard = canonical units r, r+p, ...
    fc2 = gpt.decoder.layers[0].mlp.linear_fc2.weight
    assert torch.equal(
        fc2, canonical["decoder.layers.0.mlp.linear_fc2.weight"][:, rank::world_size]
    )


def test_dealt_shards_round_trip_at_tp4(megatron_single_process):
    model_cfg = tiny_config("llama")
    run_distributed(_tp_invariance_body, 4, model_cfg.to_dict(), random_canonical_state(model_cfg))
