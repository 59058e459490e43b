"""Stage 1 of importance ranking: statistics from forward (and, for Taylor, backward) passes.

Scores per layer (shapes: F MLP neurons, H query heads, d head dim):
- MLP neurons, "activation" (Minitron): the input of the second MLP matmul, mean |a| over the
  sequence, then L2 over the batch.  -> [F]
- heads, "activation": the L2 norm of each head's output (input of the output projection), same
  aggregation.  -> [H]
- heads, "taylor" (loss-based, first order): |sum over tokens of a_h . dL/da_h| per sequence,
  averaged: the estimated loss change when the head is removed.  -> [H]
- heads, "ablation" (loss-based, exact): the loss increase when the head alone is zeroed.  -> [H]
- layers: 1 - cos(layer input, layer output), averaged over tokens.  -> scalar per layer
"""

from __future__ import annotations

from typing import Dict, List

import torch

from megatron_flextron.lm_step import forward_backward


class _Stats:
    def __init__(self, layers: int):
        self.mlp: List[torch.Tensor] = [None] * layers
        self.head_act: List[torch.Tensor] = [None] * layers
        self.head_taylor: List[torch.Tensor] = [None] * layers
        self.layer_cos: List[List[float]] = [[] for _ in range(layers)]

    @staticmethod
    def add(store, i, value):
        store[i] = value if store[i] is None else store[i] + value


def _per_sequence_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x [s, b, ...], mask [b, s] -> mean over valid tokens [b, ...]."""
    m = mask.t().reshape(*mask.t().shape, *([1] * (x.dim() - 2))).to(x.dtype)
    return (x * m).sum(0) / m.sum(0).clamp(min=1)


def collect_statistics(model, microbatches: list, heads_per_layer: int, with_taylor: bool) -> Dict:
    """Run the calibration micro-batches through a TP=1, PP=1 elastic model at full size."""
    layers = list(model.decoder.layers)
    stats = _Stats(len(layers))
    current = {}
    handles = []

    def mlp_hook(i):
        def hook(module, args):
            a = args[0].detach().float()  # [s, b, F]
            per_seq = _per_sequence_mean(a.abs(), current["mask"])  # [b, F]
            stats.add(stats.mlp, i, per_seq.pow(2).sum(0))

        return hook

    def proj_hook(i):
        def hook(module, args):
            a = args[0]
            s, b = a.shape[:2]
            heads = a.detach().float().reshape(s, b, heads_per_layer, -1)
            norms = _per_sequence_mean(heads.norm(dim=-1), current["mask"])  # [b, H]
            stats.add(stats.head_act, i, norms.pow(2).sum(0))
            if with_taylor and a.requires_grad:
                a.register_hook(taylor_hook(i, heads.shape, a.detach()))

        return hook

    def taylor_hook(i, shape, saved):
        def hook(grad):
            contribution = (saved.float() * grad.float()).reshape(shape).sum(-1)  # [s, b, H]
            mask = current["mask"].t().unsqueeze(-1).float()
            stats.add(stats.head_taylor, i, (contribution * mask).sum(0).abs().sum(0))

        return hook

    def layer_hook(i):
        def hook(module, args, kwargs, output):
            x = kwargs.get("hidden_states", args[0] if args else None).detach().float()
            y = output[0].detach().float()
            cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)  # [s, b]
            valid = current["mask"].t() > 0
            stats.layer_cos[i].append(float((1 - cos)[valid].mean()))

        return hook

    for i, layer in enumerate(layers):
        handles.append(layer.mlp.linear_fc2.register_forward_pre_hook(mlp_hook(i)))
        handles.append(layer.self_attention.linear_proj.register_forward_pre_hook(proj_hook(i)))
        handles.append(layer.register_forward_hook(layer_hook(i), with_kwargs=True))
    try:
        for batch in microbatches:
            current["mask"] = batch["loss_mask"]
            model.zero_grad(set_to_none=True)
            forward_backward(model, [batch], forward_only=not with_taylor)
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    n = len(microbatches)
    return {  # on the CPU, whatever device the model ran on
        "mlp": [v.sqrt().cpu() for v in stats.mlp],
        "activation": [v.sqrt().cpu() for v in stats.head_act],
        "taylor": [(v / n).cpu() for v in stats.head_taylor] if with_taylor else None,
        "layer": [sum(v) / len(v) for v in stats.layer_cos],
    }


@torch.no_grad()
def head_ablation_scores(model, microbatches: list, heads_per_layer: int) -> List[torch.Tensor]:
    """Loss increase when each head alone is zeroed (L x H forward passes)."""
    base = forward_backward(model, microbatches, forward_only=True)
    base_loss = base["nll_sum"] / base["tokens"]
    scores = []
    for layer in model.decoder.layers:
        proj = layer.self_attention.linear_proj
        layer_scores = torch.zeros(heads_per_layer)
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
