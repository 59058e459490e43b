"""One-token products of the row-parallel layers of SmolLM2's sub-networks, their weights stored
row-major (as trained) against column-major (``serving_layout``), side by side in one run.

A sub-network reads a prefix of the MLP's fc2 input columns (its neurons) and a span of the
attention projection's input columns per KV group (its heads). Row-major, those columns are
strided rows of memory; column-major, contiguous. Per budget: the elastic layers' own code
(ElasticRowParallelLinear without grad, one token) over SmolLM2's 30 layers of random weights,
CPU time of one thread, the median of ``--rounds`` interleaved rounds, and a dense contiguous
weight of the sub-network's shape (what an exported model holds) for reference.

  OMP_NUM_THREADS=1 python benchmarks/serving_layout.py \\
      --output benchmarks/results/cpu_serving_layout.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from serving_python_calls import emit  # noqa: E402

LAYERS, HIDDEN, FFN, GROUPS, HEADS, HEAD_DIM = 30, 576, 1536, 3, 9, 64
BUDGETS = {1.0: (1536, 9), 0.75: (1152, 6), 0.5: (768, 6), 0.25: (384, 3)}  # mlp, heads


def row_parallel(in_features: int, config):
    from megatron_flextron.elastic.linear import ElasticRowParallelLinear

    return ElasticRowParallelLinear(in_features, HIDDEN, config=config, init_method=lambda w: w,
                                    bias=False, input_is_parallel=True, skip_bias_add=True)


def cpu_ms(layers, x, reps: int) -> float:
    """CPU ms of one pass of ``x`` through each of ``layers`` (modules or dense weights)."""
    def one_pass():
        return [F.linear(x, w) if isinstance(w, torch.Tensor) else w(x) for w in layers]

    one_pass()
    start = time.thread_time()
    for _ in range(reps):
        one_pass()
    return (time.thread_time() - start) / reps * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--output", help="write the results as JSON")
    args = p.parse_args(argv)
    from megatron_flextron.config import ModelConfig
    from megatron_flextron.elastic.layout import proj_col_index
    from megatron_flextron.elastic.linear import Blocks, serving_layout
    from megatron_flextron.parallel import initialize_model_parallel

    torch.set_num_threads(1)
    initialize_model_parallel(1, 1)
    config = ModelConfig("llama", num_layers=1, hidden_size=HIDDEN, ffn_hidden_size=FFN,
                         num_attention_heads=HEADS, num_query_groups=GROUPS,
                         kv_channels=HEAD_DIM, vocab_size=128,
                         max_position_embeddings=64).transformer_config()
    torch.manual_seed(0)
    layouts = {}
    for name in ("row-major", "column-major"):
        fc2 = torch.nn.ModuleList(row_parallel(FFN, config) for _ in range(LAYERS))
        proj = torch.nn.ModuleList(row_parallel(HEADS * HEAD_DIM, config) for _ in range(LAYERS))
        for m in (*fc2, *proj):
            torch.nn.init.normal_(m.weight, std=0.02)
            m.weight.requires_grad_(False)
        if name == "column-major":
            serving_layout(fc2)
            serving_layout(proj)
        layouts[name] = (fc2, proj)
    rows, n = [], HEADS // GROUPS
    for budget, (width, heads) in BUDGETS.items():
        kept = heads // GROUPS
        for fc2, proj in layouts.values():
            for m in fc2:
                m.set_active_cols(None if width == FFN else slice(0, width))
            for m in proj:
                m.set_active_cols(None if kept == n else proj_col_index(GROUPS, n, HEAD_DIM, kept),
                                  None if kept == n else Blocks(GROUPS, n * HEAD_DIM,
                                                                ((0, kept * HEAD_DIM),)))
        x_mlp, x_att = torch.randn(1, 1, width), torch.randn(1, 1, heads * HEAD_DIM)
        dense_fc2 = [torch.randn(HIDDEN, width) for _ in range(LAYERS)]
        dense_proj = [torch.randn(HIDDEN, heads * HEAD_DIM) for _ in range(LAYERS)]
        times = {k: [] for k in ("fc2 row-major", "fc2 column-major", "fc2 dense",
                                 "proj row-major", "proj column-major", "proj dense")}
        with torch.no_grad():
            for _ in range(args.rounds):
                for name, (fc2, proj) in layouts.items():
                    times[f"fc2 {name}"].append(cpu_ms(fc2, x_mlp, args.reps))
                    times[f"proj {name}"].append(cpu_ms(proj, x_att, args.reps))
                times["fc2 dense"].append(cpu_ms(dense_fc2, x_mlp, args.reps))
                times["proj dense"].append(cpu_ms(dense_proj, x_att, args.reps))
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"budget": budget, "mlp": width, "heads": heads,
                     **{f"{k} ms": round(v, 3) for k, v in med.items()},
                     "fc2 row / column": round(med["fc2 row-major"] / med["fc2 column-major"], 2),
                     "proj row / column": round(med["proj row-major"]
                                                / med["proj column-major"], 2)})
    result = {"command": " ".join(["python benchmarks/serving_layout.py",
                                   *(argv or sys.argv[1:])]),
              "what": f"{LAYERS} layers, one token, ms of one thread's CPU time per pass",
              "rows": rows, "load_average": round(os.getloadavg()[0], 1)}
    return emit(result, args.output)


if __name__ == "__main__":
    sys.exit(main())
