"""A megatron DDP + megatron optimizer step on a sub-network moves only the active slices."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    batch,
    elastic_choices,
    random_canonical_state,
    tiny_config,
    train_step,
    wrap_ddp,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from megatron_flextron.elastic import build_gpt_model, set_subnetwork
from megatron_flextron.elastic.weight_decay import ElasticWeightDecay, active_regions

pytestmark = pytest.mark.usefixtures("megatron_single_process")

LR, WD = 1e-2, 0.1
SPEC = {"mlp": 32, "heads": 4, "layers": [0, 2, 3]}


def _active_mask(p, region):
    """Boolean mask of the elements a region covers."""
    if region is None:
        return torch.ones_like(p, dtype=torch.bool)
    mask = torch.zeros_like(p, dtype=torch.bool)
    for dim, selection in region:
        index = [slice(None)] * p.dim()
        index[dim] = selection
        mask[tuple(index)] = True
    return mask


def _setup(model_cfg, optimizer_wd):
    config = model_cfg.transformer_config()
    gpt = build_gpt_model(model_cfg, config, elastic=True)
    gpt.load_state_dict(random_canonical_state(model_cfg), strict=False)
    ddp = wrap_ddp(gpt, config)
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=LR, weight_decay=optimizer_wd, clip_grad=0.0), [ddp]
    )
    set_subnetwork(ddp, SPEC, model_cfg, elastic_choices(model_cfg))
    tokens, labels = batch()
    train_step(ddp, tokens, labels)
    return ddp, opt


@pytest.mark.parametrize("family", ["gpt3", "llama"])
def test_step_changes_only_active_slices(family):
    model_cfg = tiny_config(family)
    ddp, opt = _setup(model_cfg, optimizer_wd=0.0)
    before = {
        name: (p.detach().clone(), p.main_grad.clone(), _active_mask(p, region))
        for name, p, region in active_regions(ddp)
    }
    ElasticWeightDecay(ddp, WD).apply(LR)
    assert opt.step()[0]

    inactive_total = 0
    for name, p, _ in active_regions(ddp):
        old, grad, mask = before[name]
        inactive_total += int((~mask).sum())
        assert torch.equal(p.detach()[~mask], old[~mask]), f"{name}: an inactive weight moved"
        # The active part follows AdamW (decoupled decay) exactly; biases and norms are not decayed.
        ref = torch.nn.Parameter(old.clone())
        ref.grad = grad
        decayed = not name.endswith(".bias") and p.dim() > 1
        torch.optim.AdamW([ref], lr=LR, weight_decay=WD if decayed else 0.0).step()
        assert torch.allclose(p.detach()[mask], ref.detach()[mask], atol=1e-7), name
        if mask.any():
            assert not torch.equal(p.detach()[mask], old[mask]), f"{name}: an active weight stayed"
    assert inactive_total > 10_000


def test_plain_optimizer_weight_decay_would_move_inactive_weights():
    """Why ElasticWeightDecay exists: megatron's own decay shrinks unused weights too."""
    model_cfg = tiny_config("llama")
    ddp, opt = _setup(model_cfg, optimizer_wd=WD)
    fc2 = ddp.module.decoder.layers[0].mlp.linear_fc2.weight
    unused = fc2.detach()[:, SPEC["mlp"] :].clone()
    opt.step()
    assert not torch.equal(fc2.detach()[:, SPEC["mlp"] :], unused)


def _route_narrow(policy, kind: str) -> None:
    """Make the untrained router pick the narrowest choices (and, joint, skip layer 1), so that
    units stay masked out: what a trained router does for a small budget."""
    with torch.no_grad():
        if kind == "joint":
            router = policy.router
            bias = router.net[2].bias.view(router.num_layers, router.n_mlp + router.n_heads)
            bias[:, router.n_mlp - 1] += 50.0  # choices are largest first
            bias[:, -1] += 50.0
            router.depth.bias.view(router.num_layers, 2)[1, 1] += 50.0
        elif kind == "token":
            for router in policy.routers.values():
                router.budget_bias[:, -1] += 50.0


@pytest.mark.parametrize("kind", ["none", "joint", "token"])
def test_weight_decay_skips_units_no_gradient_reached_under_every_router(kind):
    """Slices (none), soft masks and skipped layers (joint), per-token widths (token): a unit of
    an elastic linear is decayed by exactly (1 - lr wd) when this step's gradient reached it
    and left bit for bit when none did; other matrices (embedding, head) are decayed whole."""
    from megatron_flextron.routers.build import RouterSettings, training_policy
    from megatron_flextron.routers.sampling import BudgetSampler
    from megatron_flextron.training.elastic_step import ElasticStep

    model_cfg = tiny_config("llama")
    elastic = elastic_choices(model_cfg)
    config = model_cfg.transformer_config()
    gpt = build_gpt_model(model_cfg, config, elastic=True)
    gpt.load_state_dict(random_canonical_state(model_cfg), strict=False)
    ddp = wrap_ddp(gpt, config)
    settings = RouterSettings(kind, budgets=[1.0, 0.35], layer_skipping=kind == "joint")
    policy = training_policy(settings, ddp, model_cfg, elastic)
    _route_narrow(policy, kind)
    decay = ElasticWeightDecay(ddp, WD)
    sampler = BudgetSampler(model_cfg, elastic, budgets=[0.35], full_model_prob=0.0)
    step = ElasticStep(ddp, model_cfg, elastic, sampler, "none", weight_decay=decay, policy=policy)
    tokens, labels = batch()
    ddp.zero_grad_buffer()
    step.run(0, [{"tokens": tokens, "labels": labels}])

    units = {id(p): d for p, d in _elastic_weights(ddp)}
    before = {name: p.detach().clone() for name, p in ddp.module.named_parameters()}
    decay.apply(LR)
    untouched = 0
    for name, p in ddp.module.named_parameters():
        old, new = before[name], p.detach()
        if name.endswith(".bias") or p.dim() == 1:
            assert torch.equal(new, old), name
            continue
        if id(p) not in units:
            assert torch.equal(new, old * (1 - LR * WD)), name
            continue
        dim = units[id(p)]
        reached = p.main_grad.ne(0).any(dim=1 - dim)
        want = torch.where(reached.unsqueeze(1 - dim), old * (1 - LR * WD), old)
        assert torch.equal(new, want), name
        untouched += int((~reached).sum())
    assert untouched > 100, untouched  # masked-out units exist, and kept their values


def _elastic_weights(ddp):
    from megatron_flextron.elastic.linear import (
        ElasticColumnParallelLinear,
        ElasticRowParallelLinear,
    )

    for module in ddp.module.modules():
        if isinstance(module, ElasticColumnParallelLinear):
            yield module.weight, 0
        elif isinstance(module, ElasticRowParallelLinear):
            yield module.weight, 1
