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

from typing import Sequence, Tuple

import torch
from megatron.core import parallel_state

from megatron_flextron.config import ElasticConfig, ModelConfig
from megatron_flextron.parallel import all_reduce_grads, seeded
from megatron_flextron.routers.cost import CostModel, budget_loss, router_choices
from megatron_flextron.routers.static import Choices, GumbelSchedule, StaticRouter


class JointRouter:
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
    ):
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
            )
        self.cost, self.budget_weight, self.tolerance = cost, budget_weight, tolerance
        self.cost_table_dict = cost.latency.to_dict() if cost.latency is not None else None
        self.seed = seed
        self.origin = "a new router"  # where the router starts (for the log)
        self.schedule = schedule or GumbelSchedule()
        self.optimizer = torch.optim.Adam(self.router.parameters(), lr=lr)

    def sample(self, budget: float, iteration: int, microbatch: int) -> Choices:
        """Straight-through one-hot choices [L, n] for MLP and heads (and kept layers [L]);
        identical on all ranks."""
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

    def start_from(self, ckpt_dir: str, model_cfg: ModelConfig, elastic_cfg: ElasticConfig) -> str:
        """Phase 3 after phase 2: start from the checkpoint's trained static router
        (tools/train_router.py) when it has the same budgets, layers and choices. Returns
        where the router starts, for the log."""
        from megatron_flextron.routers.checkpoint import load_router

        found = load_router(ckpt_dir, model_cfg, elastic_cfg)
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
