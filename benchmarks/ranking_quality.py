"""Held-out loss of ranked SmolLM2-135M sub-networks (no training), per head estimator.

  python benchmarks/ranking_quality.py --json benchmarks/results/cpu_ranking_quality.json
  python benchmarks/ranking_quality.py --mode thorough     # the held-out choice + refinement
  python benchmarks/wiki_leads.py --out leads400.txt
  python benchmarks/ranking_quality.py --calibration-data leads400.txt --calibration-samples 64 \
      --test leads --test-sequences 40          # a new user's setting: a text file, short leads

Ranks once with the library (``rank_and_permute`` in ``--mode``; calibration on the Wikipedia
train split or a file, packed into ``--seq-length`` windows as the converter packs it), then
evaluates every candidate head order it recorded, with the ranked MLP order, on held-out text:
``--test wiki`` packs the Wikipedia test split into windows, ``--test leads`` runs each of the
first test-split leads as its own sequence (``--test-prefix ID`` puts a token such as a BOS in
front of each). "taylor" is the reference of issue 15 (MLP: Minitron activation; heads:
per-sequence first-order Taylor, from the same statistics); "chosen" is what the library wrote
into the checkpoint. Prints a markdown table; the ranking's CPU seconds per stage go to the JSON.

  python benchmarks/ranking_quality.py --gqa-diagnostic --calibration-samples 16 --test-sequences 8

instead keeps each layer's top-k heads by every estimator either inside every KV group (what the
elastic layout can run: k/G per group) or anywhere in the layer (masked; not a prefix sub-network
of the GQA layout), to measure what the per-group constraint costs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROWS = ({"heads": 6}, {"heads": 3}, {"mlp": 768}, {"mlp": 768, "heads": 6})
CONTEXT = ("original", "activation")  # evaluated at 6 heads only (far behind; saves CPU time)


def gqa_diagnostic(source, calib, test) -> dict:
    """Held-out loss with the top heads kept per KV group vs anywhere in the layer (masked)."""
    import torch

    from megatron_flextron.importance import held_out_loss, ranking_model
    from megatron_flextron.importance.collect import collect_statistics

    m = source.model
    heads, groups, d = m.num_attention_heads, m.num_query_groups, m.kv_channels
    model = ranking_model(source)
    stats = collect_statistics(model, calib, m, with_taylor=True)
    keep = {}

    def mask(i):
        def hook(module, args):
            a = args[0]
            k = keep[i].to(a.dtype).view(1, 1, heads, 1)
            return ((a.reshape(*a.shape[:2], heads, d) * k).reshape(a.shape),)

        return hook

    for i, layer in enumerate(model.decoder.layers):
        layer.self_attention.linear_proj.register_forward_pre_hook(mask(i))
    out = {}
    for name in ("activation", "taylor", "taylor_token"):
        for k in (6, 3):
            for where in ("per KV group", "anywhere"):
                for i, s in enumerate(stats[name]):
                    chosen = torch.zeros(heads)
                    if where == "anywhere":
                        chosen[torch.argsort(-s, stable=True)[:k]] = 1
                    else:
                        n = heads // groups
                        best = torch.argsort(-s.reshape(groups, n), dim=1, stable=True)
                        chosen[(best[:, : k // groups] + torch.arange(groups)[:, None] * n)] = 1
                    keep[i] = chosen
                key = f"{k} heads, {where}"
                out.setdefault(key, {})[name] = held_out_loss(model, test)
                print(name, key, round(out[key][name], 4), file=sys.stderr, flush=True)
    return out


def test_batches(args, tokenizer_dir) -> list:
    """Held-out micro-batches of 4: packed test-split windows, or one test-split lead per row
    (sorted by length, each micro-batch padded to its longest lead only)."""
    from megatron_flextron.data.corpus import load_tokenizer, token_sequences, wiki_documents
    from megatron_flextron.lm_step import pad_microbatches

    if args.test == "wiki":
        seqs = token_sequences("wiki:test", tokenizer_dir, args.seq_length, args.test_sequences)
        return pad_microbatches(seqs, 4)
    tokenizer = load_tokenizer(tokenizer_dir)
    prefix = [] if args.test_prefix is None else [args.test_prefix]
    docs = wiki_documents("test")[: args.test_sequences]
    seqs = [(prefix + tokenizer.encode(d).ids)[: args.seq_length + 1] for d in docs]
    seqs = sorted(seqs, key=len)
    return [b for i in range(0, len(seqs), 4) for b in pad_microbatches(seqs[i : i + 4], 4)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calibration-data", default="wiki", help="wiki or a file (converter's)")
    p.add_argument("--calibration-samples", type=int, default=32)
    p.add_argument("--mode", default="fast", choices=["fast", "thorough"])
    p.add_argument("--test", default="wiki", choices=["wiki", "leads"])
    p.add_argument("--test-sequences", type=int, default=8, help="windows (wiki) or leads")
    p.add_argument("--test-prefix", type=int, help="--test leads: a token id put before each")
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--gqa-diagnostic", action="store_true", help="see the module docstring")
    args = p.parse_args(argv)

    import torch

    from megatron_flextron.config import ElasticConfig
    from megatron_flextron.convert.formats.gguf import bundled_smollm2, load_gguf
    from megatron_flextron.data.corpus import token_sequences
    from megatron_flextron.elastic import set_subnetwork
    from megatron_flextron.elastic.tp_layout import load_canonical_state_dict
    from megatron_flextron.importance import held_out_loss, rank_and_permute, ranking_model
    from megatron_flextron.importance.permute import permute_state
    from megatron_flextron.lm_step import pad_microbatches
    from megatron_flextron.parallel import destroy_model_parallel, initialize_model_parallel

    initialize_model_parallel(1, 1)
    torch.manual_seed(0)
    t0 = time.time()
    source = load_gguf(bundled_smollm2())
    m = source.model
    source.elastic = ElasticConfig.from_ratios(m, head_ratios=(1.0, 2 / 3, 1 / 3))
    if args.gqa_diagnostic:
        splits = (("wiki:train", args.calibration_samples), ("wiki:test", args.test_sequences))
        calib, test = (
            pad_microbatches(token_sequences(s, source.tokenizer_dir, args.seq_length, n), 4)
            for s, n in splits
        )
        results = gqa_diagnostic(source, calib, test)
        destroy_model_parallel()
        names = ("activation", "taylor", "taylor_token")
        print("| kept heads | " + " | ".join(names) + " |")
        print("| --- |" + " ---: |" * len(names))
        for key, row in results.items():
            print(f"| {key} | " + " | ".join(f"{row[n]:.3f}" for n in names) + " |")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"gqa_diagnostic": results, "args": vars(args)}, f, indent=1)
                f.write("\n")
        return 0
    ranked = rank_and_permute(
        source,
        args.calibration_data,
        samples=args.calibration_samples,
        seq_length=args.seq_length,
        mode=args.mode,
    )
    rank_s = time.time() - t0
    info = ranked.metadata["importance"]
    mlp_orders = [torch.tensor(o) for o in info["mlp_order"]]
    candidates = dict(info["head_selection"]["head_order"])
    if info["head_refinement"]:
        candidates[info["head_estimator"] + "+refined"] = info["head_refinement"]["head_order"]
    candidates["chosen"] = info["head_order"]
    test = test_batches(args, source.tokenizer_dir)
    print(info["head_estimator"], info["head_selection"]["loss"], file=sys.stderr, flush=True)
    model = ranking_model(source)
    results, seen = {}, {}
    for name, orders in candidates.items():
        if json.dumps(orders) in seen:  # the same order as an evaluated candidate
            for row in results.values():
                if seen[json.dumps(orders)] in row:
                    row[name] = row[seen[json.dumps(orders)]]
            continue
        seen[json.dumps(orders)] = name
        state = permute_state(
            source.state, m, mlp_orders=mlp_orders, head_orders=[torch.tensor(o) for o in orders]
        )
        load_canonical_state_dict(model, state, m)
        for spec in ROWS if name not in CONTEXT else ROWS[:1]:
            key = json.dumps(spec, separators=(",", ":"))
            if "heads" not in spec and results.get(key):  # the MLP order is shared
                continue
            set_subnetwork(model, spec, m, source.elastic)
            results.setdefault(key, {})[name] = held_out_loss(model, test)
            set_subnetwork(model, None, m, source.elastic)
            print(name, key, round(results[key][name], 4), file=sys.stderr, flush=True)
    results["{}"] = {"chosen": held_out_loss(model, test)}
    destroy_model_parallel()

    names = list(candidates)
    print("| sub-network | " + " | ".join(names) + " |")
    print("| --- |" + " ---: |" * len(names))
    for key, row in results.items():
        cells = [f"{row[n]:.3f}" if n in row else "" for n in names]
        print(f"| `{key}` | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "model": "SmolLM2-135M (bundled GGUF)",
                    "command": " ".join(["python benchmarks/ranking_quality.py", *sys.argv[1:]]),
                    "calibration": f"{args.calibration_data}, "
                    f"{args.calibration_samples} x {args.seq_length}",
                    "test": f"{args.test}, {args.test_sequences}"
                    + (f", prefix {args.test_prefix}" if args.test_prefix is not None else ""),
                    "mode": args.mode,
                    "rank_wall_seconds": round(rank_s, 1),
                    "rank_cpu_seconds": info["cpu_seconds"],
                    "selection": {
                        k: info[k]
                        for k in ("head_estimator", "head_refinement", "mlp_estimator")
                    }
                    | {"head_selection_loss": info["head_selection"]["loss"]},
                    "test_loss": results,
                },
                f,
                indent=1,
            )
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
