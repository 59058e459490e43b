"""Elastic vs dense vs masked: training-step and inference time and memory, side by side in one run.

Rows (same process, same input, interleaved timing rounds):
  stock dense         megatron's GPTModel, local spec (the reference cost)
  elastic full        the elastic model at full size (must cost the same: target <= 1.02x)
  elastic 50%         the elastic model at 50% MLP width and 50% heads (real slicing)
  dense 50% shape     a stock dense GPTModel of that smaller shape (target: elastic 50% <= 1.05x)
  masked 50%          full-width compute with the unused neurons/heads zeroed (upstream approach)
  (sdpa vs local)     the stock model with SDPA core attention, to show the attention kernel gain

Each family is measured twice: a training step (forward + backward) and inference (forward
only, torch.inference_mode); the JSON's rows are FAMILY and "FAMILY inference".

Memory: on GPU the model's weights plus the CUDA peak its step allocates above what is resident
(all models of the table sit on the GPU together); on CPU the parameters plus the bytes autograd
saves for backward (activations, and weight copies such as the GQA gather), counted with
saved-tensor hooks.

  python benchmarks/elastic_vs_dense.py                     # small CPU config
  python benchmarks/elastic_vs_dense.py --preset gpu-1b     # ~1B, bf16, seq 2048 (one GPU)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_flextron.config import ElasticConfig, ModelConfig  # noqa: E402
from megatron_flextron.elastic import build_gpt_model, set_subnetwork  # noqa: E402
from megatron_flextron.elastic.mlp import ElasticMLP  # noqa: E402
from megatron_flextron.elastic.model import GPTModel  # noqa: E402
from megatron_flextron.elastic.sdpa_attention import SDPAttention  # noqa: E402
from megatron_flextron.elastic.specs import elastic_layer_spec, replace_in_spec  # noqa: E402
from megatron_flextron.parallel import initialize_model_parallel  # noqa: E402

PRESETS = {
    # name: (model kwargs, batch, seq, dtype)
    "cpu": (
        dict(
            num_layers=4,
            hidden_size=512,
            ffn_hidden_size=2048,
            num_attention_heads=8,
            vocab_size=4096,
            max_position_embeddings=256,
        ),
        4,
        256,
        torch.float32,
    ),
    "gpu-1b": (
        dict(
            num_layers=16,
            hidden_size=2048,
            ffn_hidden_size=8192,
            num_attention_heads=16,
            vocab_size=50304,
            max_position_embeddings=2048,
        ),
        4,
        2048,
        torch.bfloat16,
    ),
}


class MaskedMLP(ElasticMLP):
    """Full-width MLP whose hidden units beyond the active width are multiplied by zero."""

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        width = self.masked_width // self.tp_size
        mask = torch.zeros(
            self.linear_fc2.input_size_per_partition,
            dtype=hidden_states.dtype,
            device=hidden_states.device,
        )
        mask[:width] = 1
        intermediate, bias = self.linear_fc1(hidden_states)
        if bias is not None:
            intermediate = intermediate + bias
        if self.config.gated_linear_unit:
            gate, up = torch.chunk(intermediate, 2, dim=-1)
            intermediate = self.config.activation_func(gate) * up
        else:
            intermediate = self.config.activation_func(intermediate)
        return self.linear_fc2(intermediate * mask)


class MaskedSDPAttention(SDPAttention):
    """Full head count; the context of every head past the kept ones is multiplied by zero."""

    def forward(self, query, key, value, attention_mask, **kwargs):
        context = super().forward(query, key, value, attention_mask, **kwargs)
        heads, per_group = query.size(2), query.size(2) // key.size(2)
        index = torch.arange(heads, device=context.device)
        # GQA: the first heads of every group; MHA: the first heads
        keep = (
            index % per_group < self.kept_per_group
            if per_group > 1
            else index < self.kept_per_group
        )
        return context * keep.to(context.dtype).repeat_interleave(query.size(3))


def masked_model(model_cfg, config, width, heads):
    spec = elastic_layer_spec(model_cfg)
    attn = replace_in_spec(spec.submodules.self_attention, core_attention=MaskedSDPAttention)
    mlp = dataclasses.replace(spec.submodules.mlp, module=MaskedMLP)
    spec = replace_in_spec(spec, self_attention=attn, mlp=mlp)
    model = GPTModel(config=config, transformer_layer_spec=spec, **model_cfg.gpt_model_kwargs())
    kept = heads // model_cfg.num_query_groups if model_cfg.is_gqa else heads
    for layer in model.decoder.layers:
        layer.mlp.masked_width = width
        layer.self_attention.core_attention.kept_per_group = kept
    return model


class SavedBytes:
    """Bytes autograd keeps for backward (activation memory), counted while it is active."""

    def __init__(self, model):
        self.total = 0
        # Views of parameters (the sliced weights) cost nothing extra: skip their storage.
        self._seen = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(self, t):
        key = t.untyped_storage().data_ptr()
        if key not in self._seen:
            self._seen.add(key)
            self.total += t.untyped_storage().nbytes()
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def gather_cost(model, rounds: int) -> float:
    """Seconds per step spent gathering GQA-trimmed QKV rows and output-projection columns
    (forward copy and backward scatter), the one place the elastic model copies weights."""
    from megatron_flextron.elastic.linear import select

    pieces = []
    for layer in model.decoder.layers:
        attention = layer.self_attention
        rows, cols = attention.linear_qkv.active_rows, attention.linear_proj.active_cols
        if rows is not None and isinstance(rows[0], torch.Tensor):
            pieces.append((attention.linear_qkv.weight, rows[0], 0))
        if isinstance(cols, torch.Tensor):
            pieces.append((attention.linear_proj.weight, cols, 1))
    if not pieces:
        return 0.0
    times = []
    for _ in range(rounds + 1):
        _sync()
        t0 = time.perf_counter()
        for weight, index, dim in pieces:
            select(weight, index, dim).sum().backward()
        _sync()
        times.append(time.perf_counter() - t0)
        for weight, _, _ in pieces:
            weight.grad = None
    return statistics.median(times[1:])


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def step(model, tokens, labels, position_ids):
    loss = model(tokens, position_ids, None, labels=labels).float().mean()
    loss.backward()
    for p in model.parameters():
        p.grad = None
    return loss


def inference(model, tokens, labels, position_ids):
    with torch.inference_mode():
        return model(tokens, position_ids, None)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--preset", choices=PRESETS, default="gpu-1b" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--family", choices=["gpt3", "llama"], nargs="+", default=["gpt3", "llama"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    initialize_model_parallel(1, 1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_kwargs, b, s, dtype = PRESETS[args.preset]
    results = {
        "preset": args.preset,
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)",
        "batch": b,
        "seq": s,
        "rows": {},
    }
    for family in args.family:
        extra = (
            dict(num_query_groups=model_kwargs["num_attention_heads"] // 4)
            if family == "llama"
            else {}
        )
        if family == "llama":  # SwiGLU at the same parameter count as a 4h GeLU MLP
            extra["ffn_hidden_size"] = model_kwargs["ffn_hidden_size"] * 2 // 3 // 64 * 64
        model_cfg = ModelConfig(family, **{**model_kwargs, **extra})
        results["rows"].update(run_family(model_cfg, b, s, dtype, device, args.rounds))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def run_family(model_cfg, b, s, dtype, device, rounds):
    """{FAMILY: training-step rows, "FAMILY inference": forward-only rows}, same models."""
    half_ffn, half_heads = model_cfg.ffn_hidden_size // 2, model_cfg.num_attention_heads // 2
    # On GPU, initialize on the device: megatron's CPU initialization of ~1B random weights takes
    # seconds per model (the repo default keeps it for TP-independent initialization).
    on_gpu = dict(use_cpu_initialization=device.type != "cuda")
    config = model_cfg.transformer_config(params_dtype=dtype, **on_gpu)
    small_cfg = model_cfg.transformer_config(
        params_dtype=dtype,
        ffn_hidden_size=half_ffn,
        num_attention_heads=half_heads,
        num_query_groups=model_cfg.num_query_groups if model_cfg.is_gqa else half_heads,
        kv_channels=model_cfg.kv_channels,
        **on_gpu,
    )
    elastic_cfg = ElasticConfig(mlp_choices=(half_ffn,), head_choices=(half_heads,))

    torch.manual_seed(0)
    models = {
        "stock dense": build_gpt_model(model_cfg, config, elastic=False),
        "stock dense (sdpa)": build_gpt_model(
            model_cfg, config, elastic=False, core_attention="sdpa"
        ),
        "elastic full": build_gpt_model(model_cfg, config, elastic=True),
        "elastic 50%": build_gpt_model(model_cfg, config, elastic=True),
        "dense 50% shape": build_gpt_model(
            model_cfg, small_cfg, elastic=False, core_attention="sdpa"
        ),
        "masked 50%": masked_model(model_cfg, config, half_ffn, half_heads),
    }
    set_subnetwork(
        models["elastic 50%"], {"mlp": half_ffn, "heads": half_heads}, model_cfg, elastic_cfg
    )
    for m in models.values():  # all in dtype, as megatron's Float16Module does for training
        m.to(device=device, dtype=dtype)

    tokens = torch.randint(0, model_cfg.vocab_size, (b, s), device=device)
    labels = torch.randint(0, model_cfg.vocab_size, (b, s), device=device)
    position_ids = torch.arange(s, device=device).expand(b, s)
    out = {}
    for mode, fn in (("", step), (" inference", inference)):
        out[model_cfg.family + mode] = measure(models, fn, (tokens, labels, position_ids), rounds)
        _print_table(model_cfg, out[model_cfg.family + mode], fn.__name__)
    return out


def measure(models, fn, inputs, rounds):
    device = inputs[0].device
    times = {name: [] for name in models}
    memory = {}
    for name, m in models.items():  # warm-up + memory
        fn(m, *inputs)
        weights = sum(p.numel() * p.element_size() for p in m.parameters())
        if device.type == "cuda":  # this model's weights + its step's peak above what is resident
            torch.cuda.synchronize()  # (every model of the table sits on the GPU at once)
            torch.cuda.reset_peak_memory_stats()
            resident = torch.cuda.memory_allocated()
            fn(m, *inputs)
            memory[name] = weights + torch.cuda.max_memory_allocated() - resident
        else:
            with SavedBytes(m) as saved:
                fn(m, *inputs)
            memory[name] = saved.total + weights
    for _ in range(rounds):  # interleaved so that machine noise hits every row alike
        for name, m in models.items():
            _sync()
            t0 = time.perf_counter()
            fn(m, *inputs)
            _sync()
            times[name].append(time.perf_counter() - t0)

    rows = {}
    base = statistics.median(times["stock dense"])
    for name in models:
        t = statistics.median(times[name])
        rows[name] = {
            "ms": round(t * 1e3, 2),
            "vs_stock": round(t / base, 3),
            "memory_MB": round(memory[name] / 2**20, 1),
        }

    def ratio(a, b):
        return round(statistics.median(times[a]) / statistics.median(times[b]), 3)

    rows["ratios"] = {
        "elastic full / stock dense": ratio("elastic full", "stock dense"),
        "elastic full / stock dense (sdpa)": ratio("elastic full", "stock dense (sdpa)"),
        "elastic 50% / dense 50% shape": ratio("elastic 50%", "dense 50% shape"),
        "masked 50% / elastic 50%": ratio("masked 50%", "elastic 50%"),
    }
    if fn is step:
        gather = gather_cost(models["elastic 50%"], rounds)
        rows["ratios"]["GQA weight gather / elastic 50% step"] = round(
            gather / statistics.median(times["elastic 50%"]), 4
        )
    return rows


def _print_table(model_cfg, rows, mode):
    print(
        f"\n{model_cfg.family} ({mode}): layers={model_cfg.num_layers} "
        f"hidden={model_cfg.hidden_size} ffn={model_cfg.ffn_hidden_size} "
        f"heads={model_cfg.num_attention_heads}/"
        f"{model_cfg.num_query_groups} groups"
    )
    print(f"{'model':<22}{'ms':>10}{'vs stock':>10}{'memory MB':>12}")
    for name, row in rows.items():
        if name != "ratios":
            print(f"{name:<22}{row['ms']:>10}{row['vs_stock']:>10}{row['memory_MB']:>12}")
    for name, value in rows["ratios"].items():
        print(f"  {name}: {value}x")


if __name__ == "__main__":
    main()
