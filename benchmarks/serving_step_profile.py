"""Where a decode step's time goes: one request on megatron-core's dynamic engine, the elastic
model's direct decode step (elastic/decode_step.py: its attention and MLP layers, norms, step
plan), the modules' path and megatron's attention stages (where a layer runs through its module)
timed per step (CPU time of the thread).

The time a part takes includes the parts inside it (a layer holds its attention or MLP, which
hold their linears); ``weight products`` is every weight product of the step (``F.linear`` and
the strided GQA products; the output layer included). transformers ``generate`` on the same
budget's export runs after it, for its CPU time per token. One thread, greedy,
``--new-tokens``; the first (prefill) step is left out.

  OMP_NUM_THREADS=1 python benchmarks/serving_step_profile.py --budget 0.5 \\
      --output benchmarks/results/cpu_serving_step_profile.json
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from serving_python_calls import emit, smollm2_served  # noqa: E402
from serving_throughput import PROMPTS  # noqa: E402


class Timer:
    """Accumulates the thread's CPU time per named part while ``active``."""

    def __init__(self):
        self.total = collections.Counter()
        self.depth = collections.Counter()  # a part inside the same part counts once
        self.active = False

    def wrap(self, owner, attr: str, name: str) -> None:
        inner = getattr(owner, attr)

        @functools.wraps(inner)
        def timed(*args, **kwargs):
            if not self.active or self.depth[name]:
                return inner(*args, **kwargs)
            self.depth[name] += 1
            start = time.thread_time()
            try:
                return inner(*args, **kwargs)
            finally:
                self.total[name] += time.thread_time() - start
                self.depth[name] -= 1

        setattr(owner, attr, timed)


def instrument(timer: Timer) -> None:
    from megatron.core.inference.contexts.dynamic_context import DynamicInferenceContext
    from megatron.core.transformer import attention as mcore_attention

    from megatron_flextron.elastic import decode_step, hybrid, linear
    from megatron_flextron.elastic.attention import ElasticSelfAttention
    from megatron_flextron.elastic.layer import ElasticTransformerLayer
    from megatron_flextron.elastic.mlp import ElasticMLP

    parts = [  # the direct decode step (elastic/decode_step.py), then the modules' path
        (hybrid, "decode_stack", "layers"),
        (decode_step, "StepPlan", "step plan (RoPE tables, cache slots)"),
        (decode_step._AttentionStep, "__call__", "attention"),
        (decode_step._MLPStep, "__call__", "MLP"),
        (decode_step._Norm, "__call__", "norms"),
        (ElasticTransformerLayer, "forward", "layers"),
        (ElasticSelfAttention, "forward", "attention"),
        (ElasticMLP, "forward", "MLP"),
        (torch.nn.RMSNorm, "forward", "norms"),
        (DynamicInferenceContext, "apply_rotary_emb_query", "attention: RoPE of q"),
        (DynamicInferenceContext, "apply_rotary_emb_key", "attention: RoPE of k"),
        (DynamicInferenceContext, "append_key_value_cache", "attention: KV append"),
        (mcore_attention, "flash_attn_with_kvcache", "attention: paged attention"),
        (mcore_attention, "flash_attn_varlen_func", "attention: paged attention"),
        (linear, "blocked_rows_linear", "weight products"),
        (linear, "blocked_cols_linear", "weight products"),
        (linear.F, "linear", "weight products"),
        (linear.torch, "mm", "weight products"),
        (linear.torch, "addmm", "weight products"),
    ]
    for owner, attr, name in parts:
        timer.wrap(owner, attr, name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--output", help="write the results as JSON")
    args = p.parse_args(argv)
    from megatron_flextron.inference import Sampling
    from megatron_flextron.inference.engine import ElasticGenerator

    with smollm2_served([args.budget], 16, 32 + args.new_tokens) as (generator, models):
        hf = models[args.budget]
        timer, steps = Timer(), []
        instrument(timer)  # after build_generator: the generation shims are in place
        step = ElasticGenerator.step

        def timed_step(self):
            first = not steps  # a request's first step is its prefill: left out
            timer.active = not first
            start = time.thread_time()
            out = step(self)
            steps.append(None if first else time.thread_time() - start)
            timer.active = False
            return out

        ElasticGenerator.step = timed_step
        prompt = PROMPTS[1]
        request = generator.request(prompt, Sampling.greedy(4), budget=args.budget)
        generator.generate([request])  # warm-up
        timer.total.clear()
        steps.clear()
        request = generator.request(prompt, Sampling.greedy(args.new_tokens), budget=args.budget)
        generator.generate([request])
        ElasticGenerator.step = step
    decode = [s for s in steps if s is not None]
    per_step = {k: round(v / len(decode) * 1e3, 2) for k, v in timer.total.most_common()}
    ids = torch.tensor([generator.tokenizer.tokenize(prompt)])
    with torch.no_grad():
        hf.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
        start = time.thread_time()
        out = hf.generate(ids, max_new_tokens=args.new_tokens, do_sample=False,
                          eos_token_id=[0, 2], pad_token_id=0)
        hf_s = time.thread_time() - start
    result = {
        "command": " ".join(["python benchmarks/serving_step_profile.py",
                             *(argv or sys.argv[1:])]),
        "budget": args.budget, "decode_steps": len(decode),
        "elastic_engine_ms_per_decode_step": round(sum(decode) / len(decode) * 1e3, 2),
        "parts_ms_per_decode_step": per_step,
        "transformers_ms_per_token": round(hf_s / (out.shape[1] - ids.shape[1]) * 1e3, 2),
        "load_average": round(os.getloadavg()[0], 1),
    }
    return emit(result, args.output)


if __name__ == "__main__":
    sys.exit(main())
