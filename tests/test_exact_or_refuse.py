"""Every loader is exact or refuses: supported variants (Qwen2 q/k/v biases, Llama-3 RoPE scaling)
give transformers' logits; every other function-changing field or unused tensor stops the
conversion naming it, with nothing written (the CLI exits 2 with one line)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_convert import ROOT, TOKENS, hf_logits, megatron_logits, tiny_hf, write_legacy

from megatron_flextron.checkpoint.state import Checkpoint, CheckpointError
from megatron_flextron.convert import ConvertOptions, convert, load_checkpoint
from megatron_flextron.convert.formats.hf import load_hf
from megatron_flextron.convert.keymap import GGUF_LLAMA

pytestmark = pytest.mark.usefixtures("megatron_single_process")
import transformers  # noqa: E402  (a missing dependency fails, it is not skipped)

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_theta": 1e5,
}


def tiny_qwen2(directory, **overrides):
    torch.manual_seed(0)
    kwargs = dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    cfg = transformers.Qwen2Config(**{**kwargs, **overrides})
    model = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # non-trivial q/k/v biases and norms
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.eval().save_pretrained(directory)
    with torch.no_grad():
        return model(TOKENS).logits


def test_qwen2_qkv_biases_exact_in_full_and_subnetwork(tmp_path):
    ref = tiny_qwen2(tmp_path / "src")
    ckpt = load_hf(str(tmp_path / "src"))
    assert ckpt.model.add_qkv_bias and not ckpt.model.add_bias_linear
    assert (megatron_logits(ckpt, TOKENS) - ref).abs().max() <= 1e-5
    no_bias = {k: (torch.zeros_like(v) if k.endswith("qkv.bias") else v)
               for k, v in ckpt.state.items()}
    dropped = megatron_logits(Checkpoint(ckpt.model, no_bias), TOKENS)
    assert (dropped - ref).abs().max() > 1e-2  # what losing the biases costs: the test can fail
    convert(ConvertOptions("hf", "flextron", str(tmp_path / "src"), str(tmp_path / "fx"),
                           target_tensor_parallel_size=2))
    convert(ConvertOptions("flextron", "hf", str(tmp_path / "fx"), str(tmp_path / "full")))
    assert (hf_logits(str(tmp_path / "full"), TOKENS) - ref).abs().max() <= 1e-5
    spec = {"mlp": 48, "heads": 2}
    convert(ConvertOptions("flextron", "hf", str(tmp_path / "fx"), str(tmp_path / "sub"),
                           subnetwork='{"mlp": 48, "heads": 2}'))
    sub = hf_logits(str(tmp_path / "sub"), TOKENS)
    assert (sub - megatron_logits(ckpt, TOKENS, spec)).abs().max() <= 1e-5
    assert transformers.AutoConfig.from_pretrained(tmp_path / "sub").model_type == "qwen2"


def test_llama3_rope_scaling_exact_through_megatron(tmp_path):
    """Llama-3 RoPE scaling (and Qwen2 q/k/v biases) survive hf -> megatron (Megatron-LM args
    --use-rope-scaling, --add-qkv-bias) -> megatron loader -> hf, equal to transformers."""
    source = tiny_hf("llama", tmp_path / "src", rope_parameters=LLAMA3)
    with torch.no_grad():  # sharp attention, so that positions (and their RoPE) matter
        for name, p in source.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8.0)
    source.save_pretrained(tmp_path / "src")
    long = torch.randint(0, 128, (1, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, ref_long = source(TOKENS).logits, source(long).logits
    ckpt = load_hf(str(tmp_path / "src"))
    assert ckpt.model.rope_scaling_factor == 8.0
    assert (megatron_logits(ckpt, long) - ref_long).abs().max() <= 1e-5
    plain = dataclasses.replace(ckpt.model, rope_scaling_factor=None)
    unscaled = megatron_logits(Checkpoint(plain, ckpt.state), long)
    assert (unscaled - ref_long).abs().max() > 1e-4  # dropping the scaling is visible
    for name, make in (("llama", None), ("qwen2", tiny_qwen2)):
        src = tmp_path / "src"
        if make:
            ref = make(tmp_path / name, rope_parameters=LLAMA3)
            src = tmp_path / name
        convert(ConvertOptions("hf", "megatron", str(src), str(tmp_path / f"{name}-meg")))
        flags = (tmp_path / f"{name}-meg" / "megatron_args.txt").read_text()
        assert "--use-rope-scaling --rope-scaling-factor 8.0" in flags
        assert ("--add-qkv-bias" in flags) == (name == "qwen2")
        convert(ConvertOptions("megatron", "hf", str(tmp_path / f"{name}-meg"),
                               str(tmp_path / f"{name}-hf")))
        assert (hf_logits(str(tmp_path / f"{name}-hf"), TOKENS) - ref).abs().max() <= 1e-5


def _refused(tmp_path, message, loader="hf", source=None, **kw):
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=message):
        convert(ConvertOptions(loader, "flextron", str(source or tmp_path / "src"), str(out), **kw))
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".out.tmp")]


@pytest.mark.parametrize(
    "kind, overrides, message",
    [
        ("mistral", dict(sliding_window=16), "sliding_window=16"),
        ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=0),
         "sliding_window=8"),
        ("llama", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
         "rope_type='yarn'"),
        ("llama", dict(rope_parameters={**LLAMA3, "low_freq_factor": 2.0}),
         "low_freq_factor=2.0"),
        ("llama", dict(hidden_act="relu"), "hidden_act='relu'"),
        ("llama", dict(attention_bias=True), "attention_bias=True"),
        ("llama", dict(mlp_bias=True), "mlp_bias=True"),
        ("llama", dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
        ("gpt2", dict(scale_attn_weights=False), "scale_attn_weights=False"),
        ("gpt2", dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
        ("gpt2", dict(activation_function="relu"), "activation_function='relu'"),
    ],
)
def test_hf_refuses_what_it_cannot_represent(tmp_path, kind, overrides, message):
    if kind == "mistral":
        torch.manual_seed(0)
        cfg = transformers.MistralConfig(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, **overrides,
        )
        transformers.MistralForCausalLM(cfg).save_pretrained(tmp_path / "src")
    elif kind == "qwen2":
        tiny_qwen2(tmp_path / "src", **overrides)
    else:
        tiny_hf(kind, tmp_path / "src", **overrides)
    _refused(tmp_path, message)


def test_unused_tensors_and_a_differing_tied_head_are_refused(tmp_path):
    tiny_hf("llama", tmp_path / "src")
    weights = tmp_path / "src" / "model.safetensors"
    state = load_file(weights)
    save_file({**state, "model.layers.0.self_attn.q_norm.weight": torch.ones(16)}, weights)
    _refused(tmp_path, r"does not use: \['model.layers.0.self_attn.q_norm.weight'\]")
    tiny_qwen2(tmp_path / "tied", tie_word_embeddings=True)
    weights = tmp_path / "tied" / "model.safetensors"
    state = load_file(weights)
    save_file({**state, "lm_head.weight": torch.randn(128, 64)}, weights)
    _refused(tmp_path, "lm_head.weight differs", source=tmp_path / "tied")


def test_cli_refusal_exits_2_with_one_line(tmp_path):
    tiny_hf("gpt2", tmp_path / "src", activation_function="relu")
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), "--loader", "hf",
         "--saver", "hf", "--load-dir", str(tmp_path / "src"), "--save-dir", str(tmp_path / "out")],
        capture_output=True, text=True,
        env={k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE")},
    )
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: hf gpt2: activation_function='relu' is not supported: one of "
                      "['gelu_new', 'gelu_pytorch_tanh', 'gelu']"]
    assert "Traceback" not in out.stderr and not (tmp_path / "out").exists()


# ---------------- GGUF: a tiny llama.cpp file written with the gguf package ----------------


def write_gguf(path, ckpt: Checkpoint, rope_dims=None, extra=None):
    import gguf

    m = ckpt.model
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(m.num_layers)
    writer.add_context_length(m.max_position_embeddings)
    writer.add_embedding_length(m.hidden_size)
    writer.add_feed_forward_length(m.ffn_hidden_size)
    writer.add_head_count(m.num_attention_heads)
    writer.add_head_count_kv(m.num_query_groups)
    writer.add_layer_norm_rms_eps(m.norm_epsilon)
    writer.add_rope_freq_base(m.rotary_base)
    writer.add_rope_dimension_count(rope_dims or m.kv_channels)
    writer.add_vocab_size(m.vocab_size)
    tensors = dict(GGUF_LLAMA.from_canonical(m, ckpt.state))
    for name, tensor in {**tensors, **(extra or {})}.items():
        writer.add_tensor(name, tensor.float().numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_exact_or_refuse(tmp_path):
    from megatron_flextron.convert.formats.gguf import load_gguf

    source = tiny_hf("llama", tmp_path / "src")
    with torch.no_grad():
        ref = source(TOKENS).logits
    ckpt = load_hf(str(tmp_path / "src"))
    write_gguf(tmp_path / "ok.gguf", ckpt)
    back = load_gguf(str(tmp_path / "ok.gguf"), with_tokenizer=False)
    assert (megatron_logits(back, TOKENS) - ref).abs().max() <= 1e-5
    write_gguf(tmp_path / "freqs.gguf", ckpt, extra={"rope_freqs.weight": torch.ones(8)})
    _refused(tmp_path, r"does not use: \['rope_freqs.weight'\]", "gguf", tmp_path / "freqs.gguf")
    write_gguf(tmp_path / "partial.gguf", ckpt, rope_dims=8)
    _refused(tmp_path, "rope.dimension_count=8", "gguf", tmp_path / "partial.gguf")


# ---------------- Megatron legacy: the shared args checks, unknown parts ----------------


def test_megatron_legacy_refuses_unrepresented_args_and_parts(tmp_path):
    source = tiny_hf("gpt2", tmp_path / "gpt2", activation_function="gelu")
    write_legacy(source, tmp_path / "legacy", tp=1, pp=1)
    file = tmp_path / "legacy" / "release" / "mp_rank_00" / "model_optim_rng.pt"
    original = torch.load(file, weights_only=False)
    sd = dict(original, args=original["args"])
    sd["args"].apply_residual_connection_post_layernorm = True
    torch.save(sd, file)
    _refused(tmp_path, "apply_residual_connection_post_layernorm=True", "megatron_legacy",
             tmp_path / "legacy")
    sd["args"].apply_residual_connection_post_layernorm = False
    sd["args"].num_experts, sd["args"].add_bias_linear = 4, False  # MoE runs are torch_dist
    torch.save(sd, file)
    _refused(tmp_path, "num_experts=4 is not supported in a legacy", "megatron_legacy",
             tmp_path / "legacy")
    sd["args"].num_experts, sd["args"].add_bias_linear = None, True
    sd["model"]["language_model"]["pooler"] = {"dense.weight": torch.ones(2, 2)}
    torch.save(sd, file)
    _refused(tmp_path, r"does not convert: \['pooler'\]", "megatron_legacy", tmp_path / "legacy")
    del sd["model"]["language_model"]["pooler"]
    torch.save(sd, file)
    assert load_checkpoint("megatron_legacy", str(tmp_path / "legacy")).model.num_layers == 2
