"""A trained static router stored inside a flextron checkpoint: ``DIR/router/``.

``router/static_router.pt`` (the state dict, read with weights_only) and ``router/router.json``
(its shape, the cost metric and, for latency, the table it was trained against). Written to a
temporary folder and renamed, so a checkpoint has either a whole router or none.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from megatron_flextron.config import ElasticConfig, ModelConfig
from megatron_flextron.checkpoint.state import CheckpointError
from megatron_flextron.checkpoint.io import atomic_output_dir, read_json, write_json
from megatron_flextron.routers.cost import CostModel, LatencyTable
from megatron_flextron.routers.static import StaticRouter

ROUTER_DIR = "router"


def save_router(ckpt_dir: str, router: StaticRouter, cost: dict) -> None:
    """``cost``: {"metric", "seq_length", "tolerance", "latency_table" (dict or None), ...}."""
    with atomic_output_dir(os.path.join(ckpt_dir, ROUTER_DIR), replace=True) as tmp:
        torch.save(router.state_dict(), os.path.join(tmp, "static_router.pt"))
        write_json(os.path.join(tmp, "router.json"), {"router": router.config(), "cost": cost})


def load_router(
    ckpt_dir: str, model: ModelConfig, elastic: ElasticConfig
) -> Optional[Tuple[StaticRouter, CostModel, dict]]:
    """(router, its cost model, its cost settings), or None when the checkpoint has no router."""
    folder = os.path.join(ckpt_dir, ROUTER_DIR)
    if not os.path.isdir(folder):
        return None
    meta = read_json(os.path.join(folder, "router.json"))
    cfg = meta["router"]
    router = StaticRouter(
        cfg["budgets"],
        cfg["num_layers"],
        cfg["mlp_choices"],
        cfg["head_choices"],
        cfg["hidden_size"],
        cfg.get("layer_skipping", False),
    )
    try:
        state = torch.load(os.path.join(folder, "static_router.pt"), weights_only=True)
        router.load_state_dict(state)
    except Exception as e:
        raise CheckpointError(f"cannot read the router in {folder}: {e}") from None
    c = meta["cost"]
    table = c.get("latency_table")
    cost = CostModel(
        model,
        elastic,
        c["metric"],
        seq_length=c.get("seq_length", 2048),
        latency=LatencyTable(**_table_fields(table)) if table else None,
    )
    return router.eval(), cost, c


def _table_fields(table: dict) -> dict:
    fields = dict(table)
    fields["mlp_ms"] = {int(k): v for k, v in table["mlp_ms"].items()}
    fields["attention_ms"] = {int(k): v for k, v in table["attention_ms"].items()}
    return fields


def budget_architecture(
    ckpt_dir: str, model: ModelConfig, elastic: ElasticConfig, budget: float, router_only: bool
):
    """(sub-network, how it was chosen) for a budget: the checkpoint's trained static router
    (with the exact and the router's predicted cost ratio), or, without a router and unless
    ``router_only``, the elastic choices nearest to the budget (training's rule)."""
    from megatron_flextron.routers.sampling import budget_subnetwork

    found = load_router(ckpt_dir, model, elastic)
    if found is None:
        if router_only:
            raise CheckpointError(
                f"{ckpt_dir} has no trained static router (router/): run tools/train_router.py"
            )
        return budget_subnetwork(budget, model, elastic), {"chosen_by": "nearest choices"}
    router, cost, settings = found
    subnet = router.choose(budget)
    exact = cost.of_subnetwork(subnet.mlp, subnet.heads, subnet.layers)
    return subnet, {
        "chosen_by": "static router",
        "metric": settings["metric"],
        "cost_ratio": round(exact / cost.full(), 4),
        "predicted_cost_ratio": round(float(cost.ratio(*router.expected(budget).double())), 4),
    }
