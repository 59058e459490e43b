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

from moe_models import qwen3_30b_a3b  # noqa: E402

from megatron_flextron.config import ElasticConfig  # noqa: E402
from megatron_flextron.elastic import Subnetwork, count_parameters  # noqa: E402
from megatron_flextron.routers.sampling import budget_subnetwork  # noqa: E402


def main():
    m = qwen3_30b_a3b()
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
