"""Routers stored inside a flextron checkpoint, and the budget policy they give.

A static router lives in ``DIR/router/``: ``static_router.pt`` (the state dict, read with
weights_only) and ``router.json`` (its shape, the cost metric and, for latency, the table it was
trained against); written to a temporary folder and renamed, so a checkpoint has either a whole
router or none. Token routers live in ``DIR/token_router/`` (routers/token_training.py).
``load_budget_policy`` is what the tools and serving call: it returns the checkpoint's
``ServingPolicy`` (routers/policy.py).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence, Tuple

import torch

from megatron_flextron.checkpoint.io import atomic_output_dir, read_json, write_json
from megatron_flextron.checkpoint.state import CheckpointError
from megatron_flextron.config import ElasticConfig, ModelConfig
from megatron_flextron.routers.cost import CostModel, LatencyTable
from megatron_flextron.routers.policy import NearestChoices, ServingPolicy, StaticRouterPolicy
from megatron_flextron.routers.static import StaticRouter
from megatron_flextron.routers.token_training import TrainedTokenRouting

ROUTER_DIR = "router"
# one router vocabulary for training (--router of tools/pretrain_flextron.py) and the tools
# (--router of evaluate.py, generate.py, the server); the tools' earlier words still work:
# static = the default (the stored router, else the nearest choices), dynamic = token
ROUTER_KINDS = ("none", "joint", "token")
DEPRECATED_ROUTERS = {"static": None, "dynamic": "token"}


def router_kind(name: Optional[str]) -> Optional[str]:
    """A router name -> ``none | joint | token`` or None (the checkpoint's default)."""
    if name is None or name in ROUTER_KINDS:
        return name
    if name in DEPRECATED_ROUTERS:
        return DEPRECATED_ROUTERS[name]
    raise ValueError(f"unknown router {name!r}; expected one of {', '.join(ROUTER_KINDS)}")


def check_router_request(
    router: Optional[str], budgets: Sequence[float], compare_static: bool = False
) -> Optional[str]:
    """The router kind of an evaluation, refused where it cannot serve the request: token
    routers route a budget (one must be given); ``compare_static`` compares token routing with
    the static sub-networks at the same mean width. Here, not in the evaluator: only this
    module knows what each kind needs."""
    router = router_kind(router)
    if router == "token" and not budgets:
        raise ValueError("--router token needs --budget or --budget-list")
    if compare_static and router != "token":
        raise ValueError(
            "--compare-static compares token routing with static sub-networks: add --router token"
        )
    return router


def router_flag(text: str) -> Optional[str]:
    """argparse type of the tools' ``--router``: the kind, saying so when a deprecated word
    (static, dynamic) was used."""
    import argparse
    import sys

    try:
        kind = router_kind(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if text in DEPRECATED_ROUTERS:
        instead = f"--router {kind}" if kind else "no --router"
        print(f"note: --router {text} is deprecated; it means {instead}", file=sys.stderr)
    return kind


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
        cfg.get("moe_choices"),
    )
    try:
        state = torch.load(os.path.join(folder, "static_router.pt"), weights_only=True)
        router.load_state_dict(state)
    except Exception as e:
        raise CheckpointError(f"cannot read the router in {folder}: {e}") from None
    c = meta["cost"]
    if c.get("budget_type"):  # a mixture of experts' router counts these parameters
        elastic = dataclasses.replace(elastic, budget_type=c["budget_type"])
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


def load_budget_policy(
    ckpt_dir: str,
    model: ModelConfig,
    elastic: ElasticConfig,
    router: Optional[str] = None,
    require_router: bool = False,
    gpt=None,
) -> ServingPolicy:
    """The budget policy a checkpoint serves. ``router=None`` (the default): its trained budget
    router (``router/``: tools/train_router.py or ``--router joint`` training), or, without one
    and unless ``require_router``, the elastic choices nearest to each budget (training's rule).
    ``"none"``: the nearest choices; ``"joint"``: the trained budget router, required;
    ``"token"``: its token routers, attached to ``gpt`` (the built elastic model, which every
    budget then runs at full size with per-token MLP widths)."""
    router = router_kind(router)
    if router == "token":
        if gpt is None:
            raise ValueError("token routing needs the model to attach the routers to")
        return TrainedTokenRouting.attach(ckpt_dir, gpt, model.hidden_size)
    if router == "none":
        return NearestChoices(model, elastic)
    found = load_router(ckpt_dir, model, elastic)
    if found is not None:
        return StaticRouterPolicy(model, elastic, *found)
    if require_router or router == "joint":
        raise CheckpointError(
            f"{ckpt_dir} has no trained static router (router/): run tools/train_router.py"
        )
    return NearestChoices(model, elastic)
