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
import contextlib
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


@contextlib.contextmanager
def smollm2_served(budgets, max_batch_size: int, max_sequence_length: int):
    """SmolLM2 (the bundled GGUF) on one thread: transformers' model of each budget's export, and
    the elastic checkpoint served by a generator (in a temporary folder while the block runs)."""
    from megatron_flextron.checkpoint.flextron import save_flextron
    from megatron_flextron.config import ElasticConfig
    from megatron_flextron.convert.formats.gguf import bundled_smollm2, load_gguf
    from megatron_flextron.inference import build_generator
    from megatron_flextron.parallel import initialize_model_parallel

    torch.set_num_threads(1)
    initialize_model_parallel(1, 1)
    ckpt = load_gguf(bundled_smollm2())
    elastic = ElasticConfig.from_ratios(ckpt.model, head_ratios=(1.0, 2 / 3, 1 / 3))
    ckpt.elastic = elastic
    models = transformers_models(ckpt, elastic, budgets)
    with tempfile.TemporaryDirectory() as root:
        path = os.path.join(root, NAME)
        os.makedirs(path)
        save_flextron(ckpt, path)
        yield build_generator(path, max_batch_size=max_batch_size,
                              max_sequence_length=max_sequence_length), models


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budgets", nargs="+", type=float, default=[1.0, 0.75, 0.5, 0.25])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--output", help="write the results as JSON")
    args = p.parse_args(argv)
    from megatron_flextron.inference import Sampling

    rows = []
    with smollm2_served(args.budgets, 1, 32 + args.new_tokens) as (generator, models):
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
    return emit(result, args.output)


def emit(result: dict, output) -> int:
    """Print the result as JSON, and write it to ``output`` if given."""
    if output:
        write_json(output, result)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
