"""The static router trained together with the model (Flextron's phase 3, or end to end without a
surrogate as in Nemotron Elastic): ``--router joint``.

A micro-batch that draws a budget no longer gets the nearest homogeneous sub-network: the router
samples a per-layer architecture (straight-through Gumbel-softmax, noise seeded by (seed,
iteration, micro-batch) so that every rank draws the same), the model runs it as a soft
architecture (exact sliced forward, gradients to the choice probabilities), and the loss adds the
router's budget loss. The router is replicated on every rank: its gradient is summed over TP
(each rank's mask covers its own units) and PP (each stage its own layers), averaged over DP, and
it steps with its own Adam next to megatron's optimizer.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from megatron.core import parallel_state

from megatron_flextron.config import ElasticConfig, ModelConfig
from megatron_flextron.elastic.soft_architecture import MoEProbabilities, set_soft_architecture
from megatron_flextron.parallel import all_reduce_grads, seeded
from megatron_flextron.routers.checkpoint import load_router, save_router
from megatron_flextron.routers.cost import (
    CostModel,
    budget_loss,
    moe_router_choices,
    router_choices,
)
from megatron_flextron.routers.policy import BudgetPolicy, Choice, StaticRouterPolicy, cost_ratios
from megatron_flextron.routers.static import Choices, GumbelSchedule, StaticRouter

COST_RATIO = "router cost ratio"  # the cost of the sampled architecture / the full model's


class JointRouter(BudgetPolicy):
    """A budget policy: budgets below 1.0 run the router's sampled architecture (a soft
    architecture in training, its argmax in evaluation); 1.0 runs the full model."""

    kind = "joint router"
    stat_names = (COST_RATIO,)
    checkpoint_key = "joint_router"

    def __init__(
        self,
        model_cfg: ModelConfig,
        elastic_cfg: ElasticConfig,
        budgets: Sequence[float],
        cost: CostModel,
        lr: float = 1e-3,
        budget_weight: float = 30.0,
        tolerance: float = 0.02,
        seed: int = 1234,
        schedule: GumbelSchedule = None,
        layer_skipping: bool = False,
        cost_seq_length: int = 2048,
    ):
        super().__init__(model_cfg, elastic_cfg)
        self.mlp_choices, self.head_choices = router_choices(model_cfg, elastic_cfg)
        if layer_skipping and not elastic_cfg.allow_layer_skipping:
            raise ValueError("--router-layer-skipping: this elastic model does not allow it")
        with seeded(seed):  # the same initial router on every rank
            self.router = StaticRouter(
                budgets,
                model_cfg.num_layers,
                self.mlp_choices,
                self.head_choices,
                layer_skipping=layer_skipping,
                moe_choices=moe_router_choices(model_cfg, elastic_cfg),
            )
        self.cost, self.budget_weight, self.tolerance = cost, budget_weight, tolerance
        self.cost_table_dict = cost.latency.to_dict() if cost.latency is not None else None
        self.cost_settings = {  # stored next to the exported router (routers/checkpoint.py)
            "metric": cost.metric,
            "seq_length": cost_seq_length,
            "tolerance": tolerance,
            "latency_table": self.cost_table_dict,
            "trained": "jointly with the model",
        }
        if model_cfg.is_moe:  # what the params cost counts (the tools' cost model reads it)
            self.cost_settings["budget_type"] = elastic_cfg.budget_type
        self.seed = seed
        self.origin = "a new router"  # where the router starts (for the log)
        self.schedule = schedule or GumbelSchedule()
        self.optimizer = torch.optim.Adam(self.router.parameters(), lr=lr)

    def sample(self, budget: float, iteration: int, microbatch: int) -> Choices:
        """Straight-through one-hot choices [L, n] for MLP (a mixture of experts: experts, expert
        width, top-k) and heads (and kept layers [L]); identical on all ranks."""
        generator = torch.Generator().manual_seed(
            hash((self.seed, iteration, microbatch)) & 0xFFFFFFFF
        )
        tau = self.schedule.temperature(iteration)
        scale = self.schedule.logit_scale(iteration)
        return self.router.sample(budget, tau, scale, generator)

    def budget_term(self, choices: Choices, budget: float) -> Tuple[torch.Tensor, float]:
        """(weighted budget loss, cost ratio) of sampled choices."""
        ratio = self.cost.ratio(*choices.double()).float()
        return self.budget_weight * budget_loss(ratio, budget, self.tolerance), float(ratio)

    def finish_grads(self) -> None:
        all_reduce_grads(
            list(self.router.parameters()),
            sum_groups=[parallel_state.get_model_parallel_group()],
            average_group=parallel_state.get_data_parallel_group(),
        )

    def step(self) -> None:
        """Adam step; with budget 1.0 among the router's budgets, first a pull of its choices to
        the largest ones (training runs budget 1.0 as the full model, never through the router,
        so the tools' --budget 1.0 would otherwise read an untrained output)."""
        if self.router.budgets[0] == 1.0:  # the same on every rank, after the reduction
            self.router.largest_pull(1.0).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def start_from(self, ckpt_dir: str) -> None:
        """Phase 3 after phase 2: start from the checkpoint's trained static router
        (tools/train_router.py) when it has the same budgets, layers and choices; ``origin``
        says where the router starts, for the log."""
        self.origin = self._trained_router_in(ckpt_dir)

    def _trained_router_in(self, ckpt_dir: str) -> str:
        found = load_router(ckpt_dir, self.model_cfg, self.elastic)
        if found is None:
            return "a new router"
        trained, _, settings = found
        if trained.config() != self.router.config():
            return (
                f"a new router ({ckpt_dir}/router was trained for {trained.config()}, "
                f"this run needs {self.router.config()})"
            )
        if settings["metric"] != self.cost.metric or (
            self.cost.metric == "latency" and settings.get("latency_table") != self.cost_table_dict
        ):
            return (
                f"a new router ({ckpt_dir}/router was trained for the {settings['metric']} cost"
                f"{' of another latency table' if settings['metric'] == 'latency' else ''}, "
                f"this run's budgets measure {self.cost.metric})"
            )
        self.router.load_state_dict(trained.state_dict())
        return f"the trained router in {ckpt_dir}/router (phase 2)"

    def state_dict(self) -> dict:
        return {"router": self.router.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.router.load_state_dict(state["router"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.origin = "the training checkpoint's router (resumed)"

    def export(self, ckpt_dir: str, state: Optional[dict]) -> None:
        """The router for --budget in the tools (routers/checkpoint.py)."""
        save_router(ckpt_dir, self.router, self.cost_settings)

    # -- the budget policy ---------------------------------------------------------------------
    def routes(self, budget: float) -> bool:
        return budget < 1.0

    def choose(self, budget: float) -> Choice:
        """The router's argmax architecture below 1.0; the full model (nearest choices) at 1.0
        (training never runs budget 1.0 through the router)."""
        if not self.routes(budget):
            return self.nearest(budget)
        served = StaticRouterPolicy(
            self.model_cfg, self.elastic, self.router, self.cost, self.cost_settings
        ).choose(budget)
        return Choice(budget, served.subnetwork, {**served.info, "chosen_by": self.kind})

    def before_forward(self, model, budget, subnet, iteration, microbatch, count):
        if not self.routes(budget):
            return super().before_forward(model, budget, subnet, iteration, microbatch, count)
        self.reset(model)
        routed = self.sample(budget, iteration, microbatch)
        moe = None
        if self.router.moe_choices is not None:
            moe = MoEProbabilities(
                routed.experts, routed.moe_ffn, routed.topk, self.router.moe_choices
            )
        set_soft_architecture(
            model, routed.mlp, routed.heads, self.mlp_choices, self.head_choices, routed.keep, moe
        )
        return routed

    def loss_term(self, handle, budget: float):
        """The budget loss, counted once (TP rank 0; the router's gradient is summed over TP)."""
        if handle is None:
            return None, {}
        term, ratio = self.budget_term(handle, budget)
        if parallel_state.get_tensor_model_parallel_rank() != 0:
            term = None
        return term, {COST_RATIO: ratio}

    def eval_stats(self) -> dict:
        """The cost ratio of the router's (argmax) architecture for each of its budgets."""
        return {COST_RATIO: cost_ratios(self.router, self.cost, self.router.budgets)}

    def describe(self, budget: float) -> str:
        if self.routes(budget):
            return "the joint router's sampled architecture"
        return super().describe(budget)
