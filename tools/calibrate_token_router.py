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

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_flextron.checkpoint.state import CheckpointError  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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


def calibrate(args) -> dict:
    """Collective (every rank of a torchrun launch); rank 0 rewrites CKPT/token_router/."""
    import torch

    from megatron_flextron.config import ModelConfig
    from megatron_flextron.checkpoint.flextron import load_flextron_into_model, read_config
    from megatron_flextron.data.corpus import checkpoint_sequences
    from megatron_flextron.elastic import build_gpt_model
    from megatron_flextron.parallel import current_device
    from megatron_flextron.routers.token_calibration import (
        apply_budget_prices,
        calibrate_budget_prices,
    )
    from megatron_flextron.routers.token_training import (
        TrainedTokenRouting,
        load_token_routers,
        save_token_routers,
    )
    from megatron_flextron.lm_step import pad_microbatches

    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    model_cfg = ModelConfig.from_dict(read_config(args.load)["model"])
    seqs = checkpoint_sequences(args.load, args.data, args.seq_length, args.samples)
    device = current_device()
    model = build_gpt_model(model_cfg, model_cfg.transformer_config(tp, pp)).to(device)
    load_flextron_into_model(model, args.load)
    model.eval()
    serving = TrainedTokenRouting.attach(args.load, model, model_cfg.hidden_size)
    batches = pad_microbatches(seqs, args.micro_batch_size, device)
    found = calibrate_budget_prices(model, serving, batches, args.tolerance)
    if torch.distributed.get_rank() == 0:  # every rank found the same prices
        saved = load_token_routers(args.load, model_cfg.hidden_size)  # every layer's routers
        prices = {budget: result["price"] for budget, result in found.items()}
        apply_budget_prices(saved["routers"], saved["widths"], saved["budgets"], prices)
        before = saved["calibration"] or {}
        for budget, result in found.items():  # the saved routers carry earlier prices too
            earlier = before.get(budget, {})
            result["price"] += earlier.get("price", 0.0)
            result["uncalibrated_width"] = earlier.get(
                "uncalibrated_width", result["uncalibrated_width"]
            )
            result["calibration_tokens"] = len(seqs) * args.seq_length
        save_token_routers(
            args.load,
            saved["routers"],
            saved["widths"],
            saved["budgets"],
            saved["full_at_1"],
            calibration=found,
        )
    torch.distributed.barrier()
    return found


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron.core import parallel_state

    from megatron_flextron.parallel import destroy_model_parallel, initialize_model_parallel

    owned = not parallel_state.model_parallel_is_initialized()  # else: called in-process
    try:
        if owned:
            initialize_model_parallel(
                args.tensor_model_parallel_size, args.pipeline_model_parallel_size
            )
        found = calibrate(args)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if owned:
            destroy_model_parallel()
    if int(os.environ.get("RANK", "0")) == 0:
        for budget, result in found.items():
            print(json.dumps({"budget": float(budget), **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
