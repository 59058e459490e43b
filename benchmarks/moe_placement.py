"""Work per expert-parallel rank of ranked-prefix MoE sub-networks: contiguous vs balanced.

Under EP the ranks wait for one another in the dispatcher's collectives, so a step's expert
time is that of the busiest rank: max/mean of the tokens each rank's experts compute is the
slowdown against perfect balance (1.0), and max/mean of the experts a rank runs the same for
its weight reads. The experts are ranked as ``--calibration-data`` ranks them by frequency (most
used first, the permutation ``permute_moe_state`` applies), on one batch; the counts are taken
on another. Which tokens reach which ranked expert does not depend on the placement (EP=2
balanced equals one process: tests/test_moe_parallel.py; each rank's token count is that of
its experts in one process: tests/test_expert_placement.py), so one process counts the tokens
per ranked expert and ``load_per_rank`` sums them per rank for each EP size and placement.
A CPU timing of EP on gloo would mostly time the shared machine; none is reported.

  python benchmarks/moe_placement.py --json benchmarks/results/cpu_moe_placement.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_models import TINY_MOE  # noqa: E402  (this script's folder)

from megatron_flextron.config import ElasticConfig, ModelConfig  # noqa: E402
from megatron_flextron.elastic import set_subnetwork  # noqa: E402
from megatron_flextron.elastic.expert_placement import load_per_rank  # noqa: E402
from megatron_flextron.elastic.hybrid import build_hybrid_model  # noqa: E402
from megatron_flextron.elastic.tp_layout import (  # noqa: E402
    gather_canonical,
    load_canonical_state_dict,
)
from megatron_flextron.importance.expert_permute import order_by, permute_moe_state  # noqa: E402
from megatron_flextron.importance.experts import moe_layers  # noqa: E402
from megatron_flextron.parallel import initialize_model_parallel  # noqa: E402

# moe_models.TINY_MOE with 16 narrower experts (a prefix of 4 is then 1 expert per EP=4 rank)
MODEL = {**TINY_MOE, "num_moe_experts": 16, "moe_ffn_hidden_size": 128}
BATCH, SEQ = 8, 256
KEPT = (16, 12, 8, 6, 4)
EP_SIZES = (2, 4)


def routed_tokens(model, m: ModelConfig, tokens: torch.Tensor, kept: int) -> list:
    """Tokens each expert of every MoE layer computes for ``kept`` ranked experts (one
    process: slot = ranked index), [layers][E]."""
    choices = ElasticConfig(head_choices=(m.num_attention_heads,), expert_choices=KEPT)
    set_subnetwork(model, {"experts": kept}, m, choices)
    counts = []
    hooks = [
        layer.experts.register_forward_pre_hook(lambda mod, args: counts.append(args[1].tolist()))
        for _, layer in moe_layers(model)
    ]
    with torch.inference_mode():
        model(tokens, torch.arange(tokens.size(1)).expand_as(tokens), None)
    for hook in hooks:
        hook.remove()
    return counts


def ranked_model(m: ModelConfig, router_scale: float):
    """The elastic model with random weights, routers scaled (uneven, decisive routing, as a
    trained router's), its experts ranked by routed frequency on a calibration batch."""
    torch.manual_seed(0)
    model = build_hybrid_model(m, m.transformer_config(), elastic=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("router.weight"):
                p.mul_(router_scale)
    calibration = torch.randint(0, m.vocab_size, (BATCH, SEQ))
    orders = [order_by(torch.tensor(c, dtype=torch.float64)) for c in
              routed_tokens(model, m, calibration, m.num_moe_experts)]  # fmt: skip
    state = permute_moe_state(gather_canonical(model, m), m, expert_orders=orders)
    load_canonical_state_dict(model, dict(state), m)
    return model


def ratio(values) -> float:
    return round(max(values) / (sum(values) / len(values)), 3)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--router-scale", type=float, default=50.0)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    initialize_model_parallel(1, 1, seed=0)
    m = ModelConfig("llama", **MODEL)
    model = ranked_model(m, args.router_scale)
    tokens = torch.randint(0, m.vocab_size, (BATCH, SEQ))  # held out from the ranking batch
    rows = []
    print("| experts kept | EP | tokens max/mean: contiguous | balanced "
          "| experts max/mean: contiguous | balanced |")  # fmt: skip
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for kept in KEPT:
        counts = routed_tokens(model, m, tokens, kept)
        for ep in EP_SIZES:
            row = {"experts": kept, "ep": ep}
            for placement in ("contiguous", "balanced"):
                per_layer = [load_per_rank(placement, c, ep) for c in counts]
                run = [load_per_rank(placement, [int(x > 0) for x in c], ep) for c in counts]
                row[placement] = {
                    "tokens_per_rank": per_layer,
                    "tokens_max_mean": max(ratio(r) for r in per_layer),
                    "experts_per_rank": run,
                    "experts_max_mean": max(ratio(r) for r in run),
                }
            rows.append(row)
            c, b = row["contiguous"], row["balanced"]
            print(f"| {kept} of {m.num_moe_experts} | {ep} | {c['tokens_max_mean']} | "
                  f"**{b['tokens_max_mean']}** | {c['experts_max_mean']} | "
                  f"{b['experts_max_mean']} |")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": MODEL, "batch": [BATCH, SEQ], "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
