"""What a sub-network costs, as a differentiable function of router probabilities.

A router gives, for every layer, probabilities over the MLP width choices and over the head-count
choices, and with layer skipping the probability that the layer runs. Every cost here is the
expectation over the choices:

    cost = outside + sum_l keep[l] x (layer + p_mlp[l] . c_mlp + p_heads[l] . c_heads)

(keep = 1 without layer skipping), so a one-hot choice gives the exact cost of that architecture
and gradients reach the router. A mixture of experts replaces the MLP term by its layer's
expected parameters: the router, the shared expert (linear in the width) and the experts,
E[count] x E[parameters per expert] (the axes are independent per layer, so this is the
expectation of the product); count is the expert count for ``total`` parameters and top-k for
``active`` ones (``ElasticConfig.budget_type``).
Metrics: ``params`` (parameter count), ``flops`` (forward FLOPs per token at a sequence length:
2 x multiply-adds of every matmul incl. the output layer, plus causal attention scores),
``kv_cache`` (bytes per token of the KV cache: constant under GQA, whose KV groups are all kept),
and ``latency`` (a table measured on the hardware by tools/measure_latency.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from megatron_flextron.config import ElasticConfig, ModelConfig
from megatron_flextron.elastic.layout import ParameterUnits, moe_parameters

METRICS = ("params", "flops", "kv_cache", "latency")


def router_choices(model: ModelConfig, elastic: ElasticConfig) -> Tuple[list, list]:
    """The choices a router picks from, largest first (the full size always among them); a
    mixture of experts has no MLP width axis: its one dense width (see ``moe_router_choices``)."""
    mlp, heads = elastic.choices_with_full(model)
    return ([model.ffn_hidden_size] if model.is_moe else mlp), heads


def moe_router_choices(model: ModelConfig, elastic: ElasticConfig) -> Optional[list]:
    """[expert counts, expert widths, top-k] a router picks from (largest first), or None for a
    dense model."""
    return [list(c) for c in elastic.moe_choices_with_full(model)] if model.is_moe else None


class MoECost:
    """The expected cost of a mixture-of-experts layer from its choice probabilities (params:
    ``total`` or ``active`` parameters, exactly ``layout.moe_parameters`` at a one-hot; the
    kv_cache metric: zero, experts hold no cache)."""

    def __init__(self, model: ModelConfig, elastic: ElasticConfig, count: Optional[str]):
        experts, widths, topks = moe_router_choices(model, elastic)
        self.count = count
        scale = 0.0 if count is None else 1.0

        def t(xs):
            return torch.tensor([float(x) * scale for x in xs], dtype=torch.float64)

        # moe_parameters is affine in the expert count (router rows) and in the width (shared
        # expert) at one expert of top-1: take its pieces from there
        one = {w: moe_parameters(model, 1, w, 1)[0] for w in widths}
        per_expert = {w: one[w] - moe_parameters(model, 1, w, 0)[1] for w in widths}
        router = (
            moe_parameters(model, 2, widths[0], 0)[1] - moe_parameters(model, 1, widths[0], 0)[1]
        )
        fixed_w = [one[w] - per_expert[w] - router for w in widths]  # shared expert + norm
        self.c_router = t([router * e for e in experts])
        self.c_width = t(fixed_w)
        self.c_expert = t([per_expert[w] for w in widths])
        self.counts = torch.tensor(
            [float(c) for c in (topks if count == "active" else experts)], dtype=torch.float64
        )

    def __call__(self, p_experts, p_width, p_topk) -> torch.Tensor:
        """[L]: each layer's expected cost."""
        if p_experts is None or p_width is None or p_topk is None:
            raise ValueError(
                "a mixture of experts' cost needs its experts, moe_ffn and topk probabilities"
            )
        p_count = p_topk if self.count == "active" else p_experts
        c = {k: v.to(p_width) for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
        return (
            p_experts @ c["c_router"]
            + p_width @ c["c_width"]
            + (p_count @ c["counts"]) * (p_width @ c["c_expert"])
        )

    def full(self) -> float:
        return float(self.c_router[0] + self.c_width[0] + self.counts[0] * self.c_expert[0])


@dataclass
class LatencyTable:
    """Per-layer forward latency (ms) of the MLP at each width and of attention at each head
    count, plus everything outside the layers (embedding, final norm, output layer)."""

    mlp_ms: dict  # width -> ms
    attention_ms: dict  # heads -> ms
    other_ms: float
    layer_other_ms: float = 0.0  # per layer, outside MLP and attention (norms, residuals)
    device: str = ""
    dtype: str = ""
    micro_batch_size: int = 1
    seq_length: int = 1

    @classmethod
    def load(cls, path: str) -> "LatencyTable":
        with open(path) as f:
            data = json.load(f)
        try:
            return cls(
                mlp_ms={int(k): float(v) for k, v in data["mlp_ms"].items()},
                attention_ms={int(k): float(v) for k, v in data["attention_ms"].items()},
                other_ms=float(data["other_ms"]),
                layer_other_ms=float(data.get("layer_other_ms", 0.0)),
                device=data.get("device", ""),
                dtype=data.get("dtype", ""),
                micro_batch_size=int(data.get("micro_batch_size", 1)),
                seq_length=int(data.get("seq_length", 1)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path} is not a latency table: {e}") from None

    def to_dict(self) -> dict:
        return {
            "device": self.device,
            "dtype": self.dtype,
            "micro_batch_size": self.micro_batch_size,
            "seq_length": self.seq_length,
            "mlp_ms": {str(k): v for k, v in self.mlp_ms.items()},
            "attention_ms": {str(k): v for k, v in self.attention_ms.items()},
            "other_ms": self.other_ms,
            "layer_other_ms": self.layer_other_ms,
        }


class CostModel:
    """cost(p_mlp [L, n_mlp], p_heads [L, n_heads]) for one metric; ``ratio`` divides by the
    full model's cost (a budget is such a ratio)."""

    def __init__(
        self,
        model: ModelConfig,
        elastic: ElasticConfig,
        metric: str = "params",
        seq_length: int = 2048,
        latency: Optional[LatencyTable] = None,
        kv_bytes: int = 2,
    ):
        if metric not in METRICS:
            raise ValueError(f"unknown cost metric {metric!r}; expected one of {METRICS}")
        self.model, self.metric, self.latency = model, metric, latency
        self.mlp_choices, self.head_choices = router_choices(model, elastic)
        self.moe_choices = moe_router_choices(model, elastic)
        self.moe = None
        if model.is_moe:
            if metric not in ("params", "kv_cache"):
                raise ValueError(
                    f"the {metric} cost is not built for mixtures of experts (its FLOP counts "
                    "and latency tables cover dense MLP widths): use params (counting "
                    "--budget-type active or total parameters) or kv_cache"
                )
            self.moe = MoECost(model, elastic, elastic.budget_type if metric == "params" else None)
        m = model
        h, d, g = m.hidden_size, m.kv_channels, m.num_query_groups
        blocks = 2 if m.gated else 1
        embed = m.vocab_size * h
        if metric == "params":  # per MLP neuron / per query head / per layer constant
            units = ParameterUnits.of(m)
            layer_const, outside = units.per_layer, units.outside
            c_mlp = [units.per_neuron * k for k in self.mlp_choices]
            if m.is_moe:  # the MoE layer's parameters replace the MLP's (MoECost)
                layer_const, c_mlp = units.per_attention, [0.0]
            c_head = [units.per_head * n for n in self.head_choices]
        elif metric == "flops":
            attention = 2 * 2 * (seq_length / 2) * d  # causal QK^T and AV, per head per token
            layer_const = 2 * (2 * g * d * h if m.is_gqa else 0)
            outside = 2 * embed
            c_mlp = [2 * (blocks * h + h) * k for k in self.mlp_choices]
            head_macs = 2 * d * h + (0 if m.is_gqa else 2 * d * h)
            c_head = [(2 * head_macs + attention) * n for n in self.head_choices]
        elif metric == "kv_cache":
            layer_const = 2 * g * d * kv_bytes if m.is_gqa else 0
            outside = 0.0
            c_mlp = [0.0] * len(self.mlp_choices)
            c_head = [0.0 if m.is_gqa else 2 * d * kv_bytes * n for n in self.head_choices]
        else:
            if latency is None:
                raise ValueError("the latency metric needs a latency table (--latency-table)")
            missing = [k for k in self.mlp_choices if k not in latency.mlp_ms] + [
                n for n in self.head_choices if n not in latency.attention_ms
            ]
            if missing:
                raise ValueError(f"the latency table has no entry for choices {missing}")
            layer_const, outside = latency.layer_other_ms, latency.other_ms
            c_mlp = [latency.mlp_ms[k] for k in self.mlp_choices]
            c_head = [latency.attention_ms[n] for n in self.head_choices]
        self.c_mlp = torch.tensor(c_mlp, dtype=torch.float64)
        self.c_head = torch.tensor(c_head, dtype=torch.float64)
        self.outside, self.layer_const = float(outside), float(layer_const)

    def __call__(
        self,
        p_mlp: Optional[torch.Tensor],
        p_heads: torch.Tensor,
        p_keep: Optional[torch.Tensor] = None,
        p_experts: Optional[torch.Tensor] = None,
        p_moe_ffn: Optional[torch.Tensor] = None,
        p_topk: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The arguments in the order of ``routers.static.Choices`` (``cost(*choices)``)."""
        if self.moe is None:
            mlp = p_mlp @ self.c_mlp.to(p_mlp)
        else:
            mlp = self.moe(p_experts, p_moe_ffn, p_topk)
        per_layer = self.layer_const + mlp + p_heads @ self.c_head.to(p_heads)  # [L]
        if p_keep is not None:
            per_layer = p_keep.to(per_layer) * per_layer
        return self.outside + per_layer.sum()

    def full(self) -> float:
        n = self.model.num_layers
        mlp = float(self.c_mlp[0]) if self.moe is None else self.moe.full()
        return self.outside + n * (self.layer_const + mlp + float(self.c_head[0]))

    def ratio(self, *choices) -> torch.Tensor:
        """cost(*choices) / the full model's cost."""
        return self(*choices) / self.full()

    def of_subnetwork(
        self,
        mlp: Sequence[int],
        heads: Sequence[int],
        layers: Optional[Sequence[int]] = None,
        moe: Optional[Sequence[Tuple[int, int, int]]] = None,
    ) -> float:
        """Exact cost of a per-layer architecture (``layers``: the kept ones; default all;
        ``moe``: (experts, expert width, top-k) per layer, as ``Subnetwork.moe``)."""
        p_keep = None
        if layers is not None:
            p_keep = torch.zeros(len(heads), dtype=torch.float64)
            p_keep[list(layers)] = 1
        p_heads = one_hot(heads, self.head_choices)
        if self.moe is None:
            return float(self(one_hot(mlp, self.mlp_choices), p_heads, p_keep))
        if moe is None:
            raise ValueError("a mixture of experts' cost needs its (experts, moe_ffn, topk)")
        axes = [one_hot(values, c) for values, c in zip(zip(*moe), self.moe_choices)]
        return float(self(None, p_heads, p_keep, *axes))

    def of(self, subnet) -> float:
        """Exact cost of a ``Subnetwork``."""
        return self.of_subnetwork(subnet.mlp, subnet.heads, subnet.layers, subnet.moe)


def one_hot(values: Sequence[int], choices: Sequence[int]) -> torch.Tensor:
    """[len(values), len(choices)] float64 one-hot of each value among the choices."""
    out = torch.zeros(len(values), len(choices), dtype=torch.float64)
    for row, value in enumerate(values):
        out[row, list(choices).index(value)] = 1
    return out


def budget_loss(cost_ratio: torch.Tensor, budget: float, tolerance: float = 0.02) -> torch.Tensor:
    """|cost / target - 1| beyond a dead zone of ``tolerance``: no push once within it."""
    return torch.relu((cost_ratio / budget - 1).abs() - tolerance)


def check_budget(budget: float) -> None:
    """A budget is a cost ratio in (0, 1]: the one rule every budget passes."""
    if not isinstance(budget, (int, float)) or math.isnan(budget) or not 0 < budget <= 1:
        raise ValueError(f"budget {budget!r} must lie in (0, 1]")


def check_budget_list(budgets: Sequence[float], name: str = "budgets") -> None:
    """At least one budget, each valid, distinct and sorted descending (``name``: the flag or
    setting they came from, for the message)."""
    if not budgets:
        raise ValueError(f"{name} is empty: give at least one budget")
    for b in budgets:
        check_budget(b)
    if list(budgets) != sorted(set(budgets), reverse=True):
        raise ValueError(f"{name} {list(budgets)} must be distinct and sorted descending")
