"""Elastic mixture of experts (one process): at full size the elastic HybridModel (``*E`` per
block) equals megatron's own MoE modules; a sub-network with fewer experts, narrower experts or a
smaller top-k equals megatron's MoE of that smaller shape loaded with the exported (cut) weights;
dropped experts get no tokens and no gradient; parameter counts; flextron checkpoints."""

from __future__ import annotations

import pytest
import torch
from helpers import BATCH, SEQ, batch, random_canonical_state, tiny_moe

from megatron_flextron.checkpoint.state import Checkpoint, CheckpointError
from megatron_flextron.config import ElasticConfig
from megatron_flextron.convert.export import export_subnetwork
from megatron_flextron.elastic import Subnetwork, count_parameters, set_subnetwork
from megatron_flextron.elastic.blocks import hybrid_name
from megatron_flextron.elastic.hybrid import build_hybrid_model
from megatron_flextron.elastic.state import reset_elastic_state

pytestmark = pytest.mark.usefixtures("megatron_single_process")

VARIANTS = {
    # Mixtral / Qwen3-MoE (norm_topk_prob): softmax over the top-k logits
    "renormalized": tiny_moe(),
    # Qwen2-MoE / OLMoE: softmax over all experts, top-k not renormalized; shared expert + gate
    "pre_softmax_shared": tiny_moe(
        moe_router_pre_softmax=True,
        moe_shared_expert_intermediate_size=64,
        moe_shared_expert_gate=True,
    ),
    # DeepSeek-style: sigmoid scores, a routing-only expert bias, scaled weights
    "sigmoid_bias": tiny_moe(
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_topk_scaling_factor=2.5,
    ),
}
SPECS = {
    "experts": {"experts": 4},
    "moe_ffn": {"moe_ffn": 16},
    "topk": {"topk": 1},
    "all_axes": {"experts": 6, "moe_ffn": 24, "topk": 1, "heads": 4},
}


def choices(m) -> ElasticConfig:
    return ElasticConfig(
        head_choices=(4,), expert_choices=(6, 4), moe_ffn_choices=(24, 16), topk_choices=(1,)
    )


def _model(m, state, elastic=True):
    model = build_hybrid_model(
        m, m.transformer_config(), elastic=elastic, core_attention=None if elastic else "local"
    )
    result = model.load_state_dict({hybrid_name(k): v for k, v in state.items()}, strict=False)
    assert not [k for k in result.missing_keys if "_extra_state" not in k], result.missing_keys
    return model


def _logits(model, tokens):
    return model(tokens, torch.arange(SEQ).expand(BATCH, SEQ), None)


@pytest.mark.parametrize("variant", VARIANTS)
def test_full_size_equals_megatron_moe(variant):
    m = VARIANTS[variant]
    state = random_canonical_state(m)
    tokens, _ = batch()
    elastic, stock = _model(m, state), _model(m, state, elastic=False)
    assert elastic.hybrid_layer_pattern == "*E*E"
    diff = (_logits(elastic, tokens) - _logits(stock, tokens)).abs().max().item()
    assert diff <= 1e-5, diff


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_subnetwork_equals_megatron_moe_of_the_smaller_shape(variant, spec):
    """Slicing, not masking: the sub-network is megatron's MoE of the smaller shape, loaded with
    the exported weights (router rows, experts, expert neurons cut)."""
    m = VARIANTS[variant]
    state = random_canonical_state(m)
    tokens, _ = batch()
    elastic = _model(m, state)
    subnet = set_subnetwork(elastic, SPECS[spec], m, choices(m))
    small = export_subnetwork(Checkpoint(model=m, state=state), subnet)
    assert small.model.num_moe_experts == subnet.experts[0]
    assert small.model.moe_router_topk == subnet.topk[0]
    reference = _model(small.model, dict(small.state), elastic=False)
    diff = (_logits(elastic, tokens) - _logits(reference, tokens)).abs().max().item()
    assert diff <= 1e-5, diff
    counted = count_parameters(subnet, m)["total"]
    assert counted == sum(t.numel() for t in small.state.values()), counted
    reset_elastic_state(elastic)
    full = _logits(_model(m, state, elastic=False), tokens)
    assert (_logits(elastic, tokens) - full).abs().max() <= 1e-5  # and back to full size


def test_dropped_experts_get_no_tokens_and_no_gradient():
    m = VARIANTS["pre_softmax_shared"]
    model = _model(m, random_canonical_state(m))
    set_subnetwork(model, {"experts": 4, "moe_ffn": 16}, m, choices(m))
    tokens, labels = batch()
    _logits(model, tokens).float().mean().backward()
    for name, p in model.named_parameters():
        if ".local_experts." in name:
            expert = int(name.split(".local_experts.")[1].split(".")[0])
            grad = torch.zeros_like(p) if p.grad is None else p.grad
            if expert >= 4:
                assert not grad.any(), name
            elif name.endswith("linear_fc2.weight"):
                assert not grad[:, 16:].any() and grad[:, :16].any(), name
        if name.endswith("router.weight"):
            assert not p.grad[4:].any() and p.grad[:4].any(), name


def test_active_and_total_parameters():
    """Memory holds every kept expert; a token runs through top-k of them."""
    m = VARIANTS["renormalized"]
    full, top1 = Subnetwork.full(m), Subnetwork.parse({"topk": 1}, m, choices(m))
    h, f = m.hidden_size, m.moe_ffn_hidden_size
    per_expert = 3 * h * f  # SwiGLU: gate, up and down
    counts, counts_top1 = count_parameters(full, m), count_parameters(top1, m)
    assert counts["total"] == counts_top1["total"]
    assert counts["total"] - counts["active"] == m.num_layers * (8 - 2) * per_expert
    assert counts["active"] - counts_top1["active"] == m.num_layers * per_expert


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"experts": 5}, "experts 5 is not one of the configured choices"),
        ({"experts": 4, "topk": 2, "moe_ffn": 20}, "moe_ffn 20 is not one of"),
        ({"mlp": 64}, "a mixture of experts has no dense MLP"),
        ({"experts": [4]}, "lists 1 values for a 2-layer model"),
    ],
)
def test_invalid_moe_subnetworks_are_refused(spec, message):
    m = VARIANTS["renormalized"]
    with pytest.raises(ValueError, match=message):
        Subnetwork.parse(spec, m, choices(m)).validate(m, choices(m))


def test_moe_keys_on_a_dense_model_and_per_layer_exports_are_refused():
    from helpers import tiny_config

    with pytest.raises(ValueError, match="'topk': this model has no mixture of experts"):
        Subnetwork.parse({"topk": 1}, tiny_config("llama"))
    m = VARIANTS["renormalized"]
    subnet = Subnetwork.parse({"experts": [8, 4]}, m, choices(m))
    with pytest.raises(CheckpointError, match="per-layer expert choices"):
        export_subnetwork(Checkpoint(model=m, state=random_canonical_state(m)), subnet)


def test_flextron_checkpoint_of_an_moe_round_trips(tmp_path):
    from megatron_flextron.checkpoint.flextron import (
        load_flextron_into_model,
        read_flextron,
        save_flextron,
    )

    m = VARIANTS["sigmoid_bias"]
    state = random_canonical_state(m)
    save_flextron(Checkpoint(model=m, state=state, elastic=choices(m)), str(tmp_path))
    read = read_flextron(str(tmp_path))
    assert read.elastic == choices(m)
    assert set(read.state) == set(state)
    for name, value in state.items():
        assert torch.equal(read.state[name], value), name
    model = build_hybrid_model(m, m.transformer_config())
    load_flextron_into_model(model, str(tmp_path))
    tokens, _ = batch()
    reference = _logits(_model(m, state, elastic=False), tokens)
    assert (_logits(model, tokens) - reference).abs().max() <= 1e-5
