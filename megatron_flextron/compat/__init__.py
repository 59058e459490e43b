"""Compatibility shims that let megatron-core run where it expects CUDA."""

from megatron_flextron.compat.cpu import apply_cpu_shims

__all__ = ["apply_cpu_shims"]
