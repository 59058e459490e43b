"""Serving throughput: 1, 4 and 16 concurrent clients at mixed budgets against the HTTP server,
and transformers ``generate`` on each budget's exported model, in one run with the same threads.

SmolLM2-135M (the bundled GGUF) converted to flextron; the server (continuous batching on
megatron-core's dynamic engine) answers OpenAI ``/v1/completions`` requests whose model ids cycle
over the budgets (``smollm2@1``, ``@0.75``, ...), greedy, ``--new-tokens`` each. Every level runs
``--requests-per-client`` requests per client; the table gives requests and generated tokens per
second, per CPU second of the process (robust to other load on a shared machine: server and
clients run in this one process) and per wall second, and per-request latency (median, max).
The baseline runs the one-client level's requests (the same budgets and prompts, in the same
order) one at a time through transformers' ``generate`` (KV cache) on the hf export of each
budget's sub-network, right after that level. Last, a short request sent while a long one
decodes: its latency against the long one's.

  OMP_NUM_THREADS=1 python benchmarks/serving_throughput.py \\
      --output benchmarks/results/cpu_serving_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import urllib.request

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_flextron.checkpoint.io import write_json  # noqa: E402

NAME = "smollm2"
PROMPTS = [
    "The capital of France is",
    "Photosynthesis is the process by which plants",
    "The history of the Roman Empire began",
    "In mathematics, a prime number is",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budgets", nargs="+", type=float, default=[1.0, 0.75, 0.5, 0.25])
    p.add_argument("--clients", nargs="+", type=int, default=[1, 4, 16])
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (both sides)")
    p.add_argument("--output", help="write the results as JSON")
    return p.parse_args(argv)


def complete(url: str, model: str, prompt: str, new_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0}
    request = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=3600) as response:
        reply = json.loads(response.read())
    return {"latency_s": time.perf_counter() - start,
            "tokens": reply["usage"]["completion_tokens"]}


def level(url: str, clients: int, per_client: int, budgets, new_tokens: int) -> dict:
    """``clients`` threads, each sending ``per_client`` requests back to back."""
    records, start = [], threading.Barrier(clients + 1)

    def client(c: int):
        start.wait()
        for r in range(per_client):
            budget, prompt = request_mix(c * per_client + r, budgets)
            records.append(complete(url, f"{NAME}@{budget:g}", prompt, new_tokens))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0, c0 = time.perf_counter(), time.process_time()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    tokens = sum(r["tokens"] for r in records)
    latencies = [r["latency_s"] for r in records]
    return {"clients": clients, "requests": len(records), "wall_s": round(wall, 2),
            "cpu_s": round(cpu, 2), "tokens": tokens,
            "requests_per_cpu_s": round(len(records) / cpu, 3),
            "tokens_per_cpu_s": round(tokens / cpu, 2),
            "requests_per_s": round(len(records) / wall, 3),
            "tokens_per_s": round(tokens / wall, 2),
            "latency_median_s": round(statistics.median(latencies), 2),
            "latency_max_s": round(max(latencies), 2)}


def request_mix(i: int, budgets) -> tuple:
    """The i-th request of a client sequence: (budget, prompt)."""
    return budgets[i % len(budgets)], PROMPTS[i % len(PROMPTS)]


def transformers_models(ckpt, elastic, budgets) -> dict:
    """transformers' model of each budget's sub-network (the hf export)."""
    import transformers

    from megatron_flextron.convert.export import export_subnetwork
    from megatron_flextron.convert.formats.hf import save_hf
    from megatron_flextron.routers.sampling import budget_subnetwork

    models = {}
    for b in budgets:
        dense = export_subnetwork(ckpt, budget_subnetwork(b, ckpt.model, elastic))
        with tempfile.TemporaryDirectory() as out:
            save_hf(dense, out)
            models[b] = transformers.AutoModelForCausalLM.from_pretrained(
                out, dtype=torch.float32).eval()
    return models


def transformers_baseline(models, tokenizer, budgets, n: int, new_tokens: int) -> dict:
    """The first n requests of the client sequence, one at a time, through transformers."""
    tokens, latencies = 0, []
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(n):
        budget, prompt = request_mix(i, budgets)
        ids = torch.tensor([tokenizer.tokenize(prompt)])
        start = time.perf_counter()
        with torch.no_grad():
            out = models[budget].generate(
                ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=[0, 2],
                pad_token_id=0)
        latencies.append(time.perf_counter() - start)
        tokens += out.shape[1] - ids.shape[1]
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"requests": n, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "tokens": tokens,
            "requests_per_cpu_s": round(n / cpu, 3), "tokens_per_cpu_s": round(tokens / cpu, 2),
            "requests_per_s": round(n / wall, 3),
            "tokens_per_s": round(tokens / wall, 2),
            "latency_median_s": round(statistics.median(latencies), 2),
            "latency_max_s": round(max(latencies), 2)}


def short_behind_long(url: str, new_tokens: int) -> dict:
    """A 4-token request sent once a long one is decoding: both latencies."""
    out = {}

    def long():
        out["long"] = complete(url, f"{NAME}@1", PROMPTS[0], 4 * new_tokens)

    thread = threading.Thread(target=long)
    thread.start()
    time.sleep(1.0)
    out["short"] = complete(url, f"{NAME}@0.5", PROMPTS[1], 4)
    out["short_done_while_long_runs"] = thread.is_alive()
    thread.join()
    return {"long_tokens": out["long"]["tokens"],
            "long_latency_s": round(out["long"]["latency_s"], 2),
            "short_latency_s": round(out["short"]["latency_s"], 2),
            "short_done_while_long_runs": out["short_done_while_long_runs"]}


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_flextron.checkpoint.flextron import save_flextron
    from megatron_flextron.config import ElasticConfig
    from megatron_flextron.convert.formats.gguf import bundled_smollm2, load_gguf
    from megatron_flextron.data.tokenizer import build_tokenizer
    from megatron_flextron.inference import build_generator
    from megatron_flextron.inference.server import TextGenerationServer
    from megatron_flextron.parallel import initialize_model_parallel

    torch.set_num_threads(args.threads)
    initialize_model_parallel(1, 1)
    load_before = os.getloadavg()[0]
    ckpt = load_gguf(bundled_smollm2())
    elastic = ElasticConfig.from_ratios(ckpt.model, head_ratios=(1.0, 2 / 3, 1 / 3))
    ckpt.elastic = elastic
    tokenizer = build_tokenizer("HuggingFaceTokenizer", ckpt.tokenizer_dir)
    models = transformers_models(ckpt, elastic, args.budgets)
    with tempfile.TemporaryDirectory() as root:
        path = os.path.join(root, NAME)
        os.makedirs(path)
        save_flextron(ckpt, path)
        generator = build_generator(path, max_batch_size=max(args.clients),
                                    max_sequence_length=32 + 4 * args.new_tokens)
        server = TextGenerationServer(generator, "127.0.0.1", 0, model_name=NAME)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{server.port}"
        level(url, 1, 1, args.budgets, 4)  # warm-up: one lane per budget
        level(url, len(args.budgets), 1, args.budgets, 4)
        levels, baseline = [], None
        for c in args.clients:
            levels.append(level(url, c, args.requests_per_client, args.budgets,
                                args.new_tokens))
            if baseline is None:  # the first level's requests, at the same time of the run
                baseline = transformers_baseline(models, tokenizer, args.budgets,
                                                 levels[0]["requests"], args.new_tokens)
        waiting = short_behind_long(url, args.new_tokens)
        server.shutdown()
    one = levels[0]["tokens_per_cpu_s"]
    result = {
        "command": " ".join(["python benchmarks/serving_throughput.py", *(argv or sys.argv[1:])]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                   f"{args.threads} thread(s)",
        "model": "SmolLM2-135M (bundled GGUF, fp32), greedy",
        "budgets": args.budgets,
        "new_tokens": args.new_tokens,
        "load_average_start_end": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        "server": levels,
        "transformers_one_at_a_time": baseline,
        # per CPU second of this process: robust to other load on a shared machine
        "one_client_vs_transformers": round(one / baseline["tokens_per_cpu_s"], 2),
        "most_clients_vs_one": round(levels[-1]["tokens_per_cpu_s"] / one, 2),
        "short_behind_long": waiting,
    }
    if args.output:
        write_json(args.output, result)
    print(json.dumps(result, indent=1))
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    lines = ["| clients | requests | tokens | requests / CPU s | tokens / CPU s | requests/s "
             "(wall) | tokens/s (wall) | latency median / max (s, wall) |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    rows = [(str(r["clients"]), r) for r in result["server"]]
    first = result["server"][0]["clients"]
    rows.insert(1, (f"transformers ({first}'s requests)", result["transformers_one_at_a_time"]))
    for name, r in rows:
        lines.append(f"| {name} | {r['requests']} | {r['tokens']} | {r['requests_per_cpu_s']:.3f} "
                     f"| {r['tokens_per_cpu_s']:.1f} | {r['requests_per_s']:.3f} | "
                     f"{r['tokens_per_s']:.1f} | {r['latency_median_s']:.2f} / "
                     f"{r['latency_max_s']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
