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

Mixtures of experts run the sampled (hard) sub-network sliced as usual (``set_active``: a
soft mixture over expert counts would run every expert) and multiply by straight-through masks
that equal 1 at the sample: expert e's routing weight by m_e = sum_c p_c [e < n_c], a token's
k-th largest routing weight by sum_c p_c [k < k_c] (the router's ``set_soft_scales``), and each
expert's (and the shared expert's) hidden unit j by sum_c p_c [j < w_c] (fc2's input scale).
The forward is the sliced sub-network's exactly; the gradient reaches the probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from megatron.core import parallel_state

from megatron_flextron.elastic.blocks import transformer_blocks
from megatron_flextron.elastic.layout import head_position
from megatron_flextron.elastic.moe import ElasticMoELayer


@dataclass(frozen=True)
class MoEProbabilities:
    """A mixture of experts' per-layer probabilities over its choices (largest first): experts
    [L, n_e], moe_ffn [L, n_f], topk [L, n_k]; ``choices``: (expert counts, widths, top-k).
    The sampled choice of a layer is each axis' argmax (one-hot in training)."""

    experts: torch.Tensor
    moe_ffn: torch.Tensor
    topk: torch.Tensor
    choices: Tuple[Sequence[int], Sequence[int], Sequence[int]]


def _keep(position: torch.Tensor, limits: Sequence[int]) -> torch.Tensor:
    """[choices, units]: unit with ``position`` is kept by a choice whose local limit exceeds it."""
    limits = torch.tensor(list(limits), device=position.device)
    return (position[None, :] < limits[:, None]).float()


def mlp_keep_matrix(mlp, widths: Sequence[int]) -> torch.Tensor:
    """[choices, local neurons]: 1 where the MLP width choice keeps this rank's neuron (any
    megatron MLP with elastic linears: dense, an expert, a shared expert)."""
    fc2 = mlp.linear_fc2
    local = torch.arange(fc2.input_size_per_partition, device=fc2.weight.device)
    return _keep(local, [w // (fc2.input_size // fc2.input_size_per_partition) for w in widths])


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
    moe: Optional[MoEProbabilities] = None,
) -> None:
    """p_mlp [L, n_mlp], p_heads [L, n_heads] (global layers, choices largest first), p_keep [L]
    (each layer's weight; None: every layer runs); ``moe``: a mixture of experts' choices (its
    p_mlp may be None: it has no dense MLP). The model must be at full size
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
        is_moe = isinstance(mlp, ElasticMoELayer)
        sliced = _moe_sliced(mlp) if is_moe else mlp.active_width is not None
        if sliced or attn.active_heads is not None:
            raise ValueError("a soft architecture needs the full-size model (no sub-network)")
        # the router may live on another device (the CPU): .to() keeps its gradient path
        keep_heads = _head_keep(attn, head_choices)
        m_heads = p_heads[index].float().to(keep_heads.device) @ keep_heads
        attn.linear_proj.set_input_scale(m_heads, attn.hidden_size_per_attention_head)
        if is_moe:
            if moe is None:
                raise ValueError(
                    "a mixture of experts' soft architecture needs the probabilities of its "
                    "expert, expert width and top-k choices (moe=MoEProbabilities(...))"
                )
            _set_soft_moe(mlp, moe, index)
        else:
            keep_mlp = mlp_keep_matrix(mlp, mlp_choices)
            mlp.linear_fc2.set_input_scale(p_mlp[index].float().to(keep_mlp.device) @ keep_mlp)
        if p_keep is not None:
            keep = p_keep[index].float().to(keep_heads.device)
            if tp_rank != 0:  # the residual stream is replicated over TP: one rank's gradient
                keep = keep.detach()  # of the gate is the whole of it (routers sum over TP)
            layer.set_keep(keep)


def _moe_sliced(layer: ElasticMoELayer) -> bool:
    c = layer.config
    full = (c.num_moe_experts, c.moe_ffn_hidden_size, layer.router.full_topk)
    return any(v not in (None, f) for v, f in zip(layer.active, full))


def _set_soft_moe(layer: ElasticMoELayer, moe: MoEProbabilities, index: int) -> None:
    """The layer runs its sampled choice, sliced, times masks equal to 1 there (module doc)."""
    probs = [p[index].float() for p in (moe.experts, moe.moe_ffn, moe.topk)]
    experts, width, topk = (c[int(p.argmax())] for c, p in zip(moe.choices, probs))
    layer.set_active(experts, width, topk)
    device = layer.router.weight.device
    p_experts, p_width, p_topk = (p.to(device) for p in probs)
    config = layer.config
    expert_scale = p_experts @ _keep(
        torch.arange(config.num_moe_experts, device=device), moe.choices[0]
    )
    slot_scale = p_topk @ _keep(torch.arange(layer.router.full_topk, device=device), moe.choices[2])
    layer.router.set_soft_scales(expert_scale, slot_scale)
    mlps = [(e, moe.choices[1], width) for e in layer.experts.local_experts]
    if layer.shared_experts is not None:  # the same fraction of its own neurons
        shared, full = config.moe_shared_expert_intermediate_size, config.moe_ffn_hidden_size
        mlps.append(
            (
                layer.shared_experts,
                [w * shared // full for w in moe.choices[1]],
                width * shared // full,
            )
        )
    for mlp, widths, active in mlps:
        fc2 = mlp.linear_fc2
        local = active // (fc2.input_size // fc2.input_size_per_partition)
        fc2.set_input_scale((p_width @ mlp_keep_matrix(mlp, widths))[:local])


def clear_soft_architecture(model: torch.nn.Module) -> None:
    for layer in transformer_blocks(model):
        if isinstance(layer.mlp, ElasticMoELayer):
            layer.mlp.router.set_soft_scales(None)
            mlps = list(layer.mlp.experts.local_experts)
            if layer.mlp.shared_experts is not None:
                mlps.append(layer.mlp.shared_experts)
        else:
            mlps = [layer.mlp]
        for mlp in mlps:
            mlp.linear_fc2.set_input_scale(None)
        layer.self_attention.linear_proj.set_input_scale(None)
        layer.set_keep(None)
