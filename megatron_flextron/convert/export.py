"""Cut a sub-network out of a canonical checkpoint as an ordinary dense model.

The kept units are the first ones in canonical order (what the elastic model runs): the first k
MLP neurons (gate and up together), the first h/G query heads of every KV group (GQA) or the first
h heads (MHA), and the kept layers, renumbered.
"""

from __future__ import annotations

import dataclasses
import re

from megatron_flextron.checkpoint.state import Checkpoint, CheckpointError, lazy_view
from megatron_flextron.elastic.layout import keep_proj, keep_qkv, kept_per_group
from megatron_flextron.elastic.subnetwork import Subnetwork

_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.")


def _cut_mlp(value, m, name: str, width: int):
    """An MLP's (dense, expert or shared expert) fc1 rows / fc2 columns cut to ``width``."""
    if name.endswith("linear_fc1.weight") or name.endswith("linear_fc1.bias"):
        blocks = 2 if m.gated else 1  # gate and up rows cut together
        x = value.reshape(blocks, -1, *value.shape[1:])[:, :width]
        return x.reshape(blocks * width, *value.shape[1:])
    if name.endswith("linear_fc2.weight"):
        return value[:, :width]
    return value


def slice_tensor(name: str, value, m, width: int, heads: int, moe=None):
    """One per-layer tensor (``name`` without the layer prefix) cut to (width, heads), and for a
    mixture of experts to ``moe`` = (experts, expert width, top-k)."""
    g, n, d = m.num_query_groups, m.heads_per_group, m.kv_channels
    if moe is not None and name.startswith("mlp."):
        experts, expert_width, _ = moe
        if name.startswith("mlp.router."):
            value = value[:experts]
        elif name.startswith("mlp.experts."):
            value = _cut_mlp(value, m, name, expert_width)
        elif name.startswith("mlp.shared_experts.linear_fc"):
            shared = m.moe_shared_expert_intermediate_size * expert_width // m.moe_ffn_hidden_size
            value = _cut_mlp(value, m, name, shared)
        return value.contiguous()
    if name.startswith("self_attention.linear_qkv."):
        value = keep_qkv(value, g, n, d, kept_per_group(m, heads))
    elif name == "self_attention.linear_proj.weight":
        value = keep_proj(value, g, n, d, kept_per_group(m, heads))
    elif m.qk_layernorm_across_heads and name == "self_attention.q_layernorm.weight":
        value = keep_proj(value[None], g, n, d, kept_per_group(m, heads))[0]  # per kept head
    elif m.qk_layernorm_across_heads and name == "self_attention.k_layernorm.weight":
        value = value if m.is_gqa else value[: heads * d]  # GQA keeps every KV group
    elif name.startswith("mlp."):
        value = _cut_mlp(value, m, name, width)
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


def moe_config(m, experts: int, width: int, topk: int):
    """The MoE config with ``experts`` experts of ``width`` neurons routing ``topk``: a model of
    that shape routes exactly as the elastic one (softmax over the kept experts' logits)."""
    shared = m.moe_shared_expert_intermediate_size
    return dataclasses.replace(
        m,
        num_moe_experts=experts,
        moe_ffn_hidden_size=width,
        moe_router_topk=topk,
        moe_shared_expert_intermediate_size=shared and shared * width // m.moe_ffn_hidden_size,
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
    moe = None if subnet.moe is None else [subnet.moe[i] for i in subnet.layers]
    if moe is not None and len(set(moe)) > 1:
        raise CheckpointError(
            "per-layer expert choices (experts, moe_ffn or topk differing between layers) have "
            "no dense MoE config (every format here holds one expert count, width and top-k); "
            "run them with the elastic model"
        )
    names = {k: k for k in ckpt.state if not k.startswith("decoder.layers.")}
    cut = {}  # output name -> (name in the layer, width, heads, MoE choice)
    for dst, src in enumerate(subnet.layers):
        prefix = f"decoder.layers.{src}."
        for key in ckpt.state:
            if key.startswith(prefix):
                rest = key[len(prefix):]
                expert = _EXPERT.match(rest)
                if expert and int(expert.group(1)) >= moe[dst][0]:
                    continue  # a dropped expert
                names[f"decoder.layers.{dst}.{rest}"] = key
                cut[f"decoder.layers.{dst}.{rest}"] = (
                    rest, *shapes[dst], None if moe is None else moe[dst]
                )

    def transform(name, value):
        return slice_tensor(cut[name][0], value, m, *cut[name][1:]) if name in cut else value

    state = lazy_view(ckpt.state, transform, names)
    width, heads = max(w for w, _ in shapes), max(h for _, h in shapes)
    model = dataclasses.replace(layer_config(m, width, heads), num_layers=len(subnet.layers))
    if moe is not None:
        model = moe_config(model, *moe[0])
    out = Checkpoint(
        model=model,
        state=state,
        tokenizer_dir=ckpt.tokenizer_dir,
        metadata=dict(ckpt.metadata, subnetwork=subnet.to_dict()),
        layer_shapes=shapes if len(set(shapes)) > 1 else None,
    )
    out.validate()
    return out
