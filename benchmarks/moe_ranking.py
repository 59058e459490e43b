"""Held-out loss of pruned MoE shapes: experts, heads and layers ranked vs source order.

  python benchmarks/moe_ranking.py --json benchmarks/results/cpu_moe_ranking.json

No pretrained MoE ships offline, so a tiny one is trained here (CPU, a few minutes): a byte-level
BPE tokenizer on the Wikipedia train split, then a Llama-style model whose every MLP is a mixture
of 8 experts, top-2, Mixtral routing (softmax over the top-2 logits), megatron's auxiliary
load-balancing loss, AdamW on packed train windows. The library then ranks it as the converter
does (``rank_and_permute`` with ``--calibration-data wiki``: calibration windows of the train
split, a quarter held out for the choice), and every candidate order is evaluated on windows of
the Wikipedia test split at pruned shapes (mean NLL). Prints two markdown tables: expert orders,
then head orders (half the heads: one per KV group) and the layer ranking (3 of 4 layers kept).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_models import ranking_moe  # noqa: E402

E = 8
SHAPES = (  # (label, experts, moe_ffn, topk); None = full
    ("full model", None, None, None),
    ("6 of 8 experts", 6, None, None),
    ("4 of 8 experts", 4, None, None),
    ("2 of 8 experts", 2, None, None),
    ("expert width 64 of 128", None, 64, None),
    ("4 experts, width 64", 4, 64, None),
    ("4 experts, top-1", 4, None, 1),
    ("4 experts, width 64, top-1", 4, 64, 1),
)


def train_tokenizer(directory: str, docs, vocab: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"])
    tok.train_from_iterator(docs, trainer)
    tok.save(os.path.join(directory, "tokenizer.json"))


def train(m, windows, steps: int, batch: int, lr: float, aux: float, seed: int = 0):
    """A tiny MoE trained with AdamW (cosine schedule) through megatron's schedule."""
    import torch

    from megatron_flextron.elastic import build_elastic_model
    from megatron_flextron.elastic.tp_layout import gather_canonical
    from megatron_flextron.lm_step import forward_backward, pad_microbatches

    torch.manual_seed(seed)
    overrides = {}
    if aux > 0:
        overrides = dict(moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=aux)
    model = build_elastic_model(m, m.transformer_config(**overrides))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(seed + 1)
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = (
                lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
            )
        idx = torch.randint(0, len(windows), (batch,), generator=g).tolist()
        mb = pad_microbatches([windows[i] for i in idx], batch)
        model.zero_grad(set_to_none=True)
        out = forward_backward(model, mb)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(out["loss"])
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step} loss {out['loss']:.3f}", file=sys.stderr)
    return {k: v.detach().clone() for k, v in gather_canonical(model, m).items()}, losses


def drop_one_orders(ckpt, batches) -> tuple:
    """A loss-based reference order (L x E forward passes): each expert of each layer is
    dropped alone (moved last, that layer runs E-1 experts, the router renormalizes over the
    rest) and the experts are sorted by the loss increase, largest first."""
    import torch

    from megatron_flextron.importance import held_out_loss, ranking_model
    from megatron_flextron.importance.expert_permute import permute_moe_state
    from megatron_flextron.importance.experts import moe_layers
    from megatron_flextron.importance.moe_ranking import load_only

    m = ckpt.model
    model = ranking_model(ckpt)
    base = held_out_loss(model, batches)
    identity = [torch.arange(E) for _ in range(m.num_layers)]
    increase = torch.zeros(m.num_layers, E, dtype=torch.float64)
    for block, layer in moe_layers(model):
        for e in range(E):
            orders = list(identity)
            orders[block.index] = torch.tensor([x for x in range(E) if x != e] + [e])
            load_only(model, permute_moe_state(ckpt.state, m, orders), m)
            layer.set_active(E - 1)  # not a configured choice: the layer itself, not a spec
            increase[block.index, e] = held_out_loss(model, batches) - base
            layer.set_active()
    return [torch.argsort(-row, stable=True) for row in increase], increase


def spearman(a, b) -> float:
    import torch

    ra, rb = (torch.argsort(torch.argsort(torch.as_tensor(x))).double() for x in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def evaluate(ckpt, ranked, test, reference=None) -> dict:
    """Held-out NLL of every candidate expert order (source neuron order) and of the checkpoint
    the library wrote ("chosen": its expert order and its neuron order) at every shape."""
    import torch

    from megatron_flextron.elastic import set_subnetwork
    from megatron_flextron.importance import held_out_loss, ranking_model
    from megatron_flextron.importance.expert_permute import permute_moe_state
    from megatron_flextron.importance.moe_ranking import load_only

    m = ckpt.model
    candidates = ranked.metadata["importance"]["expert_selection"]["expert_order"]
    columns = {
        name: permute_moe_state(ckpt.state, m, [torch.tensor(o) for o in candidates[key]])
        for name, key in (
            ("source", "original"),
            ("frequency", "frequency"),
            ("REAP", "reap"),
            ("REAP x frequency", "reap_total"),
        )
    }
    if reference is not None:
        columns["drop-one loss"] = permute_moe_state(ckpt.state, m, reference)
    columns["chosen"] = ranked.state
    model = ranking_model(ckpt)
    table = {}
    for name, state in columns.items():
        load_only(model, state, m)
        for label, e, f, k in SHAPES:
            spec = {"experts": e, "moe_ffn": f, "topk": k}
            set_subnetwork(model, {k: v for k, v in spec.items() if v}, m, ckpt.elastic)
            table.setdefault(label, {})[name] = held_out_loss(model, test)
            set_subnetwork(model, None, m, ckpt.elastic)
    return table


HEAD_SHAPES = (  # (label, sub-network spec)
    ("full model", None),
    ("2 of 4 heads (1 per KV group)", {"heads": 2}),
    ("2 of 4 heads, 4 of 8 experts", {"heads": 2, "experts": 4}),
)


def evaluate_heads(ckpt, ranked, test) -> dict:
    """Held-out NLL at the head shapes of every candidate head order (experts in source order)
    and of the checkpoint the library wrote ("chosen": heads, experts and neurons ranked); and
    with 3 of 4 layers: the library's layer ranking's top 3 vs the first 3 (source order)."""
    import torch

    from megatron_flextron.elastic import set_subnetwork
    from megatron_flextron.elastic.tp_layout import load_canonical_state_dict
    from megatron_flextron.importance import held_out_loss, ranking_model
    from megatron_flextron.importance.permute import permute_state

    m = ckpt.model
    info = ranked.metadata["importance"]
    columns = {
        ("source" if name == "original" else name): permute_state(
            ckpt.state, m, head_orders=[torch.tensor(o) for o in orders]
        )
        for name, orders in info["head_selection"]["head_order"].items()
    }
    columns["chosen"] = ranked.state
    model = ranking_model(ckpt)

    def loss(spec) -> float:
        set_subnetwork(model, spec, m, ckpt.elastic)
        try:
            return held_out_loss(model, test)
        finally:
            set_subnetwork(model, None, m, ckpt.elastic)

    table = {}
    for name, state in columns.items():
        load_canonical_state_dict(model, state, m)
        for label, spec in HEAD_SHAPES:
            table.setdefault(label, {})[name] = loss(spec)
    load_canonical_state_dict(model, ckpt.state, m)  # layers: the same weights, other layers
    top = sorted(ranked.elastic.layer_ranking[:3])
    layers = {"ranked": top, "ranked_loss": loss({"layers": top})}
    return table, dict(layers, source_loss=loss({"layers": [0, 1, 2]}))


def print_table(table: dict) -> None:
    columns = list(next(iter(table.values())))
    print(f"| held-out loss | {' | '.join(columns)} |")
    print(f"| --- | {' | '.join('---:' for _ in columns)} |")
    for label, row in table.items():
        print(f"| {label} | {' | '.join(f'{row[c]:.3f}' for c in columns)} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-length", type=int, default=64)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--aux-loss", type=float, default=1e-2)
    p.add_argument("--calibration-samples", type=int, default=64)
    p.add_argument("--test-sequences", type=int, default=128)
    p.add_argument("--seed", type=int, default=0, help="initialization and batch order")
    p.add_argument("--mode", choices=("fast", "thorough"), default="thorough")
    p.add_argument(
        "--drop-one",
        action="store_true",
        help="also the order by the loss increase when each expert alone is dropped",
    )
    p.add_argument("--json", help="write the results here (atomically)")
    args = p.parse_args(argv)

    import torch

    from megatron_flextron.checkpoint.io import write_json
    from megatron_flextron.checkpoint.state import Checkpoint
    from megatron_flextron.config import ElasticConfig
    from megatron_flextron.data.corpus import load_tokenizer, packed_sequences, wiki_documents
    from megatron_flextron.importance import rank_and_permute
    from megatron_flextron.lm_step import pad_microbatches
    from megatron_flextron.parallel import initialize_model_parallel

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    initialize_model_parallel(1, 1, seed=1234)
    start = time.time()
    with tempfile.TemporaryDirectory() as tok_dir:
        docs = wiki_documents("train")
        train_tokenizer(tok_dir, docs[:3000], args.vocab)
        tok = load_tokenizer(tok_dir)
        m = ranking_moe(args.vocab, args.seq_length, E)
        windows = packed_sequences(docs[1000:], tok, args.seq_length)
        state, losses = train(m, windows, args.steps, args.batch, args.lr, args.aux_loss, args.seed)
        trained = time.time() - start
        ckpt = Checkpoint(
            model=m, state=state, tokenizer_dir=tok_dir, elastic=ElasticConfig.from_ratios(m)
        )
        ranked = rank_and_permute(
            ckpt, "wiki", samples=args.calibration_samples, seq_length=args.seq_length,
            mode=args.mode,
        )  # fmt: skip
        ranking_s = time.time() - start - trained
        test = pad_microbatches(
            packed_sequences(wiki_documents("test"), tok, args.seq_length, args.test_sequences), 16
        )
        reference = None
        if args.drop_one:
            calib = pad_microbatches(
                packed_sequences(docs, tok, args.seq_length, args.calibration_samples), 16
            )
            reference, increase = drop_one_orders(ckpt, calib)
        table = evaluate(ckpt, ranked, test, reference)
        head_table, layers = evaluate_heads(ckpt, ranked, test)
    info = ranked.metadata["importance"]
    print_table(table)
    print()
    print_table(head_table)
    print(
        f"chosen heads: {info['head_estimator']}; layer ranking {ranked.elastic.layer_ranking} "
        f"(scores {[round(x, 3) for x in info['layer_scores']]}); 3 of 4 layers: ranked "
        f"{layers['ranked']} {layers['ranked_loss']:.3f}, source [0, 1, 2] "
        f"{layers['source_loss']:.3f}"
    )
    freq = torch.tensor(info["expert_scores"]["frequency"])
    print(
        f"trained {args.steps} steps in {trained:.0f} s (last-20 train loss "
        f"{sum(losses[-20:]) / 20:.3f}); ranking {ranking_s:.0f} s; chosen: experts "
        f"{info['expert_estimator']}, neurons {info['expert_neuron_estimator']}; routing share "
        f"per expert min {freq.min():.3f} max {freq.max():.3f}"
    )
    correlation = None
    if args.drop_one:  # per layer: how each score orders experts vs the drop-one loss increase
        correlation = {
            k: [round(spearman(s, inc), 3) for s, inc in zip(info["expert_scores"][k], increase)]
            for k in ("frequency", "reap", "reap_total")
        }
        print(f"Spearman vs drop-one loss increase, per layer: {correlation}")
    if args.json:
        write_json(
            args.json,
            {
                "args": vars(args),
                "table": table,
                "head_table": head_table,
                "layers": layers,
                "layer_ranking": list(ranked.elastic.layer_ranking),
                "train_loss_last20": sum(losses[-20:]) / 20,
                "train_seconds": trained,
                "ranking_seconds": ranking_s,
                "spearman_vs_drop_one": correlation,
                "importance": {k: v for k, v in info.items() if k != "expert_neuron_order"},
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
