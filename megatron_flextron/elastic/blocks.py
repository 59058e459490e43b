"""Transformer blocks of an elastic model, whatever megatron class holds them.

A block is what the elastic axes are defined on: attention, then MLP, with a global 0-based
``index``. In a GPTModel it is one TransformerLayer; in a HybridModel (elastic/hybrid.py) it is
an attention layer (``*``) and the MLP layer (``-``) after it. Everything that walks the model's
layers (sub-networks, soft architectures, token routing, ranking, latency) walks blocks, so it
works on both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List

import torch

_BLOCK_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_ATTENTION_PARTS = ("input_layernorm.", "self_attention.", "self_attn_bda.")


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel / HybridModel inside DDP / Float16Module wrappers."""
    while not hasattr(model, "decoder") and hasattr(model, "module"):
        model = model.module
    return model


def is_hybrid(model: torch.nn.Module) -> bool:
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    return isinstance(unwrap_model(model), HybridModel)


def num_blocks(model: torch.nn.Module) -> int:
    """The model's number of blocks over all pipeline stages (a HybridModel has two layers each)."""
    inner = unwrap_model(model)
    return inner.config.num_layers // (2 if is_hybrid(inner) else 1)


@dataclass(frozen=True)
class Block:
    index: int  # global, 0-based
    attention_layer: torch.nn.Module
    mlp_layer: torch.nn.Module

    @property
    def layer_number(self) -> int:  # 1-based, as megatron numbers layers
        return self.index + 1

    @property
    def self_attention(self):
        return self.attention_layer.self_attention

    @property
    def mlp(self):
        return self.mlp_layer.mlp

    @property
    def layers(self) -> List[torch.nn.Module]:
        if self.attention_layer is self.mlp_layer:
            return [self.attention_layer]
        return [self.attention_layer, self.mlp_layer]

    def set_skipped(self, skipped: bool) -> None:
        for layer in self.layers:
            layer.set_skipped(skipped)

    def set_keep(self, keep) -> None:
        """Gate the whole block: x + keep (block(x) - x), as one GPTModel layer is gated."""
        if self.attention_layer is self.mlp_layer:
            self.attention_layer.set_keep(keep)
            return
        self.attention_layer.set_keep(None)
        self.attention_layer.record_input(keep is not None)
        self.mlp_layer.set_keep(keep, gate_from=None if keep is None else self.attention_layer)


def transformer_blocks(model: torch.nn.Module) -> List[Block]:
    """This pipeline stage's blocks, in order."""
    inner = unwrap_model(model)
    layers = list(inner.decoder.layers)
    if not is_hybrid(inner):
        return [Block(layer.layer_number - 1, layer, layer) for layer in layers]
    if len(layers) % 2:
        raise ValueError(f"a stage of {len(layers)} hybrid layers does not hold whole blocks")
    blocks = []
    for attention, mlp in zip(layers[0::2], layers[1::2]):
        if attention.layer_number % 2 != 1 or mlp.layer_number != attention.layer_number + 1:
            raise ValueError(
                f"hybrid layers {attention.layer_number} and {mlp.layer_number} are not one "
                "attention (*) and MLP (-) block: the pattern must be *- per block"
            )
        blocks.append(Block((attention.layer_number - 1) // 2, attention, mlp))
    return blocks


def hybrid_name(canonical: str) -> str:
    """The HybridModel name of a canonical (GPTModel, global layer number) parameter name."""
    match = _BLOCK_LAYER.match(canonical)
    if match:
        block, rest = int(match.group(1)), match.group(2)
        layer = 2 * block + (0 if rest.startswith(_ATTENTION_PARTS) else 1)
        return f"decoder.layers.{layer}.{rest}"
    return canonical.replace("decoder.final_layernorm.", "decoder.final_norm.")


def canonical_name(hybrid: str) -> str:
    """The canonical (GPTModel) name of a HybridModel parameter name (global layer numbers)."""
    match = _BLOCK_LAYER.match(hybrid)
    if match:
        return f"decoder.layers.{int(match.group(1)) // 2}.{match.group(2)}"
    return hybrid.replace("decoder.final_norm.", "decoder.final_layernorm.")
