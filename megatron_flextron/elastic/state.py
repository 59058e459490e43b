"""What an elastic model runs, set in one place: one mode at a time, restored afterwards.

Modes, each an explicit API of the elastic modules (no hooks, nothing written into __dict__):

- sliced sub-network: ``ElasticMLP.set_active_width``, ``ElasticSelfAttention.set_active_heads``,
  ``ElasticTransformerLayer.set_skipped`` (all three through ``set_subnetwork``);
- soft architecture (probability-weighted masks, a router trained with the model):
  ``ElasticRowParallelLinear.set_input_scale`` of fc2 and of the output projection,
  ``ElasticTransformerLayer.set_keep`` (through ``set_soft_architecture``);
- token routing (every token's MLP width): ``ElasticMLP.set_token_routing``.

``elastic_state(model, ...)`` sets one mode for a block and leaves the full model behind (also on
an error); ``reset_elastic_state`` clears every mode; ``run_subnetwork`` clears the others and
activates a sub-network.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

import torch

from megatron_flextron.config import ElasticConfig, ModelConfig
from megatron_flextron.elastic.blocks import transformer_blocks
from megatron_flextron.elastic.moe import ElasticMoELayer
from megatron_flextron.elastic.soft_architecture import (
    MoEProbabilities,
    clear_soft_architecture,
    set_soft_architecture,
)
from megatron_flextron.elastic.subnetwork import Subnetwork, set_subnetwork


@dataclass(frozen=True)
class SoftArchitecture:
    """Per-layer choice probabilities (see elastic/soft_architecture.py): p_mlp [L, n_mlp],
    p_heads [L, n_heads] over the choices (largest first), p_keep [L] or None."""

    p_mlp: Optional[torch.Tensor]
    p_heads: torch.Tensor
    mlp_choices: Sequence[int]
    head_choices: Sequence[int]
    p_keep: Optional[torch.Tensor] = None
    moe: Optional[MoEProbabilities] = None  # a mixture of experts' choices (p_mlp: None)


def clear_token_routing(model: torch.nn.Module) -> None:
    for block in transformer_blocks(model):
        if not isinstance(block.mlp, ElasticMoELayer):  # experts are routed by their router
            block.mlp.set_token_routing(None)


def set_token_routing(model: torch.nn.Module, routings: Sequence[Optional[Callable]]) -> None:
    """One routing callable (or None) per local layer, in this stage's layer order."""
    layers = transformer_blocks(model)
    if len(routings) != len(layers):
        raise ValueError(f"{len(routings)} token routings for {len(layers)} local layers")
    for layer, routing in zip(layers, routings):
        layer.mlp.set_token_routing(routing)


def reset_elastic_state(model: torch.nn.Module) -> None:
    """The full model: every layer at full width and running, no masks, no routing."""
    clear_soft_architecture(model)
    clear_token_routing(model)
    for layer in transformer_blocks(model):
        layer.set_skipped(False)
        if isinstance(layer.mlp, ElasticMoELayer):
            layer.mlp.set_active()
        else:
            layer.mlp.set_active_width(None)
        layer.self_attention.set_active_heads(None)


def run_subnetwork(
    model: torch.nn.Module,
    spec: Union[None, str, dict, Subnetwork],
    model_config: ModelConfig,
    elastic: ElasticConfig,
) -> Subnetwork:
    """The sliced sub-network ``spec`` (None: the full model), nothing else active."""
    clear_soft_architecture(model)
    clear_token_routing(model)
    return set_subnetwork(model, spec, model_config, elastic)


@contextlib.contextmanager
def elastic_state(
    model: torch.nn.Module,
    model_config: Optional[ModelConfig] = None,
    elastic: Optional[ElasticConfig] = None,
    *,
    subnetwork: Union[None, str, dict, Subnetwork] = None,
    soft: Optional[SoftArchitecture] = None,
    token_routing: Optional[Sequence[Optional[Callable]]] = None,
) -> Iterator[Optional[Subnetwork]]:
    """Run one mode inside the block (none given: the full model); yields the sub-network when
    one is given (``model_config`` and ``elastic`` validate it). The full model afterwards."""
    if sum(x is not None for x in (subnetwork, soft, token_routing)) > 1:
        raise ValueError("a sub-network, a soft architecture and token routing exclude each other")
    reset_elastic_state(model)
    try:
        subnet = None
        if subnetwork is not None:
            subnet = set_subnetwork(model, subnetwork, model_config, elastic)
        elif soft is not None:
            set_soft_architecture(
                model,
                soft.p_mlp,
                soft.p_heads,
                soft.mlp_choices,
                soft.head_choices,
                soft.p_keep,
                soft.moe,
            )
        elif token_routing is not None:
            set_token_routing(model, token_routing)
        yield subnet
    finally:
        reset_elastic_state(model)
