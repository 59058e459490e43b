"""A plain Megatron-Core GPT checkpoint (torch_dist) of a dense model, for stock Megatron.

Stock Megatron reshards it at load to any TP/PP (contiguous splits: a dense model has no nested
order to keep). ``megatron_args.txt`` lists the Megatron-LM model flags that match it and
``common.pt`` holds them as Megatron-LM's ``args`` (so ``--loader megatron`` reads it back). A
heterogeneous sub-network (per-layer sizes) is written from megatron's own TransformerLayers, each
built with its layer's config; ``model_config.json`` records the sizes as ``layer_shapes`` and
``elastic.model.build_heterogeneous_gpt_model`` rebuilds the model that loads it.
"""

from __future__ import annotations

import argparse
import os

import torch

from megatron_flextron.checkpoint.flextron import (
    TRACKER_FILE,
    converter_model,
    copy_into_parameters,
    views_copied_once,
)
from megatron_flextron.checkpoint.io import copy_tokenizer, dist_save, write_json, write_text_atomic
from megatron_flextron.checkpoint.state import Checkpoint, state_dtype
from megatron_flextron.config import ModelConfig


def megatron_lm_flags(m: ModelConfig) -> list:
    """The Megatron-LM (pretrain_gpt.py) model flags of this architecture."""
    flags = [
        "--use-mcore-models",
        "--transformer-impl",
        "local",
        "--ckpt-format",
        "torch_dist",
        "--num-layers",
        m.num_layers,
        "--hidden-size",
        m.hidden_size,
        "--ffn-hidden-size",
        m.ffn_hidden_size,
        "--num-attention-heads",
        m.num_attention_heads,
        "--kv-channels",
        m.kv_channels,
        "--max-position-embeddings",
        m.max_position_embeddings,
        "--normalization",
        m.normalization,
        "--norm-epsilon",
        m.norm_epsilon,
        "--position-embedding-type",
        m.position_embedding,
    ]
    if m.num_query_groups != m.num_attention_heads:
        flags += ["--group-query-attention", "--num-query-groups", m.num_query_groups]
    if m.position_embedding == "rope":
        flags += ["--rotary-base", int(m.rotary_base)]
        if m.rope_scaling_factor is not None:
            flags += ["--use-rope-scaling", "--rope-scaling-factor", m.rope_scaling_factor]
    if m.activation == "swiglu":
        flags += ["--swiglu"]
    elif m.activation == "gelu_tanh":
        flags += ["--openai-gelu"]
    if not m.add_bias_linear:
        flags += ["--disable-bias-linear"]
        if m.add_qkv_bias:
            flags += ["--add-qkv-bias"]
    if not m.tie_embeddings:
        flags += ["--untie-embeddings-and-output-weights"]
    return [str(f) for f in flags]


def megatron_lm_args(m: ModelConfig, dtype: torch.dtype) -> argparse.Namespace:
    """The ``args`` Megatron-LM stores in common.pt (model arguments only), so that Megatron-LM
    (``--use-checkpoint-args``) and ``--loader megatron`` read the architecture back."""
    gqa = m.num_query_groups != m.num_attention_heads
    return argparse.Namespace(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        kv_channels=m.kv_channels,
        group_query_attention=gqa,
        num_query_groups=m.num_query_groups if gqa else 1,
        max_position_embeddings=m.max_position_embeddings,
        position_embedding_type=m.position_embedding,
        rotary_base=int(m.rotary_base),
        rotary_percent=1.0,
        use_rope_scaling=m.rope_scaling_factor is not None,
        rope_scaling_factor=m.rope_scaling_factor or 8.0,
        normalization=m.normalization,
        norm_epsilon=m.norm_epsilon,
        swiglu=m.activation == "swiglu",
        openai_gelu=m.activation == "gelu_tanh",
        add_bias_linear=m.add_bias_linear,
        add_qkv_bias=m.add_qkv_bias,
        untie_embeddings_and_output_weights=not m.tie_embeddings,
        padded_vocab_size=m.vocab_size,
        make_vocab_size_divisible_by=1,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        transformer_impl="local",
        ckpt_format="torch_dist",
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
        tokenizer_type=None,
        tokenizer_model=None,
    )


def save_megatron(ckpt: Checkpoint, out_dir: str) -> None:
    """Stream the state into a stock megatron model of its dtype (the only copy held) and save
    it with megatron's dist_checkpointing."""
    m = ckpt.model
    dtype = state_dtype(ckpt.state)  # written as it is held; norms too (Float16Module does)
    model = converter_model(m, dtype, elastic=False, layer_shapes=ckpt.layer_shapes)
    copy_into_parameters(model, ckpt.state)
    shards = os.path.join(out_dir, "release")
    os.makedirs(shards)
    sharded = views_copied_once(model.sharded_state_dict(), model)
    state = {"model": sharded, "checkpoint_version": 3.0, "iteration": 0}
    if not ckpt.layer_shapes:  # Megatron-LM's args describe one layer shape only
        state["args"] = megatron_lm_args(m, dtype)
    dist_save(state, shards)
    write_json(
        os.path.join(out_dir, "model_config.json"),
        {"model": m.to_dict(), "layer_shapes": ckpt.layer_shapes, **ckpt.metadata},
    )
    if not ckpt.layer_shapes:  # per-layer sizes have no Megatron-LM flags
        flags = " ".join(megatron_lm_flags(m))
        write_text_atomic(os.path.join(out_dir, "megatron_args.txt"), flags + "\n")
    copy_tokenizer(ckpt.tokenizer_dir, os.path.join(out_dir, "tokenizer"))
    write_text_atomic(os.path.join(out_dir, TRACKER_FILE), "release")
