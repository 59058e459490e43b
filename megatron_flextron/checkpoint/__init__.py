"""The project's own checkpoint format: canonical state, atomic IO, flextron dist checkpoints."""

from megatron_flextron.checkpoint.state import Checkpoint, CheckpointError, expected_shapes

__all__ = ["Checkpoint", "CheckpointError", "expected_shapes"]
