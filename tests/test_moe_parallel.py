"""Expert and pipeline parallelism on gloo: EP=2, PP=2 and TP=2 x EP=2 equal one process, for
the elastic MoE at full size and at sub-networks (fewer experts, narrower experts, smaller top-k;
per layer too).

Each case loads the same canonical weights (experts placed contiguously over EP ranks, neurons
dealt over TP ranks, blocks split over stages by the ``*E|*E`` pattern), runs one megatron
forward/backward through megatron DDP, and compares loss, logits and every canonical weight
gradient with the single-process run. The balanced expert placement (experts dealt round-robin
over EP ranks, elastic/expert_placement.py) is held to the same, at sub-networks whose kept
prefix is split unevenly by the contiguous placement, and with the expert bias megatron updates
after the step. Under TP, megatron's MoE trains only with sequence
parallelism (elastic/norm.py gives the local norms that), so TP=2 x EP=2 runs with it.
"""

from __future__ import annotations

import pytest
import torch
from distributed import run_distributed
from helpers import batch, random_canonical_state, tiny_moe, train_step, wrap_ddp

from megatron_flextron.config import ElasticConfig, ModelConfig
from megatron_flextron.elastic import build_elastic_model, set_subnetwork
from megatron_flextron.elastic.tp_layout import gather_canonical, load_canonical_state_dict

SPECS = [
    None,
    {"experts": 4, "moe_ffn": 16, "topk": 1, "heads": 4},
    {"experts": [8, 6], "moe_ffn": [16, 32], "topk": [1, 2]},
]
CHOICES = ElasticConfig(
    head_choices=(4,), expert_choices=(6, 5, 4, 3), moe_ffn_choices=(16,), topk_choices=(1,)
)
# prefixes of 3 and 5 of 8 experts: contiguous EP=2 puts 3 + 0 and 4 + 1 on the two ranks,
# balanced 2 + 1 and 3 + 2
BALANCED_SPECS = [
    None,
    {"experts": 3},
    {"experts": 5, "moe_ffn": 16, "topk": 1},
    {"experts": [3, 8], "moe_ffn": [16, 32], "topk": [1, 2]},
]


def _run(model_cfg: ModelConfig, canonical: dict, spec, tp=1, pp=1, ep=1, placement=None):
    """(loss, logits, canonical gradients, canonical expert biases after megatron's update)."""
    config = model_cfg.transformer_config(
        tp, pp, sequence_parallel=tp > 1, expert_model_parallel_size=ep
    )
    model = build_elastic_model(model_cfg, config, expert_placement=placement or "contiguous")
    load_canonical_state_dict(model, canonical, model_cfg)
    ddp = wrap_ddp(model, config)
    set_subnetwork(ddp, spec, model_cfg, CHOICES)
    tokens, labels = batch()
    loss, logits = train_step(ddp, tokens, labels)
    biases = {n: t for n, t in gather_canonical(ddp, model_cfg).items() if "expert_bias" in n}
    return loss, logits, gather_canonical(ddp, model_cfg, grads=True), biases


def _parallel_body(rank, world_size, tp, pp, ep, cases, placement=None):
    from megatron.core import parallel_state

    from megatron_flextron.parallel import initialize_model_parallel

    initialize_model_parallel(tp, pp, expert_model_parallel_size=ep)
    for model_dict, canonical, spec, ref_loss, ref_logits, ref_grads, ref_biases in cases:
        model_cfg = ModelConfig.from_dict(model_dict)
        loss, logits, grads, biases = _run(model_cfg, canonical, spec, tp, pp, ep, placement)
        where = f"spec={spec} rank={rank} tp={tp} pp={pp} ep={ep} placement={placement}"
        assert set(biases) <= set(ref_biases), where
        for name, bias in biases.items():  # megatron moved them by +-rate per expert
            assert torch.equal(bias, ref_biases[name]), (where, name, bias, ref_biases[name])
        if parallel_state.is_pipeline_last_stage():
            assert abs(loss.item() - ref_loss.item()) <= 1e-6, (where, loss, ref_loss)
            assert (logits - ref_logits).abs().max() <= 1e-5, where
        if pp == 1:
            assert set(grads) == set(ref_grads), (where, set(grads) ^ set(ref_grads))
        assert set(grads) <= set(ref_grads) and len(grads) > 8, where  # a stage: its own part
        for name, grad in grads.items():
            diff = (grad - ref_grads[name]).abs().max()
            assert diff <= 1e-6, (where, name, diff)


@pytest.fixture(scope="module")
def cases(megatron_single_process):
    model_cfg = tiny_moe(moe_shared_expert_intermediate_size=64, moe_shared_expert_gate=True)
    canonical = random_canonical_state(model_cfg, seed=3)
    out = []
    for spec in SPECS:
        loss, logits, grads, biases = _run(model_cfg, canonical, spec)
        if spec is not None:  # layer 1 keeps 4 or 6 experts: the dropped ones learn nothing
            assert not grads["decoder.layers.1.mlp.experts.local_experts.7.linear_fc1.weight"].any()
        assert grads["decoder.layers.1.mlp.experts.local_experts.0.linear_fc1.weight"].any()
        out.append((model_cfg.to_dict(), canonical, spec, loss, logits, grads, biases))
    return out


@pytest.fixture(scope="module")
def balanced_cases(megatron_single_process):
    """Softmax with a shared expert, and sigmoid scores with megatron's expert bias (updated
    from the per-expert token counts after the step), at the BALANCED_SPECS."""
    models = [
        tiny_moe(moe_shared_expert_intermediate_size=64, moe_shared_expert_gate=True),
        tiny_moe(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True),
    ]
    out = []
    for seed, model_cfg in enumerate(models):
        canonical = random_canonical_state(model_cfg, seed=seed)
        for spec in BALANCED_SPECS:
            loss, logits, grads, biases = _run(model_cfg, canonical, spec)
            assert len(biases) == (2 if model_cfg.moe_router_enable_expert_bias else 0)
            for name, bias in biases.items():  # moved by +-rate: the test sees a mix-up
                assert not torch.equal(bias, canonical[name]), name
            fc1 = "decoder.layers.0.mlp.experts.local_experts.{}.linear_fc1.weight"
            if spec is not None:  # layer 0 keeps 3 or 5 experts: the dropped ones learn nothing
                assert not grads[fc1.format(7)].any()
                assert not grads["decoder.layers.0.mlp.router.weight"][5:].any()
            assert grads[fc1.format(2)].any()
            out.append((model_cfg.to_dict(), canonical, spec, loss, logits, grads, biases))
    return out


@pytest.mark.parametrize("tp, pp, ep, world", [(1, 1, 2, 2), (1, 2, 1, 2), (2, 1, 2, 4)])
def test_expert_parallel_equals_single_process(cases, tp, pp, ep, world):
    run_distributed(_parallel_body, world, tp, pp, ep, cases)


def test_balanced_expert_parallel_equals_single_process(balanced_cases):
    run_distributed(_parallel_body, 2, 1, 1, 2, balanced_cases, "balanced")
