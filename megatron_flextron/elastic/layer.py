"""Elastic depth: a megatron TransformerLayer that can be skipped (identity), or gated."""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.transformer_layer import TransformerLayer


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
        hidden, context = super().forward(*args, **kwargs)
        if self.keep is not None:
            start = x if self.gate_from is None else self.gate_from.recorded_input
            hidden = start + self.keep.to(hidden.dtype) * (hidden - start)
        return hidden, context
