"""A linear layer on a prefix slice of its weight whose weight gradient costs only the slice.

Plain autograd of ``F.linear(x, weight[sel])`` computes the slice's gradient, then the view's
backward allocates a zero gradient of the full weight and copies the slice into it; a second
slice of the same weight (the up rows after the gate rows of a SwiGLU fc1) adds a second full
tensor, and megatron's DDP hook then adds the full ``param.grad`` into ``main_grad``. Per expert
and step that is several full-size passes for a half-size product. Here the backward writes the
slice's gradient straight into the parameter's gradient, as megatron's
``gradient_accumulation_fusion`` does:

- under megatron DDP (``weight.main_grad``): added into the slice of ``main_grad``, with
  ``grad_added_to_main_grad`` set; autograd gets no weight gradient (DDP's post-accumulation hook
  still runs and sees none, so this needs ``overlap_grad_reduce=False``, as the trainer runs);
- otherwise into ``weight.grad`` (allocated as zeros on first use, as autograd would), only when
  this backward accumulates into the weight (not under ``torch.autograd.grad(..., inputs=[x])``).

Either way the values equal plain autograd's bit for bit (the products mirror torch's own
``mm`` backward), and the gradient outside the slice stays exactly zero. Hooks registered on the
weight tensor itself do not see these gradients; nothing in the project registers one. Being a
Python autograd node, it pays only for large weights (``FUSED_MIN_NUMEL``; docs/moe.md).

Shapes: x [..., in]; weight [out, in]; a slice of rows (dim 0, column-parallel) or of columns
(dim 1, row-parallel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.autograd.graph import get_gradient_edge


def _cut(tensor: torch.Tensor, sel: slice, dim: int) -> torch.Tensor:
    return tensor[sel] if dim == 0 else tensor[:, sel]


# A Python autograd node costs about what the full-size gradient passes cost for a weight of
# ~1M elements (CPU, 1 thread): below that plain autograd of the view is faster. One expert's
# step at half width, fused / plain: fc1 [1024, 256] 1.097 (DDP 1.046); [2048, 1024] 0.984
# (DDP 0.934); `python benchmarks/moe_slicing.py --sliced-grad`.
FUSED_MIN_NUMEL = 1 << 20


def fusable(weight: torch.Tensor, sel) -> bool:
    """Whether ``sliced_linear`` applies: a slice of a large leaf weight that autograd trains."""
    return (
        isinstance(sel, slice)
        and weight.numel() >= FUSED_MIN_NUMEL
        and weight.dim() == 2
        and weight.requires_grad
        and weight.is_leaf
        and torch.is_grad_enabled()
    )


class _SlicedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, sel, dim):
        ctx.sel, ctx.dim = sel, dim
        ctx.save_for_backward(x, weight)
        return F.linear(x, _cut(weight, sel, dim))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        w = _cut(weight, ctx.sel, ctx.dim)
        dy = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = dy.mm(w).view(*grad_out.shape[:-1], w.shape[1])
        _accumulate_weight_grad(weight, ctx.sel, ctx.dim, x.reshape(-1, x.shape[-1]), dy)
        return grad_x, None, None, None


def _wgrad(w: torch.Tensor, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """dy^T x ([out, in]) the way torch's mm backward computes it for the view ``w`` (the
    operand order follows the view's strides)."""
    if w.is_contiguous():  # rows of a contiguous weight
        return torch.mm(dy.t(), x)
    return torch.mm(x.t(), dy).t()


def _accumulate_weight_grad(weight, sel, dim, x, dy) -> None:
    w = _cut(weight, sel, dim)
    main_grad = getattr(weight, "main_grad", None)
    if main_grad is not None:
        _cut(main_grad, sel, dim).add_(_wgrad(w, x, dy))
        weight.grad_added_to_main_grad = True
        return
    if not torch._C._will_engine_execute_node(get_gradient_edge(weight).node):
        return  # torch.autograd.grad / backward(inputs=...) without this weight
    if weight.grad is not None:
        _cut(weight.grad, sel, dim).add_(_wgrad(w, x, dy))
        return
    weight.grad = torch.zeros_like(weight)
    target = _cut(weight.grad, sel, dim)
    if w.is_contiguous():  # the product straight into the rows (a strided target would take
        torch.mm(dy.t(), x, out=target)  # another BLAS path: not bit-identical, so copy there)
    else:
        target.copy_(_wgrad(w, x, dy))


def sliced_linear(x: torch.Tensor, weight: torch.Tensor, sel: slice, dim: int) -> torch.Tensor:
    """``F.linear(x, weight[sel])`` (dim 0) or ``F.linear(x, weight[:, sel])`` (dim 1), with the
    weight gradient accumulated into the slice of the full gradient (see the module docstring).
    Call it only where ``fusable(weight, sel)``."""
    return _SlicedLinear.apply(x, weight, sel, dim)
