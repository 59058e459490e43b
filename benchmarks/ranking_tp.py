"""SmolLM2-135M importance ranking in one process vs under torchrun at TP=3: same result?

  python benchmarks/ranking_tp.py --json benchmarks/results/cpu_ranking_tp3_smollm2.json

Converts the bundled SmolLM2 GGUF into flextron with ranking on the Wikipedia train split, once
with ``python tools/convert_checkpoint.py`` (TP=1) and once with ``torchrun --nproc-per-node 3
... --tensor-model-parallel-size 3`` (gloo on CPU; the checkpoint comes out dealt for TP=3), with
the same ranking options, then compares: the chosen estimators, the MLP and head orders, every
held-out loss in the metadata, and the canonical tensors of both checkpoints (``read_flextron``
undeals them). The checkpoints are written to a temporary folder and deleted. Not a test: it
takes tens of minutes on a small CPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TOOL = "tools/convert_checkpoint.py"
MICRO_BATCH = 4  # rank_and_permute's default, which the converter uses
SCORES = ("mlp", "activation", "taylor", "taylor_token")


def child(rss_dir: str, argv: list) -> int:
    """Run the conversion tool in this process, then record this rank's peak resident memory."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_checkpoint", os.path.join(ROOT, TOOL))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    rc = tool.main(argv)
    rank = os.environ.get("RANK", "0")
    with open(os.path.join(rss_dir, f"rank{rank}.json"), "w") as f:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        json.dump({"rank": int(rank), "peak_rss_MB": round(peak, 1), "rc": rc}, f)
    return rc


def child_scores(out: str, samples: int, seq_length: int, tp: int) -> int:
    """The per-unit statistics the converter ranks by, on the calibration micro-batches that
    rank_and_permute uses (same split), at TP=tp; rank 0 saves them to ``out``."""
    import torch

    from megatron_flextron.convert.formats.gguf import bundled_smollm2, load_gguf
    from megatron_flextron.importance import calibration_sequences, ranking_model
    from megatron_flextron.importance.collect import collect_statistics
    from megatron_flextron.lm_step import pad_microbatches
    from megatron_flextron.parallel import destroy_model_parallel, initialize_model_parallel

    initialize_model_parallel(tp, 1)
    ckpt = load_gguf(bundled_smollm2())
    seqs = calibration_sequences("wiki", ckpt.tokenizer_dir, samples, seq_length)
    held = max(MICRO_BATCH, len(seqs) // 4)  # rank_and_permute's held-out split
    model = ranking_model(ckpt)
    calib = pad_microbatches(seqs[held:], MICRO_BATCH, next(model.parameters()).device)
    stats = collect_statistics(model, calib, ckpt.model, with_taylor=True)
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save({k: stats[k] for k in SCORES}, out)
    destroy_model_parallel()
    return 0


def launch(name: str, cmd: list, timeout_s: int) -> subprocess.CompletedProcess:
    """Run cmd (without the launcher's rank variables); exit with its stderr if it fails."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE")}
    print(f"[{name}] {' '.join(cmd)}", file=sys.stderr, flush=True)
    t0 = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
    if out.returncode != 0:
        sys.exit(f"{name} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    print(f"[{name}] {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    return out


def gguf_path() -> str:
    from megatron_flextron.convert.formats.gguf import bundled_smollm2

    return bundled_smollm2()


def run_side(name: str, launcher: list, argv: list, work: str, timeout_s: int) -> dict:
    """One conversion (``launcher`` + this file as --child); its wall time and per-rank memory."""
    rss_dir = os.path.join(work, f"rss_{name}")
    os.makedirs(rss_dir)
    t0 = time.time()
    me = [os.path.abspath(__file__), "--child", rss_dir, "--"]
    out = launch(name, launcher + me + argv, timeout_s)
    wall = time.time() - t0
    ranks = [json.load(open(os.path.join(rss_dir, f))) for f in sorted(os.listdir(rss_dir))]
    tool = json.loads(out.stdout.strip().splitlines()[-1])  # rank 0's summary line
    shown = ["python" if c == sys.executable else c for c in launcher] + [TOOL] + argv
    return {
        "command": " ".join(shown).replace(work, "$TMP").replace(gguf_path(), "$GGUF"),
        "wall_s": round(wall, 1),
        "convert_s": tool["seconds"],
        "peak_rss_MB_per_rank": [r["peak_rss_MB"] for r in ranks],
    }


def losses(info: dict) -> dict:
    """Every held-out loss the ranking recorded, flattened to 'path' -> value."""
    out = {"full": info["full_loss"]}
    for cand, per_heads in info["head_selection"]["loss"].items():
        for heads, v in per_heads.items():
            out[f"heads={heads}/{cand}"] = v
    for heads, v in ((info.get("head_refinement") or {}).get("loss") or {}).items():
        out[f"heads={heads}/refined"] = v
    for cand, v in info["mlp_selection"]["loss"].items():
        out[f"mlp={info['mlp_selection']['mlp']}/{cand}"] = v
    return out


def order_differences(a: list, b: list) -> list:
    """Each run of consecutive positions where two per-layer orders differ: layer, first
    position, the units there in order a and in order b."""
    diffs = []
    for layer, (x, y) in enumerate(zip(a, b)):
        i = 0
        while i < len(x):
            j = i
            while j < len(x) and x[j] != y[j]:
                j += 1
            if j > i:
                diffs.append({"layer": layer, "position": i, "one": x[i:j], "tp": y[i:j]})
            i = j + 1
    return diffs


def aligned_to(a, b) -> dict:
    """b's state permuted so that its unit orders are a's: equal to a's wherever the ranking
    differs only in the order of units (each checkpoint is the source permuted by its orders)."""
    import torch

    from megatron_flextron.importance.permute import permute_state

    def moves(key):
        oa, ob = (torch.tensor(c.metadata["importance"][key]) for c in (a, b))
        return [torch.argsort(y)[x] for x, y in zip(oa, ob)]

    mlp, heads = moves("mlp_order"), moves("head_order")
    return permute_state(b.state, b.model, mlp_orders=mlp, head_orders=heads)


def score_report(one: dict, tp: dict, a, b) -> dict:
    """Per estimator: how far TP=1 and TP=k scores differ, whether the orders they give are the
    checkpoints' orders, and the scores of the units wherever those orders differ."""
    import torch

    from megatron_flextron.importance.order import head_order, neuron_order

    groups = a.model.num_query_groups
    order = {"mlp": neuron_order}
    ranked = {"mlp": lambda c: c.metadata["importance"]["mlp_order"]}
    for k in SCORES[1:]:
        order[k] = lambda s: head_order(s, groups)
        ranked[k] = lambda c, k=k: c.metadata["importance"]["head_selection"]["head_order"][k]
    if a.metadata["importance"]["mlp_estimator"] != "activation":
        ranked["mlp"] = None  # the chosen MLP order is not from these scores: nothing to check
    out = {}
    for k in SCORES:
        s1, s3 = one[k], tp[k]
        o1 = [order[k](x).tolist() for x in s1]
        o3 = [order[k](x).tolist() for x in s3]
        rel = max(float(((x - y).abs() / x.abs().clamp_min(1e-30)).max()) for x, y in zip(s1, s3))
        diffs = order_differences(o1, o3)
        for d in diffs:
            v1, v3 = s1[d["layer"]][d["one"]], s3[d["layer"]][d["one"]]
            d["scores_one_process"], d["scores_tp"] = v1.tolist(), v3.tolist()
            d["rel_spread_one_process"] = float((v1.max() - v1.min()) / v1.abs().max())
        # adjacent units (TP=1 order) whose scores are closer than the TP=1 vs TP=k difference
        close = sum(
            int(((x[o[:-1]] - x[o[1:]]).abs() / x[o[:-1]].abs() <= rel).sum())
            for x, o in zip(s1, (torch.tensor(o) for o in o1))
        )
        out[k] = {
            "score_max_rel_diff": rel,
            "orders_match_checkpoints": ranked[k] and [ranked[k](a) == o1, ranked[k](b) == o3],
            "orders_equal": o1 == o3,
            "adjacent_pairs_closer_than_that": close,
            "differences": diffs,
        }
    return out


def kept_equal(a, b) -> dict:
    """Per axis: do both checkpoints keep the same units at every elastic choice? (A swap of two
    units that both sit inside one choice's prefix changes no sub-network.)"""
    m, elastic = a.model, a.elastic
    n = m.heads_per_group

    def kept_heads(order, h):  # GQA keeps the first h/G heads of every KV group
        if n == 1:
            return set(order[:h])
        return {order[g * n + i] for g in range(m.num_query_groups) for i in range(h // n)}

    def equal(key, choices, kept):
        pairs = zip(a.metadata["importance"][key], b.metadata["importance"][key])
        return all(kept(x, c) == kept(y, c) for x, y in pairs for c in choices)

    def prefix(order, c):
        return set(order[:c])

    return {
        "mlp": equal("mlp_order", elastic.mlp_choices, prefix),
        "heads": equal("head_order", elastic.head_choices, kept_heads),
    }


def compare(one_dir: str, tp_dir: str) -> dict:
    """Orders, estimators, losses and tensors of the TP=1 and the TP=3 checkpoints."""
    from megatron_flextron.checkpoint.flextron import read_flextron

    a, b = read_flextron(one_dir), read_flextron(tp_dir)
    ia, ib = a.metadata["importance"], b.metadata["importance"]
    la, lb = losses(ia), losses(ib)
    diff = {k: abs(la[k] - lb[k]) for k in la}
    tensors = {}
    for k in sorted(a.state):
        x, y = a.state[k], b.state[k]
        tensors[k] = 0.0 if x.shape == y.shape and x.equal(y) else float((x - y).abs().max())
    worst = max(tensors, key=tensors.get)
    aligned = aligned_to(a, b)
    refined = [i.get("head_refinement") or {} for i in (ia, ib)]
    return {
        "elastic_equal": a.elastic.to_dict() == b.elastic.to_dict(),
        "elastic": a.elastic.to_dict(),
        "dealt_tensor_parallel_size": [1, 3],
        "head_estimator": [ia["head_estimator"], ib["head_estimator"]],
        "mlp_estimator": [ia["mlp_estimator"], ib["mlp_estimator"]],
        "refinement_kept": [r.get("kept") for r in refined],
        "head_order_equal": ia["head_order"] == ib["head_order"],
        "mlp_order_equal": ia["mlp_order"] == ib["mlp_order"],
        "kept_units_equal_at_every_choice": kept_equal(a, b),
        "candidate_head_orders_equal": {
            k: v == ib["head_selection"]["head_order"].get(k)
            for k, v in ia["head_selection"]["head_order"].items()
        },
        "head_order_differences": order_differences(ia["head_order"], ib["head_order"]),
        "mlp_order_differences": order_differences(ia["mlp_order"], ib["mlp_order"]),
        "losses_one_process": la,
        "losses_tp3": lb,
        "loss_max_abs_diff": max(diff.values()),
        "loss_max_abs_diff_at": max(diff, key=diff.get),
        "tensor_keys_equal": sorted(a.state) == sorted(b.state),
        "tensors": len(tensors),
        "tensors_bitwise_equal": sum(v == 0.0 for v in tensors.values()),
        "tensor_max_abs_diff": tensors[worst],
        "tensor_max_abs_diff_at": worst,
        "tensors_bitwise_equal_after_aligning_orders": all(
            aligned[k].equal(a.state[k]) for k in a.state
        ),
        "tensor_max_abs_diff_per_tensor": tensors,
    }, (a, b)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child(argv[1], argv[3:])
    if argv[:1] == ["--child-scores"]:
        return child_scores(argv[1], *map(int, argv[2:5]))
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calibration-samples", type=int, default=16)
    p.add_argument("--calibration-seq-length", type=int, default=128)
    p.add_argument("--head-estimator", default="auto")
    p.add_argument("--tp", type=int, default=3, help="TP size (and processes) of the torchrun side")
    p.add_argument("--timeout-s", type=int, default=4 * 3600, help="per launched process")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    import torch

    n, length, tp = args.calibration_samples, args.calibration_seq_length, args.tp
    common = [
        "--loader", "gguf", "--saver", "flextron", "--load-dir", gguf_path(),
        "--calibration-data", "wiki", "--calibration-samples", str(n),
        "--calibration-seq-length", str(length), "--head-estimator", args.head_estimator,
        "--ranking-mode", "thorough",  # what the comparison below reads: every candidate scored
    ]  # fmt: skip
    one = [sys.executable]
    many = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={tp}"]
    with tempfile.TemporaryDirectory(prefix="ranking_tp_") as work:
        one_dir, tp_dir = os.path.join(work, "tp1"), os.path.join(work, f"tp{tp}")
        tp_args = ["--save-dir", tp_dir, "--tensor-model-parallel-size", str(tp)]
        runs = {
            "one_process": run_side("one_process", one, common + ["--save-dir", one_dir], work,
                                    args.timeout_s),
            f"torchrun_tp{tp}": run_side(f"torchrun_tp{tp}", many, common + tp_args, work,
                                         args.timeout_s),
        }  # fmt: skip
        result, (a, b) = compare(one_dir, tp_dir)
        scores = {}
        for name, launcher, size in (("one_process", one, 1), (f"tp{tp}", many, tp)):
            out = os.path.join(work, f"scores_{size}.pt")
            cmd = [os.path.abspath(__file__), "--child-scores", out, str(n), str(length), str(size)]
            launch(f"scores {name}", launcher + cmd, args.timeout_s)
            scores[size] = torch.load(out)
        result["scores"] = score_report(scores[1], scores[tp], a, b)
    result["dealt_tensor_parallel_size"] = [1, tp]
    report = {
        "model": "SmolLM2-135M-Instruct (bundled GGUF, Q4_1 dequantized to fp32)",
        "calibration": f"wiki:train, {n} x {length} tokens",
        "machine": f"CPU, {os.cpu_count()} cores, gloo",
        "runs": runs,
        "orders_equal": result["head_order_equal"] and result["mlp_order_equal"],
        **result,
    }
    skip = ("tensor_max_abs_diff_per", "losses_", "scores")
    print(json.dumps({k: v for k, v in report.items() if not k.startswith(skip)}, indent=1))
    for k, v in report["scores"].items():
        brief = {x: y for x, y in v.items() if x != "differences"}
        print(k, json.dumps(brief), f"{len(v['differences'])} layers differ")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
