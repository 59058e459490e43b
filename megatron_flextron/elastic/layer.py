"""Elastic depth: a megatron TransformerLayer that can be skipped (identity) by index."""

from __future__ import annotations

import logging

from megatron.core.transformer.transformer_layer import TransformerLayer

# TransformerLayer recognises megatron's MLP by exact class and logs a warning for any subclass;
# ElasticMLP takes MLP's arguments and finds its TP group itself, so the warning is noise.
logging.getLogger(TransformerLayer.__module__).addFilter(
    lambda record: "Unknown MLP type" not in record.getMessage()
)


class ElasticTransformerLayer(TransformerLayer):
    """A skipped layer returns its input unchanged: the residual stream passes straight through."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skipped = False

    def forward(self, *args, **kwargs):
        if not self.skipped:
            return super().forward(*args, **kwargs)
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return hidden_states, kwargs.get("context")
