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
``LocalHybridModel`` rebuilds its rotary embedding as GPTModel would). Parameter names are
megatron's hybrid names (``decoder.layers.{2i}.self_attention...``,
``decoder.layers.{2i+1}.mlp...``, ``decoder.final_norm``); ``hybrid_name`` maps a canonical
(GPTModel) name to them (elastic/blocks.py).
"""

from __future__ import annotations

import copy
from typing import Optional

from megatron.core import parallel_state
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
from megatron.core.models.hybrid.hybrid_model import HybridModel
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.transformer.utils import sharded_state_dict_default
from megatron.core.utils import WrappedTensor, make_viewless_tensor

from megatron_flextron.config import ModelConfig
from megatron_flextron.elastic.decode_step import decode_stack, step_covered
from megatron_flextron.elastic.layer import ElasticTransformerLayer
from megatron_flextron.elastic.specs import elastic_layer_spec, stock_layer_spec

ATTENTION, MLP, MOE, PIPE = "*", "-", "E", "|"


def layer_pattern(num_blocks: int, pipeline_stages: int = 1, moe: bool = False) -> str:
    """``*-`` per block (``*E`` for a mixture of experts); ``|`` between pipeline stages, which
    hold num_blocks / stages blocks."""
    if num_blocks % pipeline_stages:
        raise ValueError(
            f"{num_blocks} layers cannot be split evenly over {pipeline_stages} pipeline stages"
        )
    per_stage = (ATTENTION + (MOE if moe else MLP)) * (num_blocks // pipeline_stages)
    return PIPE.join([per_stage] * pipeline_stages)


class LocalHybridStack(HybridStack):
    """megatron's HybridStack with its final norm built from a spec (a local norm on CPU).

    ``canonical_layout``: checkpoints in GPTModel's layout (block i's tensors stacked at offset i
    under ``decoder.layers.<name>``, the final norm as ``final_layernorm``), so a flextron or
    training checkpoint is the same files whichever class wrote it; without it, megatron's
    HybridStack layout (one key per hybrid layer), what Megatron-LM resumes."""

    def __init__(
        self,
        config,
        submodules,
        *args,
        final_norm=None,
        post_layer_norm=True,
        canonical_layout=False,
        **kw,
    ):
        super().__init__(config, submodules, *args, post_layer_norm=False, **kw)
        self.canonical_layout = canonical_layout
        self.post_layer_norm = post_layer_norm
        if self.post_process and post_layer_norm:
            self.final_norm = build_module(
                final_norm,
                config=self.config,
                hidden_size=self.config.hidden_size,
                eps=self.config.layernorm_epsilon,
            )
        self.direct_decode = True  # decode-only CPU steps as direct operations (decode_step.py)

    def forward(self, hidden_states, attention_mask, inference_context=None,
                rotary_pos_emb=None, *, inference_params=None, packed_seq_params=None,
                padding_mask=None):
        """A decode-only step of CPU serving: elastic/decode_step.py; else megatron's."""
        cfg = self.config
        if (self.direct_decode and inference_params is None and packed_seq_params is None
                and not (cfg.fp8 or cfg.fp4)
                and step_covered(self, inference_context, rotary_pos_emb)):
            if not self.pre_process:
                hidden_states = self.input_tensor
            if isinstance(hidden_states, WrappedTensor):
                hidden_states = hidden_states.unwrap()
            x = decode_stack(self, hidden_states, inference_context, rotary_pos_emb,
                             attention_mask=attention_mask, padding_mask=padding_mask)
            if self.post_process and self.post_layer_norm:
                x = self.final_norm(x)
            return make_viewless_tensor(inp=x, requires_grad=x.requires_grad, keep_graph=True)
        return super().forward(hidden_states, attention_mask, inference_context, rotary_pos_emb,
                               inference_params=inference_params,
                               packed_seq_params=packed_seq_params, padding_mask=padding_mask)


    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        if not self.canonical_layout:
            return super().sharded_state_dict(prefix, sharded_offsets, metadata)
        # as TransformerBlock.sharded_state_dict lays out a homogeneous GPT decoder
        out, layers, blocks = {}, f"{prefix}layers.", self.config.num_layers // 2
        for local, layer in enumerate(self.layers):
            local_prefix = f"{layers}{local}."
            block = (layer.layer_number - 1) // 2
            layer_dict = layer.sharded_state_dict(local_prefix, [(0, block, blocks)], metadata)
            replace_prefix_for_sharding(layer_dict, local_prefix, layers)
            out.update(layer_dict)
        for name, module in self.named_children():
            if module is not self.layers:
                module_dict = sharded_state_dict_default(
                    module, f"{prefix}{name}.", sharded_offsets, metadata, tp_group=self.tp_group
                )
                if name == "final_norm":
                    replace_prefix_for_sharding(
                        module_dict, f"{prefix}final_norm.", f"{prefix}final_layernorm."
                    )
                out.update(module_dict)
        return out


class LocalHybridModel(HybridModel):
    """HybridModel with Llama-3 RoPE scaling, as GPTModel's ``rope_scaling`` builds it; in the
    canonical layout its checkpoints also leave out the output layer's (empty) extra state, as
    GPTModel's do."""

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

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        out = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if getattr(self.decoder, "canonical_layout", False):
            extra = out.pop(f"{prefix}output_layer._extra_state", None)
            assert extra is None or not extra.data, "the output layer's extra state is not empty"
        return out


def hybrid_stack_spec(
    model_config: ModelConfig,
    elastic: bool = True,
    core_attention: Optional[str] = None,
    canonical_layout: Optional[bool] = None,
    expert_placement: str = "contiguous",
) -> ModuleSpec:
    """The stack of attention (``*``) and MLP (``-``) layers: elastic, or megatron's own
    modules (the reference the elastic model must equal). Checkpoints in GPTModel's layout for
    the elastic model, megatron's hybrid layout for the stock one, unless told otherwise."""
    if canonical_layout is None:
        canonical_layout = elastic
    if expert_placement != "contiguous" and not elastic:
        raise ValueError(f"expert placement {expert_placement!r} needs the elastic model")
    if elastic:
        layer = elastic_layer_spec(model_config, core_attention or "sdpa", expert_placement)
    else:
        layer = stock_layer_spec(model_config, core_attention or "local")
    sub = layer.submodules
    module = layer.module if elastic else TransformerLayer
    if elastic:
        assert issubclass(module, ElasticTransformerLayer)
    # the norms are stored under Transformer Engine's fused names, as megatron's local GPT
    # spec and TE hybrid checkpoints store them
    keys = sub.sharded_state_dict_keys_map
    attention = ModuleSpec(
        module=module,
        submodules=TransformerLayerSubmodules(
            input_layernorm=sub.input_layernorm,
            self_attention=sub.self_attention,
            self_attn_bda=sub.self_attn_bda,
            sharded_state_dict_keys_map=keys,
        ),
    )
    mlp = ModuleSpec(
        module=module,
        submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=sub.pre_mlp_layernorm,
            mlp=sub.mlp,
            mlp_bda=sub.mlp_bda,
            sharded_state_dict_keys_map=keys,
        ),
    )
    # a mixture of experts (the layer spec's MLP is then megatron's MoE) is an ``E`` layer
    layers = {"moe_layer" if model_config.is_moe else "mlp_layer": mlp}
    return ModuleSpec(
        module=LocalHybridStack,
        submodules=HybridStackSubmodules(attention_layer=attention, **layers),
        params={"final_norm": sub.input_layernorm, "canonical_layout": canonical_layout},
    )


def build_hybrid_model(
    model_config: ModelConfig,
    transformer_config,
    *,
    elastic: bool = True,
    core_attention: Optional[str] = None,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    canonical_layout: Optional[bool] = None,
    expert_placement: str = "contiguous",
) -> HybridModel:
    """This pipeline stage's HybridModel of ``model_config`` (call after
    ``initialize_model_parallel``). ``transformer_config`` counts blocks (``num_layers`` = N, as
    for GPTModel); the HybridModel gets 2N layers. ``expert_placement``: how an MoE's ranked
    experts sit over the EP ranks (elastic/expert_placement.py; elastic models only)."""
    m = model_config
    blocks = transformer_config.num_layers
    stages = transformer_config.pipeline_model_parallel_size
    config = copy.copy(transformer_config)  # validated already (and again would refuse a
    config.num_layers = 2 * blocks  # top-1 renormalized router: see Runtime.transformer_config)
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    return LocalHybridModel(
        config=config,
        hybrid_stack_spec=hybrid_stack_spec(
            m, elastic, core_attention, canonical_layout, expert_placement
        ),
        vocab_size=m.vocab_size,
        max_sequence_length=m.max_position_embeddings,
        hybrid_layer_pattern=layer_pattern(blocks, stages, m.is_moe),
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=m.tie_embeddings,
        position_embedding_type=m.position_embedding,
        rotary_base=m.rotary_base,
        rope_scaling_factor=m.rope_scaling_factor,
    )
