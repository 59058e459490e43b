"""Compatibility shims that let megatron-core run where it expects CUDA, and the check that the
installed megatron-core is one they were verified on."""

from megatron_flextron.compat.version import check_megatron_core

check_megatron_core()

from megatron_flextron.compat.cpu import apply_cpu_shims  # noqa: E402

__all__ = ["apply_cpu_shims", "check_megatron_core"]
