"""Megatron-style ``forward_step`` / ``loss_func`` for causal LM, and one scheduled step.

Shapes follow megatron: a micro-batch holds tokens/labels/loss_mask [b, s]; GPTModel called with
labels returns the per-token loss [b, s] on the last pipeline stage.
"""

from __future__ import annotations

from functools import partial
from typing import Iterator, Optional

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Mean NLL over unmasked tokens; megatron's (loss, num_tokens, logging dict) shape."""
    losses = output_tensor.float()
    mask = loss_mask.float()
    num_tokens = mask.sum().clamp(min=1)
    loss = (losses * mask).sum() / num_tokens
    return loss, {"lm loss": loss.detach().clone()}


def forward_step(data_iterator: Iterator[dict], model):
    """Megatron's forward_step(data_iterator, model) -> (output_tensor, loss closure)."""
    batch = next(data_iterator)
    tokens, labels = batch["tokens"], batch["labels"]
    position_ids = batch.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(tokens.size(1), device=tokens.device).expand_as(tokens)
    loss_mask = batch.get("loss_mask")
    if loss_mask is None:
        loss_mask = torch.ones_like(labels, dtype=torch.float)
    output = model(tokens, position_ids, None, labels=labels)
    return output, partial(loss_func, loss_mask)


def forward_backward(
    model,
    microbatches: list,
    forward_only: bool = False,
) -> Optional[torch.Tensor]:
    """Run megatron's schedule over ``microbatches`` (dicts of [b, s] tensors, every PP stage
    passes the same list). Returns the mean "lm loss" on every rank (broadcast from the last
    pipeline stage)."""
    first = microbatches[0]["tokens"]
    out = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(microbatches),
        model=[model] if not isinstance(model, list) else model,
        num_microbatches=len(microbatches),
        seq_length=first.size(1),
        micro_batch_size=first.size(0),
        forward_only=forward_only,
    )
    loss = torch.zeros((), dtype=torch.float, device=first.device)
    if parallel_state.is_pipeline_last_stage():
        loss += torch.stack([o["lm loss"] for o in out]).mean()
    torch.distributed.all_reduce(loss, group=parallel_state.get_pipeline_model_parallel_group())
    return loss
