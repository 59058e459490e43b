"""Text generation and serving of elastic models on megatron-core's inference stack."""

from megatron_flextron.inference.engine import (
    ElasticGenerator,
    Request,
    Result,
    Sampling,
    build_generator,
)
from megatron_flextron.inference.subnetworks import Architecture, SubnetworkSelector

__all__ = [
    "Architecture",
    "ElasticGenerator",
    "Request",
    "Result",
    "Sampling",
    "SubnetworkSelector",
    "build_generator",
]
