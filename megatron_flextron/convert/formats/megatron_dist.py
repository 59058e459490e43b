"""Megatron-LM torch_dist checkpoints (``--ckpt-format torch_dist``, Megatron-LM's default).

Layout: ROOT/latest_checkpointed_iteration.txt, ROOT/iter_NNNNNNN/ or ROOT/release/, each holding
``.metadata`` + ``*.distcp`` (torch.distributed.checkpoint shards, global tensor names whatever
TP/PP wrote them), the common state (the non-sharded ``args``, ``iteration``, ...:
``common.pt``, or inside the shards since megatron-core 0.19) and megatron's ``metadata.json``.
Either the root or one iteration folder may be given.

- Config: the ``args`` Namespace in the common state, read with ``weights_only=True`` and an
  allow-list (checkpoint/common_state.py: argparse.Namespace and enum classes of megatron/torch);
  anything else is named and refused.
- Model classes: GPTModel (layers stacked on a leading axis, ``decoder.layers.X``, or one key per
  layer) and HybridModel with a dense or mixture-of-experts pattern (``*-`` or ``*E`` per block,
  ``|`` stage splits: block i is layers 2i and 2i+1; other layer kinds are refused naming the
  symbol and the layer).
- Experts (every layer a mixture of experts): the key megatron writes for SequentialMLP and
  TEGroupedMLP alike, ``mlp.experts.experts.linear_fc1.weight`` with an expert axis (after the
  layer axis of a GPTModel) whatever EP/TP wrote it, one key per expert
  (``mlp.experts.experts.{e}.linear_fc1.weight``, megatron's ``singleton_local_shards``), or
  Transformer Engine's grouped-GEMM module names (``mlp.experts.linear_fc1.weight{e}``); router
  ``mlp.router.weight``, its ``expert_bias``, the shared expert and its gate.
- Tensors: read lazily, one stored key or one layer (and expert) of a stacked key at a time
  (only what is converted), kept in the stored dtype (bf16 stays bf16). Norms under local
  (``input_layernorm``) or Transformer Engine names
  (``self_attention.linear_qkv.layer_norm_weight``). ``_extra_state`` (TE/fp8 metadata, stored as
  bytes), ``optimizer.*`` and rng state are skipped; any other tensor the architecture does not
  use stops the conversion naming it.
- Vocabulary: the embedding has ``padded_vocab_size`` rows; the rows past the tokenizer's vocabulary
  are kept (the same function) and recorded in the metadata.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from typing import List, Optional, Tuple

import torch

from megatron_flextron.checkpoint.common_state import read_common_state as read_common
from megatron_flextron.checkpoint.dcp_reader import StoredTensors
from megatron_flextron.checkpoint.flextron import _NORM_KEYS, TRACKER_FILE, iteration_dir
from megatron_flextron.checkpoint.io import read_json
from megatron_flextron.checkpoint.state import (
    Checkpoint,
    CheckpointError,
    LazyState,
    TensorSpec,
    expected_shapes,
)
from megatron_flextron.config import ModelConfig
from megatron_flextron.convert.formats.megatron_args import hybrid_blocks, model_config_from_args
from megatron_flextron.convert.formats.megatron_tokenizer import resolve_tokenizer
from megatron_flextron.elastic.blocks import canonical_name, hybrid_name

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


# an expert's tensor: megatron's key with the experts on an axis (SequentialMLP, and
# TEGroupedMLP, whose torch_dist keys are the same), one key per expert (megatron's
# ``singleton_local_shards``), or Transformer Engine's grouped-GEMM module names
_EXPERT_AXIS = re.compile(r"^mlp\.experts\.experts\.(linear_fc[12]\.(?:weight|bias))$")
_EXPERT_SINGLETON = re.compile(r"^mlp\.experts\.experts\.(\d+)\.(linear_fc[12]\.(?:weight|bias))$")
_EXPERT_GROUPED = re.compile(r"^mlp\.experts\.(linear_fc[12])\.(weight|bias)(\d+)$")
# megatron's singleton_local_shards store a SwiGLU fc1 as its gate and up halves
_HALVES = re.compile(r"^(.+\.linear_fc1\.(?:weight|bias))_([wv])$")
# a canonical name, its index into the stored key, which half of it the key holds ("" all)
Entry = Tuple[str, Tuple[int, ...], str]


def _expert_entries(rest: str, m: ModelConfig) -> List[Tuple[str, Tuple[int, ...]]]:
    """The canonical per-layer names (``mlp.experts.local_experts.{e}...``, global expert e)
    of one layer's stored name, each with its index along the key's expert axis (or none)."""
    expert = "mlp.experts.local_experts.{}.{}"
    match = _EXPERT_AXIS.match(rest)
    if match and m.is_moe:
        return [(expert.format(e, match.group(1)), (e,)) for e in range(m.num_moe_experts)]
    match = _EXPERT_SINGLETON.match(rest)
    if match:
        return [(expert.format(int(match.group(1)), match.group(2)), ())]
    match = _EXPERT_GROUPED.match(rest)
    if match:
        return [(expert.format(int(match.group(3)), f"{match.group(1)}.{match.group(2)}"), ())]
    return [(rest, ())]


def _entries(key: str, m: ModelConfig, hybrid: bool = False) -> List[Entry]:
    """The canonical names one stored key holds, each with its index into the key: stacked
    layers (a leading axis), experts (an axis after it), one layer, or a global tensor;
    TE-fused norm names renamed to the norms'. A HybridModel stores one key per layer, block i
    as layers 2i (attention) and 2i+1 (MLP or experts), its final norm as final_norm."""
    halves = _HALVES.match(key)
    if halves:
        key, half = halves.groups()
        return [(name, index, half) for name, index, _ in _entries(key, m, hybrid)]
    match = _PER_LAYER.match(key)
    if hybrid and not match:
        return [(canonical_name(key), (), "")]
    if not match and not key.startswith("decoder.layers."):
        return [(key, (), "")]
    if match:
        layer, rest = int(match.group(1)), _canonical(match.group(2))
        block = layer // 2 if hybrid else layer
        entries = [(f"decoder.layers.{block}.{r}", i, "") for r, i in _expert_entries(rest, m)]
        for name, _, _ in entries if hybrid else ():
            if hybrid_name(name).split(".")[2] != str(layer):
                kind = "an attention (*)" if layer % 2 == 0 else "an MLP (-, E)"
                raise CheckpointError(f"{key}: not a tensor of {kind} layer, as the pattern says")
        return entries
    rest = _canonical(key[len("decoder.layers.") :])
    per_layer = _expert_entries(rest, m)
    return [
        (f"decoder.layers.{i}.{r}", (i, *index), "")
        for i in range(m.num_layers)
        for r, index in per_layer
    ]


def _read_state(
    stored: StoredTensors, m: ModelConfig, layer_shapes=None, hybrid: bool = False
) -> LazyState:
    """Every stored key mapped to canonical names first (a key the architecture does not use is
    refused before anything is read); the state reads one tensor, or one layer (and expert) of
    a stacked key, per access."""
    expected = expected_shapes(m, layer_shapes)
    plan = {key: _entries(key, m, hybrid) for key in sorted(stored.tensors)}
    tied_head = plan.pop("output_layer.weight", None) if m.tie_embeddings else None
    unused = sorted(k for k, ent in plan.items() if any(e[0] not in expected for e in ent))
    if unused:
        raise CheckpointError(
            f"megatron: stored tensors this architecture does not use: {unused}; "
            "converting would drop them"
        )
    counts = Counter((n, half) for entries in plan.values() for n, _, half in entries)
    twice = sorted(n for (n, _), c in counts.items() if c > 1)
    if twice:
        raise CheckpointError(f"stored twice (local and TE names?): {twice[:4]}")
    halves = {}
    for n, half in counts:
        halves.setdefault(n, set()).add(half)
    odd = sorted(n for n, h in halves.items() if h not in ({""}, {"w", "v"}))
    if odd:
        raise CheckpointError(f"the gate (_w) and up (_v) halves do not pair up: {odd[:4]}")
    parts, specs = {}, {}  # canonical name -> [(key, index into it)], gate half first
    for key, entries in sorted(plan.items(), key=lambda item: item[1][0][2] == "v"):
        shape, dtype = stored.spec(key)
        axes = len(entries[0][1])
        if axes and (len(shape) <= axes or math.prod(shape[:axes]) != len(entries)):
            what = "layers" if axes == 1 and "experts.experts." not in key else "layers, experts"
            raise CheckpointError(
                f"{key}: stacked {what} of shape {shape}, expected {len(entries)} entries first"
            )
        for name, index, half in entries:
            parts.setdefault(name, []).append((key, index))
            tail = tuple(shape[axes:])
            specs[name] = TensorSpec((2 * tail[0], *tail[1:]) if half else tail, dtype)
    state = LazyState(specs, lambda name: _read_parts(stored, parts[name]))
    if tied_head is not None:
        head = stored.read("output_layer.weight")
        if _EMBED not in parts or not torch.equal(head, state[_EMBED]):
            raise CheckpointError("tied embeddings, but output_layer.weight differs from them")
    return state


def _read_parts(stored: StoredTensors, parts) -> torch.Tensor:
    if len(parts) == 1:
        return _read_index(stored, *parts[0])
    return torch.cat([_read_index(stored, *part) for part in parts])


def _read_index(stored: StoredTensors, key: str, index: Tuple[int, ...]) -> torch.Tensor:
    """``key[index]`` (a layer, or a layer's expert), reading only the chunks that hold it."""
    return stored.read_layer(key, index) if index else stored.read(key)


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
    hybrid = args is not None and hybrid_blocks(args) is not None
    state = _read_state(StoredTensors(folder, skip=NOT_MODEL), model, layer_shapes, hybrid)
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
            "model_class": "HybridModel" if hybrid else "GPTModel",
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
