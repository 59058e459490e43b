"""Build the models: the elastic model (megatron-core's HybridModel, elastic/hybrid.py), and
megatron-core's GPTModel: elastic (our layer spec), dense (megatron's), or dense with per-layer
sizes (an exported heterogeneous sub-network)."""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_flextron.config import ModelConfig
from megatron_flextron.elastic.specs import elastic_layer_spec, stock_layer_spec


def build_elastic_model(
    model_config: ModelConfig,
    transformer_config,
    *,
    core_attention: Optional[str] = None,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    expert_placement: str = "contiguous",
):
    """This pipeline stage's elastic model: megatron-core's HybridModel, ``*-`` per block
    (call after ``initialize_model_parallel``). Its checkpoints have the elastic GPTModel's
    layout, and it computes the elastic GPTModel's function. ``expert_placement``: how an
    MoE's ranked experts sit over the EP ranks (elastic/expert_placement.py)."""
    from megatron_flextron.elastic.hybrid import build_hybrid_model

    return build_hybrid_model(
        model_config,
        transformer_config,
        elastic=True,
        core_attention=core_attention,
        pre_process=pre_process,
        post_process=post_process,
        expert_placement=expert_placement,
    )


def build_gpt_model(
    model_config: ModelConfig,
    transformer_config,
    *,
    elastic: bool = True,
    core_attention: Optional[str] = None,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
) -> GPTModel:
    """This pipeline stage's GPTModel. Call after ``initialize_model_parallel``.

    ``transformer_config`` is usually ``model_config.transformer_config(...)``; a dense model of a
    smaller shape (a hand-sliced reference, an export) passes its own.
    """
    if elastic:
        spec = elastic_layer_spec(model_config, core_attention or "sdpa")
    else:
        spec = stock_layer_spec(model_config, core_attention or "local")
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    return GPTModel(
        config=transformer_config,
        transformer_layer_spec=spec,
        pre_process=pre_process,
        post_process=post_process,
        **model_config.gpt_model_kwargs(),
    )


class ShapedTransformerLayer(TransformerLayer):
    """Megatron's TransformerLayer built with a config of its own (its MLP width, head count)."""

    def __init__(self, config, submodules, *args, layer_config=None, **kwargs):
        super().__init__(layer_config or config, submodules, *args, **kwargs)


def layer_transformer_config(model_config: ModelConfig, ffn: int, heads: int, **kwargs):
    """The TransformerConfig of one dense layer with ``ffn`` neurons and ``heads`` query heads."""
    m = model_config
    return m.transformer_config(
        ffn_hidden_size=ffn,
        num_attention_heads=heads,
        num_query_groups=m.num_query_groups if m.is_gqa else heads,
        kv_channels=m.kv_channels,
        **kwargs,
    )


def build_heterogeneous_gpt_model(
    model_config: ModelConfig, layer_shapes: List[Tuple[int, int]], **config_kwargs
) -> GPTModel:
    """A dense GPTModel (TP=1, one stage) whose layer i has ``layer_shapes[i]`` = (ffn, heads)."""
    base = stock_layer_spec(model_config)
    specs = [
        dataclasses.replace(
            base,
            module=ShapedTransformerLayer,
            params={
                "layer_config": layer_transformer_config(
                    model_config, ffn, heads, num_layers=len(layer_shapes), **config_kwargs
                )
            },
        )
        for ffn, heads in layer_shapes
    ]
    block = TransformerBlockSubmodules(
        layer_specs=specs, layer_norm=base.submodules.input_layernorm
    )
    # layers of different shapes cannot be stacked under one checkpoint key: one key per layer
    block_config = model_config.transformer_config(
        num_layers=len(layer_shapes), hetereogenous_dist_checkpoint=True, **config_kwargs
    )
    return GPTModel(
        config=block_config,
        transformer_layer_spec=block,
        pre_process=True,
        post_process=True,
        **model_config.gpt_model_kwargs(),
    )
