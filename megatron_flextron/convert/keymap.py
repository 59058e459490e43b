"""Declarative key maps between a checkpoint format and the canonical (megatron) names.

A map is a list of rules; a rule names one canonical tensor, the source tensors it is made of, and
the transform each way. Per-layer rules use ``{i}`` in the source names, per-expert rules ``{e}``
in both names (one rule per expert of a mixture). One engine applies any map in either direction,
so a format is described, not coded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence, Tuple

import torch

from megatron_flextron.checkpoint.state import CheckpointError, LazyState, TensorSpec, spec_of
from megatron_flextron.config import ModelConfig
from megatron_flextron.convert import transforms as T

Tensor = torch.Tensor


def _same(m, x):
    return x


def _one(m, x):
    return (x,)


@dataclass(frozen=True)
class Rule:
    canonical: str  # per-layer rules: the name after "decoder.layers.{i}."
    sources: Tuple[str, ...]
    to_canonical: Callable[..., Tensor] = _same  # (model, *sources) -> canonical
    from_canonical: Callable[[ModelConfig, Tensor], Tuple[Tensor, ...]] = _one
    when: Callable[[ModelConfig], bool] = lambda m: True


@dataclass(frozen=True)
class KeyMap:
    name: str
    layer_prefix: str  # e.g. "model.layers.{i}."
    global_rules: Sequence[Rule]
    layer_rules: Sequence[Rule]

    def _rules(self, m: ModelConfig, layers: Optional[Sequence[ModelConfig]] = None):
        """(canonical name, source names, rule, the config its transforms see); ``layers``: one
        config per layer for a model whose layers differ in shape (per-layer head counts)."""
        for rule in self.global_rules:
            if rule.when(m):
                yield rule.canonical, rule.sources, rule, m
        for i in range(m.num_layers):
            prefix = self.layer_prefix.format(i=i)
            layer = layers[i] if layers else m
            for rule in self.layer_rules:
                if not rule.when(layer):
                    continue
                # a per-expert rule ({e} in its names) stands for one rule per expert
                experts = range(layer.num_moe_experts) if "{e}" in rule.canonical else (0,)
                for e in experts:
                    sources = tuple(prefix + s.format(i=i, e=e) for s in rule.sources)
                    canonical = rule.canonical.format(e=e)
                    yield f"decoder.layers.{i}.{canonical}", sources, rule, layer

    def source_names(self, m: ModelConfig):
        return [s for _, sources, _, _ in self._rules(m) for s in sources]

    def check_consumed(self, m: ModelConfig, available, ignored=()) -> None:
        """Exact or refuse: a source tensor no rule reads would be dropped silently; name it."""
        left = sorted(set(available) - set(self.source_names(m)) - set(ignored))
        if left:
            more = f" (and {len(left) - 8} more)" if len(left) > 8 else ""
            raise CheckpointError(
                f"{self.name}: source tensors this architecture does not use: {left[:8]}{more}; "
                "converting would drop them"
            )

    def to_canonical(self, m: ModelConfig, get) -> LazyState:
        """The canonical state over a ``TensorSource`` (or any getter with ``spec``), read and
        transformed per tensor on access, in the source dtype."""
        rules = {name: (sources, rule) for name, sources, rule, _ in self._rules(m)}

        def build(rule, m, tensors):
            return rule.to_canonical(m, *tensors).contiguous()

        specs = {
            name: TensorSpec.of(build(rule, m, [get.spec(s).meta() for s in sources]))
            for name, (sources, rule) in rules.items()
        }

        def read(name: str) -> Tensor:
            sources, rule = rules[name]
            return build(rule, m, [get(s) for s in sources])

        return LazyState(specs, read)

    def from_canonical_specs(self, m: ModelConfig, state: Mapping[str, Tensor], layers=None):
        """[(source name, spec)] of what ``from_canonical`` yields, in its order, unread."""
        out = []
        for name, sources, rule, cfg in self._rules(m, layers):
            if name not in state:
                raise CheckpointError(f"{self.name}: canonical state has no {name!r}")
            outputs = rule.from_canonical(cfg, spec_of(state, name).meta())
            out += [(s, TensorSpec.of(t)) for s, t in zip(sources, outputs)]
        return out

    def from_canonical(self, m: ModelConfig, state: Mapping[str, Tensor], layers=None):
        """(source name, tensor) pairs, one canonical tensor read at a time."""
        for name, sources, rule, cfg in self._rules(m, layers):
            if name not in state:
                raise CheckpointError(f"{self.name}: canonical state has no {name!r}")
            for source, tensor in zip(sources, rule.from_canonical(cfg, state[name])):
                yield source, tensor.contiguous()


def _untied(m: ModelConfig) -> bool:
    return not m.tie_embeddings


def _qkv_rule(sources, q_fix=None, k_fix=None, when=lambda m: True, suffix="weight") -> Rule:
    """q, k, v -> fused QKV; ``*_fix`` undo a source layout (llama.cpp's RoPE permutation)."""

    def fwd(m, q, k, v):
        if q_fix:
            q, k = q_fix[0](q, m.num_attention_heads), k_fix[0](k, m.num_query_groups)
        return T.qkv_fuse(q, k, v, m.num_query_groups)

    def back(m, qkv):
        q, k, v = T.qkv_split(qkv, m.num_query_groups, m.heads_per_group)
        if q_fix:
            q, k = q_fix[1](q, m.num_attention_heads), k_fix[1](k, m.num_query_groups)
        return q, k, v

    return Rule(f"self_attention.linear_qkv.{suffix}", tuple(sources), fwd, back, when)


def _qk_norm_rules(q: str, k: str) -> Sequence[Rule]:
    """The per-head q/k norms (Qwen3), one weight over the head dim shared by every head."""
    return [
        Rule("self_attention.q_layernorm.weight", (q,), when=_qk_norm),
        Rule("self_attention.k_layernorm.weight", (k,), when=_qk_norm),
    ]


def _qk_norm(m: ModelConfig) -> bool:
    return m.qk_layernorm


def _gate_up_rule(gate: str, up: str) -> Rule:
    return Rule(
        "mlp.linear_fc1.weight",
        (gate, up),
        lambda m, g, u: T.gate_up_fuse(g, u),
        lambda m, w: T.gate_up_split(w),
    )


HF_LLAMA = KeyMap(
    name="hf-llama",
    layer_prefix="model.layers.{i}.",
    global_rules=[
        Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
        Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
        Rule("output_layer.weight", ("lm_head.weight",), when=_untied),
    ],
    layer_rules=[
        Rule("input_layernorm.weight", ("input_layernorm.weight",)),
        _qkv_rule(
            ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
        ),
        _qkv_rule(
            ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
            when=lambda m: m.add_qkv_bias,
            suffix="bias",
        ),
        *_qk_norm_rules("self_attn.q_norm.weight", "self_attn.k_norm.weight"),
        Rule("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",)),
        Rule("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",)),
        _gate_up_rule("mlp.gate_proj.weight", "mlp.up_proj.weight"),
        Rule("mlp.linear_fc2.weight", ("mlp.down_proj.weight",)),
    ],
)

_UNPERMUTE = (T.llama_cpp_unpermute, T.llama_cpp_permute)


def _gguf_llama_like(name: str, qkv: Rule, extra: Sequence[Rule] = ()) -> KeyMap:
    return KeyMap(
        name=name,
        layer_prefix="blk.{i}.",
        global_rules=[
            Rule("embedding.word_embeddings.weight", ("token_embd.weight",)),
            Rule("decoder.final_layernorm.weight", ("output_norm.weight",)),
            Rule("output_layer.weight", ("output.weight",), when=_untied),
        ],
        layer_rules=[
            Rule("input_layernorm.weight", ("attn_norm.weight",)),
            qkv,
            *extra,
            Rule("self_attention.linear_proj.weight", ("attn_output.weight",)),
            Rule("pre_mlp_layernorm.weight", ("ffn_norm.weight",)),
            _gate_up_rule("ffn_gate.weight", "ffn_up.weight"),
            Rule("mlp.linear_fc2.weight", ("ffn_down.weight",)),
        ],
    )


_GGUF_QKV = ("attn_q.weight", "attn_k.weight", "attn_v.weight")
# llama.cpp's llama rotates interleaved pairs: its Q/K rows are permuted from HF's layout
GGUF_LLAMA = _gguf_llama_like("gguf-llama", _qkv_rule(_GGUF_QKV, _UNPERMUTE, _UNPERMUTE))
# its qwen3 (and qwen2moe) rotate halves (NEOX), as megatron and HF do: rows as they are, plus
# the q/k norms (Qwen3) or the q/k/v biases (Qwen2-MoE), each when the model has them
GGUF_QWEN3 = _gguf_llama_like(
    "gguf-qwen3",
    _qkv_rule(_GGUF_QKV),
    [
        _qkv_rule(
            ("attn_q.bias", "attn_k.bias", "attn_v.bias"),
            when=lambda m: m.add_qkv_bias,
            suffix="bias",
        ),
        *_qk_norm_rules("attn_q_norm.weight", "attn_k_norm.weight"),
    ],
)


def _conv1d(canonical: str, source: str, when=lambda m: True) -> Rule:
    """GPT-2 Conv1D weights are stored [in, out]."""
    return Rule(
        canonical, (source,), lambda m, w: T.transpose(w), lambda m, w: (T.transpose(w),), when
    )


def _norm_rules(canonical: str, source: str) -> Sequence[Rule]:
    return [
        Rule(f"{canonical}.weight", (f"{source}.weight",)),
        Rule(f"{canonical}.bias", (f"{source}.bias",)),
    ]


HF_GPT2 = KeyMap(
    name="hf-gpt2",
    layer_prefix="transformer.h.{i}.",
    global_rules=[
        Rule("embedding.word_embeddings.weight", ("transformer.wte.weight",)),
        Rule("embedding.position_embeddings.weight", ("transformer.wpe.weight",)),
        *_norm_rules("decoder.final_layernorm", "transformer.ln_f"),
    ],
    layer_rules=[
        *_norm_rules("input_layernorm", "ln_1"),
        Rule(
            "self_attention.linear_qkv.weight",
            ("attn.c_attn.weight",),
            lambda m, w: T.qkv_stacked_to_fused(T.transpose(w), m.num_attention_heads),
            lambda m, w: (T.transpose(T.qkv_fused_to_stacked(w, m.num_attention_heads)),),
        ),
        Rule(
            "self_attention.linear_qkv.bias",
            ("attn.c_attn.bias",),
            lambda m, b: T.qkv_stacked_to_fused(b, m.num_attention_heads),
            lambda m, b: (T.qkv_fused_to_stacked(b, m.num_attention_heads),),
        ),
        _conv1d("self_attention.linear_proj.weight", "attn.c_proj.weight"),
        Rule("self_attention.linear_proj.bias", ("attn.c_proj.bias",)),
        *_norm_rules("pre_mlp_layernorm", "ln_2"),
        _conv1d("mlp.linear_fc1.weight", "mlp.c_fc.weight"),
        Rule("mlp.linear_fc1.bias", ("mlp.c_fc.bias",)),
        _conv1d("mlp.linear_fc2.weight", "mlp.c_proj.weight"),
        Rule("mlp.linear_fc2.bias", ("mlp.c_proj.bias",)),
    ],
)


def _stacked_qkv(canonical: str, source: str) -> Rule:
    """GPT-2 style [q_all; k_all; v_all] rows (weight or bias) <-> megatron's per-head rows."""
    return Rule(
        canonical,
        (source,),
        lambda m, x: T.qkv_stacked_to_fused(x, m.num_attention_heads),
        lambda m, x: (T.qkv_fused_to_stacked(x, m.num_attention_heads),),
    )


GGUF_GPT2 = KeyMap(
    name="gguf-gpt2",
    layer_prefix="blk.{i}.",
    global_rules=[
        Rule("embedding.word_embeddings.weight", ("token_embd.weight",)),
        Rule("embedding.position_embeddings.weight", ("position_embd.weight",)),
        *_norm_rules("decoder.final_layernorm", "output_norm"),
        Rule("output_layer.weight", ("output.weight",), when=_untied),
    ],
    layer_rules=[
        *_norm_rules("input_layernorm", "attn_norm"),
        _stacked_qkv("self_attention.linear_qkv.weight", "attn_qkv.weight"),
        _stacked_qkv("self_attention.linear_qkv.bias", "attn_qkv.bias"),
        Rule("self_attention.linear_proj.weight", ("attn_output.weight",)),
        Rule("self_attention.linear_proj.bias", ("attn_output.bias",)),
        *_norm_rules("pre_mlp_layernorm", "ffn_norm"),
        Rule("mlp.linear_fc1.weight", ("ffn_up.weight",)),
        Rule("mlp.linear_fc1.bias", ("ffn_up.bias",)),
        Rule("mlp.linear_fc2.weight", ("ffn_down.weight",)),
        Rule("mlp.linear_fc2.bias", ("ffn_down.bias",)),
    ],
)
