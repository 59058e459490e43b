"""Budget sampling (deterministic, rank-independent, valid) and vocab-parallel distillation (TP=2
equals the unsharded KL, values and gradients)."""

from __future__ import annotations

import collections
import math

import pytest
import torch
import torch.nn.functional as F
from distributed import run_distributed
from helpers import elastic_choices, tiny_config

from megatron_flextron.routers.sampling import BudgetSampler, budget_subnetwork, check_budgets
from megatron_flextron.training.distillation import kl_divergence

pytestmark = pytest.mark.usefixtures("megatron_single_process")


def test_budget_maps_to_nearest_choices():
    m = tiny_config(
        "llama"
    )  # ffn 128, 8 heads in 4 groups; choices mlp {128,96,64,32}, heads {8,4}
    choices = elastic_choices(m)
    assert budget_subnetwork(1.0, m, choices).mlp == (128,) * 4
    half = budget_subnetwork(0.5, m, choices)
    assert half.mlp == (64,) * 4 and half.heads == (4,) * 4
    assert budget_subnetwork(0.75, m, choices).mlp == (96,) * 4
    import random

    per_layer = budget_subnetwork(0.75, m, choices, random.Random(0))
    assert all(w <= 96 for w in per_layer.mlp) and len(set(per_layer.mlp)) > 1
    per_layer.validate(m, choices, tp_size=2)


def test_sampler_is_deterministic_and_follows_the_probabilities():
    m = tiny_config("gpt3")
    sampler = BudgetSampler(
        m,
        elastic_choices(m),
        budgets=(1.0, 0.5, 0.25),
        probs=(0.2, 0.3, 0.5),
        full_model_prob=0.25,
        seed=7,
    )
    again = BudgetSampler(
        m,
        elastic_choices(m),
        budgets=(1.0, 0.5, 0.25),
        probs=(0.2, 0.3, 0.5),
        full_model_prob=0.25,
        seed=7,
    )
    draws = [sampler.sample(it, mb) for it in range(500) for mb in range(4)]
    assert draws == [again.sample(it, mb) for it in range(500) for mb in range(4)]
    counts = collections.Counter(b for b, _ in draws)
    n = len(draws)
    # P(0.25) = 0.75 * 0.5, P(0.5) = 0.75 * 0.3, P(1.0) = 0.25 + 0.75 * 0.2
    for budget, p in ((0.25, 0.375), (0.5, 0.225), (1.0, 0.4)):
        assert abs(counts[budget] / n - p) < 4 * math.sqrt(p * (1 - p) / n), (budget, counts)


@pytest.mark.parametrize(
    "budgets, probs, message",
    [
        ((), None, "empty"),
        ((1.0, 0.0), None, "must lie in"),
        ((1.2,), None, "must lie in"),
        ((float("nan"),), None, "must lie in"),
        ((0.5, 1.0), None, "sorted descending"),
        ((1.0, 0.5), (0.5,), "2 budgets"),
        ((1.0, 0.5), (0.7, 0.7), "sum to 1"),
    ],
)
def test_bad_budgets_are_refused(budgets, probs, message):
    with pytest.raises(ValueError, match=message):
        check_budgets(budgets, probs)


def _kl_reference(student, teacher, t):
    return (
        F.kl_div(
            F.log_softmax(student / t, -1),
            F.log_softmax(teacher / t, -1),
            log_target=True,
            reduction="none",
        ).sum(-1)
        * t
        * t
    )


def test_kl_matches_torch_in_one_process():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 64, requires_grad=True), torch.randn(2, 5, 64)
    ours = kl_divergence(s, t, temperature=2.0)
    ref = _kl_reference(s, t, 2.0)
    assert torch.allclose(ours, ref, atol=1e-6)
    (g_ours,) = torch.autograd.grad(ours.sum(), s)
    (g_ref,) = torch.autograd.grad(ref.sum(), s)
    assert torch.allclose(g_ours, g_ref, atol=1e-6)


def _kl_tp_body(rank, world_size, student, teacher, ref, ref_grad):
    from megatron_flextron.parallel import initialize_model_parallel

    initialize_model_parallel(world_size, 1)
    shard = student.chunk(world_size, -1)[rank].clone().requires_grad_(True)
    kl = kl_divergence(shard, teacher.chunk(world_size, -1)[rank], temperature=2.0)
    assert torch.allclose(kl, ref, atol=1e-6), (kl - ref).abs().max()
    kl.sum().backward()
    assert torch.allclose(shard.grad, ref_grad.chunk(world_size, -1)[rank], atol=1e-6)


def test_kl_under_tp2_equals_unsharded():
    torch.manual_seed(1)
    s, t = torch.randn(2, 5, 64, requires_grad=True), torch.randn(2, 5, 64)
    ref = _kl_reference(s, t, 2.0)
    (grad,) = torch.autograd.grad(ref.sum(), s)
    run_distributed(_kl_tp_body, 2, s.detach(), t, ref.detach(), grad)
