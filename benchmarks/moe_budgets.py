"""Which MoE sub-network a budget maps to (routers/sampling.py ``budget_subnetwork``), for a
Qwen3-30B-A3B-shaped model (48 layers, hidden 2048, 32 query heads in 4 KV groups, 128 experts of
768 neurons, top-8, vocab 151,936): parameter counts only, no weights, seconds on a CPU.

  python benchmarks/moe_budgets.py
"""

from __future__ import annotations

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_flextron.config import ElasticConfig, ModelConfig  # noqa: E402
from megatron_flextron.elastic import Subnetwork, count_parameters  # noqa: E402
from megatron_flextron.routers.sampling import budget_subnetwork  # noqa: E402

QWEN3_30B_A3B = dict(
    num_layers=48,
    hidden_size=2048,
    ffn_hidden_size=6144,
    num_attention_heads=32,
    num_query_groups=4,
    kv_channels=128,
    vocab_size=151936,
    max_position_embeddings=4096,
    qk_layernorm=True,
    tie_embeddings=False,
    num_moe_experts=128,
    moe_ffn_hidden_size=768,
    moe_router_topk=8,
)


def main():
    m = ModelConfig("llama", **QWEN3_30B_A3B)
    full = count_parameters(Subnetwork.full(m), m)
    print(f"full: {full['active'] / 1e9:.2f}B active, {full['total'] / 1e9:.2f}B total")
    print("| --budget-type | budget | experts | moe_ffn | topk | heads | active | total |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for kind in ("active", "total"):
        elastic = dataclasses.replace(ElasticConfig.from_ratios(m), budget_type=kind)
        for budget in (1.0, 0.75, 0.5, 0.35):
            subnet = budget_subnetwork(budget, m, elastic)
            counts = count_parameters(subnet, m)
            experts, width, topk = subnet.moe[0]
            cells = [kind, budget, experts, width, topk, subnet.heads[0]]
            cells += [
                f"{counts[k] / 1e9:.2f}B ({counts[k] / full[k]:.3f})" for k in ("active", "total")
            ]
            print("| " + " | ".join(map(str, cells)) + " |")


if __name__ == "__main__":
    main()
