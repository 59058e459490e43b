"""Hugging Face mixtures of experts (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): transformers is the
reference. hf -> canonical state -> the elastic HybridModel equals transformers' logits; the saver
writes the family back (full and cut: fewer / narrower experts, smaller top-k), and transformers
loads it with the same logits; EP=2 equals EP=1; what has no exact mapping is refused by name."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import pytest
import torch
from distributed import run_distributed
from helpers import elastic_logits
from test_bad_input import run_tool
from test_convert import TOKENS, hf_logits

from megatron_flextron.checkpoint.flextron import read_flextron
from megatron_flextron.checkpoint.state import CheckpointError, expected_shapes
from megatron_flextron.convert import ConvertOptions, convert
from megatron_flextron.convert.formats import hf_moe
from megatron_flextron.convert.formats.hf import load_hf, model_config_from_hf, save_hf
from megatron_flextron.elastic import build_elastic_model
from megatron_flextron.elastic.tp_layout import gather_canonical, load_canonical_state_dict

pytestmark = pytest.mark.usefixtures("megatron_single_process")
import transformers  # noqa: E402  (a missing dependency fails, it is not skipped)

COMMON = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=128, max_position_embeddings=64, num_experts_per_tok=2,
              tie_word_embeddings=False)  # fmt: skip
FAMILIES = {  # (config class, its fields): 8 experts of width 32, top-2
    "mixtral": (transformers.MixtralConfig, dict(num_local_experts=8, intermediate_size=32)),
    "qwen2_moe": (  # softmax then top-k, not renormalized; q/k/v biases; a gated shared expert
        transformers.Qwen2MoeConfig,
        dict(
            num_experts=8,
            moe_intermediate_size=32,
            intermediate_size=96,
            shared_expert_intermediate_size=64,
        ),
    ),  # fmt: skip
    "olmoe": (  # q/k norms across all heads, softmax then top-k not renormalized
        transformers.OlmoeConfig,
        dict(num_experts=8, intermediate_size=32, norm_topk_prob=False),
    ),
    "qwen3_moe": (  # per-head q/k norms, head_dim 32 != 64 / 4, renormalized top-k
        transformers.Qwen3MoeConfig,
        dict(
            num_experts=8,
            moe_intermediate_size=32,
            intermediate_size=96,
            head_dim=32,
            norm_topk_prob=True,
        ),
    ),  # fmt: skip
}


def tiny_moe(kind: str, directory, **overrides):
    """A seeded random fp32 transformers MoE saved to ``directory``; norms, biases and router
    made non-trivial (a router of std 0.02 would route almost uniformly). Returns the model."""
    torch.manual_seed(0)
    cls, fields = FAMILIES[kind]
    model = transformers.AutoModelForCausalLM.from_config(
        cls(**{**COMMON, **fields, **overrides}), dtype=torch.float32
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
            elif name.endswith("gate.weight"):  # the router and Qwen2-MoE's shared-expert gate
                p.mul_(10.0)
    model.eval().save_pretrained(directory)
    return model


def close(what: str, out: torch.Tensor, ref: torch.Tensor, bound: float = 1e-5) -> None:
    """|out - ref| <= bound x the logit scale (max |ref|); prints the number (pytest -s)."""
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    print(f"{what}: max |diff| / max |logit| {err:.1e}")
    assert err <= bound, (what, err)


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_hf_moe_equals_transformers_and_round_trips(tmp_path, kind):
    source = tiny_moe(kind, tmp_path / "src")
    with torch.no_grad():
        ref = source(TOKENS).logits
    ckpt = load_hf(str(tmp_path / "src"))
    m = ckpt.model
    assert (m.num_moe_experts, m.moe_ffn_hidden_size, m.moe_router_topk) == (8, 32, 2)
    assert m.moe_router_pre_softmax == (kind in ("qwen2_moe", "olmoe"))
    assert m.qk_layernorm_across_heads == (kind == "olmoe")
    assert set(ckpt.state) == set(expected_shapes(m))
    close(f"{kind} hf -> elastic vs transformers", elastic_logits(ckpt, TOKENS), ref)
    os.makedirs(tmp_path / "out")
    save_hf(ckpt, str(tmp_path / "out"))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == kind
    again = load_hf(str(tmp_path / "out"))
    assert again.model == m
    assert again.state.keys() == ckpt.state.keys()
    assert all(torch.equal(again.state[k], v) for k, v in ckpt.state.items())
    close(
        f"{kind} hf -> hf, transformers vs transformers",
        hf_logits(str(tmp_path / "out"), TOKENS),
        ref,
        1e-6,
    )


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_cut_moe_saves_as_its_family_equal_to_the_elastic_forward(tmp_path, kind):
    """4 of 8 experts, 16 of 32 neurons each, top-1 (the lead's cut of the canonical state, then
    this saver): transformers runs what the elastic model runs at that sub-network."""
    tiny_moe(kind, tmp_path / "src")
    ckpt = load_hf(str(tmp_path / "src"))
    spec = {"experts": 4, "moe_ffn": 16, "topk": 1}
    convert(ConvertOptions("hf", "hf", str(tmp_path / "src"), str(tmp_path / "cut"),
                           subnetwork=json.dumps(spec)))  # fmt: skip
    config = json.loads((tmp_path / "cut" / "config.json").read_text())
    assert (config["model_type"], config["num_experts_per_tok"]) == (kind, 1)
    ref = elastic_logits(ckpt, TOKENS, spec)
    assert (elastic_logits(ckpt, TOKENS) - ref).abs().max() > 1e-2  # a different function
    close(
        f"{kind} {spec} -> hf, transformers vs elastic",
        hf_logits(str(tmp_path / "cut"), TOKENS),
        ref,
    )
    cut = load_hf(str(tmp_path / "cut"))
    assert (cut.model.num_moe_experts, cut.model.moe_ffn_hidden_size) == (4, 16)
    close(
        f"{kind} {spec} -> hf -> elastic vs elastic at the spec", elastic_logits(cut, TOKENS), ref
    )


def _ep2_body(rank, world_size, kind, state, model_dict, ref):
    from megatron_flextron.config import ModelConfig
    from megatron_flextron.parallel import initialize_model_parallel

    initialize_model_parallel(1, 1, expert_model_parallel_size=world_size)
    m = ModelConfig.from_dict(model_dict)
    model = build_elastic_model(m, m.transformer_config(expert_model_parallel_size=world_size))
    load_canonical_state_dict(model, state, m)
    experts = {n for n, _ in model.named_parameters() if "local_experts" in n}
    assert len(experts) == m.num_layers * 2 * m.num_moe_experts // world_size  # 4 per rank
    with torch.no_grad():
        out = model(TOKENS, torch.arange(TOKENS.size(1)).expand_as(TOKENS), None)
    close(f"{kind} EP=2 vs transformers, rank {rank}", out, ref)
    back = gather_canonical(model, m)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], v) for k, v in state.items())


@pytest.mark.parametrize("kind", ["qwen2_moe", "olmoe"])
def test_ep2_equals_transformers(tmp_path, kind):
    """8 experts over two EP ranks: Qwen2-MoE (shared expert, gate, biases), OLMoE (q/k norms
    across heads)."""
    source = tiny_moe(kind, tmp_path / "src")
    with torch.no_grad():
        ref = source(TOKENS).logits
    ckpt = load_hf(str(tmp_path / "src"))
    state = {k: v.clone() for k, v in ckpt.state.items()}
    run_distributed(_ep2_body, 2, kind, state, ckpt.model.to_dict(), ref)


def test_cli_hf_to_flextron_equals_transformers(tmp_path):
    """tools/convert_checkpoint.py --loader hf --saver flextron; the flextron checkpoint holds
    the same canonical state, runs as transformers does, and writes the same Mixtral back."""
    source = tiny_moe("mixtral", tmp_path / "src")
    with torch.no_grad():
        ref = source(TOKENS).logits
    out = run_tool(
        "convert_checkpoint.py", "--loader", "hf", "--saver", "flextron",
        "--load-dir", str(tmp_path / "src"), "--save-dir", str(tmp_path / "fx"),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    back, hf = read_flextron(str(tmp_path / "fx")), load_hf(str(tmp_path / "src"))
    assert back.model == hf.model
    assert back.state.keys() == hf.state.keys()
    assert all(torch.equal(back.state[k], v) for k, v in hf.state.items())
    close(
        "mixtral hf -> flextron (CLI), elastic vs transformers", elastic_logits(back, TOKENS), ref
    )
    convert(ConvertOptions("flextron", "hf", str(tmp_path / "fx"), str(tmp_path / "hf")))
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "mixtral"
    close("mixtral hf -> flextron -> hf, transformers vs transformers",
          hf_logits(str(tmp_path / "hf"), TOKENS), ref, 1e-6)  # fmt: skip


def _config(kind: str, **overrides) -> dict:
    cls, fields = FAMILIES[kind]
    return {**cls(**{**COMMON, **fields}).to_dict(), **overrides}


@pytest.mark.parametrize(
    "kind, overrides, message",
    [
        ("qwen2_moe", dict(mlp_only_layers=[1]), "mlp_only_layers=[1]"),
        ("qwen3_moe", dict(decoder_sparse_step=2), "decoder_sparse_step=2"),
        ("qwen2_moe", dict(num_experts=0), "num_experts=0"),
        ("olmoe", dict(clip_qkv=8.0), "clip_qkv=8.0"),
        ("olmoe", dict(head_dim=32), "head_dim=32 with 4 heads and hidden_size=64"),
        ("olmoe", dict(num_local_experts=4), "num_local_experts=4 and num_experts=8 differ"),
        ("mixtral", dict(routed_scaling_factor=2.5), "routed_scaling_factor=2.5"),
        ("qwen3_moe", dict(shared_expert_intermediate_size=64), "shared_expert_intermediate_size"),
        ("mixtral", dict(norm_topk_prob=False), "norm_topk_prob=False"),
        ("mixtral", dict(sliding_window=16), "sliding_window=16"),
        ("qwen3_moe", dict(use_sliding_window=True, sliding_window=16), "sliding_window=16"),
        ("mixtral", dict(rope_parameters={"rope_type": "yarn", "factor": 2.0}), "yarn"),
        ("mixtral", dict(num_experts_per_tok=9), "num_experts_per_tok=9"),
    ],
)
def test_refused_configs_name_the_field(kind, overrides, message):
    with pytest.raises(CheckpointError, match=re.escape(message)):
        model_config_from_hf(_config(kind, **overrides))


def test_training_only_fields_are_accepted():
    base = model_config_from_hf(_config("mixtral"))
    training = dict(
        router_aux_loss_coef=0.5, output_router_logits=True, router_jitter_noise=0.1, top_k=50
    )
    assert model_config_from_hf(_config("mixtral", **training)) == base


def test_defaults_are_transformers_defaults():
    """A config.json that omits a field means transformers' default: ours must be the same."""
    for kind, defaults in hf_moe.DEFAULTS.items():
        theirs = FAMILIES[kind][0]()
        for key, value in defaults.items():
            got = (
                theirs.rope_parameters["rope_theta"]
                if key == "rope_theta"
                else getattr(theirs, key)
            )
            assert got == value, (kind, key, got, value)


def test_leftover_expert_is_refused(tmp_path):
    """A stored expert the config does not count would be dropped: named, not converted."""
    tiny_moe("mixtral", tmp_path / "src")
    path = tmp_path / "src" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "num_local_experts": 7}))
    with pytest.raises(CheckpointError, match=r"block_sparse_moe\.experts\.7\.w1\.weight"):
        load_hf(str(tmp_path / "src"))


def test_saver_refuses_a_mixture_no_family_has():
    m = model_config_from_hf(_config("mixtral"))
    with pytest.raises(CheckpointError, match="renormalizes the top-k"):
        hf_moe.family_of(dataclasses.replace(m, moe_router_pre_softmax=True))
    with pytest.raises(CheckpointError, match="sigmoid"):
        hf_moe.family_of(dataclasses.replace(m, moe_router_score_function="sigmoid"))
