"""Make megatron-core run on CPU (gloo) for tests and small runs.

megatron-core assumes CUDA in a few places: its RNG tracker reads the CUDA generator, buffers are
allocated on ``torch.cuda.current_device()``, the default causal mask and the pipeline schedules
use ``device="cuda"`` literals. Each shim below replaces exactly one such assumption with its CPU
equivalent (see shared/cpu_notes.md for the measurements behind them).

Everything here is a no-op when CUDA is available: on a GPU machine megatron runs unpatched.
"""

from __future__ import annotations

import contextlib
import functools
import types

import torch

_APPLIED = False


def apply_cpu_shims() -> bool:
    """Install the CPU shims once per process. Returns True if they are active."""
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True
    _patch_current_device()
    _patch_rng_tracker()
    _patch_causal_mask()
    _patch_cuda_literals()
    _APPLIED = True
    return True


def _patch_current_device() -> None:
    # ~100 megatron allocations use device=torch.cuda.current_device(); a CPU device serves them.
    torch.cuda.current_device = lambda: torch.device("cpu")
    # The tied-embedding sync between first and last pipeline stage moves the weight with
    # ``weight.data.cuda()`` before its all-reduce; on CPU the tensor stays where it is.
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    # The checkpoint writer synchronizes the device before copying tensors out; CPU is in sync.
    torch.cuda.synchronize = lambda *args, **kwargs: None


def _cpu_get_rng_state(*_args, clone: bool = False, **_kwargs) -> torch.Tensor:
    state = torch.get_rng_state()
    return state.clone() if clone else state


def _cpu_set_rng_state(new_state: torch.Tensor, *_args, **_kwargs) -> None:
    torch.set_rng_state(new_state)


def _patch_rng_tracker() -> None:
    """The tracker forks the CUDA generator even with dropout 0; fork the CPU generator instead."""
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    mrandom.CudaRNGStatesTracker = CpuRNGStatesTracker
    # Activation recomputation saves/restores the "cuda" state through these two functions.
    mrandom._get_cuda_rng_state = _cpu_get_rng_state
    mrandom._set_cuda_rng_state = _cpu_set_rng_state
    mrandom.initialize_rng_tracker(force_reset=True)


@functools.lru_cache(maxsize=8)
def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _patch_causal_mask() -> None:
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils

    utils.get_default_causal_mask = _cpu_causal_mask
    fused_softmax.get_default_causal_mask = _cpu_causal_mask


class NullStream:
    """``torch.cuda.Stream`` (and the current stream) of a CPU process: CPU work is one ordered
    stream, so there is nothing to wait for."""

    def __init__(self, *_args, **_kwargs):
        pass

    def wait_event(self, *_args, **_kwargs) -> None:
        pass

    def wait_stream(self, *_args, **_kwargs) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _CpuCudaProxy(types.ModuleType):
    """A stand-in for ``torch.cuda`` inside one megatron module: streams are no-ops (gradient
    buckets wait on the current stream before reducing); the rest is torch.cuda's."""

    def __init__(self):
        super().__init__("torch.cuda")

    def current_stream(self, *_args, **_kwargs) -> NullStream:
        return NullStream()

    def stream(self, *_args, **_kwargs):
        return contextlib.nullcontext()

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _CpuTorchProxy(types.ModuleType):
    """A stand-in for ``torch`` inside one megatron module: factories map device "cuda" to CPU."""

    _FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange")

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CpuCudaProxy()

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in self._FACTORIES:

            @functools.wraps(attr)
            def factory(*args, device=None, **kwargs):
                if device is not None and "cuda" in str(device):
                    device = "cpu"
                return attr(*args, device=device, **kwargs)

            return factory
        return attr


# megatron modules that allocate with device="cuda" literals: pipeline schedules, and the
# optimizer stack (grad scaler, grad clipping, distributed optimizer, grad buffers).
_CUDA_LITERAL_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.utils",
)


def _patch_cuda_literals() -> None:
    import importlib

    proxy = _CpuTorchProxy()
    for name in _CUDA_LITERAL_MODULES:
        importlib.import_module(name).torch = proxy
    # Grad clipping and the distributed optimizer assert ``t.type() == 'torch.cuda.FloatTensor'``;
    # report CPU tensors under the CUDA type name (only for the no-argument query).
    plain_type = torch.Tensor.type

    def type_as_cuda(self, *args, **kwargs):
        name = plain_type(self, *args, **kwargs)
        if args or kwargs or not isinstance(name, str) or name.startswith("torch.cuda."):
            return name
        return name.replace("torch.", "torch.cuda.", 1)

    torch.Tensor.type = type_as_cuda
