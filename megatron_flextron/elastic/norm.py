"""The elastic model's norms: megatron's local (torch) norms, also under sequence parallelism.

megatron's ``WrappedTorchNorm`` refuses sequence parallelism (Transformer Engine's norms, which
need CUDA, support it), and megatron's MoE trains under tensor parallelism only with it. Under
sequence parallelism each TP rank normalizes its own slice of the sequence with the same weights,
so their gradients are partial sums: the weights are marked ``sequence_parallel``, which makes
megatron's ``finalize_model_grads`` sum them over the TP group, as it does for TE's norms.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.torch_norm import WrappedTorchNorm


class LocalNorm:
    """``WrappedTorchNorm`` without sequence parallelism; with it, the same torch norm with its
    weights marked for megatron's TP gradient reduction."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        if not config.sequence_parallel:
            return WrappedTorchNorm(config, hidden_size, eps, **kwargs)
        norms = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
        if config.normalization not in norms:
            raise ValueError(f"normalization {config.normalization!r}: LayerNorm or RMSNorm")
        norm = norms[config.normalization](hidden_size, eps=eps)
        for p in norm.parameters():
            p.sequence_parallel = True
        return norm
