"""Sub-network specs and the one entry point that activates a sub-network in a model.

A spec (JSON, inline or a file path) is ``{"mlp": int | [int per layer], "heads": int | [int per
layer], "layers": [kept layer indices] | N, "skip_attention": [layer indices], "skip_mlp":
[layer indices], "experts": ..., "moe_ffn": ..., "topk": ...}``; every key is optional (missing =
full size). A mixture of experts keeps its first ``experts`` (ranked) experts, each on its
first ``moe_ffn`` neurons, routing ``topk`` of them per token (int or a list per layer).
A count N keeps the N most important layers by the checkpoint's layer ranking
(``ElasticConfig.layer_ranking``, written by importance ranking). ``skip_attention`` /
``skip_mlp`` skip one half of a kept layer (block): its attention or its MLP, each its own
layer in the HybridModel. Widths are
global counts in the model's canonical unit order: MLP hidden size, and query heads (GQA: a
multiple of the KV group count, trimmed inside every group; MHA: whole heads).
Everything is validated for every layer before any module changes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

from megatron_flextron.config import ElasticConfig, ModelConfig
from megatron_flextron.elastic.attention import ElasticSelfAttention
from megatron_flextron.elastic.blocks import transformer_blocks, unwrap_model  # noqa: F401
from megatron_flextron.elastic.layer import ElasticTransformerLayer
from megatron_flextron.elastic.layout import count_layer_parameters
from megatron_flextron.elastic.mlp import ElasticMLP
from megatron_flextron.elastic.moe import ElasticMoELayer


@dataclass(frozen=True)
class Subnetwork:
    """One choice per layer and axis: per-layer MLP widths, head counts and the kept layers, and
    the kept layers whose attention or MLP alone is skipped."""

    mlp: Tuple[int, ...]
    heads: Tuple[int, ...]
    layers: Tuple[int, ...]
    skip_attention: Tuple[int, ...] = ()
    skip_mlp: Tuple[int, ...] = ()
    # mixtures of experts, per layer (empty for a dense model): kept experts, expert width, top-k
    experts: Tuple[int, ...] = ()
    moe_ffn: Tuple[int, ...] = ()
    topk: Tuple[int, ...] = ()

    @classmethod
    def full(cls, model: ModelConfig) -> "Subnetwork":
        n = model.num_layers
        return cls(
            (model.ffn_hidden_size,) * n,
            (model.num_attention_heads,) * n,
            tuple(range(n)),
            **{key: (full,) * n for key, full in _moe_full(model).items()},
        )

    @property
    def moe(self) -> Optional[Tuple[Tuple[int, int, int], ...]]:
        """(experts, expert width, top-k) per layer; None for a dense model."""
        return tuple(zip(self.experts, self.moe_ffn, self.topk)) if self.experts else None

    @classmethod
    def parse(
        cls,
        spec: Union[None, str, dict, "Subnetwork"],
        model: ModelConfig,
        elastic: Optional[ElasticConfig] = None,
    ) -> "Subnetwork":
        """From a dict, a JSON string, a JSON file path, or None (the full model); ``elastic``
        gives the layer ranking a count of layers needs."""
        if isinstance(spec, Subnetwork):
            return spec
        if spec is None:
            return cls.full(model)
        if isinstance(spec, str):
            text = spec
            if not spec.lstrip().startswith("{"):
                if not os.path.isfile(spec):
                    raise ValueError(f"sub-network spec {spec!r} is neither JSON nor a file")
                with open(spec) as f:
                    text = f.read()
            try:
                spec = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"sub-network spec is not valid JSON: {e}") from None
        if not isinstance(spec, dict):
            raise ValueError(f"sub-network spec must be a JSON object, got {type(spec).__name__}")
        unknown = set(spec) - set(SPEC_KEYS)
        if unknown:
            raise ValueError(
                f"unknown sub-network keys {sorted(unknown)}; use {', '.join(SPEC_KEYS)}"
            )
        n = model.num_layers
        layers = spec.get("layers")
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = _most_important_layers(layers, n, elastic)
        elif layers is not None and not isinstance(layers, (list, tuple)):
            raise ValueError(
                f"sub-network 'layers' is a list of indices or a count, got {layers!r}"
            )
        moe_full = _moe_full(model)
        for key in MOE_KEYS:
            if key in spec and not moe_full:
                raise ValueError(f"sub-network {key!r}: this model has no mixture of experts")
        return cls(
            **{key: _per_layer(key, spec.get(key), full, n) for key, full in moe_full.items()},
            mlp=_per_layer("mlp", spec.get("mlp"), model.ffn_hidden_size, n),
            heads=_per_layer("heads", spec.get("heads"), model.num_attention_heads, n),
            layers=tuple(range(n))
            if layers is None
            else tuple(_as_int("layers", v) for v in layers),
            skip_attention=_indices("skip_attention", spec.get("skip_attention")),
            skip_mlp=_indices("skip_mlp", spec.get("skip_mlp")),
        )

    def to_dict(self) -> dict:
        """Compact JSON form: a single number where all layers agree."""

        def compact(values):
            return values[0] if len(set(values)) == 1 else list(values)

        out = {"mlp": compact(self.mlp), "heads": compact(self.heads)}
        if self.layers != tuple(range(len(self.mlp))):
            out["layers"] = list(self.layers)
        for key in ("skip_attention", "skip_mlp"):
            if getattr(self, key):
                out[key] = list(getattr(self, key))
        for key in MOE_KEYS:
            if getattr(self, key):
                out[key] = compact(getattr(self, key))
        return out

    @property
    def skips_half_layers(self) -> bool:
        """True when some kept layer runs without its attention or without its MLP."""
        return bool(self.skip_attention or self.skip_mlp)

    def validate(self, model: ModelConfig, elastic: ElasticConfig, tp_size: int = 1) -> None:
        """Raise ValueError naming the layer and the value the model cannot run."""
        n = model.num_layers
        if model.is_moe:
            self._validate_moe(model, elastic, tp_size)
        mlp_ok, head_ok = map(set, elastic.choices_with_full(model))
        for layer, (width, heads) in enumerate(zip(self.mlp, self.heads)):
            if width not in mlp_ok:
                raise ValueError(
                    f"layer {layer}: MLP width {width} is not one of the configured choices "
                    f"{sorted(mlp_ok)}"
                )
            if width % tp_size:
                raise ValueError(
                    f"layer {layer}: MLP width {width} is not divisible by TP size {tp_size}"
                )
            if heads not in head_ok:
                raise ValueError(
                    f"layer {layer}: head count {heads} is not one of the configured choices "
                    f"{sorted(head_ok)}"
                )
            unit = model.head_unit(tp_size)
            if heads % unit:
                what = f"the {unit} KV groups (GQA)" if model.is_gqa else f"TP size {unit} (MHA)"
                raise ValueError(f"layer {layer}: head count {heads} is not a multiple of {what}")
        if not self.layers:
            raise ValueError("a sub-network must keep at least one layer")
        if list(self.layers) != sorted(set(self.layers)) or not all(
            0 <= i < n for i in self.layers
        ):
            raise ValueError(
                f"kept layers {list(self.layers)} must be distinct, sorted indices in [0, {n})"
            )
        if (len(self.layers) < n or self.skips_half_layers) and not elastic.allow_layer_skipping:
            raise ValueError("this elastic model does not allow layer skipping")
        for key in ("skip_attention", "skip_mlp"):
            indices = getattr(self, key)
            if list(indices) != sorted(set(indices)) or not set(indices) <= set(self.layers):
                raise ValueError(
                    f"{key} {list(indices)} must be distinct, sorted indices of kept layers "
                    f"{list(self.layers)}"
                )
        both = sorted(set(self.skip_attention) & set(self.skip_mlp))
        if both:
            raise ValueError(
                f"layers {both} skip both their attention and their MLP: leave them out of "
                "'layers' instead"
            )


    def _validate_moe(self, model: ModelConfig, elastic: ElasticConfig, tp_size: int) -> None:
        allowed = dict(zip(MOE_KEYS, map(set, elastic.moe_choices_with_full(model))))
        for layer in range(model.num_layers):
            if self.mlp[layer] != model.ffn_hidden_size:
                raise ValueError(
                    f"layer {layer}: MLP width {self.mlp[layer]}: a mixture of experts has no "
                    "dense MLP; its axes are experts, moe_ffn and topk"
                )
            for key in MOE_KEYS:
                value = getattr(self, key)[layer]
                if value not in allowed[key]:
                    raise ValueError(
                        f"layer {layer}: {key} {value} is not one of the configured choices "
                        f"{sorted(allowed[key])}"
                    )
            experts, width, topk = self.experts[layer], self.moe_ffn[layer], self.topk[layer]
            if topk > experts:
                raise ValueError(f"layer {layer}: topk {topk} is more than its {experts} experts")
            if width % tp_size:
                raise ValueError(
                    f"layer {layer}: moe_ffn {width} is not divisible by TP size {tp_size}"
                )
            shared = model.moe_shared_expert_intermediate_size
            if shared and (width * shared) % model.moe_ffn_hidden_size:
                raise ValueError(
                    f"layer {layer}: moe_ffn {width} gives no whole width of the shared expert "
                    f"({shared} neurons at {model.moe_ffn_hidden_size})"
                )


MOE_KEYS = ("experts", "moe_ffn", "topk")
SPEC_KEYS = ("mlp", "heads", "layers", "skip_attention", "skip_mlp", *MOE_KEYS)


def _moe_full(model: ModelConfig) -> dict:
    if not model.is_moe:
        return {}
    full = (model.num_moe_experts, model.moe_ffn_hidden_size, model.moe_router_topk)
    return dict(zip(MOE_KEYS, full))


def _indices(key: str, value) -> Tuple[int, ...]:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"sub-network {key!r} is a list of layer indices, got {value!r}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"sub-network {key!r} values must be integers, got {v!r}")
        out.append(v)
    return tuple(out)


def _most_important_layers(count: int, n: int, elastic: Optional[ElasticConfig]) -> list:
    ranking = list(elastic.layer_ranking) if elastic is not None else []
    if not ranking:
        raise ValueError(
            f"sub-network 'layers': {count} keeps the {count} most important layers by the "
            "checkpoint's layer ranking, and this checkpoint has none (rank it: convert with "
            "--calibration-data); list the kept layer indices instead"
        )
    if not 1 <= count <= n:
        raise ValueError(f"sub-network 'layers': a count must be in [1, {n}], got {count}")
    return sorted(ranking[:count])


def _as_int(key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"sub-network {key!r} values must be integers, got {value!r}")
    if value <= 0 and key != "layers":
        raise ValueError(f"sub-network {key!r} values must be positive, got {value}")
    return value


def _per_layer(key: str, value, full: int, num_layers: int) -> Tuple[int, ...]:
    if value is None:
        return (full,) * num_layers
    if isinstance(value, (list, tuple)):
        if len(value) != num_layers:
            raise ValueError(
                f"sub-network {key!r} lists {len(value)} values for a {num_layers}-layer model"
            )
        return tuple(_as_int(key, v) for v in value)
    return (_as_int(key, value),) * num_layers


def set_subnetwork(
    model: torch.nn.Module,
    spec: Union[None, str, dict, Subnetwork],
    model_config: ModelConfig,
    elastic: ElasticConfig,
) -> Subnetwork:
    """Activate a sub-network in an elastic GPTModel (any TP/PP stage); None restores full size.

    Validates the whole spec first, then sets each local layer from its global layer number.
    """
    subnet = Subnetwork.parse(spec, model_config, elastic)
    gpt = unwrap_model(model)
    tp_size = gpt.config.tensor_model_parallel_size
    subnet.validate(model_config, elastic, tp_size)
    kept = set(subnet.layers)
    blocks = transformer_blocks(gpt)
    if subnet.skips_half_layers and any(b.attention_layer is b.mlp_layer for b in blocks):
        raise ValueError(
            "skip_attention / skip_mlp need the elastic HybridModel (build_elastic_model), "
            "where a layer's attention and MLP are two layers"
        )
    for block in blocks:
        for layer in block.layers:
            if not isinstance(layer, ElasticTransformerLayer):
                raise TypeError(
                    f"{type(layer).__name__} is not elastic: build with elastic_layer_spec"
                )
        if not isinstance(block.mlp, (ElasticMLP, ElasticMoELayer)) or not isinstance(
            block.self_attention, ElasticSelfAttention
        ):
            raise TypeError(f"layer {block.index} does not use the elastic MLP and attention")
    for block in blocks:
        block.set_skipped(block.index not in kept)
        if subnet.skips_half_layers:
            if block.index in subnet.skip_attention:
                block.attention_layer.set_skipped(True)
            if block.index in subnet.skip_mlp:
                block.mlp_layer.set_skipped(True)
        if isinstance(block.mlp, ElasticMoELayer):
            block.mlp.set_active(*subnet.moe[block.index])
        else:
            block.mlp.set_active_width(subnet.mlp[block.index])
        block.self_attention.set_active_heads(subnet.heads[block.index])
    return subnet


def count_parameters(subnet: Subnetwork, model: ModelConfig) -> dict:
    """Parameter counts of a sub-network: transformer layers, and total with embeddings."""
    return count_layer_parameters(
        model,
        subnet.mlp,
        subnet.heads,
        subnet.layers,
        subnet.skip_attention,
        subnet.skip_mlp,
        subnet.moe,
    )
