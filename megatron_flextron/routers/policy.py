"""The budget policy: what an elastic model runs for a budget, in training and at inference.

A budget b in (0, 1] is a target cost relative to the full model. A ``BudgetPolicy`` is the one
place that turns it into something the model runs; the trainer, the elastic step, the logs,
evaluation, ``convert --budget`` and serving talk to the policy and never ask which kind it is.

Kinds (each a subclass; construct them with ``routers.checkpoint.load_budget_policy`` for a
stored checkpoint, or ``routers.build.training_policy`` for ``--router none|joint|token``):

- ``NearestChoices``           the elastic choices nearest to b x the full widths (no router)
- ``StaticRouterPolicy``       a trained static router: budget -> per-layer architecture
- ``routers.joint.JointRouter``  the static router trained with the model (``--router joint``)
- ``routers.token_training.TrainedTokenRouting``  stored token routers: per-token MLP widths
  (``--router token`` in the tools)
- ``routers.joint_token.JointTokenRouters``  token routers trained with the model
  (``--router token``)

The API is three classes, one per kind of caller; ``BudgetPolicy`` (the kinds' base) is all
three, and each caller is typed with the part it uses: ``ServingPolicy`` (evaluation, export,
serving: which architecture, run it, describe it), ``TrainingHooks`` (the elastic step: one
micro-batch, the optimizer step, evaluation stats) and ``PolicyState`` (training checkpoints and
the stored form). Stored token routers serve only: ``TrainedTokenRouting`` is a ServingPolicy.
By use:

  which architecture   ``choose(b) -> Choice``: ``Choice.subnetwork`` (None: the full model with
                       every token's MLP width routed), ``Choice.info`` ({"chosen_by", ...}).
                       ``routes(b)``: whether b is served by a router (a micro-batch of b is then
                       never the plain full model, whatever its nearest shape).
                       ``check_budget(b)``: b as a float, or ValueError when this policy cannot
                       serve it (outside a token router's trained range), running nothing.
                       ``budget_required``: a request must name a budget (token routers).
  run it               ``with policy.active(model, b) as choice:`` sets the model to the choice
                       and restores the full model on exit; ``measured()`` afterwards: what the
                       pass used (token routing: {"mean_mlp_width_fraction": ...}).
  train a micro-batch  ``before_forward(model, b, subnet, iteration, microbatch, n)`` -> handle;
                       ``after_forward(model, b, handle)``; ``loss_term(handle, b)`` ->
                       (extra loss or None, {stat: value}); ``stage_stats()`` per-stage stats;
                       ``stat_names``: the per-budget stats it logs; ``finish_grads()`` and
                       ``step()`` around the optimizer step; ``eval_stats()`` after evaluation.
  state                ``checkpoint_key``, ``state_dict()`` (collective), ``load_state_dict``,
                       ``start_from(ckpt_dir)`` (a new run), ``export(ckpt_dir, state)`` (rank 0:
                       the stored form the tools and serving read).
  logs                 ``describe(b)`` (one line), ``origin`` (where a trained router started).

Serving a budget per request: ``policy = load_budget_policy(ckpt, model_cfg, elastic, router,
gpt=model)``, ``policy.check_budget(b)`` when the request arrives, then ``with policy.active(model,
b) as choice:`` around the request's forward (inference/subnetworks.py).
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from typing import Dict, Iterator, Optional, Sequence, Tuple

import torch

from megatron_flextron.config import ElasticConfig, ModelConfig
from megatron_flextron.elastic.state import reset_elastic_state, run_subnetwork
from megatron_flextron.elastic.subnetwork import Subnetwork, count_parameters
from megatron_flextron.routers.cost import CostModel, check_budget
from megatron_flextron.routers.sampling import budget_subnetwork
from megatron_flextron.routers.static import StaticRouter


@dataclass(frozen=True)
class Choice:
    """What runs for one budget: a sub-network, or (``subnetwork`` None) the full model with every
    token's MLP width routed. ``info``: how it was chosen ({"chosen_by": ..., costs})."""

    budget: float
    subnetwork: Optional[Subnetwork]
    info: Dict[str, object] = field(default_factory=dict)

    @property
    def per_token(self) -> bool:
        return self.subnetwork is None


class ServingPolicy:
    """What a budget runs, and running it: the part evaluation, export and serving use."""

    kind = "budget policy"  # for logs
    # a request must name a budget: a policy whose every budget routes (token routers) would
    # otherwise serve the unrouted full model without saying so
    budget_required = False

    def __init__(self, model_cfg: ModelConfig, elastic: ElasticConfig):
        self.model_cfg, self.elastic = model_cfg, elastic

    # -- which architecture --------------------------------------------------------------------
    def choose(self, budget: float) -> Choice:
        raise NotImplementedError

    def routes(self, budget: float) -> bool:
        return False

    def check_budget(self, budget) -> float:
        """``budget`` as a float when this policy serves it; otherwise ValueError naming why.
        Runs nothing, so a server can refuse a request before batching it."""
        if isinstance(budget, bool) or not isinstance(budget, (int, float)):
            raise ValueError(f"budget must be a number in (0, 1], got {budget!r}")
        budget = float(budget)
        check_budget(budget)
        return budget

    def nearest(self, budget: float) -> Choice:
        """The elastic choices nearest to the budget (training's sampling rule)."""
        subnet = budget_subnetwork(budget, self.model_cfg, self.elastic)
        return Choice(budget, subnet, {"chosen_by": "nearest choices"})

    # -- run it --------------------------------------------------------------------------------
    def apply(self, model, budget: float) -> Choice:
        """Set ``model`` to run ``choose(budget)``."""
        choice = self.choose(budget)
        run_subnetwork(model, choice.subnetwork, self.model_cfg, self.elastic)
        return choice

    def reset(self, model) -> None:
        """The full model again: no sub-network, soft architecture or token routing."""
        reset_elastic_state(model)

    @contextlib.contextmanager
    def active(self, model, budget: float) -> Iterator[Choice]:
        choice = self.apply(model, budget)
        try:
            yield choice
        finally:
            self.finish_pass(budget)
            self.reset(model)

    def finish_pass(self, budget: float) -> None:
        """Called when a pass under ``active`` ends, before the model is reset."""

    def measured(self) -> dict:
        return {}

    # -- logs ----------------------------------------------------------------------------------
    def describe(self, budget: float) -> str:
        choice = self.choose(budget)
        if choice.per_token:
            return f"{choice.info.get('chosen_by')}"
        params = count_parameters(choice.subnetwork, self.model_cfg)["total"]
        return f"{choice.subnetwork.to_dict()} {params / 1e6:.1f}M parameters"


class TrainingHooks:
    """One training micro-batch, the policy's optimizer step and its evaluation stats: the part
    the elastic step uses. Defaults: a policy with nothing to train."""

    stat_names: Tuple[str, ...] = ()  # per-budget training stats (sums over micro-batches)
    model_cfg: ModelConfig
    elastic: ElasticConfig

    def before_forward(
        self, model, budget: float, subnet: Subnetwork, iteration: int, microbatch: int, count: int
    ):
        """Set the model for one training micro-batch of ``budget`` (``subnet``: the sampler's
        sub-network for it). Returns a handle for ``after_forward`` and ``loss_term``."""
        run_subnetwork(model, subnet, self.model_cfg, self.elastic)
        return None

    def after_forward(self, model, budget: float, handle) -> None:
        """After the micro-batch's forward (backward replays the recorded graph)."""

    def loss_term(self, handle, budget: float) -> Tuple[Optional[torch.Tensor], dict]:
        """(extra loss of the micro-batch or None, {stat name: value})."""
        return None, {}

    def stage_stats(self) -> Dict[float, Dict[str, float]]:
        """{budget: {stat: sum over this step's micro-batches}} from this pipeline stage's
        layers (summed over stages by the caller); resets them."""
        return {}

    def finish_grads(self) -> None:
        """Reduce the policy's gradients (after backward, before the optimizer step)."""

    def step(self) -> None:
        """Optimizer step of the policy's own parameters."""

    def eval_stats(self) -> Dict[str, Dict[str, float]]:
        """{stat name: {budget: value}} of the last evaluation."""
        return {}


class PolicyState:
    """The policy's state in training checkpoints and its stored form: the part the trainer's
    checkpointing uses."""

    kind = "budget policy"
    checkpoint_key: Optional[str] = None  # its state in the training checkpoint's common part
    origin: Optional[str] = None  # where a trained router started (for the log)

    def state_dict(self) -> Optional[dict]:
        return None

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError(f"{self.kind} has no state")

    def start_from(self, ckpt_dir: str) -> None:
        """A new run from ``ckpt_dir``: start from what it stores, where that fits."""

    def export(self, ckpt_dir: str, state: Optional[dict]) -> None:
        """Write the stored form the tools read into ``ckpt_dir`` (rank 0; ``state`` is what
        ``state_dict`` returned on this rank)."""


class BudgetPolicy(ServingPolicy, TrainingHooks, PolicyState):
    """A policy a training run holds: all three parts (see the module docstring)."""

    kind = "budget policy"


class NearestChoices(BudgetPolicy):
    """No router: a budget runs the elastic choices nearest to it (what training samples)."""

    kind = "nearest choices"

    def __init__(self, model_cfg: ModelConfig, elastic: ElasticConfig):
        super().__init__(model_cfg, elastic)
        self._warned = set()  # budgets already said to be below the smallest sub-network

    def choose(self, budget: float) -> Choice:
        """The nearest choices; a budget below the smallest choice on every axis cannot be met,
        so the choice's ``note`` (and stderr, once per budget) says which sub-network runs."""
        choice = self.nearest(budget)
        mlp, heads = self.elastic.choices_with_full(self.model_cfg)
        m = self.model_cfg
        if m.is_moe:
            return self._moe_note(budget, choice)
        if budget * m.ffn_hidden_size >= mlp[-1] or budget * m.num_attention_heads >= heads[-1]:
            return choice
        subnet = choice.subnetwork
        full = count_parameters(Subnetwork.full(m), m)["total"]
        ratio = count_parameters(subnet, m)["total"] / full
        note = (
            f"budget {budget:g} is below the smallest sub-network (MLP {mlp[-1]} of "
            f"{m.ffn_hidden_size}, {heads[-1]} of {m.num_attention_heads} heads): it runs that, "
            f"{subnet.to_dict()}, {ratio:.3f} of the full model's parameters"
        )
        return self._noted(budget, choice, note)

    def _moe_note(self, budget: float, choice: Choice) -> Choice:
        """A mixture of experts' budget maps to the largest sub-network whose active (or total)
        parameters fit; when even the smallest does not fit, the note says what runs."""
        m, kind = self.model_cfg, self.elastic.budget_type
        full = count_parameters(Subnetwork.full(m), m)[kind]
        ratio = count_parameters(choice.subnetwork, m)[kind] / full
        if ratio <= budget + 1e-9:
            return choice
        note = (
            f"budget {budget:g} is below the smallest sub-network: it runs that, "
            f"{choice.subnetwork.to_dict()}, {ratio:.3f} of the full model's {kind} parameters"
        )
        return self._noted(budget, choice, note)

    def _noted(self, budget: float, choice: Choice, note: str) -> Choice:
        if budget not in self._warned:
            self._warned.add(budget)
            print(f"warning: {note}", file=sys.stderr)
        return Choice(budget, choice.subnetwork, {**choice.info, "note": note})


class StaticRouterPolicy(BudgetPolicy):
    """A trained static router (tools/train_router.py, or ``--router joint`` once stored)."""

    kind = "static router"

    def __init__(self, model_cfg, elastic, router: StaticRouter, cost: CostModel, settings: dict):
        super().__init__(model_cfg, elastic)
        self.router, self.cost, self.settings = router, cost, settings

    def choose(self, budget: float) -> Choice:
        subnet = self.router.choose(budget)
        return Choice(budget, subnet, {"chosen_by": "static router", **self.costs(budget, subnet)})

    def routes(self, budget: float) -> bool:
        return True

    def costs(self, budget: float, subnet: Subnetwork) -> dict:
        """The exact and the router's predicted (expected) cost ratio of its choice."""
        exact = self.cost.of(subnet)
        predicted = self.cost.ratio(*self.router.expected(budget).double())
        return {
            "metric": self.settings["metric"],
            "cost_ratio": round(exact / self.cost.full(), 4),
            "predicted_cost_ratio": round(float(predicted), 4),
        }


def cost_ratios(router: StaticRouter, cost: CostModel, budgets: Sequence[float]) -> dict:
    """{budget: the cost ratio of the router's argmax architecture} (exact, unrounded)."""
    full = cost.full()
    out = {}
    for budget in budgets:
        out[f"{budget:g}"] = cost.of(router.choose(budget)) / full
    return out
