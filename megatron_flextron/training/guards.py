"""Stop training before anything non-finite is trained on or saved.

A NaN loss or gradient norm poisons every later step and every checkpoint written after it, and
nothing downstream fails loudly (the evaluation then reports ``"loss": NaN``). The trainer calls
``check_step`` after each optimizer step and ``check_parameters`` before each save.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

LOSS_KEYS = ("lm loss", "kd loss", "router aux loss")


class NonFiniteError(ValueError):
    """Training produced a non-finite loss, gradient norm or weight."""


def check_step(stats: dict, grad_norm: Optional[float], iteration: int, skipped: bool) -> None:
    """Raise naming the iteration and the first non-finite quantity of this step's (already
    reduced, so identical on every rank) stats. ``skipped``: the optimizer skipped the step
    (fp16 loss scaling found an inf gradient, which is expected there and not an error)."""
    for budget, row in stats.get("budgets", {}).items():
        for key in LOSS_KEYS:
            value = row.get(key)
            if value is not None and not math.isfinite(value):
                raise NonFiniteError(
                    f"iteration {iteration}: {key} of budget {budget} is {value}; training "
                    "stopped without saving (lower --lr or check the data and --load)"
                )
    if grad_norm is not None and not skipped and not math.isfinite(float(grad_norm)):
        raise NonFiniteError(
            f"iteration {iteration}: gradient norm is {float(grad_norm)}; training stopped "
            "without saving (lower --lr or set --clip-grad)"
        )


def count_non_finite(model: torch.nn.Module) -> int:
    """Non-finite entries in this rank's parameters."""
    return sum(int((~torch.isfinite(p.detach())).sum()) for p in model.parameters())


def check_parameters(model: torch.nn.Module, iteration: int) -> None:
    """Collective (every rank calls it): refuse to save when any rank holds a non-finite
    weight, so that all ranks stop together instead of some waiting in the save."""
    bad = torch.tensor(
        [float(count_non_finite(model))], device=next(model.parameters()).device
    )
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(bad)
    if bad.item():
        raise NonFiniteError(
            f"iteration {iteration}: {int(bad.item())} weights are not finite; the checkpoint "
            "was not saved"
        )
