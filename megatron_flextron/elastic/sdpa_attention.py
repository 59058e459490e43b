"""Core attention through ``torch.nn.functional.scaled_dot_product_attention``.

Megatron's local ``DotProductAttention`` materialises the [b, heads, s, s] score matrix and sizes
its output from the config; this module takes the head counts from the tensors it is given (so
elastic head counts pass through), never builds the score matrix itself, and lets PyTorch pick a
flash or memory-efficient kernel on GPU. It is a drop-in ``core_attention`` for megatron's
``SelfAttention`` with the same mask semantics: an explicit boolean ``attention_mask`` (True =
masked) is honoured; without one, ``causal`` masks causally.

Shapes: query [sq, b, np, d], key/value [sk, b, ng, d] (np a multiple of ng) -> [sq, b, np * d].
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class SDPAttention(MegatronModule):
    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism")
        if getattr(config, "window_size", None) is not None:
            raise ValueError("SDPAttention does not support sliding-window attention")
        if config.softmax_type != "vanilla":
            raise ValueError(
                f"SDPAttention supports only vanilla softmax, not {config.softmax_type}"
            )
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        # apply_query_key_layer_scaling divides scores by layer_number and multiplies them back
        # inside an fp32 softmax: the net scale is the plain one.
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention: packed sequences and attention bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        sq, sk = query.size(0), key.size(0)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]

        attn_mask, is_causal = None, False
        if attention_mask is not None:
            attn_mask = ~attention_mask  # megatron: True = masked; SDPA: True = attend
        elif mask_type == AttnMaskType.causal and sq == sk:
            is_causal = True
        elif mask_type == AttnMaskType.causal:  # decoding with a cache: align to the last key
            attn_mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)

        dropout_p = self.dropout_p if self.training else 0.0
        with self._dropout_rng(dropout_p):
            context = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attn_mask,
                dropout_p=dropout_p,
                is_causal=is_causal,
                scale=self.softmax_scale,
                enable_gqa=q.size(1) != k.size(1),
            )
        return context.permute(2, 0, 1, 3).reshape(sq, context.size(0), -1)

    def _dropout_rng(self, dropout_p: float):
        # Like megatron's attention: dropout on TP-sharded heads uses the model-parallel RNG.
        if dropout_p > 0 and not self.config.sequence_parallel:
            return tensor_parallel.get_cuda_rng_tracker().fork()
        return contextlib.nullcontext()
