"""The static router: budget -> a per-layer architecture (Flextron's budget router).

Input: the budget as a one-hot over the trained budgets; a budget between two trained ones is the
linear blend of their one-hots. A 2-layer MLP (hidden 256, LeakyReLU) gives, for every layer,
logits over the MLP width choices and over the head-count choices (largest first), and with
``layer_skipping`` logits over (keep, skip) from one more output head (depth elasticity). Training
samples architectures with Gumbel-softmax (temperature annealed, logits scaled up over time;
straight-through hard samples or soft mixtures); inference takes the argmax.

The router is tiny and replicated: every rank computes the same thing from the same budget, so
under TP/PP it needs no communication and each pipeline stage reads its own layers' choices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from megatron_flextron.elastic.subnetwork import Subnetwork
from megatron_flextron.routers.cost import check_budget, check_budget_list


def seeded_gumbel_softmax(logits: torch.Tensor, tau: float, generator: torch.Generator):
    """Straight-through Gumbel-softmax (forward: one-hot of the sample; backward: the soft
    sample's gradient) with noise from ``generator`` (on the logits' device), so that every
    rank of a model-parallel group, and a resumed run, draws the same choices."""
    u = torch.rand(logits.shape, generator=generator, device=logits.device)
    noise = -torch.log(-torch.log(u.clamp(1e-9, 1 - 1e-9)))
    soft = ((logits + noise) / tau).softmax(-1)
    hard = F.one_hot(soft.argmax(-1), soft.size(-1)).to(soft)
    return hard - soft.detach() + soft


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


class Choices(NamedTuple):
    """Per-layer router outputs: logits or probabilities over the MLP widths [L, n_mlp] and the
    head counts [L, n_heads]; ``keep``: the probability that each layer runs [L] (``None``
    without layer skipping: every layer runs)."""

    mlp: torch.Tensor
    heads: torch.Tensor
    keep: Optional[torch.Tensor] = None

    def double(self) -> "Choices":
        """In float64, as the cost models compute."""
        return Choices(*(None if c is None else c.double() for c in self))


class StaticRouter(torch.nn.Module):
    def __init__(
        self,
        budgets: Sequence[float],
        num_layers: int,
        mlp_choices: Sequence[int],
        head_choices: Sequence[int],
        hidden_size: int = 256,
        layer_skipping: bool = False,
    ):
        super().__init__()
        check_budget_list(budgets, "the router's trained budgets")
        self.budgets = list(budgets)
        self.num_layers = num_layers
        self.mlp_choices, self.head_choices = list(mlp_choices), list(head_choices)
        self.n_mlp, self.n_heads = len(mlp_choices), len(head_choices)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(len(budgets), hidden_size),
            torch.nn.LeakyReLU(),
            torch.nn.Linear(hidden_size, num_layers * (self.n_mlp + self.n_heads)),
        )
        self.layer_skipping = layer_skipping
        if layer_skipping:  # logits (keep, skip) per layer, starting at "keep" (bias +3)
            self.depth = torch.nn.Linear(hidden_size, num_layers * 2)
            with torch.no_grad():
                self.depth.bias.view(num_layers, 2)[:, 0] += 3.0

    def encode(self, budget: float) -> torch.Tensor:
        return encode_budget(self.budgets, budget)

    def forward(self, budget: float) -> Choices:
        """Logits [L, n_mlp], [L, n_heads] and, with layer skipping, [L, 2] (keep, skip)."""
        x = self.encode(budget).to(self.net[0].weight)
        hidden = self.net[1](self.net[0](x))
        out = self.net[2](hidden).view(self.num_layers, self.n_mlp + self.n_heads)
        depth = self.depth(hidden).view(self.num_layers, 2) if self.layer_skipping else None
        return Choices(out[:, : self.n_mlp], out[:, self.n_mlp :], depth)

    def sample(self, budget: float, temperature: float, scale: float = 1.0, generator=None):
        """Straight-through Gumbel-softmax one-hot choices (forward: the sampled architecture;
        backward: the soft sample's gradient); ``keep`` is the kept column. With ``generator``,
        seeded noise (the same on every rank)."""
        logits = self(budget)

        def draw(x):
            if generator is not None:
                return seeded_gumbel_softmax(x * scale, temperature, generator)
            return F.gumbel_softmax(x * scale, tau=temperature, hard=True)

        keep = draw(logits.keep)[:, 0] if logits.keep is not None else None
        return Choices(draw(logits.mlp), draw(logits.heads), keep)

    def largest_pull(self, budget: float) -> torch.Tensor:
        """-log p(largest choice), averaged per axis over layers (and -log p(keep)): the pull of
        budget 1.0 to the full model."""
        logits = self(budget)
        pull = -(
            logits.mlp.log_softmax(-1)[:, 0].mean() + logits.heads.log_softmax(-1)[:, 0].mean()
        )
        if logits.keep is not None:
            pull = pull - logits.keep.log_softmax(-1)[:, 0].mean()
        return pull

    @torch.no_grad()
    def expected(self, budget: float) -> Choices:
        """Deterministic softmax probabilities (no noise)."""
        logits = self(budget)
        keep = logits.keep.softmax(-1)[:, 0] if logits.keep is not None else None
        return Choices(logits.mlp.softmax(-1), logits.heads.softmax(-1), keep)

    @torch.no_grad()
    def choose(self, budget: float) -> Subnetwork:
        """The argmax architecture of a budget (at least one layer kept: the likeliest)."""
        logits = self(budget)
        widths: List[int] = [self.mlp_choices[i] for i in logits.mlp.argmax(-1).tolist()]
        counts: List[int] = [self.head_choices[i] for i in logits.heads.argmax(-1).tolist()]
        layers = list(range(self.num_layers))
        if logits.keep is not None:
            margin = logits.keep[:, 0] - logits.keep[:, 1]
            layers = [i for i in layers if margin[i] >= 0] or [int(margin.argmax())]
        return Subnetwork(tuple(widths), tuple(counts), tuple(layers))

    def config(self) -> dict:
        return {
            "budgets": self.budgets,
            "num_layers": self.num_layers,
            "mlp_choices": self.mlp_choices,
            "head_choices": self.head_choices,
            "hidden_size": self.net[0].out_features,
            "layer_skipping": self.layer_skipping,
        }
