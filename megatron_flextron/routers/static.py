"""The static router: budget -> a per-layer architecture (Flextron's budget router).

Input: the budget as a one-hot over the trained budgets; a budget between two trained ones is the
linear blend of their one-hots. A 2-layer MLP (hidden 256, LeakyReLU) gives, for every layer,
logits over the MLP width choices and over the head-count choices (largest first), and with
``layer_skipping`` logits over (keep, skip) from one more output head (depth elasticity). Training
samples architectures with Gumbel-softmax (temperature annealed, logits scaled up over time;
straight-through hard samples or soft mixtures); inference takes the argmax.

A mixture of experts has no MLP width axis: its layers get logits over the expert counts, the
expert widths and the top-k choices instead (``moe_choices``), beside the heads; a top-k above
the layer's chosen expert count is masked out (sampled after the experts).

The router is tiny and replicated: every rank computes the same thing from the same budget, so
under TP/PP it needs no communication and each pipeline stage reads its own layers' choices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from megatron_flextron.elastic.subnetwork import MOE_KEYS, Subnetwork
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
    without layer skipping: every layer runs). A mixture of experts: ``mlp`` is None and
    ``experts`` [L, n_e], ``moe_ffn`` [L, n_f], ``topk`` [L, n_k] are set."""

    mlp: Optional[torch.Tensor]
    heads: torch.Tensor
    keep: Optional[torch.Tensor] = None
    experts: Optional[torch.Tensor] = None
    moe_ffn: Optional[torch.Tensor] = None
    topk: Optional[torch.Tensor] = None

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
        moe_choices: Optional[Sequence[Sequence[int]]] = None,
    ):
        super().__init__()
        check_budget_list(budgets, "the router's trained budgets")
        self.budgets = list(budgets)
        self.num_layers = num_layers
        self.mlp_choices, self.head_choices = list(mlp_choices), list(head_choices)
        self.moe_choices = _check_moe_choices(moe_choices, self.mlp_choices)
        # a mixture of experts has no MLP width axis (mlp_choices: its one dense width)
        self.n_mlp, self.n_heads = (0 if self.moe_choices else len(mlp_choices)), len(head_choices)
        self.sizes = [self.n_mlp, self.n_heads] + [len(c) for c in self.moe_choices or ()]
        self.net = torch.nn.Sequential(
            torch.nn.Linear(len(budgets), hidden_size),
            torch.nn.LeakyReLU(),
            torch.nn.Linear(hidden_size, num_layers * sum(self.sizes)),
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
        out = self.net[2](hidden).view(self.num_layers, sum(self.sizes))
        depth = self.depth(hidden).view(self.num_layers, 2) if self.layer_skipping else None
        if self.moe_choices is None:
            return Choices(out[:, : self.n_mlp], out[:, self.n_mlp :], depth)
        _, heads, experts, width, topk = out.split(self.sizes, dim=-1)
        return Choices(None, heads, depth, experts, width, topk)

    def topk_mask(self, experts: torch.Tensor) -> torch.Tensor:
        """[L, n_k]: 0 where the top-k choice fits the expert count picked by ``experts`` [L,
        n_e] (one-hot or logits: its argmax), -inf above it."""
        counts = torch.tensor(self.moe_choices[0], device=experts.device)[experts.argmax(-1)]
        topks = torch.tensor(self.moe_choices[2], device=experts.device)
        fits = topks[None, :] <= counts[:, None]
        return torch.zeros(fits.shape, device=experts.device).masked_fill(~fits, -torch.inf)

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
        if self.moe_choices is None:
            return Choices(draw(logits.mlp), draw(logits.heads), keep)
        heads, experts, width = draw(logits.heads), draw(logits.experts), draw(logits.moe_ffn)
        topk = draw(logits.topk + self.topk_mask(experts))
        return Choices(None, heads, keep, experts, width, topk)

    def largest_pull(self, budget: float) -> torch.Tensor:
        """-log p(largest choice), averaged per axis over layers (and -log p(keep)): the pull of
        budget 1.0 to the full model."""
        logits = self(budget)
        axes = [logits.mlp, logits.heads, logits.experts, logits.moe_ffn, logits.topk]
        pull = -sum(x.log_softmax(-1)[:, 0].mean() for x in axes if x is not None)
        if logits.keep is not None:
            pull = pull - logits.keep.log_softmax(-1)[:, 0].mean()
        return pull

    @torch.no_grad()
    def expected(self, budget: float) -> Choices:
        """Deterministic softmax probabilities (no noise)."""
        logits = self(budget)
        keep = logits.keep.softmax(-1)[:, 0] if logits.keep is not None else None
        if self.moe_choices is None:
            return Choices(logits.mlp.softmax(-1), logits.heads.softmax(-1), keep)
        topk = logits.topk + self.topk_mask(logits.experts)
        experts, width = logits.experts.softmax(-1), logits.moe_ffn.softmax(-1)
        return Choices(None, logits.heads.softmax(-1), keep, experts, width, topk.softmax(-1))

    @torch.no_grad()
    def choose(self, budget: float) -> Subnetwork:
        """The argmax architecture of a budget (at least one layer kept: the likeliest)."""
        logits = self(budget)
        counts: List[int] = [self.head_choices[i] for i in logits.heads.argmax(-1).tolist()]
        layers = list(range(self.num_layers))
        if logits.keep is not None:
            margin = logits.keep[:, 0] - logits.keep[:, 1]
            layers = [i for i in layers if margin[i] >= 0] or [int(margin.argmax())]
        if self.moe_choices is None:
            widths: List[int] = [self.mlp_choices[i] for i in logits.mlp.argmax(-1).tolist()]
            return Subnetwork(tuple(widths), tuple(counts), tuple(layers))
        topk = logits.topk + self.topk_mask(logits.experts)
        moe = {
            key: tuple(choices[i] for i in x.argmax(-1).tolist())
            for key, choices, x in zip(
                MOE_KEYS, self.moe_choices, (logits.experts, logits.moe_ffn, topk)
            )
        }
        dense = (self.mlp_choices[0],) * self.num_layers
        return Subnetwork(dense, tuple(counts), tuple(layers), **moe)

    def config(self) -> dict:
        out = {
            "budgets": self.budgets,
            "num_layers": self.num_layers,
            "mlp_choices": self.mlp_choices,
            "head_choices": self.head_choices,
            "hidden_size": self.net[0].out_features,
            "layer_skipping": self.layer_skipping,
        }
        if self.moe_choices is not None:  # dense routers keep their stored form
            out["moe_choices"] = self.moe_choices
        return out


def _check_moe_choices(moe_choices, mlp_choices) -> Optional[List[List[int]]]:
    """(expert counts, widths, top-k), each largest first, or None for a dense model; refused
    when some expert count has no top-k choice at or below it."""
    if not moe_choices:
        return None
    if len(moe_choices) != 3 or len(mlp_choices) != 1:
        raise ValueError(
            "a mixture of experts' router takes (expert counts, expert widths, top-k) choices "
            f"and its one dense width as mlp_choices; got {moe_choices}, {mlp_choices}"
        )
    choices = [sorted(set(c), reverse=True) for c in moe_choices]
    if min(choices[2]) > min(choices[0]):
        raise ValueError(
            f"top-k choices {choices[2]}: the smallest is above the smallest expert count "
            f"{min(choices[0])}, so that count has no valid top-k"
        )
    return choices
