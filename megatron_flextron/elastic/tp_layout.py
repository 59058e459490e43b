"""TP-aware nesting: how canonical (TP-independent) weights are dealt across tensor-parallel ranks.

Canonical order = the model's unit order after importance ranking (most important first); the
canonical state dict is the TP=1 megatron GPTModel state dict with global layer numbers. Every
elastic axis is dealt round-robin: canonical unit u lives on rank u % p at local index u // p, so
width k at TP=p is the first k/p local units of every rank and is exactly the first k canonical
units. A sub-network is therefore the same function at TP=1, 2, 4, ...

Units: an MLP neuron (gate and up rows of SwiGLU are two blocks cut together); a KV group for
attention (its [q_0..q_{n-1}, k, v] rows in QKV and its n heads' columns in the output
projection). Vocabulary-parallel tensors are split contiguously, as megatron does.

Megatron's own checkpoint resharding keeps the full model exact but not this order, so a change of
TP size goes through ``shard_canonical``/``unshard_canonical`` (the converter does this).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional

import torch

from megatron_flextron.config import ModelConfig
from megatron_flextron.elastic.layout import qkv_unit_rows


@dataclass(frozen=True)
class TPAxis:
    """How one parameter is split: along ``dim``, in ``blocks`` of units of ``unit_size`` rows."""

    dim: int
    dealt: bool  # round-robin (elastic axes) or contiguous (vocabulary)
    blocks: int = 1
    unit_size: int = 1


# OLMoE's q/k norms (qk_norm.py): q and k channels per KV group, given its n query heads
_ACROSS_HEADS_NORMS = {
    "self_attention.q_layernorm.weight": lambda n: n,
    "self_attention.k_layernorm.weight": lambda n: 1,
}
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_MLP = re.compile(r"^mlp\.(?:experts\.local_experts\.\d+\.|shared_experts\.)?(.+)$")
_EXPERT = re.compile(r"^(.*\.experts\.local_experts\.)(\d+)(\..+)$")


def tp_axis(name: str, model: ModelConfig) -> Optional[TPAxis]:
    """The TP split of a canonical parameter name, or None when it is replicated."""
    d, n = model.kv_channels, model.heads_per_group
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return TPAxis(dim=0, dealt=False)
    match = _LAYER.match(name)
    rest = match.group(2) if match else ""
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        return TPAxis(dim=0, dealt=True, unit_size=qkv_unit_rows(model))
    if rest == "self_attention.linear_proj.weight":
        return TPAxis(dim=1, dealt=True, unit_size=n * d)
    if model.qk_layernorm_across_heads and rest in _ACROSS_HEADS_NORMS:  # a KV group's channels
        return TPAxis(dim=0, dealt=True, unit_size=_ACROSS_HEADS_NORMS[rest](n) * d)
    mlp = _MLP.match(rest)  # the dense MLP, an expert, or the shared expert
    if mlp and mlp.group(1) in ("linear_fc1.weight", "linear_fc1.bias"):
        return TPAxis(dim=0, dealt=True, blocks=2 if model.gated else 1)
    if mlp and mlp.group(1) == "linear_fc2.weight":
        return TPAxis(dim=1, dealt=True)
    return None


def shard_tensor(full: torch.Tensor, axis: TPAxis, tp_size: int, tp_rank: int) -> torch.Tensor:
    """This rank's shard of a canonical tensor."""
    x = full.movedim(axis.dim, 0)
    rest = x.shape[1:]
    if not axis.dealt:
        return x.reshape(tp_size, -1, *rest)[tp_rank].movedim(0, axis.dim).contiguous()
    units = x.shape[0] // (axis.blocks * axis.unit_size)
    if units % tp_size:
        raise ValueError(f"{units} units along dim {axis.dim} do not divide by TP size {tp_size}")
    x = x.reshape(axis.blocks, units // tp_size, tp_size, axis.unit_size, *rest)[:, :, tp_rank]
    return x.reshape(-1, *rest).movedim(0, axis.dim).contiguous()


def unshard_tensor(shards: List[torch.Tensor], axis: TPAxis) -> torch.Tensor:
    """The canonical tensor from every rank's shard (inverse of ``shard_tensor``)."""
    xs = [s.movedim(axis.dim, 0) for s in shards]
    rest = xs[0].shape[1:]
    if not axis.dealt:
        return torch.cat(xs, 0).movedim(0, axis.dim)
    xs = [x.reshape(axis.blocks, -1, axis.unit_size, *rest) for x in xs]
    return torch.stack(xs, dim=2).reshape(-1, *rest).movedim(0, axis.dim)


def to_dealt_global(full: torch.Tensor, axis: TPAxis, tp_size: int) -> torch.Tensor:
    """The concatenation of every rank's dealt shard: what megatron's contiguous TP split of a
    checkpoint hands back to rank r as ``shard_tensor(full, axis, tp_size, r)``."""
    if not axis.dealt or tp_size == 1:
        return full
    return (
        torch.cat(
            [
                shard_tensor(full, axis, tp_size, r).movedim(axis.dim, 0).reshape(axis.blocks, -1)
                for r in range(tp_size)
            ],
            dim=1,
        )
        .reshape(full.movedim(axis.dim, 0).shape)
        .movedim(0, axis.dim)
    )


def from_dealt_global(dealt: torch.Tensor, axis: TPAxis, tp_size: int) -> torch.Tensor:
    """Inverse of ``to_dealt_global``."""
    if not axis.dealt or tp_size == 1:
        return dealt
    x = dealt.movedim(axis.dim, 0)
    per_rank = x.reshape(axis.blocks, tp_size, -1, *x.shape[1:])  # [blocks, p, rows/p, ...]
    shards = [per_rank[:, r].reshape(-1, *x.shape[1:]).movedim(0, axis.dim) for r in range(tp_size)]
    return unshard_tensor(shards, axis)


def local_to_global_names(model: torch.nn.Module) -> Dict[str, str]:
    """Map this rank's parameter names (and routing-bias buffers) to canonical names: global
    layer numbers, and global (ranked) expert indices: under expert parallelism local expert j
    of EP rank r is expert r * local + j when placed contiguously, as megatron does, or
    j * EP + r when balanced (elastic/expert_placement.py)."""
    from megatron_flextron.elastic.blocks import canonical_name, is_hybrid, unwrap_model

    gpt = unwrap_model(model)
    hybrid = is_hybrid(gpt)
    offsets = {str(i): str(layer.layer_number - 1) for i, layer in enumerate(gpt.decoder.layers)}
    names = {}
    for name, _ in model_tensors(gpt):
        match = _LAYER.match(name)
        name_global = (
            f"decoder.layers.{offsets[match.group(1)]}.{match.group(2)}" if match else name
        )
        expert = _EXPERT.match(name_global)
        if expert:
            ranked = _ranked_expert(gpt, name, int(expert.group(2)))
            name_global = f"{expert.group(1)}{ranked}{expert.group(3)}"
        names[name] = canonical_name(name_global) if hybrid else name_global
    return names


def model_tensors(model: torch.nn.Module):
    """(name, tensor) of what a canonical state holds: the parameters, and the routers'
    expert bias (a buffer that changes which experts a token picks)."""
    yield from model.named_parameters()
    for name, buffer in model.named_buffers():
        if name.endswith("router.expert_bias"):
            yield name, buffer


def _ranked_expert(gpt: torch.nn.Module, name: str, local: int) -> int:
    """The global (ranked) index of local expert ``local`` of the MoE layer owning ``name``
    (megatron's own MoELayer places contiguously)."""
    layer = gpt.get_submodule(name[: name.index(".experts.local_experts.")])
    indices = getattr(layer, "canonical_expert_indices", layer.local_expert_indices)
    return indices[local]


def expert_parallel_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_expert_model_parallel_world_size()


def load_canonical_state_dict(
    model: torch.nn.Module,
    canonical: Mapping[str, torch.Tensor],
    model_config: ModelConfig,
    only: Optional[Callable[[str], bool]] = None,
) -> None:
    """Copy canonical weights into this rank's (TP shard, PP stage) parameters, dealing as above
    (``only``: just the names it accepts). A lazy state is read one tensor at a time."""
    from megatron.core import parallel_state

    from megatron_flextron.elastic.subnetwork import unwrap_model

    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    params = dict(model_tensors(unwrap_model(model)))
    with torch.no_grad():
        for local, name in local_to_global_names(model).items():
            if only is not None and not only(name):
                continue
            source = name
            if name == "output_layer.weight" and name not in canonical:
                source = "embedding.word_embeddings.weight"  # tied head on the last PP stage
            if source not in canonical:
                raise KeyError(f"canonical state dict has no {source!r}")
            full = canonical[source]
            axis = tp_axis(name, model_config)
            value = full if axis is None else shard_tensor(full, axis, tp_size, tp_rank)
            if value.shape != params[local].shape:
                raise ValueError(
                    f"{name}: canonical shard has shape {tuple(value.shape)}, "
                    f"the model expects {tuple(params[local].shape)}"
                )
            params[local].copy_(value)


def gather_canonical(
    model: torch.nn.Module, model_config: ModelConfig, grads: bool = False
) -> Dict[str, torch.Tensor]:
    """This PP stage's parameters (or their gradients) in canonical, TP-independent form.

    Collective over the tensor-parallel group. Gradients use ``main_grad`` under megatron DDP.
    """
    from megatron.core import parallel_state

    from megatron_flextron.elastic.subnetwork import unwrap_model

    group = parallel_state.get_tensor_model_parallel_group()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    params = dict(model_tensors(unwrap_model(model)))
    out = {}
    for local, name in local_to_global_names(model).items():
        p = params[local]
        tensor = _grad_of(p) if grads else p.detach()
        axis = tp_axis(name, model_config)
        if axis is None or tp_size == 1:
            out[name] = tensor.clone()
            continue
        shards = [torch.empty_like(tensor) for _ in range(tp_size)]
        torch.distributed.all_gather(shards, tensor.contiguous(), group=group)
        out[name] = unshard_tensor(shards, axis)
    if expert_parallel_size() > 1:
        out.update(_gather_experts(out))
    return out


def _gather_experts(out: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Every EP rank's experts (each rank holds its own, under the same local layout)."""
    from megatron.core import parallel_state

    group = parallel_state.get_expert_model_parallel_group()
    names = sorted(name for name in out if _EXPERT.match(name))
    gathered = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(gathered, {n: out[n] for n in names}, group=group)
    return {name: tensor for part in gathered for name, tensor in part.items()}


def _grad_of(p: torch.nn.Parameter) -> torch.Tensor:
    grad = getattr(p, "main_grad", None)
    if grad is None:
        grad = p.grad
    return torch.zeros_like(p) if grad is None else grad.detach()
