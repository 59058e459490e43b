"""Hugging Face transformers directories: Llama family (GQA, SwiGLU, RMSNorm, RoPE) and GPT-2."""

from __future__ import annotations

import os

from safetensors.torch import save_file

from megatron_flextron.config import ModelConfig
from megatron_flextron.checkpoint.state import Checkpoint, CheckpointError
from megatron_flextron.checkpoint.io import copy_tokenizer, read_json, tensor_getter, write_json
from megatron_flextron.convert.keymap import HF_GPT2, HF_LLAMA

_ACTIVATIONS = {
    "silu": "swiglu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu": "gelu",
}


def model_config_from_hf(cfg: dict) -> ModelConfig:
    kind = cfg.get("model_type")
    if kind in ("llama", "mistral", "qwen2"):
        rope = cfg.get("rope_parameters") or {}
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise CheckpointError("Llama-family checkpoints with linear biases are not supported")
        heads = cfg["num_attention_heads"]
        return ModelConfig(
            "llama",
            num_layers=cfg["num_hidden_layers"],
            hidden_size=cfg["hidden_size"],
            ffn_hidden_size=cfg["intermediate_size"],
            num_attention_heads=heads,
            num_query_groups=cfg.get("num_key_value_heads") or heads,
            kv_channels=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            vocab_size=cfg["vocab_size"],
            max_position_embeddings=cfg["max_position_embeddings"],
            norm_epsilon=cfg.get("rms_norm_eps", 1e-6),
            rotary_base=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
            tie_embeddings=cfg.get("tie_word_embeddings", False),
            activation=_ACTIVATIONS.get(cfg.get("hidden_act", "silu"), "swiglu"),
        )
    if kind == "gpt2":
        h = cfg["n_embd"]
        return ModelConfig(
            "gpt3",
            num_layers=cfg["n_layer"],
            hidden_size=h,
            ffn_hidden_size=cfg.get("n_inner") or 4 * h,
            num_attention_heads=cfg["n_head"],
            vocab_size=cfg["vocab_size"],
            max_position_embeddings=cfg["n_positions"],
            norm_epsilon=cfg.get("layer_norm_epsilon", 1e-5),
            activation=_ACTIVATIONS[cfg.get("activation_function", "gelu_new")],
            tie_embeddings=True,
        )
    raise CheckpointError(f"unsupported Hugging Face model_type {kind!r} (llama family or gpt2)")


def hf_config_from_model(m: ModelConfig) -> dict:
    if m.family == "llama":
        if m.add_bias_linear or m.normalization != "RMSNorm" or m.activation != "swiglu":
            raise CheckpointError(
                "only Llama-style (RMSNorm, SwiGLU, no bias) models export as llama"
            )
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
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
            "rope_parameters": {"rope_theta": m.rotary_base, "rope_type": "default"},
            "tie_word_embeddings": m.tie_embeddings,
            "vocab_size": m.vocab_size,
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": "float32",
        }
    if m.is_gqa or not m.tie_embeddings or m.position_embedding != "learned_absolute":
        raise CheckpointError(
            "GPT-3 style models export as gpt2 only with MHA, tied embeddings and learned positions"
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
        "torch_dtype": "float32",
    }


def _keymap(m: ModelConfig):
    return HF_LLAMA if m.family == "llama" else HF_GPT2


def load_hf(path: str) -> Checkpoint:
    if not os.path.isdir(path):
        raise CheckpointError(f"Hugging Face checkpoint {path} is not a directory")
    model = model_config_from_hf(read_json(os.path.join(path, "config.json")))
    state = _keymap(model).to_canonical(model, tensor_getter(path))
    ckpt = Checkpoint(model=model, state=state, tokenizer_dir=path)
    ckpt.validate()
    return ckpt


def save_hf(ckpt: Checkpoint, out_dir: str) -> None:
    """Write a directory that ``AutoModelForCausalLM.from_pretrained`` loads (fp32 safetensors)."""
    if ckpt.layer_shapes:
        raise CheckpointError(
            "a heterogeneous (per-layer) sub-network has no transformers config (Llama and GPT-2 "
            "configs hold one MLP width and head count); export it with --saver megatron"
        )
    config = hf_config_from_model(ckpt.model)
    tensors = _keymap(ckpt.model).from_canonical(ckpt.model, ckpt.state)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    write_json(os.path.join(out_dir, "config.json"), config)
    copy_tokenizer(ckpt.tokenizer_dir, out_dir)
