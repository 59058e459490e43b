"""Measure a latency lookup table on this machine (GPU when present, else CPU).

Times, for one transformer layer of the model, the elastic MLP at every width choice and the
elastic attention at every head-count choice (forward, inference mode, median of repeats after a
warm-up); the rest of a layer (norms, residuals) from the full model vs the one-layer model; and
everything outside the layers as the one-layer model minus its layer. The table predicts a
sub-network's forward time as other + sum over layers of (layer_other + mlp[k_l] + attn[h_l]);
``measure_latency`` also times the smallest homogeneous sub-network and reports the error.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict

import torch

from megatron_flextron.config import ElasticConfig, ModelConfig
from megatron_flextron.elastic import build_elastic_model, set_subnetwork
from megatron_flextron.elastic.blocks import transformer_blocks
from megatron_flextron.elastic.subnetwork import Subnetwork
from megatron_flextron.parallel import current_device
from megatron_flextron.routers.cost import LatencyTable, router_choices


def time_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` in ms after one warm-up call, synchronizing the GPU."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def measure_latency(
    model_cfg: ModelConfig,
    elastic: ElasticConfig,
    micro_batch_size: int = 1,
    seq_length: int = 512,
    dtype: torch.dtype = torch.float32,
    repeats: int = 10,
) -> Dict[str, object]:
    """{"table": LatencyTable, "check": [{subnetwork, predicted_ms, measured_ms}]} on this
    process's device. Needs megatron's parallel state (one rank)."""
    device = current_device()
    config = model_cfg.transformer_config(params_dtype=dtype)
    gpt = build_elastic_model(model_cfg, config).to(device).eval()
    layer = transformer_blocks(gpt)[0]
    s, b, h = seq_length, micro_batch_size, model_cfg.hidden_size
    hidden = torch.randn(s, b, h, device=device, dtype=dtype)
    rope = gpt.rotary_pos_emb(s) if model_cfg.position_embedding == "rope" else None
    mlp_choices, head_choices = router_choices(model_cfg, elastic)
    tokens = torch.randint(0, model_cfg.vocab_size, (b, s), device=device)
    positions = torch.arange(s, device=device).expand_as(tokens)
    n = model_cfg.num_layers
    with torch.inference_mode():
        mlp_ms, attention_ms = {}, {}
        for k in mlp_choices:
            layer.mlp.set_active_width(k)
            mlp_ms[k] = time_ms(lambda: layer.mlp(hidden), repeats)
        layer.mlp.set_active_width(model_cfg.ffn_hidden_size)
        for heads in head_choices:
            layer.self_attention.set_active_heads(heads)
            attention_ms[heads] = time_ms(
                lambda: layer.self_attention(hidden, None, rotary_pos_emb=rope), repeats
            )

        def forward(subnet: Subnetwork) -> float:
            set_subnetwork(gpt, subnet, model_cfg, elastic)
            return time_ms(lambda: gpt(tokens, positions, None), repeats)

        one_layer = Subnetwork.full(model_cfg)
        one_layer = Subnetwork(one_layer.mlp, one_layer.heads, (0,))
        full_layer = mlp_ms[mlp_choices[0]] + attention_ms[head_choices[0]]
        one_ms = forward(one_layer)
        full_ms = forward(Subnetwork.full(model_cfg))
        layer_other = max((full_ms - one_ms) / max(n - 1, 1) - full_layer, 0.0)
        other = max(one_ms - full_layer - layer_other, 0.0)
        table = LatencyTable(
            mlp_ms=mlp_ms,
            attention_ms=attention_ms,
            other_ms=other,
            layer_other_ms=layer_other,
            device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            dtype=str(dtype).replace("torch.", ""),
            micro_batch_size=b,
            seq_length=s,
        )
        check = []
        for k, heads in [(mlp_choices[0], head_choices[0]), (mlp_choices[-1], head_choices[-1])]:
            subnet = Subnetwork((k,) * n, (heads,) * n, tuple(range(n)))
            predicted = other + n * (layer_other + mlp_ms[k] + attention_ms[heads])
            check.append(
                {
                    "subnetwork": subnet.to_dict(),
                    "predicted_ms": round(predicted, 3),
                    "measured_ms": round(forward(subnet), 3),
                }
            )
    return {"table": table, "check": check}
