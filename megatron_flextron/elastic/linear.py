"""Elastic tensor-parallel linear layers: megatron's Column/RowParallelLinear on a subset of units.

A selection is either a ``slice`` (computed on a view of the local weight shard: no copy) or a
1-D index tensor (a gather, used only where the kept rows are not contiguous: GQA heads trimmed
inside each KV group). Gradients reach only the selected rows/columns; the rest stay exactly zero.
A slice's weight gradient is accumulated straight into that slice (sliced_linear.py).

With no selection set, ``forward`` is megatron's own code path, so a full-size elastic model runs
exactly the stock computation.

Shapes: input [s, b, h_in] (sequence first, as in megatron); p = tensor-parallel size.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)

from megatron_flextron.elastic.sliced_linear import fusable, sliced_linear

Selection = Union[slice, torch.Tensor]
FEW_TOKENS = 32  # up to this many tokens, an index selection picks outputs, not weight rows


def select(
    tensor: Optional[torch.Tensor], selection: Selection, dim: int
) -> Optional[torch.Tensor]:
    """The selected part of ``tensor`` along ``dim``: a view for a slice, a gather for indices."""
    if tensor is None:
        return None
    if isinstance(selection, slice):
        index = [slice(None)] * tensor.dim()
        index[dim] = selection
        return tensor[tuple(index)]
    return tensor.index_select(dim, selection)


def selection_size(selection: Selection, full: int) -> int:
    if isinstance(selection, slice):
        return len(range(*selection.indices(full)))
    return selection.numel()


class ElasticColumnParallelLinear(ColumnParallelLinear):
    """ColumnParallelLinear whose output can be restricted to pieces of its local rows.

    ``active_rows`` is None (full width, stock path) or a list of selections of local output rows.
    Several pieces share one input communication; the gated MLP uses two (gate and up).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.active_rows: Optional[List[Selection]] = None

    def set_active_rows(self, rows: Optional[Sequence[Selection]]) -> None:
        if rows is not None and self.gather_output:
            raise ValueError("elastic column-parallel linear does not support gather_output")
        self.active_rows = None if rows is None else list(rows)

    def forward_pieces(self, input_: torch.Tensor) -> List[torch.Tensor]:
        """One output [s, b, rows_i] per active piece, bias included."""
        if getattr(self, "explicit_expert_comm", False):
            x = input_  # an expert under TP/EP: the token dispatcher moves the tokens
        elif self.sequence_parallel:
            x = gather_from_sequence_parallel_region(input_, group=self.tp_group)
        else:
            x = copy_to_tensor_model_parallel_region(input_, group=self.tp_group)
        rows = self.active_rows or [slice(None)]
        return [self._piece(x, r) for r in rows]

    def _piece(self, x: torch.Tensor, rows: Selection) -> torch.Tensor:
        if (isinstance(rows, torch.Tensor) and not torch.is_grad_enabled()
                and x.numel() <= FEW_TOKENS * x.shape[-1]):
            # a few tokens without grad (a decode step): the full product's selected outputs
            # read the weight once; gathering its rows would copy most of it every step
            return F.linear(x, self.weight, self.bias).index_select(-1, rows)
        if self.bias is None and fusable(self.weight, rows):
            return sliced_linear(x, self.weight, rows, 0)  # the weight gradient: the rows only
        return F.linear(x, select(self.weight, rows, 0), select(self.bias, rows, 0))

    def forward(self, input_, weight=None, runtime_gather_output=None):
        if self.active_rows is None or weight is not None:
            return super().forward(input_, weight, runtime_gather_output)
        pieces = self.forward_pieces(input_)
        output = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)
        return output, None  # the bias is already added to the active rows


class ElasticRowParallelLinear(RowParallelLinear):
    """RowParallelLinear that reads only a selection of its local input columns, or scales them.

    The input must already hold only the active units ([s, b, selected]), as produced by the
    elastic layer before it. The output keeps the full hidden size; the bias is not sliced.
    ``input_scale`` (soft architectures, token-routing mixtures) multiplies the local input units
    by weights [..., units] (each repeated ``scale_repeat`` times along the features; leading
    dims broadcast, e.g. per token).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.active_cols: Optional[Selection] = None
        self.input_scale: Optional[torch.Tensor] = None
        self.scale_repeat = 1

    def set_active_cols(self, cols: Optional[Selection]) -> None:
        if cols is not None and not self.input_is_parallel:
            raise ValueError("elastic row-parallel linear needs input_is_parallel=True")
        self.active_cols = cols

    def set_input_scale(self, scale: Optional[torch.Tensor], repeat: int = 1) -> None:
        """Multiply the input by ``scale`` (None: no scaling); the gradient reaches ``scale``."""
        self.input_scale, self.scale_repeat = scale, repeat

    def forward(self, input_):
        if self.input_scale is not None:
            scale = self.input_scale.repeat_interleave(self.scale_repeat, dim=-1)
            input_ = input_ * scale.to(input_.dtype)
        if self.active_cols is None:
            return super().forward(input_)
        width = selection_size(self.active_cols, self.input_size_per_partition)
        if input_.shape[-1] != width:
            raise RuntimeError(
                f"elastic row-parallel input has {input_.shape[-1]} features, "
                f"the active selection has {width}"
            )
        cols = self.active_cols
        if (isinstance(cols, torch.Tensor) and not torch.is_grad_enabled()
                and input_.numel() <= FEW_TOKENS * width):
            # a few tokens without grad: the input placed in the full width (zeros elsewhere)
            # reads the weight once; gathering its columns would copy most of it every step
            full = input_.new_zeros(*input_.shape[:-1], self.input_size_per_partition)
            output_parallel = F.linear(full.index_copy_(-1, cols, input_), self.weight)
        elif fusable(self.weight, cols):
            output_parallel = sliced_linear(input_, self.weight, cols, 1)
        else:
            output_parallel = F.linear(input_, select(self.weight, cols, 1))
        if getattr(self, "explicit_expert_comm", False):
            output = output_parallel  # an expert: the dispatcher's combine sums over TP
        elif self.sequence_parallel:
            output = reduce_scatter_to_sequence_parallel_region(
                output_parallel, group=self.tp_group
            )
        else:
            output = reduce_from_tensor_model_parallel_region(output_parallel, group=self.tp_group)
        if self.skip_bias_add:
            return output, self.bias
        return (output + self.bias if self.bias is not None else output), None
