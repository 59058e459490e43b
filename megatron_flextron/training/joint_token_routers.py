"""--router token: input-adaptive token routers trained together with the model.

Budget micro-batches run the full-size model with every layer's MLP routed per token (straight-
through Gumbel-softmax samples, seeded by (seed, iteration, micro-batch, layer) so that TP ranks
and resumed runs draw alike), the routers conditioned on the micro-batch's budget, which is a
target mean MLP width fraction; attention keeps every head. The budget auxiliary loss rides on
each MLP output through megatron's MoEAuxLossAutoScaler, scaled like the LM loss (1 / number of
micro-batches). Full-model micro-batches and the teacher pass run without routing.

Gradients: the mixture sums each router's LM gradient over TP ranks itself (routers/token.py), so
TP ranks hold identical gradients; they are averaged over data-parallel ranks here. Pipeline
parallelism is refused for now (each stage would own its layers' routers and checkpoint them).
"""

from __future__ import annotations

from typing import List, Sequence

import torch
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from megatron_flextron.elastic.subnetwork import unwrap_model
from megatron_flextron.parallel import all_reduce_grads
from megatron_flextron.routers.static import GumbelSchedule, check_budget_list, encode_budget
from megatron_flextron.routers.token import (
    TokenRouter,
    disable_token_routing,
    enable_token_routing,
)
from megatron_flextron.routers.token_training import TrainedTokenRouting


class JointTokenRouters:
    def __init__(
        self,
        model,
        widths: Sequence[int],
        budgets: Sequence[float],
        lr: float = 1e-3,
        aux_loss_coeff: float = 10.0,
        tolerance: float = 0.02,
        seed: int = 1234,
        schedule: GumbelSchedule = None,
    ):
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            raise ValueError("--router token does not support pipeline parallelism yet")
        check_budget_list(budgets)
        self.widths = sorted(widths, reverse=True)
        self.budgets = list(budgets)
        self.seed = seed
        self.schedule = schedule or GumbelSchedule(tau_min=0.1)
        gpt = unwrap_model(model)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the same initial routers on every rank
            self.routers = [
                TokenRouter(gpt.config.hidden_size, len(self.widths), len(self.budgets))
                for _ in gpt.decoder.layers
            ]
        self.routings = enable_token_routing(
            model,
            self.widths,
            self.routers,
            mode="hard",
            aux_loss_coeff=aux_loss_coeff,
            tolerance=tolerance,
        )
        disable_token_routing(model)
        self.optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        self.eval_widths = {}  # budget -> mean MLP width fraction in the last evaluation

    def parameters(self) -> List[torch.nn.Parameter]:
        return [p for r in self.routers for p in r.parameters()]

    def attach(self, model, budget: float, iteration: int, microbatch: int, num_mb: int) -> None:
        """Route ``model``'s MLPs for ``budget`` in this micro-batch's forward pass."""
        code = encode_budget(self.budgets, budget)
        tau = self.schedule.temperature(iteration)
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / num_mb))
        layers = unwrap_model(model).decoder.layers
        for i, (layer, routing) in enumerate(zip(layers, self.routings)):
            routing.budget, routing.budget_code, routing.temperature = budget, code, tau
            routing.mode = "hard"
            routing.noise_seed = hash((self.seed, iteration, microbatch, i)) & 0x7FFFFFFF
            layer.mlp.__dict__["token_routing"] = routing

    def detach(self, model) -> None:
        disable_token_routing(model)

    def forward_stats(self) -> dict:
        """Mean MLP width fraction and budget aux loss of the last routed forward (layer mean)."""
        widths = [r.stats["mean_width_fraction"] for r in self.routings]
        aux = [r.stats.get("aux_loss", 0.0) for r in self.routings]
        n = len(self.routings)
        return {"router cost ratio": sum(widths) / n, "router aux loss": sum(aux) / n}

    def finish_grads(self) -> None:
        """Average the router gradients over data-parallel ranks."""
        all_reduce_grads(self.parameters(), average_group=parallel_state.get_data_parallel_group())

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def dispatch(self, model, budget: float) -> None:
        """Inference routing (argmax, token dispatch) for ``budget``: evaluation, served the way
        tools/evaluate.py --router dynamic serves the saved routers."""
        for routing in self.routings:
            routing.mode = "dispatch"
        self.serving = TrainedTokenRouting(self.routings, self.budgets, model, full_at_1=True)
        self.serving.condition(budget)

    def mean_width(self) -> float:
        """Mean MLP width fraction of the tokens dispatched since ``dispatch``."""
        return self.serving.mean_width()

    def state_dict(self) -> dict:
        return {
            "routers": [r.state_dict() for r in self.routers],
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        for router, s in zip(self.routers, state["routers"]):
            router.load_state_dict(s)
        self.optimizer.load_state_dict(state["optimizer"])
