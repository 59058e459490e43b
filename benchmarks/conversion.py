"""Checkpoint conversion: wall time and peak memory of each tool step, against the I/O floor.

A random Llama checkpoint in Hugging Face format (safetensors) goes through the conversion tool:
  io floor            load the safetensors state dict and torch.save it (nothing converted)
  hf -> flextron      tools/convert_checkpoint.py, no ranking
  hf -> flextron+rank the same with importance ranking on calibration tokens (GPU when present)
  flextron -> hf 50%  export of the 50% sub-network (MLP and heads) as a dense HF checkpoint
  flextron -> mcore   megatron-core distributed checkpoint at TP=2
Each step runs in its own process, which reports its peak resident memory (and peak CUDA
memory); ratios are step time / io floor and peak memory / checkpoint bytes.

  python benchmarks/conversion.py                   # ~60M-parameter model (CPU)
  python benchmarks/conversion.py --preset gpu-1b   # 1.1B (TinyLlama's shape), bf16 on disk
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = {
    "cpu": dict(hidden=512, layers=8, ffn=1408, heads=8, kv=2, vocab=32000, dtype="float32"),
    "gpu-1b": dict(hidden=2048, layers=22, ffn=5632, heads=32, kv=4, vocab=32000, dtype="bfloat16"),
}


def _peak() -> dict:
    out = {"peak_rss_MB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    import torch

    if torch.cuda.is_available():
        out["peak_cuda_MB"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def make_hf_checkpoint(path: str, preset: dict) -> int:
    """A random Llama saved with transformers; returns its bytes on disk."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=preset["hidden"],
        intermediate_size=preset["ffn"],
        num_hidden_layers=preset["layers"],
        num_attention_heads=preset["heads"],
        num_key_value_heads=preset["kv"],
        vocab_size=preset["vocab"],
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        torch_dtype=preset["dtype"],
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(getattr(torch, preset["dtype"]))
    model.save_pretrained(path)
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def io_floor(hf_dir: str, out_dir: str) -> None:
    import torch
    from safetensors.torch import load_file

    state = {}
    for name in sorted(os.listdir(hf_dir)):
        if name.endswith(".safetensors"):
            state.update(load_file(os.path.join(hf_dir, name)))
    os.makedirs(out_dir)
    torch.save(state, os.path.join(out_dir, "model.pt"))


def run_step(argv: list) -> dict:
    """Run this file with --child ARGV in a fresh process; its JSON line back, plus wall time."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", *argv],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"step {argv[:3]} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"seconds": round(seconds, 2), **result}


def child(argv: list) -> None:
    if argv[0] == "io-floor":
        io_floor(argv[1], argv[2])
    else:
        sys.path.insert(0, ROOT)
        sys.argv = ["convert_checkpoint.py", *argv]
        from tools.convert_checkpoint import main

        with open(os.devnull, "w") as devnull:  # keep stdout for the result line
            saved, sys.stdout = sys.stdout, devnull
            try:
                rc = main(argv)
            finally:
                sys.stdout = saved
        if rc != 0:
            sys.exit(rc)
    print(json.dumps(_peak()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--workdir", help="scratch folder (default: a temporary one)")
    p.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child)
        return
    preset = PRESETS[args.preset]
    work = args.workdir or tempfile.mkdtemp(prefix="flextron-convert-bench-")
    try:
        hf = os.path.join(work, "hf")
        t0 = time.perf_counter()
        nbytes = make_hf_checkpoint(hf, preset)
        made = time.perf_counter() - t0
        calib = os.path.join(work, "calibration.jsonl")
        rng = random.Random(0)
        with open(calib, "w") as f:
            for _ in range(16):
                f.write(json.dumps([rng.randrange(preset["vocab"]) for _ in range(257)]) + "\n")
        half = json.dumps({"mlp": preset["ffn"] // 2, "heads": preset["heads"] // 2})
        steps = {
            "io floor": ["io-floor", hf, os.path.join(work, "floor")],
            "hf -> flextron": ["--loader", "hf", "--saver", "flextron", "--load-dir", hf,
                               "--save-dir", os.path.join(work, "fx")],
            "hf -> flextron+rank": ["--loader", "hf", "--saver", "flextron", "--load-dir", hf,
                                    "--save-dir", os.path.join(work, "fx_ranked"),
                                    "--calibration-data", calib, "--calibration-samples", "16",
                                    "--calibration-seq-length", "256"],
            "flextron -> hf 50%": ["--loader", "flextron", "--saver", "hf", "--load-dir",
                                   os.path.join(work, "fx"), "--save-dir",
                                   os.path.join(work, "hf_half"), "--subnetwork", half],
            "flextron -> mcore tp2": ["--loader", "flextron", "--saver", "megatron",
                                      "--load-dir", os.path.join(work, "fx"), "--save-dir",
                                      os.path.join(work, "mcore"),
                                      "--target-tensor-parallel-size", "2"],
        }  # fmt: skip
        rows = {name: run_step(argv) for name, argv in steps.items()}
        floor = rows["io floor"]["seconds"]
        for row in rows.values():
            row["vs_io_floor"] = round(row["seconds"] / floor, 2)
            row["peak_rss_vs_checkpoint"] = round(row["peak_rss_MB"] * 2**20 / nbytes, 2)
        import torch

        results = {
            "preset": args.preset,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "checkpoint_MB": round(nbytes / 2**20, 1),
            "params_M": round(nbytes / (2 if preset["dtype"] == "bfloat16" else 4) / 1e6, 1),
            "make_checkpoint_s": round(made, 1),
            "rows": rows,
        }
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(f"checkpoint: {results['checkpoint_MB']} MB ({args.preset}, {results['device']})")
    print(f"{'step':<24}{'s':>8}{'vs floor':>10}{'peak RSS MB':>13}{'RSS/ckpt':>10}{'CUDA MB':>10}")
    for name, r in rows.items():
        print(
            f"{name:<24}{r['seconds']:>8}{r['vs_io_floor']:>10}{r['peak_rss_MB']:>13}"
            f"{r['peak_rss_vs_checkpoint']:>10}{r.get('peak_cuda_MB', ''):>10}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
