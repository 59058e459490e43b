"""Generate text with a flextron checkpoint: the full model, a sub-network or a budget's.

  python tools/generate.py --load ckpt/smollm2 --prompt "The capital of France is"
  python tools/generate.py --load ckpt/smollm2 --budget 0.5 --prompt "Once upon a time" \\
      --max-new-tokens 48 --temperature 0.8 --top-p 0.9 --seed 1
  torchrun --nproc-per-node 3 tools/generate.py --load ckpt/smollm2 \\
      --tensor-model-parallel-size 3 --subnetwork '{"mlp": 768, "heads": 6}' --prompt "Hello"

Runs megatron-core's dynamic inference engine (paged KV cache, continuous batching) on the
elastic model. Prints one
JSON line per prompt: text (the continuation only), tokens (generated ids), finish_reason ("eod"
or "length") and the sub-network used (with --budget: how it was chosen). Greedy unless a
sampling flag is given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_flextron.cli import ArgumentParser, run_main  # noqa: E402
from megatron_flextron.routers.checkpoint import router_flag  # noqa: E402


def quiet_upstream() -> None:
    """megatron-core 0.19 and torch's checkpoint reader print deprecation notices while a
    checkpoint loads and the model builds (GPTModel, load_common, ShardedTensor, ...): notices
    for this project's developers (the test suite tabulates them), not for a tool's user, whose
    stderr carries only the error line."""
    import logging
    import warnings

    for module in (r"megatron\.", r"torch\.distributed\.checkpoint"):
        warnings.filterwarnings("ignore", module=module)
    for name in ("megatron.core.models.gpt.gpt_model", "megatron.core.dist_checkpointing"):
        logging.getLogger(name).setLevel(logging.ERROR)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Flags shared with tools/run_text_generation_server.py (Megatron's names)."""
    p.add_argument("--load", required=True, help="flextron checkpoint directory")
    p.add_argument(
        "--router",
        type=router_flag,
        default=None,
        metavar="{none,joint,token}",
        help="how a --budget is run: default: the checkpoint's trained budget router, else the "
        "nearest choices; none: the nearest choices; joint: the trained router (required); "
        "token: the token routers pick each token's MLP width (static/dynamic: deprecated names "
        "of the default/token)",
    )
    p.add_argument("--bf16", action="store_true", help="bfloat16 weights and compute")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--inference-max-seq-length", type=int, default=1024,
                   help="longest prompt + generation (sizes the KV cache)")
    p.add_argument("--inference-max-requests", type=int, default=8,
                   help="largest batch the engine runs at once (sizes the KV cache)")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--subnetwork", help="sub-network spec (JSON or a file); default: full")
    which.add_argument("--budget", type=float, help="run what the budget policy (--router) picks")
    p.add_argument("--prompt", action="append", required=True, help="repeat for several")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (the default)")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, help="fixes the sampling draws")
    args = p.parse_args(argv)
    sampled = [args.temperature, args.top_k, args.top_p]
    if args.greedy and any(v is not None for v in sampled):
        p.error("--greedy excludes --temperature/--top-k/--top-p")
    return args


def sampling_from_args(args):
    from megatron_flextron.inference import Sampling

    if args.temperature is None and args.top_k is None and args.top_p is None:
        return Sampling(max_new_tokens=args.max_new_tokens, top_k=1, seed=args.seed)
    return Sampling(
        max_new_tokens=args.max_new_tokens,
        temperature=1.0 if args.temperature is None else args.temperature,
        top_k=args.top_k or 0,
        top_p=args.top_p or 0.0,
        seed=args.seed,
    )


def generator_from_args(args):
    import torch

    from megatron_flextron.inference import build_generator

    return build_generator(
        args.load,
        router=args.router,
        dtype=torch.bfloat16 if args.bf16 else torch.float32,
        max_batch_size=args.inference_max_requests,
        max_sequence_length=args.inference_max_seq_length,
    )


def run(args) -> list:
    sampling = sampling_from_args(args)
    generator = generator_from_args(args)
    requests = [
        generator.request(p, sampling, subnetwork=args.subnetwork, budget=args.budget)
        for p in args.prompt
    ]
    results = generator.generate(requests)
    return [{"prompt": p, **r.to_dict()} for p, r in zip(args.prompt, results)]


def _main(argv=None) -> int:
    args = parse_args(argv)
    quiet_upstream()
    from megatron_flextron.parallel import run_tool

    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    status, lines = run_tool(lambda: run(args), tp, pp)
    if status:
        return status
    if int(os.environ.get("RANK", "0")) == 0:
        for line in lines:
            print(json.dumps(line))
    return 0


def main(argv=None) -> int:
    return run_main(lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
