"""Build megatron-core's stock GPTModel, elastic (our layer spec) or dense (megatron's)."""

from __future__ import annotations

from typing import Optional

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from megatron_flextron.config import ModelConfig
from megatron_flextron.elastic.specs import elastic_layer_spec, stock_layer_spec


def build_gpt_model(
    model_config: ModelConfig,
    transformer_config,
    *,
    elastic: bool = True,
    core_attention: Optional[str] = None,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
) -> GPTModel:
    """This pipeline stage's GPTModel. Call after ``initialize_model_parallel``.

    ``transformer_config`` is usually ``model_config.transformer_config(...)``; a dense model of a
    smaller shape (a hand-sliced reference, an export) passes its own.
    """
    if elastic:
        spec = elastic_layer_spec(model_config, core_attention or "sdpa")
    else:
        spec = stock_layer_spec(model_config, core_attention or "local")
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    return GPTModel(
        config=transformer_config,
        transformer_layer_spec=spec,
        pre_process=pre_process,
        post_process=post_process,
        **model_config.gpt_model_kwargs(),
    )
