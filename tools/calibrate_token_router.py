"""Calibrate a checkpoint's token routers so that token dispatch meets every trained budget.

  python tools/calibrate_token_router.py --load ckpt/elastic --data wiki:valid --seq-length 128

Routers trained on Gumbel samples can dispatch a mean MLP width off their budget (argmax vs
sample). This finds, per trained budget, the smallest price on width whose dispatched mean width
on the calibration text is at most the budget (within --tolerance below it), folds it into the
routers' budget bias and rewrites CKPT/token_router/ atomically (prices add up over repeated
calibrations and are recorded in token_router.json). Prints one JSON line per budget: the
dispatched mean width before and after, and the price. Runs under torchrun at any TP/PP
(--tensor-model-parallel-size, --pipeline-model-parallel-size): every rank finds the same prices,
rank 0 folds them into every layer's saved routers.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_flextron.cli import ArgumentParser, run_main  # noqa: E402


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--load", required=True, help="flextron checkpoint with token_router/")
    p.add_argument(
        "--data", default="wiki:valid", help="calibration text: wiki:SPLIT, .jsonl, text"
    )
    p.add_argument("--samples", type=int, default=32, help="calibration sequences")
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument(
        "--tolerance",
        type=float,
        default=0.01,
        help="stop once the width lies within this fraction below the budget",
    )
    args = p.parse_args(argv)
    if not 0 < args.tolerance < 1:
        p.error(f"--tolerance {args.tolerance} must lie in (0, 1)")
    return args


def _main(argv=None) -> int:
    args = parse_args(argv)
    from megatron.core import parallel_state

    from megatron_flextron.parallel import destroy_model_parallel, initialize_model_parallel

    owned = not parallel_state.model_parallel_is_initialized()  # else: called in-process
    try:
        if owned:
            initialize_model_parallel(
                args.tensor_model_parallel_size, args.pipeline_model_parallel_size
            )
        from megatron_flextron.routers.token_calibration import calibrate_checkpoint

        found = calibrate_checkpoint(
            args.load,
            args.data,
            args.samples,
            args.seq_length,
            args.micro_batch_size,
            args.tolerance,
            args.tensor_model_parallel_size,
            args.pipeline_model_parallel_size,
        )
    finally:
        if owned:
            destroy_model_parallel()
    if int(os.environ.get("RANK", "0")) == 0:
        for budget, result in found.items():
            print(json.dumps({"budget": float(budget), **result}))
    return 0


def main(argv=None) -> int:
    return run_main(lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
