"""Training token routers on a frozen elastic LLM, and storing them in the checkpoint.

Each step draws a trained budget, conditions every layer's router on it, routes with
straight-through Gumbel-softmax samples (the forward computes the sampled widths exactly) and
minimises the LM loss plus the budget auxiliary loss on each layer's mean width (attached with
MoEAuxLossAutoScaler). Only the routers train. Stored as ``CKPT/token_router/``.
"""

from __future__ import annotations

import math
import os
import random
from typing import List, Optional, Sequence

import torch
from megatron.core import parallel_state

from megatron_flextron.checkpoint.io import atomic_output_dir, read_json, write_json
from megatron_flextron.checkpoint.state import CheckpointError
from megatron_flextron.elastic.blocks import num_blocks, transformer_blocks
from megatron_flextron.elastic.state import reset_elastic_state
from megatron_flextron.elastic.subnetwork import Subnetwork, unwrap_model
from megatron_flextron.lm_step import loss_func, position_ids
from megatron_flextron.parallel import current_device
from megatron_flextron.routers.cost import check_budget_list
from megatron_flextron.routers.policy import Choice, ServingPolicy
from megatron_flextron.routers.static import GumbelSchedule, encode_budget
from megatron_flextron.routers.token import TokenRouter, enable_token_routing

TOKEN_ROUTER_DIR = "token_router"
MEAN_WIDTH = "router mean mlp width"  # mean MLP width fraction of the routed tokens


def train_token_routers(
    model,
    widths: Sequence[int],
    budgets: Sequence[float],
    microbatches: List[dict],
    steps: int = 200,
    lr: float = 1e-2,
    aux_loss_coeff: float = 10.0,
    tolerance: float = 0.02,
    seed: int = 0,
    log_interval: int = 0,
    log=print,
) -> List[TokenRouter]:
    """Returns the trained routers; every ``log_interval`` steps logs the LM loss, the budget
    auxiliary loss (mean over layers) and the mean MLP width of that step."""
    check_budget_list(budgets)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    hidden = model.config.hidden_size
    routers = [TokenRouter(hidden, len(widths), len(budgets)) for _ in transformer_blocks(model)]
    routings = enable_token_routing(
        model, widths, routers, mode="hard", aux_loss_coeff=aux_loss_coeff, tolerance=tolerance
    )
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for r in routers for p in r.parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    # anneal to the minimum temperature by 70% of the steps: the argmax used at inference then
    # matches what was trained
    schedule = GumbelSchedule(tau_min=0.1, steps=steps, decay=math.log(50) / (0.7 * steps))
    for step in range(steps):
        budget = rng.choice(list(budgets))
        code = encode_budget(budgets, budget)
        for routing in routings:
            routing.budget, routing.budget_code = budget, code
            routing.temperature = schedule.temperature(step)
        batch = microbatches[step % len(microbatches)]
        per_token = model(batch["tokens"], position_ids(batch), None, labels=batch["labels"])
        loss, _ = loss_func(batch["loss_mask"], per_token)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log_interval and ((step + 1) % log_interval == 0 or step + 1 == steps):
            aux = [r.stats.get("aux_loss", 0.0) for r in routings]
            width = [r.stats["mean_width_fraction"] for r in routings]
            log(
                f" step {step + 1:>5}/{steps} | budget {budget:g} | lm loss {float(loss):.4f} | "
                f"aux loss {sum(aux) / len(aux):.4f} | mean MLP width {sum(width) / len(width):.3f}"
            )
    return routers


def save_token_routers(
    ckpt_dir: str, routers, widths, budgets, full_at_1: bool = False, calibration=None
) -> None:
    """``routers``: every layer's router (or its state dict), in layer order. ``full_at_1``:
    budget 1.0 means the full model, not routed (routers trained with the model, where
    budget-1.0 micro-batches run at full size). ``calibration``: budget prices folded into the
    routers (routers/token_calibration.py), recorded in token_router.json."""
    with atomic_output_dir(os.path.join(ckpt_dir, TOKEN_ROUTER_DIR), replace=True) as tmp:
        states = [
            {k: v.cpu() for k, v in (r if isinstance(r, dict) else r.state_dict()).items()}
            for r in routers
        ]
        torch.save(states, os.path.join(tmp, "token_routers.pt"))
        meta = {"widths": list(widths), "budgets": list(budgets), "layers": len(routers)}
        meta["full_at_1"] = full_at_1
        if calibration:
            meta["calibration"] = calibration
        write_json(os.path.join(tmp, "token_router.json"), meta)


def load_token_routers(ckpt_dir: str, hidden_size: int) -> Optional[dict]:
    """{"routers", "widths", "budgets"} or None when the checkpoint has no token routers."""
    folder = os.path.join(ckpt_dir, TOKEN_ROUTER_DIR)
    if not os.path.isdir(folder):
        return None
    meta = read_json(os.path.join(folder, "token_router.json"))
    try:
        states = torch.load(
            os.path.join(folder, "token_routers.pt"), map_location="cpu", weights_only=True
        )
    except Exception as e:
        raise CheckpointError(f"cannot read the token routers in {folder}: {e}") from None
    routers = []
    for state in states:
        router = TokenRouter(hidden_size, len(meta["widths"]), len(meta["budgets"]))
        router.load_state_dict(state)
        routers.append(router.eval())
    return {
        "routers": routers,
        "widths": meta["widths"],
        "budgets": meta["budgets"],
        "full_at_1": meta.get("full_at_1", False),
        "calibration": meta.get("calibration"),
    }


class TrainedTokenRouting(ServingPolicy):
    """A checkpoint's token routers attached to a model in dispatch mode, conditioned per budget;
    counts the mean MLP width they use. As a budget policy: every budget runs the full model with
    each token's MLP width routed (with ``full_at_1``, budget 1.0 the plain full model)."""

    kind = "token routers"
    budget_required = True

    def __init__(self, routings, budgets, model=None, full_at_1: bool = False, calibration=None):
        super().__init__(None, None)
        self.routings, self.budgets = routings, budgets
        self.model, self.full_at_1, self.full = model, full_at_1, False
        self.calibration = calibration  # budget prices already folded into the routers

    @classmethod
    def attach(cls, ckpt_dir: str, model, hidden_size: int) -> "TrainedTokenRouting":
        found = load_token_routers(ckpt_dir, hidden_size)
        if found is None:
            raise CheckpointError(
                f"{ckpt_dir} has no token routers (token_router/): run tools/train_token_router.py"
            )
        layers = num_blocks(model)
        if len(found["routers"]) != layers:
            raise CheckpointError(
                f"{ckpt_dir}/{TOKEN_ROUTER_DIR} holds {len(found['routers'])} layers' routers, "
                f"the model has {layers} layers"
            )
        routings = enable_token_routing(model, found["widths"], found["routers"], mode="dispatch")
        return cls(routings, found["budgets"], model, found["full_at_1"], found["calibration"])

    def condition(self, budget: float) -> None:
        """Route for ``budget`` from now on; resets the width count."""
        code = encode_budget(self.budgets, budget)
        self.full = self.full_at_1 and budget >= 1.0
        layers = transformer_blocks(self.model) if self.model is not None else []
        for layer, r in zip(layers, self.routings):
            layer.mlp.set_token_routing(None if self.full else r)
        for r in self.routings:
            r.budget, r.budget_code, r.totals = budget, code, [0.0, 0]

    def routes(self, budget: float) -> bool:
        return not (self.full_at_1 and budget >= 1.0)

    def check_budget(self, budget) -> float:
        """A budget in (0, 1] inside the routers' trained range (they are conditioned on it)."""
        budget = super().check_budget(budget)
        encode_budget(self.budgets, budget)
        return budget

    def choose(self, budget: float) -> Choice:
        info = {"chosen_by": self.kind}
        if self.routes(budget):
            return Choice(budget, None, info)
        config = unwrap_model(self.model).config
        n = num_blocks(self.model)
        full = Subnetwork(
            (config.ffn_hidden_size,) * n, (config.num_attention_heads,) * n, tuple(range(n))
        )
        return Choice(budget, full, info)

    def apply(self, model, budget: float) -> Choice:
        reset_elastic_state(model)
        self.condition(budget)
        return self.choose(budget)

    def measured(self) -> dict:
        """The mean MLP width fraction of the tokens routed since ``apply``/``condition``."""
        return {"mean_mlp_width_fraction": self.mean_width()}

    def mean_width(self) -> float:
        """Over every layer: this stage's, and under pipeline parallelism the other stages'."""
        if self.full:
            return 1.0
        totals = torch.tensor(
            [sum(r.totals[0] for r in self.routings), sum(r.totals[1] for r in self.routings)],
            dtype=torch.float64,
            device=current_device(),
        )
        if parallel_state.model_parallel_is_initialized():
            group = parallel_state.get_pipeline_model_parallel_group()
            if torch.distributed.get_world_size(group) > 1:
                torch.distributed.all_reduce(totals, group=group)
        width_sum, tokens = totals.tolist()
        return width_sum / tokens if tokens else math.nan
