"""Python function calls per generated token: one request at a time, the elastic model on
megatron-core's dynamic engine against transformers ``generate`` on each budget's export.

On a CPU, decoding a 135M model one request at a time is the weight matmuls (memory bound, the
same in both) plus per-step Python; the Python is what separates them. cProfile's call count
is a measure of that work that other load on a shared machine does not change (times are
printed too, but they are inflated by the profiler). Same prompts, greedy, ``--new-tokens``.

  OMP_NUM_THREADS=1 python benchmarks/serving_python_calls.py \\
      --output benchmarks/results/cpu_serving_python_calls.json
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from serving_throughput import NAME, PROMPTS, transformers_models  # noqa: E402

from megatron_flextron.checkpoint.io import write_json  # noqa: E402


def calls_per_token(generate) -> dict:
    """Profile one call of ``generate()`` (it returns the number of tokens it generated)."""
    generate()  # warm-up
    profile = cProfile.Profile()
    profile.enable()
    tokens = generate()
    profile.disable()
    stats = pstats.Stats(profile)
    return {"tokens": tokens, "python_calls_per_token": round(stats.total_calls / tokens),
            "profiled_s_per_token": round(stats.total_tt / tokens, 4)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budgets", nargs="+", type=float, default=[1.0, 0.75, 0.5, 0.25])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--output", help="write the results as JSON")
    args = p.parse_args(argv)
    from megatron_flextron.checkpoint.flextron import save_flextron
    from megatron_flextron.config import ElasticConfig
    from megatron_flextron.convert.formats.gguf import bundled_smollm2, load_gguf
    from megatron_flextron.inference import Sampling, build_generator
    from megatron_flextron.parallel import initialize_model_parallel

    torch.set_num_threads(1)
    initialize_model_parallel(1, 1)
    ckpt = load_gguf(bundled_smollm2())
    elastic = ElasticConfig.from_ratios(ckpt.model, head_ratios=(1.0, 2 / 3, 1 / 3))
    ckpt.elastic = elastic
    models = transformers_models(ckpt, elastic, args.budgets)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        path = os.path.join(root, NAME)
        os.makedirs(path)
        save_flextron(ckpt, path)
        generator = build_generator(path, max_batch_size=1,
                                    max_sequence_length=32 + args.new_tokens)
        prompt = PROMPTS[0]
        ids = torch.tensor([generator.tokenizer.tokenize(prompt)])
        for budget in args.budgets:
            def ours(budget=budget):
                request = generator.request(prompt, Sampling.greedy(args.new_tokens),
                                            budget=budget)
                return len(generator.generate([request])[0].tokens)

            def theirs(budget=budget):
                with torch.no_grad():
                    out = models[budget].generate(
                        ids, max_new_tokens=args.new_tokens, do_sample=False,
                        eos_token_id=[0, 2], pad_token_id=0)
                return out.shape[1] - ids.shape[1]

            rows.append({"budget": budget, "elastic_dynamic_engine": calls_per_token(ours),
                         "transformers_generate": calls_per_token(theirs)})
    result = {"command": " ".join(["python benchmarks/serving_python_calls.py",
                                   *(argv or sys.argv[1:])]),
              "torch": torch.__version__, "prompt": prompt, "rows": rows}
    if args.output:
        write_json(args.output, result)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
