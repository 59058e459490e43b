"""Measure the latency lookup table of a flextron checkpoint's architecture on this machine.

  python tools/measure_latency.py --load ckpt/smollm2 --micro-batch-size 1 --seq-length 512 \\
      --output ckpt/smollm2/latency_cpu.json

Times the MLP at each width choice and attention at each head-count choice (one layer, forward,
median of --repeats), plus the parts outside the layers; GPU when present, else CPU. Writes the
table as JSON (atomically) and prints it with a check: predicted vs measured whole-model time for
the full model and the smallest homogeneous sub-network. Weights do not matter (random).
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_flextron.cli import ArgumentParser, check_output, run_main  # noqa: E402


def _main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--load", required=True, help="flextron checkpoint (its config is used)")
    p.add_argument("--output", required=True, help="JSON file to write")
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--bf16", action="store_true", help="time bfloat16 (default float32)")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    check_output(args.output, "--output", folder=False)
    from megatron_flextron.checkpoint.io import write_json
    from megatron_flextron.checkpoint.load import read_model_configs
    from megatron_flextron.parallel import destroy_model_parallel, initialize_model_parallel
    from megatron_flextron.routers.latency import measure_latency

    try:
        _, model, elastic = read_model_configs(args.load)
        initialize_model_parallel(1, 1)
        result = measure_latency(
            model,
            elastic,
            args.micro_batch_size,
            args.seq_length,
            torch.bfloat16 if args.bf16 else torch.float32,
            args.repeats,
        )
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        write_json(args.output, result["table"].to_dict())
    finally:
        destroy_model_parallel()
    print(json.dumps({"output": args.output, **result["table"].to_dict()}))
    for row in result["check"]:
        print(json.dumps(row))
    return 0


def main(argv=None) -> int:
    return run_main(lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
