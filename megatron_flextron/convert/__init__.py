"""Checkpoint conversion: loaders -> canonical ``Checkpoint`` -> (ranking, export) -> savers."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from megatron_flextron.checkpoint.io import atomic_output_dir
from megatron_flextron.checkpoint.state import Checkpoint, CheckpointError, lazy_view
from megatron_flextron.config import DEFAULT_RATIOS, ElasticConfig

LOADERS = ("hf", "gguf", "megatron", "megatron_legacy", "flextron")
SAVERS = ("flextron", "hf", "megatron", "gguf")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")  # llama.cpp tensor types of --saver gguf


def load_checkpoint(loader: str, path: str, tokenizer_model: Optional[str] = None) -> Checkpoint:
    """``tokenizer_model`` (a tokenizer folder or file) replaces the source's tokenizer."""
    if loader == "megatron":
        from megatron_flextron.convert.formats.megatron_dist import load_megatron

        return load_megatron(path, tokenizer_model)
    ckpt = _load_other(loader, path)
    if tokenizer_model:
        from megatron_flextron.convert.formats.megatron_tokenizer import stage_tokenizer

        ckpt.tokenizer_dir = stage_tokenizer(tokenizer_model)
    return ckpt


def _load_other(loader: str, path: str) -> Checkpoint:
    if loader == "hf":
        from megatron_flextron.convert.formats.hf import load_hf

        return load_hf(path)
    if loader == "gguf":
        from megatron_flextron.convert.formats.gguf import load_gguf

        return load_gguf(path)
    if loader == "megatron_legacy":
        from megatron_flextron.convert.formats.megatron_legacy import load_megatron_legacy

        return load_megatron_legacy(path)
    if loader == "flextron":
        from megatron_flextron.checkpoint.flextron import read_flextron

        return read_flextron(path)
    raise CheckpointError(f"unknown loader {loader!r}; expected one of {LOADERS}")


def save_checkpoint(
    saver: str,
    ckpt: Checkpoint,
    path: str,
    tensor_parallel_size: int,
    megatron_model_class: Optional[str] = None,
    gguf_type: Optional[str] = None,
) -> None:
    """``megatron_model_class``: the megatron saver's hybrid or gpt (None: hybrid, gpt for a
    per-layer sub-network); ``gguf_type``: the GGUF saver's tensor type (None: the state's)."""
    if saver == "flextron":
        from megatron_flextron.checkpoint.flextron import save_flextron

        save_flextron(ckpt, path, tensor_parallel_size)
    elif saver == "hf":
        from megatron_flextron.convert.formats.hf import save_hf

        save_hf(ckpt, path)
    elif saver == "megatron":
        from megatron_flextron.convert.formats.megatron import save_megatron

        save_megatron(ckpt, path, megatron_model_class)
    elif saver == "gguf":
        from megatron_flextron.convert.formats.gguf import save_gguf

        save_gguf(ckpt, path, gguf_type)
    else:
        raise CheckpointError(f"unknown saver {saver!r}; expected one of {SAVERS}")


@dataclass
class ConvertOptions:
    loader: str
    saver: str
    load_dir: str
    save_dir: str
    target_tensor_parallel_size: int = 1
    target_pipeline_parallel_size: int = 1
    subnetwork: Optional[str] = None
    budget: Optional[float] = None
    calibration_data: Optional[str] = None
    mlp_ratios: Sequence[float] = DEFAULT_RATIOS
    head_ratios: Sequence[float] = DEFAULT_RATIOS
    ranking: dict = field(default_factory=dict)  # options for importance ranking
    tokenizer_model: Optional[str] = None  # a tokenizer folder or file to carry instead
    params_dtype: Optional[str] = None  # write in this dtype (PARAMS_DTYPES); None: the source's
    megatron_model_class: Optional[str] = None  # --saver megatron: hybrid (default) or gpt
    gguf_type: Optional[str] = None  # --saver gguf: one of GGUF_TYPES; None: the state's dtype


PARAMS_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cast_state(ckpt: Checkpoint, dtype: torch.dtype) -> None:
    """Every tensor converted to ``dtype`` when it is read (a lazy view: nothing held); a
    finite value beyond the range of ``dtype`` (fp16: 65504) stops the conversion naming the
    tensor instead of writing inf."""

    def cast(name: str, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.to(dtype)
        if out.is_floating_point() and out.device.type != "meta":
            overflow = torch.isinf(out) & torch.isfinite(tensor)
            if bool(overflow.any()):
                largest = float(tensor[overflow].abs().max())
                raise CheckpointError(
                    f"{name} holds {largest:g}, beyond the {str(dtype)[6:]} range "
                    f"(max {torch.finfo(dtype).max:g}): casting would write inf; keep a wider "
                    "--params-dtype (bf16, fp32)"
                )
        return out

    ckpt.state = lazy_view(ckpt.state, cast)


def check_parallel_sizes(ckpt: Checkpoint, tp: int, pp: int) -> None:
    """The target TP/PP must divide every sharded axis: fail before anything is written."""
    m = ckpt.model
    problems = []
    for what, size, by in [
        ("KV groups", m.num_query_groups, tp),
        ("attention heads", m.num_attention_heads, tp),
        ("MLP hidden size", m.ffn_hidden_size, tp),
        ("vocabulary", m.vocab_size, tp),
        ("layers", m.num_layers, pp),
    ]:
        if size % by:
            problems.append(f"{what} ({size}) not divisible by {by}")
    if ckpt.elastic:
        for width in ckpt.elastic.mlp_choices:
            if width % tp:
                problems.append(f"MLP choice {width} not divisible by TP {tp}")
    for layer, (width, heads) in enumerate(ckpt.layer_shapes or []):
        if width % tp or heads % tp:
            problems.append(f"layer {layer} ({width} neurons, {heads} heads) not divisible by {tp}")
    if problems:
        raise CheckpointError(f"target TP={tp} PP={pp} does not fit: " + "; ".join(problems))


def convert(opts: ConvertOptions) -> Checkpoint:
    """Run one conversion; nothing is left at ``save_dir`` unless it completes."""
    from megatron_flextron.elastic.subnetwork import Subnetwork

    if opts.saver not in SAVERS:
        raise CheckpointError(f"unknown saver {opts.saver!r}; expected one of {SAVERS}")
    if opts.gguf_type is not None and opts.saver != "gguf":
        raise CheckpointError(f"--gguf-type applies to --saver gguf, not {opts.saver}")
    if opts.gguf_type is not None and opts.gguf_type not in GGUF_TYPES:
        raise CheckpointError(f"unknown GGUF type {opts.gguf_type!r}; expected one of {GGUF_TYPES}")
    if opts.budget is not None and opts.subnetwork is not None:
        raise CheckpointError("--budget and --subnetwork are mutually exclusive")
    if opts.budget is not None and opts.loader != "flextron":
        raise CheckpointError("--budget needs --loader flextron (a checkpoint with a router)")
    if opts.budget is not None and opts.calibration_data:
        raise CheckpointError("--budget picks from a trained model: no --calibration-data")
    tp, pp = opts.target_tensor_parallel_size, opts.target_pipeline_parallel_size
    distributed = _check_distributed(opts)
    ckpt = load_checkpoint(opts.loader, opts.load_dir, opts.tokenizer_model)
    if opts.params_dtype is not None:
        if opts.params_dtype not in PARAMS_DTYPES:
            raise CheckpointError(
                f"unknown params dtype {opts.params_dtype!r}; expected one of {list(PARAMS_DTYPES)}"
            )
        cast_state(ckpt, PARAMS_DTYPES[opts.params_dtype])
    if ckpt.elastic is None:
        ckpt.elastic = ElasticConfig.from_ratios(
            ckpt.model, opts.mlp_ratios, opts.head_ratios, tensor_model_parallel_size=tp
        )
    if opts.calibration_data:
        if opts.saver != "flextron":
            raise CheckpointError("--calibration-data (importance ranking) needs --saver flextron")
        from megatron_flextron.importance import rank_and_permute

        ckpt = rank_and_permute(ckpt, opts.calibration_data, **opts.ranking)
    subnet = None
    if opts.budget is not None:
        from megatron_flextron.routers.checkpoint import load_budget_policy

        policy = load_budget_policy(opts.load_dir, ckpt.model, ckpt.elastic, require_router=True)
        choice = policy.choose(opts.budget)
        subnet = choice.subnetwork
        ckpt.metadata["router_choice"] = {
            "budget": opts.budget,
            "subnetwork": subnet.to_dict(),
            **choice.info,
        }
    elif opts.subnetwork is not None:
        subnet = Subnetwork.parse(opts.subnetwork, ckpt.model, ckpt.elastic)
    if subnet is not None:
        from megatron_flextron.convert.export import export_subnetwork

        subnet.validate(ckpt.model, ckpt.elastic, tp)
        ckpt = export_subnetwork(ckpt, subnet)
        ckpt.elastic = ElasticConfig.from_ratios(
            ckpt.model, opts.mlp_ratios, opts.head_ratios, tensor_model_parallel_size=tp
        )
    if opts.saver == "gguf":
        from megatron_flextron.convert.formats.gguf import gguf_architecture

        gguf_architecture(ckpt)  # refuse before anything is written
        if tp != 1 or pp != 1:
            raise CheckpointError("a GGUF file is not sharded: no target TP/PP sizes")
    check_parallel_sizes(ckpt, tp, pp)
    ckpt.metadata["target_pipeline_parallel_size"] = pp
    if distributed:
        _save_distributed(ckpt, opts.save_dir)
        return ckpt
    with atomic_output_dir(opts.save_dir) as tmp:
        save_checkpoint(opts.saver, ckpt, tmp, tp, opts.megatron_model_class, opts.gguf_type)
    return ckpt


def _check_distributed(opts: ConvertOptions) -> bool:
    """Several processes (torchrun): the model is sharded over the current TP/PP layout and every
    rank writes its shard of a flextron checkpoint dealt for that TP size."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return False
    model_tp = parallel_state.get_tensor_model_parallel_world_size()
    if opts.saver != "flextron" or opts.subnetwork is not None or opts.budget is not None:
        raise CheckpointError("under torchrun the converter ranks and saves flextron checkpoints")
    if opts.target_tensor_parallel_size != model_tp:
        raise CheckpointError(
            f"under torchrun the checkpoint is dealt for the model's TP size {model_tp}, "
            f"not --target-tensor-parallel-size {opts.target_tensor_parallel_size}"
        )
    out = opts.save_dir
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise CheckpointError(f"output {os.path.abspath(out)} already exists and is not empty")
    return True


def _save_distributed(ckpt: Checkpoint, save_dir: str) -> None:
    """Collective atomic save: rank 0 owns the temporary directory, every rank writes shards."""
    import torch.distributed as dist

    from megatron_flextron.checkpoint.flextron import save_flextron_sharded
    from megatron_flextron.checkpoint.state import state_dtype
    from megatron_flextron.importance import ranking_model

    model = ranking_model(ckpt, state_dtype(ckpt.state))  # written in the source dtype
    if dist.get_rank() != 0:
        path = [None]
        dist.broadcast_object_list(path, src=0)
        save_flextron_sharded(model, ckpt, path[0])
        dist.barrier()  # rank 0 renames the directory
        return
    with atomic_output_dir(save_dir) as tmp:
        dist.broadcast_object_list([tmp], src=0)
        save_flextron_sharded(model, ckpt, tmp)
    dist.barrier()
