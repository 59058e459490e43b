"""Where the units of each elastic axis sit in megatron's tensors, and what they cost.

One module for slicing, soft masks, export, importance permutation, TP dealing and the cost model:

- fused QKV rows (weight and bias): per KV group ``[q_0 .. q_{n-1}, k, v]``, each block ``d`` rows
  (n = query heads per group; MHA is n = 1 with one group per head, so whole heads are units);
- output projection columns: per group ``[q_0 .. q_{n-1}]``, ``d`` columns each;
- fc1 rows: ``blocks`` (gate, then up for SwiGLU) of F neurons each; fc2 columns: F neurons.

A head count h keeps every KV group under GQA and its first h/G query heads; under MHA the first
h heads. Shapes: G groups, n query heads per group, d head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from megatron_flextron.config import ModelConfig


def qkv_unit_rows(model: ModelConfig) -> int:
    """Rows of one KV group's block in the fused QKV weight: (n + 2) x d."""
    return (model.heads_per_group + 2) * model.kv_channels


def kept_per_group(model: ModelConfig, heads: int) -> int:
    """Query heads kept in every KV group (GQA), or heads kept in all (MHA: one per group)."""
    return heads // model.num_query_groups if model.is_gqa else heads


def qkv_blocks(x: torch.Tensor, groups: int, n: int, d: int) -> torch.Tensor:
    """Fused QKV rows [G (n + 2) d, ...] -> [G, n + 2, d, ...] (a view)."""
    return x.reshape(groups, n + 2, d, *x.shape[1:])


def proj_heads(w: torch.Tensor, groups: int, n: int, d: int) -> torch.Tensor:
    """Output-projection weight [h, G n d] -> [h, G, n, d] (a view)."""
    return w.reshape(w.shape[0], groups, n, d)


def keep_qkv(x: torch.Tensor, groups: int, n: int, d: int, kept: int) -> torch.Tensor:
    """The fused QKV rows of the first ``kept`` query heads of every group (GQA) with its k, v,
    or (n = 1, MHA) of the first ``kept`` whole heads."""
    blocks = qkv_blocks(x, groups, n, d)
    blocks = torch.cat([blocks[:, :kept], blocks[:, n:]], 1) if n > 1 else blocks[:kept]
    return blocks.reshape(-1, *x.shape[1:])


def keep_proj(w: torch.Tensor, groups: int, n: int, d: int, kept: int) -> torch.Tensor:
    """The output-projection columns that match ``keep_qkv``."""
    heads = proj_heads(w, groups, n, d)
    heads = heads[:, :, :kept] if n > 1 else heads[:, :kept]
    return heads.reshape(w.shape[0], -1)


def qkv_row_index(groups: int, n: int, d: int, kept: int, device=None) -> torch.Tensor:
    """Indices of the rows ``keep_qkv`` keeps (GQA: not contiguous, so a gather)."""
    group = torch.arange(groups, device=device).unsqueeze(1)
    q_rows = group * (n + 2) * d + torch.arange(kept * d, device=device)
    kv_rows = group * (n + 2) * d + n * d + torch.arange(2 * d, device=device)
    return torch.cat([q_rows, kv_rows], dim=1).reshape(-1)


def proj_col_index(groups: int, n: int, d: int, kept: int, device=None) -> torch.Tensor:
    """Indices of the output-projection columns ``keep_proj`` keeps."""
    group = torch.arange(groups, device=device).unsqueeze(1)
    return (group * n * d + torch.arange(kept * d, device=device)).reshape(-1)


def head_position(num_heads: int, n: int, device=None) -> torch.Tensor:
    """Each query head's index inside its KV group (heads listed group after group)."""
    return torch.arange(num_heads, device=device) % n


def fc1_blocks(x: torch.Tensor, model: ModelConfig) -> torch.Tensor:
    """fc1 rows [blocks F, ...] -> [blocks, F, ...] (gate and up cut together)."""
    return x.reshape(2 if model.gated else 1, model.ffn_hidden_size, *x.shape[1:])


@dataclass(frozen=True)
class ParameterUnits:
    """Parameters per MLP neuron, per query head, per attention and per MLP besides those, and
    outside the layers: a sub-network's count is linear in its widths."""

    per_neuron: int
    per_head: int
    per_attention: int
    per_mlp: int
    outside: int

    @classmethod
    def of(cls, m: ModelConfig) -> "ParameterUnits":
        h, d, g = m.hidden_size, m.kv_channels, m.num_query_groups
        bias = 1 if m.add_bias_linear else 0
        qkv_bias = 1 if m.has_qkv_bias else 0  # Qwen2: a bias on the QKV rows only
        blocks = 2 if m.gated else 1
        per_channel = 2 if m.normalization == "LayerNorm" else 1  # norm weight (and bias)
        norm = per_channel * h
        # MHA: each head brings its own k and v rows; GQA: the groups' k, v rows are constant
        per_head = d * (h + qkv_bias) + d * h + (0 if m.is_gqa else 2 * d * (h + qkv_bias))
        per_attention = (2 * g * d * (h + qkv_bias) if m.is_gqa else 0) + bias * h + norm
        if m.qk_layernorm_across_heads:  # OLMoE: a q norm weight per channel, a k one per kv
            per_head += d + (0 if m.is_gqa else d)
            per_attention += g * d if m.is_gqa else 0
        elif m.qk_layernorm:  # one q and one k norm over the head dim, whatever the head count
            per_attention += 2 * per_channel * d
        outside = m.vocab_size * h * (1 if m.tie_embeddings else 2) + norm
        if m.position_embedding == "learned_absolute":
            outside += m.max_position_embeddings * h
        return cls(blocks * (h + bias) + h, per_head, per_attention, bias * h + norm, outside)

    @property
    def per_layer(self) -> int:
        return self.per_attention + self.per_mlp

    def attention(self, heads: int) -> int:
        return self.per_attention + heads * self.per_head

    def mlp(self, width: int) -> int:
        return self.per_mlp + width * self.per_neuron

    def layer(self, width: int, heads: int) -> int:
        return self.attention(heads) + self.mlp(width)


def moe_parameters(m: ModelConfig, experts: int, width: int, topk: int) -> Tuple[int, int]:
    """(total, active per token) parameters of one MoE layer with ``experts`` experts of
    ``width`` neurons routing ``topk`` each (its shared expert on the same fraction of its own
    width, the router and its expert bias, the pre-MLP norm): memory counts every expert,
    compute only the top-k."""
    h, blocks = m.hidden_size, 2 if m.gated else 1
    norm = 2 * h if m.normalization == "LayerNorm" else h
    per_expert = (blocks + 1) * h * width
    shared = 0
    if m.moe_shared_expert_intermediate_size:
        shared_width = m.moe_shared_expert_intermediate_size * width // m.moe_ffn_hidden_size
        shared = (blocks + 1) * h * shared_width + (h if m.moe_shared_expert_gate else 0)
    router = experts * (h + (1 if m.moe_router_enable_expert_bias else 0))
    fixed = router + shared + norm
    return fixed + experts * per_expert, fixed + topk * per_expert


def count_layer_parameters(
    model: ModelConfig,
    widths: Sequence[int],
    heads: Sequence[int],
    layers: Sequence[int],
    skip_attention: Sequence[int] = (),
    skip_mlp: Sequence[int] = (),
    moe: Optional[Sequence[Tuple[int, int, int]]] = None,
) -> dict:
    """Parameter counts of per-layer widths over the kept ``layers`` (less the attention or MLP
    of the layers listed to skip it): transformer layers, and total with embeddings and the
    final norm. ``moe``: (experts, expert width, top-k) per layer of a mixture of experts, which
    adds ``active``, the parameters one token runs through (``total`` is what memory holds)."""
    units = ParameterUnits.of(model)
    transformer = active = 0
    for i in layers:
        attention = 0 if i in skip_attention else units.attention(heads[i])
        if moe is None:
            mlp = (0, 0) if i in skip_mlp else (units.mlp(widths[i]),) * 2
        else:
            mlp = (0, 0) if i in skip_mlp else moe_parameters(model, *moe[i])
        transformer += attention + mlp[0]
        active += attention + mlp[1]
    out = {"transformer": transformer, "total": transformer + units.outside}
    if moe is not None:
        out["active"] = active + units.outside
    return out
