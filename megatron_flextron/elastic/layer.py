"""Elastic depth: a megatron TransformerLayer that can be skipped (identity), or gated.

Inference steps (grad disabled, an inference context given: every engine step) run the layer's
arithmetic without megatron's per-layer machinery that does nothing there (activation-offload
and nvtx context managers, IdentityOp calls for the cross-attention slots, recompute and CUDA
graph checks, a grad-enabled bias-dropout-add): norm, attention or MLP, residual add, in
megatron's order. On one CPU thread that machinery was a measurable part of a decode step
(benchmarks/serving_python_calls.py); layers configured to use any of it take megatron's path.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.transformer_layer import TransformerLayer

_NORMS = (IdentityOp, torch.nn.RMSNorm, torch.nn.LayerNorm)


def add_residual(output_with_bias, residual: torch.Tensor) -> torch.Tensor:
    """megatron's bias-dropout-add in eval without grad: residual + (output + bias), in place
    on the output as megatron's does (dropout is the identity in eval)."""
    out, bias = output_with_bias
    if out.dtype != residual.dtype:
        out = out.to(residual.dtype)
        bias = None if bias is None else bias.to(residual.dtype)
    if bias is not None:
        out.add_(bias)
    return out.add_(residual)


class ElasticTransformerLayer(TransformerLayer):
    """A skipped layer returns its input unchanged: the residual stream passes straight through.
    A gated layer (``keep``, a soft architecture's probability that it runs) returns
    x + keep (layer(x) - x): keep = 1 runs it, keep = 0 is the skipped layer.

    A block of two layers (HybridModel: attention, then MLP) is gated as one, as a GPTModel
    layer is: its first layer records its input (``record_input``) and the second mixes its own
    output with that (``set_keep(keep, gate_from=first)``), so x + keep (block(x) - x)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skipped = False
        self.keep: Optional[torch.Tensor] = None
        self.gate_from: Optional["ElasticTransformerLayer"] = None
        self.recording = False
        self.recorded_input: Optional[torch.Tensor] = None
        self._plain: Optional[bool] = None  # eligible for the inference path (first use)

    def set_skipped(self, skipped: bool) -> None:
        self.skipped = skipped

    def set_keep(
        self, keep: Optional[torch.Tensor], gate_from: Optional["ElasticTransformerLayer"] = None
    ) -> None:
        self.keep, self.gate_from = keep, gate_from

    def record_input(self, recording: bool) -> None:
        self.recording, self.recorded_input = recording, None

    def forward(self, *args, **kwargs):
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if self.skipped:
            return x, kwargs.get("context")
        if self.recording:
            self.recorded_input = x
        if (not args and kwargs.get("inference_context") is not None
                and not torch.is_grad_enabled() and self._is_plain()):
            hidden, context = self._inference_forward(**kwargs)
        else:
            hidden, context = super().forward(*args, **kwargs)
        if self.keep is not None:
            start = x if self.gate_from is None else self.gate_from.recorded_input
            hidden = start + self.keep.to(hidden.dtype) * (hidden - start)
        return hidden, context

    def _is_plain(self) -> bool:
        """Whether this layer uses none of what the inference path leaves out."""
        if self._plain is None:
            cfg = self.config
            self._plain = (
                not self.is_moe_layer
                and isinstance(self.cross_attention, IdentityOp)
                and isinstance(self.pre_cross_attn_layernorm, IdentityOp)
                and all(isinstance(n, _NORMS) for n in (self.input_layernorm,
                                                         self.pre_mlp_layernorm))
                and not (self.recompute_input_layernorm or self.recompute_pre_mlp_layernorm
                         or self.recompute_mlp or self.offload_attn_norm
                         or self.offload_mlp_norm)
                and not (cfg.fp32_residual_connection or cfg.inference_fuse_tp_communication
                         or cfg.mlp_chunks_for_prefill > 1)
            )
        return self._plain and not self.training

    def _inference_forward(self, hidden_states, attention_mask=None, inference_context=None,
                           rotary_pos_emb=None, sequence_len_offset=None,
                           packed_seq_params=None, padding_mask=None, context=None, **rest):
        """TransformerLayer.forward's arithmetic for an inference step (see the module doc)."""
        x = hidden_states
        if not isinstance(self.self_attention, IdentityOp):
            x = add_residual(self.self_attention(
                self.input_layernorm(x), attention_mask=attention_mask,
                inference_context=inference_context, rotary_pos_emb=rotary_pos_emb,
                rotary_pos_cos=rest.get("rotary_pos_cos"),
                rotary_pos_sin=rest.get("rotary_pos_sin"),
                rotary_pos_cos_sin=rest.get("rotary_pos_cos_sin"),
                attention_bias=rest.get("attention_bias"), packed_seq_params=packed_seq_params,
                sequence_len_offset=sequence_len_offset), x)
        if not isinstance(self.mlp, IdentityOp):
            x = add_residual(self.mlp(self.pre_mlp_layernorm(x), padding_mask=padding_mask), x)
        return x, context
