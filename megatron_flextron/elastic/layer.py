"""Elastic depth: a megatron TransformerLayer that can be skipped (identity), or gated."""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.transformer_layer import TransformerLayer


class ElasticTransformerLayer(TransformerLayer):
    """A skipped layer returns its input unchanged: the residual stream passes straight through.
    A gated layer (``keep``, a soft architecture's probability that it runs) returns
    x + keep (layer(x) - x): keep = 1 runs it, keep = 0 is the skipped layer."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skipped = False
        self.keep: Optional[torch.Tensor] = None

    def set_skipped(self, skipped: bool) -> None:
        self.skipped = skipped

    def set_keep(self, keep: Optional[torch.Tensor]) -> None:
        self.keep = keep

    def forward(self, *args, **kwargs):
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if self.skipped:
            return x, kwargs.get("context")
        hidden, context = super().forward(*args, **kwargs)
        if self.keep is not None:
            hidden = x + self.keep.to(hidden.dtype) * (hidden - x)
        return hidden, context
