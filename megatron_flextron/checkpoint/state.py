"""The format-independent model every loader produces and every saver consumes.

State names are megatron-core GPTModel names (local spec) with global layer numbers, tensors are
full (TP=1) and in canonical unit order: loaders and savers meet here, nowhere else.

A state is any name -> tensor mapping: a dict in memory, or a ``LazyState`` whose tensors are read
from the source files (and transformed) when asked for. Converters stream: a loader's lazy state,
viewed through a permutation or a sub-network cut (each also lazy), is written by a saver one
tensor at a time, so the model is never held twice and the source dtype is kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Mapping, NamedTuple, Optional, Tuple

import torch

from megatron_flextron.config import ElasticConfig, ModelConfig


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match its config."""


class TensorSpec(NamedTuple):
    shape: Tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, tensor: torch.Tensor) -> "TensorSpec":
        return cls(tuple(tensor.shape), tensor.dtype)

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * self.dtype.itemsize

    def meta(self) -> torch.Tensor:
        """A data-less tensor of this spec: run a transform on it to learn its output spec."""
        return torch.empty(self.shape, dtype=self.dtype, device="meta")


class LazyState(Mapping):
    """name -> tensor, each read (and transformed) on access and not kept: ``specs`` says what
    every name will hold without reading it; a produced tensor of another spec is an error."""

    def __init__(self, specs: Dict[str, TensorSpec], read: Callable[[str], torch.Tensor]):
        self.specs = dict(specs)
        self._read = read

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.specs:
            raise KeyError(name)
        tensor = self._read(name)
        if TensorSpec.of(tensor) != self.specs[name]:
            raise CheckpointError(
                f"{name}: read {TensorSpec.of(tensor)}, its source said {self.specs[name]}"
            )
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)


def spec_of(state: Mapping, name: str) -> TensorSpec:
    """A tensor's spec without reading it (for a lazy state)."""
    if isinstance(state, LazyState):
        return state.specs[name]
    return TensorSpec.of(state[name])


def state_dtype(state: Mapping) -> torch.dtype:
    """The dtype a saver writes the whole checkpoint in: the tensors' one dtype, or fp32 when
    they mix dtypes (e.g. fp32 norms beside bf16 weights), so that no tensor is rounded."""
    dtypes = {spec_of(state, name).dtype for name in state}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def lazy_view(
    source: Mapping,
    transform: Callable[[str, torch.Tensor], torch.Tensor],
    names: Optional[Dict[str, str]] = None,
    same_spec: bool = False,
) -> LazyState:
    """``out[name] = transform(name, source[names[name]])`` (``names``: out -> source, identity
    by default), computed on access. Specs come from running ``transform`` on data-less tensors,
    or are the source's when ``same_spec`` (a permutation)."""
    names = names or {name: name for name in source}
    specs = {}
    for name, src in names.items():
        spec = spec_of(source, src)
        specs[name] = spec if same_spec else TensorSpec.of(transform(name, spec.meta()))
    return LazyState(specs, lambda name: transform(name, source[names[name]]))


@dataclass
class Checkpoint:
    model: ModelConfig
    state: Mapping[str, torch.Tensor]  # a dict or a LazyState
    tokenizer_dir: Optional[str] = None  # tokenizer files to copy next to every output
    elastic: Optional[ElasticConfig] = None
    metadata: dict = field(default_factory=dict)  # e.g. how the canonical order was made
    # a heterogeneous dense model: (MLP width, query heads) per layer; None = as in ``model``
    layer_shapes: Optional[List[Tuple[int, int]]] = None

    def validate(self) -> None:
        """Every expected tensor present with its expected shape, nothing unexpected."""
        expected = expected_shapes(self.model, self.layer_shapes)
        missing = sorted(set(expected) - set(self.state))
        unexpected = sorted(set(self.state) - set(expected))
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint does not match its config: missing {missing[:5]}"
                f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            )
        for name, shape in expected.items():
            stored = spec_of(self.state, name).shape
            if stored != shape:
                raise CheckpointError(f"{name} has shape {stored}, the config implies {shape}")


def expected_shapes(
    m: ModelConfig, layer_shapes: Optional[List[Tuple[int, int]]] = None
) -> Dict[str, Tuple[int, ...]]:
    """Canonical parameter names and shapes implied by a model config (and per-layer sizes)."""
    h, d = m.hidden_size, m.kv_channels
    blocks = 2 if m.gated else 1
    norm = ["weight"] + (["bias"] if m.normalization == "LayerNorm" else [])
    shapes = {"embedding.word_embeddings.weight": (m.vocab_size, h)}
    if m.position_embedding == "learned_absolute":
        shapes["embedding.position_embeddings.weight"] = (m.max_position_embeddings, h)
    for i in range(m.num_layers):
        ffn, heads = layer_shapes[i] if layer_shapes else (m.ffn_hidden_size, m.num_attention_heads)
        groups = m.num_query_groups if m.is_gqa else heads
        qkv = (heads + 2 * groups) * d
        p = f"decoder.layers.{i}."
        for n in norm:
            shapes[f"{p}input_layernorm.{n}"] = (h,)
            shapes[f"{p}pre_mlp_layernorm.{n}"] = (h,)
        shapes[f"{p}self_attention.linear_qkv.weight"] = (qkv, h)
        if m.qk_layernorm_across_heads:  # OLMoE: a weight per q and per k channel
            shapes[f"{p}self_attention.q_layernorm.weight"] = (heads * d,)
            shapes[f"{p}self_attention.k_layernorm.weight"] = (groups * d,)
        elif m.qk_layernorm:  # one norm over the head dim, shared by every head
            for n in norm:
                shapes[f"{p}self_attention.q_layernorm.{n}"] = (d,)
                shapes[f"{p}self_attention.k_layernorm.{n}"] = (d,)
        shapes[f"{p}self_attention.linear_proj.weight"] = (h, heads * d)
        if m.is_moe:
            shapes.update(moe_shapes(m, p))
        else:
            shapes[f"{p}mlp.linear_fc1.weight"] = (blocks * ffn, h)
            shapes[f"{p}mlp.linear_fc2.weight"] = (h, ffn)
        if m.has_qkv_bias:
            shapes[f"{p}self_attention.linear_qkv.bias"] = (qkv,)
        if m.add_bias_linear:
            shapes[f"{p}self_attention.linear_proj.bias"] = (h,)
        if m.add_bias_linear and not m.is_moe:
            shapes[f"{p}mlp.linear_fc1.bias"] = (blocks * ffn,)
            shapes[f"{p}mlp.linear_fc2.bias"] = (h,)
    for n in norm:
        shapes[f"decoder.final_layernorm.{n}"] = (h,)
    if not m.tie_embeddings:
        shapes["output_layer.weight"] = (m.vocab_size, h)
    return shapes


def moe_shapes(m: ModelConfig, prefix: str) -> Dict[str, Tuple[int, ...]]:
    """One layer's mixture of experts (megatron's local MoE names, experts by global index):
    router [E, h], experts' fc1/fc2, the shared expert and its gate, the routing bias."""
    h, blocks, f = m.hidden_size, 2 if m.gated else 1, m.moe_ffn_hidden_size
    p = f"{prefix}mlp."
    shapes = {f"{p}router.weight": (m.num_moe_experts, h)}
    if m.moe_router_enable_expert_bias:
        shapes[f"{p}router.expert_bias"] = (m.num_moe_experts,)
    for e in range(m.num_moe_experts):
        shapes[f"{p}experts.local_experts.{e}.linear_fc1.weight"] = (blocks * f, h)
        shapes[f"{p}experts.local_experts.{e}.linear_fc2.weight"] = (h, f)
    shared = m.moe_shared_expert_intermediate_size
    if shared:
        shapes[f"{p}shared_experts.linear_fc1.weight"] = (blocks * shared, h)
        shapes[f"{p}shared_experts.linear_fc2.weight"] = (h, shared)
        if m.moe_shared_expert_gate:
            shapes[f"{p}shared_experts.gate_weight"] = (1, h)
    return shapes
