"""Perplexity of a flextron checkpoint, or of one of its sub-networks, at any TP/PP.

  python tools/evaluate.py --load ckpt/smollm2 --wiki-split test --subnetwork '{"mlp": 768}'
  python tools/evaluate.py --load ckpt/elastic --wiki-split test --budget-list 1.0 0.75 0.5 0.35
  torchrun --nproc-per-node 3 tools/evaluate.py --load ckpt/smollm2 \\
      --tensor-model-parallel-size 3 \\
      --tokens-jsonl data.jsonl

Prints one JSON line per sub-network: loss (mean next-token NLL over every predicted position of
every sequence), ppl, tokens, sequences, params, seconds (wall time of the evaluation pass);
with --budget-list also a markdown table. --mc-tasks adds zero-shot accuracy per task file
("mc": {file stem: {acc, acc_norm, examples}}), --measure-latency the median forward time of one
micro-batch (--micro-batch-size x --seq-length tokens) in ms, --output writes the list as JSON
(tools/make_report.py tabulates and plots such files; --label names the method in them).
A budget runs what the checkpoint's budget policy chooses: its trained static router (--budget
needs one), else the elastic choices nearest to budget x the full MLP width and head count (what
training samples); --router token: its token routers (--router none|joint|token, the trainer's
words; the older static/dynamic still work). The evaluator is
megatron_flextron.evaluation.perplexity; this is its command line.

--tokens-jsonl: one JSON list of token ids per line, each
sequence evaluated on its own (no packing, nothing added; longer than --seq-length + 1 tokens is
cut there). --text-file / --wiki-split: documents tokenized with the checkpoint's tokenizer, joined
with end-of-document tokens and cut into --seq-length windows.
"""

from __future__ import annotations

import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_flextron.checkpoint.io import write_json  # noqa: E402
from megatron_flextron.cli import ArgumentParser, check_output, run_main  # noqa: E402
from megatron_flextron.evaluation.perplexity import (  # noqa: E402
    PerplexityOptions,
    evaluate_perplexity,
    markdown_table,
)
from megatron_flextron.routers.checkpoint import router_flag  # noqa: E402
from megatron_flextron.training.arguments import positive_int  # noqa: E402


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--load", required=True, help="flextron checkpoint directory")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--subnetwork", help="sub-network spec (JSON or file); default: full model")
    which.add_argument(
        "--budget-list",
        nargs="+",
        type=float,
        help="evaluate each budget's sub-network (the trained router's when there is one)",
    )
    which.add_argument("--budget", type=float, help="the trained static router's choice")
    p.add_argument(
        "--router",
        type=router_flag,
        default=None,
        metavar="{none,joint,token}",
        help="default: the checkpoint's trained budget router, else the nearest choices; none: "
        "the nearest choices; joint: the trained budget router (required); token: route every "
        "token to an MLP width with the checkpoint's token routers (--budget/--budget-list "
        "condition them), reporting the mean width used. static/dynamic: deprecated names of "
        "the default/token",
    )
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--text-file", help="plain text; documents separated by blank lines")
    data.add_argument("--tokens-jsonl", help="one JSON list of token ids per line")
    data.add_argument("--wiki-split", choices=["valid", "test"], help="the bundled corpus")
    p.add_argument(
        "--mc-tasks",
        nargs="+",
        help="also score multiple-choice tasks (jsonl files from tools/make_mc_tasks.py)",
    )
    p.add_argument(
        "--measure-latency",
        action="store_true",
        help="time each sub-network's forward pass on one micro-batch",
    )
    p.add_argument(
        "--compare-static",
        action="store_true",
        help="with --router token: also the static sub-networks at the same mean MLP width "
        "(the two MLP choices around it, interpolated): static_at_mean_width",
    )
    p.add_argument("--bf16", action="store_true", help="bfloat16 weights and compute (as served)")
    p.add_argument("--output", help="write the results as a JSON list (atomically)")
    p.add_argument("--label", help="method name stored in every result (for make_report)")
    p.add_argument("--seq-length", type=positive_int, default=512)
    p.add_argument("--max-sequences", type=positive_int, default=None)
    p.add_argument("--micro-batch-size", type=positive_int, default=4)
    p.add_argument("--tensor-model-parallel-size", type=positive_int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=positive_int, default=1)
    return p.parse_args(argv)


def options(args) -> PerplexityOptions:
    budgets = args.budget_list or ([args.budget] if args.budget is not None else [])
    return PerplexityOptions(
        load=args.load,
        data=f"wiki:{args.wiki_split}" if args.wiki_split else args.text_file,
        tokens_jsonl=args.tokens_jsonl,
        subnetwork=args.subnetwork,
        budgets=budgets,
        require_router=args.budget is not None,
        router=args.router,
        mc_tasks=args.mc_tasks or (),
        measure_latency=args.measure_latency,
        compare_static=args.compare_static,
        bf16=args.bf16,
        label=args.label,
        seq_length=args.seq_length,
        max_sequences=args.max_sequences,
        micro_batch_size=args.micro_batch_size,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
    )


def _main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_flextron.parallel import run_tool

    if args.output:
        check_output(args.output, "--output", folder=False)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    status, result = run_tool(
        lambda: [r.to_dict() for r in evaluate_perplexity(options(args))], tp, pp
    )
    if status:
        return status
    if int(os.environ.get("RANK", "0")) == 0:
        if args.output:
            write_json(args.output, result)
        for r in result:
            print(json.dumps(r))
        if len(result) > 1:
            print(markdown_table(result))
    bad = [r for r in result if not math.isfinite(r["loss"])]
    if bad:  # e.g. a checkpoint with non-finite weights: not a result to report as success
        which = f"budget {bad[0]['budget']:g}" if "budget" in bad[0] else "the sub-network"
        raise ValueError(f"the loss of {which} is {bad[0]['loss']} (non-finite)")
    return 0


def main(argv=None) -> int:
    return run_main(lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
