"""Elastic MoE sub-networks vs megatron's MoE of the smaller shape: time per token, side by side.

For each sub-network (half the experts; half the expert width; top-1 of top-2; all three), in one
process, on the same input, with interleaved timing rounds (medians):
  elastic sub-network   the elastic model set to the sub-network (prefix views, no copies)
  dense twin            megatron's own MoE (build_hybrid_model(..., elastic=False)) of exactly
                        that smaller shape, loaded with the exported weights (export_subnetwork)
  masked                the same sub-network as a mask: the dropped experts' router logits at
                        -inf (the elastic path) and every expert at full width with the neurons
                        past the kept ones multiplied by zero (the upstream way to shrink width)
and, once, the elastic full model and megatron's MoE at full size. Two modes: a training step
(forward + backward) and inference (forward only, torch.inference_mode). The target (issue 20):
elastic sub-network / dense twin within 5% on CPU. The twin's logits are checked against the
elastic sub-network's before timing (max |diff|, printed), so the rows compute the same function.

  python benchmarks/moe_slicing.py --json benchmarks/results/cpu_moe_slicing.json
  python benchmarks/moe_slicing.py --one-expert   # one expert at half width vs its twin
  python benchmarks/moe_slicing.py --sliced-grad  # fused slice gradient vs autograd of the view
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_models import TINY_MOE, moe_config  # noqa: E402

from megatron_flextron.checkpoint.state import Checkpoint  # noqa: E402
from megatron_flextron.config import ElasticConfig, ModelConfig  # noqa: E402
from megatron_flextron.convert.export import export_subnetwork  # noqa: E402
from megatron_flextron.elastic import set_subnetwork  # noqa: E402
from megatron_flextron.elastic.blocks import hybrid_name  # noqa: E402
from megatron_flextron.elastic.hybrid import build_hybrid_model  # noqa: E402
from megatron_flextron.elastic.tp_layout import gather_canonical  # noqa: E402
from megatron_flextron.parallel import initialize_model_parallel  # noqa: E402

BATCH, SEQ = 4, 256
SUBNETWORKS = {
    "half experts": {"experts": 4},
    "half expert width": {"moe_ffn": 256},
    "top-1 of top-2": {"topk": 1},
    "all three": {"experts": 4, "moe_ffn": 256, "topk": 1},
}


class MaskedExpert(torch.nn.Module):
    """An expert (megatron's MLP, elastic linears at full width) whose neurons past ``width``
    are multiplied by zero: full-width compute, the sub-network's function."""

    def __init__(self, expert, width: int):
        super().__init__()
        self.expert = expert
        full = expert.linear_fc2.input_size
        self.register_buffer("mask", (torch.arange(full) < width).float(), persistent=False)

    @property
    def linear_fc1(self):  # read by the elastic experts: full width, so megatron's own path
        return self.expert.linear_fc1

    def forward(self, hidden, per_token_scale=None):
        e = self.expert
        gate, up = torch.chunk(e.linear_fc1(hidden)[0], 2, dim=-1)
        intermediate = e.config.activation_func(gate) * up * self.mask
        if per_token_scale is not None:
            intermediate = intermediate * per_token_scale.unsqueeze(-1)
        return e.linear_fc2(intermediate)


def mask_expert_width(model, width: int) -> None:
    """Wrap every expert of ``model`` (elastic, full width) in a MaskedExpert of ``width``."""
    for layer in model.decoder.layers:
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None:
            for i, expert in enumerate(experts.local_experts):
                inner = expert.expert if isinstance(expert, MaskedExpert) else expert
                experts.local_experts[i] = MaskedExpert(inner, width)


def load(model, state):
    result = model.load_state_dict({hybrid_name(k): v for k, v in state.items()}, strict=False)
    missing = [k for k in result.missing_keys if "_extra_state" not in k]
    assert not missing and not result.unexpected_keys, (missing, result.unexpected_keys)
    return model


def training_step(model, tokens, labels, position_ids):
    loss = model(tokens, position_ids, None, labels=labels).float().mean()
    loss.backward()
    for p in model.parameters():
        p.grad = None


def inference(model, tokens, labels, position_ids):
    with torch.inference_mode():
        model(tokens, position_ids, None)


def build(m: ModelConfig, elastic: ElasticConfig):
    """{row name: (model, sub-network spec or None)} and the max |logit diff| per twin."""
    torch.manual_seed(0)
    full = build_hybrid_model(m, m.transformer_config(), elastic=True)
    with torch.no_grad():  # routers at a larger scale, as trained ones: uneven, decisive routing
        for name, p in full.named_parameters():
            if name.endswith("router.weight"):
                p.mul_(50.0)
    state = gather_canonical(full, m)
    stock = load(
        build_hybrid_model(m, m.transformer_config(), elastic=False, core_attention="sdpa"), state
    )
    rows = {"elastic full": (full, None), "megatron MoE full": (stock, None)}
    tokens, _, positions = _inputs(m)
    diffs = {}
    for label, spec in SUBNETWORKS.items():
        subnet = set_subnetwork(full, spec, m, elastic)
        small = export_subnetwork(Checkpoint(model=m, state=state), subnet)
        twin = build_hybrid_model(
            small.model, small.model.transformer_config(), elastic=False, core_attention="sdpa"
        )
        load(twin, dict(small.state))
        diffs[label] = _max_diff(full, twin, tokens, positions)
        masked = load(build_hybrid_model(m, m.transformer_config(), elastic=True), state)
        set_subnetwork(masked, {k: v for k, v in spec.items() if k != "moe_ffn"}, m, elastic)
        mask_expert_width(masked, subnet.moe[0][1])
        diffs[label + " (masked)"] = _max_diff(full, masked, tokens, positions)
        rows[f"elastic {label}"] = (full, spec)
        rows[f"twin {label}"] = (twin, None)
        rows[f"masked {label}"] = (masked, None)
    set_subnetwork(full, None, m, elastic)
    # control: the full model is not the last twin, so a zero above is a real check
    diffs["control: elastic full vs the last twin"] = _max_diff(full, twin, tokens, positions)
    return rows, diffs


@torch.no_grad()
def _max_diff(a, b, tokens, positions) -> float:
    return (a(tokens, positions, None) - b(tokens, positions, None)).abs().max().item()


def _inputs(m: ModelConfig):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, m.vocab_size, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, m.vocab_size, (BATCH, SEQ), generator=g)
    return tokens, labels, torch.arange(SEQ).expand(BATCH, SEQ)


def measure(rows, fn, inputs, rounds, m, elastic):
    """Per row, the CPU seconds of each round (process time: on a shared machine the time this
    process computes, not the time it waits for a core). Rounds interleave every row, in
    alternating order, so that slow phases of the machine hit every row alike."""
    times = {name: [] for name in rows}
    names = list(rows)
    for r in range(rounds + 1):  # round 0 warms up
        for name in names if r % 2 else names[::-1]:
            model, spec = rows[name]
            if name.startswith("elastic"):
                set_subnetwork(model, spec, m, elastic)
            t0 = time.process_time()
            fn(model, *inputs)
            times[name].append(time.process_time() - t0)
    return {name: t[1:] for name, t in times.items()}


def table(times, tokens):
    """Microseconds per token (medians); ratios are medians of the per-round ratios."""

    def ratio(a, b):
        return round(statistics.median(x / y for x, y in zip(times[a], times[b])), 3)

    out = {
        "us_per_token": {
            k: round(statistics.median(v) / tokens * 1e6, 2) for k, v in times.items()
        },
        "elastic full / megatron MoE full": ratio("elastic full", "megatron MoE full"),
    }
    for label in SUBNETWORKS:
        out[label] = {
            "elastic / twin": ratio(f"elastic {label}", f"twin {label}"),
            "elastic / elastic full": ratio(f"elastic {label}", "elastic full"),
            "masked / elastic": ratio(f"masked {label}", f"elastic {label}"),
        }
    return out


def _print(mode, result):
    print(f"\n{mode}: microseconds per token (batch {BATCH} x seq {SEQ})")
    print(f"{'sub-network':<20}{'elastic':>10}{'twin':>10}{'masked':>10}"
          f"{'el/twin':>10}{'el/full':>10}{'mask/el':>10}")  # fmt: skip
    us = result["us_per_token"]
    print(f"{'full':<20}{us['elastic full']:>10}{us['megatron MoE full']:>10}{'':>10}"
          f"{result['elastic full / megatron MoE full']:>10}")  # fmt: skip
    for label in SUBNETWORKS:
        r = result[label]
        print(f"{label:<20}{us['elastic ' + label]:>10}{us['twin ' + label]:>10}"
              f"{us['masked ' + label]:>10}{r['elastic / twin']:>10}"
              f"{r['elastic / elastic full']:>10}{r['masked / elastic']:>10}")  # fmt: skip


def one_expert(rounds: int, tokens=256, hidden=256, full=512, width=256) -> dict:
    """One SwiGLU expert's training step (forward + backward) on ``tokens`` tokens at ``width`` of
    ``full`` neurons, process time relative to contiguous weights of that width: prefix views
    with the gate and up pieces concatenated (megatron's MLP.forward on the elastic fc1) and fed
    to the GLU directly (the elastic experts' path)."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    x = torch.randn(tokens, hidden, requires_grad=True)
    w1, w2 = torch.randn(2 * full, hidden), torch.randn(hidden, full)
    small = [w1.view(2, full, hidden)[:, :width].reshape(2 * width, hidden), w2[:, :width]]
    params = [p.requires_grad_() for p in [w1, w2, *(t.contiguous() for t in small)]]
    w1, w2, s1, s2 = params

    def twin():
        gate, up = torch.chunk(F.linear(x, s1), 2, -1)
        return F.linear(F.silu(gate) * up, s2)

    def pieces(concatenate: bool):
        gate, up = F.linear(x, w1[:width]), F.linear(x, w1[full : full + width])
        if concatenate:
            gate, up = torch.chunk(torch.cat([gate, up], -1), 2, -1)
        return F.linear(F.silu(gate) * up, w2[:, :width])

    rows = {"twin": twin, "concatenated": lambda: pieces(True), "pieces": lambda: pieces(False)}
    times = {name: [] for name in rows}
    for _ in range(rounds + 1):  # round 0 warms up
        for name, fn in rows.items():
            t0 = time.process_time()
            for _ in range(10):
                fn().sum().backward()
                for p in [x, *params]:
                    p.grad = None
            times[name].append(time.process_time() - t0)
    return {
        f"{name} / twin": round(
            statistics.median(a / b for a, b in zip(times[name][1:], times["twin"][1:])), 3
        )
        for name in ("concatenated", "pieces")
    }


def sliced_grad(rounds: int) -> dict:
    """One SwiGLU expert's training step at half width, its slices' weight gradient by plain
    autograd of the views vs elastic/sliced_linear.py (straight into the slice of the full
    gradient; under DDP into main_grad), process time ratio fused / plain, at this benchmark's
    expert shape and at a larger one: why sliced_linear.FUSED_MIN_NUMEL sits between them."""
    import torch.nn.functional as F

    from megatron_flextron.elastic.sliced_linear import sliced_linear

    def ratio(tokens, hidden, full, ddp):
        torch.manual_seed(0)
        x = torch.randn(tokens, hidden, requires_grad=True)
        w1 = torch.nn.Parameter(torch.randn(2 * full, hidden))
        w2 = torch.nn.Parameter(torch.randn(hidden, full))
        k, accumulators = full // 2, []
        for w in (w1, w2) if ddp else ():  # megatron DDP's hook: param.grad into main_grad
            w.main_grad = torch.zeros_like(w)
            accumulators.append(w.expand_as(w).grad_fn.next_functions[0][0])
            accumulators[-1].register_hook(functools.partial(_into_main_grad, w))

        def plain():
            gate, up = F.linear(x, w1[:k]), F.linear(x, w1[full : full + k])
            return F.linear(F.silu(gate) * up, w2[:, :k])

        def fused():
            gate = sliced_linear(x, w1, slice(0, k), 0)
            up = sliced_linear(x, w1, slice(full, full + k), 0)
            return sliced_linear(F.silu(gate) * up, w2, slice(0, k), 1)

        times = {"plain": [], "fused": []}
        for r in range(rounds + 1):  # round 0 warms up
            for name, fn in sorted(zip(times, (plain, fused)), reverse=bool(r % 2)):
                t0 = time.process_time()
                for _ in range(5):
                    fn().sum().backward()
                    x.grad = w1.grad = w2.grad = None
                times[name].append(time.process_time() - t0)
        return round(
            statistics.median(f / p for f, p in zip(times["fused"][1:], times["plain"][1:])), 3
        )

    shapes = {"256 tokens, hidden 256, expert 512 -> 256": (256, 256, 512),
              "512 tokens, hidden 1024, expert 1024 -> 512": (512, 1024, 1024)}  # fmt: skip
    return {
        f"{label}{' (DDP main_grad)' if ddp else ''}: fused / plain": ratio(*shape, ddp)
        for label, shape in shapes.items()
        for ddp in (False, True)
    }


def _into_main_grad(w, *unused):
    if w.grad is not None:
        w.main_grad.add_(w.grad)
    w.grad = None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument(
        "--one-expert", action="store_true", help="only one expert's step: why width costs more"
    )
    parser.add_argument(
        "--sliced-grad", action="store_true", help="only the fused slice gradient vs autograd"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.sliced_grad:
        print(json.dumps(sliced_grad(max(args.rounds, 15)), indent=1))
        return
    if args.one_expert:
        print(json.dumps(one_expert(max(args.rounds, 30))))
        return
    initialize_model_parallel(1, 1)
    m = moe_config()
    elastic = ElasticConfig(expert_choices=(4,), moe_ffn_choices=(256,), topk_choices=(1,))
    rows, diffs = build(m, elastic)
    print("max |logit diff| vs the elastic sub-network:",
          {k: f"{v:.1e}" for k, v in diffs.items()})  # fmt: skip
    inputs = _inputs(m)
    results = {
        "device": f"CPU ({torch.get_num_threads()} thread), process time",
        "model": TINY_MOE,
        "batch": BATCH,
        "seq": SEQ,
        "rounds": args.rounds,
        "max_logit_diff": diffs,
    }
    for mode, fn in (("training step", training_step), ("inference", inference)):
        times = measure(rows, fn, inputs, args.rounds, m, elastic)
        results[mode] = table(times, BATCH * SEQ)
        _print(mode, results[mode])
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
