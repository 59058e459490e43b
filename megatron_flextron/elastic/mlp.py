"""Elastic MLP: megatron's MLP that runs on the first k neurons of its hidden layer.

MLP_k(x) = W2[:, :k] act(W1[:k] x); for SwiGLU the gate and the up rows are cut together.
Under tensor parallelism each rank holds its neurons in canonical order dealt round-robin
(see tp_layout.py), so width k is the first k/p local neurons of every rank: prefix views only.

Shapes: x [s, b, h]; local fc1 weight [blocks * F/p, h] with blocks = 2 (gate; up) for SwiGLU.
"""

from __future__ import annotations

from typing import Callable, Optional

from megatron.core.transformer.mlp import MLP


class ElasticMLP(MLP):
    def __init__(self, config, submodules, *args, ffn_hidden_size=None, **kwargs):
        ffn_hidden_size = ffn_hidden_size or config.ffn_hidden_size
        super().__init__(config, submodules, *args, ffn_hidden_size=ffn_hidden_size, **kwargs)
        self.active_width: Optional[int] = None
        # input-adaptive routing (routers/token.py): a callable (mlp, hidden) -> (out, bias)
        # that replaces forward when set; a plain attribute, outside the module tree, so that
        # checkpoints of the model do not change
        self.token_routing: Optional[Callable] = None

    @property
    def full_width(self) -> int:
        return self.linear_fc2.input_size

    @property
    def tp_size(self) -> int:
        return self.linear_fc2.input_size // self.linear_fc2.input_size_per_partition

    def set_active_width(self, width: Optional[int]) -> None:
        """Use the first ``width`` neurons (global, canonical order); None or full: stock MLP."""
        self.active_width = set_mlp_width(self, width)

    def set_token_routing(self, routing: Optional[Callable]) -> None:
        """Route every token's width with ``routing(mlp, hidden)`` (None: the MLP as set)."""
        self.token_routing = routing

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        if self.token_routing is not None:
            return self.token_routing(self, hidden_states)
        if self.active_width is None:
            return super().forward(hidden_states, per_token_scale=per_token_scale, **kwargs)
        if per_token_scale is not None:
            raise NotImplementedError("per_token_scale (MoE experts) is not elastic")
        return sliced_forward(self, hidden_states)


def set_mlp_width(mlp: MLP, width: Optional[int]) -> Optional[int]:
    """Make megatron's ``mlp`` (elastic linears: an ElasticMLP, an expert, a shared expert) run
    its first ``width`` neurons; returns the active width, None for the full MLP. Megatron's own
    MLP.forward then runs the slice: fc1 yields [gate_k; up_k], which its GLU splits in two."""
    full = mlp.linear_fc2.input_size
    tp_size = full // mlp.linear_fc2.input_size_per_partition
    if width is None or width == full:
        mlp.linear_fc1.set_active_rows(None)
        mlp.linear_fc2.set_active_cols(None)
        return None
    if width <= 0 or width > full or width % tp_size:
        raise ValueError(
            f"MLP width {width} must be in (0, {full}] and divisible by TP size {tp_size}"
        )
    local = width // tp_size
    local_full = mlp.linear_fc2.input_size_per_partition
    rows = [slice(0, local)]
    if mlp.config.gated_linear_unit:
        rows.append(slice(local_full, local_full + local))  # the up rows follow the gates
    mlp.linear_fc1.set_active_rows(rows)
    mlp.linear_fc2.set_active_cols(slice(0, local))
    return width


def sliced_forward(mlp: MLP, hidden, per_token_scale=None):
    """megatron's unfused MLP forward on the active slice of ``mlp`` (elastic linears): fc1's
    pieces ([s, b, k/p] each: gate and up) feed the activation directly, never concatenated;
    ``per_token_scale`` (an expert's router weights) scales the activation as megatron's does."""
    pieces = mlp.linear_fc1.forward_pieces(hidden)
    act = mlp.config.activation_func
    if mlp.config.gated_linear_unit:
        gate, up = pieces
        intermediate = act(gate) * (up + mlp.config.glu_linear_offset)
    else:
        intermediate = act(pieces[0])
    if per_token_scale is not None:
        intermediate = (intermediate * per_token_scale.unsqueeze(-1)).to(intermediate.dtype)
    return mlp.linear_fc2(intermediate)
