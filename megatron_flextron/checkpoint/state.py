"""The format-independent model every loader produces and every saver consumes.

State names are megatron-core GPTModel names (local spec) with global layer numbers, tensors are
full (TP=1) and in canonical unit order: loaders and savers meet here, nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from megatron_flextron.config import ElasticConfig, ModelConfig


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match its config."""


@dataclass
class Checkpoint:
    model: ModelConfig
    state: Dict[str, torch.Tensor]
    tokenizer_dir: Optional[str] = None  # tokenizer files to copy next to every output
    elastic: Optional[ElasticConfig] = None
    metadata: dict = field(default_factory=dict)  # e.g. how the canonical order was made
    # a heterogeneous dense model: (MLP width, query heads) per layer; None = as in ``model``
    layer_shapes: Optional[List[Tuple[int, int]]] = None

    def validate(self) -> None:
        """Every expected tensor present with its expected shape, nothing unexpected."""
        expected = expected_shapes(self.model, self.layer_shapes)
        missing = sorted(set(expected) - set(self.state))
        unexpected = sorted(set(self.state) - set(expected))
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint does not match its config: missing {missing[:5]}"
                f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            )
        for name, shape in expected.items():
            if tuple(self.state[name].shape) != shape:
                raise CheckpointError(
                    f"{name} has shape {tuple(self.state[name].shape)}, the config implies {shape}"
                )


def expected_shapes(
    m: ModelConfig, layer_shapes: Optional[List[Tuple[int, int]]] = None
) -> Dict[str, Tuple[int, ...]]:
    """Canonical parameter names and shapes implied by a model config (and per-layer sizes)."""
    h, d = m.hidden_size, m.kv_channels
    blocks = 2 if m.gated else 1
    norm = ["weight"] + (["bias"] if m.normalization == "LayerNorm" else [])
    shapes = {"embedding.word_embeddings.weight": (m.vocab_size, h)}
    if m.position_embedding == "learned_absolute":
        shapes["embedding.position_embeddings.weight"] = (m.max_position_embeddings, h)
    for i in range(m.num_layers):
        ffn, heads = layer_shapes[i] if layer_shapes else (m.ffn_hidden_size, m.num_attention_heads)
        groups = m.num_query_groups if m.is_gqa else heads
        qkv = (heads + 2 * groups) * d
        p = f"decoder.layers.{i}."
        for n in norm:
            shapes[f"{p}input_layernorm.{n}"] = (h,)
            shapes[f"{p}pre_mlp_layernorm.{n}"] = (h,)
        shapes[f"{p}self_attention.linear_qkv.weight"] = (qkv, h)
        shapes[f"{p}self_attention.linear_proj.weight"] = (h, heads * d)
        shapes[f"{p}mlp.linear_fc1.weight"] = (blocks * ffn, h)
        shapes[f"{p}mlp.linear_fc2.weight"] = (h, ffn)
        if m.has_qkv_bias:
            shapes[f"{p}self_attention.linear_qkv.bias"] = (qkv,)
        if m.add_bias_linear:
            shapes[f"{p}self_attention.linear_proj.bias"] = (h,)
            shapes[f"{p}mlp.linear_fc1.bias"] = (blocks * ffn,)
            shapes[f"{p}mlp.linear_fc2.bias"] = (h,)
    for n in norm:
        shapes[f"decoder.final_layernorm.{n}"] = (h,)
    if not m.tie_embeddings:
        shapes["output_layer.weight"] = (m.vocab_size, h)
    return shapes
