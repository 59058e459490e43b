"""Hugging Face mixtures of experts, the MoE half of ``hf.py``: Mixtral, Qwen2-MoE, Qwen3-MoE and
OLMoE.

Their attention is the Llama family's (``hf.py`` reads it); here: the MoE config fields (missing
ones take transformers' defaults, which differ per family), what they map to, what is refused by
name, the family a MoE ``ModelConfig`` is written as, and the key map.

- ``num_experts_per_tok`` -> ``moe_router_topk``; ``norm_topk_prob`` -> ``moe_router_pre_softmax
  = not norm_topk_prob`` (Mixtral always renormalizes the top-k softmax weights);
- Qwen2-MoE: ``shared_expert_intermediate_size`` -> a shared expert with its sigmoid gate,
  ``qkv_bias`` -> ``add_qkv_bias``; Qwen3-MoE: per-head q/k RMSNorms (``qk_layernorm``);
- OLMoE: q/k RMSNorms over the whole q and k projections (``qk_layernorm_across_heads``,
  elastic/qk_norm.py), ``intermediate_size`` is the experts' width, no shared expert. Its
  transformers class sizes q_norm by ``hidden_size`` and k_norm by ``hidden_size / heads`` per
  KV head, so heads x head_dim must equal hidden_size: a ``head_dim`` that differs is refused,
  and a sub-network with fewer heads has no OLMoE config (the saver refuses it by name);
- refused: dense layers mixed in (``mlp_only_layers``, ``decoder_sparse_step`` != 1), OLMoE's
  ``clip_qkv``, unknown routing fields. Fields that only change training (aux loss, router
  logits output, jitter noise) are accepted.
"""

from __future__ import annotations

import re

from megatron_flextron.checkpoint.fields import check_fields
from megatron_flextron.checkpoint.state import CheckpointError
from megatron_flextron.config import ModelConfig
from megatron_flextron.convert.keymap import KeyMap
from megatron_flextron.convert.moe_keymap import HF_MIXTRAL, HF_QWEN_MOE

# transformers' defaults of the fields that change the function (a config.json may omit them)
DEFAULTS = {
    "mixtral": {
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "max_position_embeddings": 4096 * 32,
        "tie_word_embeddings": False,
    },
    "qwen2_moe": {
        "num_experts": 60,
        "num_experts_per_tok": 4,
        "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632,
        "norm_topk_prob": False,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "qkv_bias": True,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": False,
    },
    "qwen3_moe": {
        "num_local_experts": 128,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 768,
        "norm_topk_prob": False,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": False,
    },
    "olmoe": {
        "num_experts": 64,
        "num_experts_per_tok": 8,
        "intermediate_size": 2048,
        "norm_topk_prob": False,
        "clip_qkv": None,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    },
}
KINDS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
# the experts' count: transformers 5 stores Mixtral's and Qwen3-MoE's as num_local_experts (and
# reads num_experts as an alias of it), Qwen2-MoE's as num_experts
_EXPERTS_FIELD = {
    "mixtral": "num_local_experts",
    "qwen2_moe": "num_experts",
    "qwen3_moe": "num_local_experts",
    "olmoe": "num_experts",  # OlmoeConfig reads num_local_experts as its alias
}
_ALIAS = {"num_local_experts": "num_experts", "num_experts": "num_local_experts"}
_ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
}
KEYMAPS = {"mixtral": HF_MIXTRAL, "qwen2_moe": HF_QWEN_MOE, "qwen3_moe": HF_QWEN_MOE,
           "olmoe": HF_QWEN_MOE}  # fmt: skip
# accepted: they change training only (the aux loss, returning router logits, Mixtral's jitter
# noise applies in training mode only), or sampling (top_k: a generation default older
# transformers wrote into config.json)
_NOT_THE_FUNCTION = ("router_aux_loss_coef", "output_router_logits", "router_jitter_noise", "top_k")
# a field of this shape that a family does not define may change the routing: refused by name
_ROUTING_WORDS = re.compile(r"router|expert|top_?k|moe|routed|scoring|sparse|gating|n_group")
_MOE_SIZES = {"num_experts_per_tok": int, "moe_intermediate_size": int,
              "shared_expert_intermediate_size": int, "decoder_sparse_step": int,
              "num_local_experts": int, "num_experts": int, "norm_topk_prob": bool,
              "qkv_bias": bool, "mlp_only_layers": list}  # fmt: skip


def _refuse(kind: str, what: str, why: str) -> CheckpointError:
    return CheckpointError(f"hf {kind}: {what} is not supported: {why}")


def with_defaults(kind: str, cfg: dict) -> dict:
    """``cfg`` with transformers' defaults for the omitted fields; unknown routing fields (and
    OLMoE's clip_qkv) refused by name."""
    cfg = dict(cfg)
    name = _EXPERTS_FIELD[kind]
    alias = _ALIAS[name]
    if kind != "qwen2_moe" and alias in cfg:  # transformers reads both names
        other = cfg.setdefault(name, cfg[alias])
        if other != cfg[alias]:
            raise CheckpointError(f"config.json: {alias}={cfg[alias]} and {name}={other} differ")
        cfg.pop(alias)
    for key, value in DEFAULTS[kind].items():
        cfg.setdefault(key, value)
    known = set(DEFAULTS[kind]) | set(_NOT_THE_FUNCTION)
    unknown = sorted(k for k in cfg if _ROUTING_WORDS.search(k) and k not in known)
    if unknown:
        raise _refuse(
            kind,
            f"config field {unknown[0]}={cfg[unknown[0]]!r}",
            f"{kind} does not define it; it may change the routing",
        )
    check_fields("config.json", cfg, {}, _MOE_SIZES)
    if kind == "olmoe":
        _check_olmoe(cfg)
    return cfg


def _check_olmoe(cfg: dict) -> None:
    """What OLMoE's attention does beyond the Llama family's, or cannot be represented."""
    if cfg["clip_qkv"] is not None:
        raise _refuse("olmoe", f"clip_qkv={cfg['clip_qkv']}", "q, k and v are never clipped")
    hidden, heads = cfg.get("hidden_size"), cfg.get("num_attention_heads")
    d = cfg.get("head_dim")
    if d is not None and isinstance(hidden, int) and isinstance(heads, int) and d * heads != hidden:
        raise _refuse(
            "olmoe",
            f"head_dim={d} with {heads} heads and hidden_size={hidden}",
            "transformers' OLMoE sizes q_norm by hidden_size (heads x head_dim must equal it)",
        )


def moe_fields(kind: str, cfg: dict) -> dict:
    """The ModelConfig fields of the mixture (and of the attention flags each family fixes)."""
    layers = cfg["num_hidden_layers"]
    field = _EXPERTS_FIELD[kind]
    experts = cfg[field]
    dense = [i for i in cfg.get("mlp_only_layers", []) if 0 <= i < layers]
    step = cfg.get("decoder_sparse_step", 1)
    if experts < 1:
        raise _refuse(kind, f"{field}={experts}", "every layer is a mixture of experts")
    if dense:
        raise _refuse(
            kind,
            f"mlp_only_layers={dense}",
            "dense layers mixed in (every layer of a flextron MoE is a mixture of experts)",
        )
    if step != 1 and layers > 0:
        raise _refuse(
            kind,
            f"decoder_sparse_step={step}",
            f"dense layers mixed in (only layers i with (i + 1) % {step} == 0 would be mixtures)",
        )
    topk = cfg["num_experts_per_tok"]
    if not 1 <= topk <= experts:
        raise CheckpointError(f"config.json: num_experts_per_tok={topk} is not in [1, {experts}]")
    out = dict(
        num_moe_experts=experts,
        moe_router_topk=topk,
        moe_router_pre_softmax=not cfg.get("norm_topk_prob", True),  # Mixtral: renormalized
        add_qkv_bias=kind == "qwen2_moe" and cfg["qkv_bias"],
        qk_layernorm=kind in ("qwen3_moe", "olmoe"),
        qk_layernorm_across_heads=kind == "olmoe",
    )
    if kind in ("mixtral", "olmoe"):  # intermediate_size is the experts' width
        return {**out, "moe_ffn_hidden_size": cfg["intermediate_size"]}
    out["moe_ffn_hidden_size"] = cfg["moe_intermediate_size"]
    if kind == "qwen2_moe":
        shared = cfg["shared_expert_intermediate_size"]
        if shared < 1:
            raise _refuse(
                kind,
                f"shared_expert_intermediate_size={shared}",
                "a shared expert of at least one neuron (Qwen2-MoE always has one)",
            )
        out.update(moe_shared_expert_intermediate_size=shared, moe_shared_expert_gate=True)
    return out


def family_of(m: ModelConfig) -> str:
    """The transformers family a MoE model is written as, or a refusal naming what none has."""
    if m.moe_router_score_function != "softmax" or m.moe_router_enable_expert_bias:
        raise CheckpointError(
            "only softmax routers without expert bias export to transformers "
            f"(score function {m.moe_router_score_function!r})"
        )
    if m.moe_router_topk_scaling_factor not in (None, 1.0):
        raise CheckpointError("a top-k scaling factor has no transformers MoE family")
    shared = bool(m.moe_shared_expert_intermediate_size)
    if shared and not m.moe_shared_expert_gate:
        raise CheckpointError(
            "a shared expert without its sigmoid gate has no transformers "
            "family (qwen2_moe gates it)"
        )
    if m.qk_layernorm_across_heads:
        _check_olmoe_export(m, shared)
        return "olmoe"
    if m.qk_layernorm:
        if shared:
            raise CheckpointError(
                "q/k norms with a shared expert: no transformers family "
                "(qwen3_moe has no shared expert, qwen2_moe no q/k norms)"
            )
        return "qwen3_moe"
    if shared:
        return "qwen2_moe"
    if m.add_qkv_bias or m.moe_router_pre_softmax:
        raise CheckpointError(
            "a mixture without shared expert or q/k norms exports as mixtral, which has no q/k/v "
            "biases and renormalizes the top-k weights (this model: add_qkv_bias="
            f"{m.add_qkv_bias}, moe_router_pre_softmax={m.moe_router_pre_softmax})"
        )
    return "mixtral"


def _check_olmoe_export(m: ModelConfig, shared: bool) -> None:
    if shared or m.add_qkv_bias:
        raise CheckpointError(
            "q/k norms across heads export as olmoe, which has no shared expert and no q/k/v "
            f"biases (this model: shared expert {m.moe_shared_expert_intermediate_size}, "
            f"add_qkv_bias={m.add_qkv_bias})"
        )
    if m.num_attention_heads * m.kv_channels != m.hidden_size:
        raise CheckpointError(
            f"olmoe with {m.num_attention_heads} heads x head_dim {m.kv_channels} != "
            f"hidden_size {m.hidden_size} (fewer heads than the source?): transformers' OLMoE "
            "sizes q_norm by hidden_size and k_norm by hidden_size / heads per KV head, so it "
            "cannot hold trimmed heads; export the full head count or save as flextron"
        )


def hf_fields(m: ModelConfig, base: dict) -> dict:
    """The config.json of a MoE model from ``base`` (the Llama-family fields of its attention)."""
    kind = family_of(m)
    config = {k: v for k, v in base.items() if k not in ("attention_bias", "mlp_bias")}
    config.update(
        architectures=[_ARCHITECTURES[kind]], model_type=kind, num_experts_per_tok=m.moe_router_topk
    )
    config[_EXPERTS_FIELD[kind]] = m.num_moe_experts
    if kind == "qwen3_moe":  # transformers 4 (and readers of the raw JSON) know only this name
        config["num_experts"] = m.num_moe_experts
    if kind == "olmoe":  # head_dim follows from hidden_size (checked above)
        config.pop("head_dim", None)
        config.update(
            intermediate_size=m.moe_ffn_hidden_size,
            clip_qkv=None,
            norm_topk_prob=not m.moe_router_pre_softmax,
            attention_bias=False,
        )
        return config
    if kind == "mixtral":
        config.update(intermediate_size=m.moe_ffn_hidden_size, sliding_window=None)
        for key in ("use_sliding_window", "max_window_layers"):
            config.pop(key, None)
        return config
    config.update(
        moe_intermediate_size=m.moe_ffn_hidden_size,
        norm_topk_prob=not m.moe_router_pre_softmax,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=m.num_layers,
    )
    if kind == "qwen2_moe":
        config.update(
            shared_expert_intermediate_size=m.moe_shared_expert_intermediate_size,
            qkv_bias=m.add_qkv_bias,
        )
    else:
        config.update(attention_bias=False)
    return config


def keymap(m: ModelConfig) -> KeyMap:
    return KEYMAPS[family_of(m)]
