"""A probability-weighted architecture: every layer computes sum_c p_c f_c(x) exactly, by masks.

Widths are nested, so a mixture over the width choices c of a layer is one full-width pass whose
units are scaled by the probability that they are kept:

- MLP: the input of linear_fc2 (act(W1 x), this rank's neurons) times m_j = sum of p_c over the
  MLP choices that keep neuron j;
- attention: the input of linear_proj (the per-head outputs) times the same for query heads.

Both are exact because W2 and the output projection are linear in those units and units do not
interact before them. Depth (layer skipping): a layer's output is x + keep x (layer(x) - x), so
keep = 1 runs it and keep = 0 is the skipped layer's identity. With one-hot p (straight-through
samples) the forward equals the sliced sub-network (computed at full width), and gradients reach
p: this is how a router is trained jointly with the model. Masks follow the TP layout: the first
w/p local neurons, and for GQA the first h/G query heads of every local group (MHA: the first h/p
local heads). They are set through the elastic modules' own API (``set_input_scale`` of the row-
parallel linears, ``set_keep`` of the layer), not hooks.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from megatron.core import parallel_state

from megatron_flextron.elastic.blocks import transformer_blocks
from megatron_flextron.elastic.layout import head_position


def _keep(position: torch.Tensor, limits: Sequence[int]) -> torch.Tensor:
    """[choices, units]: unit with ``position`` is kept by a choice whose local limit exceeds it."""
    limits = torch.tensor(list(limits), device=position.device)
    return (position[None, :] < limits[:, None]).float()


def mlp_keep_matrix(mlp, widths: Sequence[int]) -> torch.Tensor:
    """[choices, local neurons]: 1 where the MLP width choice keeps this rank's neuron."""
    local = torch.arange(
        mlp.linear_fc2.input_size_per_partition, device=mlp.linear_fc2.weight.device
    )
    return _keep(local, [w // mlp.tp_size for w in widths])


def _head_keep(attn, heads: Sequence[int]) -> torch.Tensor:
    device = attn.linear_proj.weight.device
    n_local = attn.num_attention_heads_per_partition
    if attn.is_gqa:  # within-group index of every local query head, groups one after another
        per_group = attn.num_attention_heads_per_partition // attn.num_query_groups_per_partition
        position = head_position(n_local, per_group, device)
        return _keep(position, [h // attn.config.num_query_groups for h in heads])
    return _keep(torch.arange(n_local, device=device), [h // attn.world_size for h in heads])


def set_soft_architecture(
    model: torch.nn.Module,
    p_mlp: torch.Tensor,
    p_heads: torch.Tensor,
    mlp_choices: Sequence[int],
    head_choices: Sequence[int],
    p_keep: Optional[torch.Tensor] = None,
) -> None:
    """p_mlp [L, n_mlp], p_heads [L, n_heads] (global layers, choices largest first), p_keep [L]
    (each layer's weight; None: every layer runs). The model must be at full size
    (set_subnetwork(model, None, ...)); replaces earlier masks."""
    clear_soft_architecture(model)
    tp_rank = (
        parallel_state.get_tensor_model_parallel_rank()
        if parallel_state.model_parallel_is_initialized()
        else 0
    )
    for layer in transformer_blocks(model):
        index = layer.layer_number - 1
        mlp, attn = layer.mlp, layer.self_attention
        if mlp.active_width is not None or attn.active_heads is not None:
            raise ValueError("a soft architecture needs the full-size model (no sub-network)")
        # the router may live on another device (the CPU): .to() keeps its gradient path
        keep_mlp, keep_heads = mlp_keep_matrix(mlp, mlp_choices), _head_keep(attn, head_choices)
        m_mlp = p_mlp[index].float().to(keep_mlp.device) @ keep_mlp
        m_heads = p_heads[index].float().to(keep_heads.device) @ keep_heads
        mlp.linear_fc2.set_input_scale(m_mlp)
        attn.linear_proj.set_input_scale(m_heads, attn.hidden_size_per_attention_head)
        if p_keep is not None:
            keep = p_keep[index].float().to(keep_mlp.device)
            if tp_rank != 0:  # the residual stream is replicated over TP: one rank's gradient
                keep = keep.detach()  # of the gate is the whole of it (routers sum over TP)
            layer.set_keep(keep)


def clear_soft_architecture(model: torch.nn.Module) -> None:
    for layer in transformer_blocks(model):
        if hasattr(layer.mlp, "linear_fc2"):  # a dense MLP (soft masks are not over experts)
            layer.mlp.linear_fc2.set_input_scale(None)
        layer.self_attention.linear_proj.set_input_scale(None)
        layer.set_keep(None)
