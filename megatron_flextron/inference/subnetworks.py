"""Which sub-network serves a request, and switching the one model copy to it.

A request names a sub-network (a spec), a budget (the checkpoint's static router, or the
elastic choices nearest to the budget without one) or nothing (the full model); with token
routers (``router="dynamic"``) a budget conditions the routers instead. Everything that reads
routers from the checkpoint is in this module, so that a budget-policy API replaces it in one place.

The KV cache of megatron's static inference context is allocated once per layer with the model's
KV heads. GQA head trimming keeps every KV group (elastic/attention.py), so one cache layout
serves every sub-network; MHA trimming drops KV heads with the query heads, so it is refused here
(export the sub-network and serve the dense model instead).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from megatron_flextron.config import ElasticConfig, ModelConfig
from megatron_flextron.elastic.subnetwork import Subnetwork, set_subnetwork
from megatron_flextron.routers.checkpoint import budget_architecture
from megatron_flextron.routers.sampling import budget_subnetwork
from megatron_flextron.routers.static import encode_budget
from megatron_flextron.routers.token import disable_token_routing
from megatron_flextron.routers.token_training import TrainedTokenRouting

ROUTERS = ("static", "dynamic")


@dataclass(frozen=True)
class Architecture:
    """What one request runs. ``key`` is equal for requests that can share a batch."""

    key: tuple
    subnetwork: Subnetwork  # token-routed: the full shape the routers pick widths inside
    budget: Optional[float] = None
    routed: bool = False
    info: dict = field(default_factory=dict, compare=False, hash=False)

    def describe(self) -> dict:
        """JSON form for responses: the sub-network (or the routing) and how it was chosen."""
        out = {}
        if self.budget is not None:
            out["budget"] = self.budget
        if self.routed:
            out["router"] = "dynamic"
        else:
            out["subnetwork"] = self.subnetwork.to_dict()
        out.update(self.info)
        return out


class SubnetworkSelector:
    """Resolves requests to architectures (cached per budget) and activates them in the model.
    ``ckpt_dir`` holds the routers; None (a model built in memory): budgets take the nearest
    elastic choices."""

    def __init__(
        self,
        ckpt_dir: Optional[str],
        model_config: ModelConfig,
        elastic: ElasticConfig,
        tp_size: int = 1,
        router: str = "static",
    ):
        if router not in ROUTERS:
            raise ValueError(f"unknown router {router!r}; expected one of {ROUTERS}")
        self.ckpt_dir, self.model_config, self.elastic = ckpt_dir, model_config, elastic
        self.tp_size, self.router = tp_size, router
        self.token_routing: Optional[TrainedTokenRouting] = None
        self._budgets = {}

    def attach(self, model) -> None:
        """Load the checkpoint's token routers onto ``model`` (router="dynamic" only)."""
        if self.router == "dynamic":
            self.token_routing = TrainedTokenRouting.attach(
                self.ckpt_dir, model, self.model_config.hidden_size
            )
            disable_token_routing(model)

    def resolve(self, subnetwork=None, budget=None) -> Architecture:
        """The architecture of a request; ValueError names what is wrong with it."""
        if subnetwork is not None and budget is not None:
            raise ValueError("give either a budget or a subnetwork, not both")
        if budget is not None:
            return self._budget(_check_budget(budget))
        if self.router == "dynamic" and subnetwork is None:
            raise ValueError("with token routing (--router dynamic), give a budget")
        subnet = Subnetwork.parse(subnetwork, self.model_config)
        return self._static(subnet, None, {})

    def _budget(self, budget: float) -> Architecture:
        if budget not in self._budgets:
            if self.router == "dynamic":
                encode_budget(self.token_routing.budgets, budget)  # in the trained range
                arch = Architecture(
                    ("routed", budget),
                    Subnetwork.full(self.model_config),
                    budget,
                    routed=True,
                    info={"chosen_by": "token routers"},
                )
            elif self.ckpt_dir is None:
                subnet = budget_subnetwork(budget, self.model_config, self.elastic)
                arch = self._static(subnet, budget, {"chosen_by": "nearest choices"})
            else:
                subnet, info = budget_architecture(
                    self.ckpt_dir, self.model_config, self.elastic, budget, router_only=False
                )
                arch = self._static(subnet, budget, info)
            self._budgets[budget] = arch
        return self._budgets[budget]

    def _static(self, subnet: Subnetwork, budget, info: dict) -> Architecture:
        subnet.validate(self.model_config, self.elastic, self.tp_size)
        m = self.model_config
        if not m.is_gqa and any(h != m.num_attention_heads for h in subnet.heads):
            raise ValueError(
                "MHA head trimming changes the number of KV heads, and the KV cache is laid out "
                "for all of them: serve every head of this model (or export the sub-network "
                "with tools/convert_checkpoint.py --subnetwork and serve the dense model)"
            )
        key = ("static", subnet.mlp, subnet.heads, subnet.layers)
        return Architecture(key, subnet, budget, info=info)

    def activate(self, model, arch: Architecture) -> None:
        """Switch the shared weights to ``arch`` (views only: no copy of the weights)."""
        set_subnetwork(model, arch.subnetwork, self.model_config, self.elastic)
        if arch.routed:
            self.token_routing.condition(arch.budget)
        elif self.token_routing is not None:
            disable_token_routing(model)


def _check_budget(budget) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"budget must be a number in (0, 1], got {budget!r}")
    budget = float(budget)
    if math.isnan(budget) or not 0 < budget <= 1:
        raise ValueError(f"budget {budget} must lie in (0, 1]")
    return budget


def load_served_model(ckpt_dir: str, dtype, router: str = "static"):
    """This rank's elastic model loaded from a flextron checkpoint (current TP/PP), and the
    selector for its sub-networks. Returns (model, selector)."""
    from megatron.core import parallel_state

    from megatron_flextron.checkpoint.flextron import load_flextron_into_model, read_config
    from megatron_flextron.elastic import build_gpt_model
    from megatron_flextron.parallel import current_device

    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    config = read_config(ckpt_dir)
    m = ModelConfig.from_dict(config["model"])
    elastic = (
        ElasticConfig.from_dict(config["elastic"])
        if config.get("elastic")
        else ElasticConfig.from_ratios(m, tensor_model_parallel_size=tp)
    )
    model = build_gpt_model(m, m.transformer_config(tp, pp, dtype)).to(current_device())
    load_flextron_into_model(model, ckpt_dir)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    selector = SubnetworkSelector(ckpt_dir, m, elastic, tp, router)
    selector.attach(model)
    return model, selector
