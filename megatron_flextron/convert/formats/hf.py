"""Hugging Face transformers directories: Llama family (GQA, SwiGLU, RMSNorm, RoPE; Qwen2's q/k/v
biases, Qwen3's per-head q/k norms, Llama-3 RoPE scaling), GPT-2, and the mixtures of experts with
Llama-family attention (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE: their MoE part is hf_moe.py).

Exact or refuse: every config field that changes the function maps to a ModelConfig field or stops
the conversion naming it, and every stored tensor is read by the key map or named as a leftover.
"""

from __future__ import annotations

import os
import re

import torch

from megatron_flextron.checkpoint.fields import check_fields, check_object, head_dim
from megatron_flextron.checkpoint.io import copy_tokenizer, read_json, tensor_getter, write_json
from megatron_flextron.checkpoint.safetensors_io import shard_specs, write_safetensors
from megatron_flextron.checkpoint.state import Checkpoint, CheckpointError, state_dtype
from megatron_flextron.config import ModelConfig
from megatron_flextron.convert.formats import hf_moe
from megatron_flextron.convert.keymap import HF_GPT2, HF_LLAMA

# the model types with Llama-family attention (and the mixtures of experts of hf_moe.py)
_LLAMA_KINDS = ("llama", "mistral", "qwen2", "qwen3", *hf_moe.KINDS)
# GPT-2 activation_function -> ModelConfig.activation; anything else is refused
_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
_GPT2_FIXED = (  # (field, the only value megatron represents, why)
    ("scale_attn_weights", True, "attention scores are scaled by 1/sqrt(head_dim)"),
    ("scale_attn_by_inverse_layer_idx", False, "no per-layer attention scaling"),
    ("add_cross_attention", False, "decoder-only, no cross-attention"),
)
# Llama 3.x RoPE scaling as megatron-core implements it (only the factor is a parameter)
LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
# the config.json fields each family reads: (required, optional) {field: type}
_SIZES = {
    "llama": (
        dict.fromkeys(("num_hidden_layers", "hidden_size", "intermediate_size",
                       "num_attention_heads", "vocab_size", "max_position_embeddings"), int),
        {"num_key_value_heads": int, "head_dim": int, "rms_norm_eps": float, "rope_theta": float},
    ),
    "gpt2": (
        dict.fromkeys(("n_layer", "n_embd", "n_head", "vocab_size", "n_positions"), int),
        {"n_inner": int, "layer_norm_epsilon": float},
    ),
}  # fmt: skip


def _refuse(kind: str, what: str, why: str) -> CheckpointError:
    return CheckpointError(f"hf {kind}: {what} is not supported: {why}")


def _rope_scaling(kind: str, cfg: dict):
    """The Llama-3 scaling factor, None for plain RoPE; other scalings are refused by name."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise _refuse(kind, f"rope_type={rope_type!r}", "only plain RoPE and Llama-3 scaling")
    for key, value in LLAMA3_ROPE.items():
        if float(rope.get(key, value)) != value:
            raise _refuse(
                kind, f"llama3 RoPE {key}={rope.get(key)}", f"megatron-core fixes it at {value}"
            )
    return float(rope["factor"])


def _check_llama_family(kind: str, cfg: dict) -> None:
    """Refuse, by name, every field that changes the function and has no megatron equivalent."""
    if cfg.get("hidden_act", "silu") != "silu":
        raise _refuse(kind, f"hidden_act={cfg['hidden_act']!r}", "the gated MLP is SwiGLU (silu)")
    if cfg.get("attention_bias"):
        raise _refuse(kind, "attention_bias=True", "biases on q/k/v and o_proj (q/k/v only: qwen2)")
    if cfg.get("mlp_bias"):
        raise _refuse(kind, "mlp_bias=True", "MLP biases without attention biases")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    partial = float(rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor")) or 1.0)
    if partial != 1.0:
        raise _refuse(kind, f"partial_rotary_factor={partial}", "RoPE on every head dimension")
    window = cfg.get("sliding_window")
    layer_types = cfg.get("layer_types") or []
    if kind.startswith("qwen"):  # their sliding_window applies only with use_sliding_window
        window = window if cfg.get("use_sliding_window") else None
    if window is not None:
        raise _refuse(kind, f"sliding_window={window}", "attention is full (causal) everywhere")
    other = sorted(set(layer_types) - {"full_attention"})
    if other:
        raise _refuse(kind, f"layer_types {other}", "attention is full (causal) everywhere")


def model_config_from_hf(cfg: dict) -> ModelConfig:
    cfg = check_object("config.json", cfg)
    kind = cfg.get("model_type")
    if kind in hf_moe.KINDS:  # transformers' defaults differ per family: fill them in first
        cfg = hf_moe.with_defaults(kind, cfg)
    if kind in (*_LLAMA_KINDS, "gpt2"):
        check_fields("config.json", cfg, *_SIZES["gpt2" if kind == "gpt2" else "llama"])
    if kind in _LLAMA_KINDS:
        _check_llama_family(kind, cfg)
        rope = cfg.get("rope_parameters") or {}
        heads = cfg["num_attention_heads"]
        kwargs = dict(
            num_layers=cfg["num_hidden_layers"],
            hidden_size=cfg["hidden_size"],
            ffn_hidden_size=cfg["intermediate_size"],
            num_attention_heads=heads,
            num_query_groups=cfg.get("num_key_value_heads") or heads,
            kv_channels=head_dim("config.json", cfg["hidden_size"], heads, cfg.get("head_dim")),
            vocab_size=cfg["vocab_size"],
            max_position_embeddings=cfg["max_position_embeddings"],
            norm_epsilon=cfg.get("rms_norm_eps", 1e-6),
            rotary_base=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
            tie_embeddings=cfg.get("tie_word_embeddings", False),
            add_qkv_bias=kind == "qwen2",  # Qwen2 always has q/k/v biases and no others
            qk_layernorm=kind == "qwen3",  # Qwen3 always has per-head q/k RMSNorms
            rope_scaling_factor=_rope_scaling(kind, cfg),
        )
        if kind in hf_moe.KINDS:
            kwargs.update(hf_moe.moe_fields(kind, cfg))
        return ModelConfig("llama", **kwargs)
    if kind == "gpt2":
        act = cfg.get("activation_function", "gelu_new")
        if act not in _GPT2_ACTIVATIONS:
            raise _refuse(kind, f"activation_function={act!r}", f"one of {list(_GPT2_ACTIVATIONS)}")
        for key, ok, why in _GPT2_FIXED:
            if bool(cfg.get(key, ok)) != ok:
                raise _refuse(kind, f"{key}={cfg[key]}", why)
        h = cfg["n_embd"]
        head_dim("config.json", h, cfg["n_head"], None)
        return ModelConfig(
            "gpt3",
            num_layers=cfg["n_layer"],
            hidden_size=h,
            ffn_hidden_size=cfg.get("n_inner") or 4 * h,
            num_attention_heads=cfg["n_head"],
            vocab_size=cfg["vocab_size"],
            max_position_embeddings=cfg["n_positions"],
            norm_epsilon=cfg.get("layer_norm_epsilon", 1e-5),
            activation=_GPT2_ACTIVATIONS[act],
            tie_embeddings=True,
        )
    raise CheckpointError(
        f"unsupported Hugging Face model_type {kind!r} ({', '.join(_LLAMA_KINDS)} or gpt2)"
    )


def _llama_family_config(m: ModelConfig) -> dict:
    if m.add_bias_linear or m.normalization != "RMSNorm" or m.activation != "swiglu":
        raise CheckpointError("only Llama-style (RMSNorm, SwiGLU, no bias) models export as llama")
    if m.position_embedding != "rope":
        raise CheckpointError("Llama-family exports need RoPE position embeddings")
    rope = {"rope_theta": m.rotary_base, "rope_type": "default"}
    if m.rope_scaling_factor is not None:
        rope.update(rope_type="llama3", factor=m.rope_scaling_factor, **LLAMA3_ROPE)
    if m.qk_layernorm and m.add_qkv_bias:
        raise CheckpointError(
            "q/k norms together with q/k/v biases have no transformers architecture (Qwen3 has "
            "the norms and no biases, Qwen2 the biases and no norms)"
        )
    arch, kind = ("LlamaForCausalLM", "llama")
    if m.add_qkv_bias:
        arch, kind = ("Qwen2ForCausalLM", "qwen2")
    elif m.qk_layernorm:
        arch, kind = ("Qwen3ForCausalLM", "qwen3")
    config = {
        "architectures": [arch],
        "model_type": kind,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups,
        "head_dim": m.kv_channels,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_position_embeddings,
        "rms_norm_eps": m.norm_epsilon,
        "rope_theta": m.rotary_base,
        "rope_parameters": rope,
        "tie_word_embeddings": m.tie_embeddings,
        "vocab_size": m.vocab_size,
    }
    if kind in ("qwen2", "qwen3"):
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=m.num_layers)
    if kind == "qwen3":
        config.update(attention_bias=False)
    elif kind == "llama":
        config.update(attention_bias=False, mlp_bias=False)
    return config


def hf_config_from_model(m: ModelConfig) -> dict:
    if m.family == "llama" and m.is_moe:
        return hf_moe.hf_fields(m, _llama_family_config(m))
    if m.qk_layernorm_across_heads:
        raise CheckpointError(
            "qk_layernorm_across_heads=True without experts: only OLMoE (a mixture of experts) "
            "is written with q/k norms across heads"
        )
    if m.family == "llama":
        return _llama_family_config(m)
    if (
        m.is_gqa
        or not m.tie_embeddings
        or m.position_embedding != "learned_absolute"
        or not m.add_bias_linear
        or m.normalization != "LayerNorm"
        or m.activation not in ("gelu", "gelu_tanh")
        or m.qk_layernorm
    ):
        raise CheckpointError(
            "GPT-3 style models export as gpt2 only with MHA, tied embeddings, learned positions, "
            "LayerNorm, GeLU, all linear biases and no q/k norms"
        )
    if m.kv_channels * m.num_attention_heads != m.hidden_size:
        raise CheckpointError(
            f"gpt2 needs heads x head_dim == hidden ({m.num_attention_heads} x {m.kv_channels} "
            f"!= {m.hidden_size}): a head-trimmed GPT-3 exports to Megatron, not to gpt2"
        )
    act = {"gelu_tanh": "gelu_new", "gelu": "gelu"}[m.activation]
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_embd": m.hidden_size,
        "n_layer": m.num_layers,
        "n_head": m.num_attention_heads,
        "n_inner": m.ffn_hidden_size,
        "n_positions": m.max_position_embeddings,
        "vocab_size": m.vocab_size,
        "layer_norm_epsilon": m.norm_epsilon,
        "activation_function": act,
        "tie_word_embeddings": True,
    }


def _keymap(m: ModelConfig):
    if m.is_moe:
        return hf_moe.keymap(m)
    return HF_LLAMA if m.family == "llama" else HF_GPT2


_BUFFERS = re.compile(r"^(.*rotary_emb\.inv_freq|transformer\.h\.\d+\.attn\.(masked_)?bias)$")


def _ignored(m: ModelConfig, get) -> set:
    """Stored tensors that carry nothing: attention-mask and RoPE buffers, and a tied head
    saved next to the embedding (only when it is the same tensor)."""
    ignored = {n for n in get.names if _BUFFERS.match(n)}
    if m.tie_embeddings and "lm_head.weight" in get.names:
        embed = "model.embed_tokens.weight" if m.family == "llama" else "transformer.wte.weight"
        if not torch.equal(get("lm_head.weight"), get(embed)):
            raise CheckpointError("tie_word_embeddings=True but lm_head.weight differs from "
                                  f"{embed}: the tied model would drop it")
        ignored.add("lm_head.weight")
    return ignored


def load_hf(path: str) -> Checkpoint:
    if not os.path.isdir(path):
        raise CheckpointError(f"Hugging Face checkpoint {path} is not a directory")
    model = model_config_from_hf(read_json(os.path.join(path, "config.json")))
    keymap, get = _keymap(model), tensor_getter(path)
    keymap.check_consumed(model, get.names, _ignored(model, get))
    state = keymap.to_canonical(model, get)
    ckpt = Checkpoint(model=model, state=state, tokenizer_dir=path)
    ckpt.validate()
    return ckpt


MAX_SHARD_BYTES = 5 * 2**30  # transformers' usual shard size


def save_hf(ckpt: Checkpoint, out_dir: str, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write a directory that ``AutoModelForCausalLM.from_pretrained`` loads, in the state's
    dtype, one tensor at a time (shards of ``max_shard_bytes`` plus an index when bigger)."""
    if ckpt.layer_shapes:
        raise CheckpointError(
            "a heterogeneous (per-layer) sub-network has no transformers config (Llama and GPT-2 "
            "configs hold one MLP width and head count); export it with --saver megatron"
        )
    dtype = str(state_dtype(ckpt.state)).replace("torch.", "")
    config = {**hf_config_from_model(ckpt.model), "torch_dtype": dtype}
    if "vocabulary" in ckpt.metadata:  # Megatron's padded vocabulary: say what the rows are
        config["megatron_vocabulary"] = ckpt.metadata["vocabulary"]
    keymap = _keymap(ckpt.model)
    specs = keymap.from_canonical_specs(ckpt.model, ckpt.state)
    tensors = keymap.from_canonical(ckpt.model, ckpt.state)
    shards = shard_specs(specs, max_shard_bytes)
    files = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    for file, shard in zip(files, shards):
        group = (next(tensors) for _ in range(len(shard)))
        write_safetensors(os.path.join(out_dir, file), shard, group, metadata={"format": "pt"})
    if len(shards) > 1:
        weight_map = {name: file for file, shard in zip(files, shards) for name, _ in shard}
        total = sum(spec.nbytes for _, spec in specs)
        write_json(
            os.path.join(out_dir, "model.safetensors.index.json"),
            {"metadata": {"total_size": total}, "weight_map": weight_map},
        )
    write_json(os.path.join(out_dir, "config.json"), config)
    copy_tokenizer(ckpt.tokenizer_dir, out_dir)
