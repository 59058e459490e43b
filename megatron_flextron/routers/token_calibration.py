"""Budget prices for token routers: make the argmax dispatch meet each budget.

Token routers are trained on Gumbel-softmax samples with a budget loss that has a dead zone; at
inference every token takes the argmax width, and the mean of those can land off the budget (the
0.75 budget of a short SmolLM2 run dispatched a mean width of 0.85). A price p per trained budget
subtracts p x (width fraction) from every layer's logits for that budget, folded into the
budget's learned bias row. A higher price never widens any token's choice (the argmax of
logit_c - p f_c moves to smaller f as p grows), so the dispatched mean width falls monotonically
in p and a bisection finds the smallest price that meets the budget on calibration text.
Budgets between the trained ones blend the calibrated rows as before.
"""

from __future__ import annotations

from typing import Callable, Dict, List

import torch

from megatron_flextron.routers.token_training import TrainedTokenRouting
from megatron_flextron.training.lm_step import forward_backward

MAX_PRICE = 1e4  # logits move by at most this much per unit width fraction


def dispatched_width(serving: TrainedTokenRouting, model, batches: List[dict], budget) -> float:
    """Mean MLP width fraction that token dispatch uses on ``batches`` for ``budget``."""
    serving.condition(budget)
    with torch.no_grad():
        forward_backward(model, batches, forward_only=True)
    return serving.mean_width()


def _price_setter(serving: TrainedTokenRouting, row: int) -> Callable[[float], None]:
    """set(p): budget ``row``'s bias = its trained value - p x width fraction, in every layer."""
    originals = [r.router.budget_bias.detach()[row].clone() for r in serving.routings]

    def set_price(price: float) -> None:
        with torch.no_grad():
            for r, original in zip(serving.routings, originals):
                fractions = torch.tensor(r.widths, dtype=original.dtype) / max(r.widths)
                r.router.budget_bias[row] = original - price * fractions.to(original.device)

    return set_price


def _bracket(width_at, budget: float):
    """(too_wide, meets): two prices whose widths lie above and at/below ``budget``; ``None``
    for a side that no price reaches (every token already at its narrowest or widest)."""
    if width_at(0.0) > budget:
        meets, too_wide = 1.0, 0.0
        while width_at(meets) > budget:
            too_wide, meets = meets, meets * 2
            if meets > MAX_PRICE:
                return too_wide, None
        return too_wide, meets
    too_wide, meets = -1.0, 0.0
    while width_at(too_wide) <= budget:
        meets, too_wide = too_wide, too_wide * 2
        if -too_wide > MAX_PRICE:
            return None, meets
    return too_wide, meets


def _calibrate_budget(model, serving, batches, row: int, budget: float, tolerance, max_steps):
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
        too_wide, meets = _bracket(width_at, budget)
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
    """Give every trained budget (but the full model's) the smallest price whose dispatched mean
    width is at most the budget, stopping once it lies within ``tolerance`` (relative) below it.
    Changes the routers in place; returns {budget: {"price", "mean_width", "uncalibrated_width",
    "feasible"}} ("feasible" is False where even the narrowest widths exceed the budget)."""
    return {
        f"{budget:g}": _calibrate_budget(model, serving, batches, row, budget, tolerance, max_steps)
        for row, budget in enumerate(serving.budgets)
        if not (serving.full_at_1 and budget >= 1.0)
    }
