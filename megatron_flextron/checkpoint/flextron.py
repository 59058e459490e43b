"""The project's own checkpoint: a Megatron-Core distributed checkpoint plus the elastic config.

Layout (megatron's):  DIR/latest_checkpointed_iteration.txt   ("release" or an iteration)
                      DIR/release/  or  DIR/iter_NNNNNNN/      (torch_dist shards, common.pt, ...)
                      DIR/flextron_config.json                 (model, elastic choices, order, TP)
                      DIR/tokenizer/                           (tokenizer files)

Tensors are stored as a megatron model of TP size ``dealt_tensor_parallel_size`` wrote them: the
elastic axes in the dealt order of that TP size (tp_layout.to_dealt_global). A model of that TP
size (any PP) loads it natively, sharded; any other TP size reads the full tensors, un-deals them
to the canonical order and deals them again, so a width means the same units at every TP size.
"""

from __future__ import annotations

import os
import re
from typing import Dict, Optional

import torch
from tqdm import tqdm

from megatron_flextron.checkpoint.common_state import read_common_state
from megatron_flextron.checkpoint.dcp_reader import StoredTensors, first_line
from megatron_flextron.checkpoint.fields import check_fields, check_object, dataclass_fields
from megatron_flextron.checkpoint.io import (
    copy_tokenizer,
    dist_save,
    read_json,
    write_json,
    write_text_atomic,
)
from megatron_flextron.checkpoint.safe_metadata import read_dcp_metadata
from megatron_flextron.checkpoint.state import (
    Checkpoint,
    CheckpointError,
    expected_shapes,
    state_dtype,
)
from megatron_flextron.config import ElasticConfig, ModelConfig
from megatron_flextron.elastic.tp_layout import (
    from_dealt_global,
    local_to_global_names,
    model_tensors,
    to_dealt_global,
    tp_axis,
)

CONFIG_FILE = "flextron_config.json"
TRACKER_FILE = "latest_checkpointed_iteration.txt"
FORMAT_VERSION = 1

# megatron's local spec saves its norms under the TE module names (sharded_state_dict_keys_map)
_NORM_KEYS = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}
_STACKED = re.compile(r"^decoder\.layers\.(.+)$")  # megatron's per-layer tensors, stacked
_STACKED_EXPERTS = re.compile(r"^(mlp\.experts\.)experts\.(.+)$")  # and experts per layer
_OPTIMIZER = re.compile(r"^optimizer\.")


def iteration_dir(path: str, iteration: Optional[int] = None) -> str:
    """The shard folder: ``release/`` or ``iter_NNNNNNN/`` (the tracker file's when None)."""
    if iteration is None:
        tracker = os.path.join(path, TRACKER_FILE)
        if not os.path.isfile(tracker):
            raise CheckpointError(f"{path} has no {TRACKER_FILE}: not a complete checkpoint")
        text = open(tracker).read().strip()
        if text == "release":
            folder = os.path.join(path, "release")
            if not os.path.isdir(folder):
                raise CheckpointError(f"{tracker} names 'release', but {folder} does not exist")
            return folder
        if not text.isdigit():
            raise CheckpointError(f"{tracker} holds {text!r}, not an iteration or 'release'")
        folder = os.path.join(path, f"iter_{int(text):07d}")
        if not os.path.isdir(folder):
            raise CheckpointError(f"{tracker} names iteration {text}, but {folder} does not exist")
        return folder
    return os.path.join(path, f"iter_{iteration:07d}")


def read_config(path: str) -> dict:
    if not os.path.isdir(path):
        what = "is not a directory" if os.path.exists(path) else "does not exist"
        raise CheckpointError(f"checkpoint {path} {what}")
    file = os.path.join(path, CONFIG_FILE)
    config = check_object(file, read_json(file))
    if config.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unknown flextron format {config.get('format_version')!r}")
    check_fields(file, config, {"model": dict, "dealt_tensor_parallel_size": int},
                 {"elastic": dict, "metadata": dict}, known=["format_version"])  # fmt: skip
    required, optional = dataclass_fields(ModelConfig)
    check_fields(f"{file} model", config["model"], required, optional, known=())
    if config.get("elastic") is not None:
        check_fields(f"{file} elastic", config["elastic"], {"mlp_choices": list,
                     "head_choices": list}, {"allow_layer_skipping": bool, "layer_ranking": list,
                     "expert_choices": list, "moe_ffn_choices": list, "topk_choices": list},
                     known=())  # fmt: skip
    return config


def write_metadata(path: str, ckpt: Checkpoint, tp: int, iteration: Optional[int]) -> None:
    """Config and tokenizer next to the shards; the tracker file last (marks it complete)."""
    write_json(
        os.path.join(path, CONFIG_FILE),
        {
            "format_version": FORMAT_VERSION,
            "model": ckpt.model.to_dict(),
            "elastic": ckpt.elastic.to_dict() if ckpt.elastic else None,
            "dealt_tensor_parallel_size": tp,
            "metadata": ckpt.metadata,
        },
    )
    copy_tokenizer(ckpt.tokenizer_dir, os.path.join(path, "tokenizer"))
    write_text_atomic(
        os.path.join(path, TRACKER_FILE), "release" if iteration is None else str(iteration)
    )


def save_flextron(ckpt: Checkpoint, out_dir: str, tensor_parallel_size: int = 1) -> None:
    """Write a checkpoint from one process (the converter), dealt for ``tensor_parallel_size``,
    in the state's dtype. The state is streamed into a model built without initialization, one
    tensor at a time: the model is the only copy held."""
    m = ckpt.model
    model = converter_model(m, state_dtype(ckpt.state), elastic=True)

    def deal(name: str, tensor: torch.Tensor) -> torch.Tensor:
        axis = tp_axis(name, m)
        return tensor if axis is None else to_dealt_global(tensor, axis, tensor_parallel_size)

    copy_into_parameters(model, ckpt.state, deal)
    shards = os.path.join(out_dir, "release")
    os.makedirs(shards)
    dist_save(views_copied_once(model.sharded_state_dict(), model), shards)
    write_metadata(out_dir, ckpt, tensor_parallel_size, iteration=None)


def views_copied_once(sharded_state_dict: dict, model: torch.nn.Module) -> dict:
    """Give every saved tensor that is a view of a larger parameter (megatron's SwiGLU fc1 is
    saved as its gate and up halves) its own copy, and release that parameter, one parameter at
    a time. megatron's writer copies such views itself, all before writing the first, which
    costs the size of every fc1 (~45% of a Llama) again; here it costs one layer's. The model
    must not be used afterwards."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    apply_factories(sharded_state_dict)  # the fc1 halves exist from here on
    owners = {p.untyped_storage().data_ptr(): p for p in model.parameters()}
    views: Dict[int, list] = {}
    for item in _leaves(sharded_state_dict):
        data = getattr(item, "data", None) if isinstance(item, ShardedTensor) else None
        if data is not None and data.untyped_storage().size() != data.numel() * data.itemsize:
            views.setdefault(data.untyped_storage().data_ptr(), []).append(item)
    for pointer, items in views.items():
        for item in items:
            item.data = item.data.clone()
        if pointer in owners:
            owners[pointer].data = torch.empty(0, dtype=owners[pointer].dtype)
    return sharded_state_dict


def _leaves(tree):
    """The values of a nested dict / list sharded state dict."""
    for value in tree.values() if isinstance(tree, dict) else tree:
        if isinstance(value, (dict, list, tuple)):
            yield from _leaves(value)
        else:
            yield value


def converter_model(
    m: ModelConfig, dtype: torch.dtype, elastic: bool, layer_shapes=None, model_class="gpt"
):
    """A whole (TP=1, PP=1) model in ``dtype`` whose parameters are about to be overwritten:
    not initialized (random init of a large model costs minutes), norms in ``dtype`` too.
    The elastic model, or megatron's dense ``model_class`` ("gpt" or "hybrid", the latter in
    megatron's own hybrid checkpoint layout)."""
    from megatron_flextron.elastic import build_elastic_model, build_gpt_model
    from megatron_flextron.elastic.hybrid import build_hybrid_model
    from megatron_flextron.elastic.model import build_heterogeneous_gpt_model

    if layer_shapes:
        model = build_heterogeneous_gpt_model(m, layer_shapes, params_dtype=dtype)
    else:
        config = m.transformer_config(params_dtype=dtype, perform_initialization=False)
        whole = dict(pre_process=True, post_process=True)
        if elastic:
            model = build_elastic_model(m, config, **whole)
        elif model_class == "hybrid":
            model = build_hybrid_model(m, config, elastic=False, canonical_layout=False, **whole)
        else:
            model = build_gpt_model(m, config, elastic=False, **whole)
    return model.to(dtype)


def copy_into_parameters(model: torch.nn.Module, state, transform=None) -> None:
    """Copy a canonical state into a whole model's parameters one tensor at a time (a lazy
    state is read once per tensor); names must match exactly."""
    names = local_to_global_names(model)  # canonical names, whatever class the model is
    params = {names[name]: p for name, p in model_tensors(model)}
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise CheckpointError(
            f"state does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    with torch.no_grad():
        for name in tqdm(list(params), desc="writing", leave=False, disable=None):
            tensor = state[name]
            params[name].copy_(transform(name, tensor) if transform else tensor)
            del tensor


def save_flextron_sharded(model: torch.nn.Module, ckpt: Checkpoint, out_dir: str) -> None:
    """Collective: every rank writes its shards of ``model`` (holding ``ckpt``'s weights at the
    current TP/PP layout, so dealt for this TP size), rank 0 the config; ``out_dir`` exists.
    Consumes the model (see ``views_copied_once``)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_flextron.elastic.subnetwork import unwrap_model

    shards = os.path.join(out_dir, "release")
    if dist.get_rank() == 0:
        os.makedirs(shards)
    dist.barrier()
    gpt = unwrap_model(model)
    dist_save(views_copied_once(gpt.sharded_state_dict(), gpt), shards)
    dist.barrier()
    if dist.get_rank() == 0:
        tp = parallel_state.get_tensor_model_parallel_world_size()
        write_metadata(out_dir, ckpt, tp, iteration=None)
    dist.barrier()


def load_state_strict(
    model: torch.nn.Module, state: Dict[str, torch.Tensor], canonical: bool = True
) -> None:
    """All of the model's weights, or refuse: from a canonical state (either model class), or,
    with ``canonical=False``, from a state under the model's own names."""
    from megatron_flextron.elastic.blocks import hybrid_name, is_hybrid

    if canonical and is_hybrid(model):
        state = {hybrid_name(name): tensor for name, tensor in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(
            f"state does not fit the model: missing {missing}, unexpected {unexpected}"
        )


def stored_shapes(metadata) -> Dict[str, tuple]:
    """Canonical names and shapes of the model tensors a dist checkpoint's metadata lists (the
    stacked per-layer keys split per layer); optimizer state and non-tensors are left out."""
    from torch.distributed.checkpoint import TensorStorageMetadata

    shapes = {}
    for key, meta in metadata.state_dict_metadata.items():
        if not isinstance(meta, TensorStorageMetadata) or key.startswith("optimizer."):
            continue
        size = tuple(meta.size)
        names = _layer_names(key, size)
        if names:
            shapes.update({n: size[1 if isinstance(i, int) else len(i):] for n, i in names.items()})
        else:
            shapes[key] = size
    return shapes


def check_stored_shapes(path: str, model: ModelConfig, metadata=None) -> None:
    """Every tensor ``flextron_config.json`` implies is stored with the shape it implies, and
    nothing else is stored: a config that disagrees with the tensors (e.g. another vocab_size)
    would otherwise load a slice, or garbage, with exit status 0. Reads the metadata only."""
    metadata = metadata or read_dcp_metadata(iteration_dir(path))
    stored = stored_shapes(metadata)  # megatron stores no output layer for tied embeddings
    expected = expected_shapes(model)
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: the stored tensors do not match {CONFIG_FILE}: missing {missing[:3]}"
            f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
            f"{'...' if len(unexpected) > 3 else ''}"
        )
    for name, shape in expected.items():
        if stored[name] != shape:
            raise CheckpointError(
                f"{path}: {name} is stored with shape {stored[name]}, but {CONFIG_FILE} "
                f"implies {shape}"
            )


def read_flextron(path: str) -> Checkpoint:
    """The canonical checkpoint of any flextron directory as a lazy state (one tensor, or one
    layer of a stacked key, read and un-dealt per access); reads files only (no collectives).
    Optimizer state of a training checkpoint is skipped."""
    config = read_config(path)
    model = ModelConfig.from_dict(config["model"])
    shards = iteration_dir(path)
    stored = StoredTensors(shards, skip=_OPTIMIZER)
    check_stored_shapes(path, model, stored.metadata)
    load_common(shards)  # readable (not used here): a truncated common.pt fails training later
    tp = config["dealt_tensor_parallel_size"]
    where = {}  # canonical name -> (stored key, layer index or None)
    for key, meta in stored.tensors.items():
        names = _layer_names(key, tuple(meta.size))
        where.update({n: (key, i) for n, i in names.items()} if names else {key: (key, None)})
    if model.tie_embeddings:
        where.pop("output_layer.weight", None)

    def undeal(name: str, value: torch.Tensor) -> torch.Tensor:
        axis = tp_axis(name, model)
        return value if axis is None else from_dealt_global(value, axis, tp).contiguous()

    tokenizer = os.path.join(path, "tokenizer")
    ckpt = Checkpoint(
        model=model,
        state=stored.lazy_state(where, undeal),
        tokenizer_dir=tokenizer if os.path.isdir(tokenizer) else None,
        elastic=ElasticConfig.from_dict(config["elastic"]) if config.get("elastic") else None,
        metadata=config.get("metadata") or {},
    )
    ckpt.validate()
    return ckpt


def _layer_names(key: str, size: tuple) -> Optional[Dict[str, object]]:
    """The per-layer names of a stacked key and their leading indices (None for any other key):
    megatron stacks per-layer tensors along a leading layer axis under one key, and an MoE's
    experts along a second axis (``mlp.experts.experts.*``, [layers, experts, ...])."""
    match = _STACKED.match(key)
    if not match:
        return None
    name = _NORM_KEYS.get(match.group(1), match.group(1))
    layers = size[0] if size else 0
    expert = _STACKED_EXPERTS.match(name)
    if expert:
        return {
            f"decoder.layers.{i}.{expert.group(1)}local_experts.{e}.{expert.group(2)}": (i, e)
            for i in range(layers)
            for e in range(size[1])
        }
    return {f"decoder.layers.{i}.{name}": i for i in range(layers)}


def load_dist_checkpoint(request: dict, shards: str) -> dict:
    """megatron's ``dist_checkpointing.load`` after ``read_dcp_metadata`` accepted the metadata
    (megatron unpickles it again, unrestricted); read failures become CheckpointErrors."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    read_dcp_metadata(shards)
    load_common(shards)  # names common.pt when it is the unreadable file
    try:
        return dist_checkpointing.load(request, shards)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:
        raise CheckpointError(f"cannot read the shards in {shards}: {first_line(e)}") from None


def load_common(shards: str) -> dict:
    """megatron's common state (weights only, allow-listed: checkpoint/common_state.py); a
    CheckpointError naming the file when unreadable. Called before every megatron load, which
    unpickles the same bytes again without that protection."""
    return read_common_state(shards)


def load_flextron_into_model(model: torch.nn.Module, path: str) -> dict:
    """Load a flextron checkpoint into this rank's model (any TP/PP); returns its config.

    Collective when the TP size matches the stored one (megatron's sharded load); otherwise each
    rank reads the full tensors and deals its own shard.
    """
    from megatron.core import parallel_state

    from megatron_flextron.elastic.subnetwork import unwrap_model
    from megatron_flextron.elastic.tp_layout import load_canonical_state_dict

    config = read_config(path)
    check_stored_shapes(path, ModelConfig.from_dict(config["model"]))  # also: safe metadata
    gpt = unwrap_model(model)
    if (
        config["dealt_tensor_parallel_size"]
        == parallel_state.get_tensor_model_parallel_world_size()
    ):
        request = gpt.sharded_state_dict()
        state = load_dist_checkpoint(request, iteration_dir(path))
        load_state_strict(gpt, {k: v for k, v in state.items() if k in request}, canonical=False)
    else:
        ckpt = read_flextron(path)
        load_canonical_state_dict(gpt, ckpt.state, ckpt.model)
    return config
