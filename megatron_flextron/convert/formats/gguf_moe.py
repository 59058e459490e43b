"""GGUF mixtures of experts, the MoE half of ``gguf.py``: which llama.cpp architecture runs a
model exactly, its MoE metadata, and the experts stacked as llama.cpp stores them; the reader
(``moe_fields``, ``unstack_experts``) inverts each with the same key maps.

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

Read back, the architecture fixes the routing the same way; MoE metadata that says otherwise
(``expert_gating_func`` other than softmax, ``expert_weights_scale`` != 1, ``expert_weights_norm``
against the architecture's, dense leading blocks, expert groups, ...) is refused by key.
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
_LAYER = r"^(decoder\.layers\.\d+\.)"
_EXPERT = re.compile(_LAYER + re.escape(EXPERT).replace(r"\{e\}", r"(\d+)") + "(.+)$")
_STACKED = re.compile(_LAYER + re.escape(STACKED) + "(.+)$")
# MoE metadata words: a key with one the reader does not map is refused (it may change routing)
_MOE_WORDS = re.compile(r"expert|moe|dense|shexp|swiglu|group")


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


def moe_fields(reader, arch: str, field) -> dict:
    """The ModelConfig fields of a llama.cpp MoE file (``field(key, default)`` reads metadata):
    its architecture's routing, sizes from its metadata; any other MoE metadata refused by key."""
    renormalized = arch != "qwen2moe"  # llama.cpp's graphs: qwen2moe alone does not renormalize
    fixed = {  # key -> (value llama.cpp's graph computes with, why)
        "expert_count": (None, ""),
        "expert_used_count": (None, ""),
        "expert_feed_forward_length": (None, ""),
        "expert_gating_func": (1, "softmax gating only (1)"),
        "expert_weights_scale": (1.0, "top-k weights unscaled"),
        "expert_weights_norm": (
            renormalized,
            f"llama.cpp's {arch} ignores it and {'' if renormalized else 'does not '}renormalize"
            "s the top-k weights",
        ),
        "leading_dense_block_count": (0, "every layer a mixture of experts"),
    }
    if arch == "qwen2moe":
        fixed.update(expert_shared_feed_forward_length=(None, ""), expert_shared_count=(1, "one"))
    for key in reader.fields:
        name = key[len(arch) + 1 :]
        if not key.startswith(arch + ".") or not _MOE_WORDS.search(name):
            continue
        want, why = fixed.get(name, ("unmapped", "no megatron equivalent"))
        value = reader.fields[key].contents()
        if want is not None and value != want:
            raise CheckpointError(f"GGUF {key}={value!r} is not supported ({why})")
    width = int(field(f"{arch}.feed_forward_length"))
    if arch == "llama":  # Mixtral: llama.cpp sizes the experts by feed_forward_length
        expert_width = int(field(f"{arch}.expert_feed_forward_length", width))
        if expert_width != width:
            raise CheckpointError(
                f"GGUF {arch}.expert_feed_forward_length={expert_width} is not supported "
                f"(llama.cpp's llama sizes the experts by feed_forward_length={width})"
            )
    else:
        width = int(field(f"{arch}.expert_feed_forward_length"))
    out = dict(
        num_moe_experts=int(field(f"{arch}.expert_count")),
        moe_router_topk=int(field(f"{arch}.expert_used_count")),
        moe_ffn_hidden_size=width,
        moe_router_pre_softmax=not renormalized,
    )
    if arch == "qwen2moe":  # its shared expert always has its sigmoid gate; biases are optional
        out.update(
            moe_shared_expert_intermediate_size=int(
                field(f"{arch}.expert_shared_feed_forward_length")
            ),
            moe_shared_expert_gate=True,
            add_qkv_bias="blk.0.attn_q.bias" in {t.name for t in reader.tensors},
        )
    return out


def unstack_experts(m: ModelConfig, state: LazyState) -> LazyState:
    """The inverse of ``stack_experts``: each ``STACKED`` tensor [E, ...] replaced by its
    experts' tensors (expert e at index e); a layer's stack is read once for all its experts
    when they are read in order."""
    experts = {}  # expert name -> (stacked name, e)
    specs = {}
    for name, spec in state.specs.items():
        match = _STACKED.match(name)
        if match is None:
            specs[name] = spec
            continue
        if spec.shape[0] != m.num_moe_experts:
            raise CheckpointError(
                f"GGUF: {name} stacks {spec.shape[0]} experts, expert_count is {m.num_moe_experts}"
            )
        prefix, rest = match.groups()
        for e in range(m.num_moe_experts):
            experts[prefix + EXPERT.format(e=e) + rest] = (name, e)
            specs[prefix + EXPERT.format(e=e) + rest] = TensorSpec(spec.shape[1:], spec.dtype)
    last = {}  # the last stack read: name -> tensor

    def read(name: str) -> torch.Tensor:
        if name not in experts:
            return state[name]
        stacked, e = experts[name]
        if stacked not in last:
            last.clear()
            last[stacked] = state[stacked]
        return last[stacked][e].clone()

    return LazyState(specs, read)
