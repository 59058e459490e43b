"""Train Flextron's static router on a flextron checkpoint and store it there (router/).

  python tools/train_router.py --load ckpt/elastic --router-budgets 1.0 0.75 0.5 0.35 \\
      --cost-metric params
  python tools/train_router.py --load ckpt/elastic --cost-metric latency \\
      --latency-table ckpt/elastic/latency_cpu.json

Phase 1 measures the frozen LLM's loss of --num-architectures sampled architectures on
calibration text and fits the surrogate (held-out error reported); phase 2 trains the router on
surrogate + budget loss, refused when the surrogate's held-out relative error is above
--max-surrogate-error. Prints, per budget, the chosen per-layer architecture, its cost ratio
(exact, and the router's expected one) and its measured loss. On a mixture of experts the
router picks experts, expert width and top-k per layer (beside heads), with the params cost
counting the checkpoint's --budget-type (active or total parameters; docs/moe.md).
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_flextron.cli import ArgumentParser, run_main  # noqa: E402


def _main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--load", required=True, help="flextron checkpoint; the router goes inside")
    p.add_argument("--router-budgets", nargs="+", type=float, default=[1.0, 0.75, 0.5, 0.35])
    p.add_argument(
        "--cost-metric", default="params", choices=["params", "flops", "kv_cache", "latency"]
    )
    p.add_argument("--latency-table", help="JSON from tools/measure_latency.py (latency metric)")
    p.add_argument("--cost-seq-length", type=int, default=2048, help="for the flops metric")
    p.add_argument("--calibration-data", default="wiki:valid", help="wiki:SPLIT, .jsonl or text")
    p.add_argument("--num-architectures", type=int, default=96)
    p.add_argument("--calibration-samples", type=int, default=8)
    p.add_argument("--calibration-seq-length", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--surrogate-steps", type=int, default=2000)
    p.add_argument("--router-steps", type=int, default=500)
    p.add_argument("--budget-tolerance", type=float, default=0.02)
    p.add_argument("--max-surrogate-error", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--router-layer-skipping",
        action="store_true",
        help="the router also chooses which layers to skip (phase 1 then samples skipping too)",
    )
    args = p.parse_args(argv)
    from megatron_flextron.parallel import destroy_model_parallel, initialize_model_parallel
    from megatron_flextron.routers.training import RouterPipeline, train_router_for_checkpoint

    try:
        initialize_model_parallel(1, 1, args.seed)
        pipeline = RouterPipeline(
            budgets=args.router_budgets,
            metric=args.cost_metric,
            latency_table=args.latency_table,
            cost_seq_length=args.cost_seq_length,
            data=args.calibration_data,
            num_architectures=args.num_architectures,
            samples=args.calibration_samples,
            seq_length=args.calibration_seq_length,
            micro_batch_size=args.micro_batch_size,
            surrogate_steps=args.surrogate_steps,
            router_steps=args.router_steps,
            tolerance=args.budget_tolerance,
            max_surrogate_error=args.max_surrogate_error,
            seed=args.seed,
            layer_skipping=args.router_layer_skipping,
        )
        report = train_router_for_checkpoint(
            args.load, pipeline, log=lambda text: print(text, file=sys.stderr, flush=True)
        )
    finally:
        destroy_model_parallel()
    print(json.dumps(report["surrogate"]))
    for row in report["budgets"]:
        print(json.dumps(row))
    return 0


def main(argv=None) -> int:
    return run_main(lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
