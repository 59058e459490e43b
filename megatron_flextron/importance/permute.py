"""Stage 3 of importance ranking: apply unit orders to a canonical state (function-preserving).

Every weight that touches an axis is permuted with it: MLP neurons in fc1 rows (gate and up
blocks alike), the fc1 bias and fc2 columns; query heads in the QKV rows and bias (inside their KV
group for GQA; whole [q, k, v] head blocks for MHA) and the output-projection columns.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from megatron_flextron.config import ModelConfig
from megatron_flextron.elastic.layout import fc1_blocks, proj_heads, qkv_blocks


def permute_state(
    state: Dict[str, torch.Tensor],
    m: ModelConfig,
    mlp_orders: Optional[Sequence[torch.Tensor]] = None,
    head_orders: Optional[Sequence[torch.Tensor]] = None,
) -> Dict[str, torch.Tensor]:
    """A new state whose unit i of layer l is the old unit ``orders[l][i]``."""
    out = dict(state)
    g, n, d = m.num_query_groups, m.heads_per_group, m.kv_channels
    for layer in range(m.num_layers):
        p = f"decoder.layers.{layer}."
        if mlp_orders is not None:
            order = mlp_orders[layer]
            for name in ("mlp.linear_fc1.weight", "mlp.linear_fc1.bias"):
                if p + name in state:
                    x = state[p + name]
                    x = fc1_blocks(x, m)[:, order]
                    out[p + name] = x.reshape(-1, *state[p + name].shape[1:]).contiguous()
            out[p + "mlp.linear_fc2.weight"] = state[p + "mlp.linear_fc2.weight"][
                :, order
            ].contiguous()
        if head_orders is not None:
            order = head_orders[layer]
            for name in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
                if p + name in state:
                    out[p + name] = _permute_qkv(state[p + name], order, g, n, d)
            w = state[p + "self_attention.linear_proj.weight"]
            heads = proj_heads(w, g, n, d).flatten(1, 2)[:, order]
            out[p + "self_attention.linear_proj.weight"] = heads.reshape(w.shape).contiguous()
    return out


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
