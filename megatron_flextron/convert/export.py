"""Cut a sub-network out of a canonical checkpoint as an ordinary dense model.

The kept units are the first ones in canonical order (what the elastic model runs): the first k
MLP neurons (gate and up together), the first h/G query heads of every KV group (GQA) or the first
h heads (MHA), and the kept layers, renumbered.
"""

from __future__ import annotations

import dataclasses

from megatron_flextron.checkpoint.state import Checkpoint, CheckpointError, lazy_view
from megatron_flextron.elastic.layout import fc1_blocks, keep_proj, keep_qkv, kept_per_group
from megatron_flextron.elastic.subnetwork import Subnetwork


def slice_tensor(name: str, value, m, width: int, heads: int):
    """One per-layer tensor (``name`` without the layer prefix) cut to (width, heads)."""
    g, n, d = m.num_query_groups, m.heads_per_group, m.kv_channels
    if name.startswith("self_attention.linear_qkv."):
        value = keep_qkv(value, g, n, d, kept_per_group(m, heads))
    elif name == "self_attention.linear_proj.weight":
        value = keep_proj(value, g, n, d, kept_per_group(m, heads))
    elif name.startswith("mlp.linear_fc1."):
        x = fc1_blocks(value, m)[:, :width]
        value = x.reshape(x.shape[0] * width, *value.shape[1:])
    elif name == "mlp.linear_fc2.weight":
        value = value[:, :width]
    return value.contiguous()


def layer_config(m, width: int, heads: int):
    """The dense config of one layer with ``width`` MLP neurons and ``heads`` query heads: GQA
    keeps its KV groups, MHA keeps one KV head per query head."""
    return dataclasses.replace(
        m,
        ffn_hidden_size=width,
        num_attention_heads=heads,
        num_query_groups=m.num_query_groups if m.is_gqa else heads,
    )


def export_subnetwork(ckpt: Checkpoint, subnet: Subnetwork) -> Checkpoint:
    """A dense checkpoint of a sub-network, as a lazy view of ``ckpt.state`` (each tensor cut
    when read). Homogeneous: an ordinary config of the smaller shape. Heterogeneous (per-layer
    sizes): ``layer_shapes`` records (MLP width, heads) per kept layer and the config keeps the
    largest of each."""
    m = ckpt.model
    if subnet.skips_half_layers:
        raise CheckpointError(
            "a sub-network that skips an attention or an MLP on its own (skip_attention / "
            "skip_mlp) cannot be exported yet: the dense formats here need both in every layer; "
            "run it with the elastic model (tools/evaluate.py, tools/generate.py)"
        )
    shapes = [(subnet.mlp[i], subnet.heads[i]) for i in subnet.layers]
    names = {k: k for k in ckpt.state if not k.startswith("decoder.layers.")}
    cut = {}  # output name -> (name in the layer, width, heads)
    for dst, src in enumerate(subnet.layers):
        prefix = f"decoder.layers.{src}."
        for key in ckpt.state:
            if key.startswith(prefix):
                rest = key[len(prefix):]
                names[f"decoder.layers.{dst}.{rest}"] = key
                cut[f"decoder.layers.{dst}.{rest}"] = (rest, *shapes[dst])

    def transform(name, value):
        return slice_tensor(cut[name][0], value, m, *cut[name][1:]) if name in cut else value

    state = lazy_view(ckpt.state, transform, names)
    width, heads = max(w for w, _ in shapes), max(h for _, h in shapes)
    model = dataclasses.replace(layer_config(m, width, heads), num_layers=len(subnet.layers))
    out = Checkpoint(
        model=model,
        state=state,
        tokenizer_dir=ckpt.tokenizer_dir,
        metadata=dict(ckpt.metadata, subnetwork=subnet.to_dict()),
        layer_shapes=shapes if len(set(shapes)) > 1 else None,
    )
    out.validate()
    return out
