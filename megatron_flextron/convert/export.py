"""Cut a sub-network out of a canonical checkpoint as an ordinary dense model.

The kept units are the first ones in canonical order (what the elastic model runs): the first k
MLP neurons (gate and up together), the first h/G query heads of every KV group (GQA) or the first
h heads (MHA), and the kept layers, renumbered.
"""

from __future__ import annotations

import dataclasses

from megatron_flextron.checkpoint.state import Checkpoint
from megatron_flextron.elastic.layout import fc1_blocks, keep_proj, keep_qkv, kept_per_group
from megatron_flextron.elastic.subnetwork import Subnetwork


def slice_layer(state: dict, m, src: int, dst: int, width: int, heads: int) -> dict:
    """Layer ``src`` of a canonical state at (width, heads), renamed to layer ``dst``."""
    g, n, d = m.num_query_groups, m.heads_per_group, m.kv_channels
    blocks = 2 if m.gated else 1
    kept = kept_per_group(m, heads)
    prefix, out = f"decoder.layers.{src}.", {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if name.startswith("self_attention.linear_qkv."):
            value = keep_qkv(value, g, n, d, kept)
        elif name == "self_attention.linear_proj.weight":
            value = keep_proj(value, g, n, d, kept)
        elif name.startswith("mlp.linear_fc1."):
            x = fc1_blocks(value, m)[:, :width]
            value = x.reshape(blocks * width, *value.shape[1:])
        elif name == "mlp.linear_fc2.weight":
            value = value[:, :width]
        out[f"decoder.layers.{dst}.{name}"] = value.contiguous()
    return out


def export_subnetwork(ckpt: Checkpoint, subnet: Subnetwork) -> Checkpoint:
    """A dense checkpoint of a sub-network. Homogeneous: an ordinary config of the smaller shape.
    Heterogeneous (per-layer sizes): ``layer_shapes`` records (MLP width, heads) per kept layer
    and the config keeps the largest of each."""
    m = ckpt.model
    shapes = [(subnet.mlp[i], subnet.heads[i]) for i in subnet.layers]
    state = {k: v for k, v in ckpt.state.items() if not k.startswith("decoder.layers.")}
    for dst, src in enumerate(subnet.layers):
        state.update(slice_layer(ckpt.state, m, src, dst, *shapes[dst]))
    width, heads = max(w for w, _ in shapes), max(h for _, h in shapes)
    model = dataclasses.replace(
        m,
        num_layers=len(subnet.layers),
        ffn_hidden_size=width,
        num_attention_heads=heads,
        num_query_groups=m.num_query_groups if m.is_gqa else heads,
    )
    out = Checkpoint(
        model=model,
        state=state,
        tokenizer_dir=ckpt.tokenizer_dir,
        metadata=dict(ckpt.metadata, subnetwork=subnet.to_dict()),
        layer_shapes=shapes if len(set(shapes)) > 1 else None,
    )
    out.validate()
    return out
