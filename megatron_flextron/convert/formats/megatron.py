"""A plain Megatron-Core checkpoint (torch_dist) of a dense model, for stock Megatron.

Model class: megatron-core's HybridModel by default (pattern ``*-`` per block, megatron's hybrid
layout: what today's Megatron-LM trains and resumes), or GPTModel (``model_class="gpt"``,
``--megatron-model-class gpt``) for installations before HybridModel. A per-layer sub-network is
always a GPTModel: HybridModel builds every layer from one config.

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
from typing import Optional

import torch

from megatron_flextron.checkpoint.flextron import (
    TRACKER_FILE,
    converter_model,
    copy_into_parameters,
    views_copied_once,
)
from megatron_flextron.checkpoint.io import copy_tokenizer, dist_save, write_json, write_text_atomic
from megatron_flextron.checkpoint.state import Checkpoint, CheckpointError, state_dtype
from megatron_flextron.config import ModelConfig
from megatron_flextron.elastic.hybrid import layer_pattern

MODEL_CLASSES = ("hybrid", "gpt")
_MOE_ARGS = (
    "moe_ffn_hidden_size",
    "moe_router_topk",
    "moe_router_score_function",
    "moe_router_pre_softmax",
    "moe_router_enable_expert_bias",
    "moe_router_topk_scaling_factor",
    "moe_shared_expert_intermediate_size",
    "moe_shared_expert_gate",
)


def megatron_lm_flags(m: ModelConfig, model_class: str = "gpt") -> list:
    """The Megatron-LM model flags of this architecture (pretrain_gpt.py; a HybridModel's also
    name its layer pattern)."""
    hybrid = model_class == "hybrid"
    flags = [
        "--use-mcore-models",
        "--transformer-impl",
        "local",
        "--ckpt-format",
        "torch_dist",
        "--num-layers",
        2 * m.num_layers if hybrid else m.num_layers,
    ]
    if hybrid:
        flags += ["--hybrid-layer-pattern", layer_pattern(m.num_layers, moe=m.is_moe)]
    flags += [
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
    if m.qk_layernorm:
        flags += ["--qk-layernorm"]
    if not m.tie_embeddings:
        flags += ["--untie-embeddings-and-output-weights"]
    return [str(f) for f in flags + moe_flags(m)]


def moe_flags(m: ModelConfig) -> list:
    """Megatron-LM's mixture-of-experts flags (every layer a mixture: ``--moe-layer-freq 1``)."""
    if not m.is_moe:
        return []
    flags = [
        "--num-experts", m.num_moe_experts,
        "--moe-ffn-hidden-size", m.moe_ffn_hidden_size,
        "--moe-router-topk", m.moe_router_topk,
        "--moe-router-score-function", m.moe_router_score_function,
        "--moe-layer-freq", 1,
    ]  # fmt: skip
    if m.moe_router_pre_softmax:
        flags += ["--moe-router-pre-softmax"]
    if m.moe_router_enable_expert_bias:
        flags += ["--moe-router-enable-expert-bias"]
    if m.moe_router_topk_scaling_factor is not None:
        flags += ["--moe-router-topk-scaling-factor", m.moe_router_topk_scaling_factor]
    if m.moe_shared_expert_intermediate_size:
        flags += ["--moe-shared-expert-intermediate-size", m.moe_shared_expert_intermediate_size]
        if m.moe_shared_expert_gate:
            flags += ["--moe-shared-expert-gate"]
    return flags


def megatron_lm_args(
    m: ModelConfig, dtype: torch.dtype, model_class: str = "gpt"
) -> argparse.Namespace:
    """The ``args`` Megatron-LM stores in a checkpoint's common state (model arguments only), so
    that Megatron-LM (``--use-checkpoint-args``) and ``--loader megatron`` read the architecture
    back."""
    gqa = m.num_query_groups != m.num_attention_heads
    hybrid = {}
    if model_class == "hybrid":
        hybrid["hybrid_layer_pattern"] = layer_pattern(m.num_layers, moe=m.is_moe)
    moe = {}
    if m.is_moe:  # Megatron-LM's names (ModelConfig's, but num_experts)
        moe = {k: v for k, v in m.moe_kwargs().items() if k in _MOE_ARGS}
        moe.update(num_experts=m.num_moe_experts, moe_layer_freq=1)
    return argparse.Namespace(
        **moe,
        **hybrid,
        num_layers=2 * m.num_layers if hybrid else m.num_layers,
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
        qk_layernorm=m.qk_layernorm,
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


def save_megatron(ckpt: Checkpoint, out_dir: str, model_class: Optional[str] = None) -> None:
    """Stream the state into a stock megatron model of its dtype (the only copy held) and save
    it with megatron's dist_checkpointing. ``model_class``: "hybrid" or "gpt"; None: hybrid,
    or gpt for a per-layer sub-network."""
    if model_class is None:
        model_class = "gpt" if ckpt.layer_shapes else "hybrid"
    if model_class not in MODEL_CLASSES:
        raise CheckpointError(f"unknown megatron model class {model_class!r}: {MODEL_CLASSES}")
    if ckpt.layer_shapes and model_class == "hybrid":
        raise CheckpointError(
            "a per-layer sub-network cannot be a megatron HybridModel (it builds every layer "
            "from one config): use --megatron-model-class gpt"
        )
    m = ckpt.model
    if m.qk_layernorm_across_heads:
        raise CheckpointError(
            "qk_layernorm_across_heads=True (OLMoE's q/k norms over the whole q and k "
            "projections) has no stock megatron equivalent: megatron-core's qk_layernorm "
            "normalizes each head on its own; save it as flextron or hf"
        )
    dtype = state_dtype(ckpt.state)  # written as it is held; norms too (Float16Module does)
    model = converter_model(
        m, dtype, elastic=False, layer_shapes=ckpt.layer_shapes, model_class=model_class
    )
    copy_into_parameters(model, ckpt.state)  # and the routers' expert_bias buffers
    shards = os.path.join(out_dir, "release")
    os.makedirs(shards)
    sharded = views_copied_once(model.sharded_state_dict(), model)
    state = {"model": sharded, "checkpoint_version": 3.0, "iteration": 0}
    if not ckpt.layer_shapes:  # Megatron-LM's args describe one layer shape only
        state["args"] = megatron_lm_args(m, dtype, model_class)
    dist_save(state, shards)
    write_json(
        os.path.join(out_dir, "model_config.json"),
        {"model": m.to_dict(), "layer_shapes": ckpt.layer_shapes, **ckpt.metadata},
    )
    if not ckpt.layer_shapes:  # per-layer sizes have no Megatron-LM flags
        flags = " ".join(megatron_lm_flags(m, model_class))
        write_text_atomic(os.path.join(out_dir, "megatron_args.txt"), flags + "\n")
    copy_tokenizer(ckpt.tokenizer_dir, os.path.join(out_dir, "tokenizer"))
    write_text_atomic(os.path.join(out_dir, TRACKER_FILE), "release")
