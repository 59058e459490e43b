"""Configuration dataclasses: the dense architecture, its elastic choices, how it runs.

``ModelConfig`` describes one GPT-3-style or Llama-style architecture (stored in checkpoints) and
gives the megatron-core ``TransformerConfig`` fields and ``GPTModel`` arguments of it.
``ElasticConfig`` lists the widths each elastic axis may take (stored too). ``Runtime`` is the
parallel layout, precision and device of one run; ``Runtime.transformer_config(model)`` composes
them into megatron's config. Nothing is injected into megatron's config.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import List, Literal, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

Family = Literal["gpt3", "llama"]
Activation = Literal["gelu", "gelu_tanh", "swiglu"]

# What distinguishes the two families; every field can still be overridden on ModelConfig.
_FAMILY_DEFAULTS = {
    "gpt3": dict(
        normalization="LayerNorm",
        activation="gelu",
        position_embedding="learned_absolute",
        add_bias_linear=True,
        tie_embeddings=True,
    ),
    "llama": dict(
        normalization="RMSNorm",
        activation="swiglu",
        position_embedding="rope",
        add_bias_linear=False,
        tie_embeddings=False,
    ),
}


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


@dataclass
class ModelConfig:
    """A dense GPT architecture (the full-size network of an elastic model)."""

    family: Family
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    vocab_size: int
    max_position_embeddings: int
    num_query_groups: Optional[int] = None  # None: MHA (one KV head per query head)
    kv_channels: Optional[int] = None  # None: hidden_size // num_attention_heads
    normalization: Optional[str] = None  # the fields set to None take the family default
    activation: Optional[Activation] = None
    position_embedding: Optional[str] = None
    add_bias_linear: Optional[bool] = None
    tie_embeddings: Optional[bool] = None
    norm_epsilon: float = 1e-5
    rotary_base: float = 10000.0
    init_method_std: float = 0.02
    add_qkv_bias: bool = False  # a bias on the QKV projection only (Qwen2); add_bias_linear: all
    # Llama 3.x RoPE scaling (megatron-core's rope_scaling: low/high frequency factors 1 and 4,
    # original context 8192); None: no scaling
    rope_scaling_factor: Optional[float] = None
    # a norm (the model's normalization) over each query and key head after the QKV split,
    # before RoPE, shared by every head (Qwen3; megatron's q_layernorm / k_layernorm)
    qk_layernorm: bool = False
    # with qk_layernorm: each norm spans a token's whole q (heads x d) or k (groups x d) projection,
    # one weight per channel (OLMoE). megatron-core has no such field; Megatron-Bridge keeps
    # qk_layernorm=True and swaps the attention class (OLMoESelfAttention), which is what the
    # elastic spec does when this is set (elastic/qk_norm.py)
    qk_layernorm_across_heads: bool = False
    # mixture of experts (megatron's names): None = a dense MLP in every layer, else every layer's
    # MLP is a mixture of ``num_moe_experts`` experts of ``moe_ffn_hidden_size`` neurons
    num_moe_experts: Optional[int] = None
    moe_ffn_hidden_size: Optional[int] = None
    moe_router_topk: int = 2
    moe_router_score_function: str = "softmax"  # or "sigmoid"
    # softmax over all experts, then top-k without renormalizing (Qwen2-MoE, OLMoE); False: the
    # top-k weights sum to one (Mixtral, Qwen3-MoE norm_topk_prob); sigmoid always renormalizes
    moe_router_pre_softmax: bool = False
    moe_router_enable_expert_bias: bool = False  # a routing-only bias per expert (sigmoid)
    moe_router_topk_scaling_factor: Optional[float] = None
    moe_shared_expert_intermediate_size: Optional[int] = None  # one shared expert of this width
    moe_shared_expert_gate: bool = False  # its output scaled by sigmoid(x . gate) (Qwen2-MoE)

    def __post_init__(self):
        if self.family not in _FAMILY_DEFAULTS:
            raise ValueError(f"unknown model family {self.family!r}; expected gpt3 or llama")
        for key, value in _FAMILY_DEFAULTS[self.family].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.kv_channels is None:
            self.kv_channels = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_query_groups={self.num_query_groups}"
            )
        if self.qk_layernorm_across_heads and not (
            self.qk_layernorm and self.normalization == "RMSNorm"
        ):
            raise ValueError(
                "qk_layernorm_across_heads needs qk_layernorm=True and RMSNorm (OLMoE's q/k "
                f"norms); got qk_layernorm={self.qk_layernorm}, {self.normalization}"
            )
        if self.is_moe:
            if self.moe_ffn_hidden_size is None:
                self.moe_ffn_hidden_size = self.ffn_hidden_size
            if self.moe_router_score_function not in ("softmax", "sigmoid"):
                raise ValueError(
                    f"moe_router_score_function={self.moe_router_score_function!r}: softmax or "
                    "sigmoid"
                )
            if not 1 <= self.moe_router_topk <= self.num_moe_experts:
                raise ValueError(
                    f"moe_router_topk={self.moe_router_topk} must be in [1, "
                    f"num_moe_experts={self.num_moe_experts}]"
                )

    @property
    def is_moe(self) -> bool:
        """True when every layer's MLP is a mixture of experts."""
        return self.num_moe_experts is not None

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    @property
    def is_gqa(self) -> bool:
        """True when query heads share KV heads (elastic heads are trimmed inside each group)."""
        return self.heads_per_group > 1

    @property
    def has_qkv_bias(self) -> bool:
        return bool(self.add_bias_linear or self.add_qkv_bias)

    @property
    def gated(self) -> bool:
        return self.activation == "swiglu"

    def head_unit(self, tensor_model_parallel_size: int = 1) -> int:
        """Head counts are multiples of this: every KV group keeps as many query heads (GQA),
        or every TP rank as many whole heads (MHA)."""
        return self.num_query_groups if self.is_gqa else tensor_model_parallel_size

    def architecture_kwargs(self) -> dict:
        """The megatron TransformerConfig fields that describe this architecture (nothing about
        where or how it runs: that is ``Runtime``)."""
        activation_func = {"gelu": F.gelu, "gelu_tanh": _gelu_tanh, "swiglu": F.silu}[
            self.activation
        ]
        return dict(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            kv_channels=self.kv_channels,
            normalization=self.normalization,
            layernorm_epsilon=self.norm_epsilon,
            activation_func=activation_func,
            gated_linear_unit=self.gated,
            add_bias_linear=self.add_bias_linear,
            add_qkv_bias=self.add_qkv_bias,
            qk_layernorm=self.qk_layernorm,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            init_method_std=self.init_method_std,
            **self.moe_kwargs(),
        )

    def moe_kwargs(self) -> dict:
        """megatron's MoE fields: SequentialMLP experts, the all-gather token dispatcher (it runs
        on CPU and gloo), no token dropping, no auxiliary loss unless the trainer asks."""
        if not self.is_moe:
            return {}
        return dict(
            num_moe_experts=self.num_moe_experts,
            moe_ffn_hidden_size=self.moe_ffn_hidden_size,
            moe_router_topk=self.moe_router_topk,
            moe_router_score_function=self.moe_router_score_function,
            moe_router_pre_softmax=self.moe_router_pre_softmax,
            moe_router_enable_expert_bias=self.moe_router_enable_expert_bias,
            moe_router_topk_scaling_factor=self.moe_router_topk_scaling_factor,
            moe_shared_expert_intermediate_size=self.moe_shared_expert_intermediate_size,
            moe_shared_expert_gate=self.moe_shared_expert_gate,
            moe_token_dispatcher_type="allgather",
            moe_grouped_gemm=False,
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
        )

    def transformer_config(
        self,
        tensor_model_parallel_size: int = 1,
        pipeline_model_parallel_size: int = 1,
        params_dtype: torch.dtype = torch.float32,
        sequence_parallel: bool = False,
        **overrides,
    ):
        """Shorthand for ``Runtime(...).transformer_config(self, **overrides)`` on this
        machine's device."""
        runtime = Runtime(
            tensor_model_parallel_size,
            pipeline_model_parallel_size,
            params_dtype,
            sequence_parallel,
        )
        return runtime.transformer_config(self, **overrides)

    def gpt_model_kwargs(self) -> dict:
        """Arguments of megatron's GPTModel besides config, spec and pipeline stage flags."""
        return dict(
            vocab_size=self.vocab_size,
            max_sequence_length=self.max_position_embeddings,
            share_embeddings_and_output_weights=self.tie_embeddings,
            position_embedding_type=self.position_embedding,
            rotary_base=self.rotary_base,
            rope_scaling=self.rope_scaling_factor is not None,
            rope_scaling_factor=self.rope_scaling_factor or 8.0,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        return cls(**data)


@dataclass(frozen=True)
class Runtime:
    """Where and how a model runs: parallel layout, precision and device. Not part of a
    checkpoint; with a ``ModelConfig`` it makes megatron's TransformerConfig."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    params_dtype: torch.dtype = torch.float32
    sequence_parallel: bool = False
    device: Optional[torch.device] = None  # None: this machine's accelerator, else the CPU
    expert_model_parallel_size: int = 1

    @property
    def on_accelerator(self) -> bool:
        if self.device is None:
            return torch.accelerator.current_accelerator() is not None
        return torch.device(self.device).type != "cpu"

    def transformer_config(self, model: ModelConfig, **overrides):
        """megatron-core's TransformerConfig of ``model`` run this way. Fusions stay off and
        weights are initialised on the CPU on every device: the kernels are portable and a
        seed gives the same weights at every TP size and on every machine."""
        from megatron.core.transformer.transformer_config import TransformerConfig

        dtype = self.params_dtype
        kwargs = model.architecture_kwargs()
        kwargs.update(
            tensor_model_parallel_size=self.tensor_model_parallel_size,
            pipeline_model_parallel_size=self.pipeline_model_parallel_size,
            sequence_parallel=self.sequence_parallel,
            expert_model_parallel_size=self.expert_model_parallel_size,
            params_dtype=dtype,
            pipeline_dtype=dtype,
            bf16=dtype == torch.bfloat16,
            fp16=dtype == torch.float16,
            use_cpu_initialization=True,
            bias_activation_fusion=False,
            bias_dropout_fusion=False,
            masked_softmax_fusion=False,
            persist_layer_norm=False,
            apply_rope_fusion=False,
            gradient_accumulation_fusion=False,
            # the post-p2p synchronize exists for a GPU race; there is nothing to sync on CPU
            batch_p2p_sync=self.on_accelerator,
        )
        kwargs.update(overrides)
        topk = kwargs.get("moe_router_topk")
        if topk == 1 and kwargs.get("num_moe_experts") and not kwargs["moe_router_pre_softmax"]:
            # megatron's validation asks for pre-softmax routing at top-1 (a softmax over one
            # logit is 1); a renormalizing router's top-1 (Mixtral-style, or a top-1
            # sub-network) is exactly that: weight 1. Validate at top-2, then route top-1.
            config = TransformerConfig(**{**kwargs, "moe_router_topk": 2})
            config.moe_router_topk = 1
            return config
        return TransformerConfig(**kwargs)


# the width ratios of each elastic axis when none are given (the checkpoint's choices win)
DEFAULT_RATIOS = (1.0, 0.75, 0.5, 0.25)


_MOE_CHOICES = ("expert_choices", "moe_ffn_choices", "topk_choices")
BUDGET_TYPES = ("active", "total")


def _descending(values) -> Tuple[int, ...]:
    return tuple(sorted(set(values), reverse=True))


def _scaled(full: int, ratio: float, unit: int) -> int:
    """Round ``full * ratio`` to a positive multiple of ``unit``."""
    return max(unit, int(round(full * ratio / unit)) * unit)


@dataclass
class ElasticConfig:
    """The widths each elastic axis may take. The full width is always a valid choice.

    ``mlp_choices`` are MLP hidden sizes, ``head_choices`` query-head counts, both in the model's
    canonical (importance) order: a width k means the first k units.
    """

    mlp_choices: Sequence[int] = field(default_factory=tuple)
    head_choices: Sequence[int] = field(default_factory=tuple)
    allow_layer_skipping: bool = True
    # the layers, most important first (importance ranking): a sub-network may keep a count
    layer_ranking: Sequence[int] = field(default_factory=tuple)
    # mixtures of experts: kept experts (a ranked prefix), expert widths, experts per token
    expert_choices: Sequence[int] = field(default_factory=tuple)
    moe_ffn_choices: Sequence[int] = field(default_factory=tuple)
    topk_choices: Sequence[int] = field(default_factory=tuple)
    # what a budget is a fraction of for a mixture of experts: the parameters a token runs
    # through ("active": compute) or all of them ("total": memory)
    budget_type: str = "active"

    def __post_init__(self):
        if self.budget_type not in BUDGET_TYPES:
            raise ValueError(f"budget type {self.budget_type!r}: one of {BUDGET_TYPES}")

    @classmethod
    def from_ratios(
        cls,
        model: ModelConfig,
        mlp_ratios: Sequence[float] = DEFAULT_RATIOS,
        head_ratios: Sequence[float] = DEFAULT_RATIOS,
        tensor_model_parallel_size: int = 1,
        allow_layer_skipping: bool = True,
    ) -> "ElasticConfig":
        """Choices from ratios, rounded to what the layout can express at this TP size."""
        tp = tensor_model_parallel_size
        mlp = {_scaled(model.ffn_hidden_size, r, tp) for r in mlp_ratios}
        heads = {_scaled(model.num_attention_heads, r, model.head_unit(tp)) for r in head_ratios}
        moe = {}
        if model.is_moe:  # the MLP ratios scale the experts' axes; an MoE has no dense MLP
            mlp = {model.ffn_hidden_size}
            moe = dict(
                expert_choices=_descending(
                    _scaled(model.num_moe_experts, r, 1) for r in mlp_ratios
                ),
                moe_ffn_choices=_descending(
                    _scaled(model.moe_ffn_hidden_size, r, tp) for r in mlp_ratios
                ),
                topk_choices=_descending(_scaled(model.moe_router_topk, r, 1) for r in mlp_ratios),
            )
        return cls(
            mlp_choices=_descending(mlp),
            head_choices=_descending(heads),
            allow_layer_skipping=allow_layer_skipping,
            **moe,
        )

    def choices_with_full(self, model: ModelConfig) -> Tuple[List[int], List[int]]:
        """(MLP widths, head counts), each largest first with the full size among them: what a
        router or the budget rule picks from and what a sub-network may use."""
        mlp = sorted(set(self.mlp_choices) | {model.ffn_hidden_size}, reverse=True)
        heads = sorted(set(self.head_choices) | {model.num_attention_heads}, reverse=True)
        return mlp, heads

    def moe_choices_with_full(self, model: ModelConfig) -> Tuple[List[int], List[int], List[int]]:
        """(expert counts, expert widths, top-k), each largest first with the full size among
        them; empty lists for a dense model."""
        if not model.is_moe:
            return [], [], []
        full = (model.num_moe_experts, model.moe_ffn_hidden_size, model.moe_router_topk)
        chosen = (self.expert_choices, self.moe_ffn_choices, self.topk_choices)
        return [sorted(set(c) | {f}, reverse=True) for c, f in zip(chosen, full)]

    def to_dict(self) -> dict:
        out = {
            "mlp_choices": list(self.mlp_choices),
            "head_choices": list(self.head_choices),
            "allow_layer_skipping": self.allow_layer_skipping,
            "layer_ranking": list(self.layer_ranking),
        }
        for key in _MOE_CHOICES:
            if getattr(self, key):
                out[key] = list(getattr(self, key))
        if self.budget_type != "active":
            out["budget_type"] = self.budget_type
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "ElasticConfig":
        return cls(
            mlp_choices=tuple(data["mlp_choices"]),
            head_choices=tuple(data["head_choices"]),
            allow_layer_skipping=data.get("allow_layer_skipping", True),
            layer_ranking=tuple(data.get("layer_ranking", ())),
            **{key: tuple(data.get(key, ())) for key in _MOE_CHOICES},
            budget_type=data.get("budget_type", "active"),
        )

    def dumps(self) -> str:
        return json.dumps(self.to_dict())
