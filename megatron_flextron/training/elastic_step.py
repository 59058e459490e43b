"""One elastic training iteration inside megatron's pipeline schedules.

Every micro-batch trains its own sampled sub-network: ``forward_step`` switches the model to it
before the forward pass (backward replays the graph saved then, so 1F1B interleaving is safe) and
records its active region for the elastic weight decay. Distillation targets come from a
forward-only pass run before the training pass, through the same schedule, so that under
pipeline parallelism the last stage holds the teacher's logits of each micro-batch:
``inplace`` uses the model itself at full size (Flextron), ``frozen`` a frozen copy of the
original model (Nemotron Elastic; every micro-batch, the full one included).

The loss of a micro-batch is LM loss + kd_weight x KL(teacher || student) at kd_temperature,
each a mean over unmasked tokens; per-budget sums come back for logging.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Dict, List, Optional, Sequence

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_flextron.config import ElasticConfig, ModelConfig
from megatron_flextron.elastic.soft_architecture import (
    clear_soft_architecture,
    set_soft_architecture,
)
from megatron_flextron.elastic.subnetwork import Subnetwork, set_subnetwork
from megatron_flextron.elastic.weight_decay import ElasticWeightDecay
from megatron_flextron.parallel import current_device
from megatron_flextron.training.distillation import kl_divergence
from megatron_flextron.lm_step import position_ids
from megatron_flextron.routers.sampling import BudgetSampler


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
    joint_router: Optional[object] = None  # training.joint_router.JointRouter (--router joint)
    token_routers: Optional[object] = None  # training.joint_token_routers (--router token)

    def __post_init__(self):
        if self.distill not in ("none", "inplace", "frozen"):
            raise ValueError(f"--distill {self.distill!r}: expected none, inplace or frozen")
        if self.distill == "frozen" and self.teacher is None:
            raise ValueError("--distill frozen needs the frozen teacher model")
        self.budget_keys = sorted({1.0, *self.sampler.budgets}, reverse=True)

    @property
    def routers(self) -> list:
        """The routers trained with the model (each has finish_grads and step)."""
        return [r for r in (self.joint_router, self.token_routers) if r is not None]

    def _student(self, budget: float, subnet: Subnetwork, full: Subnetwork) -> bool:
        """Whether a micro-batch trains something other than the plain full model: a smaller
        sub-network, or a router's choice (routers serve every budget below 1.0, even one whose
        nearest homogeneous shape is the full model)."""
        return subnet != full or (bool(self.routers) and budget < 1.0)

    def _set(self, model, subnet: Subnetwork) -> None:
        clear_soft_architecture(model)
        set_subnetwork(model, subnet, self.model_cfg, self.elastic_cfg)

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

        self._set(teacher, Subnetwork.full(self.model_cfg))
        with torch.no_grad():
            out = _schedule(
                teacher, forward_step, [(m, microbatches[m]) for m in wanted], forward_only=True
            )
        if not parallel_state.is_pipeline_last_stage():
            return {}
        return {m: o["logits"] for m, o in zip(wanted, out)}

    def _loss_func(self, m: int, budget: float, batch: dict, teacher, routed, logits: torch.Tensor):
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
        if routed is not None:  # the router's budget loss, counted once (TP rank 0, last stage)
            term, ratio = self.joint_router.budget_term(routed, budget)
            if parallel_state.get_tensor_model_parallel_rank() == 0:
                loss = loss + term
            stats["router cost ratio"] = ratio
        return loss, stats

    def run(self, iteration: int, microbatches: List[dict], forward_only: bool = False) -> dict:
        """Forward/backward of one iteration; returns per-budget sums (see ``reduce_stats``)."""
        plan = [self.sampler.sample(iteration, m) for m in range(len(microbatches))]
        teachers = self._teacher_logits(plan, microbatches)
        full = Subnetwork.full(self.model_cfg)

        def forward_step(data_iterator, model):
            m, batch = next(data_iterator)
            budget, subnet = plan[m]
            routed = None
            token = self.token_routers if budget < 1.0 else None
            if self.joint_router is not None and budget < 1.0:
                self._set(model, full)
                routed = self.joint_router.sample(budget, iteration, m)
                mlp, heads = self.joint_router.mlp_choices, self.joint_router.head_choices
                set_soft_architecture(model, routed.mlp, routed.heads, mlp, heads, routed.keep)
            elif token is not None:  # the full model, every token's MLP width routed
                self._set(model, full)
                token.attach(model, budget, iteration, m, len(microbatches))
            else:
                self._set(model, subnet)
            if self.weight_decay is not None and not forward_only:
                self.weight_decay.record()
            output = model(batch["tokens"], position_ids(batch), None)
            if token is not None:  # backward replays the recorded graph: routing can go now
                token.record_forward(budget)
                token.detach(model)
            teacher = teachers.get(m)
            return output, partial(self._loss_func, m, budget, batch, teacher, routed)

        out = _schedule(self.model, forward_step, list(enumerate(microbatches)), forward_only)
        self._set(self.model, Subnetwork.full(self.model_cfg))
        return self.reduce_stats(out, len(microbatches))

    def reduce_stats(self, outputs: Sequence[dict], num_microbatches: int) -> dict:
        """Per budget: mean LM and KD loss, the micro-batch count and the routers' cost ratio (and
        token routers' aux loss), summed over data-parallel ranks and pipeline stages (losses
        come from the last stage, token routers' widths from every stage's layers)."""
        keys = self.budget_keys
        device = current_device()
        totals = torch.zeros(len(keys), 5, dtype=torch.float64, device=device)
        if parallel_state.is_pipeline_last_stage():
            for o in outputs:
                row = keys.index(o["budget"])
                ratio = o.get("router cost ratio", 0.0)
                totals[row] += torch.tensor(
                    [float(o["lm loss"]), float(o["kd loss"]), 1.0, ratio, 0.0], device=device
                )
        if self.token_routers is not None:
            for budget, (width, aux) in self.token_routers.take_step_totals().items():
                totals[keys.index(budget), 3:] += torch.tensor([width, aux], device=device)
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
        for key, (lm, kd, n, ratio, aux) in zip(keys, totals.tolist()):
            if n:
                row = {"lm loss": lm / n, "kd loss": kd / n, "n": int(n)}
                if ratio:
                    row["router cost ratio"] = ratio / n
                if self.token_routers is not None and ratio:
                    row["router aux loss"] = aux / n
                result["budgets"][f"{key:g}"] = row
        return result
