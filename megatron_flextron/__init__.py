"""megatron_flextron: Flextron elastic LLMs on NVIDIA Megatron-Core."""

__version__ = "0.1.0"
