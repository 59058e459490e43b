"""A decode-only step of the elastic stack as direct tensor operations, for CPU serving.

On one CPU thread, what a decode step of one request spends beyond its weight products is
Python: module calls, megatron's per-layer checks and dispatch, and per-layer work that is the
same for every layer of a step (the RoPE tables of the step's positions, where each new token's
K/V goes, which cache blocks each request reads). :func:`decode_stack` computes the latter once
per step (:class:`StepPlan`) and runs each layer it covers as the arithmetic megatron's path
performs there, op for op and in its order:

- attention layer: norm, QKV product, RoPE of q and k (``t cos + rotate(t) sin``, one pass
  over the adjacent q and k heads of each KV group when both use the same positions), KV append,
  paged attention (the CPU stand-in's per-request SDPA over the request's cache blocks),
  output projection, bias and residual add;
- MLP layer: norm, fc1 (+ bias), GLU or activation, fc2, bias and residual add.

Elastic selections (fewer heads, a narrower MLP) run through the elastic linears' own code.
A layer it does not cover (a mixture of experts, q/k norms, a soft layer gate, token
routing, sequence parallelism, fused kernels, trainable weights) runs through its module as
before, in the same step; a step it does not cover (prefill, mixed, CUDA) runs megatron's forward.
tests/test_decode_step.py checks tokens and log probabilities equal megatron's path to the bit.

Only under the CPU inference shims (compat/inference.py): there megatron's frozen-weight linear
is ``F.linear`` and its decode attention the SDPA stand-in; elsewhere megatron's kernels run.
"""

from __future__ import annotations

import inspect
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import mappings
from megatron.core.transformer import attention as mcore_attention
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_flextron.compat import inference as inference_shims
from megatron_flextron.elastic.attention import ElasticSelfAttention
from megatron_flextron.elastic.decode_attention import configured_plainly
from megatron_flextron.elastic.layer import ElasticTransformerLayer, add_residual
from megatron_flextron.elastic.linear import ElasticColumnParallelLinear, ElasticRowParallelLinear
from megatron_flextron.elastic.mlp import ElasticMLP

_NORMS = (torch.nn.RMSNorm, torch.nn.LayerNorm)


class StepPlan:
    """What every layer of one decode step shares: each new token's cache slot, each
    request's cache blocks and length, and the RoPE cos/sin of the step's positions (in the
    hidden states' dtype, as megatron's unfused RoPE casts them)."""

    def __init__(self, context, rotary_pos_emb, dtype):
        n = context.padded_active_token_count
        view, size = context.gpu_view, context.block_size_tokens
        self.slots = (view.token_to_block_idx[:n].long() * size
                      + view.token_to_local_position_within_kv_block[:n].long())
        _, lengths, _ = context.cu_kv_lengths()
        table = context.active_attn_metadata["mha_metadata"].state_data["block_table"]
        self.reads = [(table[i][: (m + size - 1) // size], m)
                      for i, m in enumerate(lengths.tolist())]
        self.rope, self.joint = None, False
        if rotary_pos_emb is not None:
            fq = rotary_pos_emb[view.token_to_pos_ids[:n]]  # as the context's RoPE of q and k
            fk = rotary_pos_emb[view.token_to_position_in_request[:n]]
            cos_k, sin_k = torch.cos(fk).to(dtype), torch.sin(fk).to(dtype)
            self.joint = torch.equal(fq, fk)  # q and k rotate by the same tables: one pass
            cos_q, sin_q = ((cos_k, sin_k) if self.joint
                            else (torch.cos(fq).to(dtype), torch.sin(fq).to(dtype)))
            self.rope = (cos_k, sin_k, cos_q, sin_q)


def step_covered(stack, context, rotary_pos_emb) -> bool:
    """Whether this step of ``stack`` is a decode-only step that :func:`decode_stack` computes."""
    if torch.is_grad_enabled() or context is None or not inference_shims.active():
        return False
    if _layer_kinds(stack) is None:
        return False
    if not (context.is_dynamic_batching() and context.is_decode_only()):
        return False
    if (context.use_flashinfer_fused_rope or getattr(context, "cache_mla_latent", False)
            or getattr(context, "num_speculative_tokens", 0)):
        return False
    if (inspect.unwrap(mcore_attention.flash_attn_with_kvcache)
            is not inference_shims.flash_attn_with_kvcache):  # (a timing wrapper is fine)
        return False
    _, lengths, _ = context.cu_kv_lengths()
    if lengths.shape[0] != context.padded_active_token_count:  # one new token per request
        return False
    if rotary_pos_emb is not None and not (  # a table per position over whole heads
            isinstance(rotary_pos_emb, torch.Tensor)
            and rotary_pos_emb.shape[-1] == stack.config.kv_channels):
        return False
    return context.memory_buffer.is_contiguous()


def decode_stack(stack, hidden_states, context, rotary_pos_emb, **layer_kwargs):
    """Every layer of ``stack`` (a HybridStack) for one decode step: the covered layers as
    direct operations, the others through their modules. Returns the hidden states."""
    plan = StepPlan(context, rotary_pos_emb, hidden_states.dtype)
    x = hidden_states
    for layer, direct in _layer_kinds(stack):
        if direct is not None and direct.ready():
            x = direct(x, context, plan)
        else:
            x, _ = layer(hidden_states=x, inference_context=context,
                         rotary_pos_emb=rotary_pos_emb, **layer_kwargs)
    return x


def _layer_kinds(stack) -> Optional[List[Tuple[torch.nn.Module, object]]]:
    """Each layer with its direct step (None: through its module), built once per stack;
    None for a stack with layers other than TransformerLayers."""
    if not hasattr(stack, "_decode_layers"):
        layers = list(stack.layers)
        stack._decode_layers = (
            [(layer, _direct_step(layer)) for layer in layers]
            if all(isinstance(layer, TransformerLayer) for layer in layers) else None)
    return stack._decode_layers


def _direct_step(layer):
    """The direct step of a layer whose build it covers (what cannot change after the build),
    else None."""
    if type(layer) is not ElasticTransformerLayer:
        return None
    layer._is_plain()
    if not layer._plain:  # what the layer's build uses (training is checked per step)
        return None
    attention, mlp = layer.self_attention, layer.mlp
    if isinstance(mlp, IdentityOp) and type(attention) is ElasticSelfAttention:
        cfg = attention.config
        ok = (type(layer.input_layernorm) in _NORMS and configured_plainly(attention)
              and _plain_linear(attention.linear_qkv, ElasticColumnParallelLinear)
              and _plain_linear(attention.linear_proj, ElasticRowParallelLinear)
              and attention.q_layernorm is None and attention.k_layernorm is None
              and cfg.context_parallel_size == 1
              and cfg.num_query_groups >= attention.world_size
              and not (cfg.apply_rope_fusion or cfg.rotary_interleaved)
              and attention._yarn_concentration_factor in (None, 1.0))
        return _AttentionStep(layer) if ok else None
    if isinstance(attention, IdentityOp) and type(mlp) is ElasticMLP:
        cfg = mlp.config
        ok = (type(layer.pre_mlp_layernorm) in _NORMS
              and _plain_linear(mlp.linear_fc1, ElasticColumnParallelLinear)
              and _plain_linear(mlp.linear_fc2, ElasticRowParallelLinear)
              and not (cfg.use_te_activation_func or cfg.bias_activation_fusion)
              and cfg.activation_func_clamp_value is None)
        return _MLPStep(layer) if ok else None
    return None


def _plain_linear(linear, cls) -> bool:
    return (type(linear) is cls and not linear.sequence_parallel
            and not getattr(linear, "explicit_expert_comm", False)
            and not getattr(linear, "gather_output", False)
            and getattr(linear, "input_is_parallel", True)
            and getattr(linear, "gtp_remat_size", 1) == 1)


# ---- the layers' arithmetic ---------------------------------------------------------------
class _Norm:
    """torch's RMSNorm / LayerNorm forward, without the module call."""

    def __init__(self, norm):
        self.rms = type(norm) is torch.nn.RMSNorm
        self.shape, self.weight, self.eps = norm.normalized_shape, norm.weight, norm.eps
        self.bias = None if self.rms else norm.bias

    def __call__(self, x):
        if self.rms:
            return torch.rms_norm(x, self.shape, self.weight, self.eps)
        return torch.layer_norm(x, self.shape, self.weight, self.bias, self.eps)


class _Linear:
    """megatron's Column/RowParallelLinear forward without grad (the frozen-weight product, the
    row layer's TP all-reduce, then the bias); a selection runs the elastic linear's own code.
    Holds the module's tensors: a module attribute look-up costs per call."""

    def __init__(self, linear, column: bool):
        self.module, self.column = linear, column
        self.weight, self.bias = linear.weight, linear.bias
        self.skip_bias_add = linear.skip_bias_add
        self.group = linear.tp_group

    def frozen(self) -> bool:
        return not self.weight.requires_grad

    def __call__(self, x) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        m = self.module
        if self.column:
            if m.active_rows is not None:  # the elastic linear's own pieces, bias included
                pieces = m.forward_pieces(x)
                return (pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)), None
            out = F.linear(x, self.weight)
        else:
            if m.input_scale is not None:
                return m.forward(x)
            out = F.linear(x, self.weight) if m.active_cols is None else m.selected_product(x)
            out = mappings._reduce(out, self.group)
        if self.skip_bias_add:
            return out, self.bias
        return (out if self.bias is None else out + self.bias), None


def _runs_plainly(layer, *linears: _Linear) -> bool:
    """Not skipped, gated, recording or training, with frozen weights (what can change between
    steps, for either kind of layer)."""
    return not (layer.skipped or layer.keep is not None or layer.recording or layer.training
                or not all(linear.frozen() for linear in linears))


def _rotate(t, cos, sin):
    """megatron's unfused RoPE (no pass-through part, mscale 1; cos and sin already in the
    dtype of ``t``: StepPlan)."""
    x1, x2 = torch.chunk(t, 2, dim=-1)
    return t * cos + torch.cat((-x2, x1), dim=-1) * sin


class _AttentionStep:
    """An attention layer: norm, QKV, RoPE, KV append, paged attention, projection, residual."""

    def __init__(self, layer):
        attn = layer.self_attention
        self.layer, self.attn = layer, attn
        self.norm = _Norm(layer.input_layernorm)
        self.qkv, self.proj = _Linear(attn.linear_qkv, True), _Linear(attn.linear_proj, False)
        self.groups = attn.num_query_groups_per_partition
        self.d = attn.hidden_size_per_attention_head
        self.cache_layer = attn.layer_number - attn._get_pp_layer_offset_for_inference() - 1
        scale = getattr(attn, "softmax_scale", None)
        self.scale = self.d**-0.5 if scale is None else scale

    def ready(self) -> bool:
        """What can change between steps: skipped or gated layers, MHA heads trimmed (fewer KV
        heads than the cache holds), trainable weights."""
        return (_runs_plainly(self.layer, self.qkv, self.proj)
                and self.attn._active_groups == self.groups)

    def __call__(self, x, context, plan: StepPlan):
        mixed, _ = self.qkv(self.norm(x))
        groups, d, per = self.groups, self.d, self.attn._active_heads_per_group
        n = mixed.shape[0]
        heads = mixed.view(n, groups, per + 2, d)  # per KV group: its query heads, k, v
        value = heads[:, :, per + 1]
        if plan.rope is None:
            query, key = heads[:, :, :per].reshape(n, groups * per, d), heads[:, :, per]
        elif plan.joint:
            cos, sin = plan.rope[0].view(n, 1, 1, d), plan.rope[1].view(n, 1, 1, d)
            rotated = _rotate(heads[:, :, : per + 1], cos, sin)
            query, key = rotated[:, :, :per].reshape(n, groups * per, d), rotated[:, :, per]
        else:
            cos_k, sin_k, cos_q, sin_q = (t.view(n, 1, d) for t in plan.rope)
            key = _rotate(heads[:, :, per], cos_k, sin_k)
            query = _rotate(heads[:, :, :per].reshape(n, groups * per, d), cos_q, sin_q)
        cache = context.memory_buffer
        index = context.layer_map[self.cache_layer]
        k_cache, v_cache = cache[0, index], cache[1, index]
        k_cache.view(-1, groups, d).index_copy_(0, plan.slots, key)
        v_cache.view(-1, groups, d).index_copy_(0, plan.slots, value)
        outs = []
        for i, (blocks, length) in enumerate(plan.reads):
            keys = k_cache.index_select(0, blocks).flatten(0, 1)[:length]
            values = v_cache.index_select(0, blocks).flatten(0, 1)[:length]
            out = F.scaled_dot_product_attention(
                query[i : i + 1].transpose(0, 1)[None], keys.transpose(0, 1)[None],
                values.transpose(0, 1)[None], scale=self.scale, enable_gqa=True)
            outs.append(out[0].transpose(0, 1))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return add_residual(self.proj(out.reshape(n, 1, -1)), x)


class _MLPStep:
    """An MLP layer: norm, fc1 (+ bias), GLU or activation, fc2, residual."""

    def __init__(self, layer):
        mlp = layer.mlp
        self.layer, self.mlp = layer, mlp
        self.norm = _Norm(layer.pre_mlp_layernorm)
        self.fc1, self.fc2 = _Linear(mlp.linear_fc1, True), _Linear(mlp.linear_fc2, False)
        cfg = mlp.config
        self.gated, self.act, self.offset = (cfg.gated_linear_unit, cfg.activation_func,
                                             cfg.glu_linear_offset)
        self.plain_act = mlp.activation_func  # megatron's MLP.forward without a GLU

    def ready(self) -> bool:
        """What can change between steps: skipped or gated layers, token routing, trainable
        weights."""
        return _runs_plainly(self.layer, self.fc1, self.fc2) and self.mlp.token_routing is None

    def __call__(self, x, context, plan):
        y = self.norm(x)
        if self.mlp.active_width is not None:  # elastic/mlp.py's sliced_forward
            pieces = self.mlp.linear_fc1.forward_pieces(y)
            hidden = (self.act(pieces[0]) * (pieces[1] + self.offset) if self.gated
                      else self.act(pieces[0]))
        else:  # megatron's MLP.forward, unfused
            hidden, bias = self.fc1(y)
            if bias is not None:
                hidden = hidden + bias
            if self.gated:
                gate, up = torch.chunk(hidden, 2, dim=-1)
                hidden = self.act(gate) * (up + self.offset)
            else:
                hidden = self.plain_act(hidden)
        return add_residual(self.fc2(hidden), x)
