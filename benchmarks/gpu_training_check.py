"""End-to-end check of the CUDA code paths before the long GPU jobs: a tiny random model trained
for 24 iterations in bf16 (elastic budgets, in-place KD, joint router), its held-out loss per
budget falling, then resumed from its checkpoint and evaluated with multiple-choice scoring.
Prints one JSON line; exits non-zero on any failure.

  python benchmarks/gpu_training_check.py
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]


def main() -> int:
    import torch
    from helpers import training_flags, write_training_setup

    from megatron_flextron.data.corpus import wiki_documents
    from megatron_flextron.evaluation.multiple_choice import make_tasks
    from megatron_flextron.evaluation.perplexity import PerplexityOptions, evaluate_perplexity
    from megatron_flextron.parallel import destroy_model_parallel, initialize_model_parallel
    from megatron_flextron.training.arguments import parse_args
    from megatron_flextron.training.trainer import pretrain

    start = time.time()
    work = tempfile.mkdtemp(prefix="flextron-gpu-check-")
    initialize_model_parallel(1, 1)
    setup = write_training_setup(work)
    destroy_model_parallel()
    save = os.path.join(work, "run")
    flags = dict(train_iters=24, lr=1e-2, min_lr=1e-3, eval_interval=8, save=save, bf16=True,
                 router="joint", save_interval=12)  # fmt: skip
    history = pretrain(parse_args(training_flags(setup, **flags)))
    destroy_model_parallel()
    first, last = history[7]["eval"], history[-1]["eval"]
    falling = {b: last[b] < first[b] for b in first}
    resumed = pretrain(parse_args(training_flags(setup, **{**flags, "train_iters": 28})))
    destroy_model_parallel()
    tasks = os.path.join(work, "cloze.jsonl")
    with open(tasks, "w") as f:
        for t in make_tasks(wiki_documents("test"), "cloze", 16):
            f.write(json.dumps(t) + "\n")
    initialize_model_parallel(1, 1)
    options = PerplexityOptions(load=save, data="wiki:test", seq_length=32, max_sequences=8,
                                budgets=[1.0, 0.5], mc_tasks=[tasks],
                                measure_latency=True)  # fmt: skip
    rows = [r.to_dict() for r in evaluate_perplexity(options)]
    destroy_model_parallel()
    result = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "eval_first": first,
        "eval_last": last,
        "resumed_to": resumed[-1]["iteration"],
        "evaluate": [{k: r[k] for k in ("budget", "loss", "mc", "latency_ms")} for r in rows],
        "seconds": round(time.time() - start, 1),
    }
    print(json.dumps(result))
    ok = all(falling.values()) and resumed[-1]["iteration"] == 28 and len(rows) == 2
    print("gpu training check: " + ("ok" if ok else f"FAILED (falling={falling})"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
