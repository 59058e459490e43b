"""OLMoE's q/k RMSNorms across all heads (elastic/qk_norm.py), beyond what test_hf_moe.py checks
for every family (transformers parity at EP=1 and EP=2, round trips, cuts of the experts): the
norm against torch's rms_norm (full and kept heads), TP=2 against TP=1 (logits and gradients, full
size and fewer heads, GQA and MHA), fewer-head cuts, head permutations, and the savers that cannot
hold it refusing by name."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from distributed import run_distributed
from helpers import elastic_logits, tiny_config
from test_bad_input import assert_refused, run_tool
from test_convert import TOKENS
from test_hf_moe import close, tiny_moe
from test_qwen3 import LOOSE

from megatron_flextron.checkpoint.flextron import read_flextron
from megatron_flextron.checkpoint.state import Checkpoint, CheckpointError
from megatron_flextron.convert import ConvertOptions, convert
from megatron_flextron.convert.export import export_subnetwork
from megatron_flextron.convert.formats.hf import hf_config_from_model, load_hf
from megatron_flextron.elastic import (
    Subnetwork,
    build_elastic_model,
    count_parameters,
    set_subnetwork,
)
from megatron_flextron.elastic.qk_norm import AcrossHeadsRMSNorm
from megatron_flextron.elastic.tp_layout import (
    load_canonical_state_dict,
    local_to_global_names,
    shard_tensor,
    tp_axis,
)
from megatron_flextron.importance.permute import permute_state

pytestmark = pytest.mark.usefixtures("megatron_single_process")

SUB = {"heads": 2}  # GQA (2 KV groups): one query head per group; MHA: 2 of the 4 heads
KV_HEADS = {"gqa": 2, "mha": 4}  # of 4 query heads, head_dim 16, hidden 64
LOSS_WEIGHTS = torch.randn(*TOKENS.shape, 128, generator=torch.Generator().manual_seed(7))


def test_norm_is_rms_norm_over_all_heads_and_over_the_kept_heads():
    """8 heads in 4 KV groups of d = 16: F.rms_norm over the 128 channels with a weight each;
    the first head of every group kept: over those 64 channels, with their weights."""
    m = tiny_config("llama", qk_layernorm=True, qk_layernorm_across_heads=True)
    norm = AcrossHeadsRMSNorm(m.transformer_config(), 16, eps=1e-5, query=True)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(128, generator=g))
    x = 3.0 * torch.randn(5, 2, 8, 16, generator=g)
    ref = F.rms_norm(x.reshape(5, 2, 128), (128,), norm.weight, 1e-5)
    assert (norm(x).reshape(5, 2, 128) - ref).abs().max() <= 1e-6
    norm.set_active(4, 1)
    kept = x.view(5, 2, 4, 2, 16)[:, :, :, 0]  # [s, b, 4 groups, d]
    weight = norm.weight.view(4, 2, 16)[:, 0].reshape(64)
    ref = F.rms_norm(kept.reshape(5, 2, 64), (64,), weight, 1e-5)
    assert (norm(kept).reshape(5, 2, 64) - ref).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="64 channels, weight of 128"):
        norm.set_active(4, 2)
        norm(kept)


def _forward_backward(model, m, spec):
    """Logits at ``spec`` and the gradients of a fixed linear function of them (this rank's
    vocabulary slice: megatron sums the TP ranks' parts in backward)."""
    model.zero_grad()
    set_subnetwork(model, spec, m, LOOSE)
    out = model(TOKENS, torch.arange(TOKENS.size(1)).expand_as(TOKENS), None)
    weights = LOSS_WEIGHTS
    if out.size(-1) != weights.size(-1):  # vocabulary-parallel logits: this rank's slice
        from megatron.core import parallel_state

        tp = parallel_state.get_tensor_model_parallel_world_size()
        weights = weights.chunk(tp, dim=-1)[parallel_state.get_tensor_model_parallel_rank()]
    (out * weights).sum().backward()
    names = local_to_global_names(model)
    grads = {names[n]: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


def _attention_grads(grads: dict) -> dict:
    return {n: g for n, g in grads.items() if ".self_attention." in n}


def _tp2_body(rank, world_size, directory, refs):
    from megatron.core import tensor_parallel

    from megatron_flextron.checkpoint.flextron import load_flextron_into_model, read_config
    from megatron_flextron.config import ModelConfig
    from megatron_flextron.parallel import initialize_model_parallel

    initialize_model_parallel(world_size, 1)
    m = ModelConfig.from_dict(read_config(directory)["model"])
    # megatron's MoE trains under TP only with sequence parallelism (the q/k norms see the
    # whole sequence: the QKV projection gathers it)
    model = build_elastic_model(m, m.transformer_config(world_size, sequence_parallel=True))
    load_flextron_into_model(model, directory)
    for spec, ref, ref_grads in refs:
        out, grads = _forward_backward(model, m, spec)
        out = tensor_parallel.gather_from_tensor_model_parallel_region(out)
        close(f"olmoe TP=2 vs TP=1 at {spec}, rank {rank}", out, ref)
        for name, ref_grad in ref_grads.items():
            axis = tp_axis(name, m)
            expected = ref_grad if axis is None else shard_tensor(ref_grad, axis, world_size, rank)
            close(f"  grad {name}", grads[name], expected)


@pytest.mark.parametrize("attention", sorted(KV_HEADS))
def test_tp2_equals_tp1_logits_and_gradients(tmp_path, attention):
    """Dealt for TP=2 through a flextron checkpoint: each rank normalizes with the other's sum
    of squares (forward) and sends its share of the gradient back; the q/k norm and QKV
    gradients are TP=1's, at full size and with fewer heads."""
    tiny_moe("olmoe", tmp_path / "src", num_key_value_heads=KV_HEADS[attention])
    ckpt = convert(ConvertOptions("hf", "flextron", str(tmp_path / "src"), str(tmp_path / "fx"),
                                  target_tensor_parallel_size=2))  # fmt: skip
    back = read_flextron(str(tmp_path / "fx"))
    assert all(torch.equal(back.state[k], v) for k, v in ckpt.state.items())
    m = ckpt.model
    model = build_elastic_model(m, m.transformer_config())
    load_canonical_state_dict(model, ckpt.state, m)
    refs = []
    for spec in (None, SUB):
        out, grads = _forward_backward(model, m, spec)
        grads = _attention_grads(grads)
        assert "decoder.layers.1.self_attention.q_layernorm.weight" in grads
        refs.append((spec, out, grads))
    run_distributed(_tp2_body, 2, str(tmp_path / "fx"), refs)


@pytest.mark.parametrize("attention", sorted(KV_HEADS))
def test_fewer_heads_cut_equals_the_elastic_forward_and_hf_refuses_it(tmp_path, attention):
    """The cut keeps the kept heads' norm weights (a smaller dense OLMoE-like model that runs as
    the elastic model does at that choice); transformers' OLMoE sizes q_norm by hidden_size,
    so the hf saver refuses it by name and writes nothing."""
    tiny_moe("olmoe", tmp_path / "src", num_key_value_heads=KV_HEADS[attention])
    ckpt = load_hf(str(tmp_path / "src"))
    m = ckpt.model
    subnet = Subnetwork.parse(SUB, m)
    cut = export_subnetwork(ckpt, subnet)
    assert cut.model.num_attention_heads == 2
    assert cut.state["decoder.layers.0.self_attention.q_layernorm.weight"].shape == (32,)
    k_channels = 16 * (2 if attention == "mha" else m.num_query_groups)
    assert cut.state["decoder.layers.0.self_attention.k_layernorm.weight"].shape == (k_channels,)
    assert count_parameters(subnet, m)["total"] == sum(v.numel() for v in cut.state.values())
    ref = elastic_logits(ckpt, TOKENS, SUB, LOOSE)
    assert (elastic_logits(ckpt, TOKENS, None, LOOSE) - ref).abs().max() > 1e-2
    close(f"olmoe {attention} {SUB} cut vs elastic", elastic_logits(cut, TOKENS, None, LOOSE), ref)
    with pytest.raises(CheckpointError, match="olmoe with 2 heads x head_dim 16 != hidden_size 64"):
        convert(ConvertOptions("hf", "hf", str(tmp_path / "src"), str(tmp_path / "out"),
                               subnetwork=json.dumps(SUB)))  # fmt: skip
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("attention", sorted(KV_HEADS))
def test_head_permutation_keeps_the_function(tmp_path, attention):
    """Importance ranking reorders heads: the q norm's channels move with their head (and the
    k norm's with an MHA head), so the full model is unchanged and a cut keeps other heads."""
    tiny_moe("olmoe", tmp_path / "src", num_key_value_heads=KV_HEADS[attention])
    ckpt = load_hf(str(tmp_path / "src"))
    m = ckpt.model
    order = torch.tensor([1, 0, 3, 2] if attention == "gqa" else [2, 0, 3, 1])
    permuted = Checkpoint(m, dict(permute_state(ckpt.state, m, head_orders=[order] * 2)))
    name = "decoder.layers.0.self_attention.q_layernorm.weight"
    assert not torch.equal(permuted.state[name], ckpt.state[name])
    ref = elastic_logits(ckpt, TOKENS, None, LOOSE)
    close(f"olmoe {attention} heads permuted", elastic_logits(permuted, TOKENS, None, LOOSE), ref)
    moved = elastic_logits(permuted, TOKENS, SUB, LOOSE) - elastic_logits(ckpt, TOKENS, SUB, LOOSE)
    assert moved.abs().max() > 1e-2


@pytest.mark.parametrize(
    "saver, clip_qkv, message",
    [  # megatron-core's qk_layernorm is per head: stock Megatron cannot run OLMoE's norms
        ("megatron", None, "qk_layernorm_across_heads=True (OLMoE's q/k norms"),
        ("flextron", 8.0, "hf olmoe: clip_qkv=8.0 is not supported"),  # a clamp of q, k, v
    ],
)
def test_cli_refuses_with_one_line_naming_the_field_and_writes_nothing(
    tmp_path, saver, clip_qkv, message
):
    tiny_moe("olmoe", tmp_path / "src", clip_qkv=clip_qkv)
    out = run_tool(
        "convert_checkpoint.py", "--loader", "hf", "--saver", saver,
        "--load-dir", str(tmp_path / "src"), "--save-dir", str(tmp_path / "out"),
    )  # fmt: skip
    assert_refused(out, message)
    assert not (tmp_path / "out").exists()


def test_configs_that_cannot_hold_norms_across_heads_are_refused():
    """The field needs RMSNorm q/k norms; no dense transformers family here has them (OLMo-2
    also moves its norms after the attention): refused, not written as a Qwen3."""
    with pytest.raises(ValueError, match="needs qk_layernorm=True and RMSNorm"):
        tiny_config("llama", qk_layernorm_across_heads=True)
    with pytest.raises(ValueError, match="needs qk_layernorm=True and RMSNorm"):
        tiny_config("gpt3", qk_layernorm=True, qk_layernorm_across_heads=True)
    m = tiny_config("llama", qk_layernorm=True, qk_layernorm_across_heads=True)
    with pytest.raises(CheckpointError, match="qk_layernorm_across_heads=True without experts"):
        hf_config_from_model(m)
