"""GGUF export of mixtures of experts, the MoE half of ``gguf.py``: which llama.cpp architecture
runs a model exactly, its MoE metadata, and the experts stacked as llama.cpp stores them.

llama.cpp's graphs fix the routing per architecture (llama.cpp's ``build_moe_ffn`` with softmax
gating; none of the three reads ``expert_weights_norm`` or ``expert_gating_func``), so the model's
routing picks the architecture or is refused:

- ``llama`` with ``expert_count``: Mixtral. Top-k of a softmax, renormalized (megatron's
  ``moe_router_pre_softmax=False``); its ``feed_forward_length`` is the experts' width.
- ``qwen3moe``: per-head q/k norms, renormalized top-k (Qwen3-MoE with ``norm_topk_prob``).
- ``qwen2moe``: a shared expert scaled by sigmoid(x . gate), top-k of a softmax *not*
  renormalized (``moe_router_pre_softmax=True``), q/k/v biases or none; it requires an ``output``
  tensor (tied embeddings refused) and heads x head dim = hidden size (its attention output is
  square): llama.cpp fails to load either otherwise.

Refused by name: sigmoid routers, expert bias, top-k scaling, a shared expert elsewhere or without
its gate, per-layer shapes (no llama.cpp MoE architecture has per-layer sizes).
"""

from __future__ import annotations

import re
from typing import List, Tuple

import torch

from megatron_flextron.checkpoint.state import (
    Checkpoint,
    CheckpointError,
    LazyState,
    TensorSpec,
    spec_of,
)
from megatron_flextron.config import ModelConfig
from megatron_flextron.convert.moe_keymap import (
    EXPERT,
    GGUF_LLAMA_MOE,
    GGUF_QWEN2_MOE,
    GGUF_QWEN3_MOE,
    STACKED,
)

KEYMAPS = {"llama": GGUF_LLAMA_MOE, "qwen3moe": GGUF_QWEN3_MOE, "qwen2moe": GGUF_QWEN2_MOE}
_EXPERT = re.compile(r"^(decoder\.layers\.\d+\.)mlp\.experts\.local_experts\.(\d+)\.(.+)$")


def moe_target(ckpt: Checkpoint) -> Tuple[str, List[Tuple[bool, str]]]:
    """(llama.cpp architecture, [(holds, what it cannot represent otherwise)]) of a MoE model;
    the caller adds the Llama family's needs and refuses the first that does not hold."""
    m = ckpt.model
    shared = bool(m.moe_shared_expert_intermediate_size)
    target = "qwen2moe" if shared else ("qwen3moe" if m.qk_layernorm else "llama")
    renormalized = not m.moe_router_pre_softmax
    need = [
        (not ckpt.layer_shapes, "per-layer MLP widths or head counts in a mixture of experts"),
        (
            m.moe_router_score_function == "softmax",
            f"router score function {m.moe_router_score_function!r} (softmax gating only)",
        ),
        (
            not m.moe_router_enable_expert_bias,
            "a routing expert bias (moe_router_enable_expert_bias)",
        ),
        (
            m.moe_router_topk_scaling_factor in (None, 1.0),
            f"moe_router_topk_scaling_factor={m.moe_router_topk_scaling_factor}",
        ),
    ]
    if target == "qwen2moe":
        need += [
            (m.moe_shared_expert_gate, "a shared expert without its sigmoid gate"),
            (not m.qk_layernorm, "q/k norms beside a shared expert"),
            (not renormalized, "renormalized top-k weights (moe_router_pre_softmax=False)"),
            (not m.tie_embeddings, "tied embeddings (it requires output.weight)"),
            (
                m.num_attention_heads * m.kv_channels == m.hidden_size,
                f"trimmed heads ({m.num_attention_heads} x {m.kv_channels} != {m.hidden_size})",
            ),
        ]
    else:
        need += [
            (renormalized, "top-k weights not renormalized (moe_router_pre_softmax=True)"),
            (not m.add_qkv_bias, "q/k/v biases"),
        ]
    return target, need


def add_moe_hparams(w, m: ModelConfig) -> None:
    w.add_expert_count(m.num_moe_experts)
    w.add_expert_used_count(m.moe_router_topk)
    w.add_expert_feed_forward_length(m.moe_ffn_hidden_size)
    if m.moe_shared_expert_intermediate_size:
        w.add_expert_shared_feed_forward_length(m.moe_shared_expert_intermediate_size)


def stack_experts(m: ModelConfig, state) -> LazyState:
    """``state`` with each layer's per-expert tensors replaced by one ``STACKED`` tensor
    [E, ...] (expert e at index e), built when read."""
    stacked = {}  # stacked name -> its experts' names in order
    specs = {}
    for name in state:
        match = _EXPERT.match(name)
        if match is None:
            specs[name] = spec_of(state, name)
            continue
        prefix, _, rest = match.groups()
        stacked[f"{prefix}{STACKED}{rest}"] = [
            prefix + EXPERT.format(e=e) + rest for e in range(m.num_moe_experts)
        ]
    for name, experts in stacked.items():
        missing = [e for e in experts if e not in state]
        if missing:
            raise CheckpointError(f"GGUF export: canonical state has no {missing[0]!r}")
        spec = spec_of(state, experts[0])
        specs[name] = TensorSpec((len(experts), *spec.shape), spec.dtype)

    def read(name: str) -> torch.Tensor:
        if name in stacked:
            return torch.stack([state[e] for e in stacked[name]])
        return state[name]

    return LazyState(specs, read)
