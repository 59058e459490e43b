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
A budget's sub-network is the one training samples for
it: the elastic choices nearest to budget x the full MLP width and head count.

--tokens-jsonl: one JSON list of token ids per line, each
sequence evaluated on its own (no packing, nothing added; longer than --seq-length + 1 tokens is
cut there). --text-file / --wiki-split: documents tokenized with the checkpoint's tokenizer, joined
with end-of-document tokens and cut into --seq-length windows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_flextron.checkpoint.state import CheckpointError  # noqa: E402
from megatron_flextron.checkpoint.io import write_json  # noqa: E402
from megatron_flextron.training.arguments import positive_int  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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
        choices=["static", "dynamic"],
        default="static",
        help="dynamic: route every token to an MLP width with the checkpoint's token routers "
        "(--budget/--budget-list condition them); reports the mean width used",
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
        help="with --router dynamic: also the static sub-networks at the same mean MLP width "
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
    args = p.parse_args(argv)
    if args.compare_static and args.router != "dynamic":
        p.error(
            "--compare-static compares token routing with static sub-networks: add --router dynamic"
        )
    return args


def load_sequences(args, tokenizer_dir):
    from megatron_flextron.data.corpus import read_token_lists, token_sequences

    if args.tokens_jsonl:
        seqs = read_token_lists(args.tokens_jsonl, args.seq_length)
    else:
        source = f"wiki:{args.wiki_split}" if args.wiki_split else args.text_file
        seqs = token_sequences(source, tokenizer_dir, args.seq_length)
    seqs = seqs[: args.max_sequences]
    if not seqs:
        raise ValueError("no sequence to evaluate")
    return seqs


def evaluate(args) -> list:
    """One result per evaluated sub-network (the --subnetwork one, or one per budget)."""
    import time

    from megatron_flextron.config import ElasticConfig, ModelConfig
    from megatron_flextron.checkpoint.flextron import (
        check_stored_shapes,
        load_flextron_into_model,
        read_config,
    )
    from megatron_flextron.data.corpus import check_token_ids, load_tokenizer
    from megatron_flextron.elastic import build_gpt_model, count_parameters, set_subnetwork
    from megatron_flextron.evaluation.multiple_choice import read_tasks, score
    from megatron_flextron.parallel import current_device
    from megatron_flextron.routers.checkpoint import budget_architecture
    from megatron_flextron.routers.latency import time_ms
    from megatron_flextron.routers.token import disable_token_routing
    from megatron_flextron.routers.token_training import TrainedTokenRouting
    from megatron_flextron.lm_step import forward_backward, pad_microbatches
    from megatron_flextron.routers.sampling import check_budgets

    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    config = read_config(args.load)
    model_cfg = ModelConfig.from_dict(config["model"])
    check_stored_shapes(args.load, model_cfg)  # before anything is read with a wrong config
    elastic = (
        ElasticConfig.from_dict(config["elastic"])
        if config.get("elastic")
        else ElasticConfig.from_ratios(model_cfg, tensor_model_parallel_size=tp)
    )
    budgets = args.budget_list or ([args.budget] if args.budget is not None else [])
    check_budgets(budgets or [1.0])
    if args.router == "dynamic":
        if not budgets:
            raise ValueError("--router dynamic needs --budget or --budget-list")
        chosen = [(None, {"chosen_by": "token routers"}) for _ in budgets]
    else:
        chosen = [
            budget_architecture(
                args.load, model_cfg, elastic, b, router_only=args.budget is not None
            )
            for b in budgets
        ]
    specs = [subnet for subnet, _ in chosen] or [args.subnetwork]
    tokenizer = os.path.join(args.load, "tokenizer")
    seqs = load_sequences(args, tokenizer if os.path.isdir(tokenizer) else None)
    check_token_ids(seqs, model_cfg.vocab_size, args.tokens_jsonl or "the tokenizer's ids")

    device = current_device()
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = build_gpt_model(model_cfg, model_cfg.transformer_config(tp, pp, dtype)).to(device)
    load_flextron_into_model(model, args.load)
    model.eval()
    batches = pad_microbatches(seqs, args.micro_batch_size, device)
    with torch.no_grad():  # warm-up, so that the first sub-network's time is not inflated
        forward_backward(model, batches[:1], True)
    results = []
    routed = None
    if args.router == "dynamic":
        routed = TrainedTokenRouting.attach(args.load, model, model_cfg.hidden_size)
    if args.mc_tasks:
        mc_tokenizer = load_tokenizer(tokenizer)
        tasks = {os.path.splitext(os.path.basename(t))[0]: read_tasks(t) for t in args.mc_tasks}
        if len(tasks) < len(args.mc_tasks):
            raise ValueError(f"--mc-tasks {args.mc_tasks}: task files need distinct names")

    def measure(spec, routed_now: bool = False) -> dict:
        """Loss (and latency) of ``spec``'s sub-network; ``routed_now``: token routing is on, and
        the mean width of the perplexity pass (not of the timing passes) is recorded."""
        subnet = set_subnetwork(model, spec, model_cfg, elastic)
        start = time.perf_counter()
        with torch.no_grad():
            out = forward_backward(model, batches, True)
        seconds = time.perf_counter() - start
        width = round(routed.mean_width(), 4) if routed_now else None
        loss = out["nll_sum"] / out["tokens"]
        result = {
            "loss": round(loss, 6),
            "ppl": round(math.exp(loss), 4),
            "tokens": int(out["tokens"]),
            "sequences": len(seqs),
            "subnetwork": subnet.to_dict(),
            "params": count_parameters(subnet, model_cfg)["total"],
            "seconds": round(seconds, 3),
        }
        if args.measure_latency:
            with torch.inference_mode():
                result["latency_ms"] = round(
                    time_ms(lambda: forward_backward(model, batches[:1], True), repeats=10), 3
                )
        if routed_now:
            result["mean_mlp_width_fraction"] = width
        return result

    static_cache = {}
    for i, spec in enumerate(specs):
        if routed is not None:
            routed.condition(budgets[i])
        result = measure(spec, routed_now=routed is not None)
        if args.mc_tasks:
            result["mc"] = {}
            for name, examples in tasks.items():
                mc = score(model, mc_tokenizer, examples, device=device)
                result["mc"][name] = {
                    "acc": round(mc["acc"], 4),
                    "acc_norm": round(mc["acc_norm"], 4),
                    "examples": mc["examples"],
                }
        if budgets:
            result = {"budget": budgets[i], **result, **chosen[i][1]}
        if args.label:
            result = {"method": args.label, **result}
        if routed is not None:
            result["mean_mlp_width_fraction"] = result.pop("mean_mlp_width_fraction")  # last
            result["params"] = None  # per token: see the mean width
            if args.compare_static and not routed.full:
                disable_token_routing(model)
                result["static_at_mean_width"] = static_at_width(
                    result["mean_mlp_width_fraction"], model_cfg, elastic, measure, static_cache
                )
        results.append(result)
    return results


def static_at_width(fraction: float, model_cfg, elastic, measure, cache: dict) -> dict:
    """The static line at a routed mean MLP width: the homogeneous sub-networks (every head) at
    the two MLP choices around it, measured, and their loss (and latency) interpolated linearly
    in width: what a static model of the same average MLP FLOPs would give."""
    choices = sorted(set(elastic.mlp_choices) | {model_cfg.ffn_hidden_size})
    width = fraction * model_cfg.ffn_hidden_size
    below = [c for c in choices if c <= width] or choices[:1]
    above = [c for c in choices if c >= width] or choices[-1:]
    lo, hi = below[-1], above[0]
    for c in (lo, hi):
        if c not in cache:
            cache[c] = measure({"mlp": c, "heads": model_cfg.num_attention_heads})
    t = 0.0 if hi == lo else min(max((width - lo) / (hi - lo), 0.0), 1.0)
    out = {"mlp_widths": [lo, hi]}
    keys = ["loss"] + (["latency_ms"] if "latency_ms" in cache[lo] else [])
    for key in keys:
        out[key] = round((1 - t) * cache[lo][key] + t * cache[hi][key], 6)
        out[f"{key}_at_widths"] = [cache[lo][key], cache[hi][key]]
    out["ppl"] = round(math.exp(out["loss"]), 4)
    return out


def _architecture(result: dict) -> str:
    if "mean_mlp_width_fraction" in result:
        return f"per token: mean MLP width {result['mean_mlp_width_fraction']:.3f}"
    return f"`{json.dumps(result['subnetwork'])}`"


def markdown_table(results: list) -> str:
    static = any("static_at_mean_width" in r for r in results)
    rows = [
        "| budget | sub-network | chosen by | params (M) | loss | perplexity | eval time (s) |"
        + (" static loss at the same mean width |" if static else ""),
        "| ---: | --- | --- | ---: | ---: | ---: | ---: |" + (" ---: |" if static else ""),
    ]
    for r in results:
        rows.append(
            f"| {r['budget']:g} | {_architecture(r)} | {r['chosen_by']} | "
            f"{'per token' if r['params'] is None else format(r['params'] / 1e6, '.1f')} | "
            f"{r['loss']:.3f} | {r['ppl']:.2f} | {r['seconds']:.2f} |"
        )
        if static:
            same = r.get("static_at_mean_width")
            rows[-1] += f" {same['loss']:.3f} |" if same else " - |"
    return "\n".join(rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_flextron.parallel import destroy_model_parallel, initialize_model_parallel

    initialize_model_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    try:
        result = evaluate(args)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        destroy_model_parallel()
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
        print(f"error: the loss of {which} is {bad[0]['loss']} (non-finite)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
