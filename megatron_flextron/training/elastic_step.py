"""One elastic training iteration inside megatron's pipeline schedules.

Every micro-batch trains its own sampled sub-network: ``forward_step`` switches the model to it
before the forward pass (backward replays the graph saved then, so 1F1B interleaving is safe) and
records its active region for the elastic weight decay. Distillation targets come from a
forward-only pass run before the training pass, through the same schedule, so that under
pipeline parallelism the last stage holds the teacher's logits of each micro-batch:
``inplace`` uses the model itself at full size (Flextron), ``frozen`` a frozen copy of the
original model (Nemotron Elastic; every micro-batch, the full one included).

The loss of a micro-batch is LM loss + kd_weight x KL(teacher || student) at kd_temperature,
each a mean over unmasked tokens, plus the budget policy's term (a router's budget loss);
per-budget sums come back for logging. What a budget runs is the policy's business
(routers/policy.py): the step never asks which kind of router it holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Dict, List, Optional, Sequence

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_flextron.config import ElasticConfig, ModelConfig
from megatron_flextron.elastic.state import elastic_state, reset_elastic_state
from megatron_flextron.elastic.subnetwork import Subnetwork
from megatron_flextron.elastic.weight_decay import ElasticWeightDecay
from megatron_flextron.lm_step import position_ids
from megatron_flextron.parallel import current_device
from megatron_flextron.routers.policy import BudgetPolicy, NearestChoices
from megatron_flextron.routers.sampling import BudgetSampler
from megatron_flextron.training.distillation import kl_divergence


def _masked_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.float()
    return (per_token.float() * mask).sum() / mask.sum().clamp(min=1)


def _schedule(model, forward_step, microbatches: list, forward_only: bool) -> list:
    first = microbatches[0][1]["tokens"]
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(microbatches),
        model=[model],
        num_microbatches=len(microbatches),
        seq_length=first.size(1),
        micro_batch_size=first.size(0),
        forward_only=forward_only,
    )


def _capture_logits(_, logits: torch.Tensor):
    return torch.zeros((), device=logits.device), {"logits": logits.detach()}


@dataclass
class ElasticStep:
    model: torch.nn.Module  # megatron DDP-wrapped elastic GPTModel (this rank's stage)
    model_cfg: ModelConfig
    elastic_cfg: ElasticConfig
    sampler: BudgetSampler
    distill: str = "inplace"  # none | inplace | frozen
    kd_temperature: float = 1.0
    kd_weight: float = 1.0
    teacher: Optional[torch.nn.Module] = None  # the frozen original model (distill=frozen)
    weight_decay: Optional[ElasticWeightDecay] = None
    policy: Optional[BudgetPolicy] = None  # what a budget runs; default: the nearest choices

    def __post_init__(self):
        if self.distill not in ("none", "inplace", "frozen"):
            raise ValueError(f"--distill {self.distill!r}: expected none, inplace or frozen")
        if self.distill == "frozen" and self.teacher is None:
            raise ValueError("--distill frozen needs the frozen teacher model")
        if self.policy is None:
            self.policy = NearestChoices(self.model_cfg, self.elastic_cfg)
        self.budget_keys = sorted({1.0, *self.sampler.budgets}, reverse=True)
        self.moe_aux: Dict[float, float] = {}  # budget -> this stage's summed aux losses

    def _student(self, budget: float, subnet: Subnetwork, full: Subnetwork) -> bool:
        """Whether a micro-batch trains something other than the plain full model: a smaller
        sub-network, or a router's choice (routers serve every budget below 1.0, even one whose
        nearest homogeneous shape is the full model)."""
        return subnet != full or self.policy.routes(budget)

    def _teacher_logits(self, plan, microbatches) -> Dict[int, torch.Tensor]:
        """Logits (last stage) of the teacher for the micro-batches that distil."""
        if self.distill == "none":
            return {}
        if self.distill == "frozen":
            teacher, wanted = self.teacher, list(range(len(plan)))
        else:
            teacher = self.model
            full = Subnetwork.full(self.model_cfg)
            wanted = [m for m, (b, subnet) in enumerate(plan) if self._student(b, subnet, full)]
        if not wanted:
            return {}

        def forward_step(data_iterator, model):
            _, batch = next(data_iterator)
            return model(batch["tokens"], position_ids(batch), None), partial(_capture_logits, None)

        with elastic_state(teacher), torch.no_grad():
            out = _schedule(
                teacher, forward_step, [(m, microbatches[m]) for m in wanted], forward_only=True
            )
        if not parallel_state.is_pipeline_last_stage():
            return {}
        return {m: o["logits"] for m, o in zip(wanted, out)}

    def _loss_func(self, m: int, budget: float, batch: dict, teacher, handle, logits: torch.Tensor):
        labels, mask = batch["labels"], batch.get("loss_mask")
        mask = torch.ones_like(labels, dtype=torch.float) if mask is None else mask
        # megatron's vocab-parallel cross entropy works in place on fp32 logits: give it a copy
        lm = _masked_mean(
            tensor_parallel.vocab_parallel_cross_entropy(logits.float().clone(), labels), mask
        )
        loss, kd = lm, torch.zeros((), device=lm.device)
        if teacher is not None:
            kd = _masked_mean(kl_divergence(logits, teacher, self.kd_temperature), mask)
            loss = lm + self.kd_weight * kd
        # clones: megatron's schedule divides the returned loss in place by the micro-batch count
        stats = {"lm loss": lm.detach().clone(), "kd loss": kd.detach().clone(), "budget": budget}
        term, policy_stats = self.policy.loss_term(handle, budget)
        if term is not None:
            loss = loss + term
        stats.update(policy_stats)
        return loss, stats

    def run(self, iteration: int, microbatches: List[dict], forward_only: bool = False) -> dict:
        """Forward/backward of one iteration; returns per-budget sums (see ``reduce_stats``)."""
        plan = [self.sampler.sample(iteration, m) for m in range(len(microbatches))]
        teachers = self._teacher_logits(plan, microbatches)
        self.moe_aux = {}

        def forward_step(data_iterator, model):
            m, batch = next(data_iterator)
            budget, subnet = plan[m]
            handle = self.policy.before_forward(
                model, budget, subnet, iteration, m, len(microbatches)
            )
            if self.weight_decay is not None and not forward_only:
                self.weight_decay.record()
            output = model(batch["tokens"], position_ids(batch), None)
            if self.model_cfg.is_moe:
                self.moe_aux[budget] = self.moe_aux.get(budget, 0.0) + take_moe_aux_loss()
            self.policy.after_forward(model, budget, handle)
            teacher = teachers.get(m)
            return output, partial(self._loss_func, m, budget, batch, teacher, handle)

        out = _schedule(self.model, forward_step, list(enumerate(microbatches)), forward_only)
        reset_elastic_state(self.model)
        return self.reduce_stats(out, len(microbatches))

    def reduce_stats(self, outputs: Sequence[dict], num_microbatches: int) -> dict:
        """Per budget: mean LM and KD loss, the micro-batch count and the policy's stats (e.g. a
        router's cost ratio), summed over data-parallel ranks and pipeline stages (losses come
        from the last stage, per-stage policy stats such as token widths from every stage)."""
        keys = self.budget_keys
        names = list(self.policy.stat_names)
        if self.model_cfg.is_moe:
            names.append("moe aux loss")
        device = current_device()
        totals = torch.zeros(len(keys), 3 + len(names), dtype=torch.float64, device=device)
        if parallel_state.is_pipeline_last_stage():
            for o in outputs:
                row = keys.index(o["budget"])
                values = [float(o["lm loss"]), float(o["kd loss"]), 1.0]
                values += [float(o.get(name, 0.0)) for name in names]
                totals[row] += torch.tensor(values, device=device)
        stages = {b: dict(s) for b, s in self.policy.stage_stats().items()}
        for budget, aux in self.moe_aux.items():  # a mean over MoE layers, summed over stages
            stages.setdefault(budget, {})["moe aux loss"] = aux / self.model_cfg.num_layers
        for budget, stage in stages.items():
            values = [0.0, 0.0, 0.0] + [stage.get(name, 0.0) for name in names]
            totals[keys.index(budget)] += torch.tensor(values, device=device)
        for group in (
            parallel_state.get_data_parallel_group(),
            parallel_state.get_pipeline_model_parallel_group(),
        ):
            torch.distributed.all_reduce(totals, group=group)
        totals = totals.cpu()
        count = totals[:, 2].sum()
        result = {
            "lm loss": float(totals[:, 0].sum() / count),
            "kd loss": float(totals[:, 1].sum() / count),
            "budgets": {},
        }
        for key, (lm, kd, n, *policy) in zip(keys, totals.tolist()):
            if n:
                row = {"lm loss": lm / n, "kd loss": kd / n, "n": int(n)}
                if self.policy.routes(key):
                    row.update({name: value / n for name, value in zip(names, policy)})
                if self.model_cfg.is_moe:
                    row["moe aux loss"] = policy[-1] / n
                result["budgets"][f"{key:g}"] = row
        return result


def take_moe_aux_loss() -> float:
    """The sum over this stage's MoE layers of megatron's load-balancing losses (divided by their
    coefficients, as megatron logs them) recorded since the last call, which resets them; 0
    when no auxiliary loss is configured."""
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    tracker = get_moe_metrics_tracker()
    total = sum(float(entry.values.sum()) for entry in tracker.metrics.values())
    tracker.clear()
    return total
