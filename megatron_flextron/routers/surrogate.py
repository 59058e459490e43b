"""The surrogate model of the paper: router outputs -> the LLM's loss, so that routers can be
trained without running the LLM.

Phase 1 samples architectures (homogeneous and per-layer), measures the frozen LLM's loss of each
on calibration text, and fits a small MLP from the architectures' one-hot choice encodings
(per layer and axis) to those losses; its error on held-out architectures says whether it may
guide the routers (phase 2: ``routers.training``).
"""

from __future__ import annotations

import random
from typing import Dict, List, Sequence

import torch

from megatron_flextron.elastic.state import elastic_state
from megatron_flextron.elastic.subnetwork import Subnetwork
from megatron_flextron.lm_step import forward_backward


def encode(subnets: Sequence[Subnetwork], mlp_choices, head_choices):
    """One-hot choices: [N, L, n_mlp], [N, L, n_heads] and the kept layers [N, L]."""
    n, layers = len(subnets), len(subnets[0].mlp)
    p_mlp = torch.zeros(n, layers, len(mlp_choices))
    p_heads = torch.zeros(n, layers, len(head_choices))
    p_keep = torch.zeros(n, layers)
    for i, s in enumerate(subnets):
        p_keep[i, list(s.layers)] = 1
        for layer in range(layers):
            p_mlp[i, layer, mlp_choices.index(s.mlp[layer])] = 1
            p_heads[i, layer, head_choices.index(s.heads[layer])] = 1
    return p_mlp, p_heads, p_keep


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


class Surrogate(torch.nn.Module):
    """MLP: flattened choice probabilities (and the layers' keep probabilities) -> predicted
    loss (targets standardised inside)."""

    def __init__(self, num_layers: int, n_mlp: int, n_heads: int, hidden_size: int = 256):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(num_layers * (n_mlp + n_heads + 1), hidden_size),
            torch.nn.LeakyReLU(),
            torch.nn.Linear(hidden_size, hidden_size),
            torch.nn.LeakyReLU(),
            torch.nn.Linear(hidden_size, 1),
        )
        self.register_buffer("mean", torch.zeros(()))
        self.register_buffer("std", torch.ones(()))

    def forward(self, p_mlp: torch.Tensor, p_heads: torch.Tensor, p_keep=None) -> torch.Tensor:
        batch = p_mlp.shape[:-2]
        if p_keep is None:  # every layer runs
            p_keep = torch.ones(p_mlp.shape[:-1], dtype=p_mlp.dtype, device=p_mlp.device)
        x = torch.cat([p_mlp.flatten(-2), p_heads.flatten(-2), p_keep], dim=-1)
        return self.net(x).view(batch) * self.std + self.mean


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
) -> Dict[str, float]:
    """Fit on (1 - heldout_fraction) of the architectures; errors on the held-out rest."""
    if p_keep is None:
        p_keep = torch.ones(p_mlp.shape[:-1])
    n = losses.numel()
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held = max(1, int(round(n * heldout_fraction)))
    test, train = order[:held], order[held:]
    surrogate.mean.fill_(float(losses[train].mean()))
    surrogate.std.fill_(float(losses[train].std().clamp(min=1e-6)))
    opt = torch.optim.Adam(surrogate.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        pred = surrogate(p_mlp[train], p_heads[train], p_keep[train])
        loss = (((pred - losses[train]) / surrogate.std) ** 2).mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        train_err = (surrogate(p_mlp[train], p_heads[train], p_keep[train]) - losses[train]).abs()
        test_err = (surrogate(p_mlp[test], p_heads[test], p_keep[test]) - losses[test]).abs()
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
