"""Train Flextron's input-adaptive token routers on a frozen flextron checkpoint.

  python tools/train_token_router.py --load ckpt/elastic --router-budgets 1.0 0.75 0.5 \\
      --steps 200 --seq-length 128

A budget here is the mean MLP width fraction the routers should use; one router per layer,
conditioned on the budget, trained with straight-through Gumbel-softmax on the LM loss plus the
budget auxiliary loss (the LLM stays frozen). Stored in CKPT/token_router/. Prints, per budget,
the held-out loss and the mean width used with token dispatch; evaluate later with
`tools/evaluate.py --router token --budget-list ...`.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_flextron.cli import ArgumentParser, run_main  # noqa: E402


def _main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--load", required=True, help="flextron checkpoint; routers are stored inside")
    p.add_argument("--router-budgets", nargs="+", type=float, default=[1.0, 0.75, 0.5])
    p.add_argument("--data", default="wiki:train", help="training text: wiki:SPLIT, .jsonl, text")
    p.add_argument("--samples", type=int, default=64, help="training sequences")
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--aux-loss-coeff", type=float, default=10.0)
    p.add_argument("--log-interval", type=int, default=10, help="steps between log lines")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from megatron_flextron.checkpoint.load import load_elastic_model
    from megatron_flextron.data.corpus import checkpoint_sequences
    from megatron_flextron.lm_step import pad_microbatches
    from megatron_flextron.parallel import (
        current_device,
        destroy_model_parallel,
        initialize_model_parallel,
    )
    from megatron_flextron.routers.cost import router_choices
    from megatron_flextron.routers.token_training import save_token_routers, train_token_routers

    try:
        initialize_model_parallel(1, 1, args.seed)
        loaded = load_elastic_model(args.load)
        widths, _ = router_choices(loaded.model_cfg, loaded.elastic)
        seqs = checkpoint_sequences(args.load, args.data, args.seq_length, args.samples)
        device = current_device()
        model = loaded.model.train()
        routers = train_token_routers(
            model,
            widths,
            args.router_budgets,
            pad_microbatches(seqs, args.micro_batch_size, device),
            args.steps,
            args.lr,
            args.aux_loss_coeff,
            seed=args.seed,
            log_interval=args.log_interval,
        )
        save_token_routers(args.load, routers, widths, args.router_budgets)
    finally:
        destroy_model_parallel()
    print(
        json.dumps(
            {
                "saved": os.path.join(args.load, "token_router"),
                "widths": widths,
                "budgets": args.router_budgets,
            }
        )
    )
    return 0


def main(argv=None) -> int:
    return run_main(lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
