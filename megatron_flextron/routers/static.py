"""The static router: budget -> a per-layer architecture (Flextron's budget router).

Input: the budget as a one-hot over the trained budgets; a budget between two trained ones is the
linear blend of their one-hots. A 2-layer MLP (hidden 256, LeakyReLU) gives, for every layer,
logits over the MLP width choices and over the head-count choices (largest first). Training
samples architectures with Gumbel-softmax (temperature annealed, logits scaled up over time;
straight-through hard samples or soft mixtures); inference takes the argmax.

The router is tiny and replicated: every rank computes the same thing from the same budget, so
under TP/PP it needs no communication and each pipeline stage reads its own layers' choices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

from megatron_flextron.elastic.subnetwork import Subnetwork
from megatron_flextron.routers.cost import check_budget


def seeded_gumbel_softmax(logits: torch.Tensor, tau: float, generator: torch.Generator):
    """Straight-through Gumbel-softmax (forward: one-hot of the sample; backward: the soft
    sample's gradient) with noise from ``generator`` (on the logits' device), so that every
    rank of a model-parallel group, and a resumed run, draws the same choices."""
    u = torch.rand(logits.shape, generator=generator, device=logits.device)
    noise = -torch.log(-torch.log(u.clamp(1e-9, 1 - 1e-9)))
    soft = ((logits + noise) / tau).softmax(-1)
    hard = F.one_hot(soft.argmax(-1), soft.size(-1)).to(soft)
    return hard - soft.detach() + soft


def check_budget_list(budgets: Sequence[float]) -> None:
    if not budgets:
        raise ValueError("the router needs at least one trained budget")
    for b in budgets:
        check_budget(b)
    if list(budgets) != sorted(set(budgets), reverse=True):
        raise ValueError(f"budgets {list(budgets)} must be distinct and sorted descending")


def encode_budget(budgets: Sequence[float], budget: float) -> torch.Tensor:
    """One-hot of a trained budget; the linear blend of the two neighbours in between."""
    check_budget(budget)
    b = list(budgets)
    if not b[-1] - 1e-9 <= budget <= b[0] + 1e-9:
        raise ValueError(
            f"budget {budget} lies outside the trained range [{b[-1]}, {b[0]}] of the router"
        )
    x = torch.zeros(len(b))
    for i in range(len(b)):
        if math.isclose(budget, b[i], abs_tol=1e-9):
            x[i] = 1.0
            return x
        if i + 1 < len(b) and b[i + 1] < budget < b[i]:
            w = (budget - b[i + 1]) / (b[i] - b[i + 1])
            x[i], x[i + 1] = w, 1.0 - w
            return x
    raise AssertionError("unreachable")


@dataclass
class GumbelSchedule:
    """Temperature tau(t) = max(tau_min, tau_start * exp(-decay * t)); logit scale grows
    linearly from 1 to ``scale_end`` over ``steps``: samples sharpen as training goes on."""

    tau_start: float = 5.0
    tau_min: float = 0.5
    decay: float = 0.01
    scale_end: float = 4.0
    steps: int = 500

    def temperature(self, step: int) -> float:
        return max(self.tau_min, self.tau_start * math.exp(-self.decay * step))

    def logit_scale(self, step: int) -> float:
        return 1.0 + (self.scale_end - 1.0) * min(step / max(self.steps, 1), 1.0)


class StaticRouter(torch.nn.Module):
    def __init__(
        self,
        budgets: Sequence[float],
        num_layers: int,
        mlp_choices: Sequence[int],
        head_choices: Sequence[int],
        hidden_size: int = 256,
    ):
        super().__init__()
        check_budget_list(budgets)
        self.budgets = list(budgets)
        self.num_layers = num_layers
        self.mlp_choices, self.head_choices = list(mlp_choices), list(head_choices)
        self.n_mlp, self.n_heads = len(mlp_choices), len(head_choices)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(len(budgets), hidden_size),
            torch.nn.LeakyReLU(),
            torch.nn.Linear(hidden_size, num_layers * (self.n_mlp + self.n_heads)),
        )

    def encode(self, budget: float) -> torch.Tensor:
        return encode_budget(self.budgets, budget)

    def forward(self, budget: float) -> Tuple[torch.Tensor, torch.Tensor]:
        """Logits [L, n_mlp] and [L, n_heads]."""
        x = self.encode(budget).to(self.net[0].weight)
        out = self.net(x).view(self.num_layers, self.n_mlp + self.n_heads)
        return out[:, : self.n_mlp], out[:, self.n_mlp :]

    def probabilities(
        self, budget: float, temperature: float = 1.0, scale: float = 1.0, hard: bool = False
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Gumbel-softmax samples (``hard``: one-hot forward, soft gradient)."""
        mlp, heads = self(budget)
        return (
            F.gumbel_softmax(mlp * scale, tau=temperature, hard=hard),
            F.gumbel_softmax(heads * scale, tau=temperature, hard=hard),
        )

    @torch.no_grad()
    def expected(self, budget: float) -> Tuple[torch.Tensor, torch.Tensor]:
        """Deterministic softmax probabilities (no noise)."""
        mlp, heads = self(budget)
        return mlp.softmax(-1), heads.softmax(-1)

    @torch.no_grad()
    def choose(self, budget: float) -> Subnetwork:
        """The argmax architecture of a budget."""
        mlp, heads = self(budget)
        widths: List[int] = [self.mlp_choices[i] for i in mlp.argmax(-1).tolist()]
        counts: List[int] = [self.head_choices[i] for i in heads.argmax(-1).tolist()]
        return Subnetwork(tuple(widths), tuple(counts), tuple(range(self.num_layers)))

    def config(self) -> dict:
        return {
            "budgets": self.budgets,
            "num_layers": self.num_layers,
            "mlp_choices": self.mlp_choices,
            "head_choices": self.head_choices,
            "hidden_size": self.net[0].out_features,
        }
