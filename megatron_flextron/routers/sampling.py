"""Which sub-network a micro-batch trains: Flextron's budget sampling.

With probability ``original_model_sample_prob`` the full model, else a budget drawn from
``budget_list`` with ``budget_probs``. A budget b maps to the elastic choices nearest to b x the
full MLP width and b x the full head count (homogeneous), or, per layer, to a random choice for
each layer among those at or below them (heterogeneous). A mixture of experts maps a budget to
the largest sub-network whose active (or total) parameter count fits it. The draw is seeded by
(seed, iteration, micro-batch), never by the rank, so every data-parallel (and TP/PP) rank makes
the same choice.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

from megatron_flextron.config import ElasticConfig, ModelConfig
from megatron_flextron.elastic.subnetwork import Subnetwork, count_parameters
from megatron_flextron.routers.cost import check_budget_list


def check_budgets(budgets: Sequence[float], probs: Optional[Sequence[float]] = None) -> None:
    """Budgets lie in (0, 1] and are sorted descending; probabilities match and sum to 1."""
    check_budget_list(budgets, "--budget-list")
    if probs is not None:
        if len(probs) != len(budgets):
            raise ValueError(f"--budget-probs has {len(probs)} values for {len(budgets)} budgets")
        if any(p < 0 for p in probs) or not math.isclose(sum(probs), 1.0, abs_tol=1e-6):
            raise ValueError(f"--budget-probs {list(probs)} must be non-negative and sum to 1")


def _nearest(choices: Sequence[int], target: float) -> int:
    return min(choices, key=lambda c: (abs(c - target), -c))


def budget_subnetwork(
    budget: float, model: ModelConfig, elastic: ElasticConfig, rng: Optional[random.Random] = None
) -> Subnetwork:
    """The sub-network of a budget: homogeneous, or per layer when ``rng`` is given."""
    if model.is_moe:
        return moe_budget_subnetwork(budget, model, elastic, rng)
    mlp_choices, head_choices = (sorted(c) for c in elastic.choices_with_full(model))
    mlp = _nearest(mlp_choices, budget * model.ffn_hidden_size)
    heads = _nearest(head_choices, budget * model.num_attention_heads)
    n = model.num_layers
    if rng is None:
        return Subnetwork((mlp,) * n, (heads,) * n, tuple(range(n)))
    mlps = tuple(rng.choice([c for c in mlp_choices if c <= mlp]) for _ in range(n))
    heads_per_layer = tuple(rng.choice([c for c in head_choices if c <= heads]) for _ in range(n))
    return Subnetwork(mlps, heads_per_layer, tuple(range(n)))


def moe_budget_subnetwork(
    budget: float, model: ModelConfig, elastic: ElasticConfig, rng: Optional[random.Random] = None
) -> Subnetwork:
    """A mixture of experts' sub-network of a budget: of the homogeneous choices (experts, expert
    width, top-k, heads), the largest whose active (or total: ``elastic.budget_type``) parameter
    count is at most ``budget`` x the full model's (the smallest when none is), ties going to
    the larger other count. An active budget keeps every expert (they cost memory, not
    compute); per layer with ``rng``: a random choice at or below it on every axis."""
    n = model.num_layers
    kind = elastic.budget_type
    other = "total" if kind == "active" else "active"
    experts, widths, topks = (sorted(c) for c in elastic.moe_choices_with_full(model))
    if kind == "active":
        experts = [max(experts)]
    _, heads = (sorted(c) for c in elastic.choices_with_full(model))
    full = count_parameters(Subnetwork.full(model), model)[kind]
    best = None
    for choice in itertools.product(experts, widths, topks, heads):
        if choice[2] > choice[0]:
            continue
        subnet = _moe_subnetwork(model, (choice,) * n)
        counts = count_parameters(subnet, model)
        fits = counts[kind] <= budget * full + 1e-9
        key = (fits, counts[kind] if fits else -counts[kind], counts[other])
        if best is None or key > best[0]:
            best = (key, choice, subnet)
    if rng is None:
        return best[2]
    top = best[1]
    per_layer = []
    for _ in range(n):
        e = rng.choice([c for c in experts if c <= top[0]])
        k = rng.choice([c for c in topks if c <= min(top[2], e)])
        f = rng.choice([c for c in widths if c <= top[1]])
        per_layer.append((e, f, k, rng.choice([c for c in heads if c <= top[3]])))
    return _moe_subnetwork(model, per_layer)


def _moe_subnetwork(model: ModelConfig, per_layer) -> Subnetwork:
    """(experts, expert width, top-k, heads) per layer -> a Subnetwork."""
    e, f, k, h = (tuple(axis) for axis in zip(*per_layer))
    n = model.num_layers
    return Subnetwork(
        (model.ffn_hidden_size,) * n, h, tuple(range(n)), experts=e, moe_ffn=f, topk=k
    )


@dataclass
class BudgetSampler:
    model: ModelConfig
    elastic: ElasticConfig
    budgets: Sequence[float] = (1.0, 0.75, 0.5, 0.35)
    probs: Optional[Sequence[float]] = None  # None: uniform
    full_model_prob: float = 1 / 3  # Nemotron Elastic's default
    heterogeneous: bool = False
    seed: int = 1234

    def __post_init__(self):
        check_budgets(self.budgets, self.probs)
        if not 0 <= self.full_model_prob <= 1:
            raise ValueError(f"--original-model-sample-prob {self.full_model_prob} not in [0, 1]")

    def sample(self, iteration: int, microbatch: int) -> Tuple[float, Subnetwork]:
        """(budget, sub-network) of one micro-batch; the same on every rank."""
        rng = random.Random(hash((self.seed, iteration, microbatch)) & 0xFFFFFFFF)
        if rng.random() < self.full_model_prob:
            return 1.0, Subnetwork.full(self.model)
        budget = rng.choices(list(self.budgets), weights=self.probs)[0]
        subnet = budget_subnetwork(
            budget, self.model, self.elastic, rng if self.heterogeneous else None
        )
        return budget, subnet
