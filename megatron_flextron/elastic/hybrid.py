"""The elastic model on megatron-core's HybridModel, megatron's model class from 0.19 on.

A dense GPT-3 / Llama block is two HybridModel layers: an attention layer (``*``: input norm,
self-attention) and an MLP layer (``-``: pre-MLP norm, MLP), so a model of N blocks has the
pattern ``*-`` x N, split into pipeline stages at block boundaries with ``|``. The layers are
megatron's TransformerLayer with one of the two halves left as IdentityOp (megatron's own hybrid
spec does the same); here they are ``ElasticTransformerLayer`` with the elastic attention or
MLP, built from the local (CPU-capable) modules of megatron's GPT spec.

Two stand-ins for what megatron's hybrid stack hard-wires to Transformer Engine: the stack's
final norm (``LocalHybridStack``: megatron's ``HybridStack`` builds ``TENorm``, which needs TE)
and Llama-3 RoPE scaling (``HybridModel`` has no ``rope_scaling`` argument:
``ScaledRopeHybridModel`` rebuilds its rotary embedding as GPTModel would). Parameter names are
megatron's hybrid names (``decoder.layers.{2i}.self_attention...``,
``decoder.layers.{2i+1}.mlp...``, ``decoder.final_norm``); ``hybrid_name`` maps a canonical
(GPTModel) name to them (elastic/blocks.py).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from megatron.core import parallel_state
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
from megatron.core.models.hybrid.hybrid_model import HybridModel
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_flextron.config import ModelConfig
from megatron_flextron.elastic.layer import ElasticTransformerLayer
from megatron_flextron.elastic.specs import elastic_layer_spec, stock_layer_spec

ATTENTION, MLP, PIPE = "*", "-", "|"


def layer_pattern(num_blocks: int, pipeline_stages: int = 1) -> str:
    """``*-`` per block; ``|`` between pipeline stages, which hold num_blocks / stages blocks."""
    if num_blocks % pipeline_stages:
        raise ValueError(
            f"{num_blocks} layers cannot be split evenly over {pipeline_stages} pipeline stages"
        )
    per_stage = (ATTENTION + MLP) * (num_blocks // pipeline_stages)
    return PIPE.join([per_stage] * pipeline_stages)


class LocalHybridStack(HybridStack):
    """megatron's HybridStack with its final norm built from a spec (a local norm on CPU)."""

    def __init__(self, config, submodules, *args, final_norm=None, post_layer_norm=True, **kw):
        super().__init__(config, submodules, *args, post_layer_norm=False, **kw)
        self.post_layer_norm = post_layer_norm
        if self.post_process and post_layer_norm:
            self.final_norm = build_module(
                final_norm,
                config=self.config,
                hidden_size=self.config.hidden_size,
                eps=self.config.layernorm_epsilon,
            )


class ScaledRopeHybridModel(HybridModel):
    """HybridModel with Llama-3 RoPE scaling, as GPTModel's ``rope_scaling`` builds it."""

    def __init__(self, *args, rope_scaling_factor: Optional[float] = None, **kwargs):
        super().__init__(*args, **kwargs)
        if rope_scaling_factor is not None:
            self.rotary_pos_emb = RotaryEmbedding(
                kv_channels=self.config.kv_channels,
                rotary_percent=kwargs.get("rotary_percent", 1.0),
                rotary_base=kwargs.get("rotary_base", 10000),
                rope_scaling=True,
                rope_scaling_factor=rope_scaling_factor,
                use_cpu_initialization=self.config.use_cpu_initialization,
                cp_group=self.pg_collection.cp,
            )


def hybrid_stack_spec(
    model_config: ModelConfig, elastic: bool = True, core_attention: Optional[str] = None
) -> ModuleSpec:
    """The stack of attention (``*``) and MLP (``-``) layers: elastic, or megatron's own
    modules (the reference the elastic model must equal)."""
    if elastic:
        layer = elastic_layer_spec(model_config, core_attention or "sdpa")
    else:
        layer = stock_layer_spec(model_config, core_attention or "local")
    sub = layer.submodules
    module = layer.module if elastic else TransformerLayer
    if elastic:
        assert issubclass(module, ElasticTransformerLayer)
    attention = ModuleSpec(
        module=module,
        submodules=TransformerLayerSubmodules(
            input_layernorm=sub.input_layernorm,
            self_attention=sub.self_attention,
            self_attn_bda=sub.self_attn_bda,
        ),
    )
    mlp = ModuleSpec(
        module=module,
        submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=sub.pre_mlp_layernorm, mlp=sub.mlp, mlp_bda=sub.mlp_bda
        ),
    )
    return ModuleSpec(
        module=LocalHybridStack,
        submodules=HybridStackSubmodules(attention_layer=attention, mlp_layer=mlp),
        params={"final_norm": sub.input_layernorm},
    )


def build_hybrid_model(
    model_config: ModelConfig,
    transformer_config,
    *,
    elastic: bool = True,
    core_attention: Optional[str] = None,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
) -> HybridModel:
    """This pipeline stage's HybridModel of ``model_config`` (call after
    ``initialize_model_parallel``). ``transformer_config`` counts blocks (``num_layers`` = N, as
    for GPTModel); the HybridModel gets 2N layers."""
    m = model_config
    blocks = transformer_config.num_layers
    stages = transformer_config.pipeline_model_parallel_size
    config = dataclasses.replace(transformer_config, num_layers=2 * blocks)
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    return ScaledRopeHybridModel(
        config=config,
        hybrid_stack_spec=hybrid_stack_spec(m, elastic, core_attention),
        vocab_size=m.vocab_size,
        max_sequence_length=m.max_position_embeddings,
        hybrid_layer_pattern=layer_pattern(blocks, stages),
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=m.tie_embeddings,
        position_embedding_type=m.position_embedding,
        rotary_base=m.rotary_base,
        rope_scaling_factor=m.rope_scaling_factor,
    )
