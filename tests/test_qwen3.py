"""Qwen3 (dense): per-head q/k RMSNorms after the QKV split, before RoPE (megatron's
``qk_layernorm``), head_dim != hidden / heads. transformers' Qwen3ForCausalLM is the reference;
every conversion path is exact and every exported sub-network equals the elastic forward."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import pytest
import torch
from distributed import run_distributed
from helpers import elastic_logits
from test_bad_input import assert_refused, run_tool
from test_convert import TOKENS, hf_logits

from megatron_flextron.checkpoint.flextron import load_state_strict, read_flextron
from megatron_flextron.checkpoint.state import Checkpoint, CheckpointError
from megatron_flextron.config import ElasticConfig
from megatron_flextron.convert import ConvertOptions, convert, load_checkpoint
from megatron_flextron.convert.export import export_subnetwork
from megatron_flextron.convert.formats.hf import load_hf, model_config_from_hf, save_hf
from megatron_flextron.elastic import Subnetwork, build_elastic_model, set_subnetwork

pytestmark = pytest.mark.usefixtures("megatron_single_process")
import transformers  # noqa: E402  (a missing dependency fails, it is not skipped)

SUB = {"mlp": 48, "heads": 2}  # one query head per KV group, half the MLP
SUB_LAYERS = {"mlp": 24, "heads": 2, "layers": [1]}
LOOSE = ElasticConfig(range(1, 10**5), range(1, 1000))


def tiny_qwen3(directory, **overrides):
    """A random Qwen3ForCausalLM (fp32; head_dim 32 != 64 / 4) saved to ``directory``, its q/k
    and layer norms made non-trivial; returns the live model."""
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=128,
        max_position_embeddings=64,
        rope_theta=1e5,
        tie_word_embeddings=False,
        **overrides,
    )
    model = transformers.Qwen3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    model.eval().save_pretrained(directory)
    return model


def test_hf_qwen3_to_flextron_equals_transformers(tmp_path):
    source = tiny_qwen3(tmp_path / "src")
    with torch.no_grad():
        ref = source(TOKENS).logits
    out = run_tool(
        "convert_checkpoint.py", "--loader", "hf", "--saver", "flextron",
        "--load-dir", str(tmp_path / "src"), "--save-dir", str(tmp_path / "fx"),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    ckpt = read_flextron(str(tmp_path / "fx"))
    m = ckpt.model
    assert (m.qk_layernorm, m.kv_channels, m.num_query_groups) == (True, 32, 2)
    assert ckpt.state["decoder.layers.1.self_attention.k_layernorm.weight"].shape == (32,)
    err = (elastic_logits(ckpt, TOKENS, choices=LOOSE) - ref).abs().max()
    print(f"Qwen3 hf -> flextron, elastic vs transformers: max |diff| {err:.1e}")
    assert err <= 1e-5
    # hf -> hf is exact, and the written directory is a Qwen3 transformers loads
    hf = load_hf(str(tmp_path / "src"))
    os.makedirs(tmp_path / "hf")
    save_hf(hf, str(tmp_path / "hf"))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("qwen3", ["Qwen3ForCausalLM"])
    again = load_hf(str(tmp_path / "hf"))
    assert again.state.keys() == hf.state.keys() == ckpt.state.keys()
    assert all(torch.equal(again.state[k], v) for k, v in hf.state.items())
    assert all(torch.equal(ckpt.state[k], v) for k, v in hf.state.items())
    assert (hf_logits(str(tmp_path / "hf"), TOKENS) - ref).abs().max() <= 1e-6


@pytest.mark.parametrize("spec", [SUB, SUB_LAYERS])
def test_subnetwork_exports_as_qwen3_equal_to_the_elastic_forward(tmp_path, spec):
    """Sliced heads keep their norms (one weight over the head dim, shared by every head)."""
    tiny_qwen3(tmp_path / "src")
    ckpt = load_hf(str(tmp_path / "src"))
    convert(ConvertOptions("hf", "hf", str(tmp_path / "src"), str(tmp_path / "h"),
                           subnetwork=json.dumps(spec)))  # fmt: skip
    config = json.loads((tmp_path / "h" / "config.json").read_text())
    assert config["model_type"] == "qwen3"
    assert (config["num_attention_heads"], config["head_dim"]) == (2, 32)
    assert config["intermediate_size"] == spec["mlp"]
    ref, full = elastic_logits(ckpt, TOKENS, spec, LOOSE), elastic_logits(ckpt, TOKENS, None, LOOSE)
    assert (full - ref).abs().max() > 1e-2  # a different function
    err = (hf_logits(str(tmp_path / "h"), TOKENS) - ref).abs().max()
    print(f"Qwen3 {spec} -> hf, transformers vs elastic: max |diff| {err:.1e}")
    assert err <= 1e-5


def _tp2_body(rank, world_size, directory, tokens, refs):
    from megatron.core import tensor_parallel

    from megatron_flextron.checkpoint.flextron import load_flextron_into_model, read_config
    from megatron_flextron.config import ModelConfig
    from megatron_flextron.parallel import initialize_model_parallel

    initialize_model_parallel(world_size, 1)
    m = ModelConfig.from_dict(read_config(directory)["model"])
    model = build_elastic_model(m, m.transformer_config(world_size))
    load_flextron_into_model(model, directory)
    for spec, ref in refs:
        set_subnetwork(model, spec, m, LOOSE)
        with torch.no_grad():
            out = model(tokens, torch.arange(tokens.size(1)).expand_as(tokens), None)
        out = tensor_parallel.gather_from_tensor_model_parallel_region(out)
        err = (out - ref).abs().max()
        if rank == 0:
            print(f"Qwen3 TP=2 vs TP=1 at {spec}: max |diff| {err:.1e}")
        assert err <= 1e-5, (spec, err)


def test_tp2_equals_tp1_at_full_size_and_sliced_heads(tmp_path):
    """Dealt for TP=2 (one KV group per rank): full size and one head per group equal TP=1."""
    tiny_qwen3(tmp_path / "src")
    ckpt = convert(ConvertOptions("hf", "flextron", str(tmp_path / "src"), str(tmp_path / "fx"),
                                  target_tensor_parallel_size=2))  # fmt: skip
    refs = [(spec, elastic_logits(ckpt, TOKENS, spec, LOOSE)) for spec in (None, SUB)]
    run_distributed(_tp2_body, 2, str(tmp_path / "fx"), TOKENS, refs)


def _megatron_args(m, tmp_path) -> argparse.Namespace:
    from test_megatron_dist import megatron_lm_args

    return megatron_lm_args(
        num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads, kv_channels=m.kv_channels,
        group_query_attention=True, num_query_groups=m.num_query_groups,
        max_position_embeddings=m.max_position_embeddings, position_embedding_type="rope",
        rotary_base=int(m.rotary_base), normalization="RMSNorm", norm_epsilon=m.norm_epsilon,
        swiglu=True, add_bias_linear=False, qk_layernorm=True,
        untie_embeddings_and_output_weights=True, padded_vocab_size=m.vocab_size,
        tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "tok"),
    )  # fmt: skip


def test_megatron_round_trip_and_te_names(tmp_path):
    """--saver megatron writes --qk-layernorm and the norms; --loader megatron reads them back
    exactly, and reads a Megatron-LM checkpoint under Transformer Engine names (TE fuses the
    input norms into linear_qkv, the q/k norms keep their names) equal to transformers."""
    from megatron.core import dist_checkpointing
    from test_megatron_dist import write_megatron_dist
    from tokenizers import Tokenizer, models

    from megatron_flextron.elastic.hybrid import build_hybrid_model

    source = tiny_qwen3(tmp_path / "src")
    with torch.no_grad():
        ref = source(TOKENS).logits
    ckpt = load_hf(str(tmp_path / "src"))
    convert(ConvertOptions("hf", "megatron", str(tmp_path / "src"), str(tmp_path / "meg")))
    assert "--qk-layernorm" in (tmp_path / "meg" / "megatron_args.txt").read_text().split()
    back = load_checkpoint("megatron", str(tmp_path / "meg"))
    assert back.model == ckpt.model and back.state.keys() == ckpt.state.keys()
    assert all(torch.equal(back.state[k], v) for k, v in ckpt.state.items())
    m = ckpt.model  # stock megatron's HybridModel loads it and computes transformers' function
    dense = build_hybrid_model(m, m.transformer_config(), elastic=False)
    loaded = dist_checkpointing.load(dense.sharded_state_dict(), str(tmp_path / "meg" / "release"))
    dense.load_state_dict(loaded, strict=False)
    with torch.no_grad():
        out = dense(TOKENS, torch.arange(12).expand(2, 12), None)
    err = (out - ref).abs().max()
    print(f"Qwen3 hf -> megatron, stock HybridModel vs transformers: max |diff| {err:.1e}")
    assert err <= 1e-5

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(100)}, unk_token="w0"))
    os.makedirs(tmp_path / "tok")
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    write_megatron_dist(tmp_path / "te", ckpt, _megatron_args(m, tmp_path), names="te")
    te = load_checkpoint("megatron", str(tmp_path / "te"))
    assert te.model == m and all(torch.equal(te.state[k], v) for k, v in ckpt.state.items())
    convert(ConvertOptions("megatron", "hf", str(tmp_path / "te"), str(tmp_path / "hf")))
    err = (hf_logits(str(tmp_path / "hf"), TOKENS) - ref).abs().max()
    print(f"Qwen3 Megatron-LM (TE names) -> hf, transformers vs transformers: max |diff| {err:.1e}")
    assert err <= 1e-5


@pytest.mark.parametrize(
    "overrides, what",
    [
        ({"use_sliding_window": True, "sliding_window": 16}, "sliding_window=16"),
        ({"attention_bias": True}, "attention_bias=True"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"layer_types": ["full_attention", "sliding_attention"]}, "['sliding_attention']"),
    ],
)
def test_what_qwen3_configs_hold_beyond_the_model_is_refused_by_name(overrides, what):
    config = json.loads(transformers.Qwen3Config(num_hidden_layers=2).to_json_string())
    config.update(overrides)
    with pytest.raises(CheckpointError, match="hf qwen3:") as e:
        model_config_from_hf(config)
    assert what in str(e.value)


def test_refusals_of_qk_norm_models(tmp_path):
    """No transformers architecture has q/k norms with q/k/v biases, gpt2 has no q/k norms,
    megatron's L2 q/k norm is not represented: each refused naming it."""
    from helpers import random_canonical_state, tiny_config

    from megatron_flextron.convert.formats.megatron_args import model_config_from_args

    m = tiny_config("llama", qk_layernorm=True, add_qkv_bias=True)
    with pytest.raises(CheckpointError, match="q/k norms together with q/k/v biases"):
        save_hf(Checkpoint(m, random_canonical_state(m)), str(tmp_path))
    m = tiny_config("gpt3", qk_layernorm=True)
    with pytest.raises(CheckpointError, match="no q/k norms"):
        save_hf(Checkpoint(m, random_canonical_state(m)), str(tmp_path))
    args = _megatron_args(tiny_config("llama"), tmp_path)
    with pytest.raises(CheckpointError, match="qk_l2_norm=True is not supported"):
        model_config_from_args(argparse.Namespace(**vars(args), qk_l2_norm=True))
    assert model_config_from_args(args).qk_layernorm
    assert os.listdir(tmp_path) == []


def test_cli_refuses_a_sliding_window_qwen3_naming_it(tmp_path):
    tiny_qwen3(tmp_path / "src", use_sliding_window=True, sliding_window=8)
    out = run_tool(
        "convert_checkpoint.py", "--loader", "hf", "--saver", "flextron",
        "--load-dir", str(tmp_path / "src"), "--save-dir", str(tmp_path / "fx"),
    )  # fmt: skip
    assert_refused(out, "hf qwen3: sliding_window=8 is not supported")
    assert not os.path.exists(tmp_path / "fx")


@pytest.mark.parametrize("spec", [None, SUB])
def test_gguf_qwen3_in_llama_cpp_equals_the_elastic_forward(tmp_path, spec):
    """--saver gguf writes llama.cpp's qwen3 (rows as they are, attn_q_norm / attn_k_norm); the
    file reads back exactly (--loader gguf) and llama.cpp's logits equal the elastic forward."""
    pytest.importorskip("llama_cpp")
    from test_gguf_export import F32_BOUND, IDS, _export, _tokenizer, llama_cpp_run, relative_error

    from megatron_flextron.convert.formats.gguf import load_gguf

    tiny_qwen3(tmp_path / "src")
    ckpt = load_hf(str(tmp_path / "src"))
    ckpt.tokenizer_dir = _tokenizer(tmp_path / "tok")
    path = _export(ckpt, spec, tmp_path / "out", "f32")
    expected = export_subnetwork(ckpt, Subnetwork.parse(spec, ckpt.model)) if spec else ckpt
    back = load_gguf(path, with_tokenizer=False)
    eps = expected.model.norm_epsilon  # GGUF stores it as a float32
    assert back.model.norm_epsilon == torch.tensor(eps, dtype=torch.float32).item()
    assert dataclasses.replace(back.model, norm_epsilon=eps) == expected.model
    assert back.state.keys() == expected.state.keys()
    assert all(torch.equal(back.state[k], v) for k, v in expected.state.items())
    logits, _, arch = llama_cpp_run(path, IDS)
    assert arch == "qwen3"
    err = relative_error(logits, elastic_logits(ckpt, torch.tensor([IDS]), spec, LOOSE)[0])
    print(f"Qwen3 {spec} f32: max relative error {err:.2e}")
    assert err <= F32_BOUND


def test_gguf_refuses_a_per_layer_qwen3_naming_the_norms(tmp_path):
    """Per-layer sizes need llama.cpp's deci, which has no q/k norms."""
    from test_gguf_export import _tokenizer

    from megatron_flextron.convert.formats.gguf import gguf_architecture

    tiny_qwen3(tmp_path / "src")
    ckpt = load_hf(str(tmp_path / "src"))
    ckpt.tokenizer_dir = _tokenizer(tmp_path / "tok")
    sub = export_subnetwork(ckpt, Subnetwork.parse({"mlp": [96, 48]}, ckpt.model))
    with pytest.raises(CheckpointError, match="deci architecture cannot represent q/k norms"):
        gguf_architecture(sub)


def test_per_layer_subnetwork_to_megatron_equals_the_elastic_forward(tmp_path):
    """Per-layer sizes have no transformers or llama.cpp qwen3 config; --saver megatron writes
    them (megatron's own layers, each with its q/k norms) and reads them back exactly."""
    from megatron.core import dist_checkpointing

    from megatron_flextron.elastic.model import build_heterogeneous_gpt_model

    spec = {"mlp": [96, 48], "heads": [2, 4]}
    tiny_qwen3(tmp_path / "src")
    ckpt = load_hf(str(tmp_path / "src"))
    convert(ConvertOptions("hf", "megatron", str(tmp_path / "src"), str(tmp_path / "meg"),
                           subnetwork=json.dumps(spec)))  # fmt: skip
    back = load_checkpoint("megatron", str(tmp_path / "meg"))
    assert back.model.qk_layernorm and back.layer_shapes == [(96, 2), (48, 4)]
    small = export_subnetwork(ckpt, Subnetwork.parse(spec, ckpt.model))
    assert all(torch.equal(back.state[k], v) for k, v in small.state.items())
    dense = build_heterogeneous_gpt_model(back.model, back.layer_shapes)
    loaded = dist_checkpointing.load(dense.sharded_state_dict(), str(tmp_path / "meg" / "release"))
    dense.load_state_dict(loaded, strict=False)
    with torch.no_grad():
        out = dense(TOKENS, torch.arange(12).expand(2, 12), None)
    assert (out - elastic_logits(ckpt, TOKENS, spec, LOOSE)).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # GQA: 8 heads in 4 KV groups, heads trimmed inside each group
        {"num_query_groups": 8},  # MHA: whole heads dropped
        {"family": "gpt3"},  # LayerNorm q/k norms (weight and bias), biases, learned positions
    ],
)
def test_elastic_attention_applies_qk_norms_where_megatron_does(overrides):
    """Full size: the elastic HybridModel equals megatron's stock GPTModel (its SelfAttention's
    own q/k norm path). Sliced heads (the elastic path): equal megatron's stock layers built at
    the smaller size with hand-sliced weights and the same q/k norms."""
    from helpers import SEQ, batch, random_canonical_state, tiny_config
    from test_elastic_model import dense_reference

    from megatron_flextron.elastic import build_gpt_model, count_parameters

    overrides = dict(overrides)
    m = tiny_config(overrides.pop("family", "llama"), qk_layernorm=True, **overrides)
    canonical = random_canonical_state(m)
    ckpt = Checkpoint(m, canonical)
    tokens, _ = batch()
    positions = torch.arange(SEQ).expand_as(tokens)
    stock = build_gpt_model(m, m.transformer_config(), elastic=False)
    load_state_strict(stock, canonical)
    with torch.no_grad():
        full = stock(tokens, positions, None)
    assert (elastic_logits(ckpt, tokens, choices=LOOSE) - full).abs().max() <= 1e-5
    for spec in ({"mlp": 64, "heads": 4}, {"heads": [8, 4, 4, 8], "layers": [0, 2, 3]}):
        subnet = Subnetwork.parse(spec, m)
        dense = dense_reference(m, canonical, subnet)
        params = sum(p.numel() for p in dense.parameters())
        assert count_parameters(subnet, m)["total"] == params  # the q/k norms counted once
        with torch.no_grad():
            ref = dense(tokens, positions, None)
        out = elastic_logits(ckpt, tokens, spec, LOOSE)
        assert (out - full).abs().max() > 1e-2  # a different function from the full model
        assert (out - ref).abs().max() <= 1e-5, (spec, (out - ref).abs().max())


def test_megatron_legacy_refuses_qk_layernorm(tmp_path):
    """Legacy (non-Megatron-Core) GPT checkpoints have no q/k norm tensors to read."""
    from test_convert import tiny_hf, write_legacy

    write_legacy(tiny_hf("gpt2", tmp_path / "gpt2"), tmp_path / "legacy", tp=1, pp=1)
    file = tmp_path / "legacy" / "release" / "mp_rank_00" / "model_optim_rng.pt"
    sd = torch.load(file, weights_only=False)
    sd["args"].qk_layernorm = True
    torch.save(sd, file)
    with pytest.raises(CheckpointError, match="qk_layernorm=True in a legacy torch checkpoint"):
        load_checkpoint("megatron_legacy", str(tmp_path / "legacy"))
