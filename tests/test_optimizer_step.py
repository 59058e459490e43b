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
