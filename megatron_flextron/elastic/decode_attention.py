"""A decode-only step of megatron's self-attention on the dynamic inference context, without the
bookkeeping of ``Attention.forward`` that does nothing there.

``Attention.forward`` serves training, static and dynamic inference, flash decode, fused RoPE,
MLA, output gates, activation offloading and CUDA graphs; per layer and decode step its checks,
nvtx ranges, offload context managers and dispatch were a measurable part of a one-request CPU
step (benchmarks/serving_step_profile.py). For a decode-only step on the dynamic context, with
none of those features configured, :func:`dynamic_decode` makes megatron's own calls in
megatron's order: QKV, the context's RoPE of k, KV append, cache read, RoPE of q, the paged
decode attention (``flash_attn_with_kvcache`` as megatron's attention module names it: flash-attn
or the CPU stand-in of compat/inference.py), the output projection. Anything else runs
``Attention.forward`` (tests/test_generate.py checks both give the same logits).
"""

from __future__ import annotations

import torch
from megatron.core.transformer import attention as mcore_attention

# arguments of Attention.forward that must be unset for the decode path
_UNSET = ("key_value_states", "rotary_pos_cos", "rotary_pos_sin", "rotary_pos_cos_sin",
          "attention_bias", "packed_seq_params", "inference_params")


def configured_plainly(attn) -> bool:
    """Whether ``attn`` uses none of the features the decode path leaves out (fixed at build)."""
    cfg = attn.config
    use_fa4, use_fa3 = attn._resolve_flash_version()
    return (
        attn.attention_type == "self" and not use_fa4 and not use_fa3
        and not cfg.flash_decode and not cfg.attention_output_gate and not cfg.no_rope_freq
        and getattr(cfg, "softmax_type", "vanilla") == "vanilla"
        and not cfg.multi_latent_attention and cfg.window_size is None
        and not (getattr(cfg, "fp8", False) or getattr(cfg, "fp4", False))
        and not getattr(attn, "offload_qkv_linear", False)
        and not getattr(attn, "offload_attn_proj", False)
        and not getattr(attn, "batch_invariant_mode", False)
    )


def decodes(attn, args, kwargs) -> bool:
    """Whether this call of ``attn`` (an ElasticSelfAttention) is a decode-only step that
    :func:`dynamic_decode` computes as ``Attention.forward`` would."""
    context = kwargs.get("inference_context")
    if len(args) != 1 or context is None or attn.training or torch.is_grad_enabled():
        return False
    for name in _UNSET:
        if kwargs.get(name) is not None:
            return False
    if not (context.is_dynamic_batching() and context.is_decode_only()
            and not context.use_flashinfer_fused_rope
            and not getattr(context, "cache_mla_latent", False)):
        return False
    if attn._decode_plain is None:
        attn._decode_plain = configured_plainly(attn)
    return attn._decode_plain


def dynamic_decode(attn, hidden_states, context, rotary_pos_emb):
    """``Attention.forward``'s calls for a decode-only step on the dynamic context."""
    query, key, value = attn.get_query_key_value_tensors(hidden_states, None, split_qkv=True)
    q_emb, k_emb = (rotary_pos_emb if isinstance(rotary_pos_emb, tuple)
                    else (rotary_pos_emb, rotary_pos_emb))
    cp, mscale = attn.pg_collection.cp, attn._yarn_concentration_factor
    layer = attn.layer_number - attn._get_pp_layer_offset_for_inference()
    if k_emb is not None:
        key = context.apply_rotary_emb_key(key, k_emb, attn.config, cp, mscale=mscale)
    context.append_key_value_cache(layer, key, value)
    key_cache, value_cache, block_table = context.key_value_cache(layer)
    if q_emb is not None:
        query = context.apply_rotary_emb_query(query, q_emb, attn.config, None, cp,
                                               mscale=mscale)
    _, kv_lengths, _ = context.cu_kv_lengths()
    requests = kv_lengths.shape[0]
    q = query.reshape(requests, query.shape[0] // requests, *query.shape[2:])
    scale = getattr(attn, "softmax_scale", None)
    out = mcore_attention.flash_attn_with_kvcache(
        q=q, k_cache=key_cache, v_cache=value_cache, cache_seqlens=kv_lengths,
        softmax_scale=q.shape[-1] ** -0.5 if scale is None else scale, causal=True,
        window_size=(-1, -1), block_table=block_table, num_splits=0,
    )
    return attn.linear_proj(out.reshape(query.shape[0], 1, -1))
