"""Make megatron-core's inference stack (static engine, text-generation controller, GPT inference
wrapper) run on CPU, on top of the training shims in compat/cpu.py.

What it assumes and what stands in for it here (measured on megatron-core 0.16.1, see
shared/cpu_notes.md):
- the controller times every step with ``torch.cuda.Event``: a wall-clock event;
- the static batch path calls ``.cuda()`` and ``torch.cuda.synchronize()``: identity / no-op
  (installed by compat/cpu.py);
- pipeline-parallel hand-offs assert ``tensor.is_cuda`` before broadcasting logits: any tensor.

Nothing changes when CUDA is available.
"""

from __future__ import annotations

import time

import torch

from megatron_flextron.compat.cpu import apply_cpu_shims

_APPLIED = False


class WallClockEvent:
    """``torch.cuda.Event(enable_timing=True)`` on the host clock (elapsed_time in ms)."""

    def __init__(self, enable_timing: bool = False, **_kwargs):
        self.t = None

    def record(self, *_args, **_kwargs) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: "WallClockEvent") -> float:
        return (end.t - self.t) * 1e3


def apply_inference_shims() -> bool:
    """Install the CPU training and inference shims once. Returns True if they are active."""
    global _APPLIED
    if not apply_cpu_shims():
        return False
    if _APPLIED:
        return True
    torch.cuda.Event = WallClockEvent
    from megatron.core.inference import communication_utils

    def _is_tensor(tensor):
        assert tensor is not None

    def _is_contiguous(tensor):
        assert tensor is not None and tensor.is_contiguous()

    communication_utils._is_cuda = _is_tensor
    communication_utils._is_cuda_contiguous = _is_contiguous
    _APPLIED = True
    return True


class _SilentProgress:
    """tqdm's interface, drawing nothing."""

    def __init__(self, *_args, **_kwargs):
        pass

    def update(self, *_args, **_kwargs):
        pass

    def close(self):
        pass


def silence_engine_progress() -> None:
    """megatron's static inference engine draws a tqdm bar per generate call (on every device):
    replace it with a silent one; it is not an error channel."""
    from megatron.core.inference.engines import static_engine

    static_engine.tqdm = _SilentProgress
