"""--router token: input-adaptive token routers trained together with the model.

Budget micro-batches run the full-size model with every layer's MLP routed per token (straight-
through Gumbel-softmax samples, seeded by (seed, iteration, micro-batch, layer) so that TP ranks,
pipeline layouts and resumed runs draw alike), the routers conditioned on the micro-batch's
budget, which is a target mean MLP width fraction; attention keeps every head. The budget
auxiliary loss rides on each MLP output through megatron's MoEAuxLossAutoScaler, scaled like the
LM loss (1 / number of micro-batches). Full-model micro-batches and the teacher pass run without
routing.

Each pipeline stage owns the routers of its layers (created from a seed per global layer, each
with its own Adam, so any layout trains the same routers). Gradients: the mixture sums each
router's LM gradient over TP ranks itself (routers/token.py), so TP ranks hold identical
gradients; they are averaged over data-parallel ranks here. Checkpoints gather every stage's
routers, indexed by global layer.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from megatron_flextron.checkpoint.state import CheckpointError
from megatron_flextron.elastic.blocks import num_blocks, transformer_blocks
from megatron_flextron.elastic.subnetwork import unwrap_model
from megatron_flextron.parallel import all_reduce_grads, data_parallel_mean, seeded
from megatron_flextron.routers.cost import check_budget_list
from megatron_flextron.routers.policy import BudgetPolicy, Choice
from megatron_flextron.routers.static import GumbelSchedule, encode_budget
from megatron_flextron.routers.token import (
    TokenRouter,
    disable_token_routing,
    enable_token_routing,
)
from megatron_flextron.routers.token_training import (
    MEAN_WIDTH,
    TrainedTokenRouting,
    save_token_routers,
)

AUX_LOSS = "router aux loss"  # the budget auxiliary loss of the routed widths, layer mean


class JointTokenRouters(BudgetPolicy):
    """A budget policy: budgets below 1.0 run the full model with every token's MLP width routed
    (sampled in training, argmax dispatch in evaluation); 1.0 runs the full model."""

    kind = "token routers"
    stat_names = (MEAN_WIDTH, AUX_LOSS)
    checkpoint_key = "token_routers"

    def __init__(
        self,
        model,
        model_cfg,
        elastic_cfg,
        widths: Sequence[int],
        budgets: Sequence[float],
        lr: float = 1e-3,
        aux_loss_coeff: float = 10.0,
        tolerance: float = 0.02,
        seed: int = 1234,
        schedule: GumbelSchedule = None,
    ):
        super().__init__(model_cfg, elastic_cfg)
        check_budget_list(budgets)
        self.widths = sorted(widths, reverse=True)
        self.budgets = list(budgets)
        self.seed = seed
        self.schedule = schedule or GumbelSchedule(tau_min=0.1)
        gpt = unwrap_model(model)
        self.num_layers = num_blocks(gpt)
        self.layer_ids = [block.index for block in transformer_blocks(gpt)]  # global
        self.routers = {}
        for i in self.layer_ids:
            with seeded(seed + i):  # layer i's router alike on every rank and layout
                self.routers[i] = TokenRouter(
                    gpt.config.hidden_size, len(self.widths), len(self.budgets)
                )
        self.routings = enable_token_routing(
            model,
            self.widths,
            self.routers,
            mode="hard",
            aux_loss_coeff=aux_loss_coeff,
            tolerance=tolerance,
        )
        disable_token_routing(model)
        self.optimizers = {
            i: torch.optim.Adam(router.parameters(), lr=lr) for i, router in self.routers.items()
        }
        self.eval_widths = {}  # budget -> mean MLP width fraction in the last evaluation
        self.step_totals = {}  # budget -> [width fraction sum, aux loss sum] / layers, this step

    def parameters(self) -> List[torch.nn.Parameter]:
        return [p for r in self.routers.values() for p in r.parameters()]

    def attach(self, model, budget: float, iteration: int, microbatch: int, num_mb: int) -> None:
        """Route ``model``'s MLPs for ``budget`` in this micro-batch's forward pass."""
        code = encode_budget(self.budgets, budget)
        tau = self.schedule.temperature(iteration)
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / num_mb))
        layers = transformer_blocks(model)
        for i, layer, routing in zip(self.layer_ids, layers, self.routings):
            routing.budget, routing.budget_code, routing.temperature = budget, code, tau
            routing.mode = "hard"
            routing.noise_seed = hash((self.seed, iteration, microbatch, i)) & 0x7FFFFFFF
            layer.mlp.set_token_routing(routing)

    def detach(self, model) -> None:
        disable_token_routing(model)

    def record_forward(self, budget: float) -> None:
        """Add the last routed forward's width and aux loss (this stage's layers, as a share of
        the layer mean over all stages) to this step's totals for ``budget``."""
        totals = self.step_totals.setdefault(budget, [0.0, 0.0])
        for r in self.routings:
            totals[0] += r.stats["mean_width_fraction"] / self.num_layers
            totals[1] += r.stats.get("aux_loss", 0.0) / self.num_layers

    def take_step_totals(self) -> dict:
        """This step's totals per budget (summed over micro-batches); resets them."""
        totals, self.step_totals = self.step_totals, {}
        return totals

    def finish_grads(self) -> None:
        """Average the router gradients over data-parallel ranks."""
        all_reduce_grads(self.parameters(), average_group=parallel_state.get_data_parallel_group())

    def step(self) -> None:
        for optimizer in self.optimizers.values():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def dispatch(self, model, budget: float) -> None:
        """Inference routing (argmax, token dispatch) for ``budget``: evaluation, served the way
        tools/evaluate.py --router token serves the saved routers."""
        for routing in self.routings:
            routing.mode = "dispatch"
        self.serving = TrainedTokenRouting(self.routings, self.budgets, model, full_at_1=True)
        self.serving.condition(budget)

    def mean_width(self) -> float:
        """Mean MLP width fraction of the tokens dispatched since ``dispatch`` (all stages)."""
        return self.serving.mean_width()

    # -- the budget policy ---------------------------------------------------------------------
    def routes(self, budget: float) -> bool:
        return budget < 1.0

    def choose(self, budget: float) -> Choice:
        if not self.routes(budget):
            return self.nearest(budget)
        return Choice(budget, None, {"chosen_by": self.kind})

    def apply(self, model, budget: float) -> Choice:
        if not self.routes(budget):
            return super().apply(model, budget)
        self.reset(model)
        self.dispatch(model, budget)
        return self.choose(budget)

    def finish_pass(self, budget: float) -> None:
        """Record the dispatched mean width (averaged over data-parallel ranks)."""
        if self.routes(budget):
            self.eval_widths[f"{budget:g}"] = data_parallel_mean(self.mean_width())

    def eval_stats(self) -> dict:
        """The mean MLP width fraction each budget's routing used in the last evaluation."""
        return {MEAN_WIDTH: dict(self.eval_widths)}

    def before_forward(self, model, budget, subnet, iteration, microbatch, count):
        if not self.routes(budget):  # the full model, every token's MLP width routed
            return super().before_forward(model, budget, subnet, iteration, microbatch, count)
        self.reset(model)
        self.attach(model, budget, iteration, microbatch, count)
        return None

    def after_forward(self, model, budget: float, handle) -> None:
        """Backward replays the recorded graph: the routing can go now."""
        if self.routes(budget):
            self.record_forward(budget)
            self.detach(model)

    def stage_stats(self) -> dict:
        return {
            budget: {MEAN_WIDTH: width, AUX_LOSS: aux}
            for budget, (width, aux) in self.take_step_totals().items()
        }

    def export(self, ckpt_dir: str, state: Optional[dict]) -> None:
        """Every layer's router for --router token in the tools (budget 1.0: the full model)."""
        layers = state["layers"]
        save_token_routers(
            ckpt_dir, [layer["router"] for layer in layers], self.widths, self.budgets, True
        )

    def describe(self, budget: float) -> str:
        if self.routes(budget):
            return f"token-routed MLP widths, mean {budget:g}"
        return super().describe(budget)

    def state_dict(self) -> dict:
        """Collective over the pipeline stages: every layer's router and Adam state (CPU),
        in global layer order, on every rank."""
        local = {
            i: {
                "router": _to_cpu(self.routers[i].state_dict()),
                "optimizer": _to_cpu(self.optimizers[i].state_dict()),
            }
            for i in self.layer_ids
        }
        merged = {}
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            parts = [None] * parallel_state.get_pipeline_model_parallel_world_size()
            group = parallel_state.get_pipeline_model_parallel_group()
            torch.distributed.all_gather_object(parts, local, group=group)
            for part in parts:
                merged.update(part)
        else:
            merged = local
        return {"layers": [merged[i] for i in range(self.num_layers)]}

    def load_state_dict(self, state: dict) -> None:
        if "layers" not in state or len(state["layers"]) != self.num_layers:
            raise CheckpointError(
                "the checkpoint's token routers do not cover this model's "
                f"{self.num_layers} layers (saved by an older version, or for another model): "
                "start a new run from its weights (--load it, --save to a new folder)"
            )
        for i in self.layer_ids:
            self.routers[i].load_state_dict(state["layers"][i]["router"])
            self.optimizers[i].load_state_dict(state["layers"][i]["optimizer"])


def _to_cpu(state):
    if isinstance(state, torch.Tensor):
        return state.detach().cpu()
    if isinstance(state, dict):
        return {k: _to_cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_to_cpu(v) for v in state)
    return state
