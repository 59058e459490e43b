"""Serving cost: one elastic model for every budget vs an exported dense model per budget.

SmolLM2-135M (the bundled GGUF) as an elastic model; for each budget, the sub-network the budget
maps to (the nearest elastic choices) and megatron's own dense GPTModel of that shape (exported
with convert/export.py, SDPA core attention like the elastic model), both run by the same
engine (megatron-core's dynamic inference engine through ElasticGenerator), in interleaved
rounds (medians reported):

- prefill: a run that generates one token (batch x prompt tokens through the model);
- decode: a run of N new tokens minus the prefill, per one-token step with the KV cache;
- memory: weights + KV cache of one elastic model serving all budgets vs the dense models;
- a mixed-budget stream: requests cycling over the budgets, served by the elastic model in one
  call (grouped by architecture) vs by each budget's dense model.

  python benchmarks/serving.py --output benchmarks/results/cpu_serving.json

Times are the process's CPU time (--clock cpu, the default, with one thread: what a run costs,
robust to other load on a shared machine) or wall time (--clock wall, for a machine of its own).

The sub-networks of a conversion that was neither ranked nor trained generate poor text; the
cost of running them is what this measures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_flextron.checkpoint.io import write_json  # noqa: E402
from megatron_flextron.config import ElasticConfig  # noqa: E402
from megatron_flextron.convert.export import export_subnetwork  # noqa: E402
from megatron_flextron.elastic import build_gpt_model  # noqa: E402
from megatron_flextron.elastic.tp_layout import load_canonical_state_dict  # noqa: E402
from megatron_flextron.inference import ElasticGenerator, Sampling, SubnetworkSelector  # noqa: E402
from megatron_flextron.routers.sampling import budget_subnetwork  # noqa: E402


class DenseSelector(SubnetworkSelector):
    """A plain (non-elastic) model has one architecture: nothing to switch."""

    def active(self, model, arch):
        return contextlib.nullcontext()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budgets", nargs="+", type=float, default=[1.0, 0.75, 0.5, 0.25])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--prompt-length", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--stream-requests", type=int, default=16)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--output", help="write the results as JSON")
    return p.parse_args(argv)


def prompts(tokenizer, n: int, length: int):
    from megatron_flextron.data.corpus import wiki_documents

    out = []
    for doc in wiki_documents("test"):
        ids = tokenizer.tokenize(doc)
        if len(ids) >= length:
            out.append(ids[:length])
        if len(out) == n:
            return out
    raise ValueError(f"fewer than {n} test documents of {length} tokens")


def model_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def cache_bytes(generator: ElasticGenerator) -> int:
    """The paged KV caches of the generator's lanes (one per architecture in use)."""
    return sum(lane.context.memory_buffer.numel() * lane.context.memory_buffer.element_size()
               for lane in generator.lanes.values())


def timed_batch(generator, batch, new_tokens, spec, clock) -> dict:
    """Prefill: a run that generates one token; decode: a run of ``new_tokens`` minus that."""
    times = []
    for n in (1, new_tokens):
        requests = [generator.request(p, Sampling.greedy(n), subnetwork=spec) for p in batch]
        start = clock()
        results = generator.generate(requests)
        times.append(clock() - start)
    steps = max(len(r.tokens) for r in results) - 1  # an early EOD ends the batch sooner
    return {"prefill_s": times[0], "decode_s": times[1] - times[0], "decode_steps": steps}


def summarize(runs, batch: int, prompt_length: int) -> dict:
    prefill = statistics.median(r["prefill_s"] for r in runs)
    per_step = statistics.median(r["decode_s"] / r["decode_steps"] for r in runs)
    return {
        "prefill_ms": round(prefill * 1e3, 2),
        "prefill_tokens_per_s": round(batch * prompt_length / prefill, 1),
        "decode_ms_per_step": round(per_step * 1e3, 2),
        "decode_tokens_per_s": round(batch / per_step, 1),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_flextron.convert.formats.gguf import bundled_smollm2, load_gguf
    from megatron_flextron.data.tokenizer import build_tokenizer
    from megatron_flextron.parallel import initialize_model_parallel

    initialize_model_parallel(1, 1)
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    load_before = os.getloadavg()[0]
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    ckpt = load_gguf(bundled_smollm2())
    m = ckpt.model
    elastic = ElasticConfig.from_ratios(m, head_ratios=(1.0, 2 / 3, 1 / 3))
    tokenizer = build_tokenizer("HuggingFaceTokenizer", ckpt.tokenizer_dir)
    batch = prompts(tokenizer, max(args.batch, args.stream_requests), args.prompt_length)
    max_len = args.prompt_length + args.new_tokens

    def generator(model_cfg, state, elastic_model: bool) -> ElasticGenerator:
        model = build_gpt_model(model_cfg, model_cfg.transformer_config(params_dtype=dtype),
                                elastic=elastic_model, core_attention="sdpa")
        load_canonical_state_dict(model, state, model_cfg)
        model = model.to(device).eval()
        kind = SubnetworkSelector if elastic_model else DenseSelector
        e = elastic if elastic_model else ElasticConfig.from_ratios(model_cfg)
        return ElasticGenerator(model, tokenizer, kind(None, model_cfg, e), args.batch, max_len)

    shared = generator(m, ckpt.state, True)
    specs = {b: budget_subnetwork(b, m, elastic).to_dict() for b in args.budgets}
    dense = {}
    for b in args.budgets:
        twin = export_subnetwork(ckpt, budget_subnetwork(b, m, elastic))
        dense[b] = generator(twin.model, twin.state, False)
    del ckpt

    # warm-up, then interleaved rounds so that load on the machine hits every row alike
    first = batch[: args.batch]
    for b in args.budgets:
        timed_batch(shared, first, 2, specs[b], clock)
        timed_batch(dense[b], first, 2, None, clock)
    runs = {(b, kind): [] for b in args.budgets for kind in ("elastic", "dense")}
    for i in range(args.rounds):
        for b in args.budgets:
            pair = [("elastic", shared, specs[b]), ("dense", dense[b], None)]
            for kind, gen, spec in pair[:: 1 if i % 2 == 0 else -1]:  # alternate who goes first
                runs[b, kind].append(timed_batch(gen, first, args.new_tokens, spec, clock))
    rows = []
    for b in args.budgets:
        e = summarize(runs[b, "elastic"], args.batch, args.prompt_length)
        d = summarize(runs[b, "dense"], args.batch, args.prompt_length)
        rows.append({
            "budget": b,
            "subnetwork": specs[b],
            "elastic": e,
            "dense": d,
            "prefill_time_ratio": round(e["prefill_ms"] / d["prefill_ms"], 3),
            "decode_time_ratio": round(e["decode_ms_per_step"] / d["decode_ms_per_step"], 3),
        })

    memory = {
        "elastic_weights_mb": round(model_bytes(shared.model) / 2**20, 1),
        "elastic_kv_cache_mb": round(cache_bytes(shared) / 2**20, 1),
        "dense_weights_mb": round(sum(model_bytes(g.model) for g in dense.values()) / 2**20, 1),
        "dense_kv_cache_mb": round(sum(cache_bytes(g) for g in dense.values()) / 2**20, 1),
    }
    for kind in ("elastic", "dense"):
        memory[f"{kind}_total_mb"] = round(
            memory[f"{kind}_weights_mb"] + memory[f"{kind}_kv_cache_mb"], 1
        )

    stream = [(batch[i], args.budgets[i % len(args.budgets)]) for i in range(args.stream_requests)]
    sampling = Sampling.greedy(args.new_tokens)
    start = clock()
    out = shared.generate([shared.request(p, sampling, subnetwork=specs[b]) for p, b in stream])
    elastic_s = clock() - start
    start = clock()
    for b in args.budgets:
        dense[b].generate([dense[b].request(p, sampling) for p, pb in stream if pb == b])
    dense_s = clock() - start
    tokens = sum(len(r.tokens) for r in out)
    result = {
        "command": " ".join(["python benchmarks/serving.py", *(argv or sys.argv[1:])]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
        "model": "SmolLM2-135M (bundled GGUF, fp32)" if not args.bf16 else "SmolLM2-135M, bf16",
        "batch": args.batch,
        "prompt_length": args.prompt_length,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "clock": f"{args.clock} time, {args.threads} thread(s)",
        # other processes on the machine slow every row alike (interleaved rounds), not the ratios
        "load_average_start_end": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        "rows": rows,
        "memory": memory,
        "mixed_stream": {
            "requests": args.stream_requests,
            "budgets": args.budgets,
            "generated_tokens": tokens,
            "elastic_one_model_s": round(elastic_s, 3),
            "dense_model_per_budget_s": round(dense_s, 3),
            "elastic_tokens_per_s": round(tokens / elastic_s, 1),
            "dense_tokens_per_s": round(tokens / dense_s, 1),
        },
    }
    if args.output:
        write_json(args.output, result)
    print(json.dumps(result, indent=1))
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    lines = [
        "| budget | sub-network | prefill tok/s elastic / dense | decode tok/s elastic / dense "
        "| prefill time ratio | decode time ratio |",
        "| ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        e, d = r["elastic"], r["dense"]
        lines.append(
            f"| {r['budget']:g} | `{json.dumps(r['subnetwork'])}` | "
            f"{e['prefill_tokens_per_s']:.0f} / {d['prefill_tokens_per_s']:.0f} | "
            f"{e['decode_tokens_per_s']:.1f} / {d['decode_tokens_per_s']:.1f} | "
            f"{r['prefill_time_ratio']:.3f} | {r['decode_time_ratio']:.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
