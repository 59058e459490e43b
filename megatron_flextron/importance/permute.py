"""Stage 3 of importance ranking: apply unit orders to a canonical state (function-preserving).

Every weight that touches an axis is permuted with it: MLP neurons in fc1 rows (gate and up
blocks alike), the fc1 bias and fc2 columns; query heads in the QKV rows and bias (inside their KV
group for GQA; whole [q, k, v] head blocks for MHA) and the output-projection columns, and OLMoE's
q/k norm weights across heads (a weight per channel: the q channels of each head, the k channels
of each MHA head).
"""

from __future__ import annotations

import re
from typing import Mapping, Optional, Sequence

import torch

from megatron_flextron.checkpoint.state import LazyState, lazy_view
from megatron_flextron.config import ModelConfig
from megatron_flextron.elastic.layout import fc1_blocks, proj_heads, qkv_blocks

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_PERMUTED = re.compile(  # the tensors ``permute_state`` changes
    r"^decoder\.layers\.\d+\.(self_attention\.linear_qkv\.(weight|bias)"
    r"|self_attention\.(linear_proj|[qk]_layernorm)\.weight"
    r"|mlp\.linear_fc1\.(weight|bias)|mlp\.linear_fc2\.weight)$"
)

# OLMoE's q/k norms: the q weight has d channels per head; the k weight too under MHA (under
# GQA it has d per KV group, which heads never leave, so it keeps its order)
_NORMS = ("self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight")


def changes_with_orders(name: str) -> bool:
    """Whether a unit order can change this tensor (embeddings, norms other than OLMoE's q/k
    norms, and output biases never do): a model is re-loaded with another order by copying
    only these."""
    return bool(_PERMUTED.match(name))


def permute_state(
    state: Mapping[str, torch.Tensor],
    m: ModelConfig,
    mlp_orders: Optional[Sequence[torch.Tensor]] = None,
    head_orders: Optional[Sequence[torch.Tensor]] = None,
) -> LazyState:
    """A view of ``state`` whose unit i of layer l is the old unit ``orders[l][i]``; each tensor
    is permuted when read, so permuting a lazy state holds nothing."""
    g, n, d = m.num_query_groups, m.heads_per_group, m.kv_channels

    def permute(name: str, x: torch.Tensor) -> torch.Tensor:
        match = _LAYER.match(name)
        if not match:
            return x
        layer, rest = int(match.group(1)), match.group(2)
        if mlp_orders is not None:
            order = mlp_orders[layer]
            if rest in ("mlp.linear_fc1.weight", "mlp.linear_fc1.bias"):
                return fc1_blocks(x, m)[:, order].reshape(x.shape).contiguous()
            if rest == "mlp.linear_fc2.weight":
                return x[:, order].contiguous()
        if head_orders is not None:
            order = head_orders[layer]
            if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
                return _permute_qkv(x, order, g, n, d)
            if rest == "self_attention.linear_proj.weight":
                return proj_heads(x, g, n, d).flatten(1, 2)[:, order].reshape(x.shape).contiguous()
            if m.qk_layernorm_across_heads and rest in _NORMS and x.numel() == order.numel() * d:
                return x.view(-1, d)[order].reshape(x.shape).contiguous()  # a weight per head
        return x

    return lazy_view(state, permute, same_spec=True)


def _permute_qkv(x: torch.Tensor, order: torch.Tensor, g: int, n: int, d: int) -> torch.Tensor:
    rest = x.shape[1:]
    blocks = qkv_blocks(x, g, n, d)
    if n == 1:  # MHA: a head's q, k and v rows move together
        return blocks[order].reshape(-1, *rest).contiguous()
    within = order.reshape(g, n) - torch.arange(g).unsqueeze(1) * n  # [G, n] local indices
    if not torch.equal(within.sort(1).values, torch.arange(n).expand(g, n)):
        raise ValueError("a GQA head order must keep every head inside its KV group")
    q = torch.stack([blocks[j, within[j]] for j in range(g)])  # [G, n, d, ...]
    return torch.cat([q, blocks[:, n:]], dim=1).reshape(-1, *rest).contiguous()
