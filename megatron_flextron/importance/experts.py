"""Stage 1 for mixtures of experts: statistics of the experts from routed calibration tokens.

Per MoE layer (E experts of F neurons, a shared expert of Fs neurons):
- "reap" (REAP, Router-weighted Expert Activation Pruning, Lasby et al. 2025): the mean over the
  tokens routed to expert e of g_e(x) * ||f_e(x)||_2, g the router weight the layer multiplies the
  expert output by (after top-k and any renormalization), f_e the expert's output.  -> [E]
- "frequency" (the baseline): the share of routing slots (token, k) that chose expert e.  -> [E]
- "reap_total": REAP x frequency, the sum of g_e(x) * ||f_e(x)|| over the routed tokens per
  routing slot: how much expert e adds to the layer's output on average over all tokens (REAP
  alone ignores how often an expert is chosen).  -> [E]
- "expert_neurons": each expert's neurons as the dense MLP's (Minitron activation, elastic/mlp):
  the input of the expert's second matmul, |a| averaged over the expert's routed tokens. Tokens
  reach an expert one by one, not as sequences, so the average is per token.  -> [E, F]
- "shared": the shared expert's neurons, exactly the dense MLP's estimator (every token runs
  it): mean |a| over each sequence, then L2 over sequences.  -> [Fs]

Hooks on megatron's modules only: the router (which tokens chose which expert), every local
expert (its routed tokens and weighted output: megatron multiplies the gate into the expert, so
its output is g * f(x) and g * ||f(x)|| = ||output||), the experts' and the shared expert's
second matmul. Padded tokens (loss mask 0) are left out. Any TP/EP/PP layout: expert
outputs are summed over expert-TP, neurons un-dealt over expert-TP (and TP for the shared
expert), experts gathered over EP into global order, layers over PP. The statistics are means
over routed tokens, so a token the all-gather dispatcher sees twice (expert parallelism over
data-parallel ranks holding the same calibration batch) changes nothing.
"""

from __future__ import annotations

import contextlib
from typing import Dict, List

import torch

from megatron_flextron.elastic.blocks import transformer_blocks
from megatron_flextron.elastic.tp_layout import TPAxis, unshard_tensor
from megatron_flextron.importance.collect import (
    _per_sequence_mean,
    gather_pipeline_layers,
    progress,
)
from megatron_flextron.lm_step import forward_backward


class _MoEStats:
    """Accumulators of one local MoE layer (this rank's experts and neuron shards)."""

    def __init__(self, layer):
        self.indices = list(layer.local_expert_indices)  # the dispatcher's slot of each local one
        # its ranked (checkpoint) index: another under a balanced expert placement
        self.ranked = list(getattr(layer, "canonical_expert_indices", self.indices))
        n = len(self.indices)
        self.count = torch.zeros(n, dtype=torch.float64)  # routed valid tokens
        self.reap = torch.zeros(n, dtype=torch.float64)  # sum of ||g f(x)||
        self.neurons = [None] * n  # sum of |a| per local neuron   [F_local]
        self.shared = None  # sum over sequences of (mean |a|)^2  [Fs_local]
        self.routing_map = None  # [T_global, E] the dispatcher's gathered routing map
        self.valid = None  # [T_global] which of those tokens count (loss mask)
        self.expert_mask = None  # the current expert's token validity, in its order [T_e]


def _token_mask(mask: torch.Tensor, local_tokens: int) -> torch.Tensor:
    """loss mask [b, s] -> validity of this rank's router tokens (s-major, as megatron flattens
    [s, b, h]; under sequence parallelism this TP rank's sequence chunk)."""
    from megatron.core import parallel_state

    flat = mask.t().reshape(-1) > 0
    if flat.numel() != local_tokens:
        r = parallel_state.get_tensor_model_parallel_rank()
        flat = flat[r * local_tokens : (r + 1) * local_tokens]
    return flat


def _dispatched(x: torch.Tensor) -> torch.Tensor:
    """``x`` [T_local, ...] gathered over the expert TP x EP group, in the order megatron's
    all-gather dispatcher gathers its tokens."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    group = parallel_state.get_expert_tensor_and_model_parallel_group()
    if torch.distributed.get_world_size(group) == 1:
        return x
    return gather_from_sequence_parallel_region(x, group=group)


def moe_layers(model) -> list:
    """(block, ElasticMoELayer / megatron MoELayer) of this pipeline stage."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    return [(b, b.mlp) for b in transformer_blocks(model) if isinstance(b.mlp, MoELayer)]


def collect_expert_statistics(model, microbatches: list, model_config) -> Dict[str, list]:
    """Run the calibration micro-batches through an MoE model at full size (any TP/EP/PP).

    Collective over the model-parallel groups; returns every layer's statistics on every rank
    (CPU, float64), lists over layers: "reap", "frequency", "reap_total" [E], "expert_neurons"
    [E, F], "shared" [Fs] (None without a shared expert), "tokens" [E] (routed valid tokens, as
    often as the dispatcher gathers them: once per data-parallel copy).
    """
    with expert_hooks(model, model_config) as hooks:
        with torch.no_grad():
            for batch in progress(microbatches, "importance: expert statistics"):
                hooks.start(batch)
                forward_backward(model, [batch], forward_only=True)
    return hooks.result()


class ExpertHooks:
    """The expert statistics of the forward passes run while installed (``expert_hooks``):
    ``start(batch)`` before each micro-batch, ``result()`` (collective) after removal. The
    dense statistics pass (collect.py) runs them too, so one pass ranks heads and experts."""

    def __init__(self, model, model_config):
        from megatron.core import parallel_state

        self.model_config = model_config
        self.layers = moe_layers(model)
        self.stats = [_MoEStats(layer) for _, layer in self.layers]
        self.current = {}
        self.handles = []
        etp_group = parallel_state.get_expert_tensor_parallel_group()
        self.etp_group = etp_group
        self.etp = torch.distributed.get_world_size(etp_group) if etp_group is not None else 1
        for st, (_, layer) in zip(self.stats, self.layers):
            self.handles.append(layer.router.register_forward_hook(self._router_hook(st)))
            for j, expert in enumerate(layer.experts.local_experts):
                self.handles.append(expert.register_forward_pre_hook(self._expert_pre_hook(st, j)))
                self.handles.append(expert.register_forward_hook(self._expert_hook(st, j)))
                fc2 = expert.linear_fc2
                self.handles.append(fc2.register_forward_pre_hook(self._neuron_hook(st, j)))
            if layer.shared_experts is not None:
                fc2 = layer.shared_experts.linear_fc2
                self.handles.append(fc2.register_forward_pre_hook(self._shared_hook(st)))

    def start(self, batch: dict) -> None:
        self.current["mask"] = batch["loss_mask"]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def result(self) -> Dict[str, list]:
        local = {
            block.index: _finish(st, layer, self.model_config)
            for st, (block, layer) in zip(self.stats, self.layers)
        }
        return _gather_layers(local, self.model_config)

    def _router_hook(self, st):
        def hook(module, args, output):
            _, routing_map = output  # [T_local, E] bool
            valid = _token_mask(self.current["mask"], routing_map.shape[0])
            st.routing_map = _dispatched(routing_map)
            st.valid = _dispatched(valid.to(device=routing_map.device, dtype=torch.uint8)) > 0

        return hook

    def _expert_pre_hook(self, st, j):
        def hook(module, args):
            routed = st.routing_map[:, st.indices[j]]  # [T_global]; megatron keeps token order
            if int(routed.sum()) != args[0].shape[0]:
                raise RuntimeError(
                    f"expert {st.indices[j]}: {args[0].shape[0]} tokens, routing map says "
                    f"{int(routed.sum())}"
                )
            st.expert_mask = st.valid[routed]

        return hook

    def _expert_hook(self, st, j):
        def hook(module, args, output):
            out = output[0].detach()
            if self.etp > 1:  # each expert-TP rank holds a partial sum of the output
                out = out.clone()
                torch.distributed.all_reduce(out, group=self.etp_group)
            norms = out.double().norm(dim=-1)[st.expert_mask]
            st.count[j] += norms.numel()
            st.reap[j] += norms.sum().cpu()

        return hook

    def _neuron_hook(self, st, j):
        def hook(module, args):
            a = args[0].detach().double()[st.expert_mask].abs().sum(0).cpu()  # [F_local]
            st.neurons[j] = a if st.neurons[j] is None else st.neurons[j] + a

        return hook

    def _shared_hook(self, st):
        def hook(module, args):
            a = args[0].detach().double()  # [s, b, Fs_local]
            sq = _per_sequence_mean(a.abs(), self.current["mask"]).pow(2).sum(0).cpu()
            st.shared = sq if st.shared is None else st.shared + sq

        return hook


@contextlib.contextmanager
def expert_hooks(model, model_config):
    """ExpertHooks installed on ``model`` for the duration of the block."""
    hooks = ExpertHooks(model, model_config)
    try:
        yield hooks
    finally:
        hooks.remove()


def _finish(st: _MoEStats, layer, model_config) -> dict:
    """Local sums -> this layer's per-expert sums over every expert (EP) and neuron (TP)."""
    from megatron.core import parallel_state

    neurons = torch.stack(
        [n if n is not None else torch.zeros(_local_ffn(layer)) for n in st.neurons]
    )  # [E_local, F_local]
    etp_group = parallel_state.get_expert_tensor_parallel_group()
    neurons = _undeal(neurons, etp_group, dim=1)
    shared = st.shared
    if layer.shared_experts is not None:
        if shared is None:
            shared = torch.zeros(layer.shared_experts.linear_fc2.input_size_per_partition)
        shared = _undeal(shared, parallel_state.get_tensor_model_parallel_group(), dim=0)
    mine = {e: (st.count[j], st.reap[j], neurons[j]) for j, e in enumerate(st.ranked)}
    ep_group = parallel_state.get_expert_model_parallel_group()
    parts = [mine]
    if torch.distributed.get_world_size(ep_group) > 1:
        parts = [None] * torch.distributed.get_world_size(ep_group)
        torch.distributed.all_gather_object(parts, mine, group=ep_group)
    experts = {e: v for part in parts for e, v in part.items()}
    num = model_config.num_moe_experts
    if sorted(experts) != list(range(num)):
        raise RuntimeError(f"expert statistics gathered for experts {sorted(experts)}")
    count = torch.stack([experts[e][0] for e in range(num)])
    reap = torch.stack([experts[e][1] for e in range(num)])
    neuron_sums = torch.stack([experts[e][2] for e in range(num)])
    denominator = count.clamp(min=1)
    return {
        "reap": reap / denominator,
        "frequency": count / count.sum().clamp(min=1),
        "reap_total": reap / count.sum().clamp(min=1),
        "expert_neurons": neuron_sums / denominator.unsqueeze(-1),
        "shared": None if shared is None else shared.sqrt(),
        "tokens": count,
    }


def _local_ffn(layer) -> int:
    return layer.experts.local_experts[0].linear_fc2.input_size_per_partition


def _undeal(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """A neuron axis dealt round-robin over ``group`` (tp_layout) -> canonical order."""
    size = torch.distributed.get_world_size(group) if group is not None else 1
    if size == 1:
        return x
    shards = [torch.empty_like(x) for _ in range(size)]
    torch.distributed.all_gather(shards, x.contiguous(), group=group)
    return unshard_tensor(shards, TPAxis(dim=dim, dealt=True))


def _gather_layers(local: Dict[int, dict], model_config) -> Dict[str, List]:
    ordered = gather_pipeline_layers(local, model_config.num_layers, "expert statistics")
    keys = ("reap", "frequency", "reap_total", "expert_neurons", "shared", "tokens")
    return {k: [entry[k] for entry in ordered] for k in keys}
