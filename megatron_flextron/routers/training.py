"""Phase 2 of router training: the static router against the surrogate and the budget loss.

Each step draws a budget (a trained one, or half the time any value between the smallest and the
largest, so that interpolated budgets are trained too), samples an architecture with
straight-through Gumbel-softmax and minimises

    surrogate loss (standardised)  +  budget_weight x |cost/budget - 1| beyond the tolerance
    (+ at budget 1.0: -log p(largest choice) per layer, pulling the full budget to the full model)

The surrogate is only trusted when its held-out error is under ``max_surrogate_error``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from megatron_flextron.checkpoint.load import load_elastic_model, read_model_configs
from megatron_flextron.data.corpus import checkpoint_sequences
from megatron_flextron.lm_step import pad_microbatches
from megatron_flextron.parallel import current_device
from megatron_flextron.routers.checkpoint import save_router
from megatron_flextron.routers.cost import (
    CostModel,
    LatencyTable,
    budget_loss,
    check_budget_list,
    moe_router_choices,
    router_choices,
)
from megatron_flextron.routers.static import GumbelSchedule, StaticRouter
from megatron_flextron.routers.surrogate import (
    Surrogate,
    encode,
    fit_surrogate,
    measure_losses,
    sample_architectures,
    sample_moe_architectures,
)


def train_static_router(
    router: StaticRouter,
    surrogate: Surrogate,
    cost: CostModel,
    steps: int = 500,
    lr: float = 1e-3,
    budget_weight: float = 30.0,
    tolerance: float = 0.02,
    schedule: GumbelSchedule = None,
    surrogate_error: float = 0.0,
    max_surrogate_error: float = float("inf"),
    seed: int = 0,
) -> List[Dict[str, float]]:
    if surrogate_error > max_surrogate_error:
        raise ValueError(
            f"the surrogate's held-out error {surrogate_error:.4f} is above "
            f"--max-surrogate-error {max_surrogate_error}: measure more architectures"
        )
    schedule = schedule or GumbelSchedule(steps=steps)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    for p in surrogate.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(router.parameters(), lr=lr)
    lo, hi = router.budgets[-1], router.budgets[0]
    history = []
    for step in range(steps):
        budget = rng.choice(router.budgets) if rng.random() < 0.5 else rng.uniform(lo, hi)
        tau, scale = schedule.temperature(step), schedule.logit_scale(step)
        choices = router.sample(budget, tau, scale)
        quality = (surrogate(*choices) - surrogate.mean) / surrogate.std
        ratio = cost.ratio(*choices.double()).float()
        loss = quality + budget_weight * budget_loss(ratio, budget, tolerance)
        if budget == 1.0:
            loss = loss + router.largest_pull(budget)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append({"step": step, "budget": budget, "loss": float(loss), "ratio": float(ratio)})
    return history


def router_report(router: StaticRouter, cost: CostModel, budgets) -> List[dict]:
    """Per budget: the argmax architecture, its exact cost ratio and the expected (soft) one."""
    rows = []
    full = cost.full()
    n = router.num_layers
    moe = None
    if router.moe_choices is not None:  # the fewest experts, narrowest, smallest top-k
        moe = [tuple(c[-1] for c in router.moe_choices)] * n
    smallest = cost.of_subnetwork(
        [router.mlp_choices[-1]] * n,
        [router.head_choices[-1]] * n,
        [0] if router.layer_skipping else None,
        moe,
    )
    for b in budgets:
        subnet = router.choose(b)
        rows.append(
            {
                "budget": b,
                "subnetwork": subnet.to_dict(),
                "cost_ratio": round(cost.of(subnet) / full, 4),
                "expected_cost_ratio": round(float(cost.ratio(*router.expected(b).double())), 4),
                # below the smallest architecture's cost no choice can meet the budget
                "feasible": b >= smallest / full - 1e-9,
            }
        )
    return rows


@dataclass
class RouterPipeline:
    """Settings of phases 1 and 2 on a checkpoint (tools/train_router.py's flags)."""

    budgets: Sequence[float] = (1.0, 0.75, 0.5, 0.35)
    metric: str = "params"  # what a budget measures (routers/cost.py METRICS)
    latency_table: Optional[str] = None  # JSON from tools/measure_latency.py (latency metric)
    cost_seq_length: int = 2048  # the flops metric counts attention at this length
    data: str = "wiki:valid"  # calibration text: wiki:SPLIT, .jsonl or text
    num_architectures: int = 96
    samples: int = 8  # calibration sequences
    seq_length: int = 128  # their length
    micro_batch_size: int = 4
    surrogate_steps: int = 2000
    router_steps: int = 500
    tolerance: float = 0.02  # the budget loss's dead zone
    max_surrogate_error: float = 0.1  # held-out relative error above which phase 2 is refused
    seed: int = 0
    layer_skipping: bool = False


def train_router_for_checkpoint(
    ckpt_dir: str, pipeline: Optional[RouterPipeline] = None, log=print
) -> dict:
    """Phases 1 and 2 on a flextron checkpoint (one process): measure architectures, fit the
    surrogate, train the router, store it in ``ckpt_dir/router/``. Returns the report."""
    c = pipeline if pipeline is not None else RouterPipeline()
    budgets = list(c.budgets)
    check_budget_list(budgets)
    _, model_cfg, elastic = read_model_configs(ckpt_dir)
    if c.layer_skipping and not elastic.allow_layer_skipping:
        raise ValueError(f"{ckpt_dir}: this elastic model does not allow layer skipping")
    table = LatencyTable.load(c.latency_table) if c.latency_table else None
    cost = CostModel(model_cfg, elastic, c.metric, c.cost_seq_length, table)
    mlp_choices, head_choices = router_choices(model_cfg, elastic)

    seqs = checkpoint_sequences(ckpt_dir, c.data, c.seq_length, c.samples)
    if len(seqs) < c.samples:
        raise ValueError(
            f"{c.data} gives {len(seqs)} sequences of {c.seq_length}, need {c.samples}"
        )
    model = load_elastic_model(ckpt_dir).model
    batches = pad_microbatches(seqs[: c.samples], c.micro_batch_size, current_device())

    layers = model_cfg.num_layers
    moe_choices = moe_router_choices(model_cfg, elastic)
    if moe_choices is None:
        archs = sample_architectures(
            c.num_architectures, layers, mlp_choices, head_choices, c.seed, c.layer_skipping
        )
    else:
        if c.layer_skipping:
            raise ValueError("--router-layer-skipping is not built for mixtures of experts yet")
        archs = sample_moe_architectures(
            c.num_architectures, layers, mlp_choices[0], head_choices, moe_choices, c.seed
        )
    shape = f"{c.samples} x {c.seq_length}"
    log(f"phase 1: measuring the loss of {len(archs)} architectures on {shape}")
    losses = measure_losses(model, archs, batches, model_cfg, elastic)
    p_mlp, p_heads, p_keep, *moe = encode(archs, mlp_choices, head_choices, moe_choices)
    surrogate = Surrogate(
        layers,
        0 if moe else len(mlp_choices),
        len(head_choices),
        moe_sizes=[len(x) for x in moe_choices or ()],
    )
    fit = fit_surrogate(
        surrogate,
        p_mlp,
        p_heads,
        losses,
        steps=c.surrogate_steps,
        seed=c.seed,
        p_keep=p_keep,
        moe=moe,
    )
    log(f"surrogate: {fit}")

    log(f"phase 2: router on surrogate + {c.metric} budget loss ({c.router_steps} steps)")
    router = StaticRouter(
        budgets,
        layers,
        mlp_choices,
        head_choices,
        layer_skipping=c.layer_skipping,
        moe_choices=moe_choices,
    )
    train_static_router(
        router,
        surrogate,
        cost,
        steps=c.router_steps,
        tolerance=c.tolerance,
        surrogate_error=fit["heldout_relative_mae"],
        max_surrogate_error=c.max_surrogate_error,
        seed=c.seed,
    )
    report = router_report(router, cost, budgets)
    chosen = [router.choose(b) for b in budgets]
    measured = measure_losses(model, chosen, batches, model_cfg, elastic).tolist()
    for row, loss in zip(report, measured):
        row["loss"] = round(loss, 4)
    save_router(
        ckpt_dir,
        router,
        {
            "metric": c.metric,
            "seq_length": c.cost_seq_length,
            "tolerance": c.tolerance,
            "latency_table": table.to_dict() if table else None,
            "surrogate": fit,
            **({"budget_type": elastic.budget_type} if moe_choices else {}),
        },
    )
    return {"surrogate": fit, "budgets": report}
