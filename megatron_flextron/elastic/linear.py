"""Elastic tensor-parallel linear layers: megatron's Column/RowParallelLinear on a subset of units.

A selection is either a ``slice`` (computed on a view of the local weight shard: no copy) or a
1-D index tensor (a gather, used only where the kept rows are not contiguous: GQA heads trimmed
inside each KV group). Gradients reach only the selected rows/columns; the rest stay exactly zero.
A slice's weight gradient is accumulated straight into that slice (sliced_linear.py).

With no selection set, ``forward`` is megatron's own code path, so a full-size elastic model runs
exactly the stock computation.

A few tokens without grad (a decode step) never gather weights: an index selection that is the
same ranges in each of equal blocks (GQA heads trimmed inside each KV group: ``Blocks``) runs as
batched products over strided views of the weight, reading only the kept rows/columns; any other
index selection takes the full product's outputs (or pads the input with zeros).

Shapes: input [s, b, h_in] (sequence first, as in megatron); p = tensor-parallel size.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    gather_from_sequence_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)

# megatron's linears look their TP copy/reduce up in this module at call time; so do these, so
# that the forward-only versions installed for generation (compat/inference.py) serve them too
from megatron.core.tensor_parallel import layers as tp_layers

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


class Blocks(NamedTuple):
    """An index selection with structure: the ranges ``spans`` of each of ``groups`` blocks of
    ``size`` units, listed block after block (e.g. per KV group: its kept query rows, then k, v)."""

    groups: int
    size: int
    spans: Tuple[Tuple[int, int], ...]


def few_tokens(x: torch.Tensor, width: int) -> bool:
    return not torch.is_grad_enabled() and x.numel() <= FEW_TOKENS * width


def blocked_rows_linear(x, weight, bias, blocks: Blocks) -> torch.Tensor:
    """``F.linear`` on the rows ``blocks`` selects, from strided views of ``weight`` (no copy):
    one batched product per span, [..., groups * sum(spans)] in the selection's order."""
    g, size, spans = blocks
    w = weight.view(g, size, weight.shape[-1])
    flat = x.reshape(-1, x.shape[-1])
    outs = []
    for a, b in spans:
        y = torch.matmul(flat, w[:, a:b].transpose(1, 2))  # [groups, tokens, b - a]
        outs.append(y if bias is None else y + bias.view(g, 1, size)[:, :, a:b])
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
    return out.transpose(0, 1).reshape(*x.shape[:-1], -1)


def blocked_cols_linear(x, weight, blocks: Blocks) -> torch.Tensor:
    """``F.linear`` on the input columns ``blocks`` selects (one span per block), from a strided
    view of ``weight`` (no copy): a batched product per block, summed over the blocks. Each
    block's columns are contiguous memory when the weight is stored column-major
    (:func:`serving_layout`)."""
    g, size, ((a, b),) = blocks
    w = weight.view(weight.shape[0], g, size)[:, :, a:b]  # [out, groups, b - a]
    flat = x.reshape(-1, g, b - a).transpose(0, 1)  # [groups, tokens, b - a]
    out = torch.matmul(flat, w.permute(1, 2, 0)).sum(0)
    return out.view(*x.shape[:-1], -1)


def serving_layout(model: torch.nn.Module) -> None:
    """Store the weights of the row-parallel linears column-major (the same values and shape;
    products equal the row-major ones to float rounding, not to the bit):
    a sub-network reads a prefix of their input columns (MLP neurons) or a span per KV group
    (heads), which is then contiguous memory; read row-major, a one-token product costs
    1.0-1.5x (fc2) and 1.1-2.1x (projection) as much (``python benchmarks/serving_layout.py``).
    For a model that only generates: its weights do not change."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ElasticRowParallelLinear) and module.weight.dim() == 2:
                module.weight.data = module.weight.data.t().contiguous().t()


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
        self.row_blocks: Optional[Blocks] = None

    def set_active_rows(self, rows: Optional[Sequence[Selection]],
                        blocks: Optional[Blocks] = None) -> None:
        """``blocks``: the structure of a single index selection (for few-token steps)."""
        if rows is not None and self.gather_output:
            raise ValueError("elastic column-parallel linear does not support gather_output")
        self.active_rows = None if rows is None else list(rows)
        self.row_blocks = blocks if rows is not None and len(self.active_rows) == 1 else None

    def forward_pieces(self, input_: torch.Tensor) -> List[torch.Tensor]:
        """One output [s, b, rows_i] per active piece, bias included."""
        if getattr(self, "explicit_expert_comm", False):
            x = input_  # an expert under TP/EP: the token dispatcher moves the tokens
        elif self.sequence_parallel:
            x = gather_from_sequence_parallel_region(input_, group=self.tp_group)
        else:
            x = tp_layers.copy_to_tensor_model_parallel_region(input_, group=self.tp_group)
        rows = self.active_rows or [slice(None)]
        return [self._piece(x, r) for r in rows]

    def _piece(self, x: torch.Tensor, rows: Selection) -> torch.Tensor:
        if isinstance(rows, torch.Tensor) and few_tokens(x, x.shape[-1]):
            if self.row_blocks is not None:
                return blocked_rows_linear(x, self.weight, self.bias, self.row_blocks)
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
        self.col_blocks: Optional[Blocks] = None
        self.input_scale: Optional[torch.Tensor] = None
        self.scale_repeat = 1

    def set_active_cols(self, cols: Optional[Selection], blocks: Optional[Blocks] = None) -> None:
        """``blocks``: the structure of an index selection, one span per block (few tokens)."""
        if cols is not None and not self.input_is_parallel:
            raise ValueError("elastic row-parallel linear needs input_is_parallel=True")
        self.active_cols = cols
        self.col_blocks = blocks if cols is not None else None

    def set_input_scale(self, scale: Optional[torch.Tensor], repeat: int = 1) -> None:
        """Multiply the input by ``scale`` (None: no scaling); the gradient reaches ``scale``."""
        self.input_scale, self.scale_repeat = scale, repeat

    def selected_product(self, input_: torch.Tensor) -> torch.Tensor:
        """This rank's product on the active input columns (before the TP reduction)."""
        cols, width = self.active_cols, input_.shape[-1]
        if isinstance(cols, torch.Tensor) and few_tokens(input_, width) and self.col_blocks:
            return blocked_cols_linear(input_, self.weight, self.col_blocks)
        if isinstance(cols, torch.Tensor) and few_tokens(input_, width):
            # a few tokens without grad: the input placed in the full width (zeros elsewhere)
            # reads the weight once; gathering its columns would copy most of it every step
            full = input_.new_zeros(*input_.shape[:-1], self.input_size_per_partition)
            return F.linear(full.index_copy_(-1, cols, input_), self.weight)
        if fusable(self.weight, cols):
            return sliced_linear(input_, self.weight, cols, 1)
        return F.linear(input_, select(self.weight, cols, 1))

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
        output_parallel = self.selected_product(input_)
        if getattr(self, "explicit_expert_comm", False):
            output = output_parallel  # an expert: the dispatcher's combine sums over TP
        elif self.sequence_parallel:
            output = reduce_scatter_to_sequence_parallel_region(
                output_parallel, group=self.tp_group
            )
        else:
            output = tp_layers.reduce_from_tensor_model_parallel_region(
                output_parallel, group=self.tp_group)
        if self.skip_bias_add:
            return output, self.bias
        return (output + self.bias if self.bias is not None else output), None
