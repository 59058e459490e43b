"""Megatron-LM legacy GPT checkpoints (``torch`` format, any TP and PP).

DIR/latest_checkpointed_iteration.txt (an iteration or "release"), DIR/iter_NNNNNNN/ or
DIR/release/, one mp_rank_TT/ (PP=1) or mp_rank_TT_PPP/ per rank, each model_optim_rng.pt holding
``model -> language_model -> embedding / encoder (older: transformer) [/ output_layer]`` and, on
the last stage of a tied PP>1 model, ``model -> word_embeddings_for_head``. Hyperparameters come
from the pickled ``args``.

Security: these files are pickles and are loaded with ``weights_only=False`` (the args Namespace
needs it). This loader is the only place the project does so: convert only checkpoints you trust.
"""

from __future__ import annotations

import os
import re
from typing import Dict, List, Tuple

import torch

from megatron_flextron.checkpoint.flextron import iteration_dir
from megatron_flextron.checkpoint.state import Checkpoint, CheckpointError
from megatron_flextron.config import ModelConfig
from megatron_flextron.convert import transforms as T
from megatron_flextron.convert.formats.megatron_args import hybrid_blocks, model_config_from_args

# both naming generations -> canonical per-layer names
_LAYER_NAMES = {
    "input_norm": "input_layernorm",
    "input_layernorm": "input_layernorm",
    "post_attention_norm": "pre_mlp_layernorm",
    "post_attention_layernorm": "pre_mlp_layernorm",
    "self_attention.query_key_value": "self_attention.linear_qkv",
    "attention.query_key_value": "self_attention.linear_qkv",
    "self_attention.dense": "self_attention.linear_proj",
    "attention.dense": "self_attention.linear_proj",
    "mlp.dense_h_to_4h": "mlp.linear_fc1",
    "mlp.dense_4h_to_h": "mlp.linear_fc2",
}
# how tensor-parallel shards of a canonical per-layer tensor are merged (None: replicated)
_TP_DIM = {
    "self_attention.linear_qkv.weight": 0,
    "self_attention.linear_qkv.bias": 0,
    "self_attention.linear_proj.weight": 1,
    "mlp.linear_fc1.weight": 0,
    "mlp.linear_fc1.bias": 0,
    "mlp.linear_fc2.weight": 1,
}
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias)$")


def _rank_dirs(shards: str) -> Dict[Tuple[int, int], str]:
    found = {}
    for name in os.listdir(shards) if os.path.isdir(shards) else []:
        match = re.fullmatch(r"mp_rank_(\d{2})(?:_(\d{3}))?", name)
        if match:
            found[(int(match.group(1)), int(match.group(2) or 0))] = os.path.join(shards, name)
    if not found:
        raise CheckpointError(f"{shards} holds no mp_rank_* folders")
    return found


def _load_rank(path: str) -> dict:
    file = os.path.join(path, "model_optim_rng.pt")
    if not os.path.isfile(file):
        raise CheckpointError(f"missing {file}")
    try:
        return torch.load(file, map_location="cpu", weights_only=False)  # trusted input only
    except Exception as e:
        raise CheckpointError(f"cannot read {file}: {e}") from None


def _qkv_to_current(x: torch.Tensor, version: float, heads: int) -> torch.Tensor:
    """Rows of checkpoint versions 0 / 1-2 -> version 3's [heads, (q, k, v), d] (MHA)."""
    if version >= 3.0:
        return x
    rest = x.shape[1:]
    if version == 0:
        return x.reshape(3, heads, -1, *rest).transpose(0, 1).reshape(-1, *rest)
    return x.reshape(heads, -1, 3, *rest).transpose(1, 2).reshape(-1, *rest)


def load_megatron_legacy(path: str) -> Checkpoint:
    from tqdm import tqdm

    ranks = _rank_dirs(iteration_dir(path))
    tp = 1 + max(t for t, _ in ranks)
    pp = 1 + max(p for _, p in ranks)
    if len(ranks) != tp * pp:
        raise CheckpointError(f"{path}: expected {tp * pp} mp_rank folders, found {len(ranks)}")
    first = _load_rank(ranks[(0, 0)])
    if "args" not in first:
        raise CheckpointError(f"{path}: no 'args' in the checkpoint; cannot infer the model")
    if hybrid_blocks(first["args"]) is not None:
        raise CheckpointError("a legacy torch checkpoint of a HybridModel: use --ckpt-format "
                              "torch_dist and --loader megatron")
    model = model_config_from_args(first["args"])
    if model.qk_layernorm:  # only Megatron-Core models have them, under torch_dist names
        raise CheckpointError("megatron args: qk_layernorm=True in a legacy torch checkpoint is "
                              "not supported (legacy GPT models have no q/k norms): use "
                              "--ckpt-format torch_dist and --loader megatron")
    if model.is_moe:  # the legacy (non-mcore) GPT has no experts; mcore MoE runs are torch_dist
        raise CheckpointError(
            f"megatron args: num_experts={model.num_moe_experts} is not supported in a legacy "
            "torch checkpoint (mixture-of-experts: use --ckpt-format torch_dist and "
            "--loader megatron)"
        )
    version = float(first.get("checkpoint_version", 0))
    if version < 3.0 and model.is_gqa:
        raise CheckpointError(
            f"checkpoint_version {version} with grouped-query attention is not supported"
        )
    per_stage = model.num_layers // pp
    parts: Dict[str, List[torch.Tensor]] = {}
    for t, p in tqdm(sorted(ranks, key=lambda r: (r[1], r[0])), desc="legacy shards", leave=False):
        sd = first if (t, p) == (0, 0) else _load_rank(ranks[(t, p)])
        for name, tensor in _canonical_items(sd, p * per_stage):
            parts.setdefault(name, []).append(tensor)
    state = {}
    for name, shards in parts.items():
        state[name] = _merge(name, shards, model, tp)
        if name.endswith("linear_qkv.weight") or name.endswith("linear_qkv.bias"):
            state[name] = _qkv_to_current(state[name], version, model.num_attention_heads)
    if model.tie_embeddings:
        state.pop("output_layer.weight", None)
    ckpt = Checkpoint(model=model, state={k: v.float() for k, v in state.items()})
    ckpt.validate()
    return ckpt


def _merge(name: str, shards: List[torch.Tensor], model: ModelConfig, tp: int) -> torch.Tensor:
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return T.tp_merge(shards[:tp], 0)
    rest = name.split(".", 3)[3] if name.startswith("decoder.layers.") else name
    dim = _TP_DIM.get(rest)
    if dim is None:
        return shards[0]
    if (
        rest == "mlp.linear_fc1.weight"
        and model.gated
        or rest == "mlp.linear_fc1.bias"
        and model.gated
    ):
        return T.tp_merge_glu(shards)
    return T.tp_merge(shards, dim)


def _canonical_items(sd: dict, layer_offset: int):
    """(canonical name, tensor) of one rank's file; layers renumbered to global indices."""
    model = sd["model"]
    lm = model.get("language_model", {})
    unknown = sorted(set(model) - {"language_model", "word_embeddings_for_head"})
    unknown += sorted(set(lm) - {"embedding", "encoder", "transformer", "output_layer"})
    unknown += sorted(set(lm.get("embedding", {})) - {"word_embeddings", "position_embeddings"})
    if unknown:  # e.g. a pooler or a second head: converting would drop it
        raise CheckpointError(f"legacy checkpoint parts this loader does not convert: {unknown}")
    embedding = lm.get("embedding", {})
    if "word_embeddings" in embedding:
        yield "embedding.word_embeddings.weight", embedding["word_embeddings"]["weight"]
    if "position_embeddings" in embedding:
        yield "embedding.position_embeddings.weight", embedding["position_embeddings"]["weight"]
    if "word_embeddings_for_head" in model:
        yield "output_layer.weight", model["word_embeddings_for_head"]["weight"]
    if "output_layer" in lm:
        yield "output_layer.weight", lm["output_layer"]["weight"]
    encoder = lm.get("encoder", lm.get("transformer", {}))
    for key, tensor in encoder.items():
        if key.startswith(("final_norm.", "final_layernorm.")):
            yield f"decoder.final_layernorm.{key.split('.')[-1]}", tensor
            continue
        match = _LAYER_KEY.match(key)
        if not match:
            continue  # e.g. attention masks or rotary buffers
        module = _LAYER_NAMES.get(match.group(2))
        if module is None:
            raise CheckpointError(f"unknown legacy layer tensor {key!r}")
        yield (
            f"decoder.layers.{layer_offset + int(match.group(1))}.{module}.{match.group(3)}",
            tensor,
        )
