"""Budget prices for token routers: make the argmax dispatch meet each budget.

Token routers are trained on Gumbel-softmax samples with a budget loss that has a dead zone; at
inference every token takes the argmax width, and the mean of those can land off the budget (the
0.75 budget of a short SmolLM2 run dispatched a mean width of 0.85). A price p per trained budget
subtracts p x (width fraction) from every layer's logits for that budget, folded into the
budget's learned bias row. For fixed inputs a higher price never widens a layer's choice (the
argmax of logit_c - p f_c moves to smaller f as p grows); later layers see changed hidden states,
so across the model the width is monotone in p in practice rather than by construction. A
bisection on calibration text finds a price, as small as it can tell, whose dispatched mean width
meets the budget. Budgets between the trained ones blend the calibrated rows as before.
"""

from __future__ import annotations

from typing import Callable, Dict, List

import torch

from megatron_flextron.checkpoint.load import load_elastic_model
from megatron_flextron.data.corpus import checkpoint_sequences
from megatron_flextron.elastic.subnetwork import unwrap_model
from megatron_flextron.lm_step import forward_backward, pad_microbatches
from megatron_flextron.routers.token_training import (
    TrainedTokenRouting,
    load_token_routers,
    save_token_routers,
)

MAX_PRICE = 1e4  # logits move by at most this much per unit width fraction


def dispatched_width(serving: TrainedTokenRouting, model, batches: List[dict], budget) -> float:
    """Mean MLP width fraction that token dispatch uses on ``batches`` for ``budget``."""
    serving.condition(budget)
    with torch.no_grad():
        forward_backward(model, batches, forward_only=True)
    return serving.mean_width()


def _width_penalty(widths, like: torch.Tensor) -> torch.Tensor:
    """Each choice's width fraction (choices largest first, as the routers' logits are)."""
    widths = sorted(widths, reverse=True)
    return (torch.tensor(widths, dtype=torch.float64) / widths[0]).to(like)


def _price_setter(serving: TrainedTokenRouting, row: int) -> Callable[[float], None]:
    """set(p): budget ``row``'s bias = its trained value - p x width fraction, in every layer."""
    originals = [r.router.budget_bias.detach()[row].clone() for r in serving.routings]

    def set_price(price: float) -> None:
        with torch.no_grad():
            for r, original in zip(serving.routings, originals):
                r.router.budget_bias[row] = original - price * _width_penalty(r.widths, original)

    return set_price


def apply_budget_prices(routers, widths, budgets, prices: Dict[str, float]) -> None:
    """Fold found prices ({budget: price}) into every router's budget rows, e.g. into all layers'
    routers read from the checkpoint when each pipeline stage calibrated only its own."""
    with torch.no_grad():
        for row, budget in enumerate(budgets):
            price = prices.get(f"{budget:g}", 0.0)
            for router in routers:
                router.budget_bias[row] -= price * _width_penalty(widths, router.budget_bias)


def _bracket(width_at, budget: float, tolerance: float, narrowest: float, widest: float):
    """(too_wide, meets): prices whose widths lie above ``budget`` and at/below it (``too_wide``
    None: ``meets`` already lies within the tolerance, or is as wide as it gets). Stops where the
    widths saturate (every token at its narrowest or widest choice): (price, None) when even the
    narrowest choices are too wide."""
    if width_at(0.0) > budget:  # too wide: raise the price
        too_wide, price = 0.0, 1.0
        while width_at(price) > budget:
            if width_at(price) <= narrowest + 1e-9 or price > MAX_PRICE:
                return price, None  # infeasible: the narrowest choices everywhere
            too_wide, price = price, price * 2
        return too_wide, price
    meets, price = 0.0, -1.0  # too narrow: lower the price until just too wide
    while width_at(price) <= budget:
        if width_at(price) >= budget * (1 - tolerance):
            return None, price
        if width_at(price) >= widest - 1e-9 or -price > MAX_PRICE:
            return None, price  # the widest choices everywhere: as wide as it gets
        meets, price = price, price * 2
    return price, meets


def _calibrate_budget(
    model, serving, batches, row: int, budget: float, tolerance, max_steps, fractions
):
    set_price = _price_setter(serving, row)
    widths = {}

    def width_at(price: float) -> float:
        if price not in widths:
            set_price(price)
            widths[price] = dispatched_width(serving, model, batches, budget)
        return widths[price]

    uncalibrated = width_at(0.0)
    price = 0.0
    if not budget * (1 - tolerance) <= uncalibrated <= budget:
        too_wide, meets = _bracket(width_at, budget, tolerance, min(fractions), max(fractions))
        if meets is None:  # the narrowest widths everywhere: as close as it gets
            price = too_wide
        else:
            for _ in range(max_steps if too_wide is not None else 0):
                if width_at(meets) >= budget * (1 - tolerance):
                    break
                middle = (too_wide + meets) / 2
                if width_at(middle) > budget:
                    too_wide = middle
                else:
                    meets = middle
            price = meets
    set_price(price)
    return {
        "price": price,
        "mean_width": width_at(price),
        "uncalibrated_width": uncalibrated,
        "feasible": width_at(price) <= budget * (1 + tolerance),
    }


def calibrate_budget_prices(
    model,
    serving: TrainedTokenRouting,
    batches: List[dict],
    tolerance: float = 0.01,
    max_steps: int = 16,
) -> Dict[str, dict]:
    """Give every trained budget (but the full model's) a price whose dispatched mean width is at
    most the budget, bisecting until it lies within ``tolerance`` (relative) below it.
    Changes the routers in place; returns {budget: {"price", "mean_width", "uncalibrated_width",
    "feasible"}} ("feasible" is False where even the narrowest widths exceed the budget)."""
    full = unwrap_model(model).config.ffn_hidden_size
    fractions = [w / full for w in serving.routings[0].widths]
    return {
        f"{budget:g}": _calibrate_budget(
            model, serving, batches, row, budget, tolerance, max_steps, fractions
        )
        for row, budget in enumerate(serving.budgets)
        if not (serving.full_at_1 and budget >= 1.0)
    }


def calibrate_checkpoint(
    load: str,
    data: str = "wiki:valid",
    samples: int = 32,
    seq_length: int = 128,
    micro_batch_size: int = 4,
    tolerance: float = 0.01,
    tp: int = 1,
    pp: int = 1,
) -> Dict[str, dict]:
    """Calibrate the token routers stored in ``load`` (tools/calibrate_token_router.py).
    Collective (every rank of the model-parallel layout); rank 0 rewrites ``load/token_router/``
    with the prices folded into every layer's routers (added to earlier calibrations')."""
    seqs = checkpoint_sequences(load, data, seq_length, samples)
    loaded = load_elastic_model(load, tp, pp)
    model, hidden = loaded.model, loaded.model_cfg.hidden_size
    serving = TrainedTokenRouting.attach(load, model, hidden)
    batches = pad_microbatches(seqs, micro_batch_size, next(model.parameters()).device)
    found = calibrate_budget_prices(model, serving, batches, tolerance)
    if torch.distributed.get_rank() == 0:  # every rank found the same prices
        saved = load_token_routers(load, hidden)  # every layer's routers
        prices = {budget: result["price"] for budget, result in found.items()}
        apply_budget_prices(saved["routers"], saved["widths"], saved["budgets"], prices)
        before = saved["calibration"] or {}
        for budget, result in found.items():  # the saved routers carry earlier prices too
            earlier = before.get(budget, {})
            result["price"] += earlier.get("price", 0.0)
            result["uncalibrated_width"] = earlier.get(
                "uncalibrated_width", result["uncalibrated_width"]
            )
            result["calibration_tokens"] = len(seqs) * seq_length
        save_token_routers(
            load,
            saved["routers"],
            saved["widths"],
            saved["budgets"],
            saved["full_at_1"],
            calibration=found,
        )
    torch.distributed.barrier()
    return found
