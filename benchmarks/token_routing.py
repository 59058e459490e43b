"""Token-routed MLP inference vs static sub-networks at equal average FLOPs, side by side.

One elastic MLP (megatron's, real slicing) and a token router whose choices spread evenly over the
widths F, 3F/4, F/2, F/4 (average 62.5% of the FLOPs). Rows, interleaved over timing rounds:
  full width           the MLP at full width on every token
  flop-proportional    full width x the routed tokens' average width fraction (the ideal)
  routed (dispatch)    router + group tokens by width + each group on its weight prefix + scatter
  static at the mean   every token at the one width closest to that average
Target: routed / flop-proportional <= 1.05.

  python benchmarks/token_routing.py                    # SmolLM2-135M's MLP, 4096 tokens, CPU
  python benchmarks/token_routing.py --preset cpu-8b    # an 8B-sized MLP (4096 x 14336), CPU
  python benchmarks/token_routing.py --preset gpu-8b    # 8B-sized MLP, 16384 tokens, bf16, GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_flextron.config import ModelConfig  # noqa: E402
from megatron_flextron.elastic import build_gpt_model  # noqa: E402
from megatron_flextron.parallel import initialize_model_parallel  # noqa: E402
from megatron_flextron.routers.token import TokenRouter, enable_token_routing  # noqa: E402

PRESETS = {
    "cpu": dict(hidden=576, ffn=1536, tokens=4096, dtype="float32"),
    "cpu-8b": dict(hidden=4096, ffn=14336, tokens=512, dtype="float32"),
    "gpu-8b": dict(hidden=4096, ffn=14336, tokens=16384, dtype="bfloat16"),
}


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    cfg = PRESETS[args.preset]
    dtype = getattr(torch, cfg["dtype"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    initialize_model_parallel(1, 1)
    h, f = cfg["hidden"], cfg["ffn"]
    model_cfg = ModelConfig(
        "llama",
        num_layers=1,
        hidden_size=h,
        ffn_hidden_size=f,
        num_attention_heads=h // 128,
        num_query_groups=h // 128,
        kv_channels=128,
        vocab_size=128,
        max_position_embeddings=64,
    )
    gpt = build_gpt_model(model_cfg, model_cfg.transformer_config(params_dtype=dtype))
    mlp = gpt.to(device).eval().decoder.layers[0].mlp
    widths = [f, 3 * f // 4, f // 2, f // 4]
    router = TokenRouter(h, len(widths)).to(device)
    routing = enable_token_routing(gpt, widths, [router])[0]
    x = torch.randn(cfg["tokens"], 1, h, device=device, dtype=dtype)
    with torch.no_grad():
        # a linear router that splits the tokens evenly over the widths: logits_c = c * (w.x) -
        # (sum of the first c quartile edges of w.x), so the argmax counts the edges below w.x
        w = torch.randn(h, device=device) / h**0.5
        score = x.float()[:, 0] @ w
        edges = score.quantile(torch.tensor([0.25, 0.5, 0.75], device=device))
        router.linear.weight.copy_(torch.arange(len(widths), device=device)[:, None] * w)
        router.linear.bias.copy_(-torch.cat([edges.new_zeros(1), edges.cumsum(0)]))
        choices = router(x).argmax(-1)

    def routed():
        return mlp(x)  # router logits, argmax, dispatch by width, scatter back

    mean_fraction = sum(widths[c] for c in choices.flatten().tolist()) / (f * choices.numel())
    static_width = min(widths + [f // 2 + f // 8], key=lambda w: abs(w / f - mean_fraction))

    def at_width(width):
        def run():
            mlp.__dict__["token_routing"] = None
            mlp.set_active_width(width)
            out = mlp(x)
            mlp.set_active_width(None)
            mlp.__dict__["token_routing"] = routing
            return out

        return run

    rows = {
        "full width": at_width(f),
        "routed (dispatch)": routed,
        "static at the mean": at_width(static_width),
    }
    times = {name: [] for name in rows}
    with torch.inference_mode():
        for fn in rows.values():
            fn()
        for _ in range(args.rounds):
            for name, fn in rows.items():
                _sync()
                start = time.perf_counter()
                fn()
                _sync()
                times[name].append((time.perf_counter() - start) * 1e3)
    ms = {name: statistics.median(t) for name, t in times.items()}
    ideal = ms["full width"] * mean_fraction
    result = {
        "preset": args.preset,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "dtype": cfg["dtype"],
        "hidden": h,
        "ffn": f,
        "tokens": cfg["tokens"],
        "mean_width_fraction": round(mean_fraction, 4),
        "static_width": static_width,
        "ms": {k: round(v, 3) for k, v in ms.items()},
        "flop_proportional_ms": round(ideal, 3),
        "routed / flop-proportional": round(ms["routed (dispatch)"] / ideal, 3),
        "routed / static at the mean": round(ms["routed (dispatch)"] / ms["static at the mean"], 3),
        "static at the mean / its flop-proportional": round(
            ms["static at the mean"] / (ms["full width"] * static_width / f), 3
        ),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
