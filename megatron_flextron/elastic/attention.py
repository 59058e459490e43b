"""Elastic self-attention: megatron's SelfAttention with fewer query heads.

GQA (several query heads per KV group): every KV group is kept and the first h/G query heads of
each group run, so the KV cache keeps its shape. Megatron's fused QKV rows are laid out per group
as [q_0 .. q_{n-1}, k, v]; the kept rows are not contiguous, so they are gathered (a copy of
(h/G + 2)/(n + 2) of the QKV weight per step, cheaper than re-arranging activations); a decode
step of a few tokens without grad reads the kept rows (and projection columns) through strided
views of the weights instead, one batched product per KV group (linear.py, ``Blocks``).

MHA (one query head per KV head): whole heads are dropped. A head's q, k, v rows are contiguous
and heads are dealt round-robin across TP ranks, so the first h/p local heads are a prefix view.

Only the QKV projection and the output projection change; the rest of megatron's forward (RoPE,
KV cache, core attention) runs unchanged on the smaller tensors. Q/K norms (``qk_layernorm``,
Qwen3) are applied where megatron's SelfAttention applies them, after the split and before RoPE;
they normalise each head over its d channels with one weight shared by all heads, so fewer heads
leave the kept heads' function unchanged. OLMoE's norms span all heads (qk_norm.py): they are
told which heads run, and their mean square spans the TP group.

Shapes: hidden [s, b, h]; d = head dim; G_l = KV groups on this rank; n = query heads per group.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.attention import SelfAttention

from megatron_flextron.elastic.decode_attention import decodes, dynamic_decode
from megatron_flextron.elastic.layout import proj_col_index, qkv_row_index
from megatron_flextron.elastic.linear import Blocks
from megatron_flextron.elastic.qk_norm import AcrossHeadsRMSNorm


class ElasticSelfAttention(SelfAttention):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.active_heads: Optional[int] = None
        self._active_groups = self.num_query_groups_per_partition
        self._active_heads_per_group = self._heads_per_group
        self._across_heads = [
            norm for norm in (self.q_layernorm, self.k_layernorm)
            if isinstance(norm, AcrossHeadsRMSNorm)
        ]  # fmt: skip
        for norm in self._across_heads:
            norm.bind(self.pg_collection.tp, self.num_query_groups_per_partition)
        self._decode_plain = None  # eligible for the decode path (decode_attention.py)

    def forward(self, *args, **kwargs):
        """A decode-only step on the dynamic context: decode_attention.py; else megatron's."""
        if decodes(self, args, kwargs):
            return dynamic_decode(self, args[0], kwargs["inference_context"],
                                  kwargs.get("rotary_pos_emb"))
        return super().forward(*args, **kwargs)

    @property
    def _heads_per_group(self) -> int:
        return self.num_attention_heads_per_partition // self.num_query_groups_per_partition

    @property
    def is_gqa(self) -> bool:
        return self.config.num_query_groups < self.config.num_attention_heads

    def set_active_heads(self, heads: Optional[int]) -> None:
        """Run ``heads`` query heads (global count, canonical order); None or all: stock path."""
        total = self.config.num_attention_heads
        if heads is None or heads == total:
            self.active_heads = None
            self._active_groups = self.num_query_groups_per_partition
            self._active_heads_per_group = self._heads_per_group
            self.linear_qkv.set_active_rows(None)
            self.linear_proj.set_active_cols(None)
            self._set_norms_active()
            return
        if self.config.num_query_groups < self.world_size:
            raise ValueError("elastic heads need num_query_groups >= tensor-parallel size")
        d = self.hidden_size_per_attention_head
        groups, n = self.num_query_groups_per_partition, self._heads_per_group
        device = self.linear_qkv.weight.device
        if self.is_gqa:
            if heads <= 0 or heads > total or heads % self.config.num_query_groups:
                raise ValueError(
                    f"GQA head count {heads} must be a positive multiple of the "
                    f"{self.config.num_query_groups} KV groups, at most {total}"
                )
            kept = heads // self.config.num_query_groups
            rows = qkv_row_index(groups, n, d, kept, device)
            cols = proj_col_index(groups, n, d, kept, device)
            row_blocks = Blocks(groups, (n + 2) * d, ((0, kept * d), (n * d, (n + 2) * d)))
            col_blocks = Blocks(groups, n * d, ((0, kept * d),))
            self._active_groups, self._active_heads_per_group = groups, kept
        else:
            if heads <= 0 or heads > total or heads % self.world_size:
                raise ValueError(
                    f"MHA head count {heads} must be a positive multiple of TP size "
                    f"{self.world_size}, at most {total}"
                )
            local = heads // self.world_size
            rows, cols = slice(0, local * 3 * d), slice(0, local * d)
            row_blocks = col_blocks = None
            self._active_groups, self._active_heads_per_group = local, 1
        self.active_heads = heads
        self.linear_qkv.set_active_rows([rows], row_blocks)
        self.linear_proj.set_active_cols(cols, col_blocks)
        self._set_norms_active()

    def _set_norms_active(self) -> None:
        for norm in self._across_heads:
            norm.set_active(self._active_groups, self._active_heads_per_group)

    def get_query_key_value_tensors(
        self, hidden_states, key_value_states=None, output_gate=False, split_qkv=True
    ):
        if self.active_heads is None:
            return super().get_query_key_value_tensors(
                hidden_states, key_value_states, output_gate=output_gate, split_qkv=split_qkv
            )
        if output_gate or not split_qkv:
            raise NotImplementedError("elastic heads need split QKV without an output gate")
        d = self.hidden_size_per_attention_head
        n = self._active_heads_per_group
        mixed_qkv, _ = self.linear_qkv(hidden_states)  # [s, b, G_l * (n + 2) * d]
        mixed_qkv = mixed_qkv.view(*mixed_qkv.shape[:2], self._active_groups, (n + 2) * d)
        query, key, value = torch.split(mixed_qkv, [n * d, d, d], dim=3)
        query = query.reshape(query.size(0), query.size(1), -1, d)  # [s, b, G_l * n, d]
        if self.q_layernorm is not None:
            query = self.q_layernorm(query)
        if self.k_layernorm is not None:
            key = self.k_layernorm(key)
        return query, key, value
