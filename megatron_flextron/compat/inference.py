"""Make megatron-core 0.19's dynamic inference engine (continuous batching, paged KV cache) run on
CPU, on top of the training shims in compat/cpu.py.

What the engine assumes and what stands in for it here (measured on megatron-core 0.19.2,
torch 2.13 CPU; greedy output equals full recomputation, tests/test_generate.py):
- host buffers are allocated with ``pin_memory=True`` (needs a CUDA allocator): plain memory, in
  the context, engine and controller modules only;
- copies run on side ``torch.cuda.Stream``s ordered by ``torch.cuda.Event``s: CPU work is
  ordered already, so a stream is a no-op and an event a wall-clock mark (the controller also
  times steps with events);
- ``torch.cuda.nvtx`` ranges: no-ops;
- the KV-cache append is a Triton kernel when triton imports: megatron's own torch indexing path;
- attention over the paged cache calls flash-attn (``flash_attn_varlen_func`` for prefill and
  mixed steps, ``flash_attn_with_kvcache`` for decode steps, >= 2.7.3 asserted): stand-ins with the
  same signatures that gather each request's blocks and run ``scaled_dot_product_attention``
  (bottom-right causal, GQA), one request at a time;
- pipeline hand-offs assert ``tensor.is_cuda``: any tensor;
- a step's tokens are padded to a multiple of 64 (requests of 4) for CUDA graphs and kernels:
  on CPU padding is only work (a one-request decode step computed up to ``max_requests`` rows),
  so the context rounds to 1 (still a multiple of the TP size).

Per-step Python, not the matmuls, is what separates one request on the engine from
transformers ``generate`` on a CPU (benchmarks/serving_python_calls.py), so with grad disabled
(every generation step) the same arithmetic runs without megatron's backward-only wrappers: the
frozen-weight linear and the TP copy/reduce are plain calls (no autograd Function), RoPE skips its
no-op slices, scales and casts, and a single query attends without a mask.

Everything is process-local. The CPU stand-ins are installed only when CUDA is absent; with CUDA
megatron runs unpatched, except that where flash-attn does not import (the GPU machines here
have none) the paged-attention stand-ins above (device-agnostic) take its place.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import time
import types

import torch
import torch.nn.functional as F

from megatron_flextron.compat.cpu import NullStream, apply_cpu_shims

_APPLIED = False

# megatron modules whose host buffers are pinned
_PINNED_MODULES = (
    "megatron.core.inference.contexts.dynamic_context",
    "megatron.core.inference.contexts.kv_block_allocator",
    "megatron.core.inference.engines.dynamic_engine",
    "megatron.core.inference.text_generation_controllers.text_generation_controller",
)


class WallClockEvent:
    """``torch.cuda.Event``: a host-clock mark (``elapsed_time`` in ms); CPU work is ordered."""

    def __init__(self, *_args, **_kwargs):
        self.t = None

    def record(self, *_args, **_kwargs) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def wait(self, *_args, **_kwargs) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: "WallClockEvent") -> float:
        return (end.t - self.t) * 1e3


class _UnpinnedTorch(types.ModuleType):
    """``torch`` inside one megatron module, with ``pin_memory=`` dropped from factories."""

    _FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "empty_like", "zeros_like")

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name not in self._FACTORIES:
            return attr

        @functools.wraps(attr)
        def factory(*args, pin_memory=False, **kwargs):
            return attr(*args, **kwargs)

        return factory


def _attend(q, keys, values, scale):
    """q [nq, H, D] over keys/values [nk, Hk, D]: query j sees keys up to nk - nq + j."""
    nq, nk = q.shape[0], keys.shape[0]
    # a single query sees every cached key: no mask (the decode step of every request)
    mask = None if nq == 1 else torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(nk - nq)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
        attn_mask=mask, scale=scale, enable_gqa=True,
    )
    return out[0].transpose(0, 1)


def _paged(cache, blocks, n):
    """The first n cached tokens of one request: its blocks of cache [blocks, block, Hk, D]."""
    size = cache.shape[1]
    rows = blocks[: (n + size - 1) // size]
    return cache.index_select(0, rows).flatten(0, 1)[:n]


def _check(causal, window_size, extra):
    if not causal or tuple(window_size) != (-1, -1) or extra:
        raise NotImplementedError(
            "the CPU paged attention covers causal attention without sliding windows or "
            f"softmax statistics (asked: causal={causal}, window={window_size}, {extra})"
        )


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           softmax_scale=None, causal=False, window_size=(-1, -1),
                           block_table=None, return_attn_probs=False, **_kwargs):
    """flash-attn 2's prefill/mixed-step call on a paged cache: q [total_q, H, D]."""
    _check(causal, window_size, return_attn_probs)
    out = torch.zeros_like(q)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(cq) - 1):
        n = ck[i + 1] - ck[i]
        keys, values = _paged(k, block_table[i], n), _paged(v, block_table[i], n)
        out[cq[i] : cq[i + 1]] = _attend(q[cq[i] : cq[i + 1]], keys, values, softmax_scale)
    return out


def flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=None, softmax_scale=None,
                            causal=False, window_size=(-1, -1), block_table=None,
                            return_softmax_lse=False, **_kwargs):
    """flash-attn 2's decode call on a paged cache: q [requests, new tokens, H, D]."""
    _check(causal, window_size, return_softmax_lse)
    lengths = cache_seqlens.tolist()
    outs = [
        _attend(q[i], _paged(k_cache, block_table[i], n), _paged(v_cache, block_table[i], n),
                softmax_scale)
        for i, n in enumerate(lengths)
    ]
    if len(outs) == q.shape[0]:
        return outs[0][None] if len(outs) == 1 else torch.stack(outs)
    out = torch.zeros_like(q)  # padded rows (none on CPU: the context rounds to 1)
    out[: len(outs)] = torch.stack(outs)
    return out


def _install_paged_attention() -> None:
    from megatron.core.transformer import attention

    if attention.flash_attn_varlen_func is None or not torch.cuda.is_available():
        attention.flash_attn_varlen_func = flash_attn_varlen_func
        attention.flash_attn_with_kvcache = flash_attn_with_kvcache
        attention.is_fa_min_version = lambda *_a, **_k: True  # the stand-ins above


def _install_forward_only_linears() -> None:
    """megatron's linears run through autograd Functions (frozen-weight matmul, copy to / reduce
    from the TP region) whose only job is the backward pass; with grad disabled (every
    generation step) each costs a Function call and a TP-group look-up per linear and layer.
    Without grad: the same arithmetic called directly (``LinearWithFrozenWeight.forward``'s matmul
    and bias add; the copy's identity; the reduce's all-reduce, skipped for one rank)."""
    from megatron.core.tensor_parallel import layers, mappings
    from megatron.core.utils import get_tensor_model_parallel_group_if_none

    frozen = layers.linear_with_frozen_weight
    copy_to = layers.copy_to_tensor_model_parallel_region
    reduce_from = layers.reduce_from_tensor_model_parallel_region

    @functools.wraps(frozen)
    def linear_with_frozen_weight(input, weight, bias, gradient_accumulation_fusion=False,
                                  allreduce_dgrad=False, sequence_parallel=False, tp_group=None,
                                  grad_output_buffer=None, wgrad_deferral_limit=None,
                                  gtp_remat_size=1):
        if torch.is_grad_enabled() or sequence_parallel or gtp_remat_size > 1:
            return frozen(input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad,
                          sequence_parallel, tp_group, grad_output_buffer, wgrad_deferral_limit,
                          gtp_remat_size)
        # F.linear (what torch's nn.Linear calls) rather than megatron's matmul(input,
        # weight.t()): the output layer's 49k x 576 product ran ~12% faster on one CPU thread
        output = F.linear(input, weight)
        return output if bias is None else output + bias

    @functools.wraps(copy_to)
    def copy_to_tensor_model_parallel_region(input_, group=None):
        return copy_to(input_, group) if torch.is_grad_enabled() else input_

    @functools.wraps(reduce_from)
    def reduce_from_tensor_model_parallel_region(input_, group=None):
        if torch.is_grad_enabled():
            return reduce_from(input_, group)
        return mappings._reduce(input_, group or get_tensor_model_parallel_group_if_none(None))

    layers.linear_with_frozen_weight = linear_with_frozen_weight
    layers.copy_to_tensor_model_parallel_region = copy_to_tensor_model_parallel_region
    layers.reduce_from_tensor_model_parallel_region = reduce_from_tensor_model_parallel_region


def _install_plain_rope() -> None:
    """megatron's unfused RoPE slices off a pass-through part, scales by ``mscale`` and casts
    cos/sin to the input dtype on every call (q and k of every layer and step). When there is
    nothing to pass through, scale or cast, the same arithmetic without those no-op copies."""
    from megatron.core.models.common.embeddings import rope_utils

    general = rope_utils._apply_rotary_pos_emb_bshd

    @functools.wraps(general)
    def _apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=False,
                                   mla_rotary_interleaved=False, mscale=1.0,
                                   multi_latent_attention=None):
        if (rotary_interleaved or mla_rotary_interleaved or mscale != 1.0
                or multi_latent_attention is not None or freqs.shape[-1] != t.shape[-1]
                or freqs.dtype != t.dtype):
            return general(t, freqs, rotary_interleaved, mla_rotary_interleaved, mscale,
                           multi_latent_attention)
        x1, x2 = torch.chunk(t, 2, dim=-1)
        return t * torch.cos(freqs) + torch.cat((-x2, x1), dim=-1) * torch.sin(freqs)

    rope_utils._apply_rotary_pos_emb_bshd = _apply_rotary_pos_emb_bshd


def active() -> bool:
    """Whether the CPU inference shims are installed (the direct decode step relies on them:
    elastic/decode_step.py)."""
    return _APPLIED


def apply_inference_shims() -> bool:
    """Install the CPU training and inference shims once (and, on a GPU without flash-attn, the
    paged-attention stand-ins). Returns True if the CPU shims are active."""
    global _APPLIED
    if not apply_cpu_shims():
        _install_paged_attention()
        return False
    if _APPLIED:
        return True
    torch.cuda.Event = WallClockEvent
    torch.cuda.Stream = NullStream
    torch.cuda.current_stream = lambda *_a, **_k: NullStream()
    torch.cuda.default_stream = lambda *_a, **_k: NullStream()
    torch.cuda.stream = lambda *_a, **_k: contextlib.nullcontext()
    torch.Tensor.pin_memory = lambda self, *_a, **_k: self
    torch.Tensor.record_stream = lambda self, *_a, **_k: None
    unpinned = _UnpinnedTorch()
    for name in _PINNED_MODULES:
        importlib.import_module(name).torch = unpinned

    from megatron.core.inference import communication_utils
    from megatron.core.inference.contexts import dynamic_context
    from megatron.core.inference.text_generation_controllers import text_generation_controller
    def _is_tensor(tensor):
        assert tensor is not None

    def _is_contiguous(tensor):
        assert tensor is not None and tensor.is_contiguous()

    communication_utils._is_cuda = _is_tensor
    communication_utils._is_cuda_contiguous = _is_contiguous
    text_generation_controller.range_push = lambda *_a, **_k: None
    text_generation_controller.range_pop = lambda *_a, **_k: None
    dynamic_context.triton_append_key_value_cache = None
    dynamic_context.DynamicInferenceContext.TOKEN_ROUNDER = 1
    dynamic_context.DynamicInferenceContext.REQUEST_ROUNDER = 1
    _install_paged_attention()
    _install_forward_only_linears()
    _install_plain_rope()
    _APPLIED = True
    return True
