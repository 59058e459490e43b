"""Which sub-network serves a request, and switching the one model copy to it.

A request names a sub-network (a spec), a budget or nothing (the full model). A budget goes to
the checkpoint's budget policy (routers/policy.py: its static router, the elastic choices
nearest to the budget, or its token routers), the one interface for every kind: serving never
asks which kind it holds. A choice without a sub-network is the full model with each token's MLP
width routed; it runs inside ``policy.active``, a named sub-network inside ``elastic_state``.

The KV cache of megatron's static inference context is allocated once per layer with the model's
KV heads. GQA head trimming keeps every KV group (elastic/attention.py), so one cache layout
serves every sub-network; MHA trimming drops KV heads with the query heads, so it is refused here
(export the sub-network and serve the dense model instead).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ContextManager, Optional

from megatron_flextron.checkpoint.load import check_finite_weights, load_elastic_model
from megatron_flextron.config import ElasticConfig, ModelConfig
from megatron_flextron.elastic.linear import serving_layout
from megatron_flextron.elastic.state import elastic_state
from megatron_flextron.elastic.subnetwork import Subnetwork
from megatron_flextron.routers.checkpoint import load_budget_policy
from megatron_flextron.routers.policy import NearestChoices, ServingPolicy


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
            out["router"] = "token"
        else:
            out["subnetwork"] = self.subnetwork.to_dict()
        out.update(self.info)
        return out


class SubnetworkSelector:
    """Resolves requests to architectures (cached per budget) and sets the model to them.
    ``policy``: what a budget runs (None, e.g. a model built in memory: the nearest elastic
    choices)."""

    def __init__(
        self,
        policy: Optional[ServingPolicy],
        model_config: ModelConfig,
        elastic: ElasticConfig,
        tp_size: int = 1,
    ):
        self.policy = policy if policy is not None else NearestChoices(model_config, elastic)
        self.model_config, self.elastic, self.tp_size = model_config, elastic, tp_size
        self._budgets = {}

    def resolve(self, subnetwork=None, budget=None) -> Architecture:
        """The architecture of a request; ValueError names what is wrong with it."""
        if subnetwork is not None and budget is not None:
            raise ValueError("give either a budget or a subnetwork, not both")
        if budget is not None:
            return self._budget(self.policy.check_budget(budget))
        if subnetwork is None and self.policy.budget_required:
            kind = self.policy.kind
            raise ValueError(f"the model serves budgets through its {kind}: give a budget")
        subnet = Subnetwork.parse(subnetwork, self.model_config, self.elastic)
        return self._static(subnet, None, {})

    def _budget(self, budget: float) -> Architecture:
        if budget not in self._budgets:
            choice = self.policy.choose(budget)
            info = dict(choice.info)
            if choice.per_token:
                full = Subnetwork.full(self.model_config)
                arch = Architecture(("routed", budget), full, budget, routed=True, info=info)
            else:
                arch = self._static(choice.subnetwork, budget, info)
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
        # the whole sub-network (every axis, MoE ones included) decides what a step runs
        return Architecture(("static", subnet), subnet, budget, info=info)

    def active(self, model, arch: Architecture) -> ContextManager:
        """``model`` runs ``arch`` inside the block (views only: no copy of the weights) and is
        the full model afterwards: token-routed through the policy, a sub-network directly (a
        budget's sub-network shares its batch with requests naming the same one)."""
        if arch.routed:
            return self.policy.active(model, arch.budget)
        return elastic_state(model, self.model_config, self.elastic, subnetwork=arch.subnetwork)


def check_moe_layers(model) -> None:
    """Every MoE layer must be elastic and run megatron's ordinary route -> dispatch -> experts
    path while the engine's ``InferenceMode`` is on: megatron swaps in its own dispatcher and
    fused experts then only for ``transformer_impl="inference_optimized"``, whose router and
    experts would ignore the sub-network (fewer experts, narrower experts, smaller top-k)."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_flextron.elastic.moe import ElasticMoELayer

    for name, module in model.named_modules():
        if isinstance(module, MoELayer) and (
            not isinstance(module, ElasticMoELayer)
            or hasattr(module, "_inference_token_dispatcher")
        ):
            raise ValueError(
                f"{name}: {type(module).__name__} with transformer_impl="
                f"{module.config.transformer_impl!r} cannot serve MoE sub-networks: serve the "
                "elastic MoE layer (build_elastic_model), not megatron's inference-optimized one"
            )


def load_served_model(ckpt_dir: str, dtype, router: Optional[str] = None):
    """This rank's elastic model loaded from a flextron checkpoint (current TP/PP), and the
    selector for its sub-networks (``router``: see ``load_budget_policy``). Returns
    (model, selector)."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    loaded = load_elastic_model(ckpt_dir, tp, pp, dtype)
    check_finite_weights(loaded)
    model = loaded.model
    for p in model.parameters():
        p.requires_grad_(False)
    serving_layout(model)
    policy = load_budget_policy(ckpt_dir, loaded.model_cfg, loaded.elastic, router, gpt=model)
    policy.reset(model)  # the full model until a group's architecture is set
    return model, SubnetworkSelector(policy, loaded.model_cfg, loaded.elastic, tp)
