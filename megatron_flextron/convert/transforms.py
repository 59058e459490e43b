"""Small named tensor transforms between checkpoint layouts. Each has its inverse next to it.

Megatron's fused QKV weight is laid out per KV group: [G, (n query heads, k, v), d, in], where n is
the number of query heads per group (1 for MHA). Megatron's SwiGLU fc1 is [gate; up].
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch

from megatron_flextron.elastic.layout import qkv_blocks


def qkv_fuse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """Separate q [G*n*d, ...], k, v [G*d, ...] (weights or biases) -> megatron's fused rows."""
    rest = q.shape[1:]
    q = q.reshape(groups, -1, *rest)  # [G, n*d, ...]
    k = k.reshape(groups, -1, *rest)
    v = v.reshape(groups, -1, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def qkv_split(qkv: torch.Tensor, groups: int, heads_per_group: int) -> Tuple[torch.Tensor, ...]:
    """Inverse of ``qkv_fuse``: megatron's fused rows -> (q, k, v)."""
    rest = qkv.shape[1:]
    x = qkv_blocks(qkv, groups, heads_per_group, -1)  # [G, n + 2, d, ...]
    q, k, v = x[:, :heads_per_group], x[:, heads_per_group], x[:, heads_per_group + 1]
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def qkv_stacked_to_fused(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """GPT-2 style [q_all; k_all; v_all] rows (MHA) -> megatron's per-head [q_h, k_h, v_h]."""
    q, k, v = qkv.chunk(3, dim=0)
    return qkv_fuse(q, k, v, groups=heads)


def qkv_fused_to_stacked(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    return torch.cat(qkv_split(qkv, groups=heads, heads_per_group=1), dim=0)


def gate_up_fuse(gate: torch.Tensor, up: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``dim``: the rows' axis (1 for experts stacked [E, rows, in])."""
    return torch.cat([gate, up], dim=dim)


def gate_up_split(fc1: torch.Tensor, dim: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    gate, up = fc1.chunk(2, dim=dim)
    return gate, up


def llama_cpp_unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp stores Q/K rows of each head interleaved for its RoPE kernel; undo it.

    [heads * d, in] viewed as (heads, d/2, 2, in) with axes 1 and 2 swapped back.
    """
    rest = w.shape[1:]
    return w.reshape(heads, -1, 2, *rest).transpose(1, 2).reshape(-1, *rest)


def llama_cpp_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    rest = w.shape[1:]
    return w.reshape(heads, 2, -1, *rest).transpose(1, 2).reshape(-1, *rest)


def transpose(w: torch.Tensor) -> torch.Tensor:
    """GPT-2's Conv1D stores weights as [in, out]; linear layers want [out, in]."""
    return w.t().contiguous()


def tp_merge(shards: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    """Megatron (legacy) contiguous TP shards -> the full tensor."""
    return torch.cat(list(shards), dim=dim)


def tp_merge_glu(shards: Sequence[torch.Tensor]) -> torch.Tensor:
    """Legacy SwiGLU fc1 shards hold [gate_r; up_r] each: merge gates and ups separately."""
    gates, ups = zip(*(s.chunk(2, dim=0) for s in shards))
    return torch.cat([*gates, *ups], dim=0)
