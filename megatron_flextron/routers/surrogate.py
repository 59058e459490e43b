"""The surrogate model of the paper: router outputs -> the LLM's loss, so that routers can be
trained without running the LLM.

Phase 1 samples architectures (homogeneous and per-layer), measures the frozen LLM's loss of each
on calibration text, and fits a small MLP from the architectures' one-hot choice encodings
(per layer and axis) to those losses; its error on held-out architectures says whether it may
guide the routers (phase 2: ``routers.training``). A mixture of experts is encoded by its
heads, kept layers, expert counts, expert widths and top-k (no MLP width axis).
"""

from __future__ import annotations

import random
from typing import Dict, List, Sequence

import torch

from megatron_flextron.elastic.state import elastic_state
from megatron_flextron.elastic.subnetwork import MOE_KEYS, Subnetwork
from megatron_flextron.lm_step import forward_backward


def encode(subnets: Sequence[Subnetwork], mlp_choices, head_choices, moe_choices=None):
    """One-hot choices: [N, L, n_mlp], [N, L, n_heads] and the kept layers [N, L]; with
    ``moe_choices`` (expert counts, widths, top-k): (None, heads, kept, [N, L, n_e], [N, L, n_f],
    [N, L, n_k]), the order of ``routers.static.Choices``."""
    n, layers = len(subnets), len(subnets[0].mlp)
    p_keep = torch.zeros(n, layers)
    for i, s in enumerate(subnets):
        p_keep[i, list(s.layers)] = 1

    def one_hot(values, choices):
        out = torch.zeros(n, layers, len(choices))
        for i, per_layer in enumerate(values):
            for layer, v in enumerate(per_layer):
                out[i, layer, list(choices).index(v)] = 1
        return out

    p_heads = one_hot([s.heads for s in subnets], head_choices)
    if moe_choices is None:
        return one_hot([s.mlp for s in subnets], mlp_choices), p_heads, p_keep
    axes = [one_hot([getattr(s, key) for s in subnets], c) for key, c in zip(MOE_KEYS, moe_choices)]
    return (None, p_heads, p_keep, *axes)


def sample_architectures(
    count: int,
    num_layers: int,
    mlp_choices,
    head_choices,
    seed: int = 0,
    layer_skipping: bool = False,
) -> List[Subnetwork]:
    """Every homogeneous architecture, then per-layer ones under random caps (varied sizes);
    with ``layer_skipping`` half of those also skip a random number of layers (up to a quarter,
    at least 2: skipping more is rarely worth its loss, and such outliers make the surrogate
    fit poorly)."""
    rng = random.Random(seed)
    every = tuple(range(num_layers))
    archs = [
        Subnetwork((k,) * num_layers, (h,) * num_layers, every)
        for k in mlp_choices
        for h in head_choices
    ]
    while len(archs) < count:
        cap_mlp, cap_heads = rng.choice(mlp_choices), rng.choice(head_choices)
        mlp = tuple(rng.choice([k for k in mlp_choices if k <= cap_mlp]) for _ in range(num_layers))
        heads = tuple(
            rng.choice([h for h in head_choices if h <= cap_heads]) for _ in range(num_layers)
        )
        kept = every
        if layer_skipping and rng.random() < 0.5:
            most = min(num_layers - 1, max(2, num_layers // 4))
            skipped = set(rng.sample(every, rng.randint(1, max(1, most))))
            kept = tuple(i for i in every if i not in skipped) or every
        archs.append(Subnetwork(mlp, heads, kept))
    rng.shuffle(archs)
    return archs


def sample_moe_architectures(
    count: int, num_layers: int, dense_width: int, head_choices, moe_choices, seed: int = 0
) -> List[Subnetwork]:
    """A mixture of experts' architectures: half homogeneous, half per layer under random caps
    (each axis at or below its cap, top-k at most the layer's expert count), in random order.
    Random rather than every homogeneous one: there are n_heads x n_e x n_f x n_k of those."""
    rng = random.Random(seed)
    experts, widths, topks = moe_choices

    def layer(caps):
        e = rng.choice([c for c in experts if c <= caps[0]])
        k = rng.choice([c for c in topks if c <= min(caps[2], e)])
        f = rng.choice([c for c in widths if c <= caps[1]])
        return e, f, k, rng.choice([h for h in head_choices if h <= caps[3]])

    archs = []
    while len(archs) < count:
        caps = (
            rng.choice(experts),
            rng.choice(widths),
            rng.choice(topks),
            rng.choice(head_choices),
        )
        if len(archs) % 2 == 0:  # homogeneous: one draw for every layer
            per_layer = [layer(caps)] * num_layers
        else:
            per_layer = [layer(caps) for _ in range(num_layers)]
        e, f, k, h = (tuple(axis) for axis in zip(*per_layer))
        archs.append(
            Subnetwork(
                (dense_width,) * num_layers,
                h,
                tuple(range(num_layers)),
                experts=e,
                moe_ffn=f,
                topk=k,
            )
        )
    return archs


class Surrogate(torch.nn.Module):
    """MLP: flattened choice probabilities (and the layers' keep probabilities) -> predicted
    loss (targets standardised inside)."""

    def __init__(
        self, num_layers: int, n_mlp: int, n_heads: int, hidden_size: int = 256, moe_sizes=()
    ):
        """``moe_sizes``: (n_e, n_f, n_k) for a mixture of experts (then n_mlp is 0)."""
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(num_layers * (n_mlp + n_heads + 1 + sum(moe_sizes)), hidden_size),
            torch.nn.LeakyReLU(),
            torch.nn.Linear(hidden_size, hidden_size),
            torch.nn.LeakyReLU(),
            torch.nn.Linear(hidden_size, 1),
        )
        self.register_buffer("mean", torch.zeros(()))
        self.register_buffer("std", torch.ones(()))

    def forward(self, p_mlp, p_heads: torch.Tensor, p_keep=None, *moe) -> torch.Tensor:
        """Arguments in the order of ``routers.static.Choices`` (``surrogate(*choices)``)."""
        batch = p_heads.shape[:-2]
        if p_keep is None:  # every layer runs
            p_keep = torch.ones(p_heads.shape[:-1], dtype=p_heads.dtype, device=p_heads.device)
        parts = [] if p_mlp is None else [p_mlp.flatten(-2)]
        parts += [p_heads.flatten(-2), p_keep] + [p.flatten(-2) for p in moe if p is not None]
        return self.net(torch.cat(parts, dim=-1)).view(batch) * self.std + self.mean


def fit_surrogate(
    surrogate: Surrogate,
    p_mlp: torch.Tensor,
    p_heads: torch.Tensor,
    losses: torch.Tensor,
    heldout_fraction: float = 0.2,
    steps: int = 2000,
    lr: float = 3e-3,
    seed: int = 0,
    p_keep: torch.Tensor = None,
    moe: Sequence[torch.Tensor] = (),
) -> Dict[str, float]:
    """Fit on (1 - heldout_fraction) of the architectures; errors on the held-out rest.
    ``moe``: a mixture of experts' (experts, moe_ffn, topk) encodings (p_mlp is then None)."""
    if p_keep is None:
        p_keep = torch.ones(p_heads.shape[:-1])

    def predict(rows):
        pick = [None if p is None else p[rows] for p in (p_mlp, p_heads, p_keep, *moe)]
        return surrogate(*pick)

    n = losses.numel()
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held = max(1, int(round(n * heldout_fraction)))
    test, train = order[:held], order[held:]
    surrogate.mean.fill_(float(losses[train].mean()))
    surrogate.std.fill_(float(losses[train].std().clamp(min=1e-6)))
    opt = torch.optim.Adam(surrogate.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        pred = predict(train)
        loss = (((pred - losses[train]) / surrogate.std) ** 2).mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        train_err = (predict(train) - losses[train]).abs()
        test_err = (predict(test) - losses[test]).abs()
    return {
        "architectures": n,
        "train_mae": float(train_err.mean()),
        "heldout_mae": float(test_err.mean()),
        "heldout_max_error": float(test_err.max()),
        "heldout_relative_mae": float((test_err / losses[test].abs()).mean()),
        "loss_range": [float(losses.min()), float(losses.max())],
    }


def measure_losses(model, subnets, microbatches, model_cfg, elastic) -> torch.Tensor:
    """The LLM's mean loss on ``microbatches`` for each architecture (forward only)."""
    losses = []
    for subnet in subnets:
        with elastic_state(model, model_cfg, elastic, subnetwork=subnet), torch.no_grad():
            out = forward_backward(model, microbatches, forward_only=True)
        losses.append(out["nll_sum"] / out["tokens"])
    return torch.tensor(losses)
