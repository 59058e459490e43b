"""Elastic megatron-core modules, the layer spec that uses them, and sub-network selection."""

from megatron_flextron.elastic.model import build_elastic_model, build_gpt_model
from megatron_flextron.elastic.subnetwork import Subnetwork, count_parameters, set_subnetwork

__all__ = [
    "build_elastic_model",
    "build_gpt_model",
    "Subnetwork",
    "count_parameters",
    "set_subnetwork",
]
