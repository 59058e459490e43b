"""Megatron-LM's ``args`` Namespace (saved in every checkpoint) -> ``ModelConfig``, exact or refuse.

Shared by the legacy torch loader and the torch_dist loader. Argument names are Megatron-LM's
(``arguments.py``); a missing argument takes Megatron-LM's default. Every argument that changes
the network's function either maps to a ModelConfig field or, when set to anything but its
neutral value, stops the conversion naming it.
"""

from __future__ import annotations

import argparse

from megatron_flextron.checkpoint.fields import check_fields, head_dim
from megatron_flextron.checkpoint.state import CheckpointError
from megatron_flextron.config import ModelConfig

# (argument, its neutral value, what it would change); a value other than neutral is refused
_REFUSED = (
    ("apply_residual_connection_post_layernorm", False, "residual taken after the norm"),
    ("apply_layernorm_1p", False, "zero-centred norm weights (1 + gamma)"),
    ("layernorm_zero_centered_gamma", False, "zero-centred norm weights (1 + gamma)"),
    ("qk_l2_norm", False, "L2 norms on queries and keys"),
    ("squared_relu", False, "squared-ReLU MLP"),
    ("quick_geglu", False, "quick-GeGLU MLP"),
    ("glu_linear_offset", 0.0, "an offset inside the gated MLP"),
    ("activation_func_clamp_value", None, "a clamped activation"),
    ("multi_latent_attention", False, "multi-latent attention"),
    ("window_size", None, "sliding-window attention"),
    ("attention_output_gate", False, "a gate on the attention output"),
    ("rotary_interleaved", False, "interleaved RoPE pairs"),
    ("rotary_seq_len_interpolation_factor", None, "RoPE position interpolation"),
    ("mtp_num_layers", None, "multi-token-prediction layers"),
    ("heterogeneous_layers_config_path", None, "per-layer heterogeneous blocks"),
    ("no_rope_freq", None, "layers without RoPE"),
    ("softmax_type", "vanilla", "a non-standard attention softmax"),
    ("experimental_attention_variant", None, "a non-standard attention"),
    # mixture of experts: what changes routing or the experts beyond the represented fields
    ("moe_router_num_groups", None, "group-limited routing"),
    ("moe_router_group_topk", None, "group-limited routing"),
    ("moe_router_topk_limited_devices", None, "device-limited routing"),
    ("moe_expert_capacity_factor", None, "token dropping at an expert capacity"),
    ("moe_expert_rank_capacity_factor", None, "token dropping at a rank capacity"),
    ("moe_token_dropping", False, "token dropping"),
    ("moe_latent_size", None, "experts in a latent space"),
    ("moe_apply_probs_on_input", False, "routing weights applied to the experts' input"),
    ("moe_router_force_load_balancing", False, "random (benchmark) routing"),
    ("moe_router_force_biased", None, "biased (benchmark) routing"),
    ("moe_mlp_glu_interleave_size", None, "interleaved gate/up rows in the experts"),
    ("moe_shared_expert_glu_interleave_size", None, "interleaved rows in the shared expert"),
)
# load-balancing types that change which experts a token picks at inference (the others only
# add training losses)
_ROUTING_TYPES = ("sinkhorn", "quantile_balancing")
_POSITIONS = ("learned_absolute", "rope")
_NORMS = ("LayerNorm", "RMSNorm")


def _refuse(arg: str, value, why: str) -> CheckpointError:
    return CheckpointError(f"megatron args: {arg}={value!r} is not supported ({why})")


def position_embedding(args) -> str:
    """``position_embedding_type``, or what older Megatron-LM args said with booleans."""
    if getattr(args, "position_embedding_type", None):
        return args.position_embedding_type
    if getattr(args, "use_rotary_position_embeddings", False):
        return "rope"
    return "learned_absolute" if getattr(args, "add_position_embedding", True) else "none"


# what each HybridModel layer symbol is; a block is attention, then an MLP (dense or experts)
_HYBRID_KINDS = {
    "*": "attention",
    "-": "MLP",
    "M": "Mamba",
    "G": "gated delta net",
    "D": "DeepSeek sparse attention",
    "+": "multi-latent attention",
    "E": "mixture-of-experts MLP",
}
_BLOCK_KINDS = {"-": "dense", "E": "mixture-of-experts"}


def hybrid_blocks(args):
    """The number of blocks of a Megatron-LM HybridModel (``--hybrid-layer-pattern``), or None
    for a GPTModel. Refuses, naming the layer, every pattern that is not ``*-`` per block (``*E``
    with ``num_experts``: every block's MLP a mixture of experts; pipeline splits ``|``
    allowed); multi-token-prediction layers (``/``) too."""
    arg = "hybrid_layer_pattern"
    pattern = getattr(args, arg, None)
    if pattern is None:
        arg, pattern = "hybrid_override_pattern", getattr(args, "hybrid_override_pattern", None)
    if pattern is None:
        return None
    if "/" in pattern:
        raise _refuse(arg, pattern, "multi-token-prediction layers after '/'")
    layers = pattern.replace("|", "")
    mlp = "E" if getattr(args, "num_experts", None) else "-"
    block = "*" + mlp
    for i, symbol in enumerate(layers):
        want = block[i % 2]
        if symbol != want:
            kind = _HYBRID_KINDS.get(symbol, "an unknown layer kind")
            raise _refuse(
                arg,
                pattern,
                f"layer {i} is {symbol!r} ({kind}) where a {_BLOCK_KINDS[mlp]} block's "
                f"{_HYBRID_KINDS[want]} ({want!r}) belongs: only {block!r} per block is "
                f"represented (num_experts={getattr(args, 'num_experts', None)})",
            )
    if not layers or len(layers) % 2:
        raise _refuse(arg, pattern, f"it does not end a block with its MLP ({mlp!r})")
    num_layers = getattr(args, "num_layers", None)
    if num_layers not in (None, len(layers)):
        raise CheckpointError(
            f"megatron args: num_layers={num_layers} but {arg} has {len(layers)} layers"
        )
    return len(layers) // 2


def check_supported(args) -> None:
    """Refuse, by name, every set argument that changes the function and is not represented."""
    for arg, neutral, why in _REFUSED:
        value = getattr(args, arg, neutral)
        if value != neutral and not (arg == "rotary_seq_len_interpolation_factor" and value == 1):
            raise _refuse(arg, value, why)
    position = position_embedding(args)
    if position not in _POSITIONS:
        raise _refuse("position_embedding_type", position, f"one of {_POSITIONS}")
    if position == "rope" and float(getattr(args, "rotary_percent", 1.0)) != 1.0:
        raise _refuse("rotary_percent", args.rotary_percent, "partial RoPE")
    norm = getattr(args, "normalization", "LayerNorm")
    if norm not in _NORMS:
        raise _refuse("normalization", norm, f"one of {_NORMS}")
    if getattr(args, "swiglu", False) and getattr(args, "openai_gelu", False):
        raise _refuse("openai_gelu", True, "with --swiglu")
    if getattr(args, "num_experts", None):
        check_moe_supported(args)


def check_moe_supported(args) -> None:
    """Every layer a mixture of experts, with the routing and experts ModelConfig represents."""
    freq = getattr(args, "moe_layer_freq", 1)
    if not (freq == 1 or (isinstance(freq, (list, tuple)) and set(freq) == {1})):
        raise _refuse("moe_layer_freq", freq, "dense layers mixed with mixture-of-experts layers")
    kinds = getattr(args, "moe_router_load_balancing_type", "aux_loss")
    for kind in kinds if isinstance(kinds, (list, tuple)) else [kinds]:
        if kind in _ROUTING_TYPES:
            raise _refuse("moe_router_load_balancing_type", kinds, f"{kind} routing")
    score = getattr(args, "moe_router_score_function", "softmax")
    if score not in ("softmax", "sigmoid"):
        raise _refuse("moe_router_score_function", score, "softmax or sigmoid")
    if getattr(args, "add_bias_linear", True):
        raise _refuse("add_bias_linear", True, "biases in the experts")


# the sizes the model is built from: (required, optional) {argument: type}
_SIZES = (
    dict.fromkeys(("num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings"),
                  int),
    dict.fromkeys(("ffn_hidden_size", "kv_channels", "num_query_groups", "padded_vocab_size"), int),
)  # fmt: skip


def model_config_from_args(args) -> ModelConfig:
    """The architecture a Megatron-LM run trained, dense or mixture of experts (vocabulary: the
    padded size)."""
    if not isinstance(args, argparse.Namespace):
        raise CheckpointError(
            f"megatron args are a {type(args).__name__}, not Megatron-LM's argparse.Namespace"
        )
    check_fields("megatron args", vars(args), *_SIZES)
    check_supported(args)
    blocks = hybrid_blocks(args)
    swiglu = getattr(args, "swiglu", False)
    heads, hidden = args.num_attention_heads, args.hidden_size
    groups = args.num_query_groups if getattr(args, "group_query_attention", False) else heads
    position = position_embedding(args)
    scaling = position == "rope" and getattr(args, "use_rope_scaling", False)
    vocab = getattr(args, "padded_vocab_size", None)
    if not vocab:
        raise CheckpointError("megatron args: no padded_vocab_size; cannot size the embedding")
    epsilon = getattr(args, "norm_epsilon", None) or getattr(args, "layernorm_epsilon", 1e-5)
    return ModelConfig(
        "llama" if swiglu else "gpt3",
        num_layers=args.num_layers if blocks is None else blocks,
        hidden_size=hidden,
        ffn_hidden_size=getattr(args, "ffn_hidden_size", None) or 4 * hidden,
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=head_dim("megatron args", hidden, heads, getattr(args, "kv_channels", None)),
        vocab_size=vocab,
        max_position_embeddings=args.max_position_embeddings,
        normalization=getattr(args, "normalization", "LayerNorm"),
        activation="swiglu"
        if swiglu
        else ("gelu_tanh" if getattr(args, "openai_gelu", False) else "gelu"),
        position_embedding=position,
        add_bias_linear=getattr(args, "add_bias_linear", True),
        add_qkv_bias=getattr(args, "add_qkv_bias", False),
        tie_embeddings=not getattr(args, "untie_embeddings_and_output_weights", False),
        norm_epsilon=float(epsilon),
        rotary_base=float(getattr(args, "rotary_base", 10000)),
        qk_layernorm=bool(getattr(args, "qk_layernorm", False)),
        rope_scaling_factor=float(getattr(args, "rope_scaling_factor", 8.0)) if scaling else None,
        **moe_fields(args),
    )


def moe_fields(args) -> dict:
    """ModelConfig's mixture-of-experts fields (the same names as Megatron-LM's arguments, but
    ``num_experts``); empty for a dense model. Training-only arguments (auxiliary and z losses,
    the load-balancing loss type, the bias update rate, input jitter, dispatcher, grouped GEMM,
    router dtype) do not change the function and are not carried."""
    experts = getattr(args, "num_experts", None)
    if not experts:
        return {}
    scaling = getattr(args, "moe_router_topk_scaling_factor", None)
    return dict(
        num_moe_experts=experts,
        moe_ffn_hidden_size=getattr(args, "moe_ffn_hidden_size", None)
        or getattr(args, "ffn_hidden_size", None),
        moe_router_topk=getattr(args, "moe_router_topk", 2),
        moe_router_score_function=getattr(args, "moe_router_score_function", "softmax"),
        moe_router_pre_softmax=bool(getattr(args, "moe_router_pre_softmax", False)),
        moe_router_enable_expert_bias=bool(getattr(args, "moe_router_enable_expert_bias", False)),
        moe_router_topk_scaling_factor=None if scaling is None else float(scaling),
        moe_shared_expert_intermediate_size=getattr(
            args, "moe_shared_expert_intermediate_size", None
        ),
        moe_shared_expert_gate=bool(getattr(args, "moe_shared_expert_gate", False)),
    )
