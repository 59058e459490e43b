"""Stage 1 of importance ranking: statistics from forward (and, for Taylor, backward) passes.

Scores per layer (shapes: F MLP neurons, H query heads, d head dim):
- MLP neurons, "activation" (Minitron): the input of the second MLP matmul, mean |a| over the
  sequence, then L2 over the batch.  -> [F]
- heads, "activation": the L2 norm of each head's output (input of the output projection), same
  aggregation.  -> [H]
- heads, "taylor" (loss-based, first order): per calibration sequence |sum over its tokens and the
  head's channels of a . dL/da| (a = the head's input to the output projection, L = the mean
  token loss), summed over sequences: the estimated loss change when the head is removed.  -> [H]
- heads, "taylor_token": the same first-order terms with the absolute value per token, summed over
  tokens and sequences: |a_t . dL/da_t| cannot cancel across the positions of a sequence, so a
  head that matters a lot at some tokens and little on average still ranks high.  -> [H]
- heads, "ablation" (loss-based, exact): the loss increase when the head alone is zeroed.  -> [H]
- layers: 1 - cos(layer input, layer output), averaged over tokens.  -> scalar per layer

Works on any TP/PP layout: hooks see this rank's units (dealt round-robin, see tp_layout), the
per-unit scores are gathered over TP into the canonical order and over PP into all layers, so
every rank returns the statistics of the whole model, as a single process would.
"""

from __future__ import annotations

import contextlib
from typing import Dict, List

import torch

from megatron_flextron.elastic.blocks import transformer_blocks
from megatron_flextron.elastic.tp_layout import TPAxis, unshard_tensor
from megatron_flextron.lm_step import forward_backward


def _per_sequence_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x [s, b, ...], mask [b, s] -> mean over valid tokens [b, ...]."""
    m = mask.t().reshape(*mask.t().shape, *([1] * (x.dim() - 2))).to(x.dtype)
    return (x * m).sum(0) / m.sum(0).clamp(min=1)


def _token_mean(values: torch.Tensor, valid: torch.Tensor) -> float:
    """Mean of ``values`` [s_local, b] over the valid tokens of ``valid`` [s, b]. Under
    sequence parallelism a block holds this TP rank's chunk of the sequence (s_local < s): the
    sums and counts of the chunks are added over TP, so every rank gets the whole mean."""
    from megatron.core import parallel_state

    local = values.shape[0]
    sharded = local != valid.shape[0]
    if sharded:
        r = parallel_state.get_tensor_model_parallel_rank()
        valid = valid[r * local : (r + 1) * local]
    total = torch.stack([values.double()[valid].sum(), valid.sum().double()])
    if sharded:
        group = parallel_state.get_tensor_model_parallel_group()
        torch.distributed.all_reduce(total, group=group)
    return float(total[0] / total[1])


def progress(iterable, desc: str, total=None):
    """A tqdm bar on stderr from the first rank only (quiet elsewhere and when not installed)."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a requirement
        return iterable
    quiet = torch.distributed.is_initialized() and torch.distributed.get_rank() != 0
    return tqdm(iterable, desc=desc, total=total, disable=quiet, leave=False, dynamic_ncols=True)


class _LayerStats:
    """Accumulators of one local layer (this rank's units)."""

    def __init__(self):
        self.mlp = None  # sum over sequences of (mean |a|)^2   [F_local]
        self.head_act = None  # same for the head output norm    [H_local]
        self.taylor = None  # sum over sequences of |sum a.g|      [H_local]
        self.taylor_token = None  # sum over tokens of |a.g|       [H_local]
        self.cos: List[float] = []

    def add(self, name: str, value: torch.Tensor) -> None:
        old = getattr(self, name)
        setattr(self, name, value if old is None else old + value)


@contextlib.contextmanager
def activation_gradients_only(model):
    """Backward computes gradients of activations, not of weights: Taylor scores need dL/da
    only, and weight gradients (the embedding's included) would cost the model's size again.
    The graph starts at the embedding output, marked as needing grad; later pipeline stages
    receive inputs that need grad from megatron's schedule."""
    from megatron_flextron.elastic.subnetwork import unwrap_model

    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    embedding = getattr(unwrap_model(model), "embedding", None)
    handle = None
    if embedding is not None:
        handle = embedding.register_forward_hook(
            lambda module, args, output: output.detach().requires_grad_()
        )
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()
        for p in params:
            p.requires_grad_(True)


def collect_statistics(
    model, microbatches: list, model_config, with_taylor: bool, on_batch=None
) -> Dict:
    """Run the calibration micro-batches through an elastic model at full size (any TP/EP/PP).

    Collective over the model-parallel groups; returns the whole model's statistics on every
    rank, on the CPU in float64: "mlp", "activation", "taylor", "taylor_token" (lists over layers,
    canonical unit order; "mlp" is None for an MoE layer), "layer", and "loss" (the mean token
    loss of the pass). ``on_batch(batch)`` runs before each micro-batch (the expert statistics
    of experts.ExpertHooks ride on the same pass).
    """

    layers = transformer_blocks(model)
    stats = [_LayerStats() for _ in layers]
    current = {}
    handles = []

    def mlp_hook(st):
        def hook(module, args):
            a = args[0].detach().double()  # [s, b, F_local]
            per_seq = _per_sequence_mean(a.abs(), current["mask"])  # [b, F_local]
            st.add("mlp", per_seq.pow(2).sum(0))

        return hook

    def proj_hook(st):
        def hook(module, args):
            a = args[0]  # [s, b, H_local * d]
            shape = (*a.shape[:2], -1, model_config.kv_channels)
            norms = a.detach().double().reshape(shape).norm(dim=-1)  # [s, b, H_local]
            st.add("head_act", _per_sequence_mean(norms, current["mask"]).pow(2).sum(0))
            if with_taylor and a.requires_grad:  # autograd keeps `a` anyway: no extra copy
                a.register_hook(taylor_hook(st, a.detach(), shape))

        return hook

    def taylor_hook(st, saved, shape):
        def hook(grad):
            heads = saved.double().reshape(shape)
            contribution = (heads * grad.double().reshape(shape)).sum(-1)  # [s, b, H]
            mask = current["mask"].t().unsqueeze(-1).double()
            st.add("taylor", (contribution * mask).sum(0).abs().sum(0))
            st.add("taylor_token", (contribution * mask).abs().sum((0, 1)))

        return hook

    def block_input(st):
        def hook(module, args, kwargs):
            st.block_input = kwargs.get("hidden_states", args[0] if args else None).detach()

        return hook

    def layer_hook(st):  # how much the block changes its input (1 - cosine similarity)
        def hook(module, args, kwargs, output):
            x, st.block_input = st.block_input.float(), None
            y = output[0].detach().float()
            cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)  # [s, b] (or a chunk)
            st.cos.append(_token_mean(1 - cos, current["mask"].t() > 0))

        return hook

    for st, layer in zip(stats, layers):
        if hasattr(layer.mlp, "linear_fc2"):  # a dense MLP (experts: experts.py)
            handles.append(layer.mlp.linear_fc2.register_forward_pre_hook(mlp_hook(st)))
        handles.append(layer.self_attention.linear_proj.register_forward_pre_hook(proj_hook(st)))
        handles.append(
            layer.attention_layer.register_forward_pre_hook(block_input(st), with_kwargs=True)
        )
        handles.append(layer.mlp_layer.register_forward_hook(layer_hook(st), with_kwargs=True))
    nll_sum = tokens = 0.0
    try:
        with activation_gradients_only(model):
            for batch in progress(microbatches, "importance: calibration batches"):
                current["mask"] = batch["loss_mask"]
                if on_batch is not None:
                    on_batch(batch)
                model.zero_grad(set_to_none=True)
                out = forward_backward(model, [batch], forward_only=not with_taylor)
                nll_sum, tokens = nll_sum + out["nll_sum"], tokens + out["tokens"]
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    local = {
        layer.layer_number - 1: {
            "mlp": None if st.mlp is None else st.mlp.sqrt(),
            "activation": st.head_act.sqrt(),
            "taylor": st.taylor if with_taylor else None,
            "taylor_token": st.taylor_token if with_taylor else None,
            "layer": sum(st.cos) / len(st.cos) if st.cos else 0.0,
        }
        for st, layer in zip(stats, layers)
    }
    gathered = _gather(local, model_config, with_taylor)
    gathered["loss"] = nll_sum / max(tokens, 1.0)  # the calibration loss, for the record
    return gathered


HEAD_KEYS = ("activation", "taylor", "taylor_token")


def _gather(local: Dict[int, dict], model_config, with_taylor: bool) -> Dict:
    """Per-layer local scores -> every layer's canonical scores, on every rank (CPU, float64).

    Head scores cover the active heads: k per KV group (GQA) or the first heads (MHA), so a
    sub-network's statistics come back as [G * k] in canonical order (group-major).
    """
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp > 1:
        group = parallel_state.get_tensor_model_parallel_group()
        local_groups = model_config.num_query_groups // tp
        for entry in local.values():
            for key in ("mlp",) + HEAD_KEYS:
                if entry[key] is None:
                    continue
                unit = 1  # an MLP neuron; a head of MHA
                if key != "mlp" and model_config.heads_per_group > 1:
                    unit = entry[key].numel() // local_groups  # the active heads of a KV group
                shards = [torch.empty_like(entry[key]) for _ in range(tp)]
                torch.distributed.all_gather(shards, entry[key].contiguous(), group=group)
                entry[key] = unshard_tensor(shards, TPAxis(dim=0, dealt=True, unit_size=unit))
    local = {
        i: {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in e.items()}
        for i, e in local.items()
    }
    ordered = gather_pipeline_layers(local, model_config.num_layers, "statistics")
    out = {key: [e[key] for e in ordered] for key in ("mlp", "layer") + HEAD_KEYS}
    if not with_taylor:
        out["taylor"] = out["taylor_token"] = None
    return out


@torch.no_grad()
def head_ablation_scores(model, microbatches: list, model_config) -> List[torch.Tensor]:
    """Loss increase when each head alone is zeroed (L x H forward passes; TP=1, PP=1 only)."""
    heads_per_layer = model_config.num_attention_heads
    base = forward_backward(model, microbatches, forward_only=True)
    base_loss = base["nll_sum"] / base["tokens"]
    scores = []
    for layer in progress(transformer_blocks(model), "importance: head ablation (layers)"):
        proj = layer.self_attention.linear_proj
        layer_scores = torch.zeros(heads_per_layer, dtype=torch.float64)
        for h in range(heads_per_layer):

            def zero_head(module, args, h=h):
                a = args[0].clone()
                d = a.shape[-1] // heads_per_layer
                a[..., h * d : (h + 1) * d] = 0
                return (a,)

            handle = proj.register_forward_pre_hook(zero_head)
            try:
                out = forward_backward(model, microbatches, forward_only=True)
            finally:
                handle.remove()
            layer_scores[h] = out["nll_sum"] / out["tokens"] - base_loss
        scores.append(layer_scores)
    return scores


def gather_pipeline_layers(local: dict, num_layers: int, what: str) -> list:
    """Every layer's entry, in layer order, from this stage's ``{layer: entry}`` (gathered over
    the pipeline stages); a RuntimeError naming ``what`` when a layer is missing."""
    from megatron.core import parallel_state

    everything = dict(local)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        group = parallel_state.get_pipeline_model_parallel_group()
        parts = [None] * torch.distributed.get_world_size(group)
        torch.distributed.all_gather_object(parts, local, group=group)
        everything = {i: e for part in parts for i, e in part.items()}
    if sorted(everything) != list(range(num_layers)):
        raise RuntimeError(f"{what} gathered for layers {sorted(everything)}")
    return [everything[i] for i in range(num_layers)]
