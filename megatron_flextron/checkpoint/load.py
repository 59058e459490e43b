"""Read a flextron checkpoint into a ready elastic model: config -> build -> move -> load.

The one copy of that sequence for tools, router training, evaluation and the trainer's frozen
teacher. Call after ``initialize_model_parallel`` (the model is this rank's TP shard and PP stage).
"""

from __future__ import annotations

import os
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
