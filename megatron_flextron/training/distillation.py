"""Logit distillation for elastic training: KL(teacher || student) on vocabulary-parallel logits.

In-place distillation uses the full model's logits as the teacher (Flextron); a frozen copy of the
original model can serve as well (Nemotron Elastic). Under tensor parallelism each rank holds a
slice of the vocabulary, so the softmax normalisers are all-reduced over the TP group and the KL
is summed over ranks: the result equals the unsharded KL.

Shapes: logits [b, s, V/p]; the loss is per token [b, s].
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state


class _AllReduceMax(torch.autograd.Function):
    """Max over the TP group; a constant for autograd (it only stabilises the softmax)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.MAX, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return None, None


class _AllReduceSum(torch.autograd.Function):
    """Sum over the TP group of a value every rank then uses in its own share of the loss: its
    gradient is the sum of every rank's gradient (as for the softmax normaliser)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        torch.distributed.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


class _SumOfShares(torch.autograd.Function):
    """Sum over the TP group of per-rank shares of one replicated loss: each rank's share gets the
    loss gradient as it is (like megatron's vocab-parallel cross entropy)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        torch.distributed.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def vocab_parallel_log_softmax(logits: torch.Tensor, group=None) -> torch.Tensor:
    group = group or parallel_state.get_tensor_model_parallel_group()
    logits = logits.float()
    shift = _AllReduceMax.apply(logits.max(dim=-1, keepdim=True).values.detach(), group)
    shifted = logits - shift
    normaliser = _AllReduceSum.apply(shifted.exp().sum(dim=-1, keepdim=True), group)
    return shifted - normaliser.log()


def kl_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0, group=None
) -> torch.Tensor:
    """Per-token KL(teacher || student) at ``temperature``, scaled by T^2 (Hinton et al.)."""
    group = group or parallel_state.get_tensor_model_parallel_group()
    log_p_student = vocab_parallel_log_softmax(student_logits / temperature, group)
    with torch.no_grad():
        log_p_teacher = vocab_parallel_log_softmax(teacher_logits.detach() / temperature, group)
    local = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=-1)
    return _SumOfShares.apply(local, group) * temperature**2
