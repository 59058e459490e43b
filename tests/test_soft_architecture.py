"""Soft (probability-weighted) architectures: one-hot equals the sliced sub-network; mixtures
equal the probability-weighted sum of each choice's output; gradients reach the probabilities."""

from __future__ import annotations

import pytest
import torch
from helpers import batch, elastic_choices, random_canonical_state, tiny_config

from megatron_flextron.elastic import build_gpt_model, set_subnetwork
from megatron_flextron.elastic.soft_architecture import (
    clear_soft_architecture,
    set_soft_architecture,
)
from megatron_flextron.elastic.subnetwork import Subnetwork
from megatron_flextron.elastic.tp_layout import load_canonical_state_dict
from megatron_flextron.routers.cost import router_choices

pytestmark = pytest.mark.usefixtures("megatron_single_process")


def _model(family):
    model_cfg = tiny_config(family)
    gpt = build_gpt_model(model_cfg, model_cfg.transformer_config(), elastic=True)
    load_canonical_state_dict(gpt, random_canonical_state(model_cfg), model_cfg)
    return model_cfg, elastic_choices(model_cfg), gpt.eval()


def _one_hot(choices, picks):
    p = torch.zeros(len(picks), len(choices))
    for layer, value in enumerate(picks):
        p[layer, choices.index(value)] = 1
    return p


@pytest.mark.parametrize("family", ["gpt3", "llama"])
def test_one_hot_soft_architecture_equals_the_sliced_subnetwork(family):
    model_cfg, elastic, gpt = _model(family)
    mlp, heads = router_choices(model_cfg, elastic)
    picks_mlp, picks_heads = (32, 128, 64, 96), (4, 8, 4, 8)
    tokens, _ = batch()
    positions = torch.arange(tokens.size(1)).expand_as(tokens)
    with torch.no_grad():
        set_subnetwork(gpt, Subnetwork(picks_mlp, picks_heads, (0, 1, 2, 3)), model_cfg, elastic)
        sliced = gpt(tokens, positions, None)
        set_subnetwork(gpt, None, model_cfg, elastic)
        set_soft_architecture(
            gpt, _one_hot(mlp, picks_mlp), _one_hot(heads, picks_heads), mlp, heads
        )
        soft = gpt(tokens, positions, None)
        clear_soft_architecture(gpt)
        full = gpt(tokens, positions, None)
    assert torch.allclose(soft, sliced, atol=1e-5), (soft - sliced).abs().max()
    assert (soft - full).abs().max() > 1e-2


@pytest.mark.parametrize("family", ["gpt3", "llama"])
def test_mixture_is_the_probability_weighted_sum_and_has_gradients(family):
    model_cfg, elastic, gpt = _model(family)
    mlp_choices, head_choices = router_choices(model_cfg, elastic)
    layer = gpt.decoder.layers[0]
    x = torch.randn(8, 2, model_cfg.hidden_size)
    rope = gpt.rotary_pos_emb(8) if model_cfg.position_embedding == "rope" else None
    p_mlp = torch.rand(4, len(mlp_choices)).softmax(-1).requires_grad_()
    p_heads = torch.rand(4, len(head_choices)).softmax(-1).requires_grad_()
    set_soft_architecture(gpt, p_mlp, p_heads, mlp_choices, head_choices)
    mixed_mlp = layer.mlp(x)[0]
    mixed_attn = layer.self_attention(x, None, rotary_pos_emb=rope)[0]
    (mixed_mlp.sum() + mixed_attn.sum()).backward()
    assert p_mlp.grad.abs().sum() > 0 and p_heads.grad.abs().sum() > 0
    clear_soft_architecture(gpt)
    with torch.no_grad():
        want_mlp = torch.zeros_like(mixed_mlp)
        for c, width in enumerate(mlp_choices):
            layer.mlp.set_active_width(width)
            want_mlp += p_mlp[0, c] * layer.mlp(x)[0]
        layer.mlp.set_active_width(None)
        want_attn = torch.zeros_like(mixed_attn)
        for c, heads in enumerate(head_choices):
            layer.self_attention.set_active_heads(heads)
            want_attn += p_heads[0, c] * layer.self_attention(x, None, rotary_pos_emb=rope)[0]
        layer.self_attention.set_active_heads(None)
    assert torch.allclose(mixed_mlp, want_mlp, atol=1e-5)
    assert torch.allclose(mixed_attn, want_attn, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt3", "llama"])
def test_layer_keep_weights_skip_layers_exactly_and_have_gradients(family):
    """Depth: keep = 0 is the skipped layer (== the sliced sub-network without it), 0.5 the mean
    of running and skipping it; the loss's gradient reaches the keep weights."""
    model_cfg, elastic, gpt = _model(family)
    mlp, heads = router_choices(model_cfg, elastic)
    picks_mlp, picks_heads, kept = (32, 128, 64, 96), (4, 8, 4, 8), (0, 2, 3)
    tokens, _ = batch()
    positions = torch.arange(tokens.size(1)).expand_as(tokens)
    with torch.no_grad():
        set_subnetwork(gpt, Subnetwork(picks_mlp, picks_heads, kept), model_cfg, elastic)
        sliced = gpt(tokens, positions, None)
        set_subnetwork(gpt, None, model_cfg, elastic)
    keep = torch.tensor([1.0, 0.0, 1.0, 1.0], requires_grad=True)
    one_hots = _one_hot(mlp, picks_mlp), _one_hot(heads, picks_heads)
    set_soft_architecture(gpt, *one_hots, mlp, heads, keep)
    soft = gpt(tokens, positions, None)
    assert torch.allclose(soft, sliced, atol=1e-5), (soft - sliced).abs().max()
    soft.float().pow(2).mean().backward()
    assert keep.grad[1].abs() > 0  # the skipped layer's weight still learns whether to run
    layer = gpt.decoder.layers[1]
    x = torch.randn(8, 2, model_cfg.hidden_size)
    rope = gpt.rotary_pos_emb(8) if model_cfg.position_embedding == "rope" else None
    with torch.no_grad():
        set_soft_architecture(gpt, *one_hots, mlp, heads, torch.tensor([1.0, 0.5, 1.0, 1.0]))
        half = layer(x, None, rotary_pos_emb=rope)[0]
        set_soft_architecture(gpt, *one_hots, mlp, heads)
        run = layer(x, None, rotary_pos_emb=rope)[0]
        clear_soft_architecture(gpt)
    assert torch.allclose(half, (x + run) / 2, atol=1e-5)


def test_elastic_state_sets_one_mode_and_restores_the_full_model():
    """elastic_state: a sub-network, a soft architecture or token routing inside the block (each
    through the modules' own API, no hooks), exactly the full model after it, even on an error;
    two modes at once are refused."""
    from megatron_flextron.elastic.state import SoftArchitecture, elastic_state
    from megatron_flextron.routers.token import TokenRouter, TokenRouting

    model_cfg, elastic, gpt = _model("llama")
    mlp, heads = router_choices(model_cfg, elastic)
    tokens, _ = batch()
    positions = torch.arange(tokens.size(1)).expand_as(tokens)
    half = Subnetwork((64,) * 4, (4,) * 4, (0, 1, 2, 3))
    soft = SoftArchitecture(_one_hot(mlp, half.mlp), _one_hot(heads, half.heads), mlp, heads)
    routings = [TokenRouting(TokenRouter(64, len(mlp)), mlp) for _ in range(4)]
    with torch.no_grad():
        full = gpt(tokens, positions, None)
        with elastic_state(gpt, model_cfg, elastic, subnetwork=half) as subnet:
            sliced = gpt(tokens, positions, None)
        assert subnet == half
        assert torch.equal(gpt(tokens, positions, None), full)
        with elastic_state(gpt, soft=soft):
            masked = gpt(tokens, positions, None)
        assert torch.equal(gpt(tokens, positions, None), full)
        with elastic_state(gpt, token_routing=routings):
            routed = gpt(tokens, positions, None)
        # every layer routed every token, some narrower than the full width
        assert all(r.totals[1] == tokens.numel() for r in routings)
        assert sum(r.totals[0] for r in routings) < 4 * tokens.numel() - 1
        assert torch.equal(gpt(tokens, positions, None), full)
        with pytest.raises(RuntimeError, match="inside"):
            with elastic_state(gpt, model_cfg, elastic, subnetwork=half):
                raise RuntimeError("inside")
        after = gpt(tokens, positions, None)
    assert torch.allclose(masked, sliced, atol=1e-5), (masked - sliced).abs().max()
    assert (sliced - full).abs().max() > 1e-2 and routed.shape == full.shape
    assert torch.equal(after, full)
    layers = gpt.decoder.layers
    assert all(layer.mlp.token_routing is None and layer.keep is None for layer in layers)
    assert all(layer.mlp.linear_fc2.input_scale is None for layer in layers)
    assert not any(layer._forward_hooks or layer._forward_pre_hooks for layer in layers)
    with pytest.raises(ValueError, match="exclude each other"):
        with elastic_state(gpt, model_cfg, elastic, subnetwork=half, soft=soft):
            pass


@pytest.mark.parametrize("family", ["gpt3", "llama"])
def test_hybrid_model_soft_architecture_equals_gpt_model(family):
    """A soft architecture (mixed widths, heads, and gated blocks) on the elastic HybridModel is
    the elastic GPTModel's function, and its probabilities get the same gradients: a block of
    two hybrid layers is gated as one (x + keep (block(x) - x))."""
    from megatron_flextron.elastic.hybrid import build_hybrid_model

    model_cfg, elastic, gpt = _model(family)
    hybrid = build_hybrid_model(model_cfg, model_cfg.transformer_config(), elastic=True).eval()
    load_canonical_state_dict(hybrid, random_canonical_state(model_cfg), model_cfg)
    mlp, heads = router_choices(model_cfg, elastic)
    g = torch.Generator().manual_seed(7)
    p_mlp = torch.rand(4, len(mlp), generator=g).softmax(-1)
    p_heads = torch.rand(4, len(heads), generator=g).softmax(-1)
    p_keep = torch.tensor([1.0, 0.3, 0.8, 0.5])
    tokens, _ = batch()
    positions = torch.arange(tokens.size(1)).expand_as(tokens)
    outputs, grads = [], []
    for model in (gpt, hybrid):
        probs = [p.clone().requires_grad_() for p in (p_mlp, p_heads, p_keep)]
        set_soft_architecture(model, probs[0], probs[1], mlp, heads, probs[2])
        out = model(tokens, positions, None)
        out.square().mean().backward()
        clear_soft_architecture(model)
        outputs.append(out.detach())
        grads.append([p.grad for p in probs])
    assert (outputs[0] - outputs[1]).abs().max() <= 1e-5
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert grads[0][2].abs().min() > 0  # every gate's probability gets a gradient
