"""The budget policy of a training run (``--router none | joint | token``), resumed or new.

The one place that maps the router flag to a policy kind; the trainer only holds the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from megatron_flextron.config import ElasticConfig, ModelConfig
from megatron_flextron.routers.checkpoint import ROUTER_KINDS
from megatron_flextron.routers.cost import CostModel, LatencyTable, router_choices
from megatron_flextron.routers.joint import JointRouter
from megatron_flextron.routers.joint_token import JointTokenRouters
from megatron_flextron.routers.policy import BudgetPolicy, NearestChoices
from megatron_flextron.routers.static import GumbelSchedule

__all__ = ["ROUTER_KINDS", "RouterSettings", "training_policy"]


@dataclass
class RouterSettings:
    """The router flags of a training run."""

    kind: str = "none"  # none | joint | token
    budgets: Sequence[float] = (1.0, 0.75, 0.5, 0.35)
    lr: float = 1e-3
    budget_weight: float = 30.0  # token routers: the weight of the aux loss
    tolerance: float = 0.02
    cost_metric: str = "params"
    latency_table: Optional[str] = None  # a JSON path (cost_metric latency)
    layer_skipping: bool = False
    seq_length: int = 2048  # the sequence length the flops cost counts attention at
    train_iters: int = 1  # the Gumbel temperature anneals over 70% of the run
    seed: int = 1234


def training_policy(
    settings: RouterSettings,
    model,
    model_cfg: ModelConfig,
    elastic: ElasticConfig,
    resume: Optional[dict] = None,
    load_dir: Optional[str] = None,
) -> BudgetPolicy:
    """The run's policy; ``resume``: the training checkpoint's common state (its policy state is
    restored), else a new run from ``load_dir`` (a trained router stored there may seed it)."""
    s = settings
    if s.kind not in ROUTER_KINDS:
        raise ValueError(f"--router {s.kind!r}: expected one of {ROUTER_KINDS}")
    steps = s.train_iters
    if s.kind == "joint":
        table = LatencyTable.load(s.latency_table) if s.latency_table else None
        cost = CostModel(model_cfg, elastic, s.cost_metric, s.seq_length, table)
        policy = JointRouter(
            model_cfg,
            elastic,
            s.budgets,
            cost,
            s.lr,
            s.budget_weight,
            s.tolerance,
            s.seed,
            # anneal to the minimum temperature by 70% of the run, whatever its length
            GumbelSchedule(steps=steps, decay=math.log(10) / (0.7 * steps)),
            s.layer_skipping,
            cost_seq_length=s.seq_length,
        )
    elif s.kind == "token":
        widths, _ = router_choices(model_cfg, elastic)
        policy = JointTokenRouters(
            model,
            model_cfg,
            elastic,
            widths,
            s.budgets,
            s.lr,
            s.budget_weight,
            s.tolerance,
            s.seed,
            # anneal from the start temperature to 0.1 by 70% of the run: training then routes
            # as sharply as the argmax used at evaluation
            GumbelSchedule(
                tau_min=0.1,
                steps=steps,
                decay=math.log(GumbelSchedule.tau_start / 0.1) / (0.7 * steps),
            ),
        )
    else:
        policy = NearestChoices(model_cfg, elastic)
    if resume and policy.checkpoint_key in resume:
        policy.load_state_dict(resume[policy.checkpoint_key])
    elif load_dir:
        policy.start_from(load_dir)
    return policy
