"""Checkpoint conversion: wall time and peak memory of each tool step, as ratios to the checkpoint.

A random Llama checkpoint in Hugging Face format (safetensors, written tensor by tensor) goes
through the conversion tool, each step in a fresh process that reports its peak resident memory:
  io floor             reads the safetensors into memory and torch.saves them (no conversion)
  hf -> flextron       tools/convert_checkpoint.py, no ranking
  hf -> flextron+rank  the same with importance ranking on calibration tokens (fp32 statistics)
  ... torchrun TP=2    ranking sharded over 2 ranks: peak per rank against that rank's shard
  flextron -> hf 50%   export of the 50% sub-network (MLP and heads) as a dense HF checkpoint
  flextron -> mcore    megatron-core distributed checkpoint at TP=2
  mcore -> hf          that Megatron checkpoint read back (--loader megatron) to HF
Ratios: peak RSS / checkpoint bytes, and "net" = (peak RSS - floor) / (checkpoint - tiny
checkpoint), where the floor is the same step run on a tiny model of the same vocabulary and
calibration data (2 layers, hidden 64): the libraries, the interpreter and the calibration
batch's activations, which do not grow with the model. From the measured net ratios the per-rank
peak of an 8B and a 70B Llama is projected (see ``project``).

  python benchmarks/conversion.py                      # 55M parameters, fp32 (CPU, ~2 min)
  python benchmarks/conversion.py --preset cpu-1b      # 1.1B (TinyLlama's shape), bf16 (~25 min)
  python benchmarks/conversion.py --preset gpu-1b      # the same, longer calibration (run_gpu.sh)
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
sys.path.insert(0, ROOT)
PRESETS = {
    "cpu": dict(hidden=512, layers=8, ffn=1408, heads=8, kv=2, vocab=32000, dtype="float32",
                samples=16, seq=256),
    "cpu-1b": dict(hidden=2048, layers=22, ffn=5632, heads=32, kv=4, vocab=32000,
                   dtype="bfloat16", samples=8, seq=64),
    "gpu-1b": dict(hidden=2048, layers=22, ffn=5632, heads=32, kv=4, vocab=32000,
                   dtype="bfloat16", samples=16, seq=256),
}  # fmt: skip
# Llama 3 shapes for the projection: (hidden, layers, ffn, heads, kv, vocab), bf16
PROJECTED = {
    "llama3-8b": (4096, 32, 14336, 32, 8, 128256),
    "llama3-70b": (8192, 80, 28672, 64, 8, 128256),
}
LAYOUTS = [(1, 1), (2, 1), (8, 1), (4, 2), (8, 4)]  # (TP, PP) per projected row


def model_config(hidden, layers, ffn, heads, kv, vocab):
    from megatron_flextron.config import ModelConfig

    return ModelConfig(
        "llama", num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn,
        num_attention_heads=heads, num_query_groups=kv, vocab_size=vocab,
        max_position_embeddings=4096,
    )  # fmt: skip


def make_hf_checkpoint(path: str, preset: dict) -> int:
    """A random Llama written tensor by tensor (no model is built); returns its bytes."""
    import torch

    from megatron_flextron.checkpoint.state import (
        Checkpoint,
        LazyState,
        TensorSpec,
        expected_shapes,
    )
    from megatron_flextron.convert.formats.hf import save_hf

    m = model_config(*(preset[k] for k in ("hidden", "layers", "ffn", "heads", "kv", "vocab")))
    dtype = getattr(torch, preset["dtype"])
    shapes = expected_shapes(m)
    generator = torch.Generator().manual_seed(0)

    def read(name: str) -> torch.Tensor:
        if name.endswith("layernorm.weight"):
            return torch.ones(shapes[name], dtype=dtype)
        return (0.02 * torch.randn(shapes[name], generator=generator)).to(dtype)

    state = LazyState({n: TensorSpec(s, dtype) for n, s in shapes.items()}, read)
    os.makedirs(path)
    save_hf(Checkpoint(m, state), path)
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


def _peak_mb() -> float:
    """This process's peak resident memory: VmHWM of its own address space (getrusage's
    ru_maxrss would carry over the parent's peak from before exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def child(argv: list) -> None:
    """One step in this process; prints (or, under torchrun, writes per rank) its peak."""
    if argv[0] == "io-floor":
        io_floor(argv[1], argv[2])
    else:
        from tools.convert_checkpoint import main

        with open(os.devnull, "w") as devnull:  # keep stdout for the result line
            saved, sys.stdout = sys.stdout, devnull
            try:
                rc = main(argv)
            finally:
                sys.stdout = saved
        if rc != 0:
            sys.exit(rc)
    result = json.dumps({"peak_rss_MB": _peak_mb()})
    if "RANK" in os.environ and os.environ.get("BENCH_PEAKS"):
        with open(os.path.join(os.environ["BENCH_PEAKS"], f"rank{os.environ['RANK']}"), "w") as f:
            f.write(result)
    print(result)


def run_step(argv: list, ranks: int = 1) -> dict:
    """This file with --child ARGV in fresh processes (torchrun when ``ranks`` > 1)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, os.path.abspath(__file__), "--child", *argv]
    peaks = tempfile.mkdtemp(prefix="bench-peaks-")
    if ranks > 1:
        env["BENCH_PEAKS"] = peaks
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
               "--master-port", str(29500 + os.getpid() % 1000), *cmd[1:]]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"step {argv[:3]} failed:\n{proc.stderr[-3000:]}")
    if ranks > 1:
        per_rank = [json.load(open(os.path.join(peaks, f"rank{r}"))) for r in range(ranks)]
        result = {"peak_rss_MB": max(p["peak_rss_MB"] for p in per_rank), "ranks": ranks}
    else:
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    shutil.rmtree(peaks, ignore_errors=True)
    return {"seconds": round(seconds, 2), **result}


def steps(work: str, hf: str, preset: dict) -> dict:
    calib = os.path.join(work, "calibration.jsonl")
    rng = random.Random(0)
    with open(calib, "w") as f:
        for _ in range(preset["samples"]):
            f.write(json.dumps([rng.randrange(preset["vocab"]) for _ in range(preset["seq"] + 1)]))
            f.write("\n")
    rank = ["--calibration-data", calib, "--calibration-samples", str(preset["samples"]),
            "--calibration-seq-length", str(preset["seq"])]  # fmt: skip
    half = json.dumps({"mlp": preset["ffn"] // 2, "heads": preset["heads"] // 2})
    fx = os.path.join(work, "fx")
    out = lambda name: ["--save-dir", os.path.join(work, name)]  # noqa: E731
    return {
        "io floor": (["io-floor", hf, os.path.join(work, "floor")], 1, 1),
        "hf -> flextron": (["--loader", "hf", "--saver", "flextron", "--load-dir", hf,
                            *out("fx")], 1, 1),
        "hf -> flextron+rank": (["--loader", "hf", "--saver", "flextron", "--load-dir", hf,
                                 *out("fx_ranked"), *rank], 1, 1),
        "hf -> flextron+rank torchrun TP=2": (
            ["--loader", "hf", "--saver", "flextron", "--load-dir", hf, *out("fx_tp2"), *rank,
             "--tensor-model-parallel-size", "2", "--target-tensor-parallel-size", "2"], 2, 2),
        "flextron -> hf 50%": (["--loader", "flextron", "--saver", "hf", "--load-dir", fx,
                                *out("hf_half"), "--subnetwork", half], 1, 1),
        "flextron -> mcore tp2": (["--loader", "flextron", "--saver", "megatron", "--load-dir",
                                   fx, *out("mcore"), "--target-tensor-parallel-size", "2"], 1, 1),
        "mcore -> hf": (["--loader", "megatron", "--saver", "hf", "--load-dir",
                         os.path.join(work, "mcore"), *out("hf_back")], 1, 1),
    }  # fmt: skip


def project(rows: dict) -> dict:
    """Per-rank peak of the Llama 3 shapes at several (TP, PP) layouts, from the measured net
    ratios: floor + net ratio x the rank's shard (bf16) + the largest whole tensor (each rank
    reads a source tensor whole before it keeps its shard: the embedding, for these shapes)."""
    import torch

    from megatron_flextron.checkpoint.state import expected_shapes

    out = {}
    for name, shape in PROJECTED.items():
        m = model_config(*shape)
        numel = {k: torch.Size(s).numel() for k, s in expected_shapes(m).items()}
        total = 2 * sum(numel.values())
        largest = 2 * max(numel.values())
        out[name] = {"checkpoint_GB": round(total / 2**30, 1), "per_rank_GB": {}}
        for step in ("hf -> flextron", "hf -> flextron+rank"):
            if step not in rows:
                continue
            row = rows[step]
            for tp, pp in LAYOUTS if step.endswith("rank") else [(1, 1)]:
                shard = total / (tp * pp)
                extra = largest if tp > 1 else 0
                gb = (row["floor_MB"] * 2**20 + row["net_vs_checkpoint"] * shard + extra) / 2**30
                out[name]["per_rank_GB"][f"{step} TP={tp} PP={pp}"] = round(gb, 1)
    return out


def measure(work: str, preset: dict, skip=()) -> tuple:
    """Every step on a fresh random checkpoint of ``preset``: (rows, checkpoint bytes, seconds
    to make it)."""
    hf = os.path.join(work, "hf")
    t0 = time.perf_counter()
    nbytes = make_hf_checkpoint(hf, preset)
    made = time.perf_counter() - t0
    rows = {}
    for name, (argv, ranks, shard_div) in steps(work, hf, preset).items():
        if name in skip:
            continue
        print(f"running {name} ...", file=sys.stderr, flush=True)
        rows[name] = run_step(argv, ranks)
        rows[name]["shard_MB"] = round(nbytes / shard_div / 2**20, 1)
    return rows, nbytes, made


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--workdir", help="scratch folder (default: a temporary one)")
    p.add_argument("--skip", action="append", default=[], help="a step to leave out")
    p.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child)
        return
    preset = PRESETS[args.preset]
    tiny = dict(preset, hidden=64, layers=2, ffn=128, heads=4, kv=2)
    work = args.workdir or tempfile.mkdtemp(prefix="flextron-convert-bench-")
    try:
        floors, _, _ = measure(os.path.join(work, "tiny"), tiny, args.skip)
        rows, nbytes, made = measure(os.path.join(work, "model"), preset, args.skip)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    io_s = rows["io floor"]["seconds"]
    for name, row in rows.items():
        shard, floor = row["shard_MB"], floors[name]
        row["floor_MB"] = floor["peak_rss_MB"]
        row["vs_io_floor"] = round(row["seconds"] / io_s, 2)
        row["peak_rss_vs_checkpoint"] = round(row["peak_rss_MB"] / shard, 2)
        net = (row["peak_rss_MB"] - floor["peak_rss_MB"]) / (shard - floor["shard_MB"])
        row["net_vs_checkpoint"] = round(net, 2)
    results = {
        "preset": args.preset,
        "shape": preset,
        "checkpoint_MB": round(nbytes / 2**20, 1),
        "params_M": round(nbytes / (2 if preset["dtype"] == "bfloat16" else 4) / 1e6, 1),
        "make_checkpoint_s": round(made, 1),
        "rows": rows,
        # net ratios of an fp32 checkpoint do not carry over to bf16 ones (ranking holds fp32)
        "projection": project(rows) if preset["dtype"] == "bfloat16" else {},
    }
    print(f"checkpoint: {results['checkpoint_MB']} MB ({args.preset}, {preset['dtype']})")
    print(f"{'step':<36}{'s':>8}{'peak RSS MB':>13}{'floor MB':>10}{'shard MB':>10}"
          f"{'RSS/ckpt':>10}{'net':>7}")  # fmt: skip
    for name, r in rows.items():
        print(
            f"{name:<36}{r['seconds']:>8}{r['peak_rss_MB']:>13}{r['floor_MB']:>10}"
            f"{r['shard_MB']:>10}{r['peak_rss_vs_checkpoint']:>10}{r['net_vs_checkpoint']:>7}"
        )
    for name, proj in results["projection"].items():
        print(f"projected {name} ({proj['checkpoint_GB']} GB bf16): {proj['per_rank_GB']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
