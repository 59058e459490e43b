"""Megatron-style ``forward_step`` / ``loss_func`` for causal LM, and one scheduled step.

Shapes follow megatron: a micro-batch holds tokens/labels/loss_mask [b, s]; GPTModel called with
labels returns the per-token loss [b, s] on the last pipeline stage.
"""

from __future__ import annotations

from functools import partial
from typing import Dict, Iterator, Sequence

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor, per_sequence: bool = False):
    """Mean NLL over unmasked tokens; megatron's (loss, logging dict) shape. The dict also carries
    the NLL sum and token count so that evaluation can weight micro-batches by tokens, and with
    ``per_sequence`` each row's NLL sum (for log-likelihood scoring)."""
    mask = loss_mask.float()
    nll_rows = (output_tensor.float() * mask).sum(-1)
    nll_sum = nll_rows.sum()
    tokens = mask.sum()
    loss = nll_sum / tokens.clamp(min=1)
    stats = {"lm loss": loss.detach().clone(), "nll_sum": nll_sum.detach(), "tokens": tokens}
    if per_sequence:
        stats["nll_per_sequence"] = nll_rows.detach()
    return loss, stats


def position_ids(batch: dict) -> torch.Tensor:
    """The batch's position ids, or 0..s-1 for every row."""
    pos = batch.get("position_ids")
    if pos is not None:
        return pos
    tokens = batch["tokens"]
    return torch.arange(tokens.size(1), device=tokens.device).expand_as(tokens)


def forward_step(data_iterator: Iterator[dict], model, per_sequence: bool = False):
    """Megatron's forward_step(data_iterator, model) -> (output_tensor, loss closure)."""
    batch = next(data_iterator)
    tokens, labels = batch["tokens"], batch["labels"]
    loss_mask = batch.get("loss_mask")
    if loss_mask is None:
        loss_mask = torch.ones_like(labels, dtype=torch.float)
    output = model(tokens, position_ids(batch), None, labels=labels)
    return output, partial(loss_func, loss_mask, per_sequence=per_sequence)


def forward_backward(
    model, microbatches: list, forward_only: bool = False, per_sequence: bool = False
) -> Dict[str, float]:
    """Run megatron's schedule over ``microbatches`` (dicts of [b, s] tensors; every PP stage
    passes the same list). Returns, on every rank (reduced from the last pipeline stage), the
    mean of the micro-batch losses ("loss"), the NLL sum ("nll_sum") and the token count, and
    with ``per_sequence`` every row's NLL sum in order ("nll_per_sequence")."""
    first = microbatches[0]["tokens"]
    out = get_forward_backward_func()(
        forward_step_func=partial(forward_step, per_sequence=per_sequence),
        data_iterator=iter(microbatches),
        model=[model] if not isinstance(model, list) else model,
        num_microbatches=len(microbatches),
        seq_length=first.size(1),
        micro_batch_size=first.size(0),
        forward_only=forward_only,
    )
    n = len(microbatches) * first.size(0) if per_sequence else 0
    totals = torch.zeros(3 + n, dtype=torch.float64, device=first.device)
    if parallel_state.is_pipeline_last_stage():
        totals[0] = torch.stack([o["lm loss"] for o in out]).double().mean()
        totals[1] = torch.stack([o["nll_sum"] for o in out]).double().sum()
        totals[2] = torch.stack([o["tokens"] for o in out]).double().sum()
        if per_sequence:
            totals[3:] = torch.cat([o["nll_per_sequence"] for o in out]).double()
    torch.distributed.all_reduce(totals, group=parallel_state.get_pipeline_model_parallel_group())
    result = {"loss": totals[0].item(), "nll_sum": totals[1].item(), "tokens": totals[2].item()}
    if per_sequence:
        result["nll_per_sequence"] = totals[3:].tolist()
    return result


def pad_microbatches(sequences: Sequence[Sequence[int]], micro_batch_size: int, device=None):
    """Variable-length token sequences -> micro-batches padded to one length, loss-masked.

    Each sequence is evaluated on its own (causal attention never sees the right padding); the
    last micro-batch is filled with fully masked rows, as pipeline shapes must not change.
    """
    length = max(len(s) for s in sequences) - 1
    batches = []
    for i in range(0, len(sequences), micro_batch_size):
        chunk = sequences[i : i + micro_batch_size]
        tokens = torch.zeros(micro_batch_size, length + 1, dtype=torch.long)
        mask = torch.zeros(micro_batch_size, length)
        for row, seq in enumerate(chunk):
            tokens[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq) - 1] = 1
        batches.append(
            {
                "tokens": tokens[:, :-1].contiguous().to(device),
                "labels": tokens[:, 1:].contiguous().to(device),
                "loss_mask": mask.to(device),
            }
        )
    return batches
