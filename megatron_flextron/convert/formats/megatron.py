"""A plain Megatron-Core GPT checkpoint (torch_dist) of a dense model, for stock Megatron.

Stock Megatron reshards it at load to any TP/PP (contiguous splits: a dense model has no nested
order to keep). ``megatron_args.txt`` lists the Megatron-LM model flags that match it. A
heterogeneous sub-network (per-layer sizes) is written from megatron's own TransformerLayers, each
built with its layer's config; ``model_config.json`` records the sizes as ``layer_shapes`` and
``elastic.model.build_heterogeneous_gpt_model`` rebuilds the model that loads it.
"""

from __future__ import annotations

import os

from megatron_flextron.config import ModelConfig
from megatron_flextron.checkpoint.state import Checkpoint
from megatron_flextron.checkpoint.flextron import TRACKER_FILE, load_state_strict
from megatron_flextron.checkpoint.io import copy_tokenizer, write_json, write_text_atomic


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
    if m.activation == "swiglu":
        flags += ["--swiglu"]
    elif m.activation == "gelu_tanh":
        flags += ["--openai-gelu"]
    if not m.add_bias_linear:
        flags += ["--disable-bias-linear"]
    if not m.tie_embeddings:
        flags += ["--untie-embeddings-and-output-weights"]
    return [str(f) for f in flags]


def save_megatron(ckpt: Checkpoint, out_dir: str) -> None:
    from megatron.core import dist_checkpointing

    from megatron_flextron.elastic import build_gpt_model
    from megatron_flextron.elastic.model import build_heterogeneous_gpt_model

    m = ckpt.model
    if ckpt.layer_shapes:
        model = build_heterogeneous_gpt_model(m, ckpt.layer_shapes)
    else:
        model = build_gpt_model(
            m, m.transformer_config(), elastic=False, pre_process=True, post_process=True
        )
    load_state_strict(model, ckpt.state)
    shards = os.path.join(out_dir, "release")
    os.makedirs(shards)
    dist_checkpointing.save(model.sharded_state_dict(), shards)
    write_json(
        os.path.join(out_dir, "model_config.json"),
        {"model": m.to_dict(), "layer_shapes": ckpt.layer_shapes, **ckpt.metadata},
    )
    if not ckpt.layer_shapes:  # per-layer sizes have no Megatron-LM flags
        flags = " ".join(megatron_lm_flags(m))
        write_text_atomic(os.path.join(out_dir, "megatron_args.txt"), flags + "\n")
    copy_tokenizer(ckpt.tokenizer_dir, os.path.join(out_dir, "tokenizer"))
    write_text_atomic(os.path.join(out_dir, TRACKER_FILE), "release")
