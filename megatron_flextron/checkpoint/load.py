"""Read a flextron checkpoint into a ready elastic model: config -> build -> move -> load.

The one copy of that sequence for tools, router training, evaluation and the trainer's frozen
teacher. Call after ``initialize_model_parallel`` (the model is this rank's TP shard and PP stage).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from megatron_flextron.checkpoint.flextron import load_flextron_into_model, read_config
from megatron_flextron.config import ElasticConfig, ModelConfig, Runtime
from megatron_flextron.elastic import build_elastic_model
from megatron_flextron.parallel import current_device


@dataclass
class ElasticModel:
    """A loaded checkpoint: this rank's elastic GPTModel and what describes it."""

    model: torch.nn.Module
    model_cfg: ModelConfig
    elastic: ElasticConfig
    config: dict  # the checkpoint's flextron_config.json
    path: str

    @property
    def tokenizer_dir(self) -> Optional[str]:
        """The checkpoint's tokenizer folder, when it has one."""
        folder = os.path.join(self.path, "tokenizer")
        return folder if os.path.isdir(folder) else None


def read_model_configs(path: str, tp: int = 1) -> Tuple[dict, ModelConfig, ElasticConfig]:
    """(flextron_config.json, architecture, elastic choices) of a checkpoint; a checkpoint
    without choices gets the default ratios rounded for TP size ``tp``."""
    config = read_config(path)
    model_cfg = ModelConfig.from_dict(config["model"])
    if config.get("elastic"):
        elastic = ElasticConfig.from_dict(config["elastic"])
    else:
        elastic = ElasticConfig.from_ratios(model_cfg, tensor_model_parallel_size=tp)
    return config, model_cfg, elastic


def check_seq_length(
    model_cfg: ModelConfig, seq_length: int, used: Optional[int] = None, flag: str = "--seq-length"
) -> None:
    """Sequences longer than the model's ``max_position_embeddings`` (``used``: the positions
    actually run, when shorter than ``seq_length``): refused with learned positions (the table
    has no row for them: megatron would fail with an IndexError mid-run), warned with RoPE (it
    extrapolates, untrained)."""
    limit = model_cfg.max_position_embeddings
    if (seq_length if used is None else used) <= limit:
        return
    if model_cfg.position_embedding == "learned_absolute":
        raise ValueError(
            f"{flag} {seq_length} is beyond the model's max_position_embeddings {limit}: its "
            f"learned position table has {limit} rows"
        )
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(
            f"warning: {flag} {seq_length} is beyond the model's max_position_embeddings {limit}:"
            " RoPE runs past the positions it was trained on",
            file=sys.stderr,
        )


def load_elastic_model(
    path: str,
    tp: int = 1,
    pp: int = 1,
    dtype: torch.dtype = torch.float32,
    device: Optional[torch.device] = None,
) -> ElasticModel:
    """This rank's elastic GPTModel of checkpoint ``path`` at TP=``tp``, PP=``pp`` (the
    parallel state's sizes), in ``dtype`` on ``device`` (default: this rank's), weights loaded,
    in eval mode. Collective when the stored TP size is ``tp`` (megatron's sharded load)."""
    config, model_cfg, elastic = read_model_configs(path, tp)
    device = device if device is not None else current_device()
    tconfig = Runtime(tp, pp, dtype, device=device).transformer_config(model_cfg)
    model = build_elastic_model(model_cfg, tconfig).to(device)
    load_flextron_into_model(model, path)
    return ElasticModel(model.eval(), model_cfg, elastic, config, path)


def check_finite_weights(loaded: ElasticModel) -> None:
    """Refuse (ValueError, on every rank) a checkpoint holding a NaN or inf weight, naming
    the first such tensor: generation would otherwise serve text from it without a word, where
    tools/evaluate.py reports a non-finite loss. Collective over the world (every rank holds
    part of the model)."""
    from megatron_flextron.elastic.tp_layout import local_to_global_names

    canonical = local_to_global_names(loaded.model)  # the checkpoint's names, any model class
    bad = [canonical[n] for n, p in loaded.model.named_parameters() if not p.isfinite().all()]
    count = torch.tensor([float(len(bad))], device=next(loaded.model.parameters()).device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(count)
    if count.item():
        first = f" (first: {bad[0]})" if bad else ""
        raise ValueError(
            f"checkpoint {loaded.path}: {int(count.item())} of its tensors hold NaN or inf"
            f"{first}; refusing to serve it"
        )

