"""Megatron-LM torch_dist checkpoints (``--ckpt-format torch_dist``, Megatron-LM's default).

Layout: ROOT/latest_checkpointed_iteration.txt, ROOT/iter_NNNNNNN/ or ROOT/release/, each holding
``.metadata`` + ``*.distcp`` (torch.distributed.checkpoint shards, global tensor names whatever
TP/PP wrote them), the common state (the non-sharded ``args``, ``iteration``, ...: ``common.pt``,
or inside the shards since megatron-core 0.19) and megatron's ``metadata.json``. Either the root or one iteration folder may be given.

- Config: the ``args`` Namespace in the common state, read with ``weights_only=True`` and an
  allow-list (checkpoint/common_state.py: argparse.Namespace and enum classes of megatron/torch); anything else is named and refused.
- Tensors: read lazily, one stored key or one layer of a stacked key at a time (only what is
  converted), kept in the stored dtype (bf16 stays bf16). Layers stacked on a leading axis (``decoder.layers.X``) or one
  key per layer; norms under local (``input_layernorm``) or Transformer Engine names
  (``self_attention.linear_qkv.layer_norm_weight``). ``_extra_state`` (TE/fp8 metadata, stored as
  bytes), ``optimizer.*`` and rng state are skipped; any other tensor the architecture does not
  use stops the conversion naming it.
- Vocabulary: the embedding has ``padded_vocab_size`` rows; the rows past the tokenizer's vocabulary
  are kept (the same function) and recorded in the metadata.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from typing import List, Optional

import torch

from megatron_flextron.checkpoint.common_state import read_common_state as read_common
from megatron_flextron.checkpoint.dcp_reader import StoredTensors
from megatron_flextron.checkpoint.flextron import _NORM_KEYS, TRACKER_FILE, iteration_dir
from megatron_flextron.checkpoint.io import read_json
from megatron_flextron.checkpoint.state import (
    Checkpoint,
    CheckpointError,
    LazyState,
    expected_shapes,
)
from megatron_flextron.config import ModelConfig
from megatron_flextron.convert.formats.megatron_args import model_config_from_args
from megatron_flextron.convert.formats.megatron_tokenizer import resolve_tokenizer

Tensor = torch.Tensor
NOT_MODEL = re.compile(r"(^optimizer\.|^rng_state|^opt_param_scheduler|_extra_state($|/))")
_PER_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def shard_dir(path: str) -> str:
    """The iteration folder of a root (its tracker file's) or the folder itself."""
    if not os.path.isdir(path):
        raise CheckpointError(f"Megatron checkpoint {path} is not a directory")
    if not os.path.isfile(os.path.join(path, ".metadata")):
        if not os.path.isfile(os.path.join(path, TRACKER_FILE)):
            raise CheckpointError(
                f"{path} is neither a torch_dist iteration folder (no .metadata) nor a checkpoint "
                f"root (no {TRACKER_FILE})"
            )
        path = iteration_dir(path)
    if any(name.startswith("mp_rank_") for name in os.listdir(path)):
        raise CheckpointError(f"{path} is a legacy torch checkpoint: use --loader megatron_legacy")
    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise CheckpointError(f"{path} holds no torch_dist .metadata: not a torch_dist checkpoint")
    return path


def _canonical(rest: str) -> str:
    return _NORM_KEYS.get(rest, rest)


def _names(key: str, m: ModelConfig) -> List[str]:
    """The canonical names one stored key holds: stacked layers (leading axis) or one layer or
    a global tensor; TE-fused norm names renamed to the norms'."""
    match = _PER_LAYER.match(key)
    if match:
        return [f"decoder.layers.{match.group(1)}.{_canonical(match.group(2))}"]
    if not key.startswith("decoder.layers."):
        return [key]
    rest = _canonical(key[len("decoder.layers.") :])
    return [f"decoder.layers.{i}.{rest}" for i in range(m.num_layers)]


def _read_state(stored: StoredTensors, m: ModelConfig, layer_shapes=None) -> LazyState:
    """Every stored key mapped to canonical names first (a key the architecture does not use is
    refused before anything is read); the state reads one tensor, or one layer of a stacked key,
    per access."""
    expected = expected_shapes(m, layer_shapes)
    plan = {key: _names(key, m) for key in sorted(stored.tensors)}
    tied_head = plan.pop("output_layer.weight", None) if m.tie_embeddings else None
    unused = sorted(k for k, names in plan.items() if any(n not in expected for n in names))
    if unused:
        raise CheckpointError(
            f"megatron: stored tensors this architecture does not use: {unused}; "
            "converting would drop them"
        )
    counts = Counter(n for names in plan.values() for n in names)
    twice = sorted(n for n, c in counts.items() if c > 1)
    if twice:
        raise CheckpointError(f"stored twice (local and TE names?): {twice[:4]}")
    where = {}  # canonical name -> (key, layer of a stacked key or None)
    for key, names in plan.items():
        shape = stored.spec(key).shape
        stacked = key.startswith("decoder.layers.") and not _PER_LAYER.match(key)
        if stacked and (not shape or shape[0] != len(names)):
            raise CheckpointError(
                f"{key}: stacked layers of shape {shape}, expected {len(names)} first"
            )
        where.update({name: (key, i if stacked else None) for i, name in enumerate(names)})
    state = stored.lazy_state(where)
    if tied_head is not None:
        if _EMBED not in where or not torch.equal(stored.read("output_layer.weight"), state[_EMBED]):
            raise CheckpointError("tied embeddings, but output_layer.weight differs from them")
    return state


_EMBED = "embedding.word_embeddings.weight"


def load_megatron(path: str, tokenizer_model: Optional[str] = None) -> Checkpoint:
    folder = shard_dir(path)
    root = os.path.dirname(os.path.abspath(folder))
    common = read_common(folder)
    args, layer_shapes = common.get("args"), None
    if args is not None:
        model = model_config_from_args(args)
    else:
        model, layer_shapes = _heterogeneous_config(root, folder)
    state = _read_state(StoredTensors(folder, skip=NOT_MODEL), model, layer_shapes)
    beside = os.path.join(root, "tokenizer")
    tokenizer_dir, tokenizer_info = resolve_tokenizer(args, tokenizer_model, beside)
    real = tokenizer_info.get("vocab_size")
    if real is not None and real > model.vocab_size:
        raise CheckpointError(
            f"the tokenizer has {real} tokens, the embedding only {model.vocab_size} rows"
        )
    metadata = {
        "source": {
            "format": "megatron torch_dist",
            "iteration": common.get("iteration"),
            "params_dtype": str(getattr(args, "params_dtype", "")).replace("torch.", ""),
            "transformer_impl": getattr(args, "transformer_impl", None),
        },
        "tokenizer": tokenizer_info,
        "vocabulary": vocabulary_note(model.vocab_size, real, args),
    }
    ckpt = Checkpoint(model, state, tokenizer_dir, metadata=metadata, layer_shapes=layer_shapes)
    ckpt.validate()
    return ckpt


def _heterogeneous_config(root: str, folder: str):
    """A per-layer sub-network from the megatron saver has no Megatron-LM args (they describe
    one layer shape); its model_config.json records the model and the layer shapes."""
    config_file = os.path.join(root, "model_config.json")
    if not os.path.isfile(config_file):
        raise CheckpointError(f"{folder}: the common state holds no 'args': cannot infer the model")
    config = read_json(config_file)
    shapes = config.get("layer_shapes")
    if not shapes:
        raise CheckpointError(
            f"{folder}: the common state holds no 'args' and {config_file} no shapes"
        )
    return ModelConfig.from_dict(config["model"]), [tuple(s) for s in shapes]


def vocabulary_note(padded: int, real: Optional[int], args=None) -> dict:
    """What the exported models do with Megatron's padded vocabulary rows."""
    return {
        "padded_vocab_size": padded,
        "tokenizer_vocab_size": real,
        "make_vocab_size_divisible_by": getattr(args, "make_vocab_size_divisible_by", None),
        "padded_rows": (
            "kept: the embedding and output layer keep all padded_vocab_size rows, so the model "
            "is the same function (logits over the padded size); rows from tokenizer_vocab_size "
            "on are Megatron's padding, which the tokenizer never produces"
        ),
    }
