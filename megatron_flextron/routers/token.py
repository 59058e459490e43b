"""Input-adaptive routing: each token picks its MLP width (Flextron's token router).

The MLP widths are nested experts: width k uses the first k neurons. A per-layer ``TokenRouter``
(a linear map of the token's hidden state, plus a learned bias per trained budget) gives logits
over the width choices.

- Inference (``dispatch``): like MoE dispatch over nested experts, tokens are sorted by their
  argmax width; since widths are nested, the neurons between two consecutive widths (a "slab")
  serve a prefix of the sorted tokens, so each slab of the weights is read once and every token
  costs exactly its width's FLOPs; outputs are scattered back in token order.
- Training (``soft`` / ``hard``): sum_c p_c MLP_c(x) = W2 (m * act(W1 x)) with neuron mask
  m_j = sum of p_c over the choices that keep neuron j, one full-width pass whose gradient reaches
  the router; ``hard`` uses straight-through Gumbel-softmax one-hots (forward = the chosen width).
  An auxiliary loss |E[width]/full / budget - 1| beyond a tolerance is attached to the output the
  way megatron's MoE attaches its load-balancing loss (MoEAuxLossAutoScaler).

Routers are replicated over TP ranks (the hidden states are), so every rank routes identically and
the collectives inside the elastic linears stay matched; in training their LM gradient is summed
over the TP ranks (each masks only its own neurons) and the budget loss counted once, so every
rank holds the same router gradient as a single process. The routers live outside the GPT module
tree: model checkpoints are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from megatron_flextron.elastic.blocks import transformer_blocks
from megatron_flextron.elastic.mlp import ElasticMLP
from megatron_flextron.elastic.soft_architecture import mlp_keep_matrix
from megatron_flextron.elastic.state import clear_token_routing
from megatron_flextron.elastic.subnetwork import unwrap_model
from megatron_flextron.routers.static import seeded_gumbel_softmax


class TokenRouter(torch.nn.Module):
    def __init__(self, hidden_size: int, num_choices: int, num_budgets: int = 1):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, num_choices)
        self.budget_bias = torch.nn.Parameter(torch.zeros(num_budgets, num_choices))

    def forward(self, hidden: torch.Tensor, budget_code: Optional[torch.Tensor] = None):
        logits = self.linear(hidden.float())
        if budget_code is not None:
            logits = logits + budget_code.to(logits) @ self.budget_bias
        return logits


@dataclass
class TokenRouting:
    """The routing of one ElasticMLP: its router, widths (largest first) and mode."""

    router: TokenRouter
    widths: Sequence[int]
    mode: str = "dispatch"  # dispatch | soft | hard
    temperature: float = 1.0
    budget: float = 1.0
    budget_code: Optional[torch.Tensor] = None
    aux_loss_coeff: float = 0.0
    tolerance: float = 0.02
    noise_seed: Optional[int] = None  # hard mode: seeded Gumbel noise (same on every TP rank)
    # filled by every forward: mean width fraction, and the per-token widths (dispatch)
    stats: dict = field(default_factory=dict)
    # accumulated over dispatch calls: [sum of width fractions, tokens]
    totals: list = field(default_factory=lambda: [0.0, 0])

    def __call__(self, mlp: ElasticMLP, hidden: torch.Tensor):
        logits = self.router(hidden, self.budget_code)
        if self.mode == "dispatch":
            return self._dispatch(mlp, hidden, logits.argmax(-1))
        if self.mode == "soft":
            probs = logits.softmax(-1)
        elif self.noise_seed is not None:
            generator = torch.Generator(device=logits.device).manual_seed(self.noise_seed)
            probs = seeded_gumbel_softmax(logits, self.temperature, generator)
        else:
            probs = F.gumbel_softmax(logits, tau=self.temperature, hard=True)
        return self._mixture(mlp, hidden, probs)

    def _fractions(self, mlp: ElasticMLP) -> torch.Tensor:
        return torch.tensor([w / mlp.full_width for w in self.widths])

    def _dispatch(self, mlp: ElasticMLP, hidden: torch.Tensor, choice: torch.Tensor):
        """Nested-slab dispatch: sort tokens by width (widest first); neuron slab
        [w_{i+1}, w_i) then serves exactly the first n_i sorted tokens (those at least that
        wide), so each slab of W1/W2 is read once and every token gets exactly its width's
        FLOPs. Outputs are summed over slabs (then over TP ranks) and unsorted."""
        if mlp.config.sequence_parallel:
            raise NotImplementedError("token dispatch with sequence parallelism")
        s, b, h = hidden.shape
        tp, local_full = mlp.tp_size, mlp.linear_fc2.input_size_per_partition
        flat, choice = hidden.reshape(s * b, h), choice.reshape(s * b)
        widths = torch.tensor(self.widths, device=choice.device)[choice]
        order = torch.argsort(widths, descending=True, stable=True)
        x = copy_to_tensor_model_parallel_region(flat.index_select(0, order))
        # one host sync for all counts (tokens at least w wide) and the width sum
        *counts, width_sum = torch.stack(
            [(widths >= w).sum() for w in self.widths] + [widths.sum()]
        ).tolist()
        w1, b1 = mlp.linear_fc1.weight, mlp.linear_fc1.bias
        w2 = mlp.linear_fc2.weight
        gated, act = mlp.config.gated_linear_unit, mlp.config.activation_func
        offset = mlp.config.glu_linear_offset if gated else 0.0
        out = None
        start = 0
        for width, n in sorted(zip(self.widths, counts)):  # narrowest slab first: all tokens
            end = width // tp
            if n == 0 or end == start:
                start = end
                continue
            xs = x[:n]
            rows = slice(start, end)
            pre = F.linear(xs, w1[rows], None if b1 is None else b1[rows])
            if gated:
                up_rows = slice(local_full + start, local_full + end)
                up = F.linear(xs, w1[up_rows], None if b1 is None else b1[up_rows])
                inter = act(pre) * (up + offset if offset else up)
            else:
                inter = act(pre)
            if out is None and n == s * b:  # the narrowest slab serves every token: it
                out = F.linear(inter, w2[:, rows])  # writes the output, no zero-fill
            else:  # wider slabs accumulate into their tokens' prefix inside the GEMM
                out = x.new_zeros(s * b, h) if out is None else out
                out[:n].addmm_(inter, w2[:, rows].t())
            start = end
        if out is None:
            out = x.new_zeros(s * b, h)
        out = reduce_from_tensor_model_parallel_region(out)
        out = torch.empty_like(out).index_copy_(0, order, out)
        bias = mlp.linear_fc2.bias
        if bias is not None and not mlp.linear_fc2.skip_bias_add:
            out, bias = out + bias, None
        fraction = width_sum / mlp.full_width
        self.stats = {"mean_width_fraction": fraction / widths.numel()}
        self.stats["token_widths"] = widths.view(s, b)
        self.totals[0] += fraction
        self.totals[1] += widths.numel()
        return out.view(s, b, h), bias

    def _mixture(self, mlp: ElasticMLP, hidden: torch.Tensor, probs: torch.Tensor):
        """sum_c p_c MLP_c(x): megatron's full-width MLP with a per-token neuron mask on the
        input of linear_fc2 (the soft-architecture mechanism, per token)."""
        # each TP rank masks its own neurons, so the LM gradient of the (replicated) router is a
        # sum over ranks: copy_to_..._region is the identity forward and that all-reduce backward
        shared = copy_to_tensor_model_parallel_region(probs)
        mask = shared @ mlp_keep_matrix(mlp, self.widths).to(probs)  # [s, b, local neurons]
        mlp.linear_fc2.set_input_scale(mask)
        try:
            out, bias = MLP.forward(mlp, hidden)
        finally:
            mlp.linear_fc2.set_input_scale(None)
        fraction = (probs @ self._fractions(mlp).to(probs)).mean()
        self.stats = {"mean_width_fraction": float(fraction)}
        if self.aux_loss_coeff and out.requires_grad:
            aux = torch.relu((fraction / self.budget - 1).abs() - self.tolerance)
            self.stats["aux_loss"] = float(aux)
            out = MoEAuxLossAutoScaler.apply(out, self.aux_loss_coeff * aux)
        return out, bias


def enable_token_routing(
    model: torch.nn.Module,
    widths: Sequence[int],
    routers: Optional[Union[Sequence[TokenRouter], Mapping[int, TokenRouter]]] = None,
    **settings,
) -> List[TokenRouting]:
    """Give every local ElasticMLP a router: new ones, or ``routers`` indexed by global layer
    (0-based; a list of all layers' routers, or a mapping that covers this stage's layers), so a
    pipeline stage picks its own layers' routers."""
    gpt = unwrap_model(model)
    widths = sorted(widths, reverse=True)
    routings = []
    for layer in transformer_blocks(gpt):
        mlp = layer.mlp
        router = (
            routers[layer.layer_number - 1]
            if routers is not None
            else TokenRouter(mlp.config.hidden_size, len(widths))
        )
        for w in widths:
            if w % mlp.tp_size or not 0 < w <= mlp.full_width:
                raise ValueError(f"token-routed width {w} does not fit the MLP (TP {mlp.tp_size})")
        routing = TokenRouting(router.to(next(mlp.parameters()).device), widths, **settings)
        mlp.set_token_routing(routing)
        routings.append(routing)
    return routings


def disable_token_routing(model: torch.nn.Module) -> None:
    """Every MLP back to its set width (elastic.state.clear_token_routing)."""
    clear_token_routing(model)


def mlp_flops_per_token(mlp_hidden: int, width: int, gated: bool) -> int:
    """Forward FLOPs of one token through an MLP of ``width`` neurons (2 per multiply-add)."""
    return 2 * (3 if gated else 2) * mlp_hidden * width
