"""Layer specs: megatron's local GPT layer spec with the elastic modules slotted in.

Only the module classes change (subclasses of megatron's own), so ``isinstance`` checks,
``sharded_state_dict`` and distributed checkpointing keep working, and the checkpoint layout is
megatron's.
"""

from __future__ import annotations

import dataclasses
import functools

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_flextron.config import ModelConfig
from megatron_flextron.elastic.attention import ElasticSelfAttention
from megatron_flextron.elastic.layer import ElasticTransformerLayer
from megatron_flextron.elastic.linear import ElasticColumnParallelLinear, ElasticRowParallelLinear
from megatron_flextron.elastic.mlp import ElasticMLP
from megatron_flextron.elastic.moe import moe_layer_spec
from megatron_flextron.elastic.norm import LocalNorm
from megatron_flextron.elastic.qk_norm import AcrossHeadsRMSNorm
from megatron_flextron.elastic.sdpa_attention import SDPAttention

CORE_ATTENTION = {"sdpa": SDPAttention, "local": DotProductAttention}


def stock_layer_spec(model: ModelConfig, core_attention: str = "local") -> ModuleSpec:
    """Megatron's own dense layer spec (the reference the elastic model must equal)."""
    spec = get_gpt_layer_local_spec(
        normalization=model.normalization,
        qk_layernorm=model.qk_layernorm,
        num_experts=model.num_moe_experts,
        moe_grouped_gemm=False,
    )
    return _with_core_attention(spec, core_attention)


def elastic_layer_spec(
    model: ModelConfig, core_attention: str = "sdpa", expert_placement: str = "contiguous"
) -> ModuleSpec:
    """The layer spec of an elastic GPT: elastic linears, MLP, attention and skippable layers.

    ``core_attention`` is "sdpa" (default: head counts follow the tensors, flash kernels on GPU)
    or "local" (megatron's DotProductAttention, which works only at full head count);
    ``expert_placement`` places an MoE's experts over EP ranks (elastic/expert_placement.py).
    """
    stock = stock_layer_spec(model, core_attention)
    qk_norms = {"q_layernorm": LocalNorm, "k_layernorm": LocalNorm} if model.qk_layernorm else {}
    if model.qk_layernorm_across_heads:  # OLMoE: over the whole q and k projections
        qk_norms = {
            "q_layernorm": functools.partial(AcrossHeadsRMSNorm, query=True),
            "k_layernorm": functools.partial(AcrossHeadsRMSNorm, query=False),
        }
    attention = replace_in_spec(
        stock.submodules.self_attention,
        module=ElasticSelfAttention,
        linear_qkv=ElasticColumnParallelLinear,
        linear_proj=ElasticRowParallelLinear,
        **qk_norms,
    )
    if model.is_moe:
        mlp = moe_layer_spec(elastic=True, expert_placement=expert_placement)
    else:
        mlp = replace_in_spec(
            stock.submodules.mlp,
            module=ElasticMLP,
            linear_fc1=ElasticColumnParallelLinear,
            linear_fc2=ElasticRowParallelLinear,
        )
    return replace_in_spec(
        stock,
        module=ElasticTransformerLayer,
        self_attention=attention,
        mlp=mlp,
        input_layernorm=LocalNorm,  # norms that also run under sequence parallelism
        pre_mlp_layernorm=LocalNorm,
    )


def replace_in_spec(spec: ModuleSpec, module=None, **submodules) -> ModuleSpec:
    """A copy of ``spec`` with another module class and/or some submodules replaced.

    megatron-core 0.19 gives a layer's MLP as ``partial(MLP.as_mlp_submodule, submodules=...)``
    (a builder, not a ModuleSpec): the copy is the same builder on ``module``'s classmethod.
    """
    if isinstance(spec, functools.partial):
        owner = getattr(spec.func, "__self__", None)
        keywords = dict(spec.keywords)
        keywords["submodules"] = dataclasses.replace(keywords["submodules"], **submodules)
        builder = getattr(module or owner, spec.func.__name__)
        return functools.partial(builder, *spec.args, **keywords)
    return dataclasses.replace(
        spec,
        module=module or spec.module,
        submodules=dataclasses.replace(spec.submodules, **submodules),
    )


def _with_core_attention(spec: ModuleSpec, core_attention: str) -> ModuleSpec:
    if core_attention not in CORE_ATTENTION:
        raise ValueError(
            f"unknown core attention {core_attention!r}; expected {list(CORE_ATTENTION)}"
        )
    attention = replace_in_spec(
        spec.submodules.self_attention, core_attention=CORE_ATTENTION[core_attention]
    )
    return replace_in_spec(spec, self_attention=attention)
