"""Elastic mixture of experts: megatron's MoELayer with three nested axes.

- experts: the first e of the (ranked) experts. The router computes the logits of those only
  (a prefix of its weight rows); the dropped experts' columns are -inf before the score function,
  so softmax normalizes over the kept experts, exactly as a model of e experts does, with or
  without renormalizing the top-k (megatron's ``moe_router_pre_softmax``); for sigmoid routers
  the expert bias of a dropped expert is -inf too, so it is never picked. The experts that got no
  tokens are not run. Under expert parallelism the placement (expert_placement.py) says which
  physical slots hold the kept experts: the first ones (contiguous), or spread over the EP ranks
  (balanced); the router's weight rows stay in the ranked order and it computes its logits in
  slot order.
- moe_ffn: the first f neurons of every expert (elastic linears, as the dense MLP), and the same
  fraction of the shared expert's.
- topk: k' <= k experts per token (megatron's router reads ``self.topk`` per call).

Shapes: hidden [s, b, h]; router weight [E, h] (ranked order); logits [s, b, E] (slot order);
expert e's fc1 [blocks * F / tp, h].
"""

from __future__ import annotations

import contextlib
import functools
from typing import List, Optional, Tuple

import torch
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.moe_utils import router_gating_linear
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group
from megatron.core.utils import get_pg_size

from megatron_flextron.elastic.expert_placement import check_placement, slot_experts
from megatron_flextron.elastic.linear import ElasticColumnParallelLinear, ElasticRowParallelLinear
from megatron_flextron.elastic.mlp import set_mlp_width, sliced_forward


class ElasticTopKRouter(TopKRouter):
    """megatron's top-k router over the first ``active_experts`` (ranked) experts with
    ``active_topk``, its logits in the order of the physical slots (``set_placement``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.full_topk = self.topk
        self.active_experts: Optional[int] = None
        self.slot_experts: Optional[torch.Tensor] = None  # [E] ranked expert of each slot (CPU)
        self._kept = {}  # (experts, device) -> (kept slots, their ranked rows)
        # soft architecture (elastic/soft_architecture.py): (expert scale [E], slot scale [K])
        self.soft_scales: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def set_placement(self, slots: Optional[List[int]]) -> None:
        """The ranked expert held by each physical slot; None: the identity (contiguous)."""
        self.slot_experts = None if slots is None else torch.tensor(slots, dtype=torch.long)
        self._kept = {}

    def set_soft_scales(
        self, expert_scale: Optional[torch.Tensor], slot_scale: Optional[torch.Tensor] = None
    ) -> None:
        """Multiply ranked expert e's routing weight by ``expert_scale[e]`` and a token's k-th
        largest weight by ``slot_scale[k]`` (gradients reach both); None: off."""
        self.soft_scales = None if expert_scale is None else (expert_scale, slot_scale)

    def set_active(self, experts: Optional[int], topk: Optional[int]) -> None:
        num = self.config.num_moe_experts
        experts = None if experts in (None, num) else experts
        topk = topk or self.full_topk
        if experts is not None and not 1 <= experts <= num:
            raise ValueError(f"experts {experts} must be in [1, {num}]")
        if not 1 <= topk <= min(self.full_topk, experts or num):
            raise ValueError(
                f"topk {topk} must be in [1, {min(self.full_topk, experts or num)}] (the source "
                f"routes {self.full_topk} of {experts or num} kept experts)"
            )
        self.active_experts, self.topk = experts, topk

    def _kept_slots(self, device: torch.device):
        """(slots holding a kept expert, ascending; their ranked indices) on ``device``, cached
        per sub-network (computed on the CPU: no device sync per call)."""
        key = (self.active_experts, device)
        if key not in self._kept:
            kept = self.active_experts or self.config.num_moe_experts
            slots = (self.slot_experts < kept).nonzero().squeeze(-1)
            self._kept[key] = (slots.to(device), self.slot_experts[slots].to(device))
        return self._kept[key]

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        if self.active_experts is None and self.slot_experts is None:
            return super().gating(input)
        dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(
            self.config.moe_router_dtype, input.dtype
        )
        num = self.config.num_moe_experts
        if self.slot_experts is None:  # the kept experts are the first rows and slots: views
            e = self.active_experts
            bias = None if self.bias is None else self.bias[:e]
            logits = router_gating_linear(input, self.weight[:e], bias, dtype)
            dropped = logits.new_full((*logits.shape[:-1], num - e), -torch.inf)
            return torch.cat([logits, dropped], dim=-1)
        slots, rows = self._kept_slots(input.device)
        bias = None if self.bias is None else self.bias.index_select(0, rows)
        kept = router_gating_linear(input, self.weight.index_select(0, rows), bias, dtype)
        if len(slots) == num:  # every slot kept: ``slots`` is 0..E-1
            return kept
        logits = kept.new_full((*kept.shape[:-1], num), -torch.inf)
        return logits.index_copy(-1, slots, kept)

    @contextlib.contextmanager
    def _slot_order(self):
        """For one routing call: the expert bias in slot order with the dropped experts at -inf,
        and megatron's per-expert token counts (which it adds to) in slot order, written back
        in the ranked order after the call (both buffers are stored ranked)."""
        if self.expert_bias is None or (self.active_experts is None and self.slot_experts is None):
            yield
            return
        bias, counts = self.expert_bias, self.local_tokens_per_expert
        masked = bias.clone()
        if self.active_experts is not None:
            masked[self.active_experts :] = -torch.inf
        index = None if self.slot_experts is None else self.slot_experts.to(bias.device)
        if index is not None:
            masked = masked[index]
            self._buffers["local_tokens_per_expert"] = counts[index]
        self._buffers["expert_bias"] = masked
        try:
            yield
        finally:
            self._buffers["expert_bias"] = bias
            if index is not None:
                counts.index_copy_(0, index, self._buffers["local_tokens_per_expert"])
                self._buffers["local_tokens_per_expert"] = counts

    def routing(self, logits, padding_mask=None):
        with self._slot_order():
            probs, routing_map = super().routing(logits, padding_mask=padding_mask)
        if self.soft_scales is None:
            return probs, routing_map
        expert_scale, slot_scale = self.soft_scales
        if self.slot_experts is not None:  # probs are in slot order; the scales in ranked order
            expert_scale = expert_scale[self.slot_experts.to(expert_scale.device)]
        return _soft_scaled(probs, routing_map, self.topk, expert_scale, slot_scale), routing_map


def _soft_scaled(probs, routing_map, topk: int, expert_scale, slot_scale) -> torch.Tensor:
    """probs [T, E] (zero off the routing map) times expert_scale [E] and, at each token's k-th
    largest routed weight, slot_scale[k]."""
    ranked = probs.masked_fill(~routing_map, -torch.inf).topk(topk, dim=-1).indices  # [T, k]
    slots = slot_scale[:topk].to(probs.dtype).expand(ranked.shape)
    return probs * expert_scale.to(probs.dtype) * torch.zeros_like(probs).scatter(-1, ranked, slots)


class ElasticSequentialMLP(SequentialMLP):
    """megatron's SequentialMLP whose experts run their first ``moe_ffn`` neurons, skipping the
    local experts routed no tokens (the dropped ones, whose permuted rows come last)."""

    # the ranked expert of each local one when the placement is not megatron's contiguous one
    canonical_expert_indices: Optional[List[int]] = None

    def set_width(self, width: Optional[int]) -> None:
        for expert in self.local_experts:
            set_mlp_width(expert, width)

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        counts = tokens_per_expert.tolist()
        used = [i for i, c in enumerate(counts) if c > 0]
        narrow = self.local_experts[0].linear_fc1.active_rows is not None
        if (
            (len(used) == len(counts) and not narrow)
            or self.config.moe_apply_probs_on_input
            or self.config.fp8
        ):
            return super().forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)
        tokens = torch.split(permuted_local_hidden_states, counts)
        probs = torch.split(permuted_probs, counts)
        outputs = [_run_expert(self.local_experts[i], tokens[i], probs[i]) for i in used]
        if not outputs:  # no token reached this rank's experts: an empty output that depends on
            # the dispatched tokens and weights, so this rank joins the dispatcher's backward
            # collectives (of both) as the ranks holding experts do
            weights = permuted_probs.unsqueeze(-1).to(permuted_local_hidden_states.dtype)
            return permuted_local_hidden_states * weights * 0, None
        return torch.cat(outputs, dim=0), None

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """megatron's, with every local expert stored under its ranked index instead of its
        slot: a checkpoint does not depend on the expert placement."""
        if self.canonical_expert_indices is None:
            return super().sharded_state_dict(prefix, sharded_offsets, metadata)
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        singleton = (metadata or {}).get("singleton_local_shards", False)
        num = self.config.num_moe_experts
        out = {}
        for j, (expert, c) in enumerate(zip(self.local_experts, self.canonical_expert_indices)):
            local = f"{prefix}local_experts.{j}."
            if singleton:
                stored, offsets = f"{prefix}experts.{c}.", sharded_offsets
            else:
                stored = f"{prefix}experts."
                offsets = (*sharded_offsets, (len(sharded_offsets), c, num))
            part = expert.sharded_state_dict(local, offsets, metadata)
            replace_prefix_for_sharding(part, local, stored)
            for tensor in part.values():  # replicas: the expert data-parallel copies only
                tensor.replica_id = (*tensor.replica_id[:2], self.dp_group.rank())
            out.update(part)
        return out


def _run_expert(expert, hidden: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """One expert (megatron's MLP) on its routed tokens, scaled by their router weights. At a
    reduced width the gate and up pieces of fc1 feed the GLU directly: megatron's MLP.forward
    calls fc1 once, which would concatenate them (a copy forward and backward, per expert and
    call: on CPU ~1.28x a narrow expert's training step instead of 1.14x)."""
    if expert.linear_fc1.active_rows is None:
        return expert(hidden, probs)[0]
    c = expert.config
    plain = c.gated_linear_unit and not (
        c.bias_activation_fusion
        or c.use_te_activation_func
        or c.activation_func_clamp_value is not None
        or c.add_bias_linear
    )
    if not plain:
        return expert(hidden, probs)[0]
    return sliced_forward(expert, hidden, probs)[0]


class ElasticMoELayer(MoELayer):
    """megatron's MoELayer with elastic experts, expert width and top-k (``set_active``),
    its experts placed over the EP ranks by ``expert_placement`` (expert_placement.py)."""

    def __init__(self, *args, expert_placement: str = "contiguous", **kwargs):
        check_placement(expert_placement)
        super().__init__(*args, **kwargs)
        self.active = (None, None, None)
        self.expert_placement = expert_placement
        num, ep = self.config.num_moe_experts, get_pg_size(self.ep_group)
        slots = slot_experts(expert_placement, num, ep)
        self.router.set_placement(slots)
        # the ranked (checkpoint) index of each local expert; local_expert_indices stay slots
        self.canonical_expert_indices = [
            s if slots is None else slots[s] for s in self.local_expert_indices
        ]
        if slots is not None:
            self.experts.canonical_expert_indices = self.canonical_expert_indices

    @property
    def full_moe_ffn(self) -> int:
        return self.config.moe_ffn_hidden_size

    def set_active(
        self,
        experts: Optional[int] = None,
        moe_ffn: Optional[int] = None,
        topk: Optional[int] = None,
    ) -> None:
        """Run the first ``experts`` experts, each on its first ``moe_ffn`` neurons (the shared
        expert on the same fraction of its own), routing ``topk`` per token; None: full."""
        full = self.full_moe_ffn
        shared_width = None
        if moe_ffn not in (None, full) and self.shared_experts is not None:
            shared_full = self.config.moe_shared_expert_intermediate_size
            if (moe_ffn * shared_full) % full:
                raise ValueError(
                    f"moe_ffn {moe_ffn} of {full} gives no whole width of the shared expert "
                    f"({shared_full} neurons)"
                )
            shared_width = moe_ffn * shared_full // full
        self.router.set_active(experts, topk)
        self.experts.set_width(moe_ffn)
        if self.shared_experts is not None:
            set_mlp_width(self.shared_experts, shared_width)
        self.active = (experts, moe_ffn, topk)


def moe_layer_spec(elastic: bool = True, expert_placement: str = "contiguous"):
    """The MoE builder of a TransformerLayer's ``mlp``: megatron's local MoE (SequentialMLP
    experts, TopKRouter, an optional shared expert), elastic or stock (contiguous only)."""
    if check_placement(expert_placement) != "contiguous" and not elastic:
        raise ValueError(f"expert placement {expert_placement!r} needs the elastic model")
    if not elastic:
        from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec

        return get_moe_module_spec(use_te=False, num_experts=1, moe_grouped_gemm=False)
    mlp = MLPSubmodules(
        linear_fc1=ElasticColumnParallelLinear, linear_fc2=ElasticRowParallelLinear
    )
    return functools.partial(
        ElasticMoELayer,
        submodules=MoESubmodules(
            experts=functools.partial(ElasticSequentialMLP, submodules=mlp),
            shared_experts=functools.partial(SharedExpertMLP, submodules=mlp),
            router=ElasticTopKRouter,
        ),
        expert_placement=expert_placement,
    )
